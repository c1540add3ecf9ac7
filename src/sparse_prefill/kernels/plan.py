"""Plan: from one layer's patterns and Q/K to the work list the sparse kernel walks.

Every head, whatever its pattern, is described by the same three lists, built on the device with
tensor operations (no host synchronisation, no Python loop over heads):

- **block diagonals** ``d`` (per head): for query block ``m`` the key block ``m - d`` is a tile
  to compute. Dense, A-shape and Vertical-Slash heads use these: a diagonal offset ``o`` touches,
  for every query block, exactly the key blocks on block diagonals ``o // 64`` and
  ``ceil(o / 64)`` (query and key blocks are both 64 wide).
- **key blocks** (per head and query block): Block-Sparse heads list their chosen tiles here.
- **columns** (per head): single keys gathered ``BLOCK_N`` at a time, skipped for a query block
  when their key block already lies on one of its diagonal tiles.

Inside diagonal tiles of A-shape and Vertical-Slash heads an element mask keeps exactly the pairs
whose offset ``i - j`` is kept or whose key ``j`` is a kept column, so the kernel computes exactly
the kept set of docs/semantics.md (tiles may hold pairs that are computed and then masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..estimate.block_sparse import mean_pool_blocks
from ..estimate.vertical_slash import coverage_selection, diagonal_sums, top_with_forced
from ..index import (
    SINK_COLUMNS,
    AShapeIndex,
    BlockSparseIndex,
    DenseIndex,
    HeadIndex,
    VerticalSlashIndex,
    forced_diagonals,
)
from ..patterns import AdaptiveVerticalSlash, AShape, BlockSparse, Dense, Pattern, VerticalSlash

BLOCK = 64  # query and key tile size the plan is built for

__all__ = ["BLOCK", "SparsePlan", "build_plan"]


@dataclass
class SparsePlan:
    """The kernel's work list for one layer; ``bh`` runs over ``batch * q_heads``.

    diagonals : int32 [bh, n_blocks]   block diagonals ascending, padded with n_blocks
    diagonal_limit : int32 [bh, n_blocks]  per query block m: how many diagonals are <= m
    diagonal_flag : int8 [bh, n_blocks + 1]  1 where d is a diagonal (last entry always 0)
    blocks : int32 [bh, n_blocks, max_blocks]  Block-Sparse key blocks ascending
    block_count : int32 [bh, n_blocks]
    columns : int32 [bh, max_columns]  gathered key columns ascending, padded with seq
    column_count : int32 [bh]
    offset_flag, column_flag : int8 [bh, seq]  element mask inside diagonal tiles
    mask_from : int32 [bh]  diagonal tiles d >= mask_from get the element mask (n_blocks + 1: none)
    indices : list of HeadIndex, one per query head (what was estimated; for tests and recall)
    uses_diagonals, uses_blocks, uses_columns : bool
        Whether any head has work of that kind: the kernel compiles the other loops out.
    window_scores : float32 [bh, seq] or None
        With ``build_plan(..., score_window=w)``: each key's attention from the last ``w`` queries
        (column sums of their softmax), taken from the Vertical-Slash estimator's own pass. None
        when the layer has no block-diagonal Vertical-Slash head or ``w`` exceeds a head's
        ``last_q`` (the estimator then never formed those rows).
    """

    seq: int
    diagonals: torch.Tensor
    diagonal_limit: torch.Tensor
    diagonal_flag: torch.Tensor
    blocks: torch.Tensor
    block_count: torch.Tensor
    columns: torch.Tensor
    column_count: torch.Tensor
    offset_flag: torch.Tensor
    column_flag: torch.Tensor
    mask_from: torch.Tensor
    indices: list[HeadIndex]
    uses_diagonals: bool = True
    uses_blocks: bool = True
    uses_columns: bool = True
    window_scores: torch.Tensor | None = None

    def computed_pairs(self) -> torch.Tensor:
        """[bh] query-key pairs the kernel multiplies: 64 x 64 per tile, and 64 per (column, query block at or after it).

        Columns a diagonal tile already covers are counted too (the kernel masks them out of a
        gathered tile it still multiplies), so this is an upper bound by at most the column term.
        """
        n_blocks = self.diagonal_limit.shape[1]
        tiles = self.diagonal_limit.sum(dim=1).long() + self.block_count.sum(dim=1).long()
        valid = torch.arange(self.columns.shape[1], device=self.columns.device)[None, :] < self.column_count[:, None]
        column_blocks = torch.where(valid, n_blocks - self.columns.long() // BLOCK, 0).sum(dim=1)
        return tiles * BLOCK * BLOCK + column_blocks * BLOCK


def _by_kind(patterns: Sequence[Pattern]) -> dict[type, list[int]]:
    heads: dict[type, list[int]] = {}
    for head, pattern in enumerate(patterns):
        heads.setdefault(type(pattern), []).append(head)
    return heads


def _plan_single_diagonals(q, k, kv_range, ids, vs, scale, mark_columns, mark_offsets, indices) -> None:
    """Estimate the ``slash_block=1`` Vertical-Slash heads ``ids`` (all in KV heads ``kv_range``) and mark them."""
    batch, q_heads, seq, dim = q.shape
    device = q.device
    group = q_heads // k.shape[1]
    first_kv, end_kv = kv_range
    verticals = [min(p.vertical, seq) for p in vs]
    n_diagonals = [min(p.slash, seq) for p in vs]
    n_last = min(max(p.last_q for p in vs), seq)
    # Each KV head's query heads are the rows of one product: K is read once, in its own dtype.
    q_last = q[:, first_kv * group : end_kv * group, -n_last:].reshape(batch, end_kv - first_kv, group * n_last, dim)
    logits = torch.matmul(q_last, k[:, first_kv:end_kv].transpose(-1, -2))  # [batch, kv, group*n_last, seq]
    logits = logits.view(batch, (end_kv - first_kv) * group, n_last, seq)
    logits = logits[:, torch.tensor(ids, device=device) - first_kv * group].float() * scale
    positions = torch.arange(seq - n_last, seq, device=device)
    future = torch.arange(seq, device=device)[None, :] > positions[:, None]
    probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    # A head with a smaller last_q uses only its own last rows (rows are independent softmaxes).
    own_rows = torch.tensor([min(p.last_q, seq) for p in vs], device=device)
    probs = probs * (torch.arange(n_last, device=device)[None, :] >= n_last - own_rows[:, None])[None, :, :, None]
    flat = probs.flatten(0, 1)  # [batch * heads, n_last, seq]
    cols = _top_per_head(flat.sum(dim=1), verticals, batch, SINK_COLUMNS)
    # Padding entries of cols repeat a kept column, so zeroing them is harmless.
    residual = flat.scatter(2, cols[:, None, :].expand(-1, n_last, -1), 0.0)
    diagonals = _top_per_head(diagonal_sums(residual), n_diagonals, batch, forced_diagonals(1))
    cols = cols.view(batch, len(ids), -1)
    diagonals = diagonals.view(batch, len(ids), -1)  # padding repeats a kept diagonal
    mark_columns(ids, cols, torch.tensor(verticals, device=device))
    mark_offsets(ids, diagonals)
    for j, h in enumerate(ids):
        indices[h] = VerticalSlashIndex(columns=cols[:, j, : verticals[j]], diagonals=diagonals[:, j, : n_diagonals[j]])


def _plan_block_diagonals(q, k, ids, vs, scale, mark_columns, mark_diagonals, indices, score_window=0):
    """Vertical-Slash heads with ``slash_block=64``, all at once, from the fused Triton estimator.

    Adaptive heads (``AdaptiveVerticalSlash``) are estimated at their caps, then keep what
    :func:`_adaptive_choice` selects.

    Returns the last ``score_window`` queries' column scores [batch * q_heads, seq] when asked and
    every head's rows cover them, else None.
    """
    from .estimate import LOG2E, TILE, last_query_scores

    batch, q_heads, seq, dim = q.shape
    device = q.device
    group = q_heads // k.shape[1]
    n = len(ids)
    ids_t = torch.tensor(ids, device=device)
    verticals = [min(p.max_vertical if isinstance(p, AdaptiveVerticalSlash) else p.vertical, seq) for p in vs]
    n_diagonals = [min(-(-(p.max_slash if isinstance(p, AdaptiveVerticalSlash) else p.slash) // TILE), -(-seq // TILE))
                   for p in vs]
    own = {h: min(p.last_q, seq) for h, p in zip(ids, vs)}
    n_rows = max(own.values())
    own_rows = torch.tensor([own.get(h, n_rows) for h in range(q_heads)] * batch, dtype=torch.int32, device=device)
    window_scores = None
    if 0 < score_window <= min(own.values()):
        window_scores = torch.empty(batch * q_heads, seq, dtype=torch.float32, device=device)
    column_scores, block_sums, row_max, row_sum = last_query_scores(
        q, k, own_rows, n_rows, scale, window_scores, score_window if window_scores is not None else 0)
    pick = (torch.arange(batch, device=device)[:, None] * q_heads + ids_t[None, :]).flatten()  # [batch * n]
    cols = _top_per_head(column_scores[pick], verticals, batch, SINK_COLUMNS)  # [batch * n, max V]
    # Take the chosen columns' attention out of the row-block sums (recomputed for those keys only).
    positions = torch.arange(seq - n_rows, seq, device=device)
    q_rows = q[:, ids_t, seq - n_rows :].flatten(0, 1)  # [batch * n, n_rows, dim]
    kv_rows = (torch.arange(batch, device=device)[:, None] * k.shape[1] + (ids_t // group)[None, :]).flatten()
    k_cols = k.reshape(-1, dim)[kv_rows[:, None] * seq + cols]  # [batch * n, max V, dim]
    logits = torch.einsum("hrd,hvd->hrv", q_rows.float(), k_cols.float()) * (scale * LOG2E)
    row_max, row_sum = row_max[pick, :n_rows], row_sum[pick, :n_rows]
    row_used = torch.arange(n_rows, device=device)[None, :] >= n_rows - own_rows[pick][:, None]  # [batch * n, n_rows]
    counted = torch.arange(cols.shape[1], device=device)[None, :] < torch.tensor(verticals, device=device).repeat(batch)[:, None]
    taken = torch.exp2(logits - torch.where(row_used, row_max, 0.0)[:, :, None]) / torch.where(row_used, row_sum, 1.0)[:, :, None]
    taken = taken * (row_used[:, :, None] & counted[:, None, :] & (cols[:, None, :] <= positions[None, :, None]))
    residual = block_sums[pick, :n_rows].scatter_add(2, (cols // TILE)[:, None, :].expand(-1, n_rows, -1), -taken)
    # Block diagonal d of row r is its sum over key block (position // 64) - d.
    n_tiles = residual.shape[2]
    key_block = positions[:, None] // TILE - torch.arange(n_tiles, device=device)[None, :]  # [n_rows, d]
    on_row = residual.gather(2, key_block.clamp(min=0).expand(residual.shape[0], -1, -1))
    diagonal_scores = (on_row * (key_block >= 0)).sum(dim=1)
    diagonals = _top_per_head(diagonal_scores, n_diagonals, batch, forced_diagonals(TILE))
    if any(isinstance(p, AdaptiveVerticalSlash) for p in vs):
        cols, counts, diagonals, index_cols, index_diagonals = _adaptive_choice(
            vs, batch, seq, cols, column_scores[pick], diagonals, diagonal_scores, verticals, n_diagonals, own_rows[pick])
        mark_columns(ids, cols.view(batch, n, -1), counts.view(batch, n))
        mark_diagonals(ids, diagonals.view(batch, n, -1))
        index_cols, index_diagonals = index_cols.view(batch, n, -1), index_diagonals.view(batch, n, -1)
        for j, h in enumerate(ids):
            if isinstance(vs[j], AdaptiveVerticalSlash):  # listed as the reference lists them: 0-padded, ascending
                indices[h] = VerticalSlashIndex(columns=index_cols[:, j, : verticals[j]].sort(dim=1).values,
                                                diagonals=index_diagonals[:, j, : n_diagonals[j]].sort(dim=1).values,
                                                slash_block=TILE)
        cols, diagonals = cols.view(batch, n, -1), diagonals.view(batch, n, -1)
    else:
        cols = cols.view(batch, n, -1)
        diagonals = diagonals.view(batch, n, -1)
        mark_columns(ids, cols, torch.tensor(verticals, device=device))
        mark_diagonals(ids, diagonals)
    for j, h in enumerate(ids):
        if not isinstance(vs[j], AdaptiveVerticalSlash):
            indices[h] = VerticalSlashIndex(columns=cols[:, j, : verticals[j]], diagonals=diagonals[:, j, : n_diagonals[j]],
                                            slash_block=TILE)
    return window_scores


def _adaptive_choice(vs, batch, seq, cols, column_scores, diagonals, diagonal_scores, verticals, n_diagonals, own_rows):
    """Apply each adaptive head's coverage rule to its capped candidates, on the device.

    ``cols`` [batch * n, V] and ``diagonals`` [batch * n, S] are the capped choices, ascending
    (entries past a head's cap repeat a kept one); ``column_scores`` [batch * n, seq] and
    ``diagonal_scores`` [batch * n, n_tiles] their scores. Static heads keep all of theirs (floor =
    cap). Returns the kernel's columns (ascending, padded with ``seq``) and their counts, the
    diagonals (unkept ones replaced by diagonal 0, which every head keeps), and the index lists
    (unkept entries replaced by 0), all [batch * n, ...].
    """
    device = cols.device
    n_tiles = diagonal_scores.shape[1]
    adaptive = [isinstance(p, AdaptiveVerticalSlash) for p in vs]

    def per_row(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device).repeat(batch)

    column_cap, diagonal_cap = per_row(verticals), per_row(n_diagonals)
    column_floor = per_row([p.min_vertical if a else v for p, a, v in zip(vs, adaptive, verticals)])
    diagonal_floor = per_row([-(-p.min_slash // 64) if a else d for p, a, d in zip(vs, adaptive, n_diagonals)])
    target = per_row([p.coverage if a else 0.0 for p, a in zip(vs, adaptive)], torch.float64) * own_rows.double()

    def ranked(positions, scores, cap, forced):
        """Order each row's candidates as the estimator ranks them: forced first, then by score."""
        slot = torch.arange(positions.shape[1], device=device)[None, :]
        valid = slot < cap[:, None]
        key = torch.where(slot < min(forced, positions.shape[1]), float("inf"), scores.gather(1, positions).double())
        order = torch.where(valid, key, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        return order, positions.gather(1, order), scores.gather(1, positions).double().gather(1, order), valid.gather(1, order)

    column_order, column_ranked, column_mass, column_valid = ranked(cols, column_scores, column_cap, SINK_COLUMNS)
    diagonal_order, diagonal_ranked, diagonal_mass, diagonal_valid = ranked(
        diagonals, diagonal_scores, diagonal_cap, forced_diagonals(64))
    keep_columns, keep_diagonals = coverage_selection(
        column_mass, 64.0 * (n_tiles - column_ranked // 64), column_valid,
        diagonal_mass, 4096.0 * (n_tiles - diagonal_ranked), diagonal_valid,
        column_floor, diagonal_floor, target,
    )
    # Kept entries first (ascending), then padding: a head's first `cap` entries hold all it keeps.
    kernel_cols = torch.where(keep_columns, column_ranked, seq).sort(dim=1).values
    kept_diagonals = torch.where(keep_diagonals, diagonal_ranked, n_tiles).sort(dim=1).values
    kernel_diagonals = torch.where(kept_diagonals == n_tiles, 0, kept_diagonals)
    index_cols = torch.where(kernel_cols == seq, 0, kernel_cols)
    return kernel_cols, keep_columns.sum(dim=1), kernel_diagonals, index_cols, kernel_diagonals


def build_plan(
    q: torch.Tensor, k: torch.Tensor, patterns: Sequence[Pattern], scale: float, score_window: int = 0
) -> SparsePlan:
    """Estimate every head's index and lay out the kernel's work list.

    q : [batch, q_heads, seq, head_dim]; k : [batch, kv_heads, seq, head_dim]; ``patterns`` has one
    pattern per query head (already validated). ``score_window > 0`` also asks for
    :attr:`SparsePlan.window_scores` (KV-cache compression reads them).
    """
    batch, q_heads, seq, _ = q.shape
    group = q_heads // k.shape[1]
    device = q.device
    n_blocks = -(-seq // BLOCK)
    heads = _by_kind(patterns)
    max_blocks = max([patterns[h].top_k for h in heads.get(BlockSparse, [])] + [1])
    max_columns = max([min(patterns[h].vertical, seq) for h in heads.get(VerticalSlash, [])]
                      + [min(patterns[h].max_vertical, seq) for h in heads.get(AdaptiveVerticalSlash, [])]
                      + [min(patterns[h].sink, seq) for h in heads.get(AShape, [])] + [1])

    int32 = dict(dtype=torch.int32, device=device)
    diagonal_flag = torch.zeros(batch, q_heads, n_blocks + 1, dtype=torch.bool, device=device)
    blocks = torch.zeros(batch, q_heads, n_blocks, max_blocks, **int32)
    block_count = torch.zeros(batch, q_heads, n_blocks, **int32)
    columns = torch.full((batch, q_heads, max_columns), seq, **int32)
    column_count = torch.zeros(batch, q_heads, **int32)
    offset_flag = torch.zeros(batch, q_heads, seq, dtype=torch.int8, device=device)
    column_flag = torch.zeros(batch, q_heads, seq, dtype=torch.int8, device=device)
    # Diagonal tiles d >= mask_from get the element mask; by default none do.
    mask_from = torch.full((batch, q_heads), n_blocks + 1, **int32)
    indices: list[HeadIndex | None] = [None] * q_heads
    positions = torch.arange(seq, device=device)
    window_scores = None

    def mark_offsets(head_ids: list[int], offsets: torch.Tensor) -> None:
        """offsets: long [batch, len(head_ids), n] -> offset flags and the block diagonals they touch."""
        ids = torch.tensor(head_ids, device=device)
        flags = torch.zeros(batch, len(head_ids), seq, dtype=torch.int8, device=device)
        offset_flag[:, ids] = flags.scatter_(2, offsets, 1)
        touched = torch.zeros(batch, len(head_ids), n_blocks + 1, dtype=torch.bool, device=device)
        touched.scatter_(2, offsets // BLOCK, True).scatter_(2, (offsets + BLOCK - 1) // BLOCK, True)
        diagonal_flag[:, ids] |= touched

    def mark_diagonals(head_ids: list[int], diagonals: torch.Tensor) -> None:
        """diagonals: long [batch, len(head_ids), n] block diagonals computed whole."""
        ids = torch.tensor(head_ids, device=device)
        touched = torch.zeros(batch, len(head_ids), n_blocks + 1, dtype=torch.bool, device=device)
        diagonal_flag[:, ids] |= touched.scatter_(2, diagonals, True)

    def mark_columns(head_ids: list[int], cols: torch.Tensor, counts: torch.Tensor) -> None:
        """cols: long [batch, len(head_ids), n] ascending, entries past counts ([len(head_ids)] or
        [batch, len(head_ids)]) ignored."""
        ids = torch.tensor(head_ids, device=device)
        counts = counts.expand(batch, len(head_ids))
        valid = torch.arange(cols.shape[2], device=device)[None, None, :] < counts[:, :, None]
        cols = torch.where(valid, cols, seq)
        columns[:, ids, : cols.shape[2]] = cols.to(torch.int32)
        column_count[:, ids] = counts.to(torch.int32)
        flags = torch.zeros(batch, len(head_ids), seq + 1, dtype=torch.int8, device=device)
        column_flag[:, ids] = flags.scatter_(2, cols, 1)[:, :, :seq]

    for head in heads.get(Dense, []):
        diagonal_flag[:, head, :n_blocks] = True
        indices[head] = DenseIndex(batch)

    if AShape in heads:
        ids = heads[AShape]
        sink_list = [min(patterns[h].sink, seq) for h in ids]
        local_list = [min(patterns[h].local, seq) for h in ids]
        sinks = torch.tensor(sink_list, device=device)
        locals_ = torch.tensor(local_list, device=device)
        # offsets 0..local-1 kept; pad with offset 0 (already kept) to a rectangle
        offsets = torch.where(positions[None, :] < locals_[:, None], positions[None, :], 0)
        mark_offsets(ids, offsets.expand(batch, -1, -1))
        mark_columns(ids, positions[None, None, :max_columns].expand(batch, len(ids), -1).clone(), sinks)
        # Tile d spans offsets up to 64 d + 63: inside the window for d < local // 64.
        mask_from[:, ids] = (locals_ // BLOCK).to(torch.int32)[None, :]
        for h, sink, local in zip(ids, sink_list, local_list):
            indices[h] = AShapeIndex(batch, sink=sink, local=local)

    if VerticalSlash in heads or AdaptiveVerticalSlash in heads:
        # Block diagonals (the default, and every adaptive head): one fused pass for all heads.
        # Single diagonals need per-offset sums: PyTorch, as many KV groups at a time as keep the
        # last-query scores ([batch, heads, last_q, seq] floats) near 1 GiB.
        block_heads = sorted([h for h in heads.get(VerticalSlash, []) if patterns[h].slash_block == BLOCK]
                             + heads.get(AdaptiveVerticalSlash, []))
        if block_heads:
            window_scores = _plan_block_diagonals(q, k, block_heads, [patterns[h] for h in block_heads], scale,
                                                  mark_columns, mark_diagonals, indices, score_window)
        single_heads = [h for h in heads.get(VerticalSlash, []) if patterns[h].slash_block == 1]
        if single_heads:
            n_last = min(max(patterns[h].last_q for h in single_heads), seq)
            kv_step = max(1, 2**30 // (4 * batch * group * n_last * seq))
            for first_kv in range(0, k.shape[1], kv_step):
                kv_range = (first_kv, min(first_kv + kv_step, k.shape[1]))
                ids = [h for h in single_heads if kv_range[0] <= h // group < kv_range[1]]
                if ids:
                    _plan_single_diagonals(q, k, kv_range, ids, [patterns[h] for h in ids], scale,
                                           mark_columns, mark_offsets, indices)
            # The tile on the main diagonal holds offsets 0..63, all kept when the budget has them.
            mask_from[:, single_heads] = torch.tensor(
                [int(min(patterns[h].slash, seq) >= BLOCK) for h in single_heads], dtype=torch.int32, device=device
            )[None, :]

    if BlockSparse in heads:
        for h in heads[BlockSparse]:
            pattern = patterns[h]
            if pattern.block != BLOCK:
                raise ValueError(f"the GPU kernels support BlockSparse(block={BLOCK}) only, got block={pattern.block} on head {h}")
        ids = heads[BlockSparse]
        ids_t = torch.tensor(ids, device=device)
        top_ks = torch.tensor([min(patterns[h].top_k, n_blocks) for h in ids], device=device)
        # Pool first, then pick heads: only the pooled [blocks, dim] rows are ever copied.
        pooled_q = mean_pool_blocks(q.flatten(0, 1), BLOCK).view(batch, q_heads, n_blocks, -1)[:, ids_t].flatten(0, 1)
        pooled_k = mean_pool_blocks(k.flatten(0, 1), BLOCK).view(batch, k.shape[1], n_blocks, -1)[:, ids_t // group].flatten(0, 1)
        future = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).triu(1)
        diagonal = torch.arange(n_blocks, device=device)
        kmax = int(min(max_blocks, n_blocks))
        rank = torch.arange(kmax, device=device)
        head_top_k = top_ks.repeat(batch)
        # Block scores are [blocks x blocks] floats per head (1 GB at 1M tokens): a few heads at a time.
        step = max(1, 2**28 // (n_blocks * n_blocks))
        chosen = []
        for first in range(0, pooled_q.shape[0], step):
            part = slice(first, first + step)
            scores = torch.matmul(pooled_q[part], pooled_k[part].transpose(1, 2)) * scale
            scores = scores.masked_fill(future, float("-inf"))
            scores[:, diagonal, diagonal] = float("inf")
            top = scores.topk(kmax, dim=2)  # sorted by score, descending
            keep = (top.values > float("-inf")) & (rank[None, None, :] < head_top_k[part, None, None])
            chosen.append(torch.where(keep, top.indices, n_blocks).sort(dim=2).values)
        chosen = torch.cat(chosen).view(batch, len(ids), n_blocks, kmax)
        blocks[:, ids_t, :, :kmax] = torch.where(chosen == n_blocks, 0, chosen).to(torch.int32)
        block_count[:, ids_t] = (chosen < n_blocks).sum(dim=3).to(torch.int32)
        for j, h in enumerate(ids):
            indices[h] = BlockSparseIndex(blocks=torch.where(chosen[:, j] == n_blocks, -1, chosen[:, j]).long(), block=BLOCK)

    diagonal_flag[:, :, n_blocks] = False
    arange = torch.arange(n_blocks + 1, device=device)
    diagonals = torch.where(diagonal_flag, arange, n_blocks).sort(dim=2).values[:, :, :n_blocks]
    diagonal_limit = diagonal_flag[:, :, :n_blocks].to(torch.int32).cumsum(dim=2)
    bh = batch * q_heads
    return SparsePlan(
        seq=seq,
        diagonals=diagonals.to(torch.int32).reshape(bh, n_blocks).contiguous(),
        diagonal_limit=diagonal_limit.to(torch.int32).reshape(bh, n_blocks).contiguous(),
        diagonal_flag=diagonal_flag.to(torch.int8).reshape(bh, n_blocks + 1).contiguous(),
        blocks=blocks.reshape(bh, n_blocks, max_blocks).contiguous(),
        block_count=block_count.reshape(bh, n_blocks).contiguous(),
        columns=columns.reshape(bh, max_columns).contiguous(),
        column_count=column_count.reshape(bh).contiguous(),
        offset_flag=offset_flag.reshape(bh, seq).contiguous(),
        column_flag=column_flag.reshape(bh, seq).contiguous(),
        mask_from=mask_from.reshape(bh).contiguous(),
        indices=indices,  # type: ignore[arg-type]
        uses_diagonals=any(kind is not BlockSparse for kind in heads),
        uses_blocks=BlockSparse in heads,
        uses_columns=VerticalSlash in heads or AdaptiveVerticalSlash in heads
        or any(patterns[h].sink > 0 for h in heads.get(AShape, [])),
        window_scores=window_scores,
    )


def _top_per_head(scores: torch.Tensor, counts: list[int], batch: int, forced: int) -> torch.Tensor:
    """scores [batch*n_heads, seq] -> long [batch*n_heads, max(counts)] ascending; head j keeps counts[j].

    Same choice as :func:`top_with_forced` per head. Entries past a head's count repeat its last
    kept index, so they never name a pair the head does not keep.
    """
    count = max(counts)
    if min(counts) == count:
        return top_with_forced(scores, count, forced)
    per_row = torch.tensor(counts, device=scores.device).repeat(batch)[:, None]  # [batch*n_heads, 1]
    rank = torch.arange(count, device=scores.device)[None, :]
    # Forced indices first (in order), then the rest by descending score; keep each head's first counts.
    free_scores = scores.clone()
    free_scores[:, :forced] = float("-inf")
    ranked = free_scores.topk(count, dim=1).indices  # descending score, forced ones last or absent
    n_forced = per_row.clamp(max=forced)
    ranked = torch.where(rank < n_forced, rank, ranked.gather(1, (rank - n_forced).clamp(min=0)))
    big = scores.shape[1]
    chosen = torch.where(rank < per_row, ranked, big).sort(dim=1).values
    return torch.where(chosen == big, chosen.gather(1, per_row - 1), chosen)
