"""The one entry point: sparse causal attention of a whole layer, every head with its own pattern."""

from __future__ import annotations

from typing import Sequence

import torch

from .patterns import Pattern
from .reference import reference_attention

__all__ = ["sparse_attention"]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal prefill attention where each query head attends only to its pattern's kept set.

    Parameters
    ----------
    q : Tensor [batch, q_heads, seq, head_dim]
    k, v : Tensor [batch, kv_heads, seq, head_dim]
        Same dtype and device as ``q``; ``q_heads`` a multiple of ``kv_heads`` (GQA, never repeated).
    patterns : Pattern or sequence of q_heads Patterns
    scale : float, optional
        Softmax scale, ``1/sqrt(head_dim)`` when None.

    Returns
    -------
    Tensor [batch, q_heads, seq, head_dim], dtype of ``q``.

    CUDA tensors in float16/bfloat16 run the Triton kernels; anything else runs the exact PyTorch
    reference, which computes the same kept sets (docs/semantics.md).
    """
    if isinstance(q, torch.Tensor) and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from .kernels import triton_sparse_attention  # lazy: importing the package never imports Triton

        return triton_sparse_attention(q, k, v, patterns, scale=scale)
    result = reference_attention(q, k, v, patterns, scale=scale)
    return result.out.to(q.dtype)
