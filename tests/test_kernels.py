"""The Triton kernels against the reference.

On a machine without a GPU these run under TRITON_INTERPRET=1 on CPU tensors at small sizes (the
kernel logic, not its speed); with a GPU they also run at real sizes (``-m gpu``).
"""

import os
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Must be set before triton is imported anywhere in this process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash, reference_attention  # noqa: E402
from sparse_prefill.kernels import triton_sparse_attention  # noqa: E402
from sparse_prefill.reference import attention_with_index  # noqa: E402
from sparse_prefill.synthetic import planted_qkv  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
# Triton's interpreter (3.9) computes tl.dot on bfloat16 operands wrongly (a plain bf16 dot of a
# 16x16 tile returns ~1e10), so on CPU the kernels are checked in float16; bfloat16 runs on the GPU.
DTYPES = [torch.float16, torch.bfloat16] if HAS_GPU else [torch.float16]
LOW_PRECISION = torch.bfloat16 if HAS_GPU else torch.float16


def fresh_qkv(batch, q_heads, kv_heads, seq, dim, dtype, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(torch.seed() % 2**31)
    shape_q, shape_kv = (batch, q_heads, seq, dim), (batch, kv_heads, seq, dim)
    return tuple(torch.randn(s, generator=g, device=device).to(dtype) for s in (shape_q, shape_kv, shape_kv))


def check_against_reference(q, k, v, patterns, tolerance=1e-2):
    """Kernel output vs exact attention over the kept sets the kernel's own plan estimated."""
    out, plan = triton_sparse_attention(q, k, v, patterns, return_plan=True)
    assert torch.isfinite(out).all(), "the kernel left NaN/Inf (unwritten or overflowed) outputs"
    ref, _ = attention_with_index(q, k, v, plan.indices, scale=q.shape[-1] ** -0.5)
    for head in range(q.shape[1]):
        error = ((out[:, head].double() - ref[:, head].double()).norm() / ref[:, head].double().norm()).item()
        assert error <= tolerance, f"head {head} ({patterns[head] if isinstance(patterns, list) else patterns}): {error}"
    return out, plan


MIXED = [BlockCoverage(0.9), BlockSparse(2), AShape(3, 40), Dense(), VerticalSlash(100, 5), AShape(0, 1),
         BlockSparse(1), BlockCoverage(0.5, stride=4), VerticalSlash(3, 130, last_q=16), AShape(5, 130),
         BlockCoverage(1.0, stride=64), AShape(70, 200)]


@given(
    seq=st.one_of(st.sampled_from([1, 63, 64, 65, 130, 200]), st.integers(2, 150)),
    dim=st.sampled_from([64, 80, 128]),
    heads=st.sampled_from([(1, 1), (4, 1), (8, 1), (8, 2), (4, 4)]),
    batch=st.integers(1, 2),
    dtype=st.sampled_from(DTYPES),
)
def test_mixed_patterns_match_reference(seq, dim, heads, batch, dtype):
    q_heads, kv_heads = heads
    q, k, v = fresh_qkv(batch, q_heads, kv_heads, seq, dim, dtype)
    patterns = [MIXED[(h + seq) % len(MIXED)] for h in range(q_heads)]
    check_against_reference(q, k, v, patterns)


def test_plan_estimates_what_the_reference_estimates():
    """Same kept sets as the reference estimators (float32 inputs on CPU: no ties, same arithmetic)."""
    planted = planted_qkv(batch=2, q_heads=6, kv_heads=2, seq=300, head_dim=64)
    q, k = planted.q.to(DEVICE), planted.k.to(DEVICE)
    patterns = [BlockCoverage(0.8), BlockCoverage(0.95, stride=8), BlockSparse(3),
                AShape(2, 50), VerticalSlash(10, 200), VerticalSlash(5, 100, last_q=16)]
    from sparse_prefill.kernels.plan import build_plan

    plan = build_plan(q, k, patterns, 64**-0.5)
    want = reference_attention(q, k, k, patterns, return_indices=True).indices
    rows = torch.arange(300, device=DEVICE)
    for head in range(6):
        assert torch.equal(plan.indices[head].kept_mask(rows, 300), want[head].kept_mask(rows, 300)), head


def test_planted_structure_at_larger_size():
    planted = planted_qkv(batch=1, q_heads=2, kv_heads=1, seq=700, head_dim=64, dtype=LOW_PRECISION, device=DEVICE)
    check_against_reference(planted.q, planted.k, planted.v, [BlockCoverage(0.95), VerticalSlash(16, 200)])


def test_kernel_on_a_chunk_with_the_whole_prompts_vertical_slash_index():
    """A context-parallel piece's path: the prompt's Vertical-Slash index restricted to a chunk's keys
    (``up_to``), laid out with ``plan_from_indices`` and run by the kernel, against exact attention
    over the same kept sets; the chunk ends mid-block and misses some of the prompt's diagonals."""
    from sparse_prefill.attention import attention_over_indices
    from sparse_prefill.kernels import plan_from_indices, run_plan
    from sparse_prefill.kinds import estimate_layer

    q, k, v = fresh_qkv(1, 4, 2, 320, 64, LOW_PRECISION)
    patterns = [VerticalSlash(12, 200, last_q=16), VerticalSlash(5, 100), Dense(), VerticalSlash(40, 300)]
    prompt = estimate_layer(q, k, patterns, 0.125)
    for start, end in ((64, 200), (0, 130), (256, 320)):
        indices = [index.up_to(end) if hasattr(index, "up_to") else index for index in prompt]
        piece_q, piece_k, piece_v = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        out = attention_over_indices(piece_q, piece_k, piece_v, indices, scale=0.125)  # masked SDPA on a CPU
        plan = plan_from_indices(indices, 1, end, piece_q.device, start)
        got = run_plan(piece_q, piece_k, piece_v, plan, 0.125)
        ref, _ = attention_with_index(piece_q, piece_k, piece_v, indices, scale=0.125)
        for head in range(4):
            error = ((got[:, head].double() - ref[:, head].double()).norm() / ref[:, head].double().norm()).item()
            assert error <= 1e-2, (start, end, head, error)
        torch.testing.assert_close(out.double(), ref.double(), rtol=2e-2, atol=2e-2)


def test_first_launch_autotunes_on_the_last_query_blocks():
    """A key's first launch over more than TUNING_BLOCKS query blocks is preceded by one over its last
    TUNING_BLOCKS (where the autotuner chooses); the whole launch follows and the output is exact.
    Later launches of the key are single."""
    from sparse_prefill.kernels import sparse_attention as kernel_module

    grids = []
    real = kernel_module._sparse_attention_fwd

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    q, k, v = fresh_qkv(1, 2, 1, 300, 64, torch.float16)  # 5 query blocks
    patterns = [Dense(), BlockSparse(2)]
    with mock.patch.object(kernel_module, "_sparse_attention_fwd", Recording()), \
            mock.patch.object(kernel_module, "TUNING_BLOCKS", 2), mock.patch.object(kernel_module, "_tuned", set()):
        check_against_reference(q, k, v, patterns)
        assert grids == [(2, 2), (5, 2)]
        check_against_reference(q, k, v, patterns)
        assert grids[2:] == [(5, 2)]


def test_output_buffer_is_fully_written():
    q, k, v = fresh_qkv(2, 2, 1, 129, 64, torch.float16)
    from sparse_prefill.kernels import build_plan, run_plan

    plan = build_plan(q, k, [BlockCoverage(0.9), AShape(4, 100)], 0.125)
    out = torch.full_like(q, float("nan"))
    run_plan(q, k, v, plan, 0.125, out=out)
    assert torch.isfinite(out).all()


def test_kernel_rejects_float32_and_wide_heads():
    q, k, v = fresh_qkv(1, 2, 1, 64, 64, torch.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16, got dtype=torch.float32"):
        triton_sparse_attention(q, k, v, Dense())
    # Refused before any estimator or kernel runs (a 512-wide head used to reach Triton's OutOfResources).
    q, k, v = fresh_qkv(1, 2, 1, 64, 512, torch.float16)
    with pytest.raises(ValueError, match="head_dim <= 256, got head_dim=512"):
        triton_sparse_attention(q, k, v, BlockCoverage(0.9))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("seq, q_len", [(8192 + 37, 8192 + 37), (32768, 32768), (131072, 131072), (32768, 8192 + 37),
                                        (131072, 16384)])
def test_real_sizes_on_gpu(seq, q_len):
    """Every kind at real sizes, whole prompts and chunks (queries the last q_len positions)."""
    planted = planted_qkv(batch=1, q_heads=8, kv_heads=2, seq=seq, head_dim=128, dtype=torch.bfloat16, device="cuda")
    patterns = [VerticalSlash(1000, 6096), BlockSparse(32), AShape(64, 4096), BlockCoverage(0.95)] * 2
    q_start = seq - q_len
    q = planted.q[:, :, q_start:]
    # The reference is exact but slow: check a few query heads' rows only via row chunks.
    out, plan, lse = triton_sparse_attention(q, planted.k, planted.v, patterns, return_plan=True, return_lse=True)
    rows = torch.cat([torch.arange(q_start, q_start + 256), torch.arange(seq - q_len // 2, seq - q_len // 2 + 256),
                      torch.arange(seq - 256, seq)]).cuda()
    for head in range(8):
        index = plan.indices[head]
        qh = planted.q[:, head, rows].double()
        kh = planted.k[:, head // 4].double()
        vh = planted.v[:, head // 4].double()
        logits = torch.einsum("bqd,bkd->bqk", qh, kh) / 128**0.5
        logits = logits.masked_fill(~index.kept_mask(rows, seq), float("-inf"))
        ref = torch.einsum("bqk,bkd->bqd", logits.softmax(-1), vh)
        error = ((out[:, head, rows - q_start].double() - ref).norm() / ref.norm()).item()
        assert error <= 1e-2, (head, error)
        torch.testing.assert_close(lse[:, head, rows - q_start].double(), logits.logsumexp(-1), rtol=1e-3, atol=2e-2)


@pytest.mark.parametrize("q_len", [1, 63, 64, 65, 199, 200, 137])
def test_chunks_match_reference(q_len):
    """Queries that are the last q_len of 200 positions: every kind (GQA), output and log-sum-exp."""
    q, k, v = fresh_qkv(2, 8, 2, 200, 64, LOW_PRECISION)
    q = q[:, :, 200 - q_len :]
    patterns = [MIXED[(h + q_len) % len(MIXED)] for h in range(8)]
    out, plan, lse = triton_sparse_attention(q, k, v, patterns, return_plan=True, return_lse=True)
    assert plan.q_start == 200 - q_len
    ref, _, ref_lse = attention_with_index(q, k, v, plan.indices, scale=64**-0.5, return_lse=True)
    for head in range(8):
        error = ((out[:, head].double() - ref[:, head].double()).norm() / ref[:, head].double().norm()).item()
        assert error <= 1e-2, f"head {head} ({patterns[head]}): {error}"
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("seq, last_q, q_len", [(1, 64, 1), (50, 64, 50), (64, 16, 64), (200, 64, 200), (333, 100, 333),
                                                (200, 64, 30), (333, 100, 170)])
def test_fused_last_query_statistics_match_pytorch(seq, last_q, q_len):
    """Column sums and per-row 64-key block sums of the last-query attention, without the N x last_q
    matrix; ``q_len < seq``: the queries are a chunk, and a head uses at most its q_len queries."""
    from sparse_prefill.kernels.last_query import last_query_scores
    from sparse_prefill.kinds.vertical_slash import last_query_statistics

    q, k, _ = fresh_qkv(2, 4, 2, seq, 64, torch.float32)
    q = q[:, :, seq - q_len :]
    heads = [3, 0, 1]
    last = [min(last_q, q_len), min(last_q, q_len) // 2 + 1, 1]
    n_rows = max(last)
    own = torch.tensor(last * 2, dtype=torch.int32, device=DEVICE)
    columns, blocks, row_max, row_sum = last_query_scores(q, k, torch.tensor(heads), own, n_rows, 0.125)
    want = last_query_statistics(q, k, heads, last, 0.125)  # float32 CPU tensors: the PyTorch definition
    torch.testing.assert_close(columns, want.column_scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(blocks, want.block_sums, rtol=1e-4, atol=1e-6)
    used = want.row_used
    torch.testing.assert_close(row_max[used], want.row_max[used], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(row_sum[used], want.row_sum[used], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq, last_q, q_len, n_columns", [(1, 64, 1, 1), (50, 64, 50, 8), (200, 64, 200, 70),
                                                           (333, 100, 333, 130), (333, 100, 170, 40), (700, 16, 700, 5),
                                                           (640, 64, 640, 200)])
def test_fused_diagonal_scores_match_pytorch(seq, last_q, q_len, n_columns):
    """Vertical-Slash's diagonal scores in one launch equal the PyTorch definition: heads with their
    own numbers of last rows (spanning one or two query blocks), of a chunk's queries, and of counted
    columns (the rest of each row of ``columns`` ignored, as top_per_head pads it)."""
    from sparse_prefill.kernels.last_query import diagonal_scores as fused
    from sparse_prefill.kinds.vertical_slash import diagonal_scores, last_query_statistics

    q, k, _ = fresh_qkv(2, 4, 2, seq, 64, torch.float32)
    q = q[:, :, seq - q_len :]
    heads = [3, 0, 1]
    last = [min(last_q, q_len), min(last_q, q_len) // 2 + 1, 1]
    stats = last_query_statistics(q, k, heads, last, 0.125)  # float32: the PyTorch path on any device
    g = torch.Generator().manual_seed(seq)
    width = min(n_columns, seq)
    columns = torch.stack([torch.randperm(seq, generator=g)[:width].sort().values for _ in range(6)]).to(DEVICE)
    counts = torch.tensor([width, max(1, width // 2), 1] * 2, device=DEVICE)
    want = diagonal_scores(stats, q, k, heads, columns, counts, 0.125)
    got = fused(q, k, torch.tensor(heads, device=DEVICE), columns, counts, stats.block_sums, stats.row_max,
                stats.row_sum, stats.row_used, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seq, stride, first_block", [(1, 16, 0), (64, 16, 0), (200, 16, 0), (300, 8, 0), (130, 64, 0),
                                                     (257, 4, 0), (700, 32, 0), (300, 8, 2), (700, 16, 10), (257, 4, 4),
                                                     (256, 16, 0), (512, 32, 2), (640, 64, 3), (2100, 64, 0),
                                                     (2100, 64, 20)])
def test_antidiagonal_tile_mass_matches_pytorch(seq, stride, first_block):
    """The Triton tile masses equal the PyTorch definition (float32, selected heads, GQA, padding),
    also for the query blocks of a chunk (``first_block`` > 0: the queries from position 64 first_block).
    Lengths that are whole groups load through tensor descriptors, the others through masked pointers.
    Rows run in launches of 16, 32, 64 ... key blocks (the narrowest cut to 16 from 256, so that 33
    blocks take three)."""
    from sparse_prefill.kernels import row_ranges as row_range_module
    from sparse_prefill.kernels.coverage import antidiagonal_tile_mass
    from sparse_prefill.kinds.block_coverage import tile_mass

    q, k, _ = fresh_qkv(2, 4, 2, seq, 64, torch.float32)
    q = q[:, :, first_block * 64 :]
    heads = torch.tensor([0, 3, 2])
    with mock.patch.object(row_range_module, "SMALLEST_CHUNK", 16):
        got = antidiagonal_tile_mass(q, k, heads, stride, 0.125, first_block)  # [batch * 3, n_rows, n_blocks]
    n_rows, n_blocks = got.shape[1:]
    causal = torch.arange(n_blocks, device=DEVICE)[None, :] <= first_block + torch.arange(n_rows, device=DEVICE)[:, None]
    for b in range(2):
        want = tile_mass(q[b, heads], k[b, heads // 2], stride, 0.125, first_block=first_block)
        # Entries above the diagonal are unspecified (a narrow launch never writes them): compared as 0.
        torch.testing.assert_close(torch.where(causal, got[3 * b : 3 * b + 3], 0.0), want, rtol=1e-4, atol=1e-5)


@given(first_block=st.integers(0, 5000), n_rows=st.integers(1, 20000), smallest=st.sampled_from([16, 64, 256]),
       widest=st.sampled_from([16, 256, 2048]))
def test_row_ranges_cover_every_row_once_with_a_chunk_that_fits(first_block, n_rows, smallest, widest):
    """The per-row kernels' launches: contiguous ranges covering rows 0 .. n_rows - 1 once, each with a
    power-of-two chunk of at least 16 and at most MAX_CHUNK that holds every row's key blocks 0 .. m
    (rows past MAX_CHUNK blocks walk theirs in chunks), growing from range to range."""
    from sparse_prefill.kernels import row_ranges as row_range_module

    with mock.patch.object(row_range_module, "SMALLEST_CHUNK", smallest), \
            mock.patch.object(row_range_module, "MAX_CHUNK", widest):
        ranges = row_range_module.row_ranges(first_block, n_rows)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for first_row, end_row, chunk in ranges:
        assert first_row < end_row and 16 <= chunk <= widest and chunk & (chunk - 1) == 0
        assert chunk == widest or first_block + end_row <= chunk  # the range's last row m fits: m + 1 <= chunk
    assert [chunk for _, _, chunk in ranges] == sorted(chunk for _, _, chunk in ranges)


@given(n_blocks=st.integers(1, 40), coverage=st.floats(0.05, 1.0), ties=st.booleans(), seed=st.integers(0, 2**31 - 1),
       chunk=st.floats(0.0, 1.0), max_chunk=st.sampled_from([2048, 16]), smallest_chunk=st.sampled_from([256, 16]))
def test_coverage_selection_on_the_gpu_equals_the_definition(n_blocks, coverage, ties, seed, chunk, max_chunk,
                                                             smallest_chunk):
    """The search on the float bits finds exactly the sort-based threshold, ties and all, with a row
    held whole in registers and with a row read in chunks (``max_chunk`` 16: rows past 16 blocks,
    as rows past 128K tokens are with the real 2048), the rows in one launch or in launches of
    doubling widths (``smallest_chunk`` 16: 16, 32, 64 key blocks).

    Masses are multiples of 2^-12 and coverages multiples of 1/64, so that every sum and the target
    (coverage x total - forced) are exact in float32 whatever the order of the additions and whether
    the GPU fuses the multiply-add: the two implementations then see the same numbers.
    """
    from sparse_prefill.kernels import row_ranges as row_range_module
    from sparse_prefill.kernels.coverage import coverage_block_lists
    from sparse_prefill.kinds import BlockSparseIndex
    from sparse_prefill.kinds.block_coverage import blocks_at_threshold, coverage_threshold

    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(3, n_blocks, n_blocks, generator=g) ** 4
    steps = 8 if ties else 4096  # coarse values: many equal masses in a row
    first = int(chunk * (n_blocks - 1))  # the rows of a chunk's query blocks first .. n_blocks - 1
    mass = ((mass * steps).round() / steps).tril()[:, first:].to(DEVICE).contiguous()
    cover = torch.tensor([round(coverage * 64) / 64, 1.0, 0.5], device=DEVICE)
    with mock.patch.object(row_range_module, "MAX_CHUNK", max_chunk), \
            mock.patch.object(row_range_module, "SMALLEST_CHUNK", smallest_chunk):
        blocks, start, count = coverage_block_lists(mass, cover, first)
    want = blocks_at_threshold(mass, coverage_threshold(mass, cover, first), first)
    # Each row's list packed right after the previous one's, as many as the rule keeps.
    assert torch.equal(start.view(-1)[1:], (start + count).view(-1)[:-1])
    assert torch.equal(BlockSparseIndex(blocks, start, count).padded().long(), want)


@given(n_blocks=st.integers(1, 40), first=st.floats(0.0, 1.0), top_k=st.lists(st.integers(1, 45), min_size=3, max_size=3),
       ties=st.booleans(), seed=st.integers(0, 2**31 - 1), max_chunk=st.sampled_from([2048, 16]),
       smallest_chunk=st.sampled_from([256, 16]))
def test_top_block_selection_on_the_gpu_equals_topk(n_blocks, first, top_k, ties, seed, max_chunk, smallest_chunk):
    """Block-Sparse's bisection-based selection keeps what ``topk`` keeps: exactly min(top_k, m + 1)
    blocks per row, ascending, the diagonal (scored +inf) among them; with distinct scores the same
    set, with coarse scores (ties) a set whose every block scores at least the row's k-th best and that
    holds every block scoring more. Negative scores included (the bisection runs on an order-preserving
    integer image of the floats); rows held whole in registers and read in chunks, in one launch
    or in launches of doubling widths."""
    from sparse_prefill.kernels import row_ranges as row_range_module
    from sparse_prefill.kernels.top_blocks import top_block_lists
    from sparse_prefill.kinds import BlockSparseIndex

    g = torch.Generator().manual_seed(seed)
    first_block = int(first * (n_blocks - 1))
    n_rows = n_blocks - first_block
    scores = torch.randn(3, n_rows, n_blocks, generator=g) * 4
    if ties:
        scores = scores.round()
    m = first_block + torch.arange(n_rows)
    c = torch.arange(n_blocks)
    scores = scores.masked_fill(c[None, None, :] > m[None, :, None], float("-inf"))
    scores = scores.masked_fill(c[None, None, :] == m[None, :, None], float("inf")).to(DEVICE).contiguous()
    with mock.patch.object(row_range_module, "MAX_CHUNK", max_chunk), \
            mock.patch.object(row_range_module, "SMALLEST_CHUNK", smallest_chunk):
        blocks, start, count = top_block_lists(scores, top_k, first_block)
    assert torch.equal(start.view(-1)[1:], (start + count).view(-1)[:-1])  # packed back to back
    assert blocks.numel() == max(int(count.sum()), 1)  # the buffer sized from the budgets alone holds them exactly
    got = BlockSparseIndex(blocks, start, count).padded().long().cpu()
    scores = scores.cpu()
    for row in range(3):
        for r in range(n_rows):
            wanted = min(top_k[row], first_block + r + 1)
            kept = got[row, r][got[row, r] >= 0]
            assert len(kept) == wanted and torch.equal(kept, kept.sort().values)
            kth = scores[row, r].topk(wanted).values[-1]
            assert (scores[row, r, kept] >= kth).all() and int((scores[row, r] > kth).sum()) <= wanted
            assert set((scores[row, r] > kth).nonzero().flatten().tolist()) <= set(kept.tolist())
            if not ties:
                assert torch.equal(kept, scores[row, r].topk(wanted).indices.sort().values)


def test_block_sparse_estimate_through_the_gpu_selection_equals_the_cpu_path():
    """The GPU path of Block-Sparse's estimator (pooled scores, then the bisection kernel) gives the
    same lists as its PyTorch path, heads with different budgets, in one share and in several."""
    from sparse_prefill.kinds import block_sparse

    planted = planted_qkv(batch=2, q_heads=4, kv_heads=2, seq=900, head_dim=64)
    q, k = planted.q.to(DEVICE), planted.k.to(DEVICE)
    patterns = [BlockSparse(3), BlockSparse(1), BlockSparse(8), BlockSparse(20)]
    want = block_sparse.estimate(q, k, [0, 1, 2, 3], patterns, 0.125)  # float32: the PyTorch path
    pooled_q = block_sparse.mean_pool_blocks(q)
    pooled_k = block_sparse.mean_pool_blocks(k)[:, [0, 0, 1, 1]]
    for step in (4, 3, 1):
        lists = block_sparse._top_blocks_on_gpu(pooled_q, pooled_k, [3, 1, 8, 20], 0.125, 0, step)
        got = block_sparse.split_heads(*lists, 0)
        for head in range(4):
            assert torch.equal(got[head].padded(), want[head].padded()), (step, head)


def test_tma_loadable_says_which_layouts_descriptors_accept():
    """The kernels fall back to pointer loads exactly where a TMA descriptor would be refused."""
    from sparse_prefill.kernels.tma import tma_loadable

    x = torch.zeros(2, 4, 128, 64, dtype=torch.bfloat16)
    assert tma_loadable(x)
    assert tma_loadable(torch.zeros(2, 128, 4, 64, dtype=torch.bfloat16).transpose(1, 2))  # transformers' layout
    assert tma_loadable(x[:, :, 64:])  # a chunk's keys: the offset is a multiple of 16 bytes
    assert not tma_loadable(x.view(-1)[1:].as_strided((2, 4, 127, 64), (32768, 8192, 64, 1)))  # 2-byte offset
    assert not tma_loadable(x[:1].expand(2, -1, -1, -1))  # a broadcast batch has stride 0
    assert not tma_loadable(torch.zeros(1, 2, 64, 4, dtype=torch.float16))  # rows of 8 bytes
    assert not tma_loadable(x.transpose(2, 3))  # last dimension not contiguous
    assert tma_loadable(torch.zeros(1, 1, 1, 64, dtype=torch.float16))  # extents of 1 need no stride


def test_no_tma_without_descriptors_in_triton():
    """A Triton older than 3.4 has no host tensor descriptors: the kernels keep pointer loads."""
    from sparse_prefill.kernels import tma

    x = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    with mock.patch.object(tma, "_descriptors_available", lambda: False):
        assert not tma.tma_loadable(x)
    assert tma.tma_loadable(x)
