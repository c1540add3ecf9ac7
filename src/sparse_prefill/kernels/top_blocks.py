"""Block-Sparse's selection on the GPU: each query block's ``top_k`` key blocks, packed as lists.

The definition (:func:`sparse_prefill.kinds.block_sparse.estimate`) ranks each row of pooled
scores with ``topk`` and sorts what it keeps. At 128K tokens that is a ``topk`` over 2048 x 2048
scores per head, then a sort, a mask and the packing, ~1.9 ms of GPU time for SmolLM2's 9 heads:
5-7% of dense cuDNN's time, above the 5% the index may take. Here one program per row finds the
``k``-th largest score by bisection on an order-preserving integer image of the float32 scores (32
passes over the row, held in registers up to 2048 blocks), then writes the kept blocks in ascending
order straight into the packed buffer. Every row keeps exactly ``min(top_k, m + 1)`` blocks, so
where each list starts is known before the launch and the host never waits for the GPU.

Ties at the threshold are broken towards lower key blocks; ``topk`` breaks them in an unspecified
order, so the two agree wherever the scores of a row are distinct (float scores of real inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kinds.common import device_values
from .row_ranges import row_ranges


@triton.jit
def _ordered(x):
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _count_at_least(row, m, threshold, BLOCK_C: tl.constexpr):
    """How many causal entries (0 .. m) of the row have an ordered key >= threshold (int64)."""
    total = tl.zeros([], dtype=tl.int32)
    for start in range(0, m + 1, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        key = _ordered(tl.load(row + c, mask=c <= m, other=0.0)).to(tl.int64)
        total += tl.sum(((c <= m) & (key >= threshold)).to(tl.int32))
    return total


@triton.jit
def _top_blocks(scores, top_k, start, blocks, first_block, first_row, n_rows, n_blocks,
                BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr):
    r = first_row + tl.program_id(0)
    m = first_block + r  # the query block: causal key blocks 0 .. m
    bh = tl.program_id(1).to(tl.int64)
    row = scores + (bh * n_rows + r) * n_blocks
    wanted = tl.minimum(tl.load(top_k + bh), m + 1)
    # Largest key T with at least `wanted` causal keys >= T: lo always qualifies (every causal key
    # is >= the smallest int32), hi never does (no int32 reaches it).
    lo = tl.full([], -(2**31), dtype=tl.int64)
    hi = tl.full([], 2**31, dtype=tl.int64)
    if ONE_CHUNK:
        c = tl.arange(0, BLOCK_C)
        causal = c <= m
        key = _ordered(tl.load(row + c, mask=causal, other=0.0)).to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            if tl.sum((causal & (key >= mid)).to(tl.int32)) >= wanted:
                lo = mid
            else:
                hi = mid
    else:
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            if _count_at_least(row, m, mid, BLOCK_C) >= wanted:
                lo = mid
            else:
                hi = mid
    # Keep every key above T, and of those equal to T the first ones, up to `wanted` in all.
    ties_wanted = wanted - _count_at_least(row, m, lo + 1, BLOCK_C)
    out = blocks + tl.load(start + bh * n_rows + r)
    written = tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    for begin in range(0, m + 1, BLOCK_C):
        c = begin + tl.arange(0, BLOCK_C)
        causal = c <= m
        key = _ordered(tl.load(row + c, mask=causal, other=0.0)).to(tl.int64)
        tie = causal & (key == lo)
        tie_rank = ties + tl.cumsum(tie.to(tl.int32), 0) - 1
        keep = causal & ((key > lo) | (tie & (tie_rank < ties_wanted)))
        slot = written + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, c, mask=keep)
        written += tl.sum(keep.to(tl.int32))
        ties += tl.sum(tie.to(tl.int32))


def _kept_total(top_k: int, first_block: int, n_blocks: int) -> int:
    """Sum over query blocks m = first_block .. n_blocks - 1 of min(top_k, m + 1)."""
    low, high = first_block + 1, n_blocks  # the rows' causal counts m + 1
    if high < low:
        return 0
    if top_k >= high:
        return (low + high) * (high - low + 1) // 2
    if top_k < low:
        return top_k * (high - low + 1)
    return (low + top_k) * (top_k - low + 1) // 2 + top_k * (high - top_k)


def top_block_lists(scores: torch.Tensor, top_k: list[int], first_block: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's ``min(top_k, m + 1)`` best key blocks, ascending, packed one list after another.

    scores : float32 [rows, n_rows, n_blocks] (contiguous), row ``r`` for query block
        ``m = first_block + r``; entries past the diagonal are ignored (causal blocks 0 .. m only).
    top_k : one budget per row of ``scores`` (a Python list: the lists' sizes follow from it alone).
    Returns ``(blocks, start, count)`` as :class:`~sparse_prefill.kinds.block_sparse.BlockSparseIndex`
    holds them: int32 [n], int64 [rows, n_rows], int32 [rows, n_rows].
    """
    rows, n_rows, n_blocks = scores.shape
    if len(top_k) != rows:
        raise ValueError(f"top_block_lists needs one top_k per row of scores ({rows}), got {len(top_k)}")
    device = scores.device
    causal = first_block + 1 + torch.arange(n_rows, device=device)  # m + 1
    budgets = device_values(top_k, device)  # made once per list: a copy from host memory waits for the GPU
    count = torch.minimum(budgets[:, None], causal[None, :]).to(torch.int32)
    flat = count.view(-1).cumsum(0)
    start = (flat - count.view(-1)).view(rows, n_rows)
    size = sum(_kept_total(k, first_block, n_blocks) for k in top_k)
    blocks = torch.empty(max(size, 1), dtype=torch.int32, device=device)
    for first_row, end_row, chunk in row_ranges(first_block, n_rows):
        _top_blocks[(end_row - first_row, rows)](scores, budgets, start, blocks, first_block, first_row, n_rows,
                                                 n_blocks, BLOCK_C=chunk, ONE_CHUNK=first_block + end_row <= chunk)
    return blocks, start, count
