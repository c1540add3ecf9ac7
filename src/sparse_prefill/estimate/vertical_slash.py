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
