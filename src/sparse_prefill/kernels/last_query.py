"""The last queries' attention statistics on the GPU: Vertical-Slash's estimator pass.

The last ``n_last`` queries of some heads attend to all keys; Vertical-Slash needs, per head, the
column sums of that attention and, per query row, its sum over each 64-key block (SnapKV's window
scores are the same column sums over fewer rows). Two Triton passes over K produce exactly those,
and never hold the ``n_last x seq`` probabilities in memory (the definition, in PyTorch:
:func:`sparse_prefill.kinds.vertical_slash.last_query_statistics`):

1. ``_row_statistics``: per row, the running max and sum of ``exp`` over a chunk of keys
   (split over chunks so that long sequences fill the GPU); combined in PyTorch.
2. ``_column_and_block_sums``: with the final max and sum, every (head, 64-key tile) program
   forms the probabilities of its tile and writes their column sums and their per-row sums.

Outputs are ``[bh, seq]`` column scores and ``[bh, n_rows, n_tiles]`` row-block sums, about
1/64 of the probabilities' size; ``bh`` runs over the batch and the selected query heads.

3. ``_diagonal_scores``: once the columns are chosen, each head's block-diagonal scores, what the
   chosen columns leave of the last rows' attention on every block diagonal (the definition:
   :func:`sparse_prefill.kinds.vertical_slash.diagonal_scores`), in one launch: the same in PyTorch
   took ~40 small operations, and at SmolLM2's size the estimator is bound by the host issuing them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # 1/ln(2)
TILE = 64  # keys per tile: the block-diagonal unit


@triton.jit
def _last_queries(Q, stride_qb, stride_qh, stride_qs, batch, head, seq, q_start, n_rows, first_used,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The last ``n_rows`` queries of a head (row r at position seq - n_rows + r; Q holds positions
    q_start ..), zeros for rows before ``first_used``: (q [BLOCK_Q, HEAD_DIM_PADDED], positions, row_ok)."""
    rows = tl.arange(0, BLOCK_Q)
    positions = seq - n_rows + rows
    row_ok = (rows < n_rows) & (positions >= q_start) & (rows >= first_used)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                + (positions - q_start)[:, None].to(tl.int64) * stride_qs + dims[None, :],
                mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    return q, positions, row_ok


@triton.jit
def _row_statistics(
    Q, K, heads, row_max, row_sum,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    seq, q_start, n_selected, group, n_rows, tiles_per_chunk, n_chunks, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
    TILE: tl.constexpr,
):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // n_selected
    head = tl.load(heads + bh % n_selected)
    rows = tl.arange(0, BLOCK_Q)
    q, positions, row_ok = _last_queries(Q, stride_qb, stride_qh, stride_qs, batch, head, seq, q_start, n_rows, 0,
                                         HEAD_DIM, HEAD_DIM_PADDED, BLOCK_Q)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    k_base = K + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for tile in range(chunk * tiles_per_chunk, tl.minimum((chunk + 1) * tiles_per_chunk, tl.cdiv(seq, TILE))):
        keys = tile * TILE + tl.arange(0, TILE)
        key_ok = keys < seq
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_ks + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((keys[None, :] <= positions[:, None]) & key_ok[None, :] & row_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    out = (bh.to(tl.int64) * BLOCK_Q + rows) * n_chunks + chunk
    tl.store(row_max + out, m_i)
    tl.store(row_sum + out, l_i)


@triton.jit
def _column_and_block_sums(
    Q, K, heads, row_max, row_sum, own_rows, column_scores, block_sums,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    seq, q_start, n_selected, group, n_rows, n_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
    TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // n_selected
    head = tl.load(heads + bh % n_selected)
    rows = tl.arange(0, BLOCK_Q)
    # A head with a smaller last_q uses only its own last rows.
    q, positions, row_ok = _last_queries(Q, stride_qb, stride_qh, stride_qs, batch, head, seq, q_start, n_rows,
                                         n_rows - tl.load(own_rows + bh), HEAD_DIM, HEAD_DIM_PADDED, BLOCK_Q)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    keys = tile * TILE + tl.arange(0, TILE)
    key_ok = keys < seq
    k = tl.load(K + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh
                + keys[:, None].to(tl.int64) * stride_ks + dims[None, :],
                mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    keep = (keys[None, :] <= positions[:, None]) & key_ok[None, :] & row_ok[:, None]
    stats = bh.to(tl.int64) * BLOCK_Q + rows
    m = tl.load(row_max + stats)
    l = tl.load(row_sum + stats)
    p = tl.where(keep, tl.math.exp2(s - tl.where(row_ok, m, 0.0)[:, None]) / tl.where(row_ok, l, 1.0)[:, None], 0.0)
    tl.store(column_scores + bh.to(tl.int64) * seq + keys, tl.sum(p, 0), mask=key_ok)
    tl.store(block_sums + (bh.to(tl.int64) * BLOCK_Q + rows) * n_tiles + tile, tl.sum(p, 1))


def last_query_scores(
    q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, own_rows: torch.Tensor, n_rows: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column scores and row-block sums of the last-query attention of the query heads ``heads``.

    Parameters
    ----------
    q : [batch, q_heads, q_len, head_dim], the last q_len positions; k : [batch, kv_heads, seq, head_dim]
    heads : long [n]
        The query heads to score; ``bh`` below runs over ``batch * n`` (batch-major).
    own_rows : int32 [batch * n]
        How many of the last ``n_rows`` queries each head uses (its ``min(last_q, seq)``).
    n_rows : int
        The largest ``own_rows``.

    Returns
    -------
    column_scores : float32 [batch * n, seq]
    block_sums : float32 [batch * n, n_rows, n_tiles]; row ``r`` is the query at position ``seq - n_rows + r``
    row_max, row_sum : float32 [batch * n, n_rows]  base-2 softmax statistics of each row
    """
    batch, q_heads, _, head_dim = q.shape
    seq = k.shape[2]  # keys; q holds the last q.shape[2] positions
    n = heads.numel()
    bh = batch * n
    block_q = max(16, triton.next_power_of_2(n_rows))
    n_tiles = triton.cdiv(seq, TILE)
    n_chunks = min(n_tiles, max(1, 4096 // bh))  # enough programs to fill the GPU
    tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    common = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)), BLOCK_Q=block_q,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", TILE=TILE,
    )
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    group = q_heads // k.shape[1]
    heads = heads.to(device=q.device, dtype=torch.int32)
    partial_max = torch.empty(bh, block_q, n_chunks, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    _row_statistics[(n_chunks, bh)](
        q, k, heads, partial_max, partial_sum, *strides, seq, seq - q.shape[2], n, group, n_rows, tiles_per_chunk, n_chunks,
        scale * LOG2E, **common,
    )
    row_max = partial_max.amax(dim=2)
    safe = torch.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = (partial_sum * torch.exp2(partial_max - safe[:, :, None])).sum(dim=2)
    column_scores = torch.empty(bh, seq, dtype=torch.float32, device=q.device)
    block_sums = torch.empty(bh, block_q, n_tiles, dtype=torch.float32, device=q.device)
    _column_and_block_sums[(n_tiles, bh)](
        q, k, heads, row_max.contiguous(), row_sum.contiguous(), own_rows, column_scores, block_sums, *strides,
        seq, seq - q.shape[2], n, group, n_rows, n_tiles, scale * LOG2E, **common,
    )
    return column_scores, block_sums[:, :n_rows], row_max[:, :n_rows], row_sum[:, :n_rows]


@triton.jit
def _diagonal_scores(
    Q, K, heads, columns, counts, block_sums, row_max, row_sum, row_used, scores,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_cr, stride_br, stride_bq, stride_sr, stride_ur,
    seq, q_start, n_selected, group, n_rows, n_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
    TILE: tl.constexpr, ROW_BLOCKS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """scores[bh, d]: the used last rows' attention on block diagonal ``d`` (their block sums on key
    block ``row's block - d``), less the chosen columns' share of it (``columns[bh, :counts[bh]]``)."""
    bh = tl.program_id(0)
    bh64 = bh.to(tl.int64)
    batch = bh // n_selected
    head = tl.load(heads + bh % n_selected)
    rows = tl.arange(0, BLOCK_Q)
    in_rows = rows < n_rows
    positions = seq - n_rows + rows
    row_block = positions // TILE
    out = scores + bh64 * n_tiles
    # 1. Block sums along each diagonal (rows not used by the head hold zeros there).
    for first in range(0, n_tiles, BLOCK_D):
        d = first + tl.arange(0, BLOCK_D)
        key_block = row_block[:, None] - d[None, :]
        ok = in_rows[:, None] & (key_block >= 0) & (d < n_tiles)[None, :]
        sums = tl.load(block_sums + bh64 * stride_br + rows[:, None] * stride_bq + key_block, mask=ok, other=0.0)
        tl.store(out + d, tl.sum(sums, 0), mask=d < n_tiles)
    tl.debug_barrier()  # the stores above land before this program's atomics below
    # 2. Less the chosen columns' attention, recomputed for those keys only and added to the diagonal
    #    of each row block the last rows span (at most ROW_BLOCKS of them).
    used = tl.load(row_used + bh64 * stride_ur + rows, mask=in_rows, other=0) != 0
    q, _, _ = _last_queries(Q, stride_qb, stride_qh, stride_qs, batch, head, seq, q_start, n_rows, 0,
                            HEAD_DIM, HEAD_DIM_PADDED, BLOCK_Q)
    m = tl.load(row_max + bh64 * stride_sr + rows, mask=in_rows, other=0.0)
    l = tl.load(row_sum + bh64 * stride_sr + rows, mask=in_rows & used, other=1.0)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    k_base = K + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh
    n_columns = tl.load(counts + bh)
    first_row_block = (seq - n_rows) // TILE
    for first in range(0, n_columns, TILE):
        slot = first + tl.arange(0, TILE)
        listed = slot < n_columns
        cols = tl.load(columns + bh64 * stride_cr + slot, mask=listed, other=0)
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + dims[None, :],
                    mask=listed[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = used[:, None] & listed[None, :] & (cols[None, :] <= positions[:, None])
        p = tl.where(keep, tl.math.exp2(s - m[:, None]) / l[:, None], 0.0)
        for j in tl.static_range(ROW_BLOCKS):
            block = first_row_block + j
            share = tl.sum(tl.where((row_block == block)[:, None], p, 0.0), 0)
            diagonal = block - cols // TILE
            tl.atomic_add(out + diagonal, -share, mask=listed & (diagonal >= 0) & (share != 0.0))


def diagonal_scores(q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, columns: torch.Tensor, counts: torch.Tensor,
                    block_sums: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, row_used: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """float32 [bh, n_tiles]: :func:`sparse_prefill.kinds.vertical_slash.diagonal_scores` in one launch.

    q, k as for :func:`last_query_scores`; ``heads`` long [n]; ``columns`` [bh, V] key positions,
    of which each row's first ``counts`` [bh] count; the statistics as ``last_query_scores`` returns
    them (``n_rows`` last rows) and ``row_used`` bool [bh, n_rows]. Rows of ``columns`` and of the
    statistics may be strided; their last dimension must be contiguous.
    """
    batch, q_heads, _, head_dim = q.shape
    seq = k.shape[2]
    bh, n_rows, n_tiles = block_sums.shape
    block_q = max(16, triton.next_power_of_2(n_rows))
    scores = torch.empty(bh, n_tiles, dtype=torch.float32, device=q.device)
    used = row_used.view(torch.int8) if row_used.dtype == torch.bool else row_used
    if row_sum.stride() != row_max.stride() or columns.stride(-1) != 1 or block_sums.stride(-1) != 1:
        raise ValueError("diagonal_scores needs row_max and row_sum laid out alike and columns and block_sums contiguous "
                         f"in their last dimension, got strides {row_max.stride()}, {row_sum.stride()}, "
                         f"{columns.stride()}, {block_sums.stride()}")
    _diagonal_scores[(bh,)](
        q, k, heads, columns, counts, block_sums, row_max, row_sum, used, scores,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        columns.stride(0), block_sums.stride(0), block_sums.stride(1), row_max.stride(0), used.stride(0),
        seq, seq - q.shape[2], heads.numel(), q_heads // k.shape[1], n_rows, n_tiles, scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)), BLOCK_Q=block_q,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", TILE=TILE, ROW_BLOCKS=triton.cdiv(block_q, TILE) + 1,
        BLOCK_D=128,
    )
    return scores
