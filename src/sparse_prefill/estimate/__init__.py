"""Online index estimation: from one prompt's Q and K to the kept set of each head."""

from __future__ import annotations

import torch

from ..index import AShapeIndex, DenseIndex, HeadIndex
from ..patterns import AdaptiveVerticalSlash, AShape, BlockSparse, Dense, Pattern, VerticalSlash
from .block_sparse import block_scores, block_sparse_index, mean_pool_blocks
from .vertical_slash import (
    adaptive_vertical_slash_index,
    coverage_selection,
    diagonal_sums,
    last_query_attention,
    ranked_with_forced,
    top_with_forced,
    vertical_slash_index,
)

__all__ = [
    "estimate_index",
    "vertical_slash_index",
    "adaptive_vertical_slash_index",
    "coverage_selection",
    "ranked_with_forced",
    "last_query_attention",
    "diagonal_sums",
    "top_with_forced",
    "block_sparse_index",
    "block_scores",
    "mean_pool_blocks",
]


def estimate_index(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float) -> HeadIndex:
    """The kept set of one query head. ``q``, ``k``: [batch, seq, head_dim] (k is the head's KV head)."""
    batch, seq, _ = q.shape
    if isinstance(pattern, Dense):
        return DenseIndex(batch)
    if isinstance(pattern, AShape):
        return AShapeIndex(batch, sink=min(pattern.sink, seq), local=min(pattern.local, seq))
    if isinstance(pattern, VerticalSlash):
        return vertical_slash_index(q, k, pattern, scale)
    if isinstance(pattern, AdaptiveVerticalSlash):
        return adaptive_vertical_slash_index(q, k, pattern, scale)
    if isinstance(pattern, BlockSparse):
        return block_sparse_index(q, k, pattern, scale)
    raise TypeError(
        f"pattern must be Dense, AShape, VerticalSlash, AdaptiveVerticalSlash or BlockSparse, got {type(pattern).__name__}"
    )
