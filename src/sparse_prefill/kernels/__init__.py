"""Triton kernels (imported lazily: importing sparse_prefill never imports Triton or touches CUDA).

``triton_sparse_attention`` is the GPU path of :func:`sparse_prefill.sparse_attention`, and
``triton_attention_of_sequences`` that of :func:`sparse_prefill.varlen.attention_of_sequences`; on
CPU tensors they run only under ``TRITON_INTERPRET=1`` (the tests use that to check the kernel logic).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..checks import check_layer_patterns, check_qkv, check_scale
from ..patterns import Pattern
from .plan import SparsePlan, build_plan, combine_plans, plan_from_indices
from .sparse_attention import MAX_HEAD_DIM, run_plan

if TYPE_CHECKING:
    from ..varlen import Sequences

__all__ = ["MAX_HEAD_DIM", "SparsePlan", "build_plan", "combine_plans", "plan_from_indices", "run_plan",
           "triton_attention_of_sequences", "triton_sparse_attention"]


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
    _check_kernel_inputs(q)
    head_patterns = check_layer_patterns(patterns, shape.q_heads)
    scale = check_scale(scale, shape.head_dim)
    plan = build_plan(q, k, head_patterns, scale)
    lse = torch.empty(shape.batch, shape.q_heads, shape.q_len, dtype=torch.float32, device=q.device) if return_lse else None
    out = run_plan(q, k, v, plan, scale, lse=lse)
    extras = ((plan,) if return_plan else ()) + ((lse,) if return_lse else ())
    return (out, *extras) if extras else out


def triton_attention_of_sequences(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: "Sequences", patterns: Sequence[Sequence[Pattern]], *,
    scale: float, out: torch.Tensor, lse: torch.Tensor | None = None, return_plans: bool = False,
):
    """Every sequence and head in one launch: each sequence's plan built alone from its own queries and
    keys (as :func:`triton_sparse_attention` would), then combined (:func:`combine_plans`).

    Shapes and what is written as :func:`sparse_prefill.varlen.attention_of_sequences`; float16/bfloat16
    only. Returns ``out``, and with ``return_plans`` also each sequence's own plan (None without queries).
    """
    if not q.shape[0] == k.shape[0] == v.shape[0] == len(sequences) == len(patterns):
        raise ValueError(f"one batch element and one tuple of patterns per sequence, got {len(sequences)} sequences, "
                         f"{len(patterns)} tuples of patterns and batch {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    _check_kernel_inputs(q)
    plans = []
    for i, head_patterns in enumerate(patterns):
        rows, keys = sequences.queries(i), sequences.keys(i)
        if rows.stop == rows.start:
            plans.append(None)
            continue
        one = slice(i, i + 1)
        check_qkv(q[one, :, rows], k[one, :, keys], v[one, :, keys])  # what the sequence alone would check
        plans.append(build_plan(q[one, :, rows], k[one, :, keys], check_layer_patterns(head_patterns, q.shape[1]), scale))
    if any(plan is not None for plan in plans):
        run_plan(q, k, v, combine_plans(plans, sequences.key_offset, sequences.query_offset), scale, out=out, lse=lse)
    return (out, plans) if return_plans else out


def _check_kernel_inputs(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take float16 or bfloat16, got dtype={q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels support head_dim <= {MAX_HEAD_DIM}, got head_dim={q.shape[-1]}")
