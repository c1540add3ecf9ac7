"""Decoding after a prefill: one token at a time over the kept KV cache, dense attention.

:func:`decode_step` feeds one token per sequence and appends its K/V to the cache;
:func:`generate` continues greedily from a :class:`~sparse_prefill.long_prefill.PrefillResult`.
An offloaded cache is streamed back layer by layer (:meth:`KVCache.prefilled_layers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter import _check_positive_int, _Parts, _parts, _project_qkv, _rope
from .cache import KVCache
from .forward import PrefillResult


def decode_step(model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence at position ``cache.seq_len``; return next-token logits [batch, vocab].

    ``tokens`` is a LongTensor [batch, 1] on the model's device; its K/V are appended to ``cache``.
    """
    with torch.no_grad():
        return _decode_step(_parts(model), cache, tokens)


def _decode_step(parts: _Parts, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    decoder, head_dim = parts.decoder, parts.head_dim
    batch = tokens.shape[0]
    hidden = decoder.embed_tokens(tokens)  # [batch, 1, hidden]
    position = torch.full((1, 1), cache.seq_len, device=parts.device)
    cos, sin = decoder.rotary_emb(hidden, position)
    prefilled = cache.prefilled_layers(parts.device, parts.dtype)
    for index, (layer, (old_k, old_v)) in enumerate(zip(parts.layers, prefilled)):
        module = layer.self_attn
        q, k, v = _project_qkv(module, layer.input_layernorm(hidden), head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        new_k, new_v = cache.append(index, k, v)
        keys, values = torch.cat((old_k, new_k), dim=2), torch.cat((old_v, new_v), dim=2)
        del old_k, old_v
        # One query attends to every cached key: no mask.
        out = F.scaled_dot_product_attention(
            q, keys, values, scale=module.scaling, enable_gqa=q.shape[1] != keys.shape[1]
        )
        del keys, values
        hidden = hidden + module.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return parts.head(decoder.norm(hidden))[:, -1]


def generate(model: torch.nn.Module, prefilled: PrefillResult, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of a prefill that kept its cache; dense attention over the cache.

    Parameters
    ----------
    model : the model :func:`prefill` ran
    prefilled : PrefillResult with a cache (``cache="device"`` or ``"offload"``); its cache grows
    max_new_tokens : int
        Tokens to produce; the first is the argmax of the prefill's logits.

    Returns
    -------
    LongTensor [batch, max_new_tokens]
    """
    parts = _parts(model)
    max_new_tokens = _check_positive_int(max_new_tokens, "max_new_tokens")
    if not isinstance(prefilled, PrefillResult) or prefilled.cache is None:
        raise ValueError("generate needs the result of prefill(..., cache='device' or 'offload'); this one kept no cache")
    tokens = [prefilled.logits.argmax(dim=-1)]  # [batch] each
    with torch.no_grad():
        for _ in range(max_new_tokens - 1):
            logits = _decode_step(parts, prefilled.cache, tokens[-1][:, None])
            tokens.append(logits.argmax(dim=-1))
    return torch.stack(tokens, dim=1)
