"""Vertical-Slash index estimation in PyTorch: the definition the Triton estimator is tested against.

The last ``last_q`` queries of a head attend (softmax, causal) to all keys. Summing their attention
down each key column scores the columns; summing along each diagonal ``i - j = o`` scores the
offsets. The top ``vertical`` columns and ``slash`` offsets are kept, with the first
``SINK_COLUMNS`` columns and the ``LOCAL_DIAGONALS`` nearest offsets always among them.
"""

from __future__ import annotations

import torch

from ..index import LOCAL_DIAGONALS, SINK_COLUMNS, VerticalSlashIndex
from ..patterns import VerticalSlash


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def vertical_slash_scores(
    q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores of one query head.

    Parameters
    ----------
    q, k : Tensor [batch, seq, head_dim]
        One query head and the KV head it reads.
    last_q : int
        Queries used for the estimate (clamped to ``seq``).
    scale : float
        Softmax scale, usually ``1/sqrt(head_dim)``.

    Returns
    -------
    column_scores : Tensor [batch, seq], float32 (float64 for float64 inputs)
        ``column_scores[b, j]`` sums the attention the last queries pay to key ``j``.
    diagonal_scores : Tensor [batch, seq]
        ``diagonal_scores[b, o]`` sums the attention the last queries pay at distance ``o = i - j``.
    """
    dtype = _compute_dtype(q)
    seq = q.shape[1]
    n_last = min(last_q, seq)
    positions = torch.arange(seq - n_last, seq, device=q.device)  # [n_last]
    keys = torch.arange(seq, device=q.device)
    logits = torch.einsum("bqd,bkd->bqk", q[:, -n_last:].to(dtype), k.to(dtype)) * scale  # [batch, n_last, seq]
    logits = logits.masked_fill(keys[None, None, :] > positions[None, :, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    column_scores = probs.sum(dim=1)
    # Diagonal o of row r sits at key positions[r] - o; offsets past the row's start contribute 0.
    key_of_offset = positions[:, None] - keys[None, :]  # [n_last, offsets]
    on_row = probs.gather(2, key_of_offset.clamp(min=0).expand(q.shape[0], -1, -1))
    diagonal_scores = (on_row * (key_of_offset >= 0)).sum(dim=1)
    return column_scores, diagonal_scores


def select_vertical_slash(
    column_scores: torch.Tensor, diagonal_scores: torch.Tensor, vertical: int, slash: int
) -> VerticalSlashIndex:
    """Top ``vertical`` columns and ``slash`` offsets (budgets clamped to the length), forced ones first."""
    seq = column_scores.shape[1]
    columns = _top_with_forced(column_scores, min(vertical, seq), SINK_COLUMNS)
    offsets = _top_with_forced(diagonal_scores, min(slash, seq), LOCAL_DIAGONALS)
    return VerticalSlashIndex(columns=columns, offsets=offsets)


def _top_with_forced(scores: torch.Tensor, count: int, forced: int) -> torch.Tensor:
    """Indices [batch, count], ascending, of the top ``count`` scores with the first ``forced`` always in."""
    boosted = scores.clone()
    boosted[:, :forced] = float("inf")
    return boosted.topk(count, dim=1, sorted=False).indices.sort(dim=1).values


def vertical_slash_index(q: torch.Tensor, k: torch.Tensor, pattern: VerticalSlash, scale: float) -> VerticalSlashIndex:
    """Estimate one head's Vertical-Slash index (``q``, ``k``: [batch, seq, head_dim])."""
    column_scores, diagonal_scores = vertical_slash_scores(q, k, pattern.last_q, scale)
    return select_vertical_slash(column_scores, diagonal_scores, pattern.vertical, pattern.slash)
