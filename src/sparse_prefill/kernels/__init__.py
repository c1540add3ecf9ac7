"""Triton kernels (imported lazily: importing sparse_prefill never imports Triton or touches CUDA).

``triton_sparse_attention`` is the GPU path of :func:`sparse_prefill.sparse_attention`; on CPU
tensors it runs only under ``TRITON_INTERPRET=1`` (the tests use that to check the kernel logic).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..checks import check_layer_patterns, check_qkv, check_scale
from ..patterns import Pattern
from .plan import SparsePlan, build_plan
from .sparse_attention import run_plan

__all__ = ["SparsePlan", "build_plan", "run_plan", "triton_sparse_attention"]


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
    return_plan: bool = False,
    score_window: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, SparsePlan]:
    """Plan (estimate every head's index) then run the sparse forward; float16/bfloat16 only.

    ``score_window > 0`` has the plan keep the last ``score_window`` queries' key scores
    (``plan.window_scores``, see :func:`build_plan`), for KV-cache compression.
    """
    shape = check_qkv(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take float16 or bfloat16, got dtype={q.dtype}")
    head_patterns = check_layer_patterns(patterns, shape.q_heads)
    scale = check_scale(scale, shape.head_dim)
    plan = build_plan(q, k, head_patterns, scale, score_window)
    out = run_plan(q, k, v, plan, scale)
    return (out, plan) if return_plan else out
