"""Kept sets: exactly which (query, key) pairs one query head attends to.

This module is the executable form of docs/semantics.md. An *index* is what the estimator chose for
one query head on one input (for every batch element); ``kept_mask(rows, n_keys)`` turns it into a
boolean mask for a chunk of query rows. Every fast path is tested against these masks.

Positions are 0-based; query ``i`` and key ``j`` are causal when ``j <= i``. All indices here are
``torch.long`` tensors on the device of the inputs they were estimated from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

__all__ = [
    "SINK_COLUMNS",
    "LOCAL_DIAGONALS",
    "forced_diagonals",
    "DenseIndex",
    "AShapeIndex",
    "VerticalSlashIndex",
    "BlockSparseIndex",
    "HeadIndex",
    "kept_fraction",
]

# Vertical-Slash always keeps the first SINK_COLUMNS key columns (attention sinks: most models put
# heavy mass on the first tokens) and its nearest diagonals: offsets 0..LOCAL_DIAGONALS-1 with
# slash_block 1, block diagonals 0 and 1 with slash_block 64. Either way every query sees at least
# its 64 nearest keys, and itself, so no softmax row is empty. Both count against the budget.
SINK_COLUMNS = 4
LOCAL_DIAGONALS = 64


def forced_diagonals(slash_block: int) -> int:
    """How many of the nearest diagonals (in units of slash_block) are always kept."""
    return LOCAL_DIAGONALS if slash_block == 1 else -(-LOCAL_DIAGONALS // slash_block) + 1


def _causal(rows: torch.Tensor, n_keys: int) -> torch.Tensor:
    keys = torch.arange(n_keys, device=rows.device)
    return keys[None, :] <= rows[:, None]  # [rows, keys]


@dataclass(frozen=True)
class DenseIndex:
    """Every causal pair."""

    batch: int

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Bool [batch, len(rows), n_keys]."""
        return _causal(rows, n_keys).expand(self.batch, -1, -1)


@dataclass(frozen=True)
class AShapeIndex:
    """Key ``j <= i`` is kept when ``j < sink`` or ``i - j < local`` (both already clamped to the length)."""

    batch: int
    sink: int
    local: int

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=rows.device)
        distance = rows[:, None] - keys[None, :]
        kept = (distance >= 0) & ((keys[None, :] < self.sink) | (distance < self.local))
        return kept.expand(self.batch, -1, -1)


@dataclass(frozen=True)
class VerticalSlashIndex:
    """Chosen key columns and diagonals, per batch element, each sorted ascending.

    ``columns`` [batch, n_vertical] holds key positions. ``diagonals`` [batch, n_slash] holds
    distances in units of ``slash_block`` tokens: key ``j <= i`` is kept when ``j`` is a column or
    ``i // slash_block - j // slash_block`` is a diagonal (with ``slash_block = 1``, the offset
    ``i - j``).
    """

    columns: torch.Tensor
    diagonals: torch.Tensor
    slash_block: int = 1

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        column_flag = _flags(self.columns, n_keys)  # [batch, keys]
        key_blocks = -(-n_keys // self.slash_block)
        diagonal_flag = _flags(self.diagonals, key_blocks)  # [batch, diagonals]
        keys = torch.arange(n_keys, device=rows.device)
        # A diagonal covers whole (row block, key block) tiles: look it up once per key block and widen,
        # rather than gathering rows x keys flags (the CPU path's cost at 8K+ tokens).
        distance = rows[:, None] // self.slash_block - torch.arange(key_blocks, device=rows.device)[None, :]
        on_slash = diagonal_flag[:, distance.clamp(min=0)]  # [batch, rows, key blocks]
        on_slash = on_slash.repeat_interleave(self.slash_block, dim=2)[:, :, :n_keys]
        return (keys[None, :] <= rows[:, None]) & (column_flag[:, None, :] | on_slash)


@dataclass(frozen=True)
class BlockSparseIndex:
    """Chosen key blocks per query block.

    ``blocks`` [batch, n_blocks, k] holds key-block numbers, ascending, padded with -1 at the end
    where a query block has fewer than ``k`` causal key blocks. Key ``j <= i`` is kept when block
    ``j // block`` is listed for query block ``i // block``.
    """

    blocks: torch.Tensor
    block: int

    def block_mask(self) -> torch.Tensor:
        """Bool [batch, n_blocks, n_blocks]: which (query block, key block) tiles are kept."""
        batch, n_blocks, _ = self.blocks.shape
        mask = torch.zeros(batch, n_blocks, n_blocks + 1, dtype=torch.bool, device=self.blocks.device)
        # Padding (-1) lands in the spare last column and is dropped.
        mask.scatter_(2, torch.where(self.blocks < 0, n_blocks, self.blocks), True)
        return mask[:, :, :n_blocks]

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=rows.device)
        tiles = self.block_mask()  # [batch, q blocks, k blocks]
        kept = tiles[:, rows // self.block][:, :, keys // self.block]
        return kept & _causal(rows, n_keys)


HeadIndex = Union[DenseIndex, AShapeIndex, VerticalSlashIndex, BlockSparseIndex]


def _flags(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [batch, length] with True at each listed position; positions at or past ``length`` are
    dropped (a mask over a prefix of the keys)."""
    flags = torch.zeros(positions.shape[0], length + 1, dtype=torch.bool, device=positions.device)
    return flags.scatter_(1, positions.clamp(max=length), True)[:, :length]


def kept_fraction(index: HeadIndex, seq: int, chunk_size: int = 1024) -> torch.Tensor:
    """[batch] fraction of the ``seq * (seq + 1) / 2`` causal pairs that ``index`` keeps."""
    # Dense and A-shape indices hold no tensors and work on any device.
    device = next((t.device for t in vars(index).values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    kept = 0
    for start in range(0, seq, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, seq), device=device)
        kept = kept + index.kept_mask(rows, seq).sum(dim=(1, 2))
    return kept.double() / (seq * (seq + 1) / 2)
