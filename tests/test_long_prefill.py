"""Long prefill (chunked forward, last-position logits, KV cache modes, fit check) on tiny CPU models.

Models have 2 layers, hidden size 64, 4 query and 2 KV heads and run in float64, so that the
chunked forward can be held to the plain transformers forward at 1e-10: any difference is a bug,
not rounding. Prompts are 100 tokens, chunks of 7 (chunks that do not divide the prompt).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_prefill  # noqa: E402
from sparse_prefill import PatternConfig, VerticalSlash  # noqa: E402
from sparse_prefill import long_prefill as lp  # noqa: E402

SEQ = 100
CHUNK = 7
COMMON = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
)


def _model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(**COMMON)
    elif arch == "mistral":  # default window 4096: longer than the prompt, so full attention
        config = transformers.MistralConfig(**COMMON)
    elif arch == "qwen2":  # biased q/k/v projections
        config = transformers.Qwen2Config(**COMMON)
    elif arch == "qwen3":  # q_norm / k_norm before RoPE, head_dim not hidden / heads
        config = transformers.Qwen3Config(**COMMON, head_dim=24)
    elif arch == "phi3":
        config = transformers.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _greedy_reference(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy tokens from plain forwards over the growing sequence (no cache involved)."""
    tokens = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1)
            tokens.append(nxt)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunk_size", [CHUNK, 4096])
def test_chunked_prefill_equals_plain_forward(arch, chunk_size):
    model, ids = _model(arch), _ids()
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    result = lp.prefill(model, ids, chunk_size=chunk_size)
    assert result.logits.shape == (2, 128) and result.cache is None
    assert _rel(result.logits, expected) < 1e-10


def test_cache_modes_give_the_same_logits_and_transformers_kv():
    model, ids = _model(), _ids()
    with torch.no_grad():
        reference = model(ids, use_cache=True).past_key_values
    none = lp.prefill(model, ids, chunk_size=CHUNK)
    for placement in ("device", "offload"):
        result = lp.prefill(model, ids, chunk_size=CHUNK, cache=placement)
        assert torch.equal(result.logits, none.logits), placement
        cache = result.cache
        assert cache.placement == placement and cache.prefilled == SEQ and cache.seq_len == SEQ
        for layer in range(2):
            assert _rel(cache.keys[layer], reference.layers[layer].keys) < 1e-12
            assert _rel(cache.values[layer], reference.layers[layer].values) < 1e-12


@pytest.mark.parametrize("placement", ["device", "offload"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generation_after_prefill_matches_plain_greedy(placement, arch):
    model, ids = _model(arch), _ids()
    result = lp.prefill(model, ids, chunk_size=CHUNK, cache=placement)
    tokens = lp.generate(model, result, 6)
    assert torch.equal(tokens, _greedy_reference(model, ids, 6))
    assert result.cache.seq_len == SEQ + 5  # the last token is produced, not yet fed back


def test_fp8_cache_round_trip_and_generation_close_to_exact():
    model, ids = _model(dtype=torch.float32), _ids()
    exact = lp.prefill(model, ids, chunk_size=CHUNK, cache="device")
    fp8 = lp.prefill(model, ids, chunk_size=CHUNK, cache="offload", kv_dtype=torch.float8_e4m3fn)
    assert fp8.cache.keys[0].dtype == torch.float8_e4m3fn
    assert torch.equal(fp8.logits, exact.logits)  # the cache does not feed the prefill itself
    for layer, (k, v) in enumerate(fp8.cache.prefilled_layers(torch.device("cpu"), torch.float32)):
        # e4m3 keeps 3 mantissa bits: relative rounding error at most 2**-4 per element, ~3% overall.
        for got, want in ((k, exact.cache.keys[layer]), (v, exact.cache.values[layer])):
            assert torch.isfinite(got).all()
            assert 1e-3 < _rel(got, want) < 0.05
    step_exact = lp.decode_step(model, exact.cache, exact.logits.argmax(-1)[:, None])
    step_fp8 = lp.decode_step(model, fp8.cache, fp8.logits.argmax(-1)[:, None])
    assert 0 < _rel(step_fp8, step_exact) < 0.05


def test_fp8_quantization_saturates_instead_of_nan():
    # Values whose scaled magnitude rounds just above 448 must clamp, not become NaN.
    x = torch.tensor([[448.9, -448.9, 1e-3, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    quantized, scale = lp.cache._quantize_fp8(x)
    back = quantized.to(torch.float32) * scale[..., None].float()
    assert torch.isfinite(back).all()
    assert torch.equal(back[1], torch.zeros(4))
    assert abs(float(back[0, 0]) - 448.9) / 448.9 < 0.07


def test_sparse_attention_through_enable_matches_transformers_forward():
    model, ids = _model(), _ids(batch=1)
    config = PatternConfig.uniform(2, 4, VerticalSlash(vertical=8, slash=16, last_q=16))
    state = sparse_prefill.enable(model, config, min_seq_len=64)
    try:
        with torch.no_grad():
            expected = model(ids).logits[:, -1]
        calls = state.sparse_calls
        result = lp.prefill(model, ids, chunk_size=CHUNK)
        assert state.sparse_calls == calls + 2  # both layers took the sparse path
        dense = lp.prefill(model, ids, chunk_size=CHUNK, attention=lp.sdpa_attention)
    finally:
        sparse_prefill.disable(model)
    assert _rel(result.logits, expected) < 1e-10
    assert _rel(dense.logits, expected) > 1e-6  # the sparse pattern really changed something


def test_attention_comes_from_the_enable_state_not_transformers_registry(monkeypatch):
    """The chunked forward asks sparse_prefill's own enable state for its attention: with transformers'
    registry emptied and every lookup in it failing, an enabled model still prefills sparse."""
    import transformers.modeling_utils
    from transformers import AttentionInterface

    def no_lookup(self, key):
        raise AssertionError(f"looked up {key!r} in transformers' attention registry")

    model, ids = _model(), _ids(batch=1)
    plain = lp.prefill(model, ids, chunk_size=CHUNK)  # not enabled: dense SDPA
    assert torch.equal(plain.logits, lp.prefill(model, ids, chunk_size=CHUNK, attention=lp.sdpa_attention).logits)
    config = PatternConfig.uniform(2, 4, VerticalSlash(vertical=8, slash=16, last_q=16))
    state = sparse_prefill.enable(model, config, min_seq_len=64)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(transformers.modeling_utils, "ALL_ATTENTION_FUNCTIONS", {})
            patch.setattr(AttentionInterface, "__getitem__", no_lookup)
            calls = state.sparse_calls
            sparse = lp.prefill(model, ids, chunk_size=CHUNK)
            assert state.sparse_calls == calls + 2  # both layers took the sparse path
    finally:
        sparse_prefill.disable(model)
    assert _rel(sparse.logits, plain.logits) > 1e-6
    model.config._attn_implementation = "someone_elses"
    with pytest.raises(ValueError, match="attention implementation is 'someone_elses': pass its function as attention="):
        lp.prefill(model, ids, chunk_size=CHUNK)


def test_default_crossover_keeps_short_gpu_prompts_dense():
    from types import SimpleNamespace

    from sparse_prefill.presets import PRESETS

    model = _model()
    state = sparse_prefill.enable(model)  # no min_seq_len: the preset's measured crossover on the device
    try:
        default = PRESETS["default"]
        assert state.preset is default and state.config is None
        assert state.shortest_sparse(torch.empty(1)) == default.min_seq_len_cpu
        assert state.shortest_sparse(SimpleNamespace(is_cuda=True)) == default.min_seq_len_cuda > default.min_seq_len_cpu
        fast = sparse_prefill.enable(model, preset="fast")
        assert fast.preset is PRESETS["fast"]
        assert fast.shortest_sparse(SimpleNamespace(is_cuda=True)) == PRESETS["fast"].min_seq_len_cuda
        explicit = sparse_prefill.enable(model, min_seq_len=64)
        assert explicit.shortest_sparse(SimpleNamespace(is_cuda=True)) == 64
    finally:
        sparse_prefill.disable(model)
    with pytest.raises(ValueError, match=r"min_seq_len must be a positive int, got min_seq_len=0 \(or None"):
        sparse_prefill.enable(model, min_seq_len=0)
    with pytest.raises(ValueError, match=r"preset must be one of \['default', 'dense', 'fast'\], got preset='quick'"):
        sparse_prefill.enable(model, preset="quick")


def test_fused_bodies_compile_once_for_every_layer_chunk_and_prompt_length(monkeypatch):
    """One graph per body for all layers, chunk lengths (the last chunk is shorter) and prompt lengths."""
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward  # run what dynamo traced, uncompiled: the same operations as the bodies

    monkeypatch.setattr(lp.layer, "_BACKEND", counting_backend)
    monkeypatch.setattr(lp.layer, "_FUSED", {})
    model = _model(dtype=torch.float32)
    lp.prefill(model, _ids(), chunk_size=CHUNK)
    assert not graphs  # the default on the CPU: unfused
    for seq, chunk_size in ((SEQ, CHUNK), (64, 16), (130, 32)):
        ids = _ids(seq=seq)
        fused = lp.prefill(model, ids, chunk_size=chunk_size, fuse=True, cache="device")
        plain = lp.prefill(model, ids, chunk_size=chunk_size, fuse=False, cache="device")
        assert torch.equal(fused.logits, plain.logits)
        assert torch.equal(fused.cache.keys[1], plain.cache.keys[1]) and torch.equal(fused.cache.values[1], plain.cache.values[1])
    assert len(graphs) == 2, [graph.code for graph in graphs]  # pre-attention, post-attention
    dead = weakref.ref(model)
    del model
    gc.collect()
    assert dead() is None  # the compiled bodies do not keep a model (its weights) alive


@pytest.mark.parametrize("failure", ["compiler", "recompile_limit"])
def test_fused_falls_back_to_unfused_when_compiling_fails(monkeypatch, failure):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler (simulated)")

    def eager_backend(graph, example_inputs):
        return graph.forward

    monkeypatch.setattr(lp.layer, "_FUSED", {})
    if failure == "compiler":
        monkeypatch.setattr(lp.layer, "_BACKEND", failing_backend)
        expected = "no C++ compiler (simulated)"
    else:  # a second kind of layer, with dynamo allowed a single graph per function
        monkeypatch.setattr(lp.layer, "_BACKEND", eager_backend)
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
        with warnings.catch_warnings():  # it takes dynamo's one graph, unless an earlier test did
            warnings.simplefilter("ignore", RuntimeWarning)
            lp.prefill(_model("qwen3"), _ids(), chunk_size=CHUNK, fuse=True)
        expected = "FailOnRecompileLimitHit"
    model, ids = _model(), _ids()
    with pytest.warns(RuntimeWarning) as warned:
        fused = lp.prefill(model, ids, chunk_size=CHUNK, fuse=True)
    assert [str(w.message).split(" (prefill")[0] for w in warned] == [
        f"long prefill: torch.compile of {body} failed for LlamaDecoderLayer, which runs unfused from now on"
        for body in ("pre_attention", "post_attention")
    ]
    assert all(expected in str(w.message) for w in warned), [str(w.message) for w in warned]
    assert torch.equal(fused.logits, lp.prefill(model, ids, chunk_size=CHUNK, fuse=False).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the layer type is not compiled again
        assert torch.equal(lp.prefill(model, ids, chunk_size=CHUNK, fuse=True).logits, fused.logits)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_prefill_equals_unfused(arch):
    """torch.compile's inductor on the CPU (about 20 s per architecture on 2 cores): the fused bodies
    give the unfused result up to float32 rounding, logits and cache alike, at any prompt length."""
    model = _model(arch, dtype=torch.float32)
    for seq, chunk_size in ((SEQ, CHUNK), (130, 32)):
        ids = _ids(seq=seq)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compile falls back with a warning
            fused = lp.prefill(model, ids, chunk_size=chunk_size, fuse=True, cache="device")
        plain = lp.prefill(model, ids, chunk_size=chunk_size, fuse=False, cache="device")
        assert _rel(fused.logits, plain.logits) < 1e-5
        for layer in range(2):
            assert _rel(fused.cache.keys[layer], plain.cache.keys[layer]) < 1e-5
            assert _rel(fused.cache.values[layer], plain.cache.values[layer]) < 1e-5


def test_profile_times_attention():
    model, ids = _model(), _ids()
    result = lp.prefill(model, ids, chunk_size=CHUNK, profile=True)
    assert result.attention_seconds is not None and result.attention_seconds > 0
    assert lp.prefill(model, ids).attention_seconds is None


def test_too_long_prompt_is_refused_before_allocating():
    model = _model(dtype=torch.float32)
    # A view: 2**40 ids take no memory; the check must not read or allocate anything per token.
    ids = torch.zeros(1, 1, dtype=torch.long).expand(1, 1 << 40)
    with pytest.raises(lp.PrefillMemoryError, match=r"prefill of 1,099,511,627,776 tokens .* needs [0-9.]+ GiB"):
        lp.prefill(model, ids, cache="device")


def test_memory_needed_at_llama3_8b_shapes():
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    gib, tokens = 2**30, 1 << 20
    none = lp.memory_needed(model, tokens)
    assert none.hidden == 8 * gib and none.qkv == 12 * gib and none.kv_cache == 0 and none.host == 0
    assert none.attention == 8 * gib + gib // 4  # the output, plus an allowance for the sparse plan
    # Measured on an H100 (docs/BENCHMARKS.md): 43.57 GiB peak with the 15 GiB of weights.
    assert 28 * gib < none.device < 29 * gib
    assert lp.memory_needed(model, tokens, cache="device").kv_cache == 128 * gib
    offload = lp.memory_needed(model, tokens, cache="offload", kv_dtype=torch.float8_e4m3fn)
    assert offload.host == 64 * gib + 32 * 2 * 2 * gib // 128  # values, plus one bf16 scale per 128
    assert offload.kv_cache == 2 * (gib + gib // 64)


def test_oom_mid_prefill_frees_its_buffers():
    model, ids = _model(), _ids()
    seen: list[weakref.ref] = []

    def failing_attention(module, q, k, v, mask, **kwargs):
        seen.append(weakref.ref(q))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError, match="buffers have been freed"):
        lp.prefill(model, ids, chunk_size=CHUNK, cache="device", attention=failing_attention)
    gc.collect()
    assert seen and seen[0]() is None  # the prefill's Q buffer did not outlive the error
    assert lp.prefill(model, ids, chunk_size=CHUNK).logits.shape == (2, 128)  # and the next call works


def test_bad_inputs_name_the_argument():
    model, ids = _model(), _ids()
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, seq\] tensor"):
        lp.prefill(model, ids[0])
    with pytest.raises(TypeError, match="integer token ids"):
        lp.prefill(model, ids.double())
    with pytest.raises(ValueError, match=r"must lie in \[0, 128\), got values in \[3, 500\]"):
        lp.prefill(model, torch.cat((ids, torch.full((2, 1), 500)), dim=1))
    with pytest.raises(ValueError, match="cache must be None, 'device' or 'offload', got cache='gpu'"):
        lp.prefill(model, ids, cache="gpu")
    with pytest.raises(ValueError, match="kv_dtype must be None"):
        lp.prefill(model, ids, cache="device", kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got chunk_size=0"):
        lp.prefill(model, ids, chunk_size=0)
    with pytest.raises(TypeError, match="fuse must be True, False or None .*, got fuse='yes'"):
        lp.prefill(model, ids, fuse="yes")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        lp.generate(model, lp.prefill(model, ids, cache="device"), 0)
    with pytest.raises(ValueError, match="kept no cache"):
        lp.generate(model, lp.prefill(model, ids), 2)


def test_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="sliding window of 16 tokens"):
        lp.prefill(_model("mistral", sliding_window=16), _ids())
    # Phi-3: fused qkv_proj and residual dropout modules in its layers.
    with pytest.raises(ValueError, match="Llama-like decoder layers .* Phi3ForCausalLM has .*resid_attn_dropout"):
        lp.prefill(_model("phi3"), _ids())
