"""KV-cache compression after prefill (sparse_prefill.kv_cache): kept positions on hand-built inputs,
the window scores against their definition, and exact decoding against a full cache that masks what
was evicted.

Models are tiny random Llamas (hidden 64, 4 query heads, 2 KV heads) on CPU; prompts of 200 tokens
with ``min_seq_len=64`` so that the sparse prefill path runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import sparse_prefill  # noqa: E402
from sparse_prefill.integrations.capture import capture_qkv  # noqa: E402
from sparse_prefill.kv_cache import (  # noqa: E402
    METHODS,
    PyramidKVCache,
    SnapKVCache,
    StreamingLLMCache,
    cache_stats,
    check_kv_options,
    make_kv_cache,
    pyramid_capacities,
    snapkv_positions,
    streaming_positions,
    window_attention_scores,
)

SEQ = 200
Q_HEADS, KV_HEADS = 4, 2


def tiny_llama(layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=128, max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).eval()


def prompt(seed: int = 1, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 128, (1, seq), generator=torch.Generator().manual_seed(seed))


# --- kept positions on hand-built inputs ---------------------------------------------------------------


def test_snapkv_keeps_top_prefix_scores_and_the_window():
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.3, 0.4, 4.0, 0.5, 2.0, 0.6, 9.0, 9.0])[None, None]
    kept = snapkv_positions(scores, capacity=6, window=2, kernel=1)
    assert kept.tolist() == [[[1, 3, 6, 8, 10, 11]]]


def test_snapkv_pooling_spreads_a_spike_to_its_neighbours():
    # One spike at 5; the 5-wide average gives 2.0 at positions 3..7 and 0 elsewhere: exactly 5 winners.
    scores = torch.zeros(1, 1, 12)
    scores[0, 0, 5] = 10.0
    assert snapkv_positions(scores, capacity=7, window=2, kernel=5).tolist() == [[[3, 4, 5, 6, 7, 10, 11]]]
    # Zero padding counts: a spike at position 0 reaches 0..2 only (each 10 / 5).
    scores = torch.zeros(1, 1, 12)
    scores[0, 0, 0] = 10.0
    scores[0, 0, 9] = 3.0  # pooled 0.6 at 7..9 (the pool sees only the prefix 0..9)
    kept = snapkv_positions(scores, capacity=8, window=2, kernel=5)
    assert kept.tolist() == [[[0, 1, 2, 7, 8, 9, 10, 11]]]


def test_streaming_positions():
    assert streaming_positions(10, capacity=5, sink=2).tolist() == [0, 1, 7, 8, 9]
    assert streaming_positions(10, capacity=5, sink=0).tolist() == [5, 6, 7, 8, 9]
    assert streaming_positions(4, capacity=5, sink=2).tolist() == [0, 1, 2, 3]


def test_pyramid_schedule():
    # B = 100: top layer 100 / 20 = 5, bottom 2 * 100 - 5 = 195, linear in between; plus the window.
    assert pyramid_capacities(132, 3, window=32, beta=20) == [227, 132, 37]
    capacities = pyramid_capacities(1024, 30, window=32)
    assert capacities[0] > capacities[-1] and all(a >= b for a, b in zip(capacities, capacities[1:]))
    assert abs(sum(capacities) / 30 - 1024) <= 0.5
    assert pyramid_capacities(64, 1, window=32) == [64]
    assert pyramid_capacities(32, 4, window=32) == [32] * 4


def one_hot_case():
    """Keys are one-hot (key j = e_j); window queries point at chosen positions. Scale 1."""
    seq, dim = 16, 16
    k = torch.eye(seq, dim)[None, None].repeat(1, KV_HEADS, 1, 1)  # [1, kv, seq, dim]
    v = torch.randn(1, KV_HEADS, seq, dim)
    q = torch.zeros(1, Q_HEADS, seq, dim)
    e = torch.eye(dim)
    # KV head 0 serves query heads 0, 1; KV head 1 serves 2, 3 (GQA, group 2).
    q[0, 0, -2:] = 10 * e[3]
    q[0, 1, -2:] = 10 * e[7]
    q[0, 2, -2:] = 10 * e[5]
    q[0, 3, -2:] = 10 * e[5] + 8 * e[9]
    return q, k, v


def test_window_scores_against_the_definition():
    q, k, _ = one_hot_case()
    scores = window_attention_scores(q, k, window=2, scale=1.0)
    assert scores.shape == (1, Q_HEADS, 16)
    for head in range(Q_HEADS):
        expected = torch.zeros(16)
        for i in (14, 15):
            logits = q[0, head, i] @ k[0, head // 2, : i + 1].T
            expected[: i + 1] += logits.softmax(-1)
        torch.testing.assert_close(scores[0, head], expected)
    assert torch.allclose(scores.sum(-1), torch.full((1, Q_HEADS), 2.0))


def test_snapkv_cache_keeps_each_kv_heads_own_positions():
    q, k, v = one_hot_case()
    cache = SnapKVCache(capacity=4, num_layers=1, window=2, kernel=1)
    keys, values = cache.update(k, v, 0)
    assert keys is k  # the prefill attends to the whole prompt
    layer = cache.pending_layer(0)
    assert layer is cache.layers[0] and layer.window == 2
    layer.compress(window_attention_scores(q, keys, layer.window, 1.0))
    assert cache.pending_layer(0) is None
    # KV head 0: its two query heads vote for 3 and 7; KV head 1: 5 (both heads), then 9.
    assert cache.kept_positions[0].tolist() == [[[3, 7, 14, 15], [5, 9, 14, 15]]]
    kept = cache.kept_positions[0]
    assert torch.equal(cache.layers[0].keys, k.gather(2, kept[..., None].expand(-1, -1, -1, 16)))
    assert torch.equal(cache.layers[0].values, v.gather(2, kept[..., None].expand(-1, -1, -1, 16)))
    assert cache.get_seq_length() == 16  # tokens seen: the next position
    assert cache.get_mask_sizes(1, 0) == (5, 12)  # 4 held + 1 new, numbered from 12
    cache.update(k[:, :, :1], v[:, :, :1], 0)
    assert cache.layers[0].keys.shape[-2] == 5 and cache.get_seq_length() == 17


def test_streaming_cache_hand_built():
    k, v = torch.randn(2, KV_HEADS, 10, 8), torch.randn(2, KV_HEADS, 10, 8)
    cache = StreamingLLMCache(capacity=5, num_layers=1, sink=2)
    cache.update(k, v, 0)
    cache.pending_layer(0).compress(None)
    assert torch.equal(cache.layers[0].keys, k[:, :, [0, 1, 7, 8, 9]])
    assert torch.equal(cache.layers[0].values, v[:, :, [0, 1, 7, 8, 9]])


# --- bad input -------------------------------------------------------------------------------------------


def test_capacity_larger_than_the_prompt_keeps_everything():
    k, v = torch.randn(1, KV_HEADS, 10, 8), torch.randn(1, KV_HEADS, 10, 8)
    for cache in (SnapKVCache(64, 1), PyramidKVCache(64, 2), StreamingLLMCache(64, 1)):
        cache.update(k, v, 0)
        assert cache.pending_layer(0) is None  # nothing to compress, nothing waits
        assert torch.equal(cache.layers[0].keys, k) and cache.kept_positions[0] is None


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="capacity=16, window=32"):
        SnapKVCache(16, 2)
    with pytest.raises(ValueError, match="capacity=8, window=32"):
        PyramidKVCache(8, 2)
    with pytest.raises(ValueError, match="capacity=4, sink=4"):
        StreamingLLMCache(4, 2)
    with pytest.raises(ValueError, match="kernel=4"):
        SnapKVCache(64, 2, kernel=4)
    with pytest.raises(ValueError, match="num_layers=0"):
        SnapKVCache(64, 0)
    config = tiny_llama().config
    with pytest.raises(ValueError, match="unknown KV cache method 'h2o'; valid methods: full, snapkv, pyramidkv, streamingllm"):
        make_kv_cache("h2o", config, 64)
    with pytest.raises(ValueError, match="streamingllm takes the options sink; got kernel"):
        make_kv_cache("streamingllm", config, 64, kernel=7)
    with pytest.raises(ValueError, match=r"full takes the options \(none\); got kernel"):
        make_kv_cache("full", config, kernel=9)
    assert make_kv_cache("snapkv", config, 64, kernel=9).kernel == 9
    assert METHODS == ("full", "snapkv", "pyramidkv", "streamingllm")
    # No model: was AttributeError: 'NoneType' object has no attribute 'num_hidden_layers'.
    for method in METHODS:
        with pytest.raises(TypeError, match="make_kv_cache needs the model .*model_or_config must have "
                                            "config.num_hidden_layers, got NoneType"):
            make_kv_cache(method, None)


def test_options_are_checked_without_a_model():
    """What commands call before loading a model: the same errors as make_kv_cache, no model needed."""
    check_kv_options("snapkv", 256, kernel=9)
    check_kv_options("full")
    with pytest.raises(ValueError, match="kernel must be an odd positive int"):
        check_kv_options("snapkv", kernel=4)
    with pytest.raises(ValueError, match="capacity must be a positive int, got capacity=-5"):
        check_kv_options("pyramidkv", -5)
    with pytest.raises(ValueError, match="beta must be a positive int"):
        check_kv_options("pyramidkv", 256, beta=0)
    with pytest.raises(ValueError, match="capacity=4, sink=4"):
        check_kv_options("streamingllm", 4)
    with pytest.raises(ValueError, match="unknown KV cache method 'h2o'"):
        check_kv_options("h2o")


@pytest.mark.parametrize("method", ["snapkv", "streamingllm"])
def test_a_spent_cache_reused_by_a_second_generate_is_refused(method):
    """generate() again with a cache that holds a prompt and its answer fed the prompt's tail at
    positions the cache had already seen, and answered without a word; a continuation still works."""
    model = tiny_llama(layers=1)
    sparse_prefill.enable(model, min_seq_len=64)
    ids = prompt(seed=5)
    cache = make_kv_cache(method, model, 48)
    settings = dict(past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    model.generate(ids, **settings)
    with pytest.raises(ValueError, match=f"has already seen {SEQ + 2} tokens, but {SEQ - 2} new ones start at "
                                         "position 2.*make a new one with make_kv_cache"):
        model.generate(ids, **settings)
    cache = make_kv_cache(method, model, 48)  # the same prompt, then a second turn appended to its answer
    out = model.generate(ids, **settings | {"past_key_values": cache})
    second = model.generate(torch.cat([out, torch.tensor([[5, 6, 7]])], dim=1), **settings | {"past_key_values": cache})
    assert second.shape[1] == SEQ + 3 + 3 + 3 and cache.get_seq_length() == SEQ + 3 + 3 + 2


def test_snapkv_needs_sparse_prefills_attention():
    model = tiny_llama()
    with pytest.raises(ValueError, match="sparse_prefill.enable"):
        make_kv_cache("snapkv", model, 64)
    # Built without the check (from the config) and run on plain SDPA: a clear error at the first step after prefill.
    cache = make_kv_cache("snapkv", model.config, 64)
    with torch.no_grad():
        model(prompt(), past_key_values=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="sparse_prefill.enable"):
            model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)


# --- the window scores: Vertical-Slash's last-query statistics, against the plain definition --------------


def window_scores_definition(query, key, window):
    """Scores in float64 from the definition: softmax rows of the last ``window`` queries, summed per key."""
    batch, q_heads, seq, dim = query.shape
    group = q_heads // key.shape[1]
    keys = key.double().repeat_interleave(group, dim=1)
    logits = query.double() @ keys.transpose(-1, -2) * dim**-0.5  # [batch, q_heads, seq, seq]
    logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(dim=-1)[:, :, seq - min(window, seq) :].sum(dim=2)


@given(seq=st.one_of(st.integers(1, 70), st.sampled_from([63, 64, 65, 129, 200])), window=st.integers(1, 80),
       heads=st.sampled_from([(1, 1), (4, 2), (8, 1), (8, 2), (4, 4)]), batch=st.integers(1, 2),
       dim=st.sampled_from([64, 80, 96, 128]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
def test_window_scores_equal_softmax_column_sums(seq, window, heads, batch, dim, dtype):
    """GQA, windows shorter and longer than the prompt, every dtype (half precision: float32 arithmetic,
    or the fused Triton pass on a GPU) against the float64 definition on the same inputs."""
    q_heads, kv_heads = heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    query = (1.5 * torch.randn(batch, q_heads, seq, dim, generator=g)).to(dtype).to(device)
    key = (1.5 * torch.randn(batch, kv_heads, seq, dim, generator=g)).to(dtype).to(device)
    scores = window_attention_scores(query, key, window, dim**-0.5)
    want = window_scores_definition(query.cpu(), key.cpu(), window)
    assert scores.shape == (batch, q_heads, seq)
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-3)
    error = ((scores.cpu().double() - want).norm() / want.norm()).item()
    assert error <= tolerance, error
    torch.testing.assert_close(scores.sum(-1).cpu().double(), torch.full((batch, q_heads), float(min(window, seq)),
                                                                         dtype=torch.float64), rtol=1e-3, atol=0)


def test_only_methods_that_need_scores_compute_them(monkeypatch):
    """StreamingLLM compresses without scores; SnapKV's are computed once per layer, from the prefill's queries."""
    from sparse_prefill.integrations import transformers as integration

    calls = []
    original = integration.window_attention_scores

    def counting(query, key, window, scale):
        calls.append((window, query.shape[-2], key.shape[-2]))
        return original(query, key, window, scale)

    monkeypatch.setattr(integration, "window_attention_scores", counting)
    model = tiny_llama(layers=2)
    sparse_prefill.enable(model, min_seq_len=64)
    with torch.no_grad():
        streaming = make_kv_cache("streamingllm", model, 20)
        model(prompt(seed=4), past_key_values=streaming, use_cache=True)
        assert calls == [] and all(layer.kept is not None for layer in streaming.layers)
        snap = make_kv_cache("snapkv", model, 40, window=8)
        model(prompt(seed=4), past_key_values=snap, use_cache=True)
    assert calls == [(8, SEQ, SEQ)] * 2  # each layer once, with the whole prefill's queries and keys
    assert [layer.keys.shape[-2] for layer in snap.layers] == [40, 40]


def test_the_cache_link_is_the_enabled_models_own_and_goes_with_disable():
    """enable() notes the call's compressing cache through pre-hooks it owns; disable() removes them."""
    model = tiny_llama(layers=2)
    attention = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "q_proj")]
    hooks = lambda: [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in attention]  # noqa: E731
    before = hooks()
    sparse_prefill.enable(model, min_seq_len=64)
    state = sparse_prefill.enable(model, min_seq_len=64)  # enabling again replaces, does not stack hooks
    assert hooks() == [(pre + 1, post + 1) for pre, post in before]
    cache = make_kv_cache("snapkv", model, 40)
    seen = []
    handle = attention[1].register_forward_pre_hook(lambda *_: seen.append(state.compressing_cache))
    with torch.no_grad():
        model(prompt(seed=5), past_key_values=cache, use_cache=True)
    handle.remove()
    assert seen == [cache] and cache.pending_layer(0) is None and cache.pending_layer(1) is None
    assert state.cache is None and state.compressing_cache is None  # forgotten once the layer's call is over
    sparse_prefill.disable(model)
    assert hooks() == before


# --- end to end: decoding from a compressed cache equals a full cache that masks the evicted keys --------


def decode_with_masked_full_cache(model, ids, new_tokens, kept_per_kv_head):
    """Logits of ``new_tokens`` [1, n] after ``ids`` with a full cache, hiding prompt keys outside ``kept``.

    kept_per_kv_head: long [1, kv_heads, m] prompt positions (the same for every layer).
    """
    seq, n = ids.shape[1], new_tokens.shape[1]
    full = make_kv_cache("full", model.config)
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
        prompt_keep = torch.zeros(KV_HEADS, seq, dtype=torch.bool)
        prompt_keep.scatter_(1, kept_per_kv_head[0], True)
        mask = torch.zeros(1, Q_HEADS, n, seq + n, dtype=torch.bool)
        mask[0, :, :, :seq] = prompt_keep.repeat_interleave(Q_HEADS // KV_HEADS, dim=0)[:, None, :]
        mask[0, :, :, seq:] = torch.ones(n, n, dtype=torch.bool).tril()
        position_ids = torch.arange(seq, seq + n)[None]
        return model(new_tokens, past_key_values=full, attention_mask=mask, position_ids=position_ids, use_cache=True).logits


@pytest.mark.parametrize("method", ["snapkv", "streamingllm"])
def test_decoding_from_compressed_cache_is_exact(method):
    model = tiny_llama(layers=1)
    sparse_prefill.enable(model, min_seq_len=64)
    ids = prompt()
    cache = make_kv_cache(method, model, 48)
    state = sparse_prefill.integrations.transformers.state_of(model)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert state.sparse_calls == 1  # the prefill ran sparse and handed its queries over
    kept = cache.kept_positions[0]
    assert kept.shape == (1, KV_HEADS, 48) and cache_stats(cache)["keys_held_mean"] == 48
    if method == "snapkv":
        q, k, _ = capture_qkv(model, ids, [0])[0]
        scores = window_attention_scores(q, k, 32, q.shape[-1] ** -0.5)
        assert torch.equal(kept, snapkv_positions(scores.view(1, KV_HEADS, 2, -1).sum(2), 48, 32))
    else:
        assert torch.equal(kept, streaming_positions(SEQ, 48, 4).expand(1, KV_HEADS, -1))
    # Three new tokens in one step, then one more: positions and causal mask through the compressed cache.
    new = torch.tensor([[7, 11, 13]])
    with torch.no_grad():
        got = model(new, past_key_values=cache, use_cache=True).logits
    expected = decode_with_masked_full_cache(model, ids, new, kept)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == SEQ + 3 and cache.layers[0].keys.shape[-2] == 48 + 3


def test_streamingllm_works_without_sparse_prefill_and_compresses_at_the_first_step():
    model = tiny_llama(layers=2)
    ids = prompt(seed=3)
    cache = make_kv_cache("streamingllm", model, 40)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        assert cache.layers[0].keys.shape[-2] == SEQ  # plain SDPA: nobody called back yet
        got = model(torch.tensor([[9]]), past_key_values=cache, use_cache=True).logits
    kept = streaming_positions(SEQ, 40, 4).expand(1, KV_HEADS, -1)
    expected = decode_with_masked_full_cache(model, ids, torch.tensor([[9]]), kept)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [41, 41]


def test_pyramidkv_layers_keep_their_schedule_and_snapkv_choice():
    model = tiny_llama(layers=3)
    ids = prompt(seed=2)
    captured = capture_qkv(model, ids, [0, 1, 2])
    # Dense prefill through sparse_prefill's attention (every layer's Q/K then equal the captured ones).
    sparse_prefill.enable(model, preset="dense")
    cache = make_kv_cache("pyramidkv", model, 64)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == SEQ + 3
    capacities = pyramid_capacities(64, 3, 32)  # [95, 64, 33]
    assert [layer.keys.shape[-2] for layer in cache.layers] == [c + 2 for c in capacities]  # + 2 decoded keys
    for layer, capacity in enumerate(capacities):
        q, k, _ = captured[layer]
        scores = window_attention_scores(q, k, 32, q.shape[-1] ** -0.5).view(1, KV_HEADS, 2, -1).sum(2)
        assert torch.equal(cache.kept_positions[layer], snapkv_positions(scores, capacity, 32))
    with pytest.raises(ValueError, match="one token per step"):
        with torch.no_grad():
            model(torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)


def test_full_and_uncompressed_caches_decode_like_dynamic_cache():
    model = tiny_llama(layers=2)
    sparse_prefill.enable(model, min_seq_len=64)
    ids = prompt(seed=4)
    outputs = {}
    for method in ("full", "snapkv", "streamingllm"):
        cache = make_kv_cache(method, model, 256)  # capacity above the prompt: nothing evicted
        with torch.no_grad():
            outputs[method] = model.generate(ids, past_key_values=cache, max_new_tokens=4, min_new_tokens=4,
                                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    for method in ("snapkv", "streamingllm"):
        assert torch.equal(outputs[method].sequences, outputs["full"].sequences)
        torch.testing.assert_close(torch.stack(outputs[method].logits), torch.stack(outputs["full"].logits))


# --- sparse-prefill eval --kv ------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_kv_option_labels_and_compresses(tmp_path, capsys):
    from sparse_prefill import cli

    out = tmp_path / "needle"
    common = ["eval", "needle", "--lengths", "1k", "--depths", "0.5", "--out", str(out), "--no-progress", "--device", "cpu"]
    # Dense prefill (through sparse_prefill's attention, so SnapKV gets its queries) and sparse prefill.
    assert cli.main(common + ["--method", "dense,sparse", "--kv", "snapkv", "--kv-capacity", "256"]) == 0
    records = [json.loads(line) for line in (out / "needle.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in records) == ["dense + snapkv 256", "sparse + snapkv 256"]
    for r in records:  # the prompt's ~1K tokens were compressed to the capacity, then decoding appended
        assert r["kv_capacity"] <= r["kv_keys_held"] < r["kv_capacity"] + 64, r
    assert [r["sparse_layers"] for r in sorted(records, key=lambda r: r["label"])] == [0, 30]
    assert "| sparse + snapkv 256 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kv", "h2o"], "--kv 'h2o' is not a KV cache method; expected one of full, snapkv, pyramidkv, streamingllm"),
        (["--kv", "snapkv", "--kv-capacity", "16"], "capacity=16, window=32"),
        (["--kv", "snapkv", "--kv-kernel", "4"], "kernel must be an odd positive int"),
        (["--kv", "streamingllm", "--kv-kernel", "7"], "streamingllm takes the options sink; got kernel"),
    ],
)
def test_eval_kv_bad_input(tmp_path, capsys, extra, message):
    from sparse_prefill import cli

    args = ["eval", "needle", "--smoke", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    assert cli.main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_eval_kv_does_not_apply_to_perplexity(tmp_path, capsys):
    from sparse_prefill import cli

    args = ["eval", "ppl", "--smoke", "--kv", "snapkv", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    assert cli.main(args) == 2
    assert "applies to needle and ruler, not ppl" in capsys.readouterr().err


def test_eval_decode_budget_decodes_sparse_and_labels_it(tmp_path, capsys):
    from sparse_prefill import cli

    out = tmp_path / "needle"
    common = ["eval", "needle", "--lengths", "1k", "--depths", "0.5", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert cli.main(common + ["--method", "dense,sparse", "--decode-budget", "256"]) == 0
    records = [json.loads(line) for line in (out / "needle.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in records) == ["dense + sparse decode 256", "sparse + sparse decode 256"]
    for r in records:  # every decoding step after the first token read 256 of ~1K keys, in all 30 layers
        assert r["decode_budget"] == 256 and r["sparse_decode_layers"] > 0 and r["sparse_decode_layers"] % 30 == 0, r
    assert "| sparse + sparse decode 256 |" in capsys.readouterr().out
    assert cli.main(["eval", "ppl", "--smoke", "--out", str(tmp_path / "p"), "--decode-budget", "256"]) == 2
    assert "--decode-budget applies to needle and ruler, not ppl" in capsys.readouterr().err
    assert cli.main(["eval", "needle", "--smoke", "--out", str(tmp_path / "n"), "--decode-budget", "40"]) == 2
    assert "--decode-budget: budget must be at least sink + local" in capsys.readouterr().err
