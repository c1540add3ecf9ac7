"""A-shape: a static window of recent keys plus the first keys (attention sinks). No index to estimate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .common import BLOCK, check_positive_int, device_values, n_blocks, scaled_count


@dataclass(frozen=True)
class AShape:
    """Static sink + local window: query ``i`` keeps key ``j <= i`` when ``j < sink`` or ``i - j < local``.

    ``sink`` may be 0 (a pure sliding window); ``local`` is at least 1 so that every query keeps
    itself and no softmax row is empty.
    """

    sink: int
    local: int
    kind: ClassVar[str] = "a_shape"

    def __post_init__(self) -> None:
        check_positive_int("AShape", "sink", self.sink, minimum=0)
        check_positive_int("AShape", "local", self.local)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "sink": self.sink, "local": self.local}

    def scaled(self, factor: float) -> "AShape":
        """The window scales with the prompt; the sinks are the first tokens of any prompt and do not."""
        return AShape(self.sink, scaled_count(self.local, factor))

    def label(self) -> str:
        """The budget in a few characters, for tables and plots: ``sink+local``."""
        return f"{self.sink}+{self.local}"


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

    def last_diagonal(self) -> int:
        """The farthest block diagonal the window touches: offsets up to local - 1 reach (local + 62) // 64."""
        return (self.local + BLOCK - 2) // BLOCK


def estimate(q: torch.Tensor, k: torch.Tensor, heads: list[int], patterns: list[AShape], scale: float) -> list[AShapeIndex]:
    seq = k.shape[2]  # positions, for a chunk too: the window counts back from each query's position
    return [AShapeIndex(q.shape[0], sink=min(p.sink, seq), local=min(p.local, seq)) for p in patterns]


def add_to_plan(writer, heads: list[int], indices: list[AShapeIndex]) -> None:
    device = writer.device
    last = device_values([index.last_diagonal() for index in indices], device)
    local = device_values([index.local for index in indices], device, torch.int32)
    sink = device_values([index.sink for index in indices], device, torch.int32)
    where = writer.head_index(heads)
    writer.diagonal_flag[:, where] |= (torch.arange(writer.n_blocks + 1, device=device)[None, :] <= last[:, None])
    # Tiles the window's edge cuts through get the element mask (i - j < local or j < sink).
    writer.window[:, where] = local
    writer.sink[:, where] = sink
    positions = torch.arange(max(index.sink for index in indices), device=device)
    sink_columns = torch.where(positions[None, :] < sink[:, None], positions[None, :], writer.seq)  # past seq: dropped
    writer.set_columns(heads, sink_columns.expand(writer.batch, -1, -1))


def computed_pairs(index: AShapeIndex, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] tile pairs, [batch] gathered-column pairs) the kernel multiplies: the window's
    diagonal tiles, and for every query block the sink columns before it, in tiles of 64."""
    nb = n_blocks(seq)
    last = min(index.last_diagonal(), nb - 1)
    tiles = sum(nb - d for d in range(last + 1))
    m = torch.arange(nb)
    column_tiles = int((-(-torch.clamp(m * BLOCK, max=index.sink) // BLOCK)).sum())
    return (torch.full((index.batch,), tiles * BLOCK * BLOCK), torch.full((index.batch,), column_tiles * BLOCK * BLOCK))


def recall(index: AShapeIndex, stats, head: int, rows: str = "all") -> float:
    """Dense mass on the kept set from blockwise statistics (:mod:`sparse_prefill.search.stats`)."""
    _, n_rows, offset_mass, sink_tail = stats.rows(rows)
    window = offset_mass[head, : min(index.local, stats.seq)].sum()
    sink = 0.0
    if index.sink > 0:
        if index.local not in stats.locals or index.sink > stats.sink_tail.shape[2]:
            raise ValueError(
                f"statistics were gathered for windows {stats.locals} and {stats.sink_tail.shape[2]} sinks; "
                f"AShape(sink={index.sink}, local={index.local}) needs its own"
            )
        sink = sink_tail[head, stats.locals.index(index.local), : index.sink].sum()
    return float((window + sink) / n_rows)
