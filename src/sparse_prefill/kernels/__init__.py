"""Triton kernels (imported lazily: importing sparse_prefill never imports Triton or touches CUDA).

``triton_sparse_attention`` is the GPU path of :func:`sparse_prefill.sparse_attention`; on CPU
tensors it runs only under ``TRITON_INTERPRET=1`` (the tests use that to check the kernel logic).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..checks import check_layer_patterns, check_qkv, check_scale
from ..patterns import Pattern
from .plan import SparsePlan, build_plan, plan_from_indices
from .sparse_attention import MAX_HEAD_DIM, run_plan

__all__ = ["MAX_HEAD_DIM", "SparsePlan", "build_plan", "plan_from_indices", "run_plan", "triton_sparse_attention"]


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
    return_plan: bool = False,
    return_lse: bool = False,
):
    """Plan (estimate every head's index) then run the sparse forward; float16/bfloat16 only.

    Returns ``out``, then the plan if ``return_plan``, then the log-sum-exp if ``return_lse``.
    """
    shape = check_qkv(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take float16 or bfloat16, got dtype={q.dtype}")
    if shape.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels support head_dim <= {MAX_HEAD_DIM}, got head_dim={shape.head_dim}")
    head_patterns = check_layer_patterns(patterns, shape.q_heads)
    scale = check_scale(scale, shape.head_dim)
    plan = build_plan(q, k, head_patterns, scale)
    lse = torch.empty(shape.batch, shape.q_heads, shape.q_len, dtype=torch.float32, device=q.device) if return_lse else None
    out = run_plan(q, k, v, plan, scale, lse=lse)
    extras = ((plan,) if return_plan else ()) + ((lse,) if return_lse else ())
    return (out, *extras) if extras else out
