"""The attention the chunked forward calls once per layer, over the whole sequence.

Every other part of the forward runs in chunks; attention is the one call at full length, and the
only part that differs between a dense and a sparse prefill. :data:`AttentionFn` is its contract
(transformers' attention-function signature), :func:`sdpa_attention` the dense one, and
:func:`_model_attention` the one a model is set to use when the caller passes none: sparse
prefill's own function when :func:`sparse_prefill.enable` switched the model, SDPA otherwise.
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


# transformers' own implementations of dense causal attention: with no mask they all compute what
# SDPA computes, so the chunked forward runs SDPA for them (the same result, rounding aside).
_DENSE_IMPLEMENTATIONS = (None, "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _model_attention(model: torch.nn.Module) -> AttentionFn:
    """The attention ``model`` is set to use: sparse prefill's if :func:`sparse_prefill.enable` switched it, else SDPA.

    The link is explicit: the sparse function is taken from our own integration, and whether the
    model uses it from the state :func:`~sparse_prefill.integrations.transformers.enable` attached
    (or a model loaded with ``attn_implementation="sparse_prefill"``), never by looking a name up
    in transformers' attention registry. Any other implementation name is refused: its function
    is unknown here, and the caller can pass it as ``attention=``.
    """
    # transformers is imported here, not with this module: the model is a transformers model.
    from ..integrations import transformers as integration

    name = model.config._attn_implementation
    if integration.state_of(model) is not None or name == integration.ATTENTION_NAME:
        return integration.sparse_prefill_attention
    if name in _DENSE_IMPLEMENTATIONS:
        return sdpa_attention
    raise ValueError(
        f"long prefill runs sparse prefill's attention (sparse_prefill.enable) or dense SDPA; the model's "
        f"attention implementation is {name!r}: pass its function as attention=..."
    )
