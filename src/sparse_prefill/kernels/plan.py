"""Plan: from one layer's patterns and Q/K to the work list the sparse kernel walks.

Each head's index comes from its kind's estimator (:func:`sparse_prefill.kinds.estimate_layer`,
the same call the CPU path makes), and each kind lays its indices out in three lists, built on the
device with tensor operations (no Python loop over query blocks):

- **block diagonals** ``d`` (per head): for query block ``m`` the key block ``m - d`` is a tile
  to compute. Dense, A-shape and Vertical-Slash heads use these.
- **block lists** (per head and query block): Block-Sparse and Block-Coverage heads list their
  tiles here, ascending, the diagonal block last.
- **columns** (per head): single keys gathered 64 at a time, for each query block those before it,
  skipped where a kept diagonal tile of the query block already holds them.

Only two kinds of tile need an element mask: the diagonal tile (causal) and, for A-shape heads,
tiles the window's edge cuts through (``i - j < window`` or ``j < sink``). Every other tile is
computed whole: the kernel computes exactly the kept set of docs/semantics.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..kinds import HeadIndex, Pattern, estimate_layer, index_unit
from ..kinds.common import BLOCK

NO_WINDOW = 2**30  # a window longer than any sequence: no tile gets the A-shape mask

__all__ = ["BLOCK", "SparsePlan", "build_plan", "plan_from_indices"]


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
    blocks : int32 [bh, n_rows, max_blocks]  listed key blocks ascending (the diagonal last) of query block
        first_block + row; entries past block_count are padding (never read)
    block_count : int32 [bh, n_rows]
    columns : int32 [bh, max_columns]  gathered key columns ascending, padded with seq
    column_before : int32 [bh, n_blocks]  per query block m: how many columns are < 64 m
    indices : list of HeadIndex, one per query head (what was estimated; for tests and recall)
    uses_diagonals, uses_blocks, uses_columns : bool
        Whether any head has work of that kind: the kernel compiles the other loops out.
    """

    seq: int
    q_start: int
    diagonals: torch.Tensor
    diagonal_limit: torch.Tensor
    diagonal_flag: torch.Tensor
    window: torch.Tensor
    sink: torch.Tensor
    blocks: torch.Tensor
    block_count: torch.Tensor
    columns: torch.Tensor
    column_before: torch.Tensor
    indices: list[HeadIndex]
    uses_diagonals: bool = True
    uses_blocks: bool = True
    uses_columns: bool = True

    @property
    def first_block(self) -> int:
        return self.q_start // BLOCK

    def computed_pairs(self) -> torch.Tensor:
        """[batch * q_heads] query-key pairs the kernel multiplies (64 x 64 per tile, gathered-column tiles included),
        as each kind's ``computed_pairs`` counts them. Whole prompts only (the benchmarks' use)."""
        if self.q_start:
            raise ValueError(f"computed_pairs counts a whole prompt's work; this plan is for a chunk (q_start={self.q_start})")
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
        # One entry per kind that has them: (heads, tensor for all of them), written in one go each.
        self._blocks: list[tuple[list[int], torch.Tensor]] = []
        self._columns: list[tuple[list[int], torch.Tensor]] = []

    def set_blocks(self, heads: list[int], blocks: torch.Tensor) -> None:
        """blocks: [batch, len(heads), n_rows, k] key blocks ascending, padded with -1."""
        self._blocks.append((heads, blocks))

    def set_columns(self, heads: list[int], columns: torch.Tensor) -> None:
        """columns: [batch, len(heads), n] ascending and distinct, padded with seq (or more)."""
        self._columns.append((heads, columns))

    def finish(self, indices: list[HeadIndex]) -> SparsePlan:
        batch, q_heads, seq, nb, device = self.batch, self.q_heads, self.seq, self.n_blocks, self.device
        n_rows = self.n_rows
        int32 = dict(dtype=torch.int32, device=device)
        self.diagonal_flag[:, :, nb] = False
        arange = torch.arange(nb + 1, device=device)
        diagonals = torch.where(self.diagonal_flag, arange, nb).sort(dim=2).values[:, :, :nb]
        diagonal_limit = self.diagonal_flag[:, :, :nb].to(torch.int32).cumsum(dim=2)

        max_blocks = max([listed.shape[3] for _, listed in self._blocks] + [1])
        if len(self._blocks) == 1 and self._blocks[0][0] == list(range(q_heads)):
            # Every head lists blocks (a Block-Coverage layer): take the lists as they are. The kernel
            # reads a row's first block_count entries only, so the -1 padding stays unread.
            blocks = self._blocks[0][1].to(torch.int32)
            block_count = (blocks >= 0).sum(dim=3, dtype=torch.int32)
        else:
            blocks = torch.zeros(batch, q_heads, n_rows, max_blocks, **int32)
            block_count = torch.zeros(batch, q_heads, n_rows, **int32)
            for heads, listed in self._blocks:
                blocks[:, heads, :, : listed.shape[3]] = listed.clamp(min=0).to(torch.int32)
                block_count[:, heads] = (listed >= 0).sum(dim=3).to(torch.int32)

        max_columns = max([listed.shape[2] for _, listed in self._columns] + [1])
        columns = torch.full((batch, q_heads, max_columns), seq, **int32)
        for heads, listed in self._columns:
            columns[:, heads, : listed.shape[2]] = listed.clamp(max=seq).to(torch.int32)
        starts = (torch.arange(nb, device=device) * BLOCK).to(torch.int32)
        column_before = torch.searchsorted(columns.view(-1, max_columns), starts.expand(batch * q_heads, -1).contiguous())

        bh = batch * q_heads
        return SparsePlan(
            seq=seq,
            q_start=self.q_start,
            diagonals=diagonals.to(torch.int32).reshape(bh, nb).contiguous(),
            diagonal_limit=diagonal_limit.reshape(bh, nb).contiguous(),
            diagonal_flag=self.diagonal_flag.to(torch.int8).reshape(bh, nb + 1).contiguous(),
            window=self.window.reshape(bh).contiguous(),
            sink=self.sink.reshape(bh).contiguous(),
            blocks=blocks.reshape(bh, n_rows, max_blocks).contiguous(),
            block_count=block_count.reshape(bh, n_rows).contiguous(),
            columns=columns.reshape(bh, max_columns).contiguous(),
            column_before=column_before.to(torch.int32).reshape(bh, nb).contiguous(),
            indices=indices,
            uses_diagonals=sum(len(heads) for heads, _ in self._blocks) < q_heads,  # the others walk diagonals
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
