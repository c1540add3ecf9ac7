"""The reference: exact masked attention over each head's kept set, in plain PyTorch.

Obviously correct rather than fast. It is the library's CPU path and the yardstick of every kernel.
Work is done one query head and one chunk of query rows at a time, so memory stays at about
``chunk_size x seq`` floats per temporary: 32K tokens x 9 heads runs in a few GB on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .checks import check_layer_patterns, check_qkv, check_scale
from .kinds import HeadIndex, estimate_layer
from .patterns import Pattern

__all__ = ["ReferenceResult", "reference_attention", "attention_with_index"]


@dataclass
class ReferenceResult:
    """What :func:`reference_attention` returns.

    out : Tensor [batch, q_heads, q_len, head_dim]
        float32 (float64 for float64 inputs).
    lse : Tensor [batch, q_heads, q_len]
        Each row's natural log-sum-exp over its kept logits, in the dtype of ``out``.
    indices : list of HeadIndex, one per query head, or None
        The kept sets, when ``return_indices`` was set.
    recall : Tensor [batch, q_heads] or None
        Dense attention mass on the kept set, averaged over query rows, when ``return_recall``.
    """

    out: torch.Tensor
    lse: torch.Tensor
    indices: list[HeadIndex] | None = None
    recall: torch.Tensor | None = None


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
    chunk_size: int = 1024,
    return_indices: bool = False,
    return_recall: bool = False,
) -> ReferenceResult:
    """Estimate each head's kept set from ``q``/``k`` and compute exact masked causal attention.

    Parameters
    ----------
    q : Tensor [batch, q_heads, q_len, head_dim]
        The last ``q_len`` positions (docs/semantics.md).
    k, v : Tensor [batch, kv_heads, kv_len, head_dim]
        ``q_heads`` a multiple of ``kv_heads`` (GQA); K/V are read per group, never repeated.
    patterns : Pattern or sequence of q_heads Patterns
        One pattern for every head, or one per query head.
    scale : float, optional
        Softmax scale; ``1/sqrt(head_dim)`` when None.
    chunk_size : int
        Query rows processed at once.
    """
    shape = check_qkv(q, k, v)
    head_patterns = check_layer_patterns(patterns, shape.q_heads)
    scale = check_scale(scale, shape.head_dim)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
    indices = estimate_layer(q, k, head_patterns, scale)
    out, recall, lse = attention_with_index(q, k, v, indices, scale=scale, chunk_size=chunk_size,
                                            return_recall=return_recall, return_lse=True)
    return ReferenceResult(out=out, lse=lse, indices=indices if return_indices else None, recall=recall)


def attention_with_index(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: Sequence[HeadIndex],
    *,
    scale: float,
    chunk_size: int = 1024,
    return_recall: bool = False,
    return_lse: bool = False,
):
    """Exact attention over given kept sets (one index per query head); returns ``(out, recall)``, and
    the log-sum-exp as a third value with ``return_lse``. ``q`` holds the last ``q_len`` positions."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    q_start = kv_len - q_len
    group = q_heads // k.shape[1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(batch, q_heads, q_len, v.shape[-1], dtype=dtype, device=q.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=dtype, device=q.device)
    recall = torch.zeros(batch, q_heads, dtype=dtype, device=q.device) if return_recall else None
    for head, index in enumerate(indices):
        k_head = k[:, head // group].to(dtype)  # [batch, kv_len, dim]
        v_head = v[:, head // group].to(dtype)
        for start in range(0, q_len, chunk_size):
            local = torch.arange(start, min(start + chunk_size, q_len), device=q.device)
            rows = q_start + local  # positions
            logits = torch.einsum("bqd,bkd->bqk", q[:, head, local].to(dtype), k_head) * scale
            kept = index.kept_mask(rows, kv_len)  # [batch, rows, kv_len]
            masked = logits.masked_fill(~kept, float("-inf"))
            lse[:, head, local] = masked.logsumexp(dim=-1)
            out[:, head, local] = torch.einsum("bqk,bkd->bqd", masked.softmax(dim=-1), v_head)
            if recall is not None:
                causal = torch.arange(kv_len, device=q.device)[None, :] <= rows[:, None]
                dense = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
                recall[:, head] += (dense * kept).sum(dim=(1, 2))
    if recall is not None:
        recall /= q_len
    return (out, recall, lse) if return_lse else (out, recall)
