"""Candidate patterns for one head, and their recall and cost on one prompt, all at once.

A layer's candidates share their expensive parts. Vertical-Slash indices for every budget come
from one pass of the last queries: the columns of a smaller budget are the first columns of a
larger one in rank order, and for a given column count the diagonals of a smaller budget are the
first diagonals of a larger one. Block-Sparse indices for every ``top_k`` come from one ranking of
the pooled block scores, and A-shape needs no index. So one dense pass
(:func:`~sparse_prefill.search.stats.layer_statistics`) and a few cumulative sums score the whole
grid. The rankings come from the kinds' own estimator functions
(:mod:`sparse_prefill.kinds.vertical_slash`, :mod:`sparse_prefill.kinds.block_sparse`), so the
choices are the ones the online estimators make, which the tests check candidate by candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..kinds import AShapeIndex, HeadIndex, VerticalSlashIndex, a_shape, estimate_layer
from ..kinds.block_sparse import mean_pool_blocks, pooled_scores
from ..kinds.vertical_slash import (FORCED_DIAGONALS, SINK_COLUMNS, column_tiles, diagonal_scores,
                                    last_query_statistics, ranked_with_forced)
from ..patterns import AShape, BlockSparse, Dense, Pattern, VerticalSlash
from .stats import BLOCK, index_cost, index_recall, layer_statistics

__all__ = ["CandidateGrid", "GridScores", "score_grid", "score_indices", "score_patterns", "PatternScores"]

TILE_PAIRS = BLOCK * BLOCK


@dataclass(frozen=True)
class CandidateGrid:
    """Budgets tried for every head. Slash budgets and A-shape windows count 64-token blocks.

    The candidates, in :meth:`patterns` order: ``Dense()``; ``VerticalSlash(v, 64 * s)`` for every
    ``v`` in ``verticals`` and ``s`` in ``slash_blocks``; ``BlockSparse(k)`` for ``k`` in ``top_ks``;
    ``AShape(sink, 64 * b)`` for ``sink`` in ``sinks`` and ``b`` in ``local_blocks``.
    """

    verticals: tuple[int, ...] = (16, 64, 128, 256, 512, 1024)
    slash_blocks: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)
    top_ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)
    sinks: tuple[int, ...] = (0, 4, 64)
    local_blocks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    last_q: int = 64

    def __post_init__(self) -> None:
        for name in ("verticals", "slash_blocks", "top_ks", "local_blocks"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"CandidateGrid.{name} must be a non-empty tuple of positive ints, got {values!r}")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        if not self.sinks or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.sinks):
            raise ValueError(f"CandidateGrid.sinks must be a non-empty tuple of ints >= 0, got {self.sinks!r}")
        object.__setattr__(self, "sinks", tuple(sorted(set(self.sinks))))

    def with_vertical_slash(self, vertical: int, slash: int) -> "CandidateGrid":
        """This grid plus ``VerticalSlash(vertical, slash)`` (e.g. the uniform default, to compare with)."""
        return CandidateGrid(self.verticals + (vertical,), self.slash_blocks + (-(-slash // BLOCK),), self.top_ks,
                             self.sinks, self.local_blocks, self.last_q)

    def patterns(self) -> list[Pattern]:
        out: list[Pattern] = [Dense()]
        out += [VerticalSlash(v, BLOCK * s, last_q=self.last_q) for v in self.verticals for s in self.slash_blocks]
        out += [BlockSparse(k) for k in self.top_ks]
        out += [AShape(sink, BLOCK * b) for sink in self.sinks for b in self.local_blocks]
        return out

    def to_dict(self) -> dict:
        return {name: list(getattr(self, name)) for name in ("verticals", "slash_blocks", "top_ks", "sinks", "local_blocks")} | {
            "last_q": self.last_q
        }


@dataclass
class GridScores:
    """Per (head, candidate) on one prompt, float64 on the CPU, candidates in ``CandidateGrid.patterns()`` order.

    recall : [heads, n]  dense attention mass kept, mean over query rows
    tile_pairs, column_pairs : [heads, n]  pairs the GPU kernel computes in tiles and in gathered columns
    coverage : [heads, n]  Vertical-Slash only (NaN elsewhere): the mass the index keeps of the last
        queries' attention, what its estimator sees
    recall_last : [heads, n]  recall over the last 256 query rows only
    """

    recall: torch.Tensor
    tile_pairs: torch.Tensor
    column_pairs: torch.Tensor
    coverage: torch.Tensor
    recall_last: torch.Tensor


def score_grid(q: torch.Tensor, k: torch.Tensor, scale: float, grid: CandidateGrid,
               chunk_elements: int | None = None) -> GridScores:
    """Score every candidate of ``grid`` on every head of one layer.

    ``q`` [heads, seq, head_dim], ``k`` [kv_heads, seq, head_dim]: one prompt, ``seq`` a multiple of 64.
    """
    heads, seq, _ = q.shape
    nb = seq // BLOCK
    device = q.device
    keys_full = k.repeat_interleave(heads // k.shape[0], dim=0)

    # Vertical-Slash: columns ranked once; diagonals ranked once per column count, by the estimator's
    # own statistics and scores (one batch element: the layer's heads).
    head_ids = list(range(heads))
    stats = last_query_statistics(q[None], k[None], head_ids, [grid.last_q] * heads, scale)
    n_last = stats.n_last
    column_scores = stats.column_scores  # [heads, seq]
    verticals = [min(v, seq) for v in grid.verticals]
    slashes = [min(s, nb) for s in grid.slash_blocks]
    column_rank = ranked_with_forced(column_scores, max(verticals), SINK_COLUMNS)  # [heads, V]
    diagonal_ranks, diagonal_mass = [], []
    for v in verticals:
        scores = diagonal_scores(stats, q[None], k[None], head_ids, column_rank[:, :v],
                                 torch.full((heads,), v, device=device), scale)  # [heads, n_blocks]
        rank = ranked_with_forced(scores, max(slashes), FORCED_DIAGONALS)
        diagonal_ranks.append(rank)
        diagonal_mass.append(scores.gather(1, rank))
    del stats

    # Block-Sparse: key blocks of each query block ranked by pooled score, the diagonal block first.
    pooled = pooled_scores(mean_pool_blocks(q), mean_pool_blocks(keys_full), scale)  # diagonal +inf: ranked first
    block_rank = pooled.sort(dim=2, descending=True).indices  # [heads, q blocks, rank]
    blocks = torch.arange(nb, device=device)
    del keys_full

    locals_ = tuple(sorted({min(BLOCK * b, seq) for b in grid.local_blocks}))
    stats = layer_statistics(q, k, scale, column_rank, locals_, n_sinks=max(max(grid.sinks), 1),
                             chunk_elements=chunk_elements)

    def per_head(value) -> torch.Tensor:
        value = torch.as_tensor(value).double().cpu()
        return value.expand(heads) if value.dim() == 0 else value

    # Costs and last-query coverage, in candidate order (they do not depend on which rows are scored).
    tiles, columns, coverage = [per_head(nb * (nb + 1) // 2 * TILE_PAIRS)], [per_head(0)], [per_head(float("nan"))]
    column_block = column_rank // BLOCK  # [heads, V]
    column_score_upto = column_scores.gather(1, column_rank).double().cumsum(dim=1)
    for vi, v in enumerate(verticals):
        tile_upto = (TILE_PAIRS * (nb - diagonal_ranks[vi])).cumsum(dim=1)
        cover_upto = diagonal_mass[vi].double().cumsum(dim=1)
        # The kernel gathers the first v ranked columns in tiles of 64 per query block (vertical_slash.column_tiles).
        column_pairs = column_tiles(column_rank[:, :v].sort(dim=1).values.cpu(), seq) * TILE_PAIRS
        for s in slashes:
            tiles.append(per_head(tile_upto[:, s - 1]))
            columns.append(per_head(column_pairs))
            coverage.append(per_head((column_score_upto[:, v - 1] + cover_upto[:, s - 1]) / n_last))
    for top_k in grid.top_ks:
        tiles.append(per_head(int(torch.clamp(blocks + 1, max=top_k).sum()) * TILE_PAIRS))
        columns.append(per_head(0))
        coverage.append(per_head(float("nan")))
    for sink in grid.sinks:
        for b in grid.local_blocks:
            tile_pairs, column_pairs = a_shape.computed_pairs(AShapeIndex(1, min(sink, seq), min(BLOCK * b, seq)), seq)
            tiles.append(per_head(tile_pairs[0]))
            columns.append(per_head(column_pairs[0]))
            coverage.append(per_head(float("nan")))

    def recall_over(which: str) -> torch.Tensor:
        """[heads, n] recall of every candidate over ``"all"`` rows or the ``"last"`` ones."""
        first, n_rows, offset_mass, sink_tail = stats.rows(which)
        recall = [per_head(1.0)]  # Dense
        diagonal_mass = stats.diagonal_mass(first)  # [heads, n_blocks]
        # Mass of the r-th ranked column on block diagonal d: its query block column_block + d.
        query_block = column_block[:, :, None] + blocks[None, None, :] - first  # [heads, V, d], into the rows' blocks
        inside = (query_block >= 0) & (query_block < nb - first)
        by_query_block = stats.column_mass[:, first:].transpose(1, 2)  # [heads, V, query block]
        on_diagonal = by_query_block.gather(2, query_block.clamp(0, nb - first - 1)) * inside
        on_diagonal_upto = on_diagonal.cumsum(dim=1)  # [heads, V, d]: the first r + 1 columns together
        for vi, v in enumerate(verticals):
            mass_v = on_diagonal_upto[:, v - 1]  # [heads, d]
            rank = diagonal_ranks[vi]
            # Each chosen diagonal adds its tiles' mass, less what the columns already had there.
            gain = (diagonal_mass.gather(1, rank) - mass_v.gather(1, rank)).cumsum(dim=1)
            for s in slashes:
                recall.append(per_head((gain[:, s - 1] + mass_v.sum(dim=1)) / n_rows))
        sorted_mass = stats.block_mass[:, first:].gather(2, block_rank[:, first:]).cumsum(dim=2)  # [heads, q block, rank]
        for top_k in grid.top_ks:
            kept = torch.clamp(blocks[first:] + 1, max=top_k)  # blocks kept per query block
            recall.append(per_head(sorted_mass.gather(2, (kept - 1)[None, :, None].expand(heads, -1, 1)).sum(dim=(1, 2))
                                   / n_rows))
        window_upto = offset_mass.cumsum(dim=1)
        for sink in grid.sinks:
            for b in grid.local_blocks:
                local = min(BLOCK * b, seq)
                tail = sink_tail[:, locals_.index(local), : min(sink, seq)].sum(dim=1)
                recall.append(per_head((window_upto[:, local - 1] + tail) / n_rows))
        return torch.stack(recall, dim=1)

    return GridScores(recall_over("all"), *(torch.stack(values, dim=1) for values in (tiles, columns, coverage)),
                      recall_last=recall_over("last"))


@dataclass
class PatternScores:
    """Per head on one prompt: recall over all rows and over the last rows, tile and column pairs."""

    recall: list[float]
    tile_pairs: list[int]
    column_pairs: list[int]
    recall_last: list[float]


def score_indices(q: torch.Tensor, k: torch.Tensor, scale: float, index_sets: Sequence[Sequence[HeadIndex]],
                  chunk_elements: int | None = None) -> list[PatternScores]:
    """Recall and kernel cost of several kept sets per head, from one dense pass over the layer.

    ``index_sets[i][h]`` is head ``h``'s index (batch 1) in set ``i``, e.g. one set per config, as
    ``estimate_layer`` or ``build_plan(...).indices`` give them. ``q`` [heads, seq, head_dim],
    ``k`` [kv_heads, seq, head_dim].
    """
    heads, seq, _ = q.shape
    for indices in index_sets:
        if len(indices) != heads:
            raise ValueError(f"every index set must hold one index per query head: got {len(indices)} for {heads} heads")
    # Column mass is gathered for every Vertical-Slash column of every set (repeats are harmless).
    lists = [[] for _ in range(heads)]
    for indices in index_sets:
        for h, index in enumerate(indices):
            if isinstance(index, VerticalSlashIndex):
                lists[h].append(index.columns[0].to(q.device))
    lists = [torch.cat(c) if c else torch.zeros(1, dtype=torch.long, device=q.device) for c in lists]
    width = max(len(c) for c in lists)
    columns = torch.stack([torch.cat([c, c[:1].expand(width - len(c))]) for c in lists])
    all_indices = [index for indices in index_sets for index in indices]
    locals_ = tuple(sorted({index.local for index in all_indices if isinstance(index, AShapeIndex)}))
    sinks = max([index.sink for index in all_indices if isinstance(index, AShapeIndex)] + [1])
    stats = layer_statistics(q, k, scale, columns, locals_, n_sinks=sinks, chunk_elements=chunk_elements)
    scores = []
    for indices in index_sets:
        costs = [index_cost(index, seq) for index in indices]
        scores.append(PatternScores(
            recall=[index_recall(index, stats, h) for h, index in enumerate(indices)],
            tile_pairs=[c[0] for c in costs],
            column_pairs=[c[1] for c in costs],
            recall_last=[index_recall(index, stats, h, "last") for h, index in enumerate(indices)],
        ))
    return scores


def score_patterns(q: torch.Tensor, k: torch.Tensor, scale: float, patterns: Sequence[Pattern],
                   chunk_elements: int | None = None) -> PatternScores:
    """Recall and kernel cost of one pattern per head on one prompt.

    Indices come from the library's estimators (``estimate_layer``), as the CPU path computes them.
    ``q`` [heads, seq, head_dim], ``k`` [kv_heads, seq, head_dim].
    """
    heads = q.shape[0]
    if len(patterns) != heads:
        raise ValueError(f"patterns must hold one pattern per query head: got {len(patterns)} for {heads} heads")
    indices = estimate_layer(q[None], k[None], list(patterns), scale)
    return score_indices(q, k, scale, [indices], chunk_elements)[0]
