"""Block-Sparse: per 64-query block, a list of 64-key blocks (MInference's third pattern).

The kept set, the GPU kernel's share and the cost are those of any block list; Block-Coverage
(:mod:`.block_coverage`) keeps the same kind of index and reuses them. The estimator here is
MInference's: queries and keys mean-pooled over blocks, the ``top_k`` best pooled scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .common import (BLOCK, causal, check_positive_int, device_values, float_dtype, n_blocks, query_start,
                     scaled_count, stack_padded, with_partial_block)


@dataclass(frozen=True)
class BlockSparse:
    """Keep the ``top_k`` key blocks of 64 tokens with the best pooled scores for every query block (diagonal block always)."""

    top_k: int
    kind: ClassVar[str] = "block_sparse"

    def __post_init__(self) -> None:
        check_positive_int("BlockSparse", "top_k", self.top_k)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "top_k": self.top_k}

    def scaled(self, factor: float) -> "BlockSparse":
        return BlockSparse(scaled_count(self.top_k, factor))

    def label(self) -> str:
        """The budget in a few characters, for tables and plots: ``k<top_k>``."""
        return f"k{self.top_k}"


@dataclass(frozen=True)
class BlockSparseIndex:
    """Chosen key blocks per query block.

    ``blocks`` [batch, n_rows, k] (int32 or int64) holds key-block numbers, ascending, padded with
    -1 at the end where a query block keeps fewer than ``k``; row ``r`` lists query block
    ``first_block + r`` (0 for a whole prompt; a chunk's first query block otherwise, see
    docs/semantics.md). Key ``j <= i`` is kept when block ``j // 64`` is listed for query block
    ``i // 64``. The diagonal block is always listed (last).
    """

    blocks: torch.Tensor
    first_block: int = 0

    def block_mask(self) -> torch.Tensor:
        """Bool [batch, n_rows, n_blocks]: which (query block, key block) tiles are kept."""
        batch, rows, _ = self.blocks.shape
        nb = self.first_block + rows
        mask = torch.zeros(batch, rows, nb + 1, dtype=torch.bool, device=self.blocks.device)
        # Padding (-1) lands in the spare last column and is dropped.
        mask.scatter_(2, torch.where(self.blocks < 0, nb, self.blocks).long(), True)
        return mask[:, :, :nb]

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=rows.device)
        # Only the rows' own lists: [batch, rows, k blocks], not the n_blocks^2 tile mask (1M tokens: 268 MB a call).
        listed = self.blocks[:, rows // BLOCK - self.first_block]  # [batch, rows, k]
        nb = n_blocks(n_keys)
        tiles = torch.zeros(listed.shape[0], len(rows), nb + 1, dtype=torch.bool, device=rows.device)
        tiles.scatter_(2, torch.where(listed < 0, nb, listed).long(), True)  # padding lands in the spare column
        return tiles[:, :, keys // BLOCK] & causal(rows, n_keys)


def mean_pool_blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., seq, dim] -> [..., ceil(seq / 64), dim] block means (the last block over the tokens it has),
    float32 (float64 stays). Sums in the wider dtype without copying ``x`` (gigabytes at 1M tokens)."""
    dtype = float_dtype(x)
    seq, dim = x.shape[-2:]
    full = seq // BLOCK
    parts = [x[..., : full * BLOCK, :].reshape(*x.shape[:-2], full, BLOCK, dim).sum(dim=-2, dtype=dtype) / BLOCK]
    if seq > full * BLOCK:
        parts.append(x[..., full * BLOCK :, :].sum(dim=-2, keepdim=True, dtype=dtype) / (seq - full * BLOCK))
    return torch.cat(parts, dim=-2)


def pooled_scores(pooled_q: torch.Tensor, pooled_k: torch.Tensor, scale: float, first_block: int = 0) -> torch.Tensor:
    """[..., rows, n_blocks] scores of block-mean queries (query blocks ``first_block ..``) against
    block-mean keys (from :func:`mean_pool_blocks`): future key blocks -inf, the diagonal block +inf
    (always kept, ranked first)."""
    scores = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * scale
    rows, nb = scores.shape[-2:]
    query_block = first_block + torch.arange(rows, device=scores.device)
    key_block = torch.arange(nb, device=scores.device)
    scores = scores.masked_fill(key_block[None, :] > query_block[:, None], float("-inf"))
    return scores.masked_fill(key_block[None, :] == query_block[:, None], float("inf"))


def estimate(q: torch.Tensor, k: torch.Tensor, heads: list[int], patterns: list[BlockSparse], scale: float) -> list[BlockSparseIndex]:
    """MInference's Block-Sparse estimator for every Block-Sparse head of a layer (docs/semantics.md)."""
    batch, q_heads, _, _ = q.shape
    group = q_heads // k.shape[1]
    q_start = query_start(q, k)
    nb = n_blocks(k.shape[2])
    # A chunk's whole query blocks are estimated as in a whole prompt; a partial first one keeps every
    # causal key block (docs/semantics.md).
    first_block, whole = q_start // BLOCK, -(-q_start // BLOCK)
    top_ks = [min(p.top_k, nb) for p in patterns]
    k_max = max(top_ks)
    rank = torch.arange(k_max, device=q.device)
    ids = device_values(heads, q.device)
    head_top_k = device_values(top_ks, q.device)
    # Pool first, then pick heads: only the pooled [blocks, dim] rows are ever copied.
    pooled_q = mean_pool_blocks(q[:, :, whole * BLOCK - q_start :])[:, ids]  # [batch, n, whole blocks, dim]
    pooled_k = mean_pool_blocks(k)[:, ids // group]
    # Scores are [rows, nb] floats per head (1 GiB at 1M tokens): as many heads at a time as fit ~1 GiB.
    step = max(1, 2**28 // (batch * max(1, nb - whole) * nb))
    chosen = []
    for first in range(0, len(heads), step):
        part = slice(first, first + step)
        top = pooled_scores(pooled_q[:, part], pooled_k[:, part], scale, whole).topk(k_max, dim=-1)
        # Query block b has only b + 1 causal key blocks: the rest of its top-k are -inf, dropped.
        keep = (top.values > float("-inf")) & (rank < head_top_k[part][None, :, None, None])
        chosen.append(torch.where(keep, top.indices, nb).sort(dim=-1).values)
    blocks = torch.cat(chosen, dim=1)
    blocks = with_partial_block(torch.where(blocks == nb, -1, blocks), q_start)
    # Each head's lists as wide as its budget, unless a partial first block lists more (all it sees).
    widths = [blocks.shape[-1] if q_start % BLOCK else top_k for top_k in top_ks]
    return [BlockSparseIndex(blocks=blocks[:, j, :, : widths[j]], first_block=first_block) for j in range(len(heads))]


# --- the GPU kernel's share and cost -------------------------------------------------------------------


def add_to_plan(writer, heads: list[int], indices: list[BlockSparseIndex]) -> None:
    writer.set_blocks(heads, stack_padded([index.blocks for index in indices], -1))


def computed_pairs(index: BlockSparseIndex, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] tile pairs, [batch] gathered-column pairs) the kernel multiplies: 64 x 64 per listed tile."""
    tiles = (index.blocks >= 0).sum(dim=(1, 2)).cpu()
    return tiles * BLOCK * BLOCK, torch.zeros_like(tiles)


def recall(index: BlockSparseIndex, stats, head: int, rows: str = "all") -> float:
    """Dense mass on the kept set from blockwise statistics (:mod:`sparse_prefill.search.stats`)."""
    first_block, n_rows, _, _ = stats.rows(rows)
    tiles = index.block_mask()[0].to(stats.block_mass.device)  # [n_blocks, n_blocks]
    return float((stats.block_mass[head, first_block:] * tiles[first_block:]).sum() / n_rows)
