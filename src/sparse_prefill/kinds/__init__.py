"""The pattern kinds, one module each: budget, kept set, estimator, the GPU plan's share, cost, recall.

Every kind is one unit (``dense``, ``a_shape``, ``vertical_slash``, ``block_sparse``,
``block_coverage``) and every path calls it: the CPU reference and masked path, the GPU plan, the
pattern search and KV-cache scoring. A unit module defines

- its pattern dataclass (the budget; ``to_dict``, ``scaled``, ``label``) and, unless it reuses another kind's,
  its index dataclass (the kept set of one head: ``kept_mask(rows, n_keys)``);
- ``estimate(q, k, heads, patterns, scale)``: the indices of all of a layer's heads of this kind at
  once, on the CPU or the GPU;
- for its index type: ``add_to_plan(writer, heads, indices)`` (the GPU kernel's work lists),
  ``computed_pairs(index, seq)`` (what the kernel multiplies) and ``recall(index, stats, head, rows)``
  (dense mass kept, from the search's blockwise statistics).

Adding a kind means adding one module and listing it here.
"""

from __future__ import annotations

from types import ModuleType
from typing import Container, Sequence, Union

import torch

from . import a_shape, block_coverage, block_sparse, dense, vertical_slash
from .a_shape import AShape, AShapeIndex
from .block_coverage import BlockCoverage
from .block_sparse import BlockSparse, BlockSparseIndex
from .dense import Dense, DenseIndex
from .vertical_slash import VerticalSlash, VerticalSlashIndex

__all__ = [
    "AShape", "AShapeIndex", "BlockCoverage", "BlockSparse", "BlockSparseIndex", "Dense", "DenseIndex",
    "VerticalSlash", "VerticalSlashIndex", "HeadIndex", "Pattern", "PATTERN_TYPES", "estimate_layer",
    "index_unit", "kept_fraction", "pattern_unit",
]

Pattern = Union[Dense, AShape, VerticalSlash, BlockSparse, BlockCoverage]
HeadIndex = Union[DenseIndex, AShapeIndex, VerticalSlashIndex, BlockSparseIndex]

_BY_PATTERN: dict[type, ModuleType] = {
    Dense: dense, AShape: a_shape, VerticalSlash: vertical_slash, BlockSparse: block_sparse, BlockCoverage: block_coverage,
}
_BY_INDEX: dict[type, ModuleType] = {
    DenseIndex: dense, AShapeIndex: a_shape, VerticalSlashIndex: vertical_slash, BlockSparseIndex: block_sparse,
}
PATTERN_TYPES: dict[str, type] = {cls.kind: cls for cls in _BY_PATTERN}


def pattern_unit(pattern: Pattern) -> ModuleType:
    """The unit that estimates ``pattern``."""
    return _unit(_BY_PATTERN, pattern, "pattern")


def index_unit(index: HeadIndex) -> ModuleType:
    """The unit that lays out, costs and scores ``index``."""
    return _unit(_BY_INDEX, index, "index")


def _unit(units: dict[type, ModuleType], value, name: str) -> ModuleType:
    try:
        return units[type(value)]
    except KeyError:
        raise TypeError(f"{name} must be one of {', '.join(c.__name__ for c in units)}, "
                        f"got {type(value).__name__}") from None


def estimate_layer(q: torch.Tensor, k: torch.Tensor, patterns: Sequence[Pattern], scale: float,
                   heads: Container[int] | None = None) -> list[HeadIndex | None]:
    """Every query head's index: one call per kind present, all of that kind's heads together.

    q : [batch, q_heads, seq, head_dim]; k : [batch, kv_heads, seq, head_dim]; ``patterns`` one per
    query head (validated by the caller). ``heads``: estimate only these query heads, the others' entries
    None (a context-parallel piece takes its Vertical-Slash indices from the whole prompt's last queries).
    """
    if len(patterns) != q.shape[1]:  # a mismatch would index past q's heads: a device-side assert on a GPU
        raise ValueError(f"patterns must hold one pattern per query head: got {len(patterns)} for q_heads={q.shape[1]}")
    by_kind: dict[type, list[int]] = {}
    for head, pattern in enumerate(patterns):
        if heads is None or head in heads:
            by_kind.setdefault(type(pattern), []).append(head)
    indices: list[HeadIndex | None] = [None] * len(patterns)
    for kind, heads in by_kind.items():
        for head, index in zip(heads, _BY_PATTERN[kind].estimate(q, k, heads, [patterns[h] for h in heads], scale)):
            indices[head] = index
    return indices


def kept_fraction(index: HeadIndex, seq: int, chunk_size: int = 1024) -> torch.Tensor:
    """[batch] fraction of the ``seq * (seq + 1) / 2`` causal pairs that ``index`` keeps."""
    # Dense and A-shape indices hold no tensors and work on any device.
    device = next((t.device for t in vars(index).values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    kept = 0
    for start in range(0, seq, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, seq), device=device)
        kept = kept + index.kept_mask(rows, seq).sum(dim=(1, 2))
    return kept.double() / (seq * (seq + 1) / 2)
