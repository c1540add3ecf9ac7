"""Vertical-Slash: key columns and block diagonals chosen from the last queries (MInference's main pattern).

The estimator looks at the attention of the last ``last_q`` queries over all keys: its column sums
choose the columns, and what the chosen columns do not already cover, summed along each block
diagonal, chooses the diagonals. One set of statistics of that attention
(:func:`last_query_statistics`: PyTorch on the CPU, a fused Triton pass on the GPU) feeds the one
selection (:func:`estimate`) on every path: the CPU reference, the GPU plan and the pattern search
(which ranks many budgets from the same statistics). SnapKV's window scores
(:mod:`sparse_prefill.kv_cache`) are the same column sums over the last ``window`` queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from .common import BLOCK, check_positive_int, device_values, flags, float_dtype, LOG2E, n_blocks, on_triton, scaled_count, stack_padded

# Vertical-Slash always keeps the first SINK_COLUMNS key columns (attention sinks: most models put
# heavy mass on the first tokens) and block diagonals 0 and 1, so that every query sees at least its
# 64 nearest keys, and itself: no softmax row is empty. Both count against the budget.
SINK_COLUMNS = 4
FORCED_DIAGONALS = 2


@dataclass(frozen=True)
class VerticalSlash:
    """Keep ``vertical`` key columns and ``ceil(slash / 64)`` block diagonals chosen from the last ``last_q`` queries.

    The sequence is cut into 64-token blocks; a chosen block diagonal ``d`` keeps, for every query
    block ``m``, the whole key block ``m - d``: ``64 x 64`` pairs, as many as 64 single diagonals, laid
    out as the tiles the GPU kernel computes, so it computes what it keeps. See docs/semantics.md.
    """

    vertical: int
    slash: int
    last_q: int = 64
    kind: ClassVar[str] = "vertical_slash"

    def __post_init__(self) -> None:
        check_positive_int("VerticalSlash", "vertical", self.vertical)
        check_positive_int("VerticalSlash", "slash", self.slash)
        check_positive_int("VerticalSlash", "last_q", self.last_q)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vertical": self.vertical, "slash": self.slash, "last_q": self.last_q}

    def scaled(self, factor: float) -> "VerticalSlash":
        return VerticalSlash(scaled_count(self.vertical, factor), scaled_count(self.slash, factor), self.last_q)

    def label(self) -> str:
        """The budget in a few characters, for tables and plots: ``vertical,slash``."""
        return f"{self.vertical},{self.slash}"


def minference_budget(seq_len: int) -> VerticalSlash:
    """MInference's published budget, (1000, 6096) from 128K tokens on, scaled down for shorter prompts.

    ``VerticalSlash(vertical=clamp(seq_len // 32, 64, 1000), slash=clamp(seq_len // 8, 256, 6096))``:
    a short prompt keeps a larger share of its keys (at 6144 tokens, 192 columns and 768 diagonal
    keys), since its attention is less concentrated. The search and the evaluation's A-shape baseline
    are measured against it; the library's default is a preset (:mod:`sparse_prefill.presets`).
    """
    check_positive_int("minference_budget", "seq_len", seq_len)
    return VerticalSlash(vertical=min(1000, max(64, seq_len // 32)), slash=min(6096, max(256, seq_len // 8)))


@dataclass(frozen=True)
class VerticalSlashIndex:
    """Chosen key columns and block diagonals, per batch element, each sorted ascending.

    ``columns`` [batch, n_vertical] holds key positions; ``diagonals`` [batch, n_slash] block
    diagonals. Key ``j <= i`` is kept when ``j`` is a column or ``i // 64 - j // 64`` is a diagonal.
    """

    columns: torch.Tensor
    diagonals: torch.Tensor

    def up_to(self, seq: int) -> "VerticalSlashIndex":
        """The same kept set for the keys before ``seq``: an index for the queries of a chunk ending
        there. Later columns become ``seq - 1``, which only the chunk's last query could see, and it
        keeps it anyway (diagonal 0); diagonals past the chunk's blocks become 0, which is always kept."""
        columns = self.columns.clamp(max=seq - 1)
        diagonals = torch.where(self.diagonals < n_blocks(seq), self.diagonals, 0).sort(dim=-1).values
        return VerticalSlashIndex(columns=columns, diagonals=diagonals)

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        column_flag = flags(self.columns, n_keys)  # [batch, keys]
        key_blocks = n_blocks(n_keys)
        diagonal_flag = flags(self.diagonals, key_blocks)  # [batch, diagonals]
        keys = torch.arange(n_keys, device=rows.device)
        # A diagonal covers whole (row block, key block) tiles: look it up once per key block and widen,
        # rather than gathering rows x keys flags (the CPU path's cost at 8K+ tokens).
        distance = rows[:, None] // BLOCK - torch.arange(key_blocks, device=rows.device)[None, :]
        on_slash = diagonal_flag[:, distance.clamp(min=0)]  # [batch, rows, key blocks]
        on_slash = on_slash.repeat_interleave(BLOCK, dim=2)[:, :, :n_keys]
        return (keys[None, :] <= rows[:, None]) & (column_flag[:, None, :] | on_slash)


# --- the last queries' attention ------------------------------------------------------------------


@dataclass
class LastQueryStatistics:
    """The softmax attention of the last queries of some heads, folded as the estimator needs it.

    ``rows`` below runs over ``batch x heads`` (batch-major). Row ``r`` of ``n_last`` is the query at
    position ``seq - n_last + r``; a head with a smaller ``last_q`` uses only its own last rows.

    column_scores : [rows, seq]  attention each key gets, summed over the head's rows
    block_sums : [rows, n_last, n_blocks]  each row's attention summed over each 64-key block
    row_max, row_sum : [rows, n_last]  each row's softmax statistics in base 2 (logits times ``scale / ln 2``)
    row_used : bool [rows, n_last]  whether the row is one of the head's own
    """

    column_scores: torch.Tensor
    block_sums: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor
    row_used: torch.Tensor

    @property
    def n_last(self) -> int:
        return self.row_max.shape[1]


def last_query_statistics(q: torch.Tensor, k: torch.Tensor, heads: list[int], last_q: list[int], scale: float) -> LastQueryStatistics:
    """Attention statistics of the last ``last_q[i]`` queries of query head ``heads[i]`` over all keys.

    ``q`` [batch, q_heads, q_len, head_dim] (the last ``q_len`` positions), ``k`` [batch, kv_heads,
    seq, head_dim] (GQA: never repeated); a head uses at most ``q_len`` queries. float32 (float64
    for float64 inputs); on CUDA half precision a fused Triton pass
    (:mod:`sparse_prefill.kernels.last_query`) computes the same without the ``n_last x seq`` matrix.
    """
    batch, q_heads, q_len, _ = q.shape
    seq = k.shape[2]  # keys; the queries are the last q_len positions
    group = q_heads // k.shape[1]
    own_rows = [min(n, q_len) for n in last_q]  # a chunk's own queries only
    n_last = max(own_rows)  # from the Python list: no host synchronisation
    row_used = _rows_used(tuple(own_rows), batch, q.device)
    ids = device_values(heads, q.device)
    if on_triton(q):
        from ..kernels.last_query import last_query_scores  # lazy: importing the package never imports Triton

        column_scores, block_sums, row_max, row_sum = last_query_scores(
            q, k, ids, device_values(own_rows * batch, q.device, torch.int32), n_last, scale)
        return LastQueryStatistics(column_scores, block_sums, row_max, row_sum, row_used)
    dtype = float_dtype(q)
    positions = torch.arange(seq - n_last, seq, device=q.device)
    logits = torch.matmul(q[:, ids, q_len - n_last :].to(dtype), k[:, ids // group].to(dtype).transpose(-1, -2))
    logits = (logits * (scale * LOG2E)).masked_fill(torch.arange(seq, device=q.device) > positions[:, None], float("-inf"))
    row_max = logits.amax(dim=-1)  # finite: key 0 is causal for every row
    probs = torch.exp2(logits - row_max[..., None])
    row_sum = probs.sum(dim=-1)
    probs = probs / row_sum[..., None] * row_used.view(batch, len(heads), n_last, 1)
    padded = torch.nn.functional.pad(probs, (0, n_blocks(seq) * BLOCK - seq))
    block_sums = padded.view(batch, len(heads), n_last, -1, BLOCK).sum(dim=-1)
    return LastQueryStatistics(probs.sum(dim=2).flatten(0, 1), block_sums.flatten(0, 1), row_max.flatten(0, 1),
                               row_sum.flatten(0, 1), row_used)


@lru_cache(maxsize=64)
def _rows_used(own_rows: tuple[int, ...], batch: int, device: torch.device) -> torch.Tensor:
    """bool [batch * heads, max(own_rows)]: which of the last rows each head uses (its own last
    ``own_rows[j]``). Made once per distinct list and shared (read only): every layer of a prompt asks
    for the same, and building it costs several small GPU operations."""
    n_last = max(own_rows)
    rows = torch.arange(n_last)[None, :] >= n_last - torch.tensor(own_rows)[:, None]
    return rows.repeat(batch, 1).to(device)


def ranked_with_forced(scores: torch.Tensor, count: int, forced: int) -> torch.Tensor:
    """Indices [rows, count] in rank order: ``0 .. min(forced, count) - 1``, then by descending score."""
    forced = min(forced, count)
    first = device_values(range(forced), scores.device, torch.long).expand(scores.shape[0], -1)
    best = scores[:, forced:].topk(count - forced, dim=1, sorted=True).indices + forced
    return torch.cat([first, best], dim=1)


def top_per_head(scores: torch.Tensor, counts: list[int], batch: int, forced: int) -> torch.Tensor:
    """scores [batch*n_heads, length] -> long [batch*n_heads, max(counts)] ascending; head j keeps counts[j].

    The first ``forced`` indices, then the best scores. Entries past a head's count repeat its last
    kept index, so they never name a pair the head does not keep.
    """
    count = max(counts)
    ranked = ranked_with_forced(scores, count, forced)
    if min(counts) == count:  # one budget for every head (the usual case): nothing to cut
        return ranked.sort(dim=1).values
    per_row = device_values(counts * batch, scores.device)[:, None]  # [batch*n_heads, 1]
    rank = torch.arange(count, device=scores.device)[None, :]
    big = scores.shape[1]
    chosen = torch.where(rank < per_row, ranked, big).sort(dim=1).values
    return torch.where(chosen == big, chosen.gather(1, per_row - 1), chosen)


def diagonal_scores(stats: LastQueryStatistics, q: torch.Tensor, k: torch.Tensor, heads: list[int],
                    columns: torch.Tensor, counts: torch.Tensor, scale: float) -> torch.Tensor:
    """[rows, n_blocks]: the last queries' attention on each block diagonal, less what ``columns`` keep.

    ``columns`` [rows, V] (entries at or past ``counts`` [rows] are ignored). The chosen columns'
    attention is recomputed for those keys only and taken out of the row-block sums; block diagonal
    ``d`` of the row at position ``i`` is its sum over key block ``i // 64 - d``.
    """
    ids = device_values(heads, q.device)
    if on_triton(q):
        from ..kernels.last_query import diagonal_scores as fused  # lazy: importing the package never imports Triton

        return fused(q, k, ids, columns, counts, stats.block_sums, stats.row_max, stats.row_sum, stats.row_used, scale)
    batch, q_heads, q_len, dim = q.shape
    seq = k.shape[2]
    group = q_heads // k.shape[1]
    n_last = stats.n_last
    dtype = stats.block_sums.dtype
    positions = torch.arange(seq - n_last, seq, device=q.device)
    q_rows = q[:, ids, q_len - n_last :].flatten(0, 1).to(dtype)  # [rows, n_last, dim]
    kv_rows = (torch.arange(batch, device=q.device)[:, None] * k.shape[1] + (ids // group)[None, :]).flatten()
    k_cols = k.reshape(-1, dim)[kv_rows[:, None] * seq + columns].to(dtype)  # [rows, V, dim]
    logits = torch.einsum("hrd,hvd->hrv", q_rows, k_cols) * (scale * LOG2E)
    counted = torch.arange(columns.shape[1], device=q.device)[None, :] < counts[:, None]
    taken = torch.exp2(logits - stats.row_max[:, :, None]) / stats.row_sum[:, :, None]
    taken = taken * (stats.row_used[:, :, None] & counted[:, None, :] & (columns[:, None, :] <= positions[None, :, None]))
    residual = stats.block_sums.scatter_add(2, (columns // BLOCK)[:, None, :].expand(-1, n_last, -1), -taken)
    n_tiles = residual.shape[2]
    key_block = positions[:, None] // BLOCK - torch.arange(n_tiles, device=q.device)[None, :]  # [n_last, d]
    on_row = residual.gather(2, key_block.clamp(min=0).expand(residual.shape[0], -1, -1))
    return (on_row * (key_block >= 0)).sum(dim=1)


def estimate(q: torch.Tensor, k: torch.Tensor, heads: list[int], patterns: list[VerticalSlash], scale: float) -> list[VerticalSlashIndex]:
    """Every Vertical-Slash head of a layer at once (docs/semantics.md); budgets are clamped to the sequence."""
    batch, seq = q.shape[0], k.shape[2]  # budgets are clamped to the positions, for a chunk too
    stats = last_query_statistics(q, k, heads, [p.last_q for p in patterns], scale)
    verticals = [min(p.vertical, seq) for p in patterns]
    n_diagonals = [min(-(-p.slash // BLOCK), n_blocks(seq)) for p in patterns]
    columns = top_per_head(stats.column_scores, verticals, batch, SINK_COLUMNS)  # [batch * n, max V]
    counts = device_values(verticals * batch, q.device)
    scores = diagonal_scores(stats, q, k, heads, columns, counts, scale)
    diagonals = top_per_head(scores, n_diagonals, batch, FORCED_DIAGONALS)
    columns, diagonals = columns.view(batch, len(heads), -1), diagonals.view(batch, len(heads), -1)
    return [VerticalSlashIndex(columns=columns[:, j, : verticals[j]], diagonals=diagonals[:, j, : n_diagonals[j]])
            for j in range(len(heads))]


# --- the GPU kernel's share and cost -------------------------------------------------------------------


def add_to_plan(writer, heads: list[int], indices: list[VerticalSlashIndex]) -> None:
    # Padding repeats diagonal 0 (always kept) and puts columns past the sequence (dropped).
    diagonals = stack_padded([index.diagonals for index in indices], 0)  # [batch, len(heads), S]
    flags = torch.zeros(writer.batch, len(heads), writer.n_blocks + 1, dtype=torch.bool, device=writer.device)
    writer.diagonal_flag[:, writer.head_index(heads)] |= flags.scatter_(2, diagonals, True)
    writer.set_columns(heads, stack_padded([index.columns for index in indices], writer.seq))


def column_tiles(columns: torch.Tensor, seq: int) -> torch.Tensor:
    """[batch] gathered-column tiles the kernel multiplies: for each query block ``m``, the columns
    before it in tiles of 64 (covered ones included: the kernel masks them inside the tile)."""
    starts = torch.arange(n_blocks(seq), device=columns.device) * BLOCK
    before = torch.searchsorted(columns.contiguous(), starts.expand(columns.shape[0], -1).contiguous())
    return (-(-before // BLOCK)).sum(dim=1)


def computed_pairs(index: VerticalSlashIndex, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] tile pairs, [batch] gathered-column pairs) the kernel multiplies: 64 x 64 per
    diagonal tile and per gathered-column tile."""
    nb = n_blocks(seq)
    tiles = torch.stack([(nb - torch.unique(d[d < nb])).sum() for d in index.diagonals.cpu()])
    return tiles * BLOCK * BLOCK, column_tiles(index.columns.cpu(), seq) * BLOCK * BLOCK


def recall(index: VerticalSlashIndex, stats, head: int, rows: str = "all") -> float:
    """Dense mass on the kept set from blockwise statistics (:mod:`sparse_prefill.search.stats`)."""
    first_block, n_rows, _, _ = stats.rows(rows)
    seq, nb = stats.seq, stats.n_blocks
    device = stats.block_mass.device
    diagonal_flag = torch.zeros(nb, dtype=torch.bool, device=device)
    diagonal_flag[index.diagonals[0].to(device)] = True
    tiles = stats.diagonal_mass(first_block)[head][diagonal_flag].sum()
    columns = torch.unique(index.columns[0].to(device))
    # Where each kept column sits in the requested list.
    slot = torch.full((seq,), -1, dtype=torch.long, device=device)
    slot[stats.columns[head]] = torch.arange(stats.columns.shape[1], device=device)
    where = slot[columns]
    if bool((where < 0).any()):
        raise ValueError("the statistics were gathered without some of this index's columns")
    mass = stats.column_mass[head][first_block:, where]  # [query block, column]
    m = torch.arange(first_block, nb, device=device)
    distance = m[:, None] - (columns // BLOCK)[None, :]  # block diagonal of (query block, column)
    outside = (distance >= 0) & ~diagonal_flag[distance.clamp(min=0)]
    return float((tiles + (mass * outside).sum()) / n_rows)
