"""The reference against independent, element-by-element statements of docs/semantics.md."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash, reference_attention, sparse_attention
from sparse_prefill.kinds import estimate_layer, kept_fraction
from sparse_prefill.kinds.block_coverage import blocks_at_threshold, coverage_threshold
from sparse_prefill.kinds.common import LOG2E
from sparse_prefill.kinds.vertical_slash import FORCED_DIAGONALS, SINK_COLUMNS, diagonal_scores, last_query_statistics
from sparse_prefill.masked_attention import masked_attention
from sparse_prefill.reference import attention_with_index
from sparse_prefill.synthetic import planted_qkv

BLOCK = 64


def random_qkv(batch, q_heads, kv_heads, seq, dim, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q = torch.randn(batch, q_heads, seq, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g).to(dtype)
    return q, k, v


def dense_sdpa(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# --- independent statements of the semantics, one pair at a time --------------------------------


def brute_last_query_probs(q, k, last_q, scale):
    """{(i, j): attention of query i on key j} for the last queries of one head (q, k: [seq, dim])."""
    seq = q.shape[0]
    probs = {}
    for i in range(seq - min(last_q, seq), seq):
        logits = [(q[i] @ k[j]).item() * scale for j in range(i + 1)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        probs.update({(i, j): w / total for j, w in enumerate(weights)})
    return probs


def brute_vertical_slash(q, k, pattern, scale, columns):
    """Column scores, and block-diagonal scores of the mass not on ``columns``, from plain loops."""
    seq = q.shape[0]
    column, diagonal = [0.0] * seq, [0.0] * (-(-seq // BLOCK))
    for (i, j), p in brute_last_query_probs(q, k, pattern.last_q, scale).items():
        column[j] += p
        if j not in columns:
            diagonal[i // BLOCK - j // BLOCK] += p
    return column, diagonal


def brute_block_keep(q, k, pattern, scale):
    """Set of (query block, key block) tiles kept by Block-Sparse, for one head."""
    seq = q.shape[0]
    n = -(-seq // BLOCK)
    pooled_q = [q[b * BLOCK : (b + 1) * BLOCK].double().mean(0) for b in range(n)]
    pooled_k = [k[b * BLOCK : (b + 1) * BLOCK].double().mean(0) for b in range(n)]
    tiles = set()
    for b in range(n):
        scores = {c: (pooled_q[b] @ pooled_k[c]).item() * scale for c in range(b + 1)}
        scores[b] = math.inf
        chosen = sorted(scores, key=scores.get, reverse=True)[: pattern.top_k]
        tiles |= {(b, c) for c in chosen}
    return tiles


def brute_coverage_selection(mass, coverage):
    """Kept (query block, key block) tiles from per-tile masses (``mass[m][c]``, lists of floats).

    Block 0 and the diagonal block always; then the free blocks ``0 < c < m`` by descending mass
    until the kept mass reaches ``coverage`` of the row; every free block with a mass equal to the
    last one taken is kept too. Should rounding leave the target out of reach, every free block.
    """
    tiles = set()
    for m in range(len(mass)):
        total = sum(mass[m][: m + 1])
        kept = {0, m}
        have = sum(mass[m][c] for c in kept)
        free = sorted(range(1, m), key=lambda c: -mass[m][c])
        if have < coverage * total:
            threshold = 0.0  # out of reach: everything
            running = have
            for c in free:
                running += mass[m][c]
                if running >= coverage * total:
                    threshold = mass[m][c]
                    break
            kept |= {c for c in free if mass[m][c] >= threshold}
        tiles |= {(m, c) for c in kept}
    return tiles


def brute_block_coverage(q, k, pattern, scale):
    """Block-Coverage's kept tiles for one head (q, k: [seq, dim]) from its definition, in plain Python.

    Query group ``a`` meets key group ``b`` in the products ``x_t = scale * q[a*S + t] . k[b*S + S-1-t]``
    (positions past the sequence read zero vectors). Two scores, the mean ``sum_t x_t / S`` and the
    largest ``max_t x_t``, each get a softmax over the query group's key groups ``b <= a``; the
    estimated mass is the mean of the two. A tile's mass sums its query groups (those holding a real
    query) and key groups.
    """
    seq, dim = q.shape
    stride = pattern.stride
    n = -(-seq // BLOCK)
    qs, ks = q.double().tolist(), k.double().tolist()
    zero = [0.0] * dim

    def row(x, i):
        return x[i] if i < seq else zero

    def softmax(scores):
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        return [w / sum(weights) for w in weights]

    per_block = BLOCK // stride
    mass = [[0.0] * n for _ in range(n)]
    for a in range(n * per_block):
        if a * stride >= seq:
            continue
        mean, peak = [], []
        for b in range(a + 1):
            products = [scale * sum(x * y for x, y in zip(row(qs, a * stride + t), row(ks, b * stride + stride - 1 - t)))
                        for t in range(stride)]
            mean.append(sum(products) / stride)
            peak.append(max(products))
        for b, (p_mean, p_peak) in enumerate(zip(softmax(mean), softmax(peak))):
            mass[a // per_block][b // per_block] += (p_mean + p_peak) / 2
    return brute_coverage_selection(mass, pattern.coverage), mass


def tiles_to_mask(tiles, seq):
    return [[j <= i and (i // BLOCK, j // BLOCK) in tiles for j in range(seq)] for i in range(seq)]


@pytest.mark.parametrize("seq", [1, 5, 37, 70, 200])
def test_last_query_statistics_and_diagonal_scores_match_loops(seq):
    """The estimator's statistics of the last queries, for two query heads of one KV head with
    different ``last_q`` (heads given out of order), and the residual block-diagonal scores."""
    q, k, _ = random_qkv(2, 2, 1, seq, 8)
    scale = 0.3
    heads, last = [1, 0], [16, 5]
    stats = last_query_statistics(q, k, heads, last, scale)
    n_last, nb = min(16, seq), -(-seq // BLOCK)
    assert stats.n_last == n_last and stats.block_sums.shape == (4, n_last, nb)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    columns = torch.stack([torch.randperm(seq, generator=g)[: min(3, seq)] for _ in range(4)])
    counts = torch.tensor([min(3, seq), min(2, seq)] * 2)  # past a row's count, a column is ignored
    residual = diagonal_scores(stats, q, k, heads, columns, counts, scale)
    for b in range(2):
        for position, (head, last_q) in enumerate(zip(heads, last)):
            r = b * len(heads) + position  # batch-major rows
            own = min(last_q, seq)
            probs = brute_last_query_probs(q[b, head], k[b, 0], last_q, scale)
            want_columns, want_blocks = torch.zeros(seq), torch.zeros(n_last, nb)
            want_diagonals = torch.zeros(nb)
            chosen = set(columns[r, : counts[r]].tolist())
            for (i, j), p in probs.items():
                want_columns[j] += p
                want_blocks[i - (seq - n_last), j // BLOCK] += p
                if j not in chosen:
                    want_diagonals[i // BLOCK - j // BLOCK] += p
            torch.testing.assert_close(stats.column_scores[r], want_columns, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.block_sums[r], want_blocks, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(residual[r], want_diagonals, rtol=1e-5, atol=1e-5)
            assert stats.row_used[r].tolist() == [x >= n_last - own for x in range(n_last)]
            for x in range(n_last - own, n_last):  # base-2 softmax statistics of the head's own rows
                i = seq - n_last + x
                logits = [(q[b, head, i] @ k[b, 0, j]).item() * scale * LOG2E for j in range(i + 1)]
                top = max(logits)
                assert stats.row_max[r, x].item() == pytest.approx(top, rel=1e-5, abs=1e-5)
                assert stats.row_sum[r, x].item() == pytest.approx(sum(2 ** (y - top) for y in logits), rel=1e-5)


@pytest.mark.parametrize("seq, slash", [(3, 130), (64, 130), (100, 130), (200, 130), (300, 200), (333, 64)])
def test_vertical_slash_kept_set_matches_definition(seq, slash):
    q, k, v = random_qkv(1, 1, 1, seq, 16)
    pattern = VerticalSlash(vertical=10, slash=slash, last_q=20)
    result = reference_attention(q, k, v, pattern, return_indices=True)
    index = result.indices[0]
    columns, diagonals = set(index.columns[0].tolist()), set(index.diagonals[0].tolist())
    n_diagonals = -(-seq // BLOCK)
    assert len(columns) == min(10, seq)
    assert len(diagonals) == min(-(-pattern.slash // BLOCK), n_diagonals)
    assert set(range(min(SINK_COLUMNS, seq))) <= columns
    assert set(range(min(FORCED_DIAGONALS, len(diagonals)))) <= diagonals
    column_scores, diagonal_scores_ = brute_vertical_slash(q[0, 0], k[0, 0], pattern, 16**-0.5, columns)
    # Outside the forced ones, the chosen are the best scored.
    for chosen_set, scores, first in ((columns, column_scores, SINK_COLUMNS), (diagonals, diagonal_scores_, FORCED_DIAGONALS)):
        free = range(first, len(scores))
        chosen = [x for x in free if x in chosen_set]
        rest = [x for x in free if x not in chosen_set]
        if chosen and rest:
            assert min(scores[x] for x in chosen) >= max(scores[x] for x in rest) - 1e-6
    mask = index.kept_mask(torch.arange(seq), seq)[0].tolist()
    for i in range(seq):
        for j in range(seq):
            on_diagonal = (i // BLOCK - j // BLOCK) in diagonals
            assert mask[i][j] == (j <= i and (j in columns or on_diagonal)), (i, j)


@pytest.mark.parametrize("seq, top_k", [(1, 1), (40, 2), (130, 1), (200, 2), (300, 3), (333, 10)])
def test_block_sparse_kept_set_matches_definition(seq, top_k):
    q, k, v = random_qkv(1, 1, 1, seq, 8)
    pattern = BlockSparse(top_k=top_k)
    index = reference_attention(q, k, v, pattern, return_indices=True).indices[0]
    tiles = brute_block_keep(q[0, 0], k[0, 0], pattern, 8**-0.5)
    assert index.kept_mask(torch.arange(seq), seq)[0].tolist() == tiles_to_mask(tiles, seq)


@pytest.mark.parametrize(
    "seq, stride, coverage",
    [(1, 4, 0.9), (70, 4, 0.9), (130, 8, 0.5), (200, 4, 0.8), (200, 8, 0.3), (257, 8, 0.95), (300, 4, 0.6)],
)
def test_block_coverage_kept_set_matches_definition(seq, stride, coverage):
    """Antidiagonal scores, softmax per query group, tile masses and the coverage rule, all in plain
    Python, against the reference's index, for every query head (GQA) and batch element."""
    q, k, v = random_qkv(2, 2, 1, seq, 8, dtype=torch.float64)
    q = 3 * q  # sharper attention: tile masses that differ
    pattern = BlockCoverage(coverage, stride=stride)
    scale = 8**-0.5
    indices = reference_attention(q, k, v, pattern, return_indices=True).indices
    for head in range(2):
        mask = indices[head].kept_mask(torch.arange(seq), seq)
        for b in range(2):
            tiles, _ = brute_block_coverage(q[b, head], k[b, 0], pattern, scale)
            assert mask[b].tolist() == tiles_to_mask(tiles, seq), (head, b)


@given(n_blocks=st.integers(1, 12), coverage=st.floats(0.01, 1.0), steps=st.sampled_from([2, 4, 1024]),
       seed=st.integers(0, 2**31 - 1))
def test_coverage_selection_keeps_ties_and_matches_the_rule(n_blocks, coverage, steps, seed):
    """The threshold rule on tile masses with many ties (masses on a coarse grid, sums exact in float64)."""
    g = torch.Generator().manual_seed(seed)
    mass = ((torch.rand(1, n_blocks, n_blocks, generator=g, dtype=torch.float64) * steps).floor() / steps).tril()
    mass[0, :, 0] += 1 / steps  # strictly positive rows
    blocks = blocks_at_threshold(mass, coverage_threshold(mass, torch.tensor([coverage], dtype=torch.float64)))[0]
    got = {(m, c) for m in range(n_blocks) for c in blocks[m].tolist() if c >= 0}
    assert got == brute_coverage_selection(mass[0].tolist(), coverage)
    for m in range(n_blocks):  # ascending, padded at the end, the diagonal last
        listed = [c for c in blocks[m].tolist() if c >= 0]
        assert listed == sorted(listed) and listed[-1] == m and blocks[m].tolist()[: len(listed)] == listed


def test_block_coverage_full_coverage_keeps_every_causal_pair():
    q, k, v = random_qkv(2, 4, 2, 333, 16, dtype=torch.float64)
    for stride in (1, 4, 16, 64):
        result = reference_attention(q, k, v, BlockCoverage(1.0, stride=stride), return_indices=True)
        causal = torch.ones(333, 333, dtype=torch.bool).tril()
        for index in result.indices:
            assert torch.equal(index.kept_mask(torch.arange(333), 333), causal.expand(2, -1, -1)), stride
        torch.testing.assert_close(result.out, dense_sdpa(q, k, v))
    # The masses it selects on are strictly positive and hold each query group's whole softmax.
    _, mass = brute_block_coverage(q[0, 0], k[0, 0], BlockCoverage(1.0, stride=8), 16**-0.5)
    assert all(mass[m][c] > 0 for m in range(6) for c in range(m + 1))
    assert [sum(row) for row in mass] == pytest.approx([8.0] * 5 + [(333 - 320 + 7) // 8])


@given(seed=st.integers(0, 2**31 - 1), low=st.floats(0.05, 1.0), high=st.floats(0.05, 1.0),
       stride=st.sampled_from([2, 8, 16]))
def test_block_coverage_more_coverage_never_keeps_fewer_pairs(seed, low, high, stride):
    low, high = min(low, high), max(low, high)
    q, k, _ = random_qkv(1, 2, 1, 400, 16, seed=seed)
    q = 3 * q
    rows = torch.arange(400)
    small = estimate_layer(q, k, [BlockCoverage(low, stride=stride)] * 2, 0.25)  # what reference_attention keeps
    large = estimate_layer(q, k, [BlockCoverage(high, stride=stride)] * 2, 0.25)
    for a, b in zip(small, large):
        kept_small, kept_large = a.kept_mask(rows, 400), b.kept_mask(rows, 400)
        assert not (kept_small & ~kept_large).any()  # a subset, so never fewer pairs
        assert kept_small.sum() <= kept_large.sum()


@pytest.mark.parametrize("seq, sink, local", [(1, 0, 1), (50, 0, 7), (50, 3, 7), (20, 40, 40)])
def test_a_shape_kept_set_matches_definition(seq, sink, local):
    q, k, v = random_qkv(1, 1, 1, seq, 8)
    index = reference_attention(q, k, v, AShape(sink, local), return_indices=True).indices[0]
    mask = index.kept_mask(torch.arange(seq), seq)[0]
    for i in range(seq):
        for j in range(seq):
            assert mask[i, j].item() == (j <= i and (j < sink or i - j < local))


def test_output_is_masked_softmax_over_kept_set():
    """The output for one row, computed by hand from the kept keys only."""
    q, k, v = random_qkv(2, 2, 1, 200, 16)
    result = reference_attention(q, k, v, [VerticalSlash(5, 64, last_q=8), BlockCoverage(0.5, stride=8)],
                                 return_indices=True)
    for b in range(2):
        for head in range(2):
            mask = result.indices[head].kept_mask(torch.arange(200), 200)[b]
            assert mask.sum() < 200 * 201 // 2  # a sparse kept set, not all of them
            for i in (0, 45, 100, 199):
                keys = mask[i].nonzero()[:, 0]
                weights = torch.softmax(q[b, head, i] @ k[b, 0, keys].T / 4.0, dim=0)
                torch.testing.assert_close(result.out[b, head, i], weights @ v[b, 0, keys], rtol=1e-5, atol=1e-6)


# --- all-keeping patterns equal dense attention ------------------------------------------------

dims = st.sampled_from([64, 80, 96, 128])
gqa = st.sampled_from([(1, 1), (4, 1), (8, 1), (4, 4), (8, 2)])
lengths = st.one_of(st.integers(1, 70), st.sampled_from([63, 64, 65, 127, 129, 200]))


@given(seq=lengths, dim=dims, heads=gqa, batch=st.integers(1, 2))
def test_patterns_that_keep_everything_equal_sdpa(seq, dim, heads, batch):
    q_heads, kv_heads = heads
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq, dim)
    want = dense_sdpa(q, k, v)
    everything = [Dense(), VerticalSlash(seq, 1), VerticalSlash(1, seq), BlockSparse(top_k=seq), AShape(0, seq),
                  AShape(seq, 1), BlockCoverage(1.0), BlockCoverage(1.0, stride=1), BlockCoverage(1.0, stride=64)]
    for pattern in everything:
        out = reference_attention(q, k, v, pattern, chunk_size=37).out
        assert rel_error(out, want) < 1e-5, pattern


@given(seq=lengths, heads=gqa, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_sparse_attention_mixed_heads_and_dtypes(seq, heads, dtype):
    """Per-head patterns; output dtype follows q; each head equals its own single-pattern run."""
    q_heads, kv_heads = heads
    q, k, v = random_qkv(1, q_heads, kv_heads, seq, 64, dtype=dtype)
    choices = [VerticalSlash(8, 70, last_q=16), BlockSparse(2), AShape(2, 20), Dense(), BlockCoverage(0.7, stride=8)]
    patterns = [choices[h % len(choices)] for h in range(q_heads)]
    out = sparse_attention(q, k, v, patterns)
    assert out.dtype == dtype and out.shape == q.shape
    group = q_heads // kv_heads
    for head in range(q_heads):
        kv = head // group
        single = reference_attention(q[:, head : head + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], patterns[head]).out
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_error(out[:, head : head + 1], single) < tolerance


@given(seq=st.integers(1, 400), chunk=st.integers(1, 300), heads=gqa)
def test_masked_attention_equals_reference_on_every_chunking(seq, chunk, heads):
    """The CPU fast path (fused SDPA over causal prefixes) computes the reference's kept sets exactly."""
    q_heads, kv_heads = heads
    q, k, v = random_qkv(2, q_heads, kv_heads, seq, 32)
    choices = [VerticalSlash(8, 130), BlockCoverage(0.7, stride=4), BlockSparse(2), AShape(3, 40), Dense(),
               VerticalSlash(3, 64, last_q=16)]
    patterns = [choices[h % len(choices)] for h in range(q_heads)]
    indices = reference_attention(q, k, v, patterns, return_indices=True).indices
    want, _ = attention_with_index(q, k, v, indices, scale=32**-0.5)
    out = masked_attention(q, k, v, indices, scale=32**-0.5, chunk_size=chunk)
    assert rel_error(out, want) < 1e-5


def test_float64_stays_float64_and_budgets_clamp():
    q, k, v = random_qkv(1, 2, 1, 30, 16, dtype=torch.float64)
    result = reference_attention(q, k, v, VerticalSlash(10**6, 10**6), return_indices=True)
    assert result.out.dtype == torch.float64
    assert result.indices[0].columns.shape[1] == 30 and result.indices[0].diagonals.shape[1] == 1
    torch.testing.assert_close(result.out, dense_sdpa(q, k, v))
    # One block: Block-Coverage keeps block 0, which is the diagonal block, at any coverage.
    result = reference_attention(q, k, v, BlockCoverage(0.01, stride=64), return_indices=True)
    assert result.out.dtype == torch.float64 and result.indices[1].padded().tolist() == [[[0]]]
    torch.testing.assert_close(result.out, dense_sdpa(q, k, v))


# --- recall and the estimator on planted structure ---------------------------------------------


def test_recall_matches_brute_force_and_dense_is_one():
    q, k, v = random_qkv(1, 2, 1, 80, 16, seed=3)
    pattern = AShape(2, 10)
    result = reference_attention(q, k, v, pattern, return_recall=True, return_indices=True)
    dense = reference_attention(q, k, v, Dense(), return_recall=True)
    torch.testing.assert_close(dense.recall, torch.ones(1, 2), rtol=1e-6, atol=1e-6)
    for head in range(2):
        logits = (q[0, head] @ k[0, 0].T) / 4.0
        logits = logits.masked_fill(torch.ones(80, 80, dtype=torch.bool).triu(1), -math.inf)
        probs = logits.softmax(-1)
        mask = result.indices[head].kept_mask(torch.arange(80), 80)[0]
        assert result.recall[0, head].item() == pytest.approx((probs * mask).sum(-1).mean().item(), rel=1e-5)


def test_estimator_recovers_planted_columns_and_diagonals():
    """Planted heavy columns are chosen, and so is the block diagonal that holds most of each planted
    diagonal: offset ``o`` lies on block diagonal ``o // 64`` in the rows ``i % 64 >= o % 64`` and on
    ``o // 64 + 1`` in the others (offsets 150, 400, 700: block diagonals 2, 6 and 11 hold 42, 48
    and 60 of every 64 rows)."""
    planted = planted_qkv(batch=2, q_heads=4, kv_heads=2, seq=1024, head_dim=128, columns=3, offsets=(150, 400, 700),
                          generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    pattern = VerticalSlash(vertical=16, slash=64 * 8)  # 2 forced block diagonals + 6: two per planted offset
    result = reference_attention(planted.q, planted.k, planted.v, pattern, return_indices=True, return_recall=True)
    rows = torch.arange(1024)
    for head, index in enumerate(result.indices):
        kv = head // 2
        mask = index.kept_mask(rows, 1024)
        for b in range(2):
            assert set(planted.columns[kv].tolist()) <= set(index.columns[b].tolist())
            for offset in planted.offsets[kv].tolist():
                near = BLOCK - offset % BLOCK  # rows out of 64 whose pair (i, i - o) is on block diagonal o // 64
                majority = offset // BLOCK if near > BLOCK // 2 else offset // BLOCK + 1
                assert majority in index.diagonals[b].tolist(), (head, b, offset)
                i = torch.arange(offset, 1024)
                assert mask[b, i, i - offset].double().mean() >= max(near, BLOCK - near) / BLOCK - 0.01
    a_shape = reference_attention(planted.q, planted.k, planted.v, AShape(16, 80), return_recall=True)
    assert result.recall.mean() > a_shape.recall.mean() + 0.1


def test_kept_fraction_counts_pairs():
    q, k, v = random_qkv(1, 1, 1, 100, 8)
    index = reference_attention(q, k, v, AShape(0, 1), return_indices=True).indices[0]
    assert kept_fraction(index, 100).item() == pytest.approx(100 / 5050)
    dense = reference_attention(q, k, v, Dense(), return_indices=True).indices[0]
    assert kept_fraction(dense, 100, chunk_size=7).item() == pytest.approx(1.0)


def test_chunking_does_not_change_results():
    q, k, v = random_qkv(1, 4, 1, 150, 32)
    pattern = [VerticalSlash(4, 70), BlockSparse(2), AShape(1, 40), BlockCoverage(0.8, stride=8)]
    a = reference_attention(q, k, v, pattern, chunk_size=1000, return_recall=True)
    b = reference_attention(q, k, v, pattern, chunk_size=13, return_recall=True)
    torch.testing.assert_close(a.out, b.out)
    torch.testing.assert_close(a.recall, b.recall)


def test_32k_tokens_9_heads_memory_is_bounded_by_chunks():
    """The per-chunk temporaries, not seq x seq, bound memory: check the largest tensor made."""
    q, k, v = random_qkv(1, 3, 1, 2048, 16)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                seen.append(result.numel())
            return result

    with Spy():
        reference_attention(q, k, v, [VerticalSlash(16, 128), BlockCoverage(0.9), AShape(4, 256)], chunk_size=256,
                            return_recall=True)
    assert max(seen) <= 256 * 2048 * 2


# --- queries that are the last part of the keys ------------------------------------------------


@pytest.mark.parametrize("q_len", [1, 63, 64, 65, 128, 199, 200, 137])
def test_a_chunk_keeps_what_the_whole_prompt_keeps(q_len):
    """Dense, A-shape, Block-Sparse and Block-Coverage keep, on a chunk's whole query blocks, exactly
    what one pass over the whole prompt keeps there; a partial first block keeps every causal key."""
    seq = 200
    q, k, v = random_qkv(2, 4, 2, seq, 16)
    q = 3 * q
    patterns = [Dense(), AShape(3, 50), BlockSparse(2), BlockCoverage(0.7, stride=8)]
    whole = reference_attention(q, k, v, patterns, return_indices=True).indices
    chunk = reference_attention(q[:, :, seq - q_len :], k, v, patterns, return_indices=True).indices
    q_start = seq - q_len
    rows = torch.arange(q_start, seq)
    in_whole_block = rows >= -(-q_start // BLOCK) * BLOCK
    causal = torch.arange(seq)[None, :] <= rows[:, None]
    for head in range(4):
        got, want = chunk[head].kept_mask(rows, seq), whole[head].kept_mask(rows, seq)
        assert torch.equal(got[:, in_whole_block], want[:, in_whole_block]), patterns[head]
        if head >= 2:  # block lists: the partial block's rows are dense
            assert bool(got[:, ~in_whole_block].eq(causal[~in_whole_block]).all()), patterns[head]


@pytest.mark.parametrize("q_len, last_q", [(200, 64), (100, 64), (30, 64), (1, 16)])
def test_a_chunks_vertical_slash_index_comes_from_its_own_last_queries(q_len, last_q):
    """The chunk's last queries are the prompt's last queries: the same index as the whole prompt's
    with last_q cut to the chunk (docs/semantics.md)."""
    seq = 200
    q, k, v = random_qkv(1, 2, 1, seq, 16)
    pattern = VerticalSlash(12, 128, last_q=last_q)
    chunk = reference_attention(q[:, :, seq - q_len :], k, v, pattern, return_indices=True).indices
    whole = reference_attention(q, k, v, VerticalSlash(12, 128, last_q=min(last_q, q_len)), return_indices=True).indices
    for got, want in zip(chunk, whole):
        assert torch.equal(got.columns, want.columns) and torch.equal(got.diagonals, want.diagonals)


@pytest.mark.parametrize("q_len", [1, 64, 70, 150])
def test_log_sum_exp_merges_two_halves_of_the_keys(q_len):
    """The attention over all keys equals the merge, by log-sum-exp, of the attention over the keys
    before the chunk (every one of them visible to every query) and over the chunk's own keys (causal)."""
    seq = 200
    q, k, v = random_qkv(2, 4, 2, seq, 16, dtype=torch.float64)
    q = q[:, :, seq - q_len :]
    q_start = seq - q_len
    out, lse = sparse_attention(q, k, v, Dense(), return_lse=True)
    own_out, own_lse = sparse_attention(q, k[:, :, q_start:], v[:, :, q_start:], Dense(), return_lse=True)
    before = torch.einsum("bhqd,bhkd->bhqk", q, k[:, :, :q_start].repeat_interleave(2, dim=1)) * 16**-0.5
    before_lse = before.logsumexp(dim=-1)
    before_out = torch.einsum("bhqk,bhkd->bhqd", before.softmax(dim=-1), v[:, :, :q_start].repeat_interleave(2, dim=1))
    merged_lse = torch.logaddexp(before_lse, own_lse)
    merged = (before_out * (before_lse - merged_lse).exp()[..., None] + own_out * (own_lse - merged_lse).exp()[..., None])
    torch.testing.assert_close(lse, merged_lse.to(lse.dtype))
    torch.testing.assert_close(out, merged)


def test_lse_is_the_log_sum_exp_of_the_kept_logits():
    q, k, v = random_qkv(1, 4, 2, 150, 16)
    patterns = [Dense(), AShape(2, 30), VerticalSlash(8, 64), BlockCoverage(0.8)]
    out, lse = sparse_attention(q[:, :, 40:], k, v, patterns, return_lse=True)
    indices = estimate_layer(q[:, :, 40:], k, patterns, 16**-0.5)
    rows = torch.arange(40, 150)
    for head, index in enumerate(indices):
        logits = q[0, head, 40:] @ k[0, head // 2].T * 16**-0.5
        want = logits.masked_fill(~index.kept_mask(rows, 150)[0], float("-inf")).logsumexp(dim=-1)
        torch.testing.assert_close(lse[0, head], want)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        sparse_attention(q, k, v, Dense(), return_lse=1)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have rank 4 \[batch, heads, seq, head_dim\]"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q must be float16, bfloat16, float32 or float64"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), ValueError, "q_len <= kv_len is needed, got q seq=10, k seq=5"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of the number of KV heads, got q_heads=3, kv_heads=2"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, "same head_dim, got q head_dim=8, k head_dim=16"),
        (lambda q, k, v: (q, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)) if False else (q[:1], k, v),
         ValueError, "same batch size"),
        (lambda q, k, v: (q.index_fill(2, torch.tensor([3]), float("nan")), k, v), ValueError, "q contains NaN or Inf"),
        (lambda q, k, v: (q, k.index_fill(2, torch.tensor([3]), float("inf")), v), ValueError, "k contains NaN or Inf"),
        # NaN in v used to pass through to NaN output rows.
        (lambda q, k, v: (q, k, v.index_fill(2, torch.tensor([3]), float("nan"))), ValueError, "v contains NaN or Inf"),
        (lambda q, k, v: (q, k, v.index_fill(2, torch.tensor([0]), float("-inf"))), ValueError, "v contains NaN or Inf"),
        (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors(make, error, message):
    q, k, v = random_qkv(2, 4, 2, 10, 16)
    with pytest.raises(error, match=message):
        sparse_attention(*make(q, k, v), Dense())


@pytest.mark.parametrize("return_lse", [False, True])
def test_cpu_path_keeps_nothing_for_autograd_and_refuses_a_backward(return_lse):
    """Prefill is inference: under autograd the CPU path kept every chunk's mask and probabilities
    for a backward (twice dense's memory). Inputs that require grad are attended with autograd off,
    and a backward through the output says why it cannot be, instead of treating attention as a
    constant."""
    patterns = [VerticalSlash(4, 32), BlockCoverage(0.9), AShape(2, 16), Dense()]
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 2, 130, 16))
    saved = []
    assert torch.is_grad_enabled()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        result = sparse_attention(q, k, v, patterns, return_lse=return_lse)
    assert saved == []  # the old CPU path saved masks, logits and probabilities here
    out = result[0] if return_lse else result
    with torch.no_grad():
        expected = reference_attention(q, k, v, patterns).out
    torch.testing.assert_close(out, expected.to(out.dtype))
    with pytest.raises(RuntimeError, match=r"sparse attention is for inference \(prefill\) and has no backward: run "
                                           r"the model under torch.no_grad\(\)"):
        out.sum().backward()


def test_bad_patterns_and_scale():
    q, k, v = random_qkv(1, 4, 2, 10, 16)
    with pytest.raises(ValueError, match="one pattern per query head: got 3 patterns for q_heads=4"):
        sparse_attention(q, k, v, [Dense()] * 3)
    with pytest.raises(TypeError, match=r"patterns\[1\] must be one of"):
        sparse_attention(q, k, v, [Dense(), "dense", Dense(), Dense()])
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        sparse_attention(q, k, v, Dense(), scale=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        reference_attention(q, k, v, Dense(), chunk_size=0)
