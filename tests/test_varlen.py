"""Several sequences in one launch (sparse_prefill.varlen; issue 14): padded batches and packed prompts.

The contract: every sequence gets what it gets alone, with its own index estimated from its own
tokens; rows of no sequence are left as they were. On a machine without a GPU the kernel runs under
TRITON_INTERPRET=1 on CPU tensors at small sizes; ``-m gpu`` runs Llama-like sizes.
"""

import os
from unittest import mock

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

triton = pytest.importorskip("triton")

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash, sparse_attention  # noqa: E402
from sparse_prefill import kernels, varlen  # noqa: E402
from sparse_prefill.kernels import combine_plans, triton_attention_of_sequences, triton_sparse_attention  # noqa: E402
from sparse_prefill.reference import attention_with_index  # noqa: E402
from sparse_prefill.varlen import Sequences, sparse_attention_varlen  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
# Triton's interpreter computes tl.dot on bfloat16 operands wrongly (tests/test_kernels.py): float16 on CPU.
DTYPES = [torch.float16, torch.bfloat16] if HAS_GPU else [torch.float16]
LENGTHS = (200, 64, 333)  # real tokens per sequence: not all multiples of 64, one a single block
# Every kind, GQA (8 query heads over 2 KV heads); a different assignment per sequence.
MIXED = [BlockCoverage(0.9), VerticalSlash(20, 100, last_q=16), AShape(4, 70), BlockSparse(2), Dense(),
         BlockCoverage(0.5, stride=8), VerticalSlash(5, 200), AShape(0, 130)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def padded_batch(lengths, kv_len, q_len, side, dtype, q_heads=8, kv_heads=2, dim=64):
    """Random q [n, q_heads, q_len, dim], k/v [n, kv_heads, kv_len, dim] and each sequence's real keys (first, end)."""
    g = torch.Generator(device=DEVICE).manual_seed(torch.seed() % 2**31)
    n = len(lengths)
    q = torch.randn(n, q_heads, q_len, dim, generator=g, device=DEVICE).to(dtype)
    k, v = (torch.randn(n, kv_heads, kv_len, dim, generator=g, device=DEVICE).to(dtype) for _ in range(2))
    spans = [(kv_len - length, kv_len) if side == "left" else (0, length) for length in lengths]
    return q, k, v, spans


def check_each_sequence_as_alone(q, k, v, spans, patterns, tolerance=1e-2):
    """One launch against each sequence run alone (its own launch on its real tokens) and against exact
    attention over the kept sets that sequence's own plan estimated; padding rows stay poisoned."""
    q_len, kv_len = q.shape[2], k.shape[2]
    sequences = Sequences.padded(spans, q_len, kv_len)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    with mock.patch.object(kernels, "run_plan", wraps=kernels.run_plan) as launches:
        _, plans = triton_attention_of_sequences(q, k, v, sequences, patterns, scale=q.shape[-1] ** -0.5, out=out,
                                                 lse=lse, return_plans=True)
    assert launches.call_count == 1
    for i, (first, end) in enumerate(spans):
        rows = sequences.queries(i)
        assert torch.isnan(out[i, :, : rows.start]).all() and torch.isnan(out[i, :, rows.stop :]).all(), i
        assert torch.isnan(lse[i, :, : rows.start]).all() and torch.isnan(lse[i, :, rows.stop :]).all(), i
        if rows.stop == rows.start:
            assert plans[i] is None
            continue
        q_i, k_i, v_i = q[i : i + 1, :, rows], k[i : i + 1, :, first:end], v[i : i + 1, :, first:end]
        alone, plan, alone_lse = triton_sparse_attention(q_i, k_i, v_i, patterns[i], return_plan=True, return_lse=True)
        positions = torch.arange(plan.q_start, plan.seq, device=q.device)
        for head in range(q.shape[1]):  # the same index as alone
            assert torch.equal(plans[i].indices[head].kept_mask(positions, plan.seq),
                               plan.indices[head].kept_mask(positions, plan.seq)), (i, head)
        torch.testing.assert_close(out[i : i + 1, :, rows], alone, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(lse[i : i + 1, :, rows], alone_lse, rtol=1e-3, atol=1e-3)
        ref, _, ref_lse = attention_with_index(q_i, k_i, v_i, plans[i].indices, scale=q.shape[-1] ** -0.5,
                                               return_lse=True)
        for head in range(q.shape[1]):
            error = rel(out[i, head, rows], ref[0, head])
            assert error <= tolerance, (i, head, patterns[i][head], error)
        torch.testing.assert_close(lse[i : i + 1, :, rows], ref_lse.float(), rtol=1e-3, atol=1e-3)
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_launch_gives_each_padded_sequence_what_it_gets_alone(side, dtype):
    q, k, v, spans = padded_batch(LENGTHS, max(LENGTHS), max(LENGTHS), side, dtype)
    patterns = [MIXED[i:] + MIXED[:i] for i in (0, 3, 5)]
    check_each_sequence_as_alone(q, k, v, spans, patterns)


def test_one_launch_on_a_left_padded_cache_chunk():
    """New queries on a cache (the last 150 of 400 rows), left padded: sequence 0 a chunk at position 250,
    sequence 1 a chunk starting mid-block (150 of its 300 keys cached), sequence 2 whole (its 100 tokens
    are all new), sequence 3 all padding (no queries: its programs return at once)."""
    q, k, v, _ = padded_batch((0,) * 4, 400, 150, "left", torch.float16)
    spans = [(0, 400), (100, 400), (300, 400), (400, 400)]
    sequences = Sequences.padded(spans, 150, 400)
    assert sequences.q_start == (250, 150, 0, 0) and sequences.query_offset == (0, 0, 50, 0)
    patterns = [MIXED, MIXED[::-1], MIXED[2:] + MIXED[:2], MIXED]
    check_each_sequence_as_alone(q, k, v, spans, patterns)


def test_packed_prompts_one_launch_against_the_pytorch_path():
    """``sparse_attention_varlen`` (FlashAttention's layout, [total, heads, dim]): PyTorch one prompt at a time on a
    CPU, and the kernel's one launch (batch stride 0) when the dispatch takes it, both as each prompt alone."""
    g = torch.Generator(device=DEVICE).manual_seed(torch.seed() % 2**31)
    cu_seqlens = torch.tensor([0, 200, 264, 597], dtype=torch.int32, device=DEVICE)
    q = torch.randn(597, 8, 64, generator=g, device=DEVICE).half()
    k, v = (torch.randn(597, 2, 64, generator=g, device=DEVICE).half() for _ in range(2))
    out, lse = sparse_attention_varlen(q, k, v, cu_seqlens, MIXED, return_lse=True)
    with mock.patch.object(varlen, "on_triton", return_value=True), \
            mock.patch.object(kernels, "run_plan", wraps=kernels.run_plan) as launches:
        kernel_out, kernel_lse = sparse_attention_varlen(q, k, v, cu_seqlens, MIXED, return_lse=True)
    assert launches.call_count == 1 and kernel_out.shape == (597, 8, 64) and kernel_lse.shape == (8, 597)
    for start, end in ((0, 200), (200, 264), (264, 597)):
        alone = lambda x: x[start:end].transpose(0, 1)[None]  # noqa: E731
        want, want_lse = sparse_attention(alone(q), alone(k), alone(v), MIXED, return_lse=True)
        got, got_kernel = out[start:end].transpose(0, 1)[None], kernel_out[start:end].transpose(0, 1)[None]
        assert rel(got, want) <= (1e-2 if HAS_GPU else 0), (start, rel(got, want))
        torch.testing.assert_close(lse[:, start:end], want_lse[0])
        assert rel(got_kernel, want) <= 1e-2, (start, rel(got_kernel, want))
        torch.testing.assert_close(kernel_lse[:, start:end], want_lse[0], rtol=1e-3, atol=2e-3)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise strictly from 0 to total=597"):
        sparse_attention_varlen(q, k, v, [0, 300, 300, 597], MIXED)
    # Inference only, as sparse_attention: a backward is refused, not silently treated as a constant.
    out = sparse_attention_varlen(q.float().requires_grad_(), k.float(), v.float(), cu_seqlens, MIXED)
    with pytest.raises(RuntimeError, match="inference"):
        out.sum().backward()


def test_combined_plan_checks_its_sequences():
    q, k, v, spans = padded_batch((100, 64), 100, 100, "left", torch.float16, q_heads=2, kv_heads=1)
    plans = [kernels.build_plan(q[i : i + 1, :, first:], k[i : i + 1, :, first:], [Dense(), AShape(1, 8)], 0.125)
             for i, (first, _) in enumerate(spans)]
    with pytest.raises(ValueError, match="one key and query offset per plan"):
        combine_plans(plans, [0], [0, 36])
    plan = combine_plans(plans, [0, 36], [0, 36])
    assert plan.sequences == ((100, 0, 0, 0), (64, 0, 36, 36))
    with pytest.raises(ValueError, match=r"sequence 0 \(keys 0..99, queries 0..99\) lies outside q_len=90"):
        kernels.run_plan(q[:, :, :90], k, v, plan, 0.125)
    with pytest.raises(ValueError, match="for several sequences"):
        plan.computed_pairs()


def test_padded_batch_operator_passes_opcheck():
    """The transformers path's custom operator: its fake agrees with the real one (transformers' layout)."""
    from sparse_prefill.ops import _number

    q, k, v = (torch.randn(3, 130, h, 16).transpose(1, 2) for h in (4, 2, 2))  # [batch, heads, seq, dim] views
    layout = [130, 0, 0, 0, 60, 0, 70, 70, 0, 0, 0, 0]  # whole, left padded by 70, all padding
    numbers = [_number((VerticalSlash(8, 64), AShape(2, 30), BlockCoverage(0.8), Dense())), _number((Dense(),) * 4),
               _number((Dense(),) * 4)]
    torch.library.opcheck(torch.ops.sparse_prefill.attention_of_sequences.default, (q, k, v, layout, numbers, 0.25))


@torch.no_grad()
def test_transformers_padded_batch_is_one_launch_per_layer():
    """The integration's contract (issue 14): a padded batch runs all its sequences and heads in one launch
    per layer, each sequence as alone. A float16 model on a CPU, with the dispatch sent to the kernel."""
    transformers = pytest.importorskip("transformers")
    import sparse_prefill
    from sparse_prefill import PatternConfig

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=torch.float16).eval()
    lengths = (200, 70, 150)  # the second shorter than min_seq_len: dense rows, in the same launch
    ids = torch.randint(3, 128, (3, 200), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.zeros(3, 200, dtype=torch.long, device=DEVICE)
    for row, n in enumerate(lengths):
        mask[row, 200 - n :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    heads = (VerticalSlash(8, 16, last_q=16), AShape(4, 32), BlockSparse(1), BlockCoverage(0.8, stride=8))
    state = sparse_prefill.enable(model, PatternConfig((heads, heads[::-1])), min_seq_len=100)
    try:
        with mock.patch.object(varlen, "on_triton", return_value=True), \
                mock.patch.object(kernels, "run_plan", wraps=kernels.run_plan) as launches:
            batched = model(ids, attention_mask=mask, position_ids=positions).logits
        assert launches.call_count == 2 and state.sparse_calls == 2  # one launch per layer
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, 200 - n :]).logits[0]  # alone through the PyTorch path
            assert rel(batched[row, 200 - n :], alone) < 1e-2, (row, rel(batched[row, 200 - n :], alone))
    finally:
        sparse_prefill.disable(model)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["right", "left", "left-chunk", "packed"])
def test_one_launch_against_per_sequence_launches_on_gpu(layout):
    """Llama-like sizes: 3 sequences of 4K-9K tokens, 32 query / 8 KV heads, head_dim 128, bf16, every kind."""
    lengths, dim = (4096 + 37, 9000, 6144), 128
    patterns = [VerticalSlash(1000, 6096), BlockSparse(32), AShape(64, 4096), BlockCoverage(0.95)] * 8
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    if layout == "packed":
        bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        q = torch.randn(bounds[-1], 32, dim, generator=g, device="cuda").bfloat16()
        k, v = (torch.randn(bounds[-1], 8, dim, generator=g, device="cuda").bfloat16() for _ in range(2))
        out, lse = sparse_attention_varlen(q, k, v, bounds, patterns, return_lse=True)
        pieces = [(slice(s, e), out[s:e].transpose(0, 1)[None], lse[None, :, s:e]) for s, e in zip(bounds, bounds[1:])]
        alone_inputs = [tuple(x[s].transpose(0, 1)[None] for x in (q, k, v)) for s, _, _ in pieces]
        got = [(o, l) for _, o, l in pieces]
    else:
        kv_len = max(lengths)
        q_len = 2048 + 5 if layout == "left-chunk" else kv_len  # a chunk on a left-padded cache
        q, k, v, spans = padded_batch(lengths, kv_len, q_len, layout.split("-")[0], torch.bfloat16, 32, 8, dim)
        sequences = Sequences.padded(spans, q_len, kv_len)
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), device="cuda")
        with mock.patch.object(kernels, "run_plan", wraps=kernels.run_plan) as launches:
            triton_attention_of_sequences(q, k, v, sequences, [patterns] * 3, scale=dim**-0.5, out=out, lse=lse)
        assert launches.call_count == 1
        alone_inputs, got = [], []
        for i, (first, end) in enumerate(spans):
            rows = sequences.queries(i)
            alone_inputs.append((q[i : i + 1, :, rows], k[i : i + 1, :, first:end], v[i : i + 1, :, first:end]))
            got.append((out[i : i + 1, :, rows], lse[i : i + 1, :, rows]))
            assert torch.isnan(out[i, :, : rows.start]).all() and torch.isnan(out[i, :, rows.stop :]).all()
    for i, ((q_i, k_i, v_i), (got_out, got_lse)) in enumerate(zip(alone_inputs, got)):
        want, want_lse = triton_sparse_attention(q_i, k_i, v_i, patterns, return_lse=True)
        assert torch.isfinite(got_out).all(), i
        assert rel(got_out, want) <= 5e-3, (layout, i, rel(got_out, want))
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-3, atol=1e-2)
