"""The model adapter: which transformers models the chunked forward can run, and their pieces.

:func:`_parts` checks that a causal LM is Llama-like (see the package docstring) and returns its
modules and shapes as one :class:`_Parts`, or says what does not fit; every other module of
:mod:`sparse_prefill.long_prefill` works from a ``_Parts``, never from the model itself. The
operations that must repeat transformers' Llama exactly (RoPE, the Q/K/V projections with Qwen3's
per-head norms) live here too, next to the structure they assume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_LAYER_PARTS = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_OPTIONAL_ATTENTION_PARTS = {"q_norm", "k_norm"}


@dataclass(frozen=True)
class _Parts:
    decoder: torch.nn.Module
    head: torch.nn.Module
    layers: tuple[torch.nn.Module, ...]
    n_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype: torch.dtype
    device: torch.device


def _parts(model: torch.nn.Module) -> _Parts:
    """The modules a Llama-like causal LM is made of, or ValueError saying what does not fit."""
    name = type(model).__name__
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM (get_decoder, get_output_embeddings), got {name}")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    missing = [part for part in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, part)]
    if missing or head is None:
        raise ValueError(
            f"long prefill needs a Llama-like decoder (embed_tokens, layers, norm, rotary_emb) and an output "
            f"head; {name} lacks {missing or ['output embeddings']}"
        )
    layers = tuple(decoder.layers)
    if not layers:
        raise ValueError(f"long prefill needs at least one decoder layer; {name} has none")
    for index, layer in enumerate(layers):
        children = {child for child, _ in layer.named_children()}
        if children != _LAYER_PARTS:
            raise ValueError(
                f"long prefill supports Llama-like decoder layers made of {sorted(_LAYER_PARTS)}; "
                f"layer {index} of {name} has {sorted(children)}"
            )
        attention = {child for child, _ in layer.self_attn.named_children()}
        if not _ATTENTION_PARTS <= attention or attention - _ATTENTION_PARTS - _OPTIONAL_ATTENTION_PARTS:
            raise ValueError(
                f"long prefill needs attention with separate q_proj, k_proj, v_proj, o_proj (optionally q_norm, "
                f"k_norm); layer {index} of {name} has {sorted(attention)}"
            )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    first = layers[0].self_attn
    head_dim = int(first.head_dim)
    q_heads = first.q_proj.out_features // head_dim
    kv_heads = first.k_proj.out_features // head_dim
    weight = decoder.embed_tokens.weight
    return _Parts(
        decoder=decoder,
        head=head,
        layers=layers,
        n_layers=len(layers),
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=weight.shape[1],
        intermediate=int(getattr(config, "intermediate_size", 4 * weight.shape[1])),
        vocab=head.weight.shape[0],
        dtype=weight.dtype,
        device=weight.device,
    )


def _check_windows(parts: _Parts, seq_len: int) -> None:
    for index, layer in enumerate(parts.layers):
        attention = layer.self_attn
        # Qwen2/3 set the window on the module (None on full-attention layers); Mistral reads its config.
        if hasattr(attention, "sliding_window"):
            window = attention.sliding_window
        else:
            window = getattr(getattr(attention, "config", None), "sliding_window", None)
        if window is not None and window < seq_len:
            raise ValueError(
                f"long prefill computes full causal attention; layer {index} has a sliding window of {window} "
                f"tokens, shorter than the prompt ({seq_len}): such models are not supported"
            )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, n, head_dim], cos/sin [1, n, head_dim]; the operations of transformers' Llama."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _project_qkv(
    attention: torch.nn.Module, normed: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """normed [batch, n, hidden] -> q, k, v [batch, heads, n, head_dim], before RoPE."""
    batch, n, _ = normed.shape
    q = attention.q_proj(normed).view(batch, n, -1, head_dim)
    k = attention.k_proj(normed).view(batch, n, -1, head_dim)
    v = attention.v_proj(normed).view(batch, n, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm over head_dim before RoPE
        q, k = attention.q_norm(q), attention.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


# Shared by every entry point (lengths, chunk size, tokens to generate).
def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value
