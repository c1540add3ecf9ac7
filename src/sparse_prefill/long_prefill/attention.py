"""The attention the chunked forward calls once per layer, over the whole sequence.

Every other part of the forward runs in chunks; attention is the one call at full length, and the
only part that differs between a dense and a sparse prefill. :data:`AttentionFn` is its contract
(transformers' attention-function signature), :func:`sdpa_attention` the dense one, and
:func:`_model_attention` the one a model is set to use when the caller passes none.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., tuple[torch.Tensor, Any]]


def sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Dense causal prefill attention with torch's SDPA, GQA without repeating K/V.

    transformers' attention-function contract: query [batch, q_heads, seq, head_dim], key/value
    [batch, kv_heads, seq, head_dim] -> ([batch, seq, q_heads, head_dim], None). The output is a
    transposed view, not a copy: at 1M tokens a contiguous copy is another 8 GiB. The SDPA backend
    is whatever torch picks, or the one a ``torch.nn.attention.sdpa_kernel`` context names.
    """
    if attention_mask is not None:
        raise ValueError("sdpa_attention computes plain causal attention and takes no attention_mask")
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2), None


def _model_attention(model: torch.nn.Module) -> AttentionFn:
    """The attention function the model is set to use; SDPA for "sdpa" and "eager" (same result)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    if name in (None, "sdpa", "eager"):
        return sdpa_attention
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"the model's attention implementation {name!r} is not registered with transformers")
    return ALL_ATTENTION_FUNCTIONS[name]
