"""sparse_prefill inside transformers models: tiny random Llama, Mistral, Qwen2, Qwen3 and Phi-3 on CPU.

Each model has 2 layers, hidden size 64, 4 query heads and 2 KV heads (GQA), so every test runs in
well under a second; prompts are 200 tokens with ``min_seq_len=64`` so that the sparse path runs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_prefill  # noqa: E402
from sparse_prefill import (AShape, BlockCoverage, BlockSparse, Dense, PatternConfig, VerticalSlash,  # noqa: E402
                            reference_attention)
from sparse_prefill.integrations import transformers as integration  # noqa: E402

SEQ = 200
MIN_SEQ = 64
N_LAYERS, N_HEADS, N_KV_HEADS = 2, 4, 2

COMMON = dict(
    num_hidden_layers=N_LAYERS,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=N_HEADS,
    num_key_value_heads=N_KV_HEADS,
    vocab_size=128,
    max_position_embeddings=512,
)


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON)
    if arch == "mistral":
        return transformers.MistralConfig(**COMMON)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=16)
    if arch == "phi3":
        # Phi-3's default special tokens (32000) lie outside a 128-token vocabulary.
        return transformers.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def _model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = _config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def _ids(batch: int = 1, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    # From 3 up: ids 0-2 are special tokens, and generate() reads a pad id in the prompt as padding.
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Every pattern kind, a different one per head, with budgets well below the 200-token prompt (4
# blocks of 64); the second layer has the heads in reverse order and Block-Coverage for Dense.
MIXED = (
    VerticalSlash(vertical=8, slash=16, last_q=16),
    AShape(sink=4, local=32),
    BlockSparse(top_k=2),
    Dense(),
)


def _mixed_config() -> PatternConfig:
    return PatternConfig((MIXED, (BlockCoverage(0.8, stride=8),) + MIXED[::-1][1:]))


def _all_keeping_config() -> PatternConfig:
    # Budgets above the sequence length keep every causal pair, through the sparse code path.
    return PatternConfig.uniform(N_LAYERS, N_HEADS, VerticalSlash(vertical=SEQ, slash=SEQ, last_q=16))


def _attention_inputs(model) -> list[torch.Tensor]:
    """Forward pre-hooks on each layer's output projection: the attention output [batch, seq, heads*dim]."""
    captured: list[torch.Tensor] = []
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
        for layer in model.model.layers
    ]
    return captured, handles


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_all_keeping_patterns_equal_sdpa(arch):
    model = _model(arch)
    ids = _ids()
    dense = model(ids).logits
    for config in (_all_keeping_config(), PatternConfig.uniform(N_LAYERS, N_HEADS, Dense())):
        state = sparse_prefill.enable(model, config, min_seq_len=MIN_SEQ)
        logits = model(ids).logits
        torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-5)
        all_dense = all(isinstance(p, Dense) for heads in config for p in heads)
        # All-Dense layers go straight to SDPA; the VerticalSlash config runs the sparse path.
        assert (state.sparse_calls, state.dense_calls) == ((0, N_LAYERS) if all_dense else (N_LAYERS, 0))
    sparse_prefill.disable(model)


def _reference_attention_fn(config: PatternConfig):
    """A test-only attention function: the library's reference on the very q/k/v the model passes."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert key.shape[1] == N_KV_HEADS and query.shape[1] == N_HEADS  # GQA reaches us unrepeated
        out = reference_attention(query, key, value, config.layer(module.layer_idx), scale=scaling).out
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_patterns_equal_reference_attention(arch):
    config = _mixed_config()
    model = _model(arch)
    ids = _ids()
    dense = model(ids).logits

    name = f"sparse_prefill_test_reference_{arch}"
    transformers.AttentionInterface.register(name, _reference_attention_fn(config))
    transformers.masking_utils.AttentionMaskInterface.register(name, transformers.masking_utils.sdpa_mask)
    model.set_attn_implementation(name)
    captured, handles = _attention_inputs(model)
    expected = model(ids).logits
    expected_attention = list(captured)
    captured.clear()

    state = sparse_prefill.enable(model, config, min_seq_len=MIN_SEQ)
    logits = model(ids).logits
    for handle in handles:
        handle.remove()
    assert state.sparse_calls == N_LAYERS
    for layer, (got, want) in enumerate(zip(captured, expected_attention)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"layer {layer}: {m}")
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    # The patterns drop real attention mass: the sparse model is not the dense one.
    assert (logits - dense).abs().max() > 1e-3
    sparse_prefill.disable(model)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_generate_prefills_sparse_and_decodes_dense(arch):
    model = _model(arch)
    ids = _ids()
    new_tokens = 5
    dense = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    state = sparse_prefill.enable(model, _all_keeping_config(), min_seq_len=MIN_SEQ)
    sparse = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(sparse, dense)
    # One sparse prefill over every layer, then one dense call per layer per decoding step.
    assert state.sparse_calls == N_LAYERS
    assert state.dense_calls == N_LAYERS * (new_tokens - 1)

    sparse_prefill.enable(model, _mixed_config(), min_seq_len=MIN_SEQ)
    # min_new_tokens: a random model may well pick the EOS id first.
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape == (1, SEQ + new_tokens)
    sparse_prefill.disable(model)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_runs_sparse_in_every_chunk(arch):
    """Chunks of 64 tokens through the cache, each sparse; with Block-Coverage each query block keeps
    what the one-pass prefill keeps, so the logits are the one-pass logits."""
    model = _model(arch)
    ids = _ids(seq=256)
    config = PatternConfig.uniform(N_LAYERS, N_HEADS, BlockCoverage(0.7, stride=8))
    state = sparse_prefill.enable(model, config, min_seq_len=MIN_SEQ)
    one_pass = model(ids).logits[:, -1]
    calls = state.sparse_calls
    logits, cache = sparse_prefill.chunked_prefill(model, ids, 64)
    assert state.sparse_calls - calls == N_LAYERS * 4
    assert cache.get_seq_length() == 256
    torch.testing.assert_close(logits, one_pass, rtol=1e-4, atol=1e-4)
    # Chunks of 100: two sparse chunks, and the last 56 tokens (shorter than min_seq_len) dense.
    calls, dense_calls = state.sparse_calls, state.dense_calls
    logits, _ = sparse_prefill.chunked_prefill(model, ids, 100)
    assert (state.sparse_calls - calls, state.dense_calls - dense_calls) == (2 * N_LAYERS, N_LAYERS)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        sparse_prefill.chunked_prefill(model, ids, 0)
    from sparse_prefill.kv_cache import make_kv_cache

    with pytest.raises(ValueError, match="SnapKVCache compresses the prompt after its first prefill call"):
        sparse_prefill.chunked_prefill(model, ids, 64, make_kv_cache("snapkv", model, 128))
    # Generation from a chunked prefill of all but the last token equals generation from one pass.
    want = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    _, cache = sparse_prefill.chunked_prefill(model, ids[:, :-1], 64)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want) and cache.get_seq_length() == 256 + 2
    sparse_prefill.disable(model)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_new_tokens_on_a_cached_prefix_equal_reference_attention(arch):
    """A cached document (130 tokens), then 120 new ones: the new tokens prefill sparse, every layer
    on the reference's kept sets for queries that are the last part of the keys; decoding then
    continues the same cache dense."""
    from transformers import DynamicCache

    config = _mixed_config()
    model = _model(arch)
    ids = _ids(seq=250)
    name = f"sparse_prefill_test_reference_{arch}"
    transformers.AttentionInterface.register(name, _reference_attention_fn(config))
    transformers.masking_utils.AttentionMaskInterface.register(name, transformers.masking_utils.sdpa_mask)

    def continued(model):
        cache = DynamicCache(config=model.config)
        model(ids[:, :130], past_key_values=cache, use_cache=True)
        return model(ids[:, 130:], past_key_values=cache, use_cache=True).logits, cache

    model.set_attn_implementation(name)
    expected, _ = continued(model)
    state = sparse_prefill.enable(model, config, min_seq_len=MIN_SEQ)
    got, cache = continued(model)
    assert state.sparse_calls == 2 * N_LAYERS  # the document, then the new tokens
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # generate on the whole prompt with the document cached: it prefills only the 120 new tokens (sparse),
    # then decodes (dense).
    document = DynamicCache(config=model.config)
    model(ids[:, :130], past_key_values=document, use_cache=True)
    calls, dense_calls = state.sparse_calls, state.dense_calls
    out = model.generate(ids, past_key_values=document, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 253)
    assert (state.sparse_calls - calls, state.dense_calls - dense_calls) == (N_LAYERS, 2 * N_LAYERS)
    assert torch.equal(out[:, 250], got[:, -1].argmax(dim=-1))
    sparse_prefill.disable(model)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_disable_restores_dense_exactly(arch):
    model = _model(arch)
    ids = _ids()
    dense = model(ids).logits
    sparse_prefill.enable(model, _mixed_config(), min_seq_len=MIN_SEQ)
    assert model.config._attn_implementation == integration.ATTENTION_NAME
    assert not torch.equal(model(ids).logits, dense)
    sparse_prefill.disable(model)
    assert model.config._attn_implementation == "sdpa"
    assert integration.state_of(model) is None
    assert torch.equal(model(ids).logits, dense)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_runs_sparse_per_sequence(arch, side):
    """Left or right padding: each sequence's real tokens get exactly what that sequence alone,
    unpadded, gets (its own index over its own tokens)."""
    model = _model(arch)
    ids = _ids(batch=3)
    lengths = [SEQ, SEQ - 7, SEQ - 90]
    mask = torch.zeros(3, SEQ, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, SEQ - n :] = 1 if side == "left" else 0
        mask[row, :n] = 1 if side == "right" else mask[row, :n]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each sequence's tokens at 0 .. n - 1
    state = sparse_prefill.enable(model, _mixed_config(), min_seq_len=MIN_SEQ)
    batched = model(ids, attention_mask=mask, position_ids=positions).logits
    assert state.sparse_calls == N_LAYERS
    for row, n in enumerate(lengths):
        real = slice(SEQ - n, SEQ) if side == "left" else slice(0, n)
        alone = model(ids[row : row + 1, real]).logits[0]
        torch.testing.assert_close(batched[row, real], alone, rtol=1e-4, atol=1e-4)
    # The mask is checked once per forward, not once per layer (it is the same tensor in every layer).
    checks = []
    real_check = integration._check_sequence_spans
    integration._check_sequence_spans = lambda *args: checks.append(1) or real_check(*args)
    try:
        model(ids, attention_mask=mask.clone(), position_ids=positions)
    finally:
        integration._check_sequence_spans = real_check
    assert len(checks) == 1
    # A mask that is not causal-with-padding (a hole inside a sequence) is refused, not ignored.
    holed = torch.ones(3, SEQ, dtype=torch.long)
    holed[1, 50:60] = 0
    with pytest.raises(ValueError, match="hides keys in the middle of a sequence"):
        model(ids, attention_mask=holed)
    sparse_prefill.disable(model)


@torch.no_grad()
def test_compiles_with_fullgraph():
    """The sparse path is one custom operator to torch.compile: the whole model compiles with
    fullgraph=True, runs sparse, and gives the eager sparse logits."""
    model = _model("llama")
    ids = _ids()
    state = sparse_prefill.enable(model, _mixed_config(), min_seq_len=MIN_SEQ)
    eager = model(ids).logits
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    calls = state.sparse_calls
    logits = compiled(ids).logits
    assert state.sparse_calls - calls == N_LAYERS
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-5)
    sparse_prefill.disable(model)
    assert (model(ids).logits - eager).abs().max() > 1e-3  # it was the sparse model, not the dense one


def test_a_model_called_under_autograd_runs_sparse_and_refuses_a_backward():
    """Without torch.no_grad() the weights make every query require grad. The forward gives the
    no_grad logits; a backward names the fix (torch's own message asked to register a formula)."""
    model = _model("llama")
    ids = _ids()
    state = sparse_prefill.enable(model, _mixed_config(), min_seq_len=MIN_SEQ)
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.is_grad_enabled()
    logits = model(ids).logits
    assert state.sparse_calls == 2 * N_LAYERS and logits.requires_grad
    torch.testing.assert_close(logits.detach(), expected)
    with pytest.raises(RuntimeError, match=r"has no backward: run the model under torch.no_grad\(\) or "
                                           r"torch.inference_mode\(\).*or sparse_prefill.disable\(model\)"):
        logits.sum().backward()
    sparse_prefill.disable(model)


def test_custom_operator_passes_opcheck():
    """torch.library.opcheck: the fake (meta) implementation agrees with the real one (shapes, strides,
    dtypes) and the operator is registered consistently."""
    from sparse_prefill.ops import _number

    q, k, v = (torch.randn(1, h, 130, 16) for h in (4, 2, 2))
    for query in (q, q.transpose(1, 2).contiguous().transpose(1, 2)):  # contiguous, and transformers' layout
        args = (query, k, v, _number((VerticalSlash(8, 64), AShape(2, 30), BlockCoverage(0.8), Dense())), 0.25)
        torch.library.opcheck(torch.ops.sparse_prefill.sparse_attention.default, args)


@torch.no_grad()
def test_short_prompts_and_sliding_window_layers_stay_dense():
    ids = _ids()
    model = _model("llama")
    dense = model(ids).logits
    state = sparse_prefill.enable(model, _mixed_config(), min_seq_len=SEQ + 1)
    assert torch.equal(model(ids).logits, dense)
    assert (state.sparse_calls, state.dense_calls) == (0, N_LAYERS)

    # A Mistral window shorter than the prompt: the layers are local already and keep SDPA.
    windowed = _model("mistral", sliding_window=50)
    dense = windowed(ids).logits
    state = sparse_prefill.enable(windowed, _mixed_config(), min_seq_len=MIN_SEQ)
    assert torch.equal(windowed(ids).logits, dense)
    assert (state.sparse_calls, state.dense_calls) == (0, N_LAYERS)


@torch.no_grad()
def test_attn_implementation_by_name_at_load(tmp_path):
    _model("llama").save_pretrained(tmp_path)
    sparse_prefill.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_prefill").eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = _ids()
    assert model.config._attn_implementation == "sparse_prefill"
    # Not enabled yet: the default config, with the default threshold far above 200 tokens.
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    state = sparse_prefill.enable(model, _all_keeping_config(), min_seq_len=MIN_SEQ)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert state.sparse_calls == N_LAYERS and state.restore_implementation == "sdpa"
    sparse_prefill.disable(model)
    assert model.config._attn_implementation == "sdpa"


def test_enable_checks_config_against_model():
    model = _model("llama")
    with pytest.raises(ValueError, match="3 layers x 4 query heads, but the model has 2 layers x 4"):
        sparse_prefill.enable(model, PatternConfig.uniform(3, N_HEADS, Dense()))
    with pytest.raises(ValueError, match="2 layers x 8 query heads"):
        sparse_prefill.enable(model, PatternConfig.uniform(N_LAYERS, 8, Dense()))
    with pytest.raises(ValueError, match="min_seq_len must be a positive int, got min_seq_len=0"):
        sparse_prefill.enable(model, None, min_seq_len=0)
    with pytest.raises(TypeError, match="config must be a PatternConfig"):
        sparse_prefill.enable(model, {"layers": []})
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        sparse_prefill.enable(torch.nn.Linear(2, 2))
    assert model.config._attn_implementation == "sdpa"  # a refused enable() changes nothing


@torch.no_grad()
def test_default_preset_runs_sparse():
    from sparse_prefill.presets import PRESETS

    model = _model("qwen2")
    ids = _ids()
    state = sparse_prefill.enable(model, min_seq_len=MIN_SEQ)
    assert state.config is None and state.preset is PRESETS["default"]
    assert state.layer_patterns(0, N_HEADS, SEQ) == (PRESETS["default"].pattern,) * N_HEADS
    assert state.describe() == f"preset default ({PRESETS['default'].pattern})"
    captured, handles = _attention_inputs(model)
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and state.sparse_calls == N_LAYERS
    # The same as the preset's pattern given as a config on every head.
    uniform = PatternConfig.uniform(N_LAYERS, N_HEADS, PRESETS["default"].pattern)
    got = list(captured)
    captured.clear()
    sparse_prefill.enable(model, uniform, min_seq_len=MIN_SEQ)
    assert torch.equal(model(ids).logits, logits)
    for layer, (a, b) in enumerate(zip(got, captured)):
        assert torch.equal(a, b), layer
    fast = sparse_prefill.enable(model, preset="fast", min_seq_len=MIN_SEQ)
    assert fast.layer_patterns(1, N_HEADS, SEQ) == (PRESETS["fast"].pattern,) * N_HEADS
    for handle in handles:
        handle.remove()
    sparse_prefill.disable(model)
    with pytest.raises(TypeError, match=r"config must be a PatternConfig or None \(a preset: preset='fast'\), got 'uniform'"):
        sparse_prefill.enable(model, "uniform")


def test_minference_budget_scales_with_length():
    from sparse_prefill.kinds.vertical_slash import minference_budget

    assert minference_budget(1000) == VerticalSlash(vertical=64, slash=256)
    assert minference_budget(6000) == VerticalSlash(vertical=187, slash=750)
    assert minference_budget(131072) == VerticalSlash(vertical=1000, slash=6096)
    assert minference_budget(1 << 20) == VerticalSlash(vertical=1000, slash=6096)
    with pytest.raises(ValueError, match="minference_budget.seq_len must be >= 1, got seq_len=0"):
        minference_budget(0)


def test_import_stays_light():
    code = (
        "import sys, sparse_prefill; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialised'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- sparse decoding (issue 17): decode steps read only the pages their query selects ----------------------

DECODING = dict(budget=64, sink=16, local=16, page_size=16)


def _reference_decode_fn():
    """Test-only attention: SDPA, except that a decode step attends over the pages selected afresh from
    summaries of all its keys (decoding.py's reference, not the integration's incremental summaries)."""
    from sparse_prefill.decoding import decode_attention_reference, page_summaries, select_pages

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] == 1 and key.shape[2] > DECODING["budget"]:
            summaries = page_summaries(key, DECODING["page_size"])
            selection = select_pages(query, summaries, budget=DECODING["budget"], sink=DECODING["sink"],
                                     local=DECODING["local"], scale=scaling)
            out = decode_attention_reference(query, key, value, selection, scale=scaling)
            return out.transpose(1, 2), None
        return integration._sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    return attention


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sparse_decoding_steps_equal_the_page_reference(arch):
    from sparse_prefill.decoding import SparseDecoding

    model = _model(arch)
    ids = _ids()
    name = f"sparse_prefill_test_decode_{arch}"
    transformers.AttentionInterface.register(name, _reference_decode_fn())
    transformers.masking_utils.AttentionMaskInterface.register(name, transformers.masking_utils.sdpa_mask)
    model.set_attn_implementation(name)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    expected = model.generate(ids, **kwargs)
    dense_state = sparse_prefill.enable(model, min_seq_len=10_000)
    dense = model.generate(ids, **kwargs)
    state = sparse_prefill.enable(model, min_seq_len=10_000, decode=SparseDecoding(**DECODING))
    got = model.generate(ids, **kwargs)
    assert dense_state.sparse_decode_calls == 0
    assert state.sparse_decode_calls == 3 * N_LAYERS  # the prefill gives the first token; three steps follow
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_want, step_dense in zip(got.scores[1:], expected.scores[1:], dense.scores[1:]):
        torch.testing.assert_close(step_got, step_want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(step_got, step_dense, rtol=1e-4, atol=1e-5)  # 64 of 200+ keys: not dense
    # A budget that covers the cache decodes dense, exactly.
    state = sparse_prefill.enable(model, min_seq_len=10_000, decode=SparseDecoding(budget=4096))
    assert torch.equal(model.generate(ids, **kwargs).sequences, dense.sequences) and state.sparse_decode_calls == 0
    sparse_prefill.disable(model)


@torch.no_grad()
def test_sparse_decoding_on_a_compressed_cache_and_its_errors():
    from sparse_prefill.decoding import SparseDecoding
    from sparse_prefill.kv_cache import make_kv_cache

    model = _model("llama")
    ids = _ids()
    state = sparse_prefill.enable(model, min_seq_len=MIN_SEQ, decode=SparseDecoding(**DECODING))
    cache = make_kv_cache("snapkv", model, 128, window=16)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, SEQ + 3) and state.sparse_decode_calls == 2 * N_LAYERS
    assert [layer.keys.shape[-2] for layer in cache.layers] == [128 + 2] * N_LAYERS
    # The summaries followed the compressed keys, not the prompt.
    assert {s.n_keys for per_layer in state.summaries.values() for s in per_layer.values()} == {128 + 2}
    # A padded batch cannot decode sparse yet: refused, not silently dense.
    batch = _ids(batch=2)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :20] = 0
    with pytest.raises(ValueError, match="a padded batch .* cannot decode sparse"):
        model.generate(batch, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="decode must be 'dense', 'sparse' or a SparseDecoding, got decode='quest'"):
        sparse_prefill.enable(model, decode="quest")
    with pytest.raises(ValueError, match="budget must be at least sink \\+ local"):
        SparseDecoding(budget=32, sink=16, local=32)
    sparse_prefill.disable(model)
