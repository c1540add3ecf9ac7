"""The reference against independent, element-by-element statements of docs/semantics.md."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparse_prefill import AShape, BlockSparse, Dense, VerticalSlash, reference_attention, sparse_attention
from sparse_prefill.estimate import diagonal_sums, last_query_attention
from sparse_prefill.index import SINK_COLUMNS, forced_diagonals, kept_fraction
from sparse_prefill.masked_attention import masked_attention
from sparse_prefill.reference import attention_with_index
from sparse_prefill.synthetic import planted_qkv


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
    """Column scores, and diagonal scores of the mass not on ``columns``, from plain loops."""
    seq, block = q.shape[0], pattern.slash_block
    column, diagonal = [0.0] * seq, [0.0] * (-(-seq // block))
    for (i, j), p in brute_last_query_probs(q, k, pattern.last_q, scale).items():
        column[j] += p
        if j not in columns:
            diagonal[i // block - j // block] += p
    return column, diagonal


def brute_block_keep(q, k, pattern, scale):
    """Set of (query block, key block) tiles kept, for one head."""
    seq, block = q.shape[0], pattern.block
    n = -(-seq // block)
    pooled_q = [q[b * block : (b + 1) * block].double().mean(0) for b in range(n)]
    pooled_k = [k[b * block : (b + 1) * block].double().mean(0) for b in range(n)]
    tiles = set()
    for b in range(n):
        scores = {c: (pooled_q[b] @ pooled_k[c]).item() * scale for c in range(b + 1)}
        scores[b] = math.inf
        chosen = sorted(scores, key=scores.get, reverse=True)[: pattern.top_k]
        tiles |= {(b, c) for c in chosen}
    return tiles


@pytest.mark.parametrize("seq", [1, 5, 37, 70])
def test_last_query_attention_and_diagonal_sums_match_loops(seq):
    q, k, _ = random_qkv(1, 1, 1, seq, 8)
    probs = last_query_attention(q[:, 0], k[:, 0], 16, 0.3)
    n_last = min(16, seq)
    want = torch.zeros(n_last, seq)
    for (i, j), p in brute_last_query_probs(q[0, 0], k[0, 0], 16, 0.3).items():
        want[i - (seq - n_last), j] = p
    torch.testing.assert_close(probs[0], want, rtol=1e-5, atol=1e-6)
    want_diagonal = torch.zeros(seq)
    for r in range(n_last):
        for j in range(seq):
            i = seq - n_last + r
            if j <= i:
                want_diagonal[i - j] += want[r, j]
    torch.testing.assert_close(diagonal_sums(probs)[0], want_diagonal, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slash_block", [1, 64])
@pytest.mark.parametrize("seq", [3, 64, 100, 200])
def test_vertical_slash_kept_set_matches_definition(seq, slash_block):
    q, k, v = random_qkv(1, 1, 1, seq, 16)
    pattern = VerticalSlash(vertical=10, slash=70 if slash_block == 1 else 130, last_q=20, slash_block=slash_block)
    result = reference_attention(q, k, v, pattern, return_indices=True)
    index = result.indices[0]
    columns, diagonals = set(index.columns[0].tolist()), set(index.diagonals[0].tolist())
    n_diagonals = -(-seq // slash_block)
    assert len(columns) == min(10, seq)
    assert len(diagonals) == min(-(-pattern.slash // slash_block), n_diagonals)
    assert set(range(min(SINK_COLUMNS, seq))) <= columns
    forced = forced_diagonals(slash_block)
    assert set(range(min(forced, n_diagonals))) <= diagonals
    column_scores, diagonal_scores = brute_vertical_slash(q[0, 0], k[0, 0], pattern, 16**-0.5, columns)
    # Outside the forced ones, the chosen are the best scored.
    for chosen_set, scores, first in ((columns, column_scores, SINK_COLUMNS), (diagonals, diagonal_scores, forced)):
        free = range(first, len(scores))
        chosen = [x for x in free if x in chosen_set]
        rest = [x for x in free if x not in chosen_set]
        if chosen and rest:
            assert min(scores[x] for x in chosen) >= max(scores[x] for x in rest) - 1e-6
    mask = index.kept_mask(torch.arange(seq), seq)[0]
    for i in range(seq):
        for j in range(seq):
            on_diagonal = (i // slash_block - j // slash_block) in diagonals
            assert mask[i, j].item() == (j <= i and (j in columns or on_diagonal))


@pytest.mark.parametrize("seq, top_k, block", [(1, 1, 16), (40, 2, 16), (100, 3, 16), (130, 10, 32)])
def test_block_sparse_kept_set_matches_definition(seq, top_k, block):
    q, k, v = random_qkv(1, 1, 1, seq, 8)
    pattern = BlockSparse(top_k=top_k, block=block)
    index = reference_attention(q, k, v, pattern, return_indices=True).indices[0]
    tiles = brute_block_keep(q[0, 0], k[0, 0], pattern, 8**-0.5)
    mask = index.kept_mask(torch.arange(seq), seq)[0]
    for i in range(seq):
        for j in range(seq):
            assert mask[i, j].item() == (j <= i and (i // block, j // block) in tiles)


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
    q, k, v = random_qkv(2, 2, 1, 90, 16)
    result = reference_attention(q, k, v, VerticalSlash(5, 66, last_q=8, slash_block=1), return_indices=True)
    for b in range(2):
        for head in range(2):
            mask = result.indices[head].kept_mask(torch.arange(90), 90)[b]
            for i in (0, 45, 89):
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
    everything = [Dense(), VerticalSlash(seq, seq, slash_block=1), VerticalSlash(1, seq), BlockSparse(top_k=seq),
                  AShape(0, seq), AShape(seq, 1)]
    for pattern in everything:
        out = reference_attention(q, k, v, pattern, chunk_size=37).out
        assert rel_error(out, want) < 1e-5, pattern


@given(seq=lengths, heads=gqa, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_sparse_attention_mixed_heads_and_dtypes(seq, heads, dtype):
    """Per-head patterns; output dtype follows q; each head equals its own single-pattern run."""
    q_heads, kv_heads = heads
    q, k, v = random_qkv(1, q_heads, kv_heads, seq, 64, dtype=dtype)
    choices = [VerticalSlash(8, 70, last_q=16), BlockSparse(2, block=16), AShape(2, 20), Dense()]
    patterns = [choices[h % 4] for h in range(q_heads)]
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
    choices = [VerticalSlash(8, 130), VerticalSlash(8, 70, slash_block=1), BlockSparse(2, block=16), AShape(3, 40), Dense()]
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
    planted = planted_qkv(batch=2, q_heads=4, kv_heads=2, seq=1024, head_dim=128, columns=3, offsets=(150, 400, 700),
                          generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    pattern = VerticalSlash(vertical=16, slash=64 + 16, slash_block=1)
    result = reference_attention(planted.q, planted.k, planted.v, pattern, return_indices=True, return_recall=True)
    for head, index in enumerate(result.indices):
        kv = head // 2
        for b in range(2):
            assert set(planted.columns[kv].tolist()) <= set(index.columns[b].tolist())
            assert set(planted.offsets[kv].tolist()) <= set(index.diagonals[b].tolist())
    a_shape = reference_attention(planted.q, planted.k, planted.v, AShape(16, 80), return_recall=True)
    assert result.recall.mean() > a_shape.recall.mean() + 0.1


def test_kept_fraction_counts_pairs():
    q, k, v = random_qkv(1, 1, 1, 100, 8)
    index = reference_attention(q, k, v, AShape(0, 1), return_indices=True).indices[0]
    assert kept_fraction(index, 100).item() == pytest.approx(100 / 5050)
    dense = reference_attention(q, k, v, Dense(), return_indices=True).indices[0]
    assert kept_fraction(dense, 100, chunk_size=7).item() == pytest.approx(1.0)


def test_chunking_does_not_change_results():
    q, k, v = random_qkv(1, 3, 1, 150, 32)
    pattern = [VerticalSlash(4, 70), BlockSparse(2, block=32), AShape(1, 40)]
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
        reference_attention(q, k, v, VerticalSlash(16, 128), chunk_size=256, return_recall=True)
    assert max(seen) <= 256 * 2048 * 2


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have rank 4 \[batch, heads, seq, head_dim\]"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q must be float16, bfloat16, float32 or float64"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q[:, :, :5], k, v), ValueError, "as many keys as queries"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of the number of KV heads, got q_heads=3, kv_heads=2"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, "same head_dim, got q head_dim=8, k head_dim=16"),
        (lambda q, k, v: (q, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)) if False else (q[:1], k, v),
         ValueError, "same batch size"),
        (lambda q, k, v: (q.index_fill(2, torch.tensor([3]), float("nan")), k, v), ValueError, "q contains NaN or Inf"),
        (lambda q, k, v: (q, k.index_fill(2, torch.tensor([3]), float("inf")), v), ValueError, "k contains NaN or Inf"),
        (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors(make, error, message):
    q, k, v = random_qkv(2, 4, 2, 10, 16)
    with pytest.raises(error, match=message):
        sparse_attention(*make(q, k, v), Dense())


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
