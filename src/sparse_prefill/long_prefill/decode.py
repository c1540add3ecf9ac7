"""Decoding after a prefill: one token at a time over the kept KV cache, dense or sparse attention.

:func:`decode_step` feeds one token per sequence and appends its K/V to the cache;
:func:`generate` continues greedily from a :class:`~sparse_prefill.long_prefill.PrefillResult`.

Dense decoding (the default) attends to every cached key; an offloaded cache is streamed back layer
by layer (:meth:`KVCache.prefilled_layers`). Sparse decoding (``decode="sparse"``, issue 17) attends
per layer and KV head only to the pages :func:`sparse_prefill.decoding.select_pages` picks within a
token budget, from page summaries the cache keeps (docs/semantics.md, "Sparse decoding"):

- a device cache in the model's dtype runs :func:`~sparse_prefill.decoding.sparse_decode_attention`
  (the Triton split-K kernel on CUDA) over the layer's cache, held in one buffer with room for the
  tokens to come;
- an FP8 or offloaded cache gathers the selected pages' keys (FP8: then dequantizes only those)
  and runs the dense path's attention over them; offloaded, only those pages cross PCIe.

A budget of at least the cache length is dense decoding, through the dense path's own attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..decoding import (
    DEFAULT_BUDGET,
    DEFAULT_LOCAL,
    DEFAULT_PAGE_SIZE,
    DEFAULT_SINK,
    select_pages,
    sparse_decode_attention,
)
from .adapter import _check_positive_int, _Parts, _parts, _project_qkv, _rope
from .cache import KVCache
from .forward import PrefillResult

DECODE_MODES = ("dense", "sparse")


@dataclass(frozen=True)
class _SparseDecoding:
    budget: int
    sink: int
    local: int
    page_size: int


def _sparse_settings(decode: Any, budget: Any, sink: Any, local: Any, page_size: Any) -> _SparseDecoding | None:
    """Validate ``decode`` and the sparse settings; None for dense decoding."""
    if not isinstance(decode, str) or decode not in DECODE_MODES:
        raise ValueError(f"decode must be 'dense' or 'sparse', got decode={decode!r}")
    given = {"budget": budget, "sink": sink, "local": local, "page_size": page_size}
    if decode == "dense":
        named = [f"{name}={value!r}" for name, value in given.items() if value is not None]
        if named:
            raise ValueError(f"budget, sink, local and page_size apply to decode='sparse' only, got "
                             f"{', '.join(named)} with decode='dense'")
        return None
    defaults = {"budget": DEFAULT_BUDGET, "sink": DEFAULT_SINK, "local": DEFAULT_LOCAL, "page_size": DEFAULT_PAGE_SIZE}
    minimum = {"budget": 1, "sink": 0, "local": 1, "page_size": 1}
    settings = {}
    for name, value in given.items():
        value = defaults[name] if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum[name]:
            raise ValueError(f"{name} must be an int >= {minimum[name]}, got {name}={value!r}")
        settings[name] = value
    if settings["budget"] < settings["sink"] + settings["local"]:
        raise ValueError(f"budget must be at least sink + local (the always-kept tokens), got "
                         f"budget={settings['budget']}, sink={settings['sink']}, local={settings['local']}")
    return _SparseDecoding(**settings)


def decode_step(model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor, *, decode: str = "dense",
                budget: int | None = None, sink: int | None = None, local: int | None = None,
                page_size: int | None = None) -> torch.Tensor:
    """Feed one token per sequence at position ``cache.seq_len``; return next-token logits [batch, vocab].

    ``tokens`` is a LongTensor [batch, 1] on the model's device; its K/V are appended to ``cache``.
    ``decode``, ``budget``, ``sink``, ``local`` and ``page_size`` as in :func:`generate`; the first
    sparse step builds the cache's page summaries.
    """
    parts = _parts(model)
    sparse = _sparse_settings(decode, budget, sink, local, page_size)
    with torch.no_grad():
        if sparse is not None:
            _prepare_sparse(parts, cache, sparse, extra=1 if cache.key_buffers is None else 0)
        return _decode_step(parts, cache, tokens, sparse)


def _prepare_sparse(parts: _Parts, cache: KVCache, sparse: _SparseDecoding, extra: int) -> None:
    """Room for ``extra`` decoded tokens, and page summaries of the cache with room for them too."""
    cache.reserve(extra, parts.device, parts.dtype)
    if cache.summaries is None or cache.summaries[0].page_size != sparse.page_size:
        cache.summarise(parts.device, parts.dtype, sparse.page_size, capacity=cache.seq_len + extra)


def _decode_step(
    parts: _Parts, cache: KVCache, tokens: torch.Tensor, sparse: _SparseDecoding | None = None
) -> torch.Tensor:
    decoder, head_dim = parts.decoder, parts.head_dim
    batch = tokens.shape[0]
    hidden = decoder.embed_tokens(tokens)  # [batch, 1, hidden]
    position = torch.full((1, 1), cache.seq_len, device=parts.device)
    cos, sin = decoder.rotary_emb(hidden, position)
    # Dense decoding reads every layer whole: as views of one buffer where the cache has one (a device
    # cache in the model's dtype after reserve), else the prefill (an offloaded one streamed a layer
    # ahead) concatenated with the decoded tokens. Sparse decoding reads pages.
    whole_in_place = cache.contiguous_layer(0) is not None
    prefilled = cache.prefilled_layers(parts.device, parts.dtype) if sparse is None and not whole_in_place else None
    for index, layer in enumerate(parts.layers):
        if prefilled is not None:
            old_k, old_v = next(prefilled)
        module = layer.self_attn
        q, k, v = _project_qkv(module, layer.input_layernorm(hidden), head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        new_k, new_v = cache.append(index, k, v)
        if sparse is not None:
            out = _sparse_attention(parts, cache, index, q, module.scaling, sparse)
        elif prefilled is not None:
            keys, values = torch.cat((old_k, new_k), dim=2), torch.cat((old_v, new_v), dim=2)
            del old_k, old_v
            out = _attend(q, keys, values, module.scaling)
            del keys, values
        else:
            out = _attend(q, *cache.contiguous_layer(index), module.scaling)
        hidden = hidden + module.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return parts.head(decoder.norm(hidden))[:, -1]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [batch, q_heads, 1, head_dim] over keys, values [batch, kv_heads, n, head_dim] -> like q."""
    # One query attends to every key given: no mask.
    return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=q.shape[1] != keys.shape[1])


def _sparse_attention(parts: _Parts, cache: KVCache, layer: int, q: torch.Tensor, scale: float,
                      sparse: _SparseDecoding) -> torch.Tensor:
    """One layer's attention for a sparse step, the step's K/V already in ``cache``."""
    n_keys = cache.layer_len(layer)
    if sparse.budget >= n_keys:
        # Every page would be kept: the dense path's attention on the same keys gives the same tokens.
        return _attend(q, *cache.whole_layer(layer, parts.device, parts.dtype), scale)
    summaries = cache.summaries[layer]
    contiguous = cache.contiguous_layer(layer)
    if contiguous is not None:
        return sparse_decode_attention(q, *contiguous, summaries, budget=sparse.budget, sink=sparse.sink,
                                       local=sparse.local, scale=scale)
    selection = select_pages(q, summaries, budget=sparse.budget, sink=sparse.sink, local=sparse.local, scale=scale)
    return _attend(q, *cache.gather_pages(layer, selection, parts.device, parts.dtype), scale)


def generate(model: torch.nn.Module, prefilled: PrefillResult, max_new_tokens: int, *, decode: str = "dense",
             budget: int | None = None, sink: int | None = None, local: int | None = None,
             page_size: int | None = None) -> torch.Tensor:
    """Greedy continuation of a prefill that kept its cache.

    Parameters
    ----------
    model : the model :func:`prefill` ran
    prefilled : PrefillResult with a cache (``cache="device"`` or ``"offload"``)
        Its cache grows by the decoded tokens. Every call continues the prompt: tokens an earlier
        call decoded from the same result are dropped first (:meth:`KVCache.rewind`), so one
        prefill can be decoded several ways.
    max_new_tokens : int
        Tokens to produce; the first is the argmax of the prefill's logits.
    decode : "dense" or "sparse"
        Dense attends to every cached key (the default). Sparse attends, per layer, step and KV
        head, to the cache's pages that :func:`sparse_prefill.decoding.select_pages` picks
        (docs/semantics.md, "Sparse decoding"). It first builds the cache's page summaries on the
        model's device (each page's per-channel minimum and maximum: 2 / page_size of the keys'
        size in the model's dtype, a quarter at the default page size; FP8 keys are summarised
        dequantized). Either way, a device cache in the model's dtype first
        moves each layer into one buffer with room for the new tokens (one copy of the cache, a
        layer at a time), which the steps then read in place.
    budget : int, optional
        Sparse only: keys per KV head and step, in whole pages, sink and window included
        (default :data:`sparse_prefill.decoding.DEFAULT_BUDGET`); at least the cache length is
        dense decoding, token for token.
    sink, local : int, optional
        Sparse only: first and last keys always kept (``sink >= 0``, ``local >= 1``,
        ``budget >= sink + local``).
    page_size : int, optional
        Sparse only: keys per page (default :data:`sparse_prefill.decoding.DEFAULT_PAGE_SIZE`).

    Returns
    -------
    LongTensor [batch, max_new_tokens]

    Raises
    ------
    ValueError
        Before any work, naming the argument: a bad ``max_new_tokens``, ``decode`` or sparse
        setting, sparse settings with ``decode="dense"``, or a prefill that kept no cache.
    """
    parts = _parts(model)
    max_new_tokens = _check_positive_int(max_new_tokens, "max_new_tokens")
    sparse = _sparse_settings(decode, budget, sink, local, page_size)
    if not isinstance(prefilled, PrefillResult) or prefilled.cache is None:
        raise ValueError(
            "generate needs the result of prefill(..., cache='device' or 'offload'); this one kept no cache"
        )
    cache = prefilled.cache
    cache.rewind()
    tokens = [prefilled.logits.argmax(dim=-1)]  # [batch] each
    with torch.no_grad():
        if max_new_tokens > 1:
            # Room for exactly the tokens fed back: neither the buffers nor the summaries reallocate. A
            # device cache in the model's dtype moves into those buffers once, so that dense decoding
            # too attends to each layer in place instead of concatenating the whole layer every step
            # (at 128K, Llama-3-8B shapes: 1 GiB of copies per layer and token).
            if sparse is not None:
                _prepare_sparse(parts, cache, sparse, extra=max_new_tokens - 1)
            else:
                cache.reserve(max_new_tokens - 1, parts.device, parts.dtype)
        for _ in range(max_new_tokens - 1):
            logits = _decode_step(parts, cache, tokens[-1][:, None], sparse)
            tokens.append(logits.argmax(dim=-1))
    return torch.stack(tokens, dim=1)
