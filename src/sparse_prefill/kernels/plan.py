"""Plan: from one layer's patterns and Q/K to the work list the sparse kernel walks.

Each head's index comes from its kind's estimator (:func:`sparse_prefill.kinds.estimate_layer`,
the same call the CPU path makes), and each kind lays its indices out in three lists, built on the
device with tensor operations (no Python loop over query blocks):

- **block diagonals** ``d`` (per head): for query block ``m`` the key block ``m - d`` is a tile
  to compute. Dense, A-shape and Vertical-Slash heads use these.
- **block lists** (per head and query block): Block-Sparse and Block-Coverage heads list their
  tiles here, ascending, the diagonal block last; each list is a stretch of one buffer (where it
  starts, how many), so memory follows the kept tiles rather than the widest list.
- **columns** (per head): single keys gathered 64 at a time, for each query block those before it,
  skipped where a kept diagonal tile of the query block already holds them.

Only two kinds of tile need an element mask: the diagonal tile (causal) and, for A-shape heads,
tiles the window's edge cuts through (``i - j < window`` or ``j < sink``). Every other tile is
computed whole: the kernel computes exactly the kept set of docs/semantics.md.

Several sequences of different lengths run in one launch through :func:`combine_plans`: each
sequence's plan is built alone, on its own queries and keys, and the lists are padded to the
largest and stacked, sequence ``i`` being batch element ``i``; a small table tells the kernel each
sequence's length, first query and rows in Q/K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..kinds import HeadIndex, Pattern, estimate_layer, index_unit
from ..kinds.common import BLOCK, device_values

NO_WINDOW = 2**30  # a window longer than any sequence: no tile gets the A-shape mask

__all__ = ["BLOCK", "SparsePlan", "build_plan", "combine_plans", "plan_from_indices"]


@dataclass
class SparsePlan:
    """The kernel's work list for one layer; ``bh`` runs over ``batch * q_heads``.

    The queries are the last ``seq - q_start`` of ``seq`` positions (``q_start = 0``: a whole
    prompt); query blocks ``first_block = q_start // 64 .. n_blocks - 1`` have work, the per-row
    lists (``blocks``, ``block_count``) start at ``first_block``.

    diagonals : int32 [bh, n_blocks]   block diagonals ascending (0 first), padded with n_blocks
    diagonal_limit : int32 [bh, n_blocks]  per query block m: how many diagonals are <= m
    diagonal_flag : int8 [bh, n_blocks + 1]  1 where d is a diagonal (last entry always 0)
    window, sink : int32 [bh]  A-shape element mask on diagonal tiles d >= window // 64 (NO_WINDOW: none)
    blocks : int32 [n]  the block lists' buffer
    block_start, block_count : int64, int32 [bh, n_rows]  the key blocks of query block first_block + row,
        ascending (the diagonal last), are blocks[block_start : block_start + block_count]
    columns : int32 [bh, max_columns]  gathered key columns ascending, padded with seq
    column_before : int32 [bh, n_blocks]  per query block m: how many columns are < 64 m
    indices : list of HeadIndex, one per query head (what was estimated; for tests and recall)
    uses_diagonals, uses_blocks, uses_columns : bool
        Whether any head has work of that kind: the kernel compiles the other loops out.
    sequences : None, or for a plan of several sequences (:func:`combine_plans`) one
        ``(seq, q_start, key_offset, query_offset)`` per sequence: its keys, the position of its first
        query, and the rows of its key 0 in K/V and of its first query in Q/Out. ``seq`` and
        ``q_start`` above are then the longest sequence's keys and 0, the lists are padded to the
        largest sequence's sizes, and ``indices`` is empty (each sequence's own plan holds them).
    """

    seq: int
    q_start: int
    diagonals: torch.Tensor
    diagonal_limit: torch.Tensor
    diagonal_flag: torch.Tensor
    window: torch.Tensor
    sink: torch.Tensor
    blocks: torch.Tensor
    block_start: torch.Tensor
    block_count: torch.Tensor
    columns: torch.Tensor
    column_before: torch.Tensor
    indices: list[HeadIndex]
    uses_diagonals: bool = True
    uses_blocks: bool = True
    uses_columns: bool = True
    sequences: tuple[tuple[int, int, int, int], ...] | None = None

    @property
    def first_block(self) -> int:
        return self.q_start // BLOCK

    def computed_pairs(self) -> torch.Tensor:
        """[batch * q_heads] query-key pairs the kernel multiplies (64 x 64 per tile, gathered-column tiles included),
        as each kind's ``computed_pairs`` counts them. Whole prompts only (the benchmarks' use)."""
        if self.q_start or self.sequences is not None:
            raise ValueError(f"computed_pairs counts one whole prompt's work; this plan is for a chunk (q_start={self.q_start}) "
                             "or for several sequences")
        per_head = torch.stack([sum(index_unit(index).computed_pairs(index, self.seq)) for index in self.indices], dim=1)
        return per_head.flatten()  # [batch, q_heads] -> batch-major bh


class PlanWriter:
    """The lists of a plan under construction: each kind's ``add_to_plan`` fills its heads' share."""

    def __init__(self, batch: int, q_heads: int, seq: int, device: torch.device, q_start: int = 0):
        self.batch, self.q_heads, self.seq, self.device, self.q_start = batch, q_heads, seq, device, q_start
        self.n_blocks = -(-seq // BLOCK)
        self.n_rows = self.n_blocks - q_start // BLOCK  # query blocks with work
        self.diagonal_flag = torch.zeros(batch, q_heads, self.n_blocks + 1, dtype=torch.bool, device=device)
        self.window = torch.full((batch, q_heads), NO_WINDOW, dtype=torch.int32, device=device)
        self.sink = torch.zeros(batch, q_heads, dtype=torch.int32, device=device)
        # One entry per kind that has them: (heads, their indices or one tensor for all of them).
        self._blocks: list[tuple[list[int], list]] = []
        self._columns: list[tuple[list[int], torch.Tensor]] = []

    def head_index(self, heads: list[int]) -> slice | torch.Tensor:
        """``heads`` as an index of the lists' head dimension: a slice where they are a run (every head
        of a one-kind layer), else a cached device tensor. Indexing a GPU tensor with a Python list
        copies the list from host memory, and that copy waits for the GPU's whole queue."""
        if heads == list(range(heads[0], heads[-1] + 1)):
            return slice(heads[0], heads[-1] + 1)
        return device_values(heads, self.device)

    def set_blocks(self, heads: list[int], indices: list) -> None:
        """indices: one :class:`~sparse_prefill.kinds.BlockSparseIndex` per head, with ``n_rows`` rows."""
        self._blocks.append((heads, indices))

    def set_columns(self, heads: list[int], columns: torch.Tensor) -> None:
        """columns: [batch, len(heads), n] ascending and distinct, padded with seq (or more)."""
        self._columns.append((heads, columns))

    def finish(self, indices: list[HeadIndex]) -> SparsePlan:
        batch, q_heads, seq, nb, device = self.batch, self.q_heads, self.seq, self.n_blocks, self.device
        n_rows = self.n_rows
        int32 = dict(dtype=torch.int32, device=device)
        self.diagonal_flag[:, :, nb] = False
        uses_diagonals = sum(len(heads) for heads, _ in self._blocks) < q_heads  # the others walk diagonals
        if uses_diagonals:
            arange = torch.arange(nb + 1, device=device)
            diagonals = torch.where(self.diagonal_flag, arange, nb).sort(dim=2).values[:, :, :nb]
            diagonal_limit = self.diagonal_flag[:, :, :nb].to(torch.int32).cumsum(dim=2)
        else:  # every head lists blocks (Block-Coverage's default): no diagonal anywhere, no sort to pay
            diagonals = torch.full((batch, q_heads, nb), nb, **int32)
            diagonal_limit = torch.zeros(batch, q_heads, nb, **int32)

        # Heads share a buffer where one estimate served them: each distinct buffer is taken once, and
        # its heads' starts are written together (a few launches per buffer, not per head).
        sharing: dict[tuple[int, int], tuple[torch.Tensor, list[int], list]] = {}  # (address, length) -> ...
        for heads, listed in self._blocks:
            for head, index in zip(heads, listed):
                key = (index.blocks.data_ptr(), index.blocks.numel())
                sharing.setdefault(key, (index.blocks, [], []))
                sharing[key][1].append(head)
                sharing[key][2].append(index)
        block_start = torch.zeros(batch, q_heads, n_rows, dtype=torch.int64, device=device)
        block_count = torch.zeros(batch, q_heads, n_rows, **int32)
        parts, offset = [], 0
        for buffer, heads, listed in sharing.values():
            parts.append(buffer.to(torch.int32))
            where = self.head_index(heads)
            block_start[:, where] = torch.stack([index.start for index in listed], dim=1) + offset
            block_count[:, where] = torch.stack([index.count for index in listed], dim=1)
            offset += buffer.numel()
        blocks = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.zeros(1, **int32)

        max_columns = max([listed.shape[2] for _, listed in self._columns] + [1])
        columns = torch.full((batch, q_heads, max_columns), seq, **int32)
        for heads, listed in self._columns:
            columns[:, self.head_index(heads), : listed.shape[2]] = listed.clamp(max=seq).to(torch.int32)
        if self._columns:
            starts = (torch.arange(nb, device=device) * BLOCK).to(torch.int32)
            column_before = torch.searchsorted(columns.view(-1, max_columns), starts.expand(batch * q_heads, -1).contiguous())
        else:  # only padding (seq), after every query block's start
            column_before = torch.zeros(batch * q_heads, nb, **int32)

        bh = batch * q_heads
        return SparsePlan(
            seq=seq,
            q_start=self.q_start,
            diagonals=diagonals.to(torch.int32).reshape(bh, nb).contiguous(),
            diagonal_limit=diagonal_limit.reshape(bh, nb).contiguous(),
            diagonal_flag=self.diagonal_flag.to(torch.int8).reshape(bh, nb + 1).contiguous(),
            window=self.window.reshape(bh).contiguous(),
            sink=self.sink.reshape(bh).contiguous(),
            blocks=blocks,
            block_start=block_start.reshape(bh, n_rows),
            block_count=block_count.reshape(bh, n_rows),
            columns=columns.reshape(bh, max_columns).contiguous(),
            column_before=column_before.to(torch.int32).reshape(bh, nb).contiguous(),
            indices=indices,
            uses_diagonals=uses_diagonals,
            uses_blocks=bool(self._blocks),
            uses_columns=any(listed.shape[2] for _, listed in self._columns),
        )


def plan_from_indices(indices: Sequence[HeadIndex], batch: int, seq: int, device: torch.device,
                      q_start: int = 0) -> SparsePlan:
    """Lay out given indices (one per query head) for queries at positions ``q_start .. seq - 1``."""
    writer = PlanWriter(batch, len(indices), seq, device, q_start)
    by_unit: dict = {}
    for head, index in enumerate(indices):
        by_unit.setdefault(index_unit(index), []).append(head)
    for unit, heads in by_unit.items():
        unit.add_to_plan(writer, heads, [indices[h] for h in heads])
    return writer.finish(list(indices))


def build_plan(q: torch.Tensor, k: torch.Tensor, patterns: Sequence[Pattern], scale: float) -> SparsePlan:
    """Estimate every head's index and lay out the kernel's work list.

    q : [batch, q_heads, q_len, head_dim], the last ``q_len`` positions; k : [batch, kv_heads, seq,
    head_dim]; ``patterns`` has one pattern per query head (already validated).
    """
    indices = estimate_layer(q, k, patterns, scale)
    return plan_from_indices(indices, q.shape[0], k.shape[2], q.device, k.shape[2] - q.shape[2])


def combine_plans(plans: Sequence[SparsePlan | None], key_offset: Sequence[int], query_offset: Sequence[int]) -> SparsePlan:
    """One plan for several sequences, one launch: sequence ``i``'s plan (built alone, batch 1) becomes
    batch element ``i``; None for a sequence with no queries (its programs return at once).

    Its keys are rows ``key_offset[i] ..`` of K/V's sequence dimension and its queries rows
    ``query_offset[i] ..`` of Q/Out's, in batch element ``i`` (a padded batch) or in every one (packed
    sequences: a batch stride of 0). Every list is padded to the largest sequence's sizes, so that
    the kernel's strides are shared; padding entries are never read (each sequence's own counts
    and limits bound its reads).
    """
    present = [plan for plan in plans if plan is not None]
    if not present:
        raise ValueError("combine_plans needs at least one sequence with queries")
    q_heads = present[0].window.shape[0]
    if any(plan.window.shape[0] != q_heads or plan.sequences is not None for plan in present):
        raise ValueError("combine_plans takes single-sequence plans (batch 1) with the same number of query heads, got "
                         f"{[None if plan is None else plan.window.shape[0] for plan in plans]} (batch x heads)")
    if not len(plans) == len(key_offset) == len(query_offset):
        raise ValueError(f"one key and query offset per plan, got {len(plans)} plans, {len(key_offset)} key offsets "
                         f"and {len(query_offset)} query offsets")
    device = present[0].window.device
    n_blocks = max(plan.diagonal_limit.shape[1] for plan in present)
    n_rows = max(plan.block_count.shape[1] for plan in present)  # query blocks with work: the grid's first dimension
    max_columns = max(plan.columns.shape[1] for plan in present)
    empty = SparsePlan(  # the lists of a sequence without queries: nothing listed
        seq=0, q_start=0, diagonals=torch.zeros(q_heads, 0, dtype=torch.int32, device=device),
        diagonal_limit=torch.zeros(q_heads, 0, dtype=torch.int32, device=device),
        diagonal_flag=torch.zeros(q_heads, 1, dtype=torch.int8, device=device),
        window=torch.full((q_heads,), NO_WINDOW, dtype=torch.int32, device=device),
        sink=torch.zeros(q_heads, dtype=torch.int32, device=device),
        blocks=torch.zeros(0, dtype=torch.int32, device=device),
        block_start=torch.zeros(q_heads, 0, dtype=torch.int64, device=device),
        block_count=torch.zeros(q_heads, 0, dtype=torch.int32, device=device),
        columns=torch.zeros(q_heads, 1, dtype=torch.int32, device=device),
        column_before=torch.zeros(q_heads, 0, dtype=torch.int32, device=device), indices=[])
    plans = [empty if plan is None else plan for plan in plans]

    def stacked(name: str, *size: int, lists: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Every plan's list ``name`` (or the given ``lists``, one per plan) zero-padded at the end of
        each dimension to ``size``, then stacked on bh."""
        padded = []
        for plan, listed in zip(plans, lists or [getattr(plan, name) for plan in plans]):
            padding = [0] * (2 * len(size))
            for dim, want in enumerate(size):  # F.pad lists the last dimension first
                padding[2 * (len(size) - 1 - dim) + 1] = want - listed.shape[dim + 1]
            padded.append(torch.nn.functional.pad(listed, padding))
        return torch.cat(padded).contiguous()

    # One buffer for every sequence's block lists: each sequence's starts move by where its buffer lands.
    buffer_at = [0]
    for plan in plans:
        buffer_at.append(buffer_at[-1] + plan.blocks.numel())
    block_start = [plan.block_start + at for plan, at in zip(plans, buffer_at)]

    return SparsePlan(
        seq=max(plan.seq for plan in plans),
        q_start=0,
        diagonals=stacked("diagonals", n_blocks),
        diagonal_limit=stacked("diagonal_limit", n_blocks),
        diagonal_flag=stacked("diagonal_flag", n_blocks + 1),
        window=torch.cat([plan.window for plan in plans]),
        sink=torch.cat([plan.sink for plan in plans]),
        blocks=torch.cat([plan.blocks for plan in plans]),
        block_start=stacked("block_start", n_rows, lists=block_start),
        block_count=stacked("block_count", n_rows),
        columns=stacked("columns", max_columns),
        column_before=stacked("column_before", n_blocks),
        indices=[],
        uses_diagonals=any(plan.uses_diagonals for plan in present),
        uses_blocks=any(plan.uses_blocks for plan in present),
        uses_columns=any(plan.uses_columns for plan in present),
        sequences=tuple((plan.seq, plan.q_start, int(key), int(query))
                        for plan, key, query in zip(plans, key_offset, query_offset)),
    )
