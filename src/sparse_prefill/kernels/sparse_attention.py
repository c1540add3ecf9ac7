"""Sparse flash-attention forward over a :class:`~sparse_prefill.kernels.plan.SparsePlan`.

One launch per layer: the grid is (query block, batch x query head); every program walks its
head's block diagonals, its own Block-Sparse key blocks, then its head's gathered columns, with an
online softmax in base 2. Heads of different patterns share the launch. K/V are read through the
query head's KV head (GQA without repetition).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .plan import BLOCK, SparsePlan

__all__ = ["run_plan"]

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E)


@triton.jit
def _tile_update(acc, m_i, l_i, q, k_ptrs, v_ptrs, load_mask, keep, qk_scale):
    """Fold one tile of keys into the running softmax: acc [M, D], m_i/l_i [M], keep [M, N]."""
    k = tl.load(k_ptrs, mask=load_mask, other=0.0)  # [N, D]
    v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [M, N], base-2 logits
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing kept yet keep m = -inf; subtracting a finite stand-in avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


def _configs() -> list[triton.Config]:
    """Warps x pipeline depth; the tile is fixed at 64 x 64 by the plan."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter ignores both: one config
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


@triton.autotune(configs=_configs(), key=["HEAD_DIM_PADDED", "USES_DIAGONALS", "USES_BLOCKS", "USES_COLUMNS"])
@triton.jit
def _sparse_attention_fwd(
    Q, K, V, Out,
    diagonals, diagonal_limit, diagonal_flag,
    blocks, block_count,
    columns, column_count,
    offset_flag, column_flag, mask_from,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    seq, q_heads, group, n_blocks, max_blocks, max_columns, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USES_DIAGONALS: tl.constexpr, USES_BLOCKS: tl.constexpr, USES_COLUMNS: tl.constexpr,
):
    # Last query blocks first: they have the most tiles, and starting them early shortens the tail.
    m = n_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // q_heads
    head = bh % q_heads
    kv_head = head // group
    bh64 = bh.to(tl.int64)

    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    row_ok = rows < seq
    dim_ok = dims < HEAD_DIM
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qs + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    mask_from_d = tl.load(mask_from + bh)

    # 1. Tiles on the head's block diagonals: key block m - d for each diagonal d <= m.
    # (Loops no head of the layer needs are compiled out: each one left in costs registers, and so
    # occupancy, in all of them.)
    if USES_DIAGONALS:
        n_diagonal = tl.load(diagonal_limit + bh64 * n_blocks + m)
        for t in range(0, n_diagonal):
            d = tl.load(diagonals + bh64 * n_blocks + t)
            keys = (m - d) * BLOCK_N + offs_n
            key_ok = keys < seq
            keep = (keys[None, :] <= rows[:, None]) & key_ok[None, :]
            if d >= mask_from_d:
                # Exact kept set inside the tile: a kept offset i - j, or a kept column j.
                distance = tl.maximum(rows[:, None] - keys[None, :], 0)
                on_offset = tl.load(offset_flag + bh64 * seq + distance, mask=keep, other=0) != 0
                on_column = tl.load(column_flag + bh64 * seq + keys, mask=key_ok, other=0) != 0
                keep = keep & (on_offset | on_column[None, :])
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            acc, m_i, l_i = _tile_update(
                acc, m_i, l_i, q,
                k_base + keys[:, None].to(tl.int64) * stride_ks + dims[None, :],
                v_base + keys[:, None].to(tl.int64) * stride_vs + dims[None, :],
                kv_mask, keep, qk_scale,
            )

    # 2. Block-Sparse heads: their own key blocks for this query block.
    if USES_BLOCKS:
        n_listed = tl.load(block_count + bh64 * n_blocks + m)
        for t in range(0, n_listed):
            c = tl.load(blocks + (bh64 * n_blocks + m) * max_blocks + t)
            keys = c * BLOCK_N + offs_n
            key_ok = keys < seq
            keep = (keys[None, :] <= rows[:, None]) & key_ok[None, :]
            acc, m_i, l_i = _tile_update(
                acc, m_i, l_i, q,
                k_base + keys[:, None].to(tl.int64) * stride_ks + dims[None, :],
                v_base + keys[:, None].to(tl.int64) * stride_vs + dims[None, :],
                key_ok[:, None] & dim_ok[None, :], keep, qk_scale,
            )

    # 3. Gathered columns that no diagonal tile of this query block already covers.
    if USES_COLUMNS:
        n_columns = tl.load(column_count + bh64)
        last_row = m * BLOCK_M + BLOCK_M - 1
        for start in range(0, n_columns, BLOCK_N):
            slot = start + offs_n
            cols = tl.load(columns + bh64 * max_columns + slot, mask=slot < n_columns, other=seq)
            col_ok = (cols < seq) & (cols <= last_row)
            block_distance = m - cols // BLOCK_N
            covered = tl.load(diagonal_flag + bh64 * (n_blocks + 1) + tl.minimum(block_distance, n_blocks),
                              mask=col_ok & (block_distance >= 0), other=0) != 0
            col_ok = col_ok & ~covered
            keep = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
            acc, m_i, l_i = _tile_update(
                acc, m_i, l_i, q,
                k_base + cols[:, None].to(tl.int64) * stride_ks + dims[None, :],
                v_base + cols[:, None].to(tl.int64) * stride_vs + dims[None, :],
                col_ok[:, None] & dim_ok[None, :], keep, qk_scale,
            )

    out = acc / l_i[:, None]
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None].to(tl.int64) * stride_os + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def run_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the sparse forward. q [batch, q_heads, seq, dim], k/v [batch, kv_heads, seq, dim] -> out like q.

    The last dimension of q, k, v must be contiguous.
    """
    batch, q_heads, seq, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    for name, tensor in (("q", q), ("k", k), ("v", v), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got stride {tensor.stride()}")
    if head_dim > 256:
        raise ValueError(f"the sparse kernel supports head_dim <= 256, got head_dim={head_dim}")
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    n_blocks = plan.diagonal_limit.shape[1]
    grid = (n_blocks, batch * q_heads)
    _sparse_attention_fwd[grid](
        q, k, v, out,
        plan.diagonals, plan.diagonal_limit, plan.diagonal_flag,
        plan.blocks, plan.block_count,
        plan.columns, plan.column_count,
        plan.offset_flag, plan.column_flag, plan.mask_from,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq, q_heads, q_heads // k.shape[1], n_blocks, plan.blocks.shape[2], plan.columns.shape[1], scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        USES_DIAGONALS=plan.uses_diagonals, USES_BLOCKS=plan.uses_blocks, USES_COLUMNS=plan.uses_columns,
    )
    return out
