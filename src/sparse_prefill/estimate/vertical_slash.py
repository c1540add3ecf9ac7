"""Vertical-Slash index estimation in PyTorch: the definition the Triton estimator is tested against.

The last ``last_q`` queries of a head attend (softmax, causal) to all keys. Summing their attention
down each key column scores the columns, and the top ``vertical`` are kept. The attention that the
chosen columns already cover is then removed, and the rest is summed along each diagonal (offset
``i - j``, or block diagonal ``i // 64 - j // 64`` with ``slash_block=64``) to score the diagonals;
the best are kept. The first ``SINK_COLUMNS`` columns and the nearest diagonals are always kept.

Why columns first: a heavy column (an attention sink) seen from the last queries also lights up
the diagonals through it (query ``i`` meets column ``c`` at offset ``i - c``), one offset per
query. Scored naively, a single sink fills ``last_q`` slash slots with offsets that add nothing the
column does not already keep.
"""

from __future__ import annotations

import torch

from ..index import SINK_COLUMNS, VerticalSlashIndex, forced_diagonals
from ..patterns import VerticalSlash


def last_query_attention(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float) -> torch.Tensor:
    """Causal softmax attention of the last ``last_q`` queries (clamped to ``seq``) over all keys.

    ``q``, ``k``: [batch, seq, head_dim] (one query head and its KV head).
    Returns [batch, n_last, seq], float32 (float64 for float64 inputs); row ``r`` is the query at
    position ``seq - n_last + r`` and is zero past it.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    seq = q.shape[1]
    n_last = min(last_q, seq)
    positions = torch.arange(seq - n_last, seq, device=q.device)
    keys = torch.arange(seq, device=q.device)
    logits = torch.einsum("bqd,bkd->bqk", q[:, -n_last:].to(dtype), k.to(dtype)) * scale
    logits = logits.masked_fill(keys[None, None, :] > positions[None, :, None], float("-inf"))
    return logits.softmax(dim=-1)


def diagonal_sums(probs: torch.Tensor, slash_block: int = 1) -> torch.Tensor:
    """Last-query attention [batch, n_last, seq] -> [batch, ceil(seq / slash_block)]: mass per diagonal.

    Diagonal ``d`` of the row at position ``i`` holds the keys ``j <= i`` with
    ``i // slash_block - j // slash_block = d`` (with ``slash_block = 1``: the offset ``i - j``).
    """
    batch, n_last, seq = probs.shape
    n_diagonals = -(-seq // slash_block)
    if slash_block > 1:
        padded = torch.nn.functional.pad(probs, (0, n_diagonals * slash_block - seq))
        probs = padded.view(batch, n_last, n_diagonals, slash_block).sum(dim=3)  # [batch, n_last, key blocks]
    row_block = torch.arange(seq - n_last, seq, device=probs.device) // slash_block
    key_of_diagonal = row_block[:, None] - torch.arange(n_diagonals, device=probs.device)[None, :]
    on_row = probs.gather(2, key_of_diagonal.clamp(min=0).expand(batch, -1, -1))
    return (on_row * (key_of_diagonal >= 0)).sum(dim=1)


def top_with_forced(scores: torch.Tensor, count: int, forced: int) -> torch.Tensor:
    """Indices [batch, count], ascending: ``0 .. min(forced, count) - 1``, then the best scores after them."""
    forced = min(forced, count)
    first = torch.arange(forced, device=scores.device).expand(scores.shape[0], -1)
    best = scores[:, forced:].topk(count - forced, dim=1, sorted=False).indices + forced
    return torch.cat([first, best.sort(dim=1).values], dim=1)


def vertical_slash_index(q: torch.Tensor, k: torch.Tensor, pattern: VerticalSlash, scale: float) -> VerticalSlashIndex:
    """Estimate one head's Vertical-Slash index (``q``, ``k``: [batch, seq, head_dim]).

    Budgets larger than the sequence are clamped to what it has.
    """
    probs = last_query_attention(q, k, pattern.last_q, scale)
    seq = probs.shape[2]
    block = pattern.slash_block
    columns = top_with_forced(probs.sum(dim=1), min(pattern.vertical, seq), SINK_COLUMNS)
    residual = probs.scatter(2, columns[:, None, :].expand(-1, probs.shape[1], -1), 0.0)
    n_diagonals = min(-(-pattern.slash // block), -(-seq // block))
    diagonals = top_with_forced(diagonal_sums(residual, block), n_diagonals, forced_diagonals(block))
    return VerticalSlashIndex(columns=columns, diagonals=diagonals, slash_block=block)


# --- adaptive budgets ------------------------------------------------------------------------------


def ranked_with_forced(scores: torch.Tensor, count: int, forced: int) -> torch.Tensor:
    """Indices [batch, count] in rank order: ``0 .. min(forced, count) - 1``, then by descending score.

    The same set as :func:`top_with_forced`, which returns it sorted by index instead.
    """
    forced = min(forced, count)
    first = torch.arange(forced, device=scores.device).expand(scores.shape[0], -1)
    best = scores[:, forced:].topk(count - forced, dim=1, sorted=True).indices + forced
    return torch.cat([first, best], dim=1)


def coverage_selection(
    column_mass: torch.Tensor,
    column_cost: torch.Tensor,
    column_valid: torch.Tensor,
    diagonal_mass: torch.Tensor,
    diagonal_cost: torch.Tensor,
    diagonal_valid: torch.Tensor,
    column_floor: torch.Tensor,
    diagonal_floor: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ranked columns and diagonals an adaptive head keeps (docs/semantics.md, adaptive Vertical-Slash).

    Every argument has one row per (batch, head): ``*_mass``, ``*_cost`` and ``*_valid``
    [rows, n] describe the candidates in rank order (mass seen from the last queries, computed pairs,
    whether the candidate is within the head's cap); ``*_floor`` [rows] how many leading candidates
    are always kept; ``target`` [rows] the mass to reach. The rest are taken in order of mass per
    computed pair (ties: columns first, then by rank) while the mass kept so far is below
    ``target``. Returns bool ``(keep_columns [rows, n_columns], keep_diagonals [rows, n_diagonals])``.
    Runs on the device without host synchronisation.
    """
    n_columns = column_mass.shape[1]
    rank_c = torch.arange(n_columns, device=column_mass.device)[None, :]
    rank_d = torch.arange(diagonal_mass.shape[1], device=column_mass.device)[None, :]
    floor = torch.cat([column_valid & (rank_c < column_floor[:, None]), diagonal_valid & (rank_d < diagonal_floor[:, None])], 1)
    valid = torch.cat([column_valid, diagonal_valid], dim=1)
    mass = torch.cat([column_mass, diagonal_mass], dim=1).double()
    ratio = mass / torch.cat([column_cost, diagonal_cost], dim=1).double()
    free = valid & ~floor
    order = torch.where(free, ratio, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    free_mass = torch.where(free, mass, 0.0).gather(1, order)
    floor_mass = torch.where(floor, mass, 0.0).sum(dim=1, keepdim=True)
    # Mass kept before each candidate is considered: the floor plus every free candidate before it.
    before = floor_mass + free_mass.cumsum(dim=1) - free_mass
    take = free.gather(1, order) & (before < target[:, None].double())
    keep = floor | torch.zeros_like(free).scatter(1, order, take)
    return keep[:, :n_columns], keep[:, n_columns:]


def adaptive_vertical_slash_index(q: torch.Tensor, k: torch.Tensor, pattern, scale: float) -> VerticalSlashIndex:
    """Estimate one head's :class:`~sparse_prefill.patterns.AdaptiveVerticalSlash` index (block diagonals).

    ``q``, ``k``: [batch, seq, head_dim]. The index lists each batch element's kept columns and
    diagonals ascending; where elements keep different numbers, the shorter lists are padded with 0
    (column 0 and diagonal 0 are always kept, so the padding names nothing new).
    """
    probs = last_query_attention(q, k, pattern.last_q, scale)  # [batch, n_last, seq]
    batch, n_last, seq = probs.shape
    n_blocks = -(-seq // 64)
    column_scores = probs.sum(dim=1)
    columns = ranked_with_forced(column_scores, min(pattern.max_vertical, seq), SINK_COLUMNS)
    residual = probs.scatter(2, columns[:, None, :].expand(-1, n_last, -1), 0.0)
    diagonal_scores = diagonal_sums(residual, 64)
    n_diagonals = min(-(-pattern.max_slash // 64), n_blocks)
    diagonals = ranked_with_forced(diagonal_scores, n_diagonals, forced_diagonals(64))
    rows = torch.ones(batch, dtype=torch.long, device=q.device)
    keep_columns, keep_diagonals = coverage_selection(
        column_scores.gather(1, columns), 64.0 * (n_blocks - columns // 64), torch.ones_like(columns, dtype=torch.bool),
        diagonal_scores.gather(1, diagonals), 4096.0 * (n_blocks - diagonals), torch.ones_like(diagonals, dtype=torch.bool),
        rows * pattern.min_vertical, rows * -(-pattern.min_slash // 64),
        torch.full((batch,), pattern.coverage * n_last, dtype=torch.float64, device=q.device),
    )
    return VerticalSlashIndex(
        columns=torch.where(keep_columns, columns, 0).sort(dim=1).values,
        diagonals=torch.where(keep_diagonals, diagonals, 0).sort(dim=1).values,
        slash_block=64,
    )
