"""The paths around the kernels, on a CUDA GPU (``pytest -m gpu``): the transformers integration
(whole prompts, chunks, a cached prefix, a padded batch, generate), long_prefill's chunked forward
and its KV cache modes, and the compressing KV caches. The CPU tests check the same logic through
the PyTorch path; these check that the Triton kernels get the real layouts transformers and
long_prefill hand them (transposed views, GQA, bf16) and agree with the reference there.

A random bf16 Llama with head_dim 64 (8 query heads, 2 KV heads, 2 layers) and 1024-token prompts,
``min_seq_len`` 256 so that the sparse path runs. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")

import sparse_prefill  # noqa: E402
from sparse_prefill import AShape, Dense, PatternConfig, VerticalSlash, reference_attention  # noqa: E402

SEQ, MIN_SEQ = 1024, 256
N_LAYERS, N_HEADS, N_KV_HEADS = 2, 8, 2


def model_and_ids(seq: int = SEQ, batch: int = 1):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=512, intermediate_size=1024,
                                      num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, head_dim=64,
                                      vocab_size=256, max_position_embeddings=4 * SEQ)
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(1)).cuda()
    return model, ids


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def all_keeping() -> PatternConfig:
    # Budgets above the sequence length keep every causal pair, through the sparse kernel.
    return PatternConfig.uniform(N_LAYERS, N_HEADS, VerticalSlash(vertical=4 * SEQ, slash=4 * SEQ))


def deterministic_mixed() -> PatternConfig:
    # Kept sets that do not depend on the estimate (which may break near-ties differently in bf16).
    heads = (AShape(16, 256), VerticalSlash(4 * SEQ, 4 * SEQ), Dense(), AShape(0, 64)) * 2
    return PatternConfig((heads, heads[::-1]))


@torch.no_grad()
def test_transformers_whole_prompt_chunks_cache_and_generate():
    from transformers import DynamicCache

    model, ids = model_and_ids()
    dense = model(ids).logits[:, -1]
    state = sparse_prefill.enable(model, all_keeping(), min_seq_len=MIN_SEQ)
    assert rel(model(ids).logits[:, -1], dense) < 2e-2 and state.sparse_calls == N_LAYERS
    # Four chunks of 256 through a cache, each sparse, against the dense one pass.
    logits, cache = sparse_prefill.chunked_prefill(model, ids, 256)
    assert state.sparse_calls == N_LAYERS * 5 and cache.get_seq_length() == SEQ
    assert rel(logits, dense) < 2e-2
    # New tokens on a cached prefix: 640 cached, 384 new (a chunk whose first query block is partial).
    cache = DynamicCache(config=model.config)
    model(ids[:, :640], past_key_values=cache, use_cache=True)
    on_prefix = model(ids[:, 640:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert rel(on_prefix, dense) < 2e-2
    # generate: prefill sparse, decode dense.
    calls = state.sparse_calls
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, SEQ + 4) and state.sparse_calls - calls == N_LAYERS
    sparse_prefill.disable(model)


@torch.no_grad()
def test_transformers_mixed_patterns_equal_reference_attention():
    model, ids = model_and_ids()
    config = deterministic_mixed()

    def reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = reference_attention(query, key, value, config.layer(module.layer_idx), scale=scaling).out
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    transformers.AttentionInterface.register("sparse_prefill_gpu_reference", reference)
    transformers.masking_utils.AttentionMaskInterface.register("sparse_prefill_gpu_reference",
                                                               transformers.masking_utils.sdpa_mask)
    model.set_attn_implementation("sparse_prefill_gpu_reference")
    expected = model(ids).logits
    state = sparse_prefill.enable(model, config, min_seq_len=MIN_SEQ)
    got = model(ids).logits
    assert state.sparse_calls == N_LAYERS
    assert rel(got, expected) < 2e-2
    sparse_prefill.disable(model)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_transformers_padded_batch_each_sequence_as_alone(side):
    model, ids = model_and_ids(batch=3)
    lengths = [SEQ, SEQ - 100, SEQ - 600]
    mask = torch.zeros(3, SEQ, dtype=torch.long, device="cuda")
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, SEQ - n :] = 1
        else:
            mask[row, :n] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    state = sparse_prefill.enable(model, deterministic_mixed(), min_seq_len=MIN_SEQ)
    batched = model(ids, attention_mask=mask, position_ids=positions).logits
    assert state.sparse_calls == N_LAYERS
    for row, n in enumerate(lengths):
        real = slice(SEQ - n, SEQ) if side == "left" else slice(0, n)
        alone = model(ids[row : row + 1, real]).logits[0]
        assert rel(batched[row, real], alone) < 2e-2, (row, rel(batched[row, real], alone))
    sparse_prefill.disable(model)


@torch.no_grad()
def test_long_prefill_matches_transformers_and_keeps_its_caches():
    from sparse_prefill import long_prefill

    model, ids = model_and_ids()
    dense = model(ids).logits[:, -1]
    got = long_prefill.prefill(model, ids, chunk_size=256)
    assert rel(got.logits, dense) < 2e-2
    # The cache modes: offloading moves the same bf16 cache, so it decodes exactly what the device cache
    # decodes; FP8 halves it and decodes its own tokens.
    tokens = {}
    for placement, kv_dtype in (("device", None), ("offload", None), ("device", torch.float8_e4m3fn)):
        result = long_prefill.prefill(model, ids, cache=placement, kv_dtype=kv_dtype, chunk_size=256)
        assert rel(result.logits, dense) < 2e-2
        tokens[placement, kv_dtype] = long_prefill.generate(model, result, 4)
        assert tokens[placement, kv_dtype].shape == (1, 4)
    assert torch.equal(tokens["device", None], tokens["offload", None])
    # Sparse: long_prefill's chunked forward runs the enabled sparse attention and agrees with transformers'.
    state = sparse_prefill.enable(model, deterministic_mixed(), min_seq_len=MIN_SEQ)
    expected = model(ids).logits[:, -1]
    calls = state.sparse_calls
    got = long_prefill.prefill(model, ids, chunk_size=256)
    assert state.sparse_calls - calls == N_LAYERS
    assert rel(got.logits, expected) < 2e-2
    sparse_prefill.disable(model)


@torch.no_grad()
def test_compressing_caches_on_gpu():
    from sparse_prefill.kv_cache import make_kv_cache, window_attention_scores

    # The window scores' fused GPU pass against the float64 definition.
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, N_HEADS, SEQ, 64, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, N_KV_HEADS, SEQ, 64, device="cuda", generator=g).bfloat16()
    scores = window_attention_scores(q, k, 32, 0.125)
    qd, kd = q.double()[:, :, -32:], k.double().repeat_interleave(N_HEADS // N_KV_HEADS, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", qd, kd) * 0.125
    logits = logits.masked_fill(torch.ones(32, SEQ, dtype=torch.bool, device="cuda").triu(SEQ - 32 + 1), float("-inf"))
    assert rel(scores, logits.softmax(-1).sum(2)) < 1e-2
    # SnapKV and StreamingLLM through generate, sparse prefill: each layer keeps its capacity.
    model, ids = model_and_ids()
    sparse_prefill.enable(model, min_seq_len=MIN_SEQ)
    for method in ("snapkv", "streamingllm"):
        cache = make_kv_cache(method, model, 128)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        assert out.shape == (1, SEQ + 3)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [128 + 2] * N_LAYERS, method
    sparse_prefill.disable(model)
