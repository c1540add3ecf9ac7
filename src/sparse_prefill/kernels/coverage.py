"""Block-Coverage estimation on the GPU: antidiagonal tile masses and the coverage selection.

The definition is :mod:`sparse_prefill.kinds.block_coverage`; these kernels compute the same
quantities without ever holding the ``(seq / stride)^2`` scores:

1. ``_antidiagonal_block_lse``: query groups against key groups, walked as ``stride`` products of
   ``head_dim`` (one per antidiagonal step), reduced on the fly, for both estimates (the mean
   logit, and the largest logit), to one log-sum-exp per (query group, 64-key block), plus
   each query group's log-sum-exp over all its key groups (online, as in flash attention). Base 2.
2. ``_tile_mass``: per (query block, key block), the sum over the block's query groups of
   ``exp2(block_lse - row_lse)``, averaged over the two estimates: the tile's estimated mass.
3. ``_coverage_threshold``: per query block, the threshold of the coverage rule, found exactly by
   bisection on the bits of a non-negative float32 (their order is the order of the values).
4. ``_write_blocks``: the kept blocks of each query block, ascending, packed one list after another.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..kinds.common import BLOCK
from .row_ranges import row_ranges
from .tma import descriptor, tma_loadable

LOG2E = 1.4426950408889634  # 1/ln(2)
# Room for every causal tile, where it takes at most this: the lists' buffer is then allocated
# without reading the counts back, and the host never waits for the GPU in the middle of a plan
# (it idled the GPU for ~1 ms at 128K while the rest of the plan was queued).
WIDE_LISTS_BYTES = 256 * 2**20


def _score_configs() -> list[triton.Config]:
    """Tiles of query groups x key groups: it is a GEMM with an inner dimension of stride x head_dim,
    and larger tiles re-read Q and K fewer times."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter ignores warps and stages: one config
        return [triton.Config({"GROUPS_M": 64, "GROUPS_N": 64}, num_warps=4, num_stages=1, pre_hook=_size_group_blocks)]
    # The four fastest of 27 tile x warps x depth configurations at 128K (SmolLM2's 9 heads, stride
    # 32; H200, 2026-12-01): 64 x 256 with 8 warps 1.65 ms, then 64 x 128 (8 or 4 warps) and
    # 128 x 128 at 1.89-2.05 ms, all 3 deep; 2-deep pipelines, 64-wide tiles and 128 x 64 took
    # 2.4-3.9 ms. Each configuration costs a compile on first use (~5 s), so only these are tried.
    shapes = [(64, 128, 4), (64, 128, 8), (128, 128, 8), (64, 256, 8)]
    return [triton.Config({"GROUPS_M": m, "GROUPS_N": n}, num_warps=w, num_stages=s, pre_hook=_size_group_blocks)
            for m, n, w in shapes for s in (3, 4)]


def _size_group_blocks(args: dict) -> None:
    """Each configuration's tile sets the descriptors' block (the autotuner calls this before a launch)."""
    if args["TMA"]:
        dim = args["QDesc"].block_shape[-1]
        args["QDesc"].block_shape = [1, 1, args["GROUPS_M"], 1, dim]
        args["KDesc"].block_shape = [1, 1, args["GROUPS_N"], 1, dim]


def _prune_wide_heads(configs: list[triton.Config], named_args: dict, **constexprs) -> list[triton.Config]:
    """At head_dim 256 (Gemma 3) the 128 x 128 tiles and 4-deep pipelines spill or exceed shared
    memory, yet each still takes seconds to compile: autotuning twelve took over 100 s on an H200.
    Keep the tiles with at most 64 x 128 groups and pipelines at most 3 deep there."""
    if constexprs.get("HEAD_DIM_PADDED", 0) < 256:
        return configs
    narrow = [c for c in configs if c.kwargs["GROUPS_M"] * c.kwargs["GROUPS_N"] <= 64 * 128 and c.num_stages <= 3]
    return narrow or configs[:1]


@triton.jit
def _store_block_lse(scores, row_m, row_l, block_lse, lse_at, store_mask,
                     GROUPS_M: tl.constexpr, BLOCKS_N: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Store one log-sum-exp per (query group, 64-key block) of ``scores`` (base 2, -inf where
    masked) and fold the chunk into each row's running log-sum-exp (row_m, row_l)."""
    blocks = tl.reshape(scores, [GROUPS_M, BLOCKS_N, PER_BLOCK])
    b_max = tl.max(blocks, axis=2)
    b_safe = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_sum = tl.sum(tl.math.exp2(blocks - b_safe[:, :, None]), axis=2)
    tl.store(block_lse + lse_at, b_safe + tl.log2(b_sum), mask=store_mask)
    new_m = tl.maximum(row_m, tl.max(b_max, 1))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    row_l = row_l * tl.math.exp2(row_m - safe_m) + tl.sum(b_sum * tl.math.exp2(b_safe - safe_m[:, None]), 1)
    return new_m, row_l


@triton.autotune(configs=_score_configs(), key=["STRIDE", "HEAD_DIM_PADDED", "TMA"],
                 prune_configs_by={"early_config_prune": _prune_wide_heads})
@triton.jit
def _antidiagonal_block_lse(
    Q, K, QDesc, KDesc, heads, block_lse, row_lse,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    seq, q_len, first_group, n_groups, n_blocks, n_selected, group, log2_scale,
    STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    GROUPS_M: tl.constexpr, GROUPS_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """block_lse [2, rows, n_groups, n_blocks] and row_lse [2, rows, n_groups], base 2: [0] of the
    mean antidiagonal logit, [1] of the largest antidiagonal logit. Query group ``a`` of ``Q``
    (``q_len`` rows) is the sequence's group ``first_group + a``; keys run over ``seq``."""
    # The last query groups have the most key groups (causal): start them first to shorten the tail.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // n_selected
    q_head = tl.load(heads + bh % n_selected)
    kv_head = q_head // group
    rows = pid * GROUPS_M + tl.arange(0, GROUPS_M)  # query groups
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    q_base = Q + batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    PER_BLOCK: tl.constexpr = 64 // STRIDE  # groups per 64-token block
    BLOCKS_N: tl.constexpr = GROUPS_N // PER_BLOCK  # key blocks per step
    estimate_stride = (tl.num_programs(1) * n_groups).to(tl.int64)  # between the two estimates
    mean_m = tl.full([GROUPS_M], float("-inf"), dtype=tl.float32)
    mean_l = tl.zeros([GROUPS_M], dtype=tl.float32)
    peak_m = tl.full([GROUPS_M], float("-inf"), dtype=tl.float32)
    peak_l = tl.zeros([GROUPS_M], dtype=tl.float32)
    last_group = first_group + tl.minimum(pid * GROUPS_M + GROUPS_M, n_groups)  # causal: key groups < this
    out_rows = bh.to(tl.int64) * n_groups + rows
    for start in range(0, last_group, GROUPS_N):
        cols = start + tl.arange(0, GROUPS_N)  # key groups
        logit_sum = tl.zeros([GROUPS_M, GROUPS_N], dtype=tl.float32)
        logit_max = tl.full([GROUPS_M, GROUPS_N], float("-inf"), dtype=tl.float32)
        # Two element-wise operations per product and no reduction inside this loop (the sum of
        # exponentials that the largest logit replaced, reduced at every step, cost 1.6x as much).
        for t in range(STRIDE):
            # Query a*S + t meets key b*S + S-1-t: one antidiagonal of the (a, b) group tile.
            if TMA:  # [batch, heads, groups, STRIDE, dim] views: one (group, step) slab per load
                q = QDesc.load([batch, q_head, pid * GROUPS_M, t, 0]).reshape([GROUPS_M, HEAD_DIM_PADDED])
                k = KDesc.load([batch, kv_head, start, STRIDE - 1 - t, 0]).reshape([GROUPS_N, HEAD_DIM_PADDED])
            else:
                q_pos = rows * STRIDE + t
                k_pos = cols * STRIDE + (STRIDE - 1 - t)
                q = tl.load(q_base + q_pos[:, None].to(tl.int64) * stride_qs + dims[None, :],
                            mask=(q_pos < q_len)[:, None] & dim_ok[None, :], other=0.0)
                k = tl.load(k_base + k_pos[:, None].to(tl.int64) * stride_ks + dims[None, :],
                            mask=(k_pos < seq)[:, None] & dim_ok[None, :], other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            logit_sum += logits
            logit_max = tl.maximum(logit_max, logits)
        causal = cols[None, :] <= first_group + rows[:, None]
        key_blocks = start // PER_BLOCK + tl.arange(0, BLOCKS_N)
        store_mask = (rows < n_groups)[:, None] & (key_blocks < n_blocks)[None, :]
        lse_at = out_rows[:, None] * n_blocks + key_blocks[None, :]
        mean = tl.where(causal, logit_sum * (log2_scale / STRIDE), float("-inf"))
        mean_m, mean_l = _store_block_lse(mean, mean_m, mean_l, block_lse, lse_at, store_mask,
                                          GROUPS_M, BLOCKS_N, PER_BLOCK)
        peak = tl.where(causal, logit_max * log2_scale, float("-inf"))
        peak_m, peak_l = _store_block_lse(peak, peak_m, peak_l, block_lse + estimate_stride * n_blocks, lse_at,
                                          store_mask, GROUPS_M, BLOCKS_N, PER_BLOCK)
    tl.store(row_lse + out_rows, mean_m + tl.log2(mean_l), mask=rows < n_groups)
    tl.store(row_lse + estimate_stride + out_rows, peak_m + tl.log2(peak_l), mask=rows < n_groups)


@triton.jit
def _tile_mass(
    block_lse, row_lse, mass, seq, first_block, first_row, n_groups, n_rows, n_blocks, estimate_stride,
    STRIDE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """mass[row, r, c]: the mean of the two estimates' softmax mass of tile (m, c), summed over the
    query groups of block m = first_block + r; this launch's rows r start at ``first_row``."""
    r = first_row + tl.program_id(0)
    m = first_block + r
    bh = tl.program_id(1).to(tl.int64)
    PER_BLOCK: tl.constexpr = 64 // STRIDE
    for start in range(0, m + 1, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for g in tl.static_range(PER_BLOCK):
            a = r * PER_BLOCK + g
            for e in tl.static_range(2):
                row = e * estimate_stride + bh * n_groups + a
                lse = tl.load(block_lse + row * n_blocks + c, mask=c <= m, other=float("-inf"))
                share = tl.math.exp2(lse - tl.load(row_lse + row))
                # A group of padding only (past the sequence) holds no query: it adds nothing.
                acc += tl.where((m * PER_BLOCK + g) * STRIDE < seq, 0.5 * share, 0.0)
        tl.store(mass + (bh * n_rows + r) * n_blocks + c, acc, mask=c < n_blocks)


@triton.jit
def _free_sum_above(row, m, threshold, BLOCK_C: tl.constexpr):
    """Sum of the free masses (0 < c < m) that are >= threshold, over the row in chunks."""
    total = tl.zeros([], dtype=tl.float32)
    for start in range(0, m, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        x = tl.load(row + c, mask=c < m, other=0.0)
        total += tl.sum(tl.where((c > 0) & (c < m) & (x >= threshold), x, 0.0))
    return total


@triton.jit
def _coverage_threshold(
    mass, coverage, thresholds, counts, first_block, first_row, n_rows, n_blocks,
    BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    r = first_row + tl.program_id(0)
    m = first_block + r  # the query block: its causal key blocks are 0 .. m
    bh = tl.program_id(1)
    row = mass + (bh.to(tl.int64) * n_rows + r) * n_blocks
    total = tl.zeros([], dtype=tl.float32)
    forced = tl.zeros([], dtype=tl.float32)
    for start in range(0, m + 1, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        x = tl.load(row + c, mask=c <= m, other=0.0)
        total += tl.sum(x)
        forced += tl.sum(tl.where((c == 0) | (c == m), x, 0.0))
    needed = tl.load(coverage + bh) * total - forced
    # Largest t (as float32 bits, whose integer order is the value order for t >= 0) such that the
    # free masses >= t reach `needed`; t = 0 keeps every free block, so `lo` always qualifies.
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.full([], 0x7F800000, dtype=tl.int32)  # +inf: never qualifies while needed > 0
    if ONE_CHUNK:
        # The whole row (every row up to 128K tokens) stays in registers through the 31 passes:
        # reading it again from the cache at every pass was most of this kernel's time.
        c = tl.arange(0, BLOCK_C)
        free = tl.load(row + c, mask=(c > 0) & (c < m), other=0.0)  # non-free blocks add 0 at any t
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            if mid > lo:
                t = mid.to(tl.float32, bitcast=True)
                if tl.sum(tl.where(free >= t, free, 0.0)) >= needed:
                    lo = mid
                else:
                    hi = mid
    else:
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            if mid > lo:
                t = mid.to(tl.float32, bitcast=True)
                if _free_sum_above(row, m, t, BLOCK_C) >= needed:
                    lo = mid
                else:
                    hi = mid
    threshold = tl.where(needed <= 0, float("inf"), lo.to(tl.float32, bitcast=True))
    kept = tl.zeros([], dtype=tl.int32)
    for start in range(0, m + 1, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        x = tl.load(row + c, mask=c <= m, other=0.0)
        keep = (c <= m) & ((c == 0) | (c == m) | (x >= threshold))
        kept += tl.sum(keep.to(tl.int32))
    tl.store(thresholds + bh.to(tl.int64) * n_rows + r, threshold)
    tl.store(counts + bh.to(tl.int64) * n_rows + r, kept)


@triton.jit
def _write_blocks(mass, thresholds, start, blocks, first_block, first_row, n_rows, n_blocks, BLOCK_C: tl.constexpr):
    r = first_row + tl.program_id(0)
    m = first_block + r
    bh = tl.program_id(1).to(tl.int64)
    row = mass + (bh * n_rows + r) * n_blocks
    threshold = tl.load(thresholds + bh * n_rows + r)
    out = blocks + tl.load(start + bh * n_rows + r)
    written = tl.zeros([], dtype=tl.int32)
    for begin in range(0, m + 1, BLOCK_C):
        c = begin + tl.arange(0, BLOCK_C)
        x = tl.load(row + c, mask=c <= m, other=0.0)
        keep = (c <= m) & ((c == 0) | (c == m) | (x >= threshold))
        slot = written + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, c, mask=keep)
        written += tl.sum(keep.to(tl.int32))


def _group_views_fit_tma(q: torch.Tensor, k: torch.Tensor, stride: int, head_dim_padded: int) -> bool:
    """Whether Q and K load through descriptors of their [batch, heads, groups, stride, dim] views:
    whole groups only (a partial last group would read past the tensor), a head filling its tile,
    and TMA's 16-byte alignment. Otherwise the scoring pass loads masked rows through pointers."""
    if q.shape[-1] != head_dim_padded or q.shape[2] % stride or k.shape[2] % stride:
        return False
    return tma_loadable(q) and tma_loadable(k)


def _group_descriptor(tensor: torch.Tensor, stride: int):
    """``tensor`` as [batch, heads, groups, stride, dim]; a block is the (group, step) slab the scoring
    pass multiplies, its tile's groups at one antidiagonal step (their count set by _size_group_blocks)."""
    batch, heads, length, dim = tensor.shape
    sb, sh, ss, _ = tensor.stride()
    return descriptor(tensor, [batch, heads, length // stride, stride, dim], [sb, sh, ss * stride, ss, 1],
                      [1, 1, 16, 1, dim])


def antidiagonal_tile_mass(q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, stride: int, scale: float,
                           first_block: int = 0) -> torch.Tensor:
    """Tile masses of the query heads ``heads`` (long [n]), as :func:`~sparse_prefill.kinds.block_coverage.tile_mass`.

    q : [batch, q_heads, q_len, head_dim], the queries of query blocks ``first_block ..`` (positions
    ``64 * first_block`` on); k : [batch, kv_heads, seq, head_dim]; last dimensions contiguous.
    Returns float32 [batch * n, n_rows, n_blocks], row ``r`` for query block ``first_block + r``;
    entries above the diagonal are unspecified.
    """
    batch, q_heads, q_len, head_dim = q.shape
    seq = k.shape[2]
    n = heads.numel()
    n_blocks = -(-seq // BLOCK)
    n_rows = n_blocks - first_block
    n_groups = n_rows * BLOCK // stride  # query groups
    block_lse = torch.empty(2, batch * n, n_groups, n_blocks, dtype=torch.float32, device=q.device)
    row_lse = torch.empty(2, batch * n, n_groups, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(n_groups, meta["GROUPS_M"]), batch * n)  # noqa: E731
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    tma = _group_views_fit_tma(q, k, stride, head_dim_padded)
    _antidiagonal_block_lse[grid](
        q, k, *((_group_descriptor(q, stride), _group_descriptor(k, stride)) if tma else (q, k)),
        heads.to(device=q.device, dtype=torch.int32),
        block_lse, row_lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        seq, q_len, first_block * BLOCK // stride, n_groups, n_blocks, n, q_heads // k.shape[1], scale * LOG2E,
        STRIDE=stride, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", TMA=tma,
    )
    mass = torch.empty(batch * n, n_rows, n_blocks, dtype=torch.float32, device=q.device)
    for first_row, end_row, chunk in row_ranges(first_block, n_rows):
        _tile_mass[(end_row - first_row, batch * n)](block_lse, row_lse, mass, seq, first_block, first_row, n_groups,
                                                     n_rows, n_blocks, batch * n * n_groups, STRIDE=stride, BLOCK_C=chunk)
    return mass


def coverage_block_lists(mass: torch.Tensor, coverage: torch.Tensor,
                         first_block: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Block-Coverage rule on the GPU: each row's kept blocks, ascending, packed one list after another.

    mass : float32 [rows, n_rows, n_blocks] (contiguous), row ``r`` for query block ``first_block + r``;
    coverage : float32 [rows] per row of ``mass``.
    Returns ``(blocks, start, count)`` as :class:`~sparse_prefill.kinds.block_sparse.BlockSparseIndex`
    holds them: int32 [n] (n at least the kept total), int64 [rows, n_rows], int32 [rows, n_rows].
    """
    rows, n_rows, n_blocks = mass.shape
    thresholds = torch.empty(rows, n_rows, dtype=torch.float32, device=mass.device)
    count = torch.empty(rows, n_rows, dtype=torch.int32, device=mass.device)
    ranges = row_ranges(first_block, n_rows)
    coverage = coverage.float().contiguous()
    for first_row, end_row, chunk in ranges:
        _coverage_threshold[(end_row - first_row, rows)](mass, coverage, thresholds, count, first_block, first_row,
                                                         n_rows, n_blocks, BLOCK_C=chunk,
                                                         ONE_CHUNK=first_block + end_row <= chunk)
    flat = count.view(-1).cumsum(0)  # int64
    start = (flat - count.view(-1)).view(rows, n_rows)
    causal_tiles = rows * (n_rows * (first_block + 1) + n_rows * (n_rows - 1) // 2)  # every row keeping all it sees
    if causal_tiles * 4 <= WIDE_LISTS_BYTES:
        size = causal_tiles  # room for every causal block: no need to wait for the counts
    else:
        size = int(flat[-1])  # one host synchronisation: the kept total
    blocks = torch.empty(max(size, 1), dtype=torch.int32, device=mass.device)
    for first_row, end_row, chunk in ranges:
        _write_blocks[(end_row - first_row, rows)](mass, thresholds, start, blocks, first_block, first_row, n_rows,
                                                   n_blocks, BLOCK_C=chunk)
    return blocks, start, count
