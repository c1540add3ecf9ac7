"""Dense: every causal pair. The yardstick, and the choice for heads no pattern serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .common import BLOCK, causal, n_blocks


@dataclass(frozen=True)
class Dense:
    """Keep every causal (query, key) pair: plain causal attention."""

    kind: ClassVar[str] = "dense"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind}

    def scaled(self, factor: float) -> "Dense":
        return self

    def label(self) -> str:
        """The budget in a few characters, for tables and plots."""
        return "dense"


@dataclass(frozen=True)
class DenseIndex:
    """Every causal pair."""

    batch: int

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Bool [batch, len(rows), n_keys]."""
        return causal(rows, n_keys).expand(self.batch, -1, -1)


def estimate(q: torch.Tensor, k: torch.Tensor, heads: list[int], patterns: list, scale: float) -> list[DenseIndex]:
    return [DenseIndex(q.shape[0]) for _ in heads]


def add_to_plan(writer, heads: list[int], indices: list[DenseIndex]) -> None:
    writer.diagonal_flag[:, writer.head_index(heads), : writer.n_blocks] = True


def computed_pairs(index: DenseIndex, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] tile pairs, [batch] gathered-column pairs) the kernel multiplies: every tile on or below the diagonal."""
    nb = n_blocks(seq)
    return torch.full((index.batch,), nb * (nb + 1) // 2 * BLOCK * BLOCK), torch.zeros(index.batch, dtype=torch.long)


def recall(index: DenseIndex, stats, head: int, rows: str = "all") -> float:
    return 1.0
