"""Sparse decoding through long_prefill (issue 17, item 3; item 2's offloaded path on the CPU).

Tiny Llama models as in tests/test_long_prefill.py (2 layers, 4 query / 2 KV heads, head_dim 16),
float64 so that sparse and dense attention over the same keys agree to 1e-12; FP8 caches with a
float32 model. The cache modes run on the CPU ("offload" then means unpinned host memory and the
same gathers without the asynchronous copies); the Triton kernel path (device cache, CUDA,
fp16/bf16) is covered by tests/test_decoding.py and needs a GPU here.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from sparse_prefill import long_prefill as lp  # noqa: E402
from sparse_prefill.decoding import decode_attention_reference, page_summaries, select_pages  # noqa: E402

SEQ = 100
CHUNK = 7
NEW = 6
COMMON = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
)
# (placement, kv_dtype, model dtype): FP8 needs a model dtype it can scale in (float32).
MODES = [
    ("device", None, torch.float64),
    ("offload", None, torch.float64),
    ("device", torch.float8_e4m3fn, torch.float32),
    ("offload", torch.float8_e4m3fn, torch.float32),
]
MODE_IDS = ["device", "offload", "device-fp8", "offload-fp8"]
SMALL = dict(budget=40, sink=8, local=16, page_size=8)  # 5 of 13-14 pages: really sparse


def _model(dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**COMMON)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _whole_cache(cache: lp.KVCache, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys and values as attention reads them: dequantized prefill, then the decoded tokens."""
    key, value = list(cache.prefilled_layers(torch.device("cpu"), dtype))[layer]
    return torch.cat((key, cache.new_keys[layer]), dim=2), torch.cat((value, cache.new_values[layer]), dim=2)


@pytest.mark.parametrize(("placement", "kv_dtype", "dtype"), MODES, ids=MODE_IDS)
def test_one_prefill_decoded_several_ways_continues_the_prompt_each_time(placement, kv_dtype, dtype):
    # generate drops what an earlier call decoded: dense, sparse, sparse again and dense again from one
    # prefill give what each gives from a prefill of its own.
    model, ids = _model(dtype), _ids()
    def fresh():
        return lp.prefill(model, ids, chunk_size=CHUNK, cache=placement, kv_dtype=kv_dtype)
    dense, sparse = lp.generate(model, fresh(), NEW), lp.generate(model, fresh(), NEW, decode="sparse", **SMALL)
    result = fresh()
    assert torch.equal(lp.generate(model, result, NEW), dense)
    assert torch.equal(lp.generate(model, result, NEW, decode="sparse", **SMALL), sparse)
    assert torch.equal(lp.generate(model, result, NEW, decode="sparse", **SMALL), sparse)
    assert torch.equal(lp.generate(model, result, NEW), dense)
    assert result.cache.seq_len == SEQ + NEW - 1


@pytest.mark.parametrize(("placement", "kv_dtype", "dtype"), MODES, ids=MODE_IDS)
def test_budget_covering_the_cache_gives_the_dense_tokens(placement, kv_dtype, dtype):
    model, ids = _model(dtype), _ids()
    dense = lp.generate(model, lp.prefill(model, ids, chunk_size=CHUNK, cache=placement, kv_dtype=kv_dtype), NEW)
    result = lp.prefill(model, ids, chunk_size=CHUNK, cache=placement, kv_dtype=kv_dtype)
    sparse = lp.generate(model, result, NEW, decode="sparse", budget=SEQ + NEW)
    assert torch.equal(sparse, dense)
    cache = result.cache
    assert cache.seq_len == SEQ + NEW - 1
    for layer in range(2):
        # Summaries built after prefill and appended step by step equal summaries built afresh
        # (of the dequantized keys for FP8), across the prefill/decoded boundary.
        keys, _ = _whole_cache(cache, layer, dtype)
        fresh = page_summaries(keys, cache.summaries[layer].page_size)
        assert cache.summaries[layer].n_keys == SEQ + NEW - 1
        assert torch.equal(cache.summaries[layer].key_min, fresh.key_min)
        assert torch.equal(cache.summaries[layer].key_max, fresh.key_max)


@pytest.mark.parametrize(("placement", "kv_dtype", "dtype"), MODES, ids=MODE_IDS)
def test_every_page_selected_below_the_cache_length_matches_dense(placement, kv_dtype, dtype):
    """A budget one key short of the cache still rounds up to every page: the sparse machinery
    (select_pages, then the decode attention or the page gather) runs and must give dense logits."""
    model, ids = _model(dtype), _ids()
    dense = lp.prefill(model, ids, chunk_size=CHUNK, cache=placement, kv_dtype=kv_dtype)
    sparse = lp.prefill(model, ids, chunk_size=CHUNK, cache=placement, kv_dtype=kv_dtype)
    token = dense.logits.argmax(-1)[:, None]
    for _ in range(4):  # cache lengths 101..104: ceil((n - 1) / 16) == ceil(n / 16)
        n_keys = dense.cache.seq_len + 1
        expected = lp.decode_step(model, dense.cache, token)
        got = lp.decode_step(model, sparse.cache, token, decode="sparse", budget=n_keys - 1)
        assert _rel(got, expected) < (1e-12 if dtype == torch.float64 else 1e-5)
        token = expected.argmax(-1)[:, None]


@pytest.mark.parametrize(("placement", "kv_dtype", "dtype"), MODES, ids=MODE_IDS)
def test_small_budget_equals_attention_over_the_selected_pages(placement, kv_dtype, dtype):
    """Each step and layer: the attention output entering o_proj equals decode_attention_reference over
    the pages select_pages picks from summaries built afresh from the final cache, the queries
    recomputed from q_proj's output with transformers' RoPE."""
    model, ids = _model(dtype), _ids()
    result = lp.prefill(model, ids, chunk_size=CHUNK, cache=placement, kv_dtype=kv_dtype)
    layers = model.model.layers
    captured: dict[str, list] = {"q": [], "out": []}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured["q"].append(o)) for layer in layers]
    hooks += [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, i: captured["out"].append(i[0])) for layer in layers
    ]
    token = result.logits.argmax(-1)[:, None]
    try:
        for step in range(3):
            captured["q"].clear(), captured["out"].clear()
            logits = lp.decode_step(model, result.cache, token, decode="sparse", **SMALL)
            assert logits.shape == (2, 128)
            n_keys = SEQ + step + 1
            position = torch.full((1, 1), n_keys - 1)
            for index, layer in enumerate(layers):
                module = layer.self_attn
                cos, sin = model.model.rotary_emb(captured["q"][index], position)
                q = captured["q"][index].view(2, 1, 4, 16).transpose(1, 2)
                q, _ = apply_rotary_pos_emb(q, q, cos, sin)  # [batch, q_heads, 1, head_dim]
                keys, values = _whole_cache(result.cache, index, dtype)
                assert keys.shape == (2, 2, n_keys, 16)
                selection = select_pages(q, page_summaries(keys, SMALL["page_size"]), budget=SMALL["budget"],
                                         sink=SMALL["sink"], local=SMALL["local"], scale=module.scaling)
                assert selection.n_selected == 5 < selection.n_pages
                expected = decode_attention_reference(q, keys, values, selection, scale=module.scaling)
                got = captured["out"][index].view(2, 1, 4, 16).transpose(1, 2)
                assert _rel(got, expected) < (1e-12 if dtype == torch.float64 else 1e-5), (step, index)
                dense = decode_attention_reference(q, keys, values, scale=module.scaling)
                assert _rel(got, dense) > 1e-4  # the dropped pages mattered: this is not dense decoding
            token = logits.argmax(-1)[:, None]
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(("placement", "kv_dtype", "dtype"), MODES, ids=MODE_IDS)
def test_small_budget_generation_shapes(placement, kv_dtype, dtype):
    model, ids = _model(dtype), _ids()
    result = lp.prefill(model, ids, chunk_size=CHUNK, cache=placement, kv_dtype=kv_dtype)
    tokens = lp.generate(model, result, NEW, decode="sparse", **SMALL)
    assert tokens.shape == (2, NEW) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 128
    cache = result.cache
    assert cache.seq_len == SEQ + NEW - 1 and cache.prefilled == SEQ
    assert cache.new_keys[1].shape == (2, 2, NEW - 1, 16) and cache.new_keys[1].dtype == dtype
    assert all(s.n_keys == SEQ + NEW - 1 and s.page_size == 8 for s in cache.summaries)


def test_offloaded_sparse_steps_read_only_the_selected_pages(monkeypatch):
    """After the summaries are built, a step never streams a whole layer back: it gathers the kept keys."""
    model, ids = _model(), _ids()
    result = lp.prefill(model, ids, chunk_size=CHUNK, cache="offload")
    cache = result.cache
    lp.decode_step(model, cache, result.logits.argmax(-1)[:, None], decode="sparse", **SMALL)  # builds the summaries
    gathered = []
    real_gather = lp.cache._gather_tokens

    def spy(tensor, positions, device):
        gathered.append((tensor.shape[2], positions.shape[2]))
        return real_gather(tensor, positions, device)

    def refuse(*args, **kwargs):
        raise AssertionError("a sparse step read a whole layer")

    monkeypatch.setattr(lp.cache, "_gather_tokens", spy)
    monkeypatch.setattr(lp.KVCache, "prefilled_layers", refuse)
    monkeypatch.setattr(lp.KVCache, "whole_layer", refuse)
    lp.decode_step(model, cache, torch.tensor([[5], [6]]), decode="sparse", **SMALL)
    # Per layer, keys then values, from the stored prefill: 5 pages of 8, the last one partial
    # (102 keys: 96 + 6), of the 100 stored tokens.
    assert gathered == [(SEQ, 5 * 8 - 2)] * 4


def test_reserved_device_cache_is_one_buffer_and_dense_decoding_continues():
    model, ids = _model(), _ids()
    dense = lp.prefill(model, ids, chunk_size=CHUNK, cache="device")
    sparse = lp.prefill(model, ids, chunk_size=CHUNK, cache="device")
    lp.generate(model, dense, NEW)
    lp.generate(model, sparse, NEW, decode="sparse", budget=1024)
    for layer in range(2):
        keys, values = sparse.cache.contiguous_layer(layer)
        assert keys.shape == (2, 2, SEQ + NEW - 1, 16)
        # The prefill and the decoded tokens are views of one buffer with no room left.
        assert sparse.cache.keys[layer].data_ptr() == keys.data_ptr()
        assert sparse.cache.key_buffers[layer].shape[2] == SEQ + NEW - 1
        assert torch.equal(values, torch.cat((dense.cache.values[layer], dense.cache.new_values[layer]), dim=2))
    token = torch.tensor([[7], [9]])
    assert torch.equal(lp.decode_step(model, sparse.cache, token), lp.decode_step(model, dense.cache, token))
    # Appending past the reserved room grows the buffer.
    lp.decode_step(model, sparse.cache, token, decode="sparse", budget=1024)
    assert sparse.cache.seq_len == SEQ + NEW + 1 and sparse.cache.key_buffers[0].shape[2] > SEQ + NEW + 1


def test_unchecked_summary_appends_skip_only_the_finiteness_check():
    summaries = page_summaries(torch.randn(1, 2, 20, 8, dtype=torch.float64), 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        summaries.append(torch.full((1, 2, 1, 8), float("nan"), dtype=torch.float64))
    summaries.append(torch.full((1, 2, 1, 8), float("nan"), dtype=torch.float64), check_finite=False)
    assert summaries.n_keys == 21
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        summaries.append(torch.randn(1, 2, 1, 8, dtype=torch.float64), check_finite=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decode="fast"), "decode must be 'dense' or 'sparse', got decode='fast'"),
        (dict(decode=None), "decode must be 'dense' or 'sparse', got decode=None"),
        (dict(budget=512), r"apply to decode='sparse' only, got budget=512 with decode='dense'"),
        (dict(decode="dense", sink=4, local=8), r"apply to decode='sparse' only, got sink=4, local=8 with"),
        (dict(decode="sparse", budget=0), "budget must be an int >= 1, got budget=0"),
        (dict(decode="sparse", budget=64.0), "budget must be an int >= 1, got budget=64.0"),
        (dict(decode="sparse", budget=True), "budget must be an int >= 1, got budget=True"),
        (dict(decode="sparse", sink=-1), "sink must be an int >= 0, got sink=-1"),
        (dict(decode="sparse", local=0), "local must be an int >= 1, got local=0"),
        (dict(decode="sparse", page_size=0), "page_size must be an int >= 1, got page_size=0"),
        (dict(decode="sparse", budget=20, sink=16, local=8),
         "budget must be at least sink \\+ local .*, got budget=20, sink=16, local=8"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    model, ids = _model(), _ids()
    result = lp.prefill(model, ids, chunk_size=CHUNK, cache="device")
    with pytest.raises(ValueError, match=message):
        lp.generate(model, result, NEW, **kwargs)
    with pytest.raises(ValueError, match=message):
        lp.decode_step(model, result.cache, result.logits.argmax(-1)[:, None], **kwargs)
    cache = result.cache
    assert cache.seq_len == SEQ and cache.summaries is None and cache.key_buffers is None
    with pytest.raises(ValueError, match="kept no cache"):
        lp.generate(model, lp.prefill(model, ids), 2, decode="sparse")
