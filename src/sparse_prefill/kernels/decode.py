"""Decode attention over selected KV-cache pages: split-K over the pages, then a merge by log-sum-exp.

One decode step of one layer, all heads in one launch (plus a small merge launch). The grid is
(split, batch x KV head): each program takes a contiguous share of its KV head's selected pages
(the "slots" ``split * slots_per_split ..``: slot ``t`` is key ``t % page_size`` of the
``t // page_size``-th selected page), computes the attention of all the group's query heads over
them at once (the group's queries are the rows of one tile: GQA reads each key once, never
repeated) and writes a partial output and its log-sum-exp. ``_merge_splits`` then combines the
partials of every query head. Splitting over the pages is what fills the GPU in decoding: with
one query per head, ``batch x kv_heads`` programs alone would leave most SMs idle.

The selection comes from :func:`sparse_prefill.decoding.select_pages`; the PyTorch definition the
kernel is tested against is :func:`sparse_prefill.decoding.decode_attention_reference`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_HEAD_DIM", "decode_over_pages", "page_bounds", "page_ranking_keys", "split_layout", "top_pages"]

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E)
# ln(2): a base-2 log-sum-exp times LN2 is the natural one. A tl.constexpr, because compiled Triton
# refuses plain Python globals inside a kernel (the interpreter allows them: only the GPU run caught it).
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256  # the query tile and its accumulator are GROUP_PADDED x HEAD_DIM_PADDED registers
BLOCK_N = 64  # keys per tile: eight pages of the default 8 keys
MAX_SPLITS = 256  # the merge holds one row per split of a query head
PROGRAMS_PER_SM = 4  # enough resident programs per SM to hide the latency of the gathered loads


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter ignores both: one config
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (2, 3, 4)]


@triton.autotune(configs=_configs(), key=["GROUP_PADDED", "HEAD_DIM_PADDED", "PAGE_SIZE"])
@triton.jit
def _decode_split(
    Q, K, V, Pages, OutPart, LsePart,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pb, stride_ph,
    kv_heads, n_keys, n_slots, n_splits, slots_per_split, qk_scale,
    GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)  # batch * kv_heads + kv_head
    batch = bh // kv_heads
    kv_head = bh % kv_heads

    heads = tl.arange(0, GROUP_PADDED)  # the group's query heads; rows past GROUP are padding
    head_ok = heads < GROUP
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    q_rows = Q + batch.to(tl.int64) * stride_qb + (kv_head * GROUP + heads)[:, None].to(tl.int64) * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # [GROUP_PADDED, D]
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    page_list = Pages + batch.to(tl.int64) * stride_pb + kv_head.to(tl.int64) * stride_ph

    acc = tl.zeros([GROUP_PADDED, HEAD_DIM_PADDED], dtype=tl.float32)
    m_i = tl.full([GROUP_PADDED], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PADDED], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    begin = split * slots_per_split
    end = tl.minimum(begin + slots_per_split, n_slots)
    for start in range(begin, end, BLOCK_N):
        slots = start + offs_n
        slot_ok = slots < end
        page = tl.load(page_list + slots // PAGE_SIZE, mask=slot_ok, other=0)
        keys = page.to(tl.int64) * PAGE_SIZE + slots % PAGE_SIZE
        key_ok = slot_ok & (keys < n_keys)  # the last page may be partial
        k = tl.load(k_base + keys[:, None] * stride_ks + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vs + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [GROUP_PADDED, BLOCK_N] base-2 logits
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A tile with no real key leaves m = -inf; a finite stand-in avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # Normalised partial outputs (a convex combination merges them) and base-2 log-sum-exps. A split
    # with no real key (one that starts inside the partial last page, when page_size does not divide
    # the split) writes 0 and -inf, which the merge weighs 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = (batch * kv_heads * GROUP + kv_head * GROUP + heads).to(tl.int64) * n_splits + split  # [GROUP_PADDED]
    tl.store(OutPart + rows[:, None] * HEAD_DIM + dims[None, :], acc / l_safe[:, None],
             mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(LsePart + rows, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=head_ok)


@triton.jit
def _merge_splits(
    OutPart, LsePart, Out, Lse,
    stride_ob, stride_oh,
    q_heads, n_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_S: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    row = tl.program_id(0)  # batch * q_heads + head
    batch = row // q_heads
    head = row % q_heads
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < n_splits
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    parts = row.to(tl.int64) * n_splits + splits
    lse = tl.load(LsePart + parts, mask=split_ok, other=float("-inf"))  # base 2
    m = tl.max(lse, 0)  # finite: the first split starts on a page, and every page holds a key
    w = tl.math.exp2(lse - m)
    o = tl.load(OutPart + parts[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + dims, out.to(Out.dtype.element_ty),
             mask=dim_ok)
    if RETURN_LSE:
        tl.store(Lse + row, (m + tl.log2(total)) * LN2)


@triton.jit
def _group_bounds(Q, Min, Max, stride_qb, stride_qh, stride_sb, stride_sh, stride_sp, kv_heads, n_pages, scale,
                  GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_PADDED: tl.constexpr, BLOCK_P: tl.constexpr):
    """The logit bounds [GROUP_PADDED, BLOCK_P] of this program's KV head's query heads on its
    ``BLOCK_P`` pages, with the pages and the batch and KV head they belong to."""
    block = tl.program_id(0)
    bh = tl.program_id(1)  # batch * kv_heads + kv_head
    batch = bh // kv_heads
    kv_head = bh % kv_heads
    heads = tl.arange(0, GROUP_PADDED)
    head_ok = heads < GROUP
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    q_rows = Q + batch.to(tl.int64) * stride_qb + (kv_head * GROUP + heads)[:, None].to(tl.int64) * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # [GROUP_PADDED, D]
    pages = block * BLOCK_P + tl.arange(0, BLOCK_P)
    page_ok = pages < n_pages
    summary = batch.to(tl.int64) * stride_sb + kv_head.to(tl.int64) * stride_sh + pages[:, None].to(tl.int64) * stride_sp
    key_max = tl.load(Max + summary + dims[None, :], mask=page_ok[:, None] & dim_ok[None, :], other=0.0)
    key_min = tl.load(Min + summary + dims[None, :], mask=page_ok[:, None] & dim_ok[None, :], other=0.0)
    # max(q c_min, q c_max) = q+ c_max + q- c_min: two products with exact fp16/bf16 terms and
    # float32 sums, no [pages, head_dim] elementwise temporary.
    q_pos = tl.maximum(q, 0.0).to(key_max.dtype)
    q_neg = tl.minimum(q, 0.0).to(key_min.dtype)
    bound = tl.dot(q_neg, tl.trans(key_min), tl.dot(q_pos, tl.trans(key_max))) * scale  # [GROUP_PADDED, BLOCK_P]
    return bound, pages, batch, kv_head


@triton.jit
def _page_bounds(
    Q, Min, Max, Bounds,
    stride_qb, stride_qh,
    stride_sb, stride_sh, stride_sp,
    kv_heads, n_pages, scale,
    GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bound, pages, batch, kv_head = _group_bounds(Q, Min, Max, stride_qb, stride_qh, stride_sb, stride_sh, stride_sp,
                                                 kv_heads, n_pages, scale, GROUP, GROUP_PADDED, HEAD_DIM,
                                                 HEAD_DIM_PADDED, BLOCK_P)
    heads = tl.arange(0, GROUP_PADDED)
    rows = (batch * kv_heads * GROUP + kv_head * GROUP + heads).to(tl.int64) * n_pages
    tl.store(Bounds + rows[:, None] + pages[None, :], bound, mask=(heads < GROUP)[:, None] & (pages < n_pages)[None, :])


@triton.jit
def _page_ranking_keys(
    Q, Min, Max, Keys,
    stride_qb, stride_qh,
    stride_sb, stride_sh, stride_sp,
    kv_heads, n_pages, first_free, first_local, scale,
    GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """decoding._ranking_key of the group's largest bound, per page, in one pass."""
    bound, pages, batch, kv_head = _group_bounds(Q, Min, Max, stride_qb, stride_qh, stride_sb, stride_sh, stride_sp,
                                                 kv_heads, n_pages, scale, GROUP, GROUP_PADDED, HEAD_DIM,
                                                 HEAD_DIM_PADDED, BLOCK_P)
    heads = tl.arange(0, GROUP_PADDED)
    score = tl.max(tl.where((heads < GROUP)[:, None], bound, float("-inf")), axis=0)  # [BLOCK_P]
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ranks as +0.0
    bits = score.to(tl.int32, bitcast=True)
    # Sign-magnitude to two's-complement order: the int32 order is then the float order.
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    forced = (pages < first_free) | (pages >= first_local)
    ordered = tl.where(forced, 0x7FFFFFFF, ordered)  # decoding.FORCED_ORDER
    key = ordered * 4294967296 + (n_pages - 1 - pages).to(tl.int64)  # << 32; a lower page wins a tie
    row = (batch * kv_heads + kv_head).to(tl.int64) * n_pages
    tl.store(Keys + row + pages, key, mask=pages < n_pages)


# The selection's top-k: a radix select on the ranking keys' high 32 bits (the ordered score), one
# 8-bit digit per launch, then two launches that write the chosen pages in page order (no sort).
# Each row's pages are split over enough programs to fill the GPU: one program per row took 57 us
# against topk + sort's 94 us at 16384 pages, but 568 against 133 at 131072; split, 20 us at 16384
# and 59 at 131072 (8 rows, CUDA-graphed, H200, 2026-12-01).
# Launch d counts, per chunk of pages, digit d of the pages that match the digits chosen so far.
# Every program of launch d + 1 first sums those counts and chooses digit d itself: each makes
# the same choice, so none waits on another program of its launch; chunk 0 records it for later.
# Constexprs: compiled kernels refuse plain globals (the interpreter allows them).
RADIX_DIGITS = 4
RADIX_BINS = tl.constexpr(256)
RADIX_BLOCK = tl.constexpr(1024)  # pages per step of a program's loop over its chunk
CHUNKS_PER_STEP = tl.constexpr(16)  # chunks' counts summed per step


@triton.jit
def _threshold_so_far(Partial, State, row, rows, n_chunks, n_selected, DIGITS_DONE: tl.constexpr):
    """``(prefix, remaining)`` once digits ``0 .. DIGITS_DONE - 1`` are chosen: the threshold's top
    ``8 * DIGITS_DONE`` bits, and how many pages at exactly those bits are still wanted."""
    if DIGITS_DONE == 0:
        prefix = row * 0
        remaining = (row * 0).to(tl.int32) + n_selected
    else:
        if DIGITS_DONE == 1:
            before = row * 0
            remaining = (row * 0).to(tl.int32) + n_selected
        else:  # recorded by chunk 0 of the previous launch
            before = tl.load(State + ((DIGITS_DONE - 1) * rows + row) * 2)
            remaining = tl.load(State + ((DIGITS_DONE - 1) * rows + row) * 2 + 1).to(tl.int32)
        bins = tl.arange(0, RADIX_BINS)
        chunks = tl.arange(0, CHUNKS_PER_STEP)
        counts = Partial + ((DIGITS_DONE - 1) * rows + row) * n_chunks * RADIX_BINS
        hist = tl.zeros([RADIX_BINS], tl.int32)
        for first in range(0, n_chunks, CHUNKS_PER_STEP):
            ok = (first + chunks) < n_chunks
            hist += tl.sum(tl.load(counts + (first + chunks)[:, None] * RADIX_BINS + bins[None, :], mask=ok[:, None],
                                   other=0), 0)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        chosen = tl.max(tl.where(at_or_above >= remaining, bins, -1), 0)  # the digit the k-th largest has
        remaining -= tl.sum(tl.where(bins > chosen, hist, 0), 0)
        prefix = before * RADIX_BINS + chosen
    return prefix, remaining


@triton.jit
def _chunk_orders(Keys, row, part, n_pages, chunk, start):
    """The unsigned score order (0 .. 2**32 - 1) of ``RADIX_BLOCK`` pages of this program's chunk."""
    pages = part * chunk + start + tl.arange(0, RADIX_BLOCK)
    ok = (pages < n_pages) & (start + tl.arange(0, RADIX_BLOCK) < chunk)
    order = (tl.load(Keys + row * n_pages + pages, mask=ok, other=0) >> 32) + 2147483648
    return order, pages, ok


@triton.jit
def _radix_counts(Keys, Partial, State, rows, n_pages, n_chunks, chunk, n_selected, DIGIT: tl.constexpr):
    """Launch ``DIGIT``: choose the previous digit, then count this digit over the chunk."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    prefix, remaining = _threshold_so_far(Partial, State, row, rows, n_chunks, n_selected, DIGIT)
    state = State + (DIGIT * rows + row) * 2
    tl.store(state, prefix, mask=part == 0)
    tl.store(state + 1, remaining.to(tl.int64), mask=part == 0)
    hist = tl.zeros([RADIX_BINS], tl.int32)
    for start in range(0, chunk, RADIX_BLOCK):
        order, pages, ok = _chunk_orders(Keys, row, part, n_pages, chunk, start)
        match = ok & ((order >> (32 - 8 * DIGIT)) == prefix)
        hist += tl.histogram(((order >> (24 - 8 * DIGIT)) & 255).to(tl.int32), RADIX_BINS, mask=match)
    tl.store(Partial + ((DIGIT * rows + row) * n_chunks + part) * RADIX_BINS + tl.arange(0, RADIX_BINS), hist)


@triton.jit
def _radix_tally(Keys, Partial, State, Tally, rows, n_pages, n_chunks, chunk, n_selected):
    """Choose the last digit (the whole threshold), then count the chunk's pages above it and at it."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    threshold, remaining = _threshold_so_far(Partial, State, row, rows, n_chunks, n_selected, 4)
    state = State + (4 * rows + row) * 2
    tl.store(state, threshold, mask=part == 0)
    tl.store(state + 1, remaining.to(tl.int64), mask=part == 0)
    above = 0
    ties = 0
    for start in range(0, chunk, RADIX_BLOCK):
        order, pages, ok = _chunk_orders(Keys, row, part, n_pages, chunk, start)
        above += tl.sum((ok & (order > threshold)).to(tl.int32), 0)
        ties += tl.sum((ok & (order == threshold)).to(tl.int32), 0)
    tally = Tally + (row * n_chunks + part) * 2
    tl.store(tally, above)
    tl.store(tally + 1, ties)


@triton.jit
def _radix_write(Keys, State, Tally, Pages, rows, n_pages, n_chunks, chunk, n_selected):
    """Write the chunk's chosen pages at their place in the row's ascending list: every page above
    the threshold, and the first ``remaining`` of the row's pages at it (a lower page wins a tie,
    as the keys' low bits say)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    threshold = tl.load(State + (4 * rows + row) * 2)
    remaining = tl.load(State + (4 * rows + row) * 2 + 1).to(tl.int32)
    chunks = tl.arange(0, CHUNKS_PER_STEP)
    above_before = 0
    ties_before = 0
    for first in range(0, n_chunks, CHUNKS_PER_STEP):
        earlier = (first + chunks) < part
        tally = Tally + (row * n_chunks + first + chunks) * 2
        above_before += tl.sum(tl.load(tally, mask=earlier, other=0), 0)
        ties_before += tl.sum(tl.load(tally + 1, mask=earlier, other=0), 0)
    written = above_before + tl.minimum(ties_before, remaining)
    ties_seen = ties_before
    for start in range(0, chunk, RADIX_BLOCK):
        order, pages, ok = _chunk_orders(Keys, row, part, n_pages, chunk, start)
        tie = (ok & (order == threshold)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, 0) - tie
        chosen = ((ok & (order > threshold)) | ((tie == 1) & (tie_rank < remaining))).to(tl.int32)
        slot = written + tl.cumsum(chosen, 0) - chosen
        tl.store(Pages + row * n_selected + slot, pages.to(tl.int32), mask=chosen == 1)
        written += tl.sum(chosen, 0)
        ties_seen += tl.sum(tie, 0)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: few programs
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_layout(n_slots: int, programs: int, device: torch.device, slots_per_split: int | None = None) -> tuple[int, int]:
    """``(n_splits, slots_per_split)`` for ``n_slots`` slots per (batch, KV head) over ``programs`` of them.

    Splits are whole 64-key tiles, as many as make ``PROGRAMS_PER_SM`` programs per SM in all (no
    more than there are tiles), at most ``MAX_SPLITS``.
    """
    tiles = -(-n_slots // BLOCK_N)
    if slots_per_split is None:
        wanted = -(-PROGRAMS_PER_SM * _sm_count(device) // programs)
        n_splits = max(1, min(wanted, tiles, MAX_SPLITS))
        slots_per_split = -(-tiles // n_splits) * BLOCK_N
    elif isinstance(slots_per_split, bool) or not isinstance(slots_per_split, int) or slots_per_split < 1:
        raise ValueError(f"slots_per_split must be a positive int or None, got slots_per_split={slots_per_split!r}")
    n_splits = -(-n_slots // slots_per_split)
    if n_splits > MAX_SPLITS:
        raise ValueError(f"slots_per_split={slots_per_split} makes {n_splits} splits of {n_slots} slots; at most "
                         f"{MAX_SPLITS} are merged")
    return n_splits, slots_per_split


def decode_over_pages(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, n_keys: int, page_size: int, scale: float,
    *, return_lse: bool = False, out: torch.Tensor | None = None, slots_per_split: int | None = None,
):
    """Attention of one decode step's queries over the listed pages of a KV cache.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim], float16 or bfloat16
        Last dimension contiguous (transformers' transposed views are fine).
    k, v : Tensor [batch, kv_heads, >= n_keys, head_dim], dtype of ``q``
        Keys ``0 .. n_keys - 1`` are read; last dimension contiguous.
    pages : Tensor [batch, kv_heads, n_selected], int32
        Distinct page numbers ``< ceil(n_keys / page_size)`` (any order) per batch element and KV head;
        page ``p`` is keys ``p * page_size .. min((p + 1) * page_size, n_keys) - 1``.
    n_keys, page_size : int
    scale : float
        Softmax scale.
    return_lse : bool
        Also return the natural log-sum-exp of each query head's kept logits.
    out : Tensor [batch, q_heads, 1, head_dim], optional
        Written in place (last dimension contiguous).
    slots_per_split : int, optional
        Keys per program (chosen to fill the GPU when None; tests set it to exercise the merge).

    Returns
    -------
    out : Tensor [batch, q_heads, 1, head_dim], dtype of ``q``
    lse : Tensor [batch, q_heads, 1], float32; with ``return_lse``.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the decode kernel takes float16 or bfloat16, got dtype={q.dtype}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the decode kernel supports head_dim <= {MAX_HEAD_DIM}, got head_dim={head_dim}")
    if q_len != 1:
        raise ValueError(f"q holds one decode step [batch, q_heads, 1, head_dim], got shape {tuple(q.shape)}")
    if pages.dtype != torch.int32 or pages.dim() != 3 or tuple(pages.shape[:2]) != (batch, kv_heads) or pages.shape[2] == 0:
        raise ValueError(f"pages must be a non-empty int32 tensor [batch={batch}, kv_heads={kv_heads}, n_selected], "
                         f"got {pages.dtype} {tuple(pages.shape)}")
    if out is None:
        out = torch.empty_like(q)
    for name, tensor in (("q", q), ("k", k), ("v", v), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got stride {tensor.stride()}")
    if pages.stride(-1) != 1:
        pages = pages.contiguous()
    group = q_heads // kv_heads
    n_slots = pages.shape[2] * page_size
    n_splits, slots_per_split = split_layout(n_slots, batch * kv_heads, q.device, slots_per_split)
    out_part = torch.empty(batch, q_heads, n_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, q_heads, n_splits, dtype=torch.float32, device=q.device)
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    _decode_split[(n_splits, batch * kv_heads)](
        q, k, v, pages, out_part, lse_part,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pages.stride(0), pages.stride(1),
        kv_heads, n_keys, n_slots, n_splits, slots_per_split, scale * LOG2E,
        GROUP=group, GROUP_PADDED=max(16, triton.next_power_of_2(group)), PAGE_SIZE=page_size,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_N=BLOCK_N,
    )
    lse = torch.empty(batch, q_heads, 1, dtype=torch.float32, device=q.device) if return_lse else None
    _merge_splits[(batch * q_heads,)](
        out_part, lse_part, out, lse if lse is not None else lse_part,
        out.stride(0), out.stride(1),
        q_heads, n_splits,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
        RETURN_LSE=lse is not None,
    )
    return (out, lse) if return_lse else out


def page_bounds(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, scale: float) -> torch.Tensor:
    """Every page's logit bound per query head, :func:`sparse_prefill.decoding.page_upper_bounds` on the GPU.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim], float16 or bfloat16 (last dimension contiguous)
    key_min, key_max : Tensor [batch, kv_heads, n_pages, head_dim], dtype of ``q``
        The page summaries (views of a larger storage are fine; last dimension contiguous).
    scale : float

    Returns
    -------
    Tensor [batch, q_heads, n_pages], float32.
    """
    _check_bounds_inputs(q, key_min, key_max)
    batch, q_heads = q.shape[:2]
    n_pages = key_min.shape[2]
    bounds = torch.empty(batch, q_heads, n_pages, dtype=torch.float32, device=q.device)
    _launch_bounds(_page_bounds, q, key_min, key_max, bounds, scale)
    return bounds


def page_ranking_keys(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, scale: float, first_free: int,
                      first_local: int) -> torch.Tensor:
    """:func:`sparse_prefill.decoding.page_ranking_keys` on the GPU: int64 [batch, kv_heads, n_pages].
    Arguments as :func:`page_bounds`; pages outside ``first_free .. first_local - 1`` are forced."""
    _check_bounds_inputs(q, key_min, key_max)
    batch, kv_heads, n_pages = key_min.shape[:3]
    keys = torch.empty(batch, kv_heads, n_pages, dtype=torch.int64, device=q.device)
    _launch_bounds(_page_ranking_keys, q, key_min, key_max, keys, scale, first_free, first_local)
    return keys


def _check_bounds_inputs(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16) or key_min.dtype != q.dtype or key_max.dtype != q.dtype:
        raise TypeError(f"page bounds take float16 or bfloat16 queries and summaries of the same dtype, got "
                        f"q={q.dtype}, key_min={key_min.dtype}, key_max={key_max.dtype}")
    if key_min.stride() != key_max.stride():
        raise ValueError(f"key_min and key_max must share one layout, got strides {key_min.stride()} and {key_max.stride()}")
    for name, tensor in (("q", q), ("key_min", key_min), ("key_max", key_max)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got stride {tensor.stride()}")


def _launch_bounds(kernel, q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, out: torch.Tensor,
                   scale: float, *forced: int) -> None:
    """One program per 64 pages and (batch, KV head), all the group's query heads at once."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, n_pages = key_min.shape[1], key_min.shape[2]
    group = q_heads // kv_heads
    block_p = 64
    kernel[(triton.cdiv(n_pages, block_p), batch * kv_heads)](
        q, key_min, key_max, out,
        q.stride(0), q.stride(1),
        key_min.stride(0), key_min.stride(1), key_min.stride(2),
        kv_heads, n_pages, *forced, scale,
        GROUP=group, GROUP_PADDED=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)), BLOCK_P=block_p,
        num_warps=4,
    )


def top_pages(keys: torch.Tensor, n_selected: int, *, pages_per_program: int | None = None) -> torch.Tensor:
    """The pages of the ``n_selected`` largest ranking keys per row, ascending: what ``torch.topk``
    then a sort of the indices give on :func:`page_ranking_keys`'s distinct keys.

    Parameters
    ----------
    keys : Tensor [..., n_pages], int64, contiguous
        Ranking keys (``decoding._ranking_key``): high 32 bits the ordered score, low 32 bits
        ``n_pages - 1 - page``.
    n_selected : int
        ``1 <= n_selected <= n_pages``.
    pages_per_program : int, optional
        A multiple of ``RADIX_BLOCK`` (chosen to fill the GPU when None; tests set it to exercise
        many chunks per row).

    Returns
    -------
    Tensor [..., n_selected], int32.
    """
    n_pages = keys.shape[-1]
    if keys.dtype != torch.int64 or not keys.is_contiguous():
        raise ValueError(f"keys must be a contiguous int64 tensor, got {keys.dtype} with strides {keys.stride()}")
    if not 1 <= n_selected <= n_pages:
        raise ValueError(f"n_selected must be in 1 .. n_pages={n_pages}, got n_selected={n_selected}")
    rows, block = keys.numel() // n_pages, RADIX_BLOCK.value
    if pages_per_program is None:
        parts = max(1, min(-(-PROGRAMS_PER_SM * _sm_count(keys.device) // rows), -(-n_pages // block)))
        pages_per_program = -(-n_pages // (parts * block)) * block
    elif isinstance(pages_per_program, bool) or not isinstance(pages_per_program, int) or pages_per_program < 1 \
            or pages_per_program % block:
        raise ValueError(f"pages_per_program must be a positive multiple of {block} or None, got {pages_per_program!r}")
    n_chunks = -(-n_pages // pages_per_program)
    partial = torch.empty(RADIX_DIGITS, rows, n_chunks, RADIX_BINS.value, dtype=torch.int32, device=keys.device)
    state = torch.empty(RADIX_DIGITS + 1, rows, 2, dtype=torch.int64, device=keys.device)
    tally = torch.empty(rows, n_chunks, 2, dtype=torch.int32, device=keys.device)
    pages = torch.empty(*keys.shape[:-1], n_selected, dtype=torch.int32, device=keys.device)
    grid = (rows, n_chunks)
    args = (rows, n_pages, n_chunks, pages_per_program, n_selected)
    for digit in range(RADIX_DIGITS):
        _radix_counts[grid](keys, partial, state, *args, DIGIT=digit, num_warps=4)
    _radix_tally[grid](keys, partial, state, tally, *args, num_warps=4)
    _radix_write[grid](keys, state, tally, pages, *args, num_warps=4)
    return pages
