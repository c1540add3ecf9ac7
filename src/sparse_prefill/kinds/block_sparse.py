"""Block-Sparse: per 64-query block, a list of 64-key blocks (MInference's third pattern).

The kept set, the GPU kernel's share and the cost are those of any block list; Block-Coverage
(:mod:`.block_coverage`) keeps the same kind of index and reuses them. The estimator here is
MInference's: queries and keys mean-pooled over blocks, the ``top_k`` best pooled scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .common import (BLOCK, causal, check_positive_int, device_values, float_dtype, n_blocks, on_triton, query_start,
                     scaled_count)


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
    """Chosen key blocks per query block, as lists in a buffer.

    Row ``r`` of batch element ``b`` lists the key blocks of query block ``first_block + r`` (0 for a
    whole prompt; a chunk's first query block otherwise, see docs/semantics.md) in
    ``blocks[start[b, r] : start[b, r] + count[b, r]]``, ascending, the diagonal block last. Key
    ``j <= i`` is kept when block ``j // 64`` is listed for query block ``i // 64``.

    The lists need not be back to back, and several heads may share one buffer: a table padded to
    its widest row (:func:`packed_lists`) is a buffer whose rows start every ``k`` entries, and the
    GPU's Block-Coverage estimate packs each row's list right after the previous one, so that
    memory follows the kept tiles rather than the widest row (at 1M tokens a padded table is up to
    1 GiB per head).

    blocks : int32 [n]; start : int64 [batch, n_rows]; count : int32 [batch, n_rows]
    """

    blocks: torch.Tensor
    start: torch.Tensor
    count: torch.Tensor
    first_block: int = 0

    @property
    def batch(self) -> int:
        return self.start.shape[0]

    def padded(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, n_rows, width] the lists (of list rows ``rows`` only, if given), padded with -1 to the widest."""
        start, count = (self.start, self.count) if rows is None else (self.start[:, rows], self.count[:, rows])
        width = int(count.max()) if count.numel() else 0
        slot = torch.arange(max(width, 1), device=self.blocks.device)
        listed = slot < count[..., None]
        if not self.blocks.numel():
            return torch.full(listed.shape, -1, dtype=self.blocks.dtype, device=self.blocks.device)
        return torch.where(listed, self.blocks[torch.where(listed, start[..., None] + slot, 0)], -1)

    def block_mask(self) -> torch.Tensor:
        """Bool [batch, n_rows, n_blocks]: which (query block, key block) tiles are kept."""
        listed = self.padded()
        batch, rows, _ = listed.shape
        nb = self.first_block + rows
        mask = torch.zeros(batch, rows, nb + 1, dtype=torch.bool, device=listed.device)
        # Padding (-1) lands in the spare last column and is dropped.
        mask.scatter_(2, torch.where(listed < 0, nb, listed).long(), True)
        return mask[:, :, :nb]

    def kept_mask(self, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
        keys = torch.arange(n_keys, device=rows.device)
        # Only the rows' own lists: [batch, rows, k blocks], not the n_blocks^2 tile mask (1M tokens: 268 MB a call).
        listed = self.padded(rows // BLOCK - self.first_block)  # [batch, rows, k]
        nb = n_blocks(n_keys)
        tiles = torch.zeros(listed.shape[0], len(rows), nb + 1, dtype=torch.bool, device=rows.device)
        tiles.scatter_(2, torch.where(listed < 0, nb, listed).long(), True)  # padding lands in the spare column
        return tiles[:, :, keys // BLOCK] & causal(rows, n_keys)


def packed_lists(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A table ``[..., rows, k]`` of ascending key blocks padded with -1 at the end, as the
    ``(blocks, start, count)`` of :class:`BlockSparseIndex` (start and count ``[..., rows]``); the
    table itself is the buffer."""
    width = table.shape[-1]
    blocks = table.to(torch.int32).reshape(-1)
    start = torch.arange(blocks.numel() // max(width, 1), device=table.device).view(table.shape[:-1]) * width
    return blocks, start, (table >= 0).sum(dim=-1, dtype=torch.int32)


def with_partial_block(blocks: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
                       q_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's lists ``(blocks, start [..., rows], count)`` of its whole query blocks with, when
    ``q_start`` is not a multiple of 64, the partial first query block's list on top: every causal
    key block ``0 .. q_start // 64`` (one list at the buffer's end, shared by every row ``[..., 0]``)."""
    if q_start % BLOCK == 0:
        return blocks, start, count
    first_block = q_start // BLOCK
    partial = torch.arange(first_block + 1, dtype=blocks.dtype, device=blocks.device)
    one_row = (*start.shape[:-1], 1)
    start = torch.cat([start.new_full(one_row, blocks.numel()), start], dim=-1)
    count = torch.cat([count.new_full(one_row, first_block + 1), count], dim=-1)
    return torch.cat([blocks, partial]), start, count


def split_heads(blocks: torch.Tensor, start: torch.Tensor, count: torch.Tensor, first_block: int) -> list[BlockSparseIndex]:
    """One index per head of lists ``start``/``count`` [batch, heads, rows] in one shared buffer."""
    return [BlockSparseIndex(blocks, start[:, j], count[:, j], first_block) for j in range(start.shape[1])]


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
    ids = device_values(heads, q.device)
    # Pool first, then pick heads: only the pooled [blocks, dim] rows are ever copied.
    pooled_q = mean_pool_blocks(q[:, :, whole * BLOCK - q_start :])[:, ids]  # [batch, n, whole blocks, dim]
    pooled_k = mean_pool_blocks(k)[:, ids // group]
    # Scores are [rows, nb] floats per head (1 GiB at 1M tokens): as many heads at a time as fit ~1 GiB.
    step = max(1, 2**28 // (batch * max(1, nb - whole) * nb))
    if on_triton(q) and nb > whole:
        lists = _top_blocks_on_gpu(pooled_q, pooled_k, top_ks, scale, whole, step)
    else:
        k_max = max(top_ks)
        rank = torch.arange(k_max, device=q.device)
        head_top_k = device_values(top_ks, q.device)
        chosen = []
        for first in range(0, len(heads), step):
            part = slice(first, first + step)
            top = pooled_scores(pooled_q[:, part], pooled_k[:, part], scale, whole).topk(k_max, dim=-1)
            # Query block b has only b + 1 causal key blocks: the rest of its top-k are -inf, dropped.
            keep = (top.values > float("-inf")) & (rank < head_top_k[part][None, :, None, None])
            chosen.append(torch.where(keep, top.indices, nb).sort(dim=-1).values)
        table = torch.cat(chosen, dim=1)
        lists = packed_lists(torch.where(table == nb, -1, table))
    return split_heads(*with_partial_block(*lists, q_start), first_block)


def _top_blocks_on_gpu(pooled_q: torch.Tensor, pooled_k: torch.Tensor, top_ks: list[int], scale: float, whole: int,
                       step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same selection by :func:`~sparse_prefill.kernels.top_blocks.top_block_lists` (one Triton
    launch per width of rows instead of a top-k, a sort and the packing), ``step`` heads at a time."""
    from ..kernels.top_blocks import top_block_lists  # lazy: importing the package never imports Triton

    batch, n, n_rows, _ = pooled_q.shape
    parts, starts, counts, offset = [], [], [], 0
    for first in range(0, n, step):
        part = slice(first, first + step)
        scores = pooled_scores(pooled_q[:, part], pooled_k[:, part], scale, whole)  # [batch, heads, rows, nb]
        heads = scores.shape[1]
        blocks, start, count = top_block_lists(scores.reshape(batch * heads, n_rows, -1), top_ks[part] * batch, whole)
        parts.append(blocks)
        starts.append(start.view(batch, heads, n_rows) + offset)
        counts.append(count.view(batch, heads, n_rows))
        offset += blocks.numel()
    if len(parts) == 1:
        return parts[0], starts[0], counts[0]
    return torch.cat(parts), torch.cat(starts, dim=1), torch.cat(counts, dim=1)


# --- the GPU kernel's share and cost -------------------------------------------------------------------


def add_to_plan(writer, heads: list[int], indices: list[BlockSparseIndex]) -> None:
    writer.set_blocks(heads, indices)


def computed_pairs(index: BlockSparseIndex, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] tile pairs, [batch] gathered-column pairs) the kernel multiplies: 64 x 64 per listed tile."""
    tiles = index.count.sum(dim=1, dtype=torch.int64).cpu()
    return tiles * BLOCK * BLOCK, torch.zeros_like(tiles)


def recall(index: BlockSparseIndex, stats, head: int, rows: str = "all") -> float:
    """Dense mass on the kept set from blockwise statistics (:mod:`sparse_prefill.search.stats`)."""
    first_block, n_rows, _, _ = stats.rows(rows)
    tiles = index.block_mask()[0].to(stats.block_mass.device)  # [n_blocks, n_blocks]
    return float((stats.block_mass[head, first_block:] * tiles[first_block:]).sum() / n_rows)
