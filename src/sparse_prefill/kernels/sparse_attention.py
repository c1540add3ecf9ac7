"""Sparse flash-attention forward over a :class:`~sparse_prefill.kernels.plan.SparsePlan`.

One launch per layer: the grid is (query block, batch x query head); every program walks its
head's block diagonals, its own Block-Sparse key blocks, then its head's gathered columns, with an
online softmax in base 2. Heads of different patterns share the launch. K/V are read through the
query head's KV head (GQA without repetition). Sequences of different lengths (a padded batch, or
packed sequences) share one launch too (``VARLEN``: a plan from ``combine_plans``); a plan of one
sequence compiles that path out.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..kinds.common import device_values
from .plan import BLOCK, SparsePlan
from .tma import descriptor, tma_loadable

__all__ = ["MAX_HEAD_DIM", "run_plan"]

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E)
# Widest head the kernels hold in registers (a 64 x 256 query tile and its accumulator); wider
# heads would spill or fail to compile, so they are refused before any work.
MAX_HEAD_DIM = 256
# Triton's autotuner times every configuration about eight times on the first launch of each key,
# and the key holds no length: a first prompt of 1M tokens whose launch takes seconds would spend
# minutes there (six configurations; the planted 1M default, ~20 s a launch, did not get through
# them in 300 s). So the first launch of a key over more query blocks than this is preceded by a
# launch over its last TUNING_BLOCKS only (the grid starts with the last, heaviest, query blocks):
# the autotuner chooses there, and the whole launch reuses its choice and rewrites those rows.
TUNING_BLOCKS = 128
_tuned: set[tuple] = set()  # the keys (device, dtype, loops compiled in, ...) already autotuned


@triton.jit
def _tile_update(acc, m_i, l_i, q, k, v, qk_scale, keep, MASKED: tl.constexpr):
    """Fold one tile of keys into the running softmax: acc [M, D], m_i/l_i [M], k/v [N, D].

    Unmasked tiles (every pair kept: the interior of a kept set) skip the mask and the -inf
    guards: at head_dim 64 the elementwise work, not the matrix products, bounds the kernel.
    """
    s = tl.dot(q, tl.trans(k))  # [M, N]
    if MASKED:
        s = tl.where(keep, s * qk_scale, float("-inf"))  # base-2 logits
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing kept yet keep m = -inf; subtracting a finite stand-in avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # finite: every key of the tile is kept
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _load_kv(k_base, v_base, keys, stride_ks, stride_vs, dims, dim_ok, key_ok, MASK_KEYS: tl.constexpr):
    """K and V rows ``keys`` [N] of one head: [N, D] each; with ``MASK_KEYS``, zeros where
    ``key_ok`` is false (interior tiles lie inside the sequence and load unmasked rows)."""
    if MASK_KEYS:
        ok = key_ok[:, None] & dim_ok[None, :]
    else:
        ok = dim_ok[None, :]
    k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_ks + dims[None, :], mask=ok, other=0.0)
    v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vs + dims[None, :], mask=ok, other=0.0)
    return k, v


@triton.jit
def _load_key_block(k_base, v_base, k_desc, v_desc, batch, kv_head, first_key, offs_n, stride_ks, stride_vs, dims,
                    dim_ok, seq, MASK_KEYS: tl.constexpr, TMA: tl.constexpr):
    """K and V of the 64 keys from ``first_key`` on: through the tensor descriptors (TMA: rows past
    the sequence read as zeros), or as :func:`_load_kv` rows (masked past ``seq`` with ``MASK_KEYS``)."""
    if TMA:
        shape: tl.constexpr = [offs_n.shape[0], dims.shape[0]]
        k = k_desc.load([batch, kv_head, first_key, 0]).reshape(shape)
        v = v_desc.load([batch, kv_head, first_key, 0]).reshape(shape)
    else:
        keys = first_key + offs_n
        k, v = _load_kv(k_base, v_base, keys, stride_ks, stride_vs, dims, dim_ok, keys < seq, MASK_KEYS)
    return k, v


def _configs() -> list[triton.Config]:
    """Warps x pipeline depth; the tile is fixed at 64 x 64 by the plan."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter ignores both: one config
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


@triton.autotune(configs=_configs(),
                 key=["HEAD_DIM_PADDED", "USES_DIAGONALS", "USES_BLOCKS", "USES_COLUMNS", "RETURN_LSE", "VARLEN", "TMA"])
@triton.jit
def _sparse_attention_fwd(
    Q, K, V, KDesc, VDesc, Out, Lse,
    diagonals, diagonal_limit, diagonal_flag, window, sink,
    blocks, block_start, block_count,
    columns, column_before, sequences,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    seq, q_start, q_heads, group, n_blocks, n_rows, max_columns, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USES_DIAGONALS: tl.constexpr, USES_BLOCKS: tl.constexpr, USES_COLUMNS: tl.constexpr, RETURN_LSE: tl.constexpr,
    VARLEN: tl.constexpr, TMA: tl.constexpr,
):
    # Positions: the keys are 0 .. seq - 1, the queries q_start .. seq - 1 (row r of Q is position
    # q_start + r). Query block m covers positions 64 m .. 64 m + 63; a chunk's first block may hold
    # fewer queries (rows before q_start are loaded as zeros and never stored).
    bh = tl.program_id(1)
    batch = bh // q_heads
    head = bh % q_heads
    kv_head = head // group
    bh64 = bh.to(tl.int64)
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    # Last query blocks first: they have the most tiles, and starting them early shortens the tail.
    if VARLEN:
        # Batch element b is sequence b: its keys, first query and rows in Q/K/V/Out come from
        # sequences[b] = (seq, q_start, key_offset, query_offset). The grid covers the sequence with
        # the most query blocks; the other sequences' surplus programs stop here.
        seq = tl.load(sequences + 4 * batch)
        q_start = tl.load(sequences + 4 * batch + 1)
        m = tl.cdiv(seq, BLOCK_M) - 1 - tl.program_id(0)
        if m < q_start // BLOCK_M:
            return
        key_offset = tl.load(sequences + 4 * batch + 2).to(tl.int64)
        query_offset = tl.load(sequences + 4 * batch + 3).to(tl.int64)
        q_base += query_offset * stride_qs
        k_base += key_offset * stride_ks
        v_base += key_offset * stride_vs
        list_rows = n_rows  # the lists are padded to the longest sequence's
    else:
        m = n_blocks - 1 - tl.program_id(0)
        list_rows = n_blocks - q_start // BLOCK_M

    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions
    row_ok = (rows >= q_start) & (rows < seq)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_base + (rows - q_start)[:, None].to(tl.int64) * stride_qs + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    all_kept = tl.full([BLOCK_M, BLOCK_N], 1, dtype=tl.int1)  # the unmasked path ignores it
    # Key blocks before the query block lie wholly inside the sequence and before every row: no
    # bounds or causal masks there; only the diagonal tile needs them. (Loops no head of the layer
    # needs are compiled out: each one left in costs registers, and so occupancy, in all of them.)

    # 1. Block diagonals (Dense, A-shape, Vertical-Slash): key block m - d for each listed d <= m.
    #    Diagonal 0 is always listed first; tiles d >= window // 64 cross an A-shape window's edge.
    if USES_DIAGONALS:
        head_window = tl.load(window + bh64)
        head_sink = tl.load(sink + bh64)
        mask_from = head_window // BLOCK_N
        n_listed = tl.load(diagonal_limit + bh64 * n_blocks + m)
        # Diagonals below mask_from (0 included) are whole tiles; the index is clamped so that the load
        # stays in bounds when mask_from is 0 (tl.where evaluates both sides).
        plain_upto = tl.maximum(tl.minimum(m, mask_from - 1), 0)
        n_plain = tl.where(mask_from > 0, tl.load(diagonal_limit + bh64 * n_blocks + plain_upto), 1)
        diagonal_row = diagonals + bh64 * n_blocks
        for t in range(1, n_plain):
            k, v = _load_key_block(k_base, v_base, KDesc, VDesc, batch, kv_head, (m - tl.load(diagonal_row + t)) * BLOCK_N,
                                   offs_n, stride_ks, stride_vs, dims, dim_ok, seq, False, TMA)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, qk_scale, all_kept, False)
        for t in range(tl.maximum(n_plain, 1), n_listed):
            first_key = (m - tl.load(diagonal_row + t)) * BLOCK_N
            keys = first_key + offs_n
            k, v = _load_key_block(k_base, v_base, KDesc, VDesc, batch, kv_head, first_key, offs_n, stride_ks,
                                   stride_vs, dims, dim_ok, seq, False, TMA)
            keep = (rows[:, None] - keys[None, :] < head_window) | (keys[None, :] < head_sink)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, qk_scale, keep, True)
        if n_listed > 0:  # a head with block lists lists no diagonals
            keys = m * BLOCK_N + offs_n
            key_ok = keys < seq
            k, v = _load_key_block(k_base, v_base, KDesc, VDesc, batch, kv_head, m * BLOCK_N, offs_n, stride_ks,
                                   stride_vs, dims, dim_ok, seq, True, TMA)
            keep = (keys[None, :] <= rows[:, None]) & key_ok[None, :]
            keep &= (rows[:, None] - keys[None, :] < head_window) | (keys[None, :] < head_sink)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, qk_scale, keep, True)

    # 2. Block lists (Block-Sparse, Block-Coverage): ascending, so the diagonal block comes last.
    if USES_BLOCKS:
        list_row = bh64 * list_rows + m - q_start // BLOCK_M  # lists start at the first block
        n_listed = tl.load(block_count + list_row)
        list_base = blocks + tl.load(block_start + list_row)
        for t in range(0, n_listed - 1):
            k, v = _load_key_block(k_base, v_base, KDesc, VDesc, batch, kv_head, tl.load(list_base + t) * BLOCK_N, offs_n,
                                   stride_ks, stride_vs, dims, dim_ok, seq, False, TMA)
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, qk_scale, all_kept, False)
        if n_listed > 0:
            first_key = tl.load(list_base + n_listed - 1) * BLOCK_N
            keys = first_key + offs_n
            key_ok = keys < seq
            k, v = _load_key_block(k_base, v_base, KDesc, VDesc, batch, kv_head, first_key, offs_n, stride_ks,
                                   stride_vs, dims, dim_ok, seq, True, TMA)
            keep = (keys[None, :] <= rows[:, None]) & key_ok[None, :]
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, qk_scale, keep, True)

    # 3. Gathered columns before the query block (those inside it lie on diagonal 0, computed
    #    above), skipped where a kept diagonal tile of this query block already holds them.
    if USES_COLUMNS:
        n_before = tl.load(column_before + bh64 * n_blocks + m)
        for start in range(0, n_before, BLOCK_N):
            slot = start + offs_n
            in_list = slot < n_before
            cols = tl.load(columns + bh64 * max_columns + slot, mask=in_list, other=0)
            covered = tl.load(diagonal_flag + bh64 * (n_blocks + 1) + m - cols // BLOCK_N, mask=in_list, other=1) != 0
            col_ok = in_list & ~covered
            k, v = _load_kv(k_base, v_base, cols, stride_ks, stride_vs, dims, dim_ok, col_ok, True)
            keep = tl.broadcast_to(col_ok[None, :], [BLOCK_M, BLOCK_N])
            acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k, v, qk_scale, keep, True)

    out = acc / l_i[:, None]
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    if VARLEN:
        o_base += query_offset * stride_os
    tl.store(o_base + (rows - q_start)[:, None].to(tl.int64) * stride_os + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    if RETURN_LSE:  # natural log-sum-exp of the row's kept logits: m_i and l_i are base 2
        lse_base = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
        if VARLEN:
            lse_base += query_offset
        tl.store(lse_base + rows - q_start, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)  # x ln 2


def run_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan, scale: float, out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the sparse forward. q [batch, q_heads, q_len, dim] (positions ``plan.q_start ..``),
    k/v [batch, kv_heads, seq, dim] -> out like q.

    A plan of several sequences (``plan.sequences``, from ``combine_plans``) reads sequence ``i``'s
    queries and keys at its rows of batch element ``i`` (a batch stride of 0 makes that one packed
    tensor) and writes only its queries' rows: the others keep what ``out`` (and ``lse``) held.

    ``lse``: float32 [batch, q_heads, q_len] to receive each row's natural log-sum-exp (contiguous in
    its last dimension), or None. The last dimension of q, k, v must be contiguous.
    """
    batch, q_heads, q_len, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    for name, tensor in (("q", q), ("k", k), ("v", v), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got stride {tensor.stride()}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the sparse kernel supports head_dim <= {MAX_HEAD_DIM}, got head_dim={head_dim}")
    if plan.sequences is None:
        if k.shape[2] != plan.seq or k.shape[2] - q_len != plan.q_start:
            raise ValueError(f"the plan is for queries {plan.q_start}..{plan.seq - 1} of {plan.seq} keys, got "
                             f"q_len={q_len} and {k.shape[2]} keys")
    else:
        _check_sequences(plan.sequences, batch, q_len, k.shape[2])
    if lse is not None and (lse.shape != (batch, q_heads, q_len) or lse.dtype != torch.float32 or lse.stride(-1) != 1):
        raise ValueError(f"lse must be a float32 tensor of shape {(batch, q_heads, q_len)}, contiguous in its last "
                         f"dimension, got {lse.dtype} {tuple(lse.shape)} with strides {lse.stride()}")
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    n_blocks, n_rows = plan.diagonal_limit.shape[1], plan.block_count.shape[1]
    # Query blocks with work: n_blocks - first_block for one sequence, the longest's for several.
    grids = [(n_rows, batch * q_heads)]
    varlen = plan.sequences is not None
    tma = _uses_tma(k, v, head_dim, head_dim_padded, varlen)
    # One 64-key block of K and of V per descriptor load (K and V themselves, unused, without TMA).
    kv_blocks = tuple(descriptor(t, list(t.shape), list(t.stride()), [1, 1, BLOCK, head_dim]) for t in (k, v)) \
        if tma else (k, v)
    tuning_key = (q.device, q.dtype, head_dim_padded, plan.uses_diagonals, plan.uses_blocks, plan.uses_columns,
                  lse is not None, varlen, tma)
    if tuning_key not in _tuned:
        _tuned.add(tuning_key)
        if n_rows > TUNING_BLOCKS:  # autotune on the last query blocks first (see TUNING_BLOCKS)
            grids.insert(0, (TUNING_BLOCKS, batch * q_heads))
    for grid in grids:
        _launch(grid, q, k, v, kv_blocks, out, lse, plan, scale, head_dim, head_dim_padded, n_blocks, n_rows, varlen,
                tma)
    return out


def _launch(grid, q, k, v, kv_blocks, out, lse, plan: SparsePlan, scale: float, head_dim: int, head_dim_padded: int,
            n_blocks: int, n_rows: int, varlen: bool, tma: bool) -> None:
    q_heads = q.shape[1]
    _sparse_attention_fwd[grid](
        q, k, v, *kv_blocks, out,
        out if lse is None else lse,  # Lse is never touched unless RETURN_LSE
        plan.diagonals, plan.diagonal_limit, plan.diagonal_flag, plan.window, plan.sink,
        plan.blocks, plan.block_start, plan.block_count,
        plan.columns, plan.column_before,
        device_values(plan.sequences, q.device, torch.int32) if varlen else plan.window,  # read only if VARLEN
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *((lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)),
        plan.seq, plan.q_start, q_heads, q_heads // k.shape[1], n_blocks, n_rows,
        plan.columns.shape[1], scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        USES_DIAGONALS=plan.uses_diagonals, USES_BLOCKS=plan.uses_blocks, USES_COLUMNS=plan.uses_columns,
        RETURN_LSE=lse is not None, VARLEN=varlen, TMA=tma,
    )


def _uses_tma(k: torch.Tensor, v: torch.Tensor, head_dim: int, head_dim_padded: int, varlen: bool) -> bool:
    """Whether the key blocks load through tensor descriptors (TMA on Hopper): a head filling its
    tile exactly, one sequence per batch element, and the addresses and strides TMA accepts (16-byte
    aligned, no broadcast dimension). Gathered columns and packed sequences keep pointer loads.

    Same outputs bit for bit, and faster on an H200 (2026-12-01, planted 128K, share of cuDNN's
    TF/s, pointer loads -> descriptors): head_dim 128 Block-Coverage 64% -> 77%, Block-Sparse 63% ->
    73%, A-shape 66% -> 77%, Vertical-Slash 58% -> 63%; head_dim 64 Block-Coverage 80% -> 91%."""
    return head_dim == head_dim_padded and not varlen and tma_loadable(k) and tma_loadable(v)


def _check_sequences(sequences: tuple[tuple[int, int, int, int], ...], batch: int, q_len: int, kv_len: int) -> None:
    """Every sequence of a several-sequence plan inside its batch element's rows of Q and K."""
    if len(sequences) != batch:
        raise ValueError(f"the plan has {len(sequences)} sequences, one per batch element, got batch={batch}")
    for i, (seq, q_start, key_offset, query_offset) in enumerate(sequences):
        if key_offset + seq > kv_len or query_offset + seq - q_start > q_len:
            raise ValueError(f"sequence {i} (keys {key_offset}..{key_offset + seq - 1}, queries {query_offset}.."
                             f"{query_offset + seq - q_start - 1}) lies outside q_len={q_len}, kv_len={kv_len}")
