"""Sparse decoding: page summaries, page selection, the reference and the Triton decode kernel.

The selection is checked against a brute-force reading of docs/semantics.md ("Sparse decoding");
the kernel against the PyTorch reference on the same selection, under TRITON_INTERPRET=1 on a CPU
(float16: the interpreter computes bf16 dots wrongly) and on the GPU when there is one.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparse_prefill.decoding import (
    PageSelection,
    choose_pages,
    decode_attention_reference,
    page_scores,
    page_summaries,
    page_upper_bounds,
    page_attention_mass,
    recovery_ratio,
    select_pages,
    sparse_decode_attention,
)

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
KERNEL_DTYPES = [torch.float16, torch.bfloat16] if HAS_GPU else [torch.float16]


def fresh(*shape, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(torch.seed() % 2**31)
    return torch.randn(shape, generator=g, device=device).to(dtype)


def fresh_step(batch, q_heads, kv_heads, n_keys, head_dim, dtype=torch.float32, device="cpu"):
    q = fresh(batch, q_heads, 1, head_dim, dtype=dtype, device=device)
    k = fresh(batch, kv_heads, n_keys, head_dim, dtype=dtype, device=device)
    v = fresh(batch, kv_heads, n_keys, head_dim, dtype=dtype, device=device)
    return q, k, v


def brute_summaries(k, page_size):
    n_pages = math.ceil(k.shape[2] / page_size)
    pages = [k[:, :, p * page_size : (p + 1) * page_size] for p in range(n_pages)]
    return torch.stack([p.amin(2) for p in pages], 2), torch.stack([p.amax(2) for p in pages], 2)


# --- summaries -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_keys", [1, 15, 16, 17, 63, 64, 65, 200, 513])
@pytest.mark.parametrize("page_size", [1, 16, 24, 64])
def test_summaries_are_the_pages_min_and_max(n_keys, page_size):
    k = fresh(2, 3, n_keys, 8, dtype=torch.bfloat16)
    summaries = page_summaries(k, page_size)
    want_min, want_max = brute_summaries(k, page_size)
    assert summaries.n_pages == math.ceil(n_keys / page_size) and summaries.shape == (2, 3, n_keys, 8)
    assert summaries.key_min.dtype == torch.bfloat16
    assert torch.equal(summaries.key_min, want_min) and torch.equal(summaries.key_max, want_max)


@given(chunks=st.lists(st.integers(0, 40), min_size=1, max_size=12), page_size=st.sampled_from([1, 4, 16, 24]),
       capacity=st.sampled_from([0, 7, 300]))
def test_appending_keys_equals_building_once(chunks, page_size, capacity):
    """Prefill then decode one token (or a few) at a time: the same summaries as one build."""
    k = fresh(1, 2, sum(chunks), 8, dtype=torch.float16)
    summaries = page_summaries(k[:, :, : chunks[0]], page_size, capacity=capacity)
    start = chunks[0]
    for size in chunks[1:]:
        summaries.append(k[:, :, start : start + size])
        start += size
    assert summaries.n_keys == sum(chunks)
    if sum(chunks):
        want_min, want_max = brute_summaries(k, page_size)
        assert torch.equal(summaries.key_min, want_min) and torch.equal(summaries.key_max, want_max)


def test_capacity_keeps_the_storage_in_place():
    k = fresh(1, 1, 40, 8)
    summaries = page_summaries(k[:, :, :10], 4, capacity=40)
    storage = summaries.key_min.data_ptr()
    for t in range(10, 40):
        summaries.append(k[:, :, t : t + 1])
    assert summaries.key_min.data_ptr() == storage


# --- selection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_upper_bound_holds_for_every_key(dtype):
    q, k, _ = fresh_step(2, 8, 2, 137, 16, dtype=dtype)
    summaries = page_summaries(k, 16)
    bounds = page_upper_bounds(q, summaries, scale=0.3)  # [batch, q_heads, n_pages]
    logits = torch.matmul(q.double(), k.double().repeat_interleave(4, dim=1).transpose(-1, -2))[:, :, 0] * 0.3
    pad = F.pad(logits, (0, summaries.n_pages * 16 - 137), value=float("-inf"))
    best = pad.view(2, 8, -1, 16).amax(-1)
    assert (bounds.double() >= best - 1e-4).all()
    # A page of one key is its own box: the bound is the logit.
    exact = page_upper_bounds(q, page_summaries(k, 1), scale=0.3)
    torch.testing.assert_close(exact.double(), logits, rtol=1e-3, atol=1e-3)


def brute_selection(q, k, page_size, budget, sink, local, scale=None):
    """docs/semantics.md, read literally: forced pages, then the rest by (score desc, page asc)."""
    n_keys = k.shape[2]
    n_pages = math.ceil(n_keys / page_size)
    # The score of a page is the largest bound over the KV head's group of query heads.
    bounds = page_upper_bounds(q, page_summaries(k, page_size), scale)  # [batch, q_heads, n_pages]
    scores = bounds.view(k.shape[0], k.shape[1], -1, n_pages).amax(2).float()  # [batch, kv_heads, n_pages]
    forced = {p for p in range(n_pages) if p * page_size < sink or (p + 1) * page_size > n_keys - local}
    target = min(n_pages, max(math.ceil(budget / page_size), len(forced)))
    pages = torch.empty(k.shape[0], k.shape[1], target, dtype=torch.int32)
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            free = sorted((p for p in range(n_pages) if p not in forced), key=lambda p: (-scores[b, h, p].item(), p))
            pages[b, h] = torch.tensor(sorted(forced | set(free[: target - len(forced)])), dtype=torch.int32)
    return pages


@given(
    n_keys=st.one_of(st.sampled_from([1, 63, 64, 65, 200, 513]), st.integers(1, 600)),
    page_size=st.sampled_from([1, 8, 16, 24, 64]),
    heads=st.sampled_from([(1, 1), (4, 1), (8, 2), (2, 2)]),
    sink=st.integers(0, 40),
    local=st.integers(1, 100),
    extra=st.integers(0, 700),
    batch=st.integers(1, 2),
)
def test_selection_follows_the_definition(n_keys, page_size, heads, sink, local, extra, batch):
    q_heads, kv_heads = heads
    q, k, _ = fresh_step(batch, q_heads, kv_heads, n_keys, 16)
    budget = sink + local + extra
    selection = select_pages(q, page_summaries(k, page_size), budget=budget, sink=sink, local=local)
    want = brute_selection(q, k, page_size, budget, sink, local)
    assert selection.pages.dtype == torch.int32 and torch.equal(selection.pages, want)
    kept = selection.kept_mask()
    assert kept[:, :, : min(sink, n_keys)].all() and kept[:, :, max(0, n_keys - local) :].all()
    assert int(kept[0, 0].sum()) == selection.kept_keys()


@pytest.mark.parametrize("n_keys", [1, 63, 64, 65, 200, 513])
def test_budget_of_the_whole_cache_keeps_every_page(n_keys):
    q, k, _ = fresh_step(1, 4, 1, n_keys, 16)
    selection = select_pages(q, page_summaries(k, 16), budget=max(n_keys, 80), sink=4, local=64)
    assert selection.kept_mask().all()


def test_ties_go_to_the_lower_page():
    k = torch.ones(1, 1, 160, 8)  # every page has the same summary and score
    q = torch.ones(1, 2, 1, 8)
    selection = select_pages(q, page_summaries(k, 16), budget=64, sink=16, local=16)
    assert selection.pages.tolist() == [[[0, 1, 2, 9]]]


def test_page_scores_are_the_groups_largest_bound():
    q, k, _ = fresh_step(2, 6, 2, 150, 16)
    summaries = page_summaries(k, 16)
    bounds = page_upper_bounds(q, summaries, 0.3)
    scores = page_scores(q, summaries, 0.3)
    assert scores.shape == (2, 2, 10)
    for head in range(6):  # every head's bound is at most its KV head's score, and some head reaches it
        assert (bounds[:, head] <= scores[:, head // 3]).all()
    reached = (bounds.view(2, 2, 3, 10) == scores[:, :, None]).any(2)
    assert reached.all()
    # A positive scale multiplies every bound: the same ranking.
    ranks = page_scores(q, summaries, 0.3).argsort(dim=-1, descending=True, stable=True)
    assert torch.equal(ranks, page_scores(q, summaries, 2.0).argsort(dim=-1, descending=True, stable=True))


def test_a_page_one_head_singles_out_is_kept():
    """The needle case: query head 0's best page (bound 5) has two near rivals (4.8), so its softmax
    gives it only 0.38, while head 1 puts 0.5 and 0.48 on two pages of bound ~4. Summing per-head
    softmaxes (the rule until 2026-11-30) keeps head 1's two pages and drops page 1; the group's
    largest bound keeps page 1, the highest logit bound of any head."""
    k = torch.zeros(1, 1, 97, 2)
    k[0, 0, 0:16] = torch.tensor([0.96, -1.0])  # page 0: near rival for head 0
    k[0, 0, 16:32] = torch.tensor([1.0, -1.0])  # page 1: head 0's needle
    k[0, 0, 32:48, 1] = 1.0  # pages 2, 3: head 1's favourites
    k[0, 0, 48:64, 1] = 0.99
    k[0, 0, 80:96] = torch.tensor([0.96, -1.0])  # page 5: the other near rival
    q = torch.tensor([[[[5.0, 0.0]], [[0.0, 4.0]]]])
    summaries = page_summaries(k, 16)
    selection = select_pages(q, summaries, budget=48, sink=0, local=1, scale=1.0)
    assert selection.pages.tolist() == [[[0, 1, 6]]]  # tie 0 / 5 to the lower page; page 6 holds the own key
    old_rule = page_upper_bounds(q, summaries, 1.0).softmax(-1).sum(1, keepdim=True)  # [1, 1, 7]
    old = choose_pages(old_rule, 97, 16, budget=48, sink=0, local=1)
    assert old.pages.tolist() == [[[2, 3, 6]]]  # the test separates the two rules


# --- reference ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_reference_is_sdpa_over_the_cache(dtype):
    q, k, v = fresh_step(2, 8, 2, 77, 32, dtype=dtype)
    out, lse = decode_attention_reference(q, k, v, return_lse=True)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, want)
    logits = torch.matmul(q, k.repeat_interleave(4, dim=1).transpose(-1, -2)) * 32**-0.5
    torch.testing.assert_close(lse, logits.logsumexp(-1))
    assert lse.dtype == dtype


def test_reference_attends_to_exactly_the_selected_keys():
    q, k, v = fresh_step(2, 4, 2, 200, 16, dtype=torch.float64)
    selection = select_pages(q, page_summaries(k, 16), budget=64, sink=4, local=20)
    out, lse = decode_attention_reference(q, k, v, selection, return_lse=True)
    mask = selection.kept_mask().repeat_interleave(2, dim=1)[:, :, None]  # [batch, q_heads, 1, n_keys]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want)
    # The selected and the unselected keys merge by log-sum-exp into the dense attention.
    rest = PageSelection(torch.tensor([[[p for p in range(13) if p not in row] for row in b]
                                       for b in selection.pages.tolist()], dtype=torch.int32), 200, 16)
    out2, lse2 = decode_attention_reference(q, k, v, rest, return_lse=True)
    total = torch.logaddexp(lse, lse2)
    merged = out * (lse - total).exp()[..., None] + out2 * (lse2 - total).exp()[..., None]
    torch.testing.assert_close(merged, decode_attention_reference(q, k, v))


def test_recovery_ratio_is_the_dense_mass_on_the_kept_keys():
    q, k, _ = fresh_step(2, 4, 1, 150, 16, dtype=torch.float64)
    selection = select_pages(q, page_summaries(k, 16), budget=48, sink=0, local=1)
    ratio = recovery_ratio(q, k, selection)
    probabilities = (torch.matmul(q, k.transpose(-1, -2)) * 0.25).softmax(-1)[:, :, 0]  # [batch, q_heads, n_keys]
    want = (probabilities * selection.kept_mask()).sum(-1)  # one KV head: its mask serves all query heads
    torch.testing.assert_close(ratio, want)
    everything = select_pages(q, page_summaries(k, 16), budget=150, sink=0, local=1)
    torch.testing.assert_close(recovery_ratio(q, k, everything), torch.ones(2, 4, dtype=torch.float64))


def test_page_attention_mass_sums_each_groups_dense_attention_per_page():
    # GQA (6 query heads on 2 KV heads) and a partial last page (150 keys, pages of 16).
    q, k, _ = fresh_step(2, 6, 2, 150, 16, dtype=torch.float64)
    mass = page_attention_mass(q, k, 16)
    assert mass.shape == (2, 2, 10)
    keys = k.repeat_interleave(3, 1)
    probabilities = (torch.matmul(q, keys.transpose(-1, -2)) * 0.25).softmax(-1)[:, :, 0]  # [batch, q_heads, n_keys]
    for page in (0, 4, 9):
        want = probabilities[..., page * 16 : (page + 1) * 16].sum(-1).view(2, 2, 3).sum(-1)
        torch.testing.assert_close(mass[..., page], want)
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 2), 3.0, dtype=torch.float64))
    # The oracle keeps at least the mass the bound-based selection keeps at the same budget (summed per group).
    oracle = choose_pages(mass, 150, 16, budget=48, sink=0, local=1)
    estimated = select_pages(q, page_summaries(k, 16), budget=48, sink=0, local=1)
    assert (recovery_ratio(q, k, oracle).view(2, 2, 3).sum(-1)
            >= recovery_ratio(q, k, estimated).view(2, 2, 3).sum(-1) - 1e-12).all()
    with pytest.raises(ValueError, match="page_size"):
        page_attention_mass(q, k, 0)


def test_selection_finds_planted_keys():
    """A few keys aligned with one query head: the selection finds their pages and most of the mass."""
    q, k, _ = fresh_step(1, 4, 1, 1024, 32)
    hot = torch.tensor([100, 300, 301, 700])
    direction = q[0, 1, 0] / q[0, 1, 0].norm()
    q[0, 1, 0] = direction * 6
    k[0, 0, hot] = direction * 12  # one head's favourite keys: logits ~10.6 against ~N(0, 1) (0 failures in 500 draws)
    selection = select_pages(q, page_summaries(k, 16), budget=192, sink=16, local=64)
    kept = selection.kept_mask()[0, 0]
    assert kept[hot].all()
    assert recovery_ratio(q, k, selection)[0, 1] > 0.9


def test_sparse_decode_attention_on_cpu():
    q, k, v = fresh_step(2, 8, 2, 300, 16)
    summaries = page_summaries(k, 16)
    out, lse, selection = sparse_decode_attention(q, k, v, summaries, budget=96, sink=16, local=32,
                                                  return_lse=True, return_selection=True)
    want, want_lse = decode_attention_reference(q, k, v, selection, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert selection.n_selected == 6
    dense = sparse_decode_attention(q, k, v, summaries, budget=300, sink=16, local=32)
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def test_decoding_loop_with_appended_keys():
    """A cache that grows one token per step, its summaries appended as it grows."""
    q, k, v = fresh_step(1, 4, 2, 120, 16)
    summaries = page_summaries(k[:, :, :100], 16, capacity=120)
    for n in range(101, 121):
        summaries.append(k[:, :, n - 1 : n])
        out, selection = sparse_decode_attention(q, k[:, :, :n], v[:, :, :n], summaries, budget=64, sink=4, local=16,
                                                 return_selection=True)
        assert selection.n_keys == n and selection.kept_mask()[:, :, -16:].all()
        torch.testing.assert_close(out, decode_attention_reference(q, k[:, :, :n], v[:, :, :n], selection))


# --- validation --------------------------------------------------------------------------------------------


def test_clear_errors_before_any_work():
    q, k, v = fresh_step(1, 4, 2, 50, 16)
    summaries = page_summaries(k, 16)
    cases = [
        (dict(budget=10), "budget must be at least sink \\+ local .* got budget=10, sink=16, local=64"),
        (dict(budget=100, local=0), "local must be an int >= 1, got local=0"),
        (dict(budget=100, sink=-1), "sink must be an int >= 0, got sink=-1"),
        (dict(budget=2.5), "budget must be an int >= 1, got budget=2.5"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sparse_decode_attention(q, k, v, summaries, **kwargs)
    with pytest.raises(ValueError, match="one decode step.*got q_len=3"):
        sparse_decode_attention(q.expand(1, 4, 3, 16), k, v, summaries)
    with pytest.raises(ValueError, match="multiple of the number of KV heads, got q_heads=3, kv_heads=2"):
        sparse_decode_attention(q[:, :3], k, v, summaries)
    with pytest.raises(ValueError, match="k_cache must have rank 4 .*got shape \\(50, 16\\)"):
        sparse_decode_attention(q, k[0, 0], v, summaries)
    with pytest.raises(TypeError, match="must share one dtype, got q=torch.float32, k_cache=torch.float16"):
        sparse_decode_attention(q, k.half(), v.half(), summaries)
    with pytest.raises(ValueError, match="summaries cover .*\\[1, 2, 49, 16\\], k_cache has \\[1, 2, 50, 16\\]"):
        sparse_decode_attention(q, k, v, page_summaries(k[:, :, :49], 16))
    with pytest.raises(TypeError, match="summaries must be a PageSummaries"):
        sparse_decode_attention(q, k, v, k)
    with pytest.raises(ValueError, match="page_size must be an int >= 1, got page_size=0"):
        page_summaries(k, 0)
    with pytest.raises(ValueError, match="keys must be \\[batch=1, kv_heads=2, new, head_dim=16\\]"):
        summaries.append(k[:, :1])
    with pytest.raises(ValueError, match="keys contains NaN or Inf"):
        summaries.append(torch.full((1, 2, 1, 16), float("nan")))
    with pytest.raises(ValueError, match="scores must be a tensor \\[batch, kv_heads, n_pages=4\\], got \\(1, 2, 3\\)"):
        choose_pages(torch.zeros(1, 2, 3), 50, 16, budget=100, sink=0, local=1)
    with pytest.raises(ValueError, match="summaries cover n_keys=0"):
        select_pages(q, page_summaries(k[:, :, :0], 16), budget=100, sink=0, local=1)


def test_import_does_not_load_triton():
    code = ("import sys, sparse_prefill.decoding as d; import sparse_prefill as s; "
            "assert s.sparse_decode_attention is d.sparse_decode_attention; assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": "src"})


# --- the Triton kernel -----------------------------------------------------------------------------------

triton = pytest.importorskip("triton")  # the tests above need no Triton


def check_kernel(batch, q_heads, kv_heads, n_keys, head_dim, page_size, budget, sink, local, dtype,
                 slots_per_split=None):
    from sparse_prefill.kernels.decode import decode_over_pages

    q, k, v = fresh_step(batch, q_heads, kv_heads, n_keys, head_dim, dtype=dtype, device=DEVICE)
    selection = select_pages(q, page_summaries(k, page_size), budget=budget, sink=sink, local=local)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    out, lse = decode_over_pages(q, k, v, selection.pages, n_keys, page_size, head_dim**-0.5, return_lse=True,
                                 out=out, slots_per_split=slots_per_split)
    ref, ref_lse = decode_attention_reference(q.double(), k.double(), v.double(), selection, return_lse=True)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all() and error <= 1e-2, error
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-3)
    return out


@pytest.mark.parametrize("n_keys", [1, 63, 64, 65, 200, 513])
@pytest.mark.parametrize("page_size", [8, 16, 64])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)])
def test_kernel_matches_reference(n_keys, page_size, heads):
    q_heads, kv_heads = heads
    for budget in (page_size + 64, n_keys + page_size):  # smaller and larger than the cache
        check_kernel(2, q_heads, kv_heads, n_keys, 64, page_size, max(budget, 80), 16, 64, torch.float16)


@given(
    n_keys=st.one_of(st.sampled_from([1, 63, 64, 65, 200, 513]), st.integers(1, 700)),
    head_dim=st.sampled_from([16, 64, 80, 128]),
    heads=st.sampled_from([(1, 1), (4, 1), (8, 2), (3, 3)]),
    page_size=st.sampled_from([8, 16, 24, 32, 64]),
    budget=st.integers(20, 800),
    slots_per_split=st.sampled_from([None, 16, 64, 100, 1000]),
    batch=st.integers(1, 2),
    dtype=st.sampled_from(KERNEL_DTYPES),
)
def test_kernel_matches_reference_on_random_shapes(n_keys, head_dim, heads, page_size, budget, slots_per_split,
                                                   batch, dtype):
    q_heads, kv_heads = heads
    check_kernel(batch, q_heads, kv_heads, n_keys, head_dim, page_size, budget, 4, 16, dtype,
                 slots_per_split=slots_per_split)


@pytest.mark.parametrize("n_keys, page_size, heads, head_dim", [(1, 16, (1, 1), 64), (200, 16, (8, 2), 80),
                                                                (513, 8, (4, 1), 128), (1500, 16, (3, 3), 16)])
def test_bounds_kernel_matches_pytorch(n_keys, page_size, heads, head_dim):
    from sparse_prefill.kernels.decode import page_bounds

    dtype = KERNEL_DTYPES[-1]
    q_heads, kv_heads = heads
    q, k, _ = fresh_step(2, q_heads, kv_heads, n_keys, head_dim, dtype=dtype, device=DEVICE)
    summaries = page_summaries(k, page_size, capacity=n_keys + 100)  # strided views of a larger storage
    bounds = page_bounds(q, summaries.key_min, summaries.key_max, 0.3)
    want = page_upper_bounds(q.float(), page_summaries(k.float(), page_size), scale=0.3)
    torch.testing.assert_close(bounds, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_keys, page_size, heads, head_dim", [(1, 16, (1, 1), 64), (200, 16, (8, 2), 80),
                                                                (513, 8, (4, 1), 128), (1500, 16, (3, 3), 16)])
def test_ranking_keys_kernel_matches_pytorch(n_keys, page_size, heads, head_dim):
    """The fused kernel's keys decode to the PyTorch scores (forced pages exactly), rank ties to the
    lower page, and select what the PyTorch keys select."""
    from sparse_prefill.decoding import FORCED_ORDER, _choose, _ranking_key, forced_pages
    from sparse_prefill.kernels.decode import page_ranking_keys

    q_heads, kv_heads = heads
    q, k, _ = fresh_step(2, q_heads, kv_heads, n_keys, head_dim, dtype=KERNEL_DTYPES[-1], device=DEVICE)
    summaries = page_summaries(k, page_size, capacity=n_keys + 100)
    first_free, first_local = forced_pages(n_keys, page_size, 16, 64)
    keys = page_ranking_keys(q, summaries.key_min, summaries.key_max, 0.3, first_free, first_local)
    want = _ranking_key(page_scores(q.float(), page_summaries(k.float(), page_size), 0.3), first_free, first_local)
    assert keys.dtype == torch.int64 and keys.shape == want.shape
    assert torch.equal(keys & 0xFFFFFFFF, want & 0xFFFFFFFF)  # page order: a lower page wins a tie
    order, want_order = keys >> 32, want >> 32
    forced = want_order == FORCED_ORDER
    assert torch.equal(order == FORCED_ORDER, forced)
    as_float = lambda o: torch.where(o < 0, o ^ 0x7FFFFFFF, o).to(torch.int32).view(torch.float32)  # noqa: E731
    torch.testing.assert_close(as_float(order[~forced]), as_float(want_order[~forced]), rtol=1e-5, atol=1e-4)
    budget = 16 + 64 + 5 * page_size
    got = _choose(keys, (2, kv_heads), n_keys, page_size, budget, 16, 64, keys.device)
    expected = _choose(want, (2, kv_heads), n_keys, page_size, budget, 16, 64, keys.device)
    if n_keys > budget:  # random bounds: no near-ties at 1e-5
        assert torch.equal(got.pages, expected.pages)


@pytest.mark.parametrize("rows, n_pages, n_selected, ties", [(1, 1, 1, False), (3, 100, 7, False), (2, 5000, 300, False),
                                                           (4, 3000, 2999, True), (2, 4097, 1000, True),
                                                           (1, 2048, 2048, False)])
@pytest.mark.parametrize("pages_per_program", [None, 1024])
def test_top_pages_kernel_selects_what_topk_selects(rows, n_pages, n_selected, ties, pages_per_program):
    """The radix select equals topk then a sort on ranking keys, ties in the score (rounded scores,
    the forced pages' shared key) going to the lower page."""
    from sparse_prefill.decoding import _ranking_key
    from sparse_prefill.kernels.decode import top_pages

    scores = fresh(rows, n_pages, device=DEVICE)
    if ties:
        scores = (2 * scores).round() / 2  # a few distinct values: long runs of equal scores
    scores[0, : n_pages // 3] = -scores[0, : n_pages // 3].abs()  # negative scores order below positive ones
    keys = _ranking_key(scores, min(3, n_pages), max(min(3, n_pages), n_pages - 50))
    want = torch.topk(keys, n_selected, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    assert torch.equal(top_pages(keys, n_selected, pages_per_program=pages_per_program), want)


def test_top_pages_kernel_rejects_what_it_cannot_run():
    from sparse_prefill.kernels.decode import top_pages

    keys = torch.zeros(2, 10, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="n_selected must be in 1 .. n_pages=10, got n_selected=11"):
        top_pages(keys, 11)
    with pytest.raises(ValueError, match="keys must be a contiguous int64 tensor, got torch.int32"):
        top_pages(keys.int(), 3)
    with pytest.raises(ValueError, match="pages_per_program must be a positive multiple of 1024 or None, got 1000"):
        top_pages(keys, 3, pages_per_program=1000)


def test_kernel_reads_a_strided_cache_view():
    """A preallocated cache read up to its current length, and transformers' transposed queries."""
    from sparse_prefill.kernels.decode import decode_over_pages

    storage = fresh(1, 2, 400, 64, dtype=torch.float16, device=DEVICE)  # [batch, kv_heads, capacity, dim]
    values = fresh(1, 2, 400, 64, dtype=torch.float16, device=DEVICE)
    k, v = storage[:, :, :250], values[:, :, :250]
    q = fresh(1, 1, 8, 64, dtype=torch.float16, device=DEVICE).transpose(1, 2)  # [batch, 8, 1, 64], strided
    selection = select_pages(q, page_summaries(k, 16), budget=96, sink=16, local=32)
    out = decode_over_pages(q, k, v, selection.pages, 250, 16, 0.125)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), selection)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_kernel_rejects_what_it_cannot_run():
    from sparse_prefill.kernels.decode import decode_over_pages

    q, k, v = fresh_step(1, 2, 1, 64, 16, device=DEVICE)
    pages = torch.zeros(1, 1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="float16 or bfloat16, got dtype=torch.float32"):
        decode_over_pages(q, k, v, pages, 64, 16, 0.25)
    q, k, v = (t.half() for t in (q, k, v))
    with pytest.raises(ValueError, match="pages must be a non-empty int32 tensor .* got torch.int64"):
        decode_over_pages(q, k, v, pages.long(), 64, 16, 0.25)
    with pytest.raises(ValueError, match="slots_per_split must be a positive int"):
        decode_over_pages(q, k, v, pages, 64, 16, 0.25, slots_per_split=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_keys", [131072, 131072 + 37])
def test_real_sizes_on_gpu(n_keys):
    """Llama-3-8B shapes (32 query / 8 KV heads, head_dim 128), bf16, through the public entry point."""
    q, k, v = fresh_step(1, 32, 8, n_keys, 128, dtype=torch.bfloat16, device="cuda")
    summaries = page_summaries(k)
    for budget in (4096, n_keys):
        out, lse, selection = sparse_decode_attention(q, k, v, summaries, budget=budget, return_lse=True,
                                                      return_selection=True)
        ref, ref_lse = decode_attention_reference(q.float(), k.float(), v.float(), selection, return_lse=True)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-2)
    # The fused ranking kernel selects what PyTorch's bounds select (summation order aside: all but
    # near-ties at the budget's edge).
    on_gpu = select_pages(q, summaries, budget=4096).pages.cpu()
    on_cpu = select_pages(q.cpu(), page_summaries(k.cpu()), budget=4096).pages
    same = (on_gpu[..., :, None] == on_cpu[..., None, :]).any(-1).float().mean().item()
    assert on_gpu.shape == on_cpu.shape and same >= 0.99, same
