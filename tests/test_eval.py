"""The evaluation harness: data readers, prompt builders, scoring, the resumable store, and the
`sparse-prefill eval` command end to end on the real model at CI size (1K tokens, CPU)."""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import json
import shutil
import struct
import zlib
from collections import Counter

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_prefill import cli  # noqa: E402
from sparse_prefill.eval import rdata, runner  # noqa: E402
from sparse_prefill.eval.methods import a_shape_pattern  # noqa: E402
from sparse_prefill.eval.perplexity import position_losses, text_windows  # noqa: E402
from sparse_prefill.eval.needle import needle_samples  # noqa: E402
from sparse_prefill.eval.prompts import fill_to_length, fit_items_to_length, token_count  # noqa: E402
from sparse_prefill.eval.ruler import TASKS, ruler_samples  # noqa: E402
from sparse_prefill.eval.scoring import answer_text, score_answer, string_match_all  # noqa: E402
from sparse_prefill.eval.store import ResultStore  # noqa: E402
from sparse_prefill.eval.texts import load_text  # noqa: E402
from sparse_prefill.kinds.vertical_slash import minference_budget  # noqa: E402
from sparse_prefill.models import GEMMA3_PACKAGE, load_model, needle_prompt, resolve_prompt_style  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_model().tokenizer


# --- R serialization -------------------------------------------------------------------------------

def _xdr_char(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">ii", 0x00040009, len(data)) + data


def _xdr_named_list(names: list[str], values: list[bytes]) -> bytes:
    """VECSXP with a names attribute, built by hand from R's serialize.c layout."""
    body = struct.pack(">ii", 19 | (1 << 9), len(values)) + b"".join(values)
    names_vector = struct.pack(">ii", 16, len(names)) + b"".join(_xdr_char(n) for n in names)
    attribute = struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _xdr_char("names") + names_vector
    return body + attribute + struct.pack(">i", 254)


def _xdr(obj: bytes) -> bytes:
    return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8" + obj


def test_rdata_reads_a_lazy_load_database(tmp_path):
    lines = struct.pack(">ii", 16, 3) + _xdr_char("EMMA") + struct.pack(">i", 0x00000009) + struct.pack(">i", -1) + _xdr_char("é")
    record = _xdr(lines)
    packed = zlib.compress(record)
    (tmp_path / "Rdata.rdb").write_bytes(struct.pack(">i", len(record)) + packed)
    where = struct.pack(">iii", 13, 2, 0) + struct.pack(">i", 4 + len(packed))
    index = _xdr(_xdr_named_list(["variables"], [_xdr_named_list(["emma"], [where])]))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert rdata.lazy_load(tmp_path) == {"emma": ["EMMA", None, "é"]}


def test_rdata_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="XDR"):
        rdata._unserialize(b"A\n" + b"\0" * 16)
    with pytest.raises(ValueError, match="SEXP type 3"):  # a closure
        rdata._unserialize(_xdr(struct.pack(">i", 3)))


# --- prompts and tasks -----------------------------------------------------------------------------

def test_fill_to_length_hides_sentences_at_their_depths(tokenizer):
    filler = load_text("pg")
    inserts = [(0.0, "ALPHA is 1."), (0.5, "BRAVO is 2."), (1.0, "CHARLIE is 3.")]
    prompt, n = fill_to_length(tokenizer, filler, 1500, lambda body: f"Text:\n{body}\nQ?", inserts)
    assert n == token_count(tokenizer, prompt) and 1300 < n <= 1500
    body = prompt[prompt.index("Text:") : prompt.index("\nQ?")]
    where = [body.index(s) / len(body) for _, s in inserts]
    assert where[0] < 0.02 and 0.4 < where[1] < 0.6 and where[2] > 0.95


def test_fill_to_length_errors_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match="holds only"):
        fill_to_length(tokenizer, "Short text. " * 10, 2000, lambda body: body)
    with pytest.raises(ValueError, match="no room"):
        fill_to_length(tokenizer, load_text("pg"), 20, lambda body: "x " * 40 + body)
    with pytest.raises(ValueError, match="too short"):
        fit_items_to_length(tokenizer, 5, lambda n: "word " * (n + 20))


def test_ruler_samples_are_seeded_fit_their_length_and_hold_their_answers(tokenizer):
    first = ruler_samples(tokenizer, [1024], samples=2, seed=3)
    again = ruler_samples(tokenizer, [1024], samples=2, seed=3)
    other = ruler_samples(tokenizer, [1024], samples=2, seed=4)
    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert [s.prompt for s in first] != [s.prompt for s in other]
    assert {s.task for s in first} == set(TASKS)
    for sample in first:
        assert 700 < sample.n_tokens <= 1024, sample.key
        question_at = sample.prompt.rindex("Question:")
        if sample.task == "cwe":  # the ten references are exactly the ten most repeated list entries
            words = Counter(line.split(". ", 1)[1] for line in sample.prompt[:question_at].splitlines()
                            if ". " in line and line.split(". ", 1)[0].isdigit())
            assert {w for w, _ in words.most_common(10)} == set(sample.references)
            assert words.most_common(11)[10][1] < words.most_common(10)[9][1]
        elif sample.task == "fwe":
            text = sample.prompt[:question_at].split("\n\n")[-2].split()
            top = [w for w, _ in Counter(text).most_common(3)]
            assert set(top) == set(sample.references)
        else:  # the needles and the variable chain are in the context, before the question
            for reference in sample.references:
                assert reference in sample.prompt[:question_at], (sample.key, reference)


# --- prompt styles: chat for instruction-tuned models, completion for base models -------------------

@pytest.fixture(scope="module")
def base_tokenizer(tokenizer):
    """SmolLM2's tokenizer as a base model's would be: no chat template, a BOS token before plain text."""
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    base.add_bos_token = True
    assert base("a").input_ids[0] == base.bos_token_id
    return base


def _prompts_digest(tokenizer) -> str:
    samples = needle_samples(tokenizer, [1024], [0.0, 0.5, 1.0]) + ruler_samples(tokenizer, [1024], samples=1)
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.key, sample.prompt, sample.n_tokens, list(sample.references),
                                  sample.max_new_tokens]).encode())
    digest.update(needle_prompt(tokenizer, 1000).text.encode())  # run --demo's prompt
    return digest.hexdigest()


def test_chat_prompts_are_unchanged_by_prompt_styles(tokenizer):
    """SmolLM2's needle and RULER-style prompts, byte for byte as before completion-style prompts
    existed (digest taken from that code): its results stay comparable with the earlier ones."""
    assert resolve_prompt_style("auto", tokenizer) == "chat" and load_model().prompt_style == "chat"
    assert _prompts_digest(tokenizer) == "267f06a195bfad789e1ebb96c6b0c98a3ba81da52bb53fdc83988fc41894082d"
    sample = needle_samples(tokenizer, [1024], [0.5])[0]
    assert sample.prompt_style == "chat"
    assert sample.prompt.endswith("<|im_end|>\n<|im_start|>assistant\nThe secret passphrase is")


def test_completion_prompts_end_in_an_answer_line_for_the_model_to_continue(tokenizer, base_tokenizer):
    """Document, question, then ``Answer: <the task's answer prefix>``; the tokenizer's BOS first,
    no chat markup; the same prefix as the chat form's, so that the continuation is the answer."""
    [needle] = needle_samples(base_tokenizer, [1024], [0.5], style="completion")
    assert needle.prompt_style == "completion" and 900 < needle.n_tokens <= 1024
    assert needle.prompt.startswith(f"{base_tokenizer.bos_token}Read the following text.\n\n")
    assert needle.prompt.count(base_tokenizer.bos_token) == 1 and "<|im_end|>" not in needle.prompt
    assert needle.prompt.endswith("\n\nQuestion: What is the secret passphrase mentioned in the text above? Answer with "
                                  "the passphrase only.\nAnswer: The secret passphrase is")
    assert f"The secret passphrase is {needle.references[0]}." in needle.prompt[: needle.prompt.index("Question:")]
    assert base_tokenizer(needle.prompt, add_special_tokens=False).input_ids[:2].count(base_tokenizer.bos_token_id) == 1
    chat = ruler_samples(tokenizer, [1024], samples=1)
    completion = ruler_samples(base_tokenizer, [1024], samples=1, style="completion")
    for chat_sample, sample in zip(chat, completion):
        prefix = chat_sample.prompt.rsplit("<|im_start|>assistant\n", 1)[1]
        assert sample.prompt.endswith(f"?\nAnswer: {prefix}") or sample.prompt.endswith(f".\nAnswer: {prefix}"), sample.key
        assert sample.prompt.startswith(base_tokenizer.bos_token) and sample.prompt.count("<|im_start|>") == 1
        assert sample.references == chat_sample.references and sample.prompt_style == "completion"
        assert 700 < sample.n_tokens <= 1024, sample.key
    # A tokenizer that adds no BOS to plain text (SmolLM2's) gets none.
    [plain] = needle_samples(tokenizer, [1024], [0.5], style="completion")
    assert plain.prompt.startswith("Read the following text.") and tokenizer.bos_token not in plain.prompt
    with pytest.raises(ValueError, match="style must be one of chat, completion, got style='plain'"):
        needle_samples(tokenizer, [1024], [0.5], style="plain")


def test_prompt_style_auto_follows_the_model_and_an_explicit_style_overrides_it(tokenizer, base_tokenizer):
    assert resolve_prompt_style("auto", tokenizer) == "chat"  # a chat template
    assert resolve_prompt_style("auto", base_tokenizer) == "completion"  # none
    assert resolve_prompt_style("auto", tokenizer, base=True) == "completion"  # a base model that ships a template
    assert resolve_prompt_style("completion", tokenizer) == "completion"
    assert resolve_prompt_style("chat", tokenizer, base=True) == "chat"
    with pytest.raises(ValueError, match="prompt style chat needs the tokenizer's chat template"):
        resolve_prompt_style("chat", base_tokenizer)
    with pytest.raises(ValueError, match="prompt style must be auto, chat or completion, got 'instruct'"):
        resolve_prompt_style("instruct", tokenizer)
    assert needle_prompt(base_tokenizer, 1000).text.endswith("\nAnswer: The secret passphrase is")


def test_completion_answers_end_where_the_model_starts_a_new_question_or_answer():
    """A base model does not stop after answering: what it writes after its answer does not score."""
    continued = " 48213.\nQuestion: What is the secret passphrase?\nAnswer: The secret passphrase is 51234"
    assert answer_text(continued, "completion") == " 48213."
    assert score_answer(continued, ["48213"], "completion") == 1.0
    assert score_answer(continued, ["51234"], "completion") == 0.0  # a second try, after the answer
    assert score_answer(continued, ["51234"], "chat") == 1.0  # a chat model's turn is all answer
    assert score_answer(" 48213. And Joseph said", ["48213"], "completion") == 1.0
    assert score_answer(" ABCDE, FGHIJ\n\nAnswer: KLMNO", ["abcde", "fghij", "klmno"], "completion") == 2 / 3
    assert score_answer("\nQuestion: Which variables hold 11850?", ["11850"], "completion") == 0.0
    with pytest.raises(ValueError, match="prompt_style must be chat or completion"):
        answer_text("x", "base")


@pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None,
                    reason="Gemma 3 270M is opt-in: scripts/setup.sh eval,gemma3")
@torch.no_grad()
def test_gemma3_gets_completion_prompts_and_answers_them():
    """Gemma 3 270M is a base model: prompted completion-style, BOS first, and its dense greedy
    answer to a 1K-token needle prompt is the needle (the chat-style message made it repeat the question)."""
    from sparse_prefill.generation import eos_ids, greedy_generate

    loaded = load_model("gemma3-270m")
    assert loaded.prompt_style == "completion"
    [sample] = needle_samples(loaded.tokenizer, [1024], [0.5], style=loaded.prompt_style)
    ids = loaded.tokenizer(sample.prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, 0] == loaded.tokenizer.bos_token_id and ids[0, 1] != loaded.tokenizer.bos_token_id
    tokens = greedy_generate(loaded.model, ids, sample.max_new_tokens, eos_ids(loaded))["tokens"]
    prediction = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    assert score_answer(prediction, sample.references, "completion") == 1.0, prediction


def test_ruler_rejects_unknown_tasks_and_bad_counts(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task.*niah_single"):
        ruler_samples(tokenizer, [1024], ["niah_single", "qa_hotpot"])
    with pytest.raises(ValueError, match="samples must be a positive int"):
        ruler_samples(tokenizer, [1024], samples=0)


def test_string_match_all_is_recall_over_references():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("123456", ["1234567"]) == 0.0
    assert string_match_all("Alpha, GAMMA", ["alpha", "beta", "gamma", "delta"]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        string_match_all("x", [])


def test_a_shape_baseline_costs_minference_budget():
    for n in (1024, 8192, 32768, 131072):
        vs, ashape = minference_budget(n), a_shape_pattern(n)
        assert ashape.sink + ashape.local == vs.vertical + vs.slash


def test_sparse_results_are_labelled_by_preset_or_config():
    assert runner._label("sparse", None) == runner._label("sparse", None, "default") == "sparse"
    assert runner._label("sparse", None, "fast") == "sparse (fast)"
    assert runner._label("sparse", "configs/searched.json", "fast") == "sparse (searched)"
    assert runner._label("a-shape", None, "fast") == "a-shape" and runner._label("dense", "x.json") == "dense"


def test_position_losses_match_the_models_own_loss():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (300,))
    losses = position_losses(model, ids, chunk=7)
    assert losses.shape == (299,)
    with torch.no_grad():
        expected = model(input_ids=ids[None], labels=ids[None]).loss
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-5, atol=1e-5)


def test_text_windows_start_with_bos_only_where_the_tokenizer_adds_one(tokenizer, base_tokenizer):
    """SmolLM2 (no BOS before plain text): windows are plain slices of the text, as before. A
    tokenizer that adds BOS (Gemma's): BOS, then the window's first length - 1 tokens."""
    ids = tokenizer(load_text("kjv"), add_special_tokens=False).input_ids
    for window in text_windows(tokenizer, [1024, 2048], 2):
        assert window.ids.tolist() == ids[window.start : window.start + window.length]
    for window in text_windows(base_tokenizer, [1024], 2):
        assert len(window.ids) == 1024 and window.ids[0] == base_tokenizer.bos_token_id
        assert window.ids[1:].tolist() == ids[window.start : window.start + 1023]


# --- the resumable store ---------------------------------------------------------------------------

def test_store_keeps_every_finished_record_across_a_torn_write(tmp_path):
    path = tmp_path / "needle.jsonl"
    store = ResultStore(path)
    store.add({"key": "a", "label": "dense", "score": 1.0})
    store.add({"key": "b", "label": "dense", "score": 0.0})
    with open(path, "a") as handle:
        handle.write('{"key": "c", "label": "dense", "sc')  # killed mid-write
    again = ResultStore(path)
    assert again.done("a", "dense") and again.done("b", "dense") and not again.done("c", "dense")
    assert not again.done("a", "sparse")
    again.add({"key": "c", "label": "dense", "score": 1.0})
    assert [r["key"] for r in ResultStore(path)] == ["a", "b", "c"]


# --- the command, end to end -----------------------------------------------------------------------

def test_eval_needle_smoke_scores_known_answers_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "needle"
    assert cli.main(["eval", "needle", "--smoke", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (out / "needle.jsonl").read_text().splitlines()]
    assert len(records) == 9  # 3 depths x 3 methods at 1K
    dense = [r for r in records if r["method"] == "dense"]
    # SmolLM2-135M finds a five-digit needle anywhere in 1K tokens of the essays (checked by hand).
    assert all(r["score"] == 1.0 for r in dense), [r["prediction"] for r in dense]
    assert all(r["sparse_layers"] == 0 for r in dense)
    assert all(r["sparse_layers"] == 30 for r in records if r["method"] != "dense")  # the sparse path ran
    assert all(r["prompt_style"] == "chat" for r in records)
    summary = json.loads((out / "needle_summary.json").read_text())
    assert summary["methods"]["dense"]["average"] == 100.0
    for name in ("needle.md", "needle_dense.png", "needle_sparse.png", "needle_a-shape.png", "needle_side_by_side.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| dense | 100.0 ± 0.0 | 100.0 ± 0.0 |" in capsys.readouterr().out

    # A second run recomputes nothing.
    def fail(*args, **kwargs):
        raise AssertionError("a stored sample was recomputed")

    monkeypatch.setattr(runner, "_evaluate", fail)
    assert cli.main(["eval", "needle", "--smoke", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0


def test_eval_prompt_style_override_is_recorded_and_not_mixed_with_another(tmp_path, capsys):
    """--prompt-style completion on SmolLM2 (a chat model): completion prompts, scored as such, the
    style in every record; a later run of another style into the same --out is refused."""
    out = tmp_path / "needle"
    args = ["eval", "needle", "--method", "dense", "--lengths", "1k", "--depths", "0.5", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert cli.main(args + ["--prompt-style", "completion"]) == 0
    [record] = [json.loads(line) for line in (out / "needle.jsonl").read_text().splitlines()]
    assert record["prompt_style"] == "completion" and record["score"] == 1.0, record["prediction"]
    capsys.readouterr()
    assert cli.main(args) == 2  # auto: chat for SmolLM2
    assert "holds needle results with completion prompts and this run asks chat prompts" in capsys.readouterr().err
    assert len((out / "needle.jsonl").read_text().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli.main(args + ["--prompt-style", "base"])
    assert "invalid choice: 'base'" in capsys.readouterr().err


def test_an_interrupted_eval_loses_no_finished_sample(tmp_path, monkeypatch):
    out = tmp_path / "ppl"
    calls = []
    real = runner._evaluate

    def interrupt_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_evaluate", interrupt_third)
    args = ["eval", "ppl", "--smoke", "--out", str(out), "--no-progress", "--device", "cpu"]
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    assert len((out / "ppl.jsonl").read_text().splitlines()) == 2
    calls.clear()
    monkeypatch.setattr(runner, "_evaluate", real)
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (out / "ppl.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["a-shape", "dense", "sparse"]
    summary = json.loads((out / "ppl_summary.json").read_text())
    ppl = {label: m["by_length"]["1024"]["ppl"] for label, m in summary["methods"].items()}
    assert 5 < ppl["dense"] < 60 and all(abs(p / ppl["dense"] - 1) < 0.25 for p in ppl.values()), ppl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    """A two-layer Llama with SmolLM2's tokenizer, saved as a model directory, for `eval` end to end in
    seconds. Its final norm is zero, so every logit is equal and greedy decoding picks token 0, which its
    config makes the end of sequence: a prefill and one step per prompt. It answers nothing right."""
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.generation_config.eos_token_id = 0
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_runs_the_sparse_method_once_per_preset_into_one_results_file(tmp_path, tiny_model, capsys, monkeypatch):
    out = tmp_path / "needle"
    common = ["eval", "needle", "--model", str(tiny_model), "--method", "dense,sparse", "--lengths", "1k",
              "--depths", "0,1", "--out", str(out), "--no-progress", "--device", "cpu"]
    applied = []
    real_apply = runner.apply_method

    def spy(model, method, seq_len, config=None, preset="default", **kwargs):
        applied.append((method, preset))
        return real_apply(model, method, seq_len, config, preset, **kwargs)

    monkeypatch.setattr(runner, "apply_method", spy)
    assert cli.main(common + ["--preset", "default,fast"]) == 0
    records = _records(out / "needle.jsonl")
    assert Counter(r["label"] for r in records) == {"dense": 2, "sparse": 2, "sparse (fast)": 2}
    assert {r["config"] for r in records if r["label"] == "sparse"} == {"preset default"}
    assert {r["config"] for r in records if r["label"] == "sparse (fast)"} == {"preset fast"}
    assert all(r["sparse_layers"] == 2 for r in records if r["method"] == "sparse")  # the sparse path ran
    assert [p for m, p in applied if m == "sparse"] == ["default", "default", "fast", "fast"]
    summary = json.loads((out / "needle_summary.json").read_text())
    assert list(summary["methods"]) == ["dense", "sparse", "sparse (fast)"]
    assert summary["methods"]["sparse (fast)"]["vs_dense"]["average"]["pairs"] == 2
    assert (out / "needle_sparse_fast.png").stat().st_size > 0
    assert "| sparse (fast) | 0.0 ± 0.0 |" in capsys.readouterr().out

    # Resumable per (prompt, label): each preset alone, or both, finds its records; a new preset runs alone.
    ran = []
    real_evaluate = runner._evaluate
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: ran.append(1) or real_evaluate(*a, **k))
    for presets in ("default,fast", "fast", "default"):
        assert cli.main(common + ["--preset", presets]) == 0
    assert ran == []
    assert cli.main(common + ["--preset", "fast,dense"]) == 0
    assert len(ran) == 2 and Counter(r["label"] for r in _records(out / "needle.jsonl"))["sparse (dense)"] == 2


def test_eval_all_runs_needle_ruler_and_ppl_into_one_out_and_resumes(tmp_path, tiny_model, capsys, monkeypatch):
    out = tmp_path / "all"
    args = ["eval", "all", "--smoke", "--model", str(tiny_model), "--method", "dense,sparse", "--tasks", "niah_single",
            "--text", "pg", "--out", str(out), "--no-progress", "--device", "cpu"]
    real = runner._evaluate
    ran = []

    def interrupt_eighth(spec, *args, **kwargs):
        ran.append(spec.task)
        if len(ran) == 8:  # ruler's second sample: needle done, ruler half done, ppl not started
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "_evaluate", interrupt_eighth)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    assert ran == ["needle"] * 6 + ["ruler"] * 2
    assert not (out / "ppl.jsonl").exists() and len(_records(out / "ruler.jsonl")) == 1
    capsys.readouterr()

    ran.clear()
    monkeypatch.setattr(runner, "_evaluate", lambda spec, *a, **k: ran.append(spec.task) or real(spec, *a, **k))
    assert cli.main(args) == 0
    assert ran == ["ruler", "ppl", "ppl"]  # only what the interrupted run had not stored
    captured = capsys.readouterr()
    for task in ("needle", "ruler", "ppl"):
        assert (out / f"{task}.md").read_text() in captured.out and f"## {task}\n" in captured.out
        assert (out / f"{task}_summary.json").stat().st_size > 0
        assert {r["label"] for r in _records(out / f"{task}.jsonl")} == {"dense", "sparse"}
    assert "results, tables (needle.md, ruler.md, ppl.md) and plots in" in captured.err
    for name in ("needle_side_by_side.png", "ruler.png", "ppl.png"):
        assert (out / name).stat().st_size > 0, name
    # Each task with its own defaults and options: --smoke's 1K and three depths, one sample per RULER
    # task (only niah_single) and one ppl window of the text asked for.
    assert sorted(r["depth"] for r in _records(out / "needle.jsonl") if r["label"] == "dense") == [0.0, 0.5, 1.0]
    assert [(r["task"], r["length"]) for r in _records(out / "ruler.jsonl")] == [("niah_single", 1024)] * 2
    assert [r["text"] for r in _records(out / "ppl.jsonl")] == ["pg", "pg"]

    # A finished `all` rerun runs nothing.
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: pytest.fail("a stored sample ran"))
    assert cli.main(args) == 0
    assert [len(_records(out / f"{task}.jsonl")) for task in ("needle", "ruler", "ppl")] == [6, 2, 2]


def test_eval_all_gives_each_task_the_options_it_reads(tmp_path, monkeypatch):
    """Options that only some tasks read go to those under all; the rest keep the task's defaults
    (ppl: a full cache and dense decoding). The specs are captured, so no model loads."""
    specs = []

    def capture(given):
        specs.extend(given)
        for spec in given:
            (tmp_path / f"{spec.task}.md").write_text(f"{spec.task} table\n")
        return [{"methods": {"dense": {}}}] * len(given)

    monkeypatch.setattr(runner, "run_evals", capture)
    assert cli.main(["eval", "all", "--out", str(tmp_path), "--method", "dense,sparse", "--preset", "default,fast",
                     "--lengths", "8k,16k", "--samples", "20", "--depths", "0.5", "--tasks", "vt,cwe",
                     "--haystack", "kjv", "--text", "austen", "--kv", "snapkv", "--kv-capacity", "512",
                     "--kv-kernel", "7", "--decode-budget", "1024", "--prompt-style", "completion"]) == 0
    needle, ruler, ppl = specs
    assert [needle.task, ruler.task, ppl.task] == ["needle", "ruler", "ppl"]
    for spec in specs:
        spec.check()  # each valid for its task: ppl would refuse --kv and --decode-budget
        assert list(spec.presets) == ["default", "fast"] and list(spec.lengths) == [8192, 16384]
        assert list(spec.methods) == ["dense", "sparse"]
    assert list(needle.depths) == [0.5] and needle.samples is None and needle.haystack == "kjv"
    assert ruler.samples == 20 and list(ruler.ruler_tasks) == ["vt", "cwe"] and ruler.haystack == "kjv"
    assert ppl.samples == 20 and ppl.text == "austen"
    for spec in (needle, ruler):
        assert (spec.kv, spec.kv_capacity, spec.kv_kernel, spec.decode_budget, spec.prompt_style) == \
            ("snapkv", 512, 7, 1024, "completion")
    assert (ppl.kv, ppl.kv_capacity, ppl.kv_kernel, ppl.decode_budget, ppl.prompt_style) == ("full", None, None, None, "auto")
    # Defaults per task: all RULER tasks and every depth unless asked; ruler and ppl pick their own sample counts.
    specs.clear()
    assert cli.main(["eval", "all", "--out", str(tmp_path), "--smoke"]) == 0
    needle, ruler, ppl = specs
    assert list(ruler.ruler_tasks) == list(TASKS) and list(needle.depths) == [0.0, 0.5, 1.0]
    assert (needle.samples, ruler.samples, ppl.samples) == (None, 1, 1) and list(ppl.presets) == ["default"]
    specs.clear()
    assert cli.main(["eval", "all", "--out", str(tmp_path)]) == 0
    needle, ruler, ppl = specs
    assert (needle.samples, ruler.samples, ppl.samples) == (None, None, None) and len(needle.depths) == 11


def test_eval_spec_refuses_a_preset_string_for_a_list():
    with pytest.raises(ValueError, match="presets must be a sequence of preset names such as .*, got the string 'fast'"):
        runner.EvalSpec(task="needle", out="x", presets="fast").check()


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "haystack"], "unknown eval task 'haystack'; expected one of needle, ruler, ppl or all"),
        (["eval", "needle", "--method", "dense,flash"], "--method: unknown flash"),
        (["eval", "needle", "--lengths", "16k", "--no-rope-scaling"], "exceed the model's context of 8192"),
        (["eval", "needle", "--haystack", "pg19"], "--haystack 'pg19' is not a known text"),
        (["eval", "ruler", "--tasks", "qa_squad", "--lengths", "1k"], "unknown RULER task(s) qa_squad"),
        (["eval", "needle", "--method", "dense", "--config", "patterns.json"], "add sparse to --method"),
        (["eval", "needle", "--preset", "quick"], "--preset must be one of default, fast, dense, got 'quick'"),
    ],
)
def test_eval_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    assert cli.main(args + ["--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["needle", "--kv", "snapkv", "--kv-kernel", "4"], "--kv snapkv: kernel must be an odd positive int"),
        (["needle", "--kv", "full", "--kv-capacity", "-5"], "--kv-capacity applies to a compressing --kv"),
        (["needle", "--kv", "pyramidkv", "--kv-capacity", "-5"], "capacity must be a positive int, got capacity=-5"),
        # Silently overridden or ignored before: --smoke ran 1K, needle ran one sample, ppl has no depths.
        (["needle", "--smoke", "--lengths", "2k"], "--smoke sets --lengths 1k, --samples 1 and --depths 0,0.5,1; drop "
                                                   "--smoke to choose --lengths yourself"),
        (["ruler", "--smoke", "--samples", "3", "--depths", "0.5"], "choose --samples and --depths yourself"),
        (["needle", "--samples", "5"], "--samples applies to ruler and ppl, not needle"),
        (["ppl", "--depths", "0.5"], "--depths applies to needle, not ppl"),
        (["needle", "--tasks", "vt"], "--tasks applies to ruler, not needle"),
        (["ppl", "--haystack", "kjv"], "--haystack applies to needle and ruler, not ppl"),
        (["ruler", "--text", "austen"], "--text applies to ppl, not ruler"),
        (["needle", "--preset", "fast", "--config", "patterns.json"], "--preset and --config both choose"),
        (["needle", "--preset", "fast", "--method", "dense,a-shape"], "--preset chooses the sparse method's patterns"),
        # A list of presets: every item checked, with the same messages.
        (["needle", "--preset", "default,nope"], "--preset must be one of default, fast, dense, got 'nope'"),
        (["needle", "--preset", "default,,fast"], "--preset takes preset names separated by commas, such as "
                                                  "default,fast; got an empty name in 'default,,fast'"),
        (["ruler", "--preset", "fast,"], "got an empty name in 'fast,'"),
        (["ppl", "--preset", "fast, fast"], "--preset names fast more than once: each preset runs once"),
        (["needle", "--preset", "default,fast", "--config", "patterns.json"], "--preset and --config both choose"),
        (["all", "--preset", "default,fast", "--method", "dense"], "--preset chooses the sparse method's patterns"),
        # Under all, every task's options are checked before the model loads, the last task's too.
        (["all", "--text", "nope"], "--text 'nope' is not a known text"),
        (["all", "--tasks", "qa_squad"], "unknown RULER task(s) qa_squad"),
        (["all", "--samples", "0"], "--samples must be >= 1, got 0"),
        (["all", "--kv", "snapkv", "--kv-kernel", "4"], "--kv snapkv: kernel must be an odd positive int"),
        (["all", "--decode-budget", "8"], "--decode-budget: budget must be at least sink + local"),
        (["all", "--smoke", "--depths", "0.5"], "drop --smoke to choose --depths yourself"),
        (["all", "--prompt-style", "chat", "--device", "tpu9"], "--device must be auto, cpu, cuda or cuda:N"),
        (["ruler", "--tasks", "qa_squad"], "unknown RULER task(s) qa_squad"),
        (["needle", "--device", "tpu9"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu9'"),
        (["needle", "--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
        (["needle", "--config", "fast"], "--config 'fast': pattern config file not found: 'fast'; presets are chosen "
                                         "with --preset"),
        (["ppl", "--prompt-style", "completion"], "--prompt-style applies to needle and ruler, not ppl"),
    ],
)
def test_eval_checks_options_before_loading_the_model(tmp_path, capsys, args, message):
    """A model that does not exist: an option checked only after loading would report the model instead."""
    base = ["eval", *args, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), "--no-progress"]
    if "--device" not in args:
        base += ["--device", "cpu"]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert message in err and "unknown model" not in err
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.mark.parametrize("lengths", ["1kk", "1k5", "k", "2K,", "1.5k", "0x400"])
def test_eval_lengths_are_parsed_strictly(tmp_path, capsys, lengths):
    """'1kk' was read as 1024 and '1k5' as 15: digits with an optional single trailing k only."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "needle", "--lengths", lengths, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "expected comma-separated token counts, digits with an optional trailing k" in capsys.readouterr().err


def test_eval_lengths_and_depths_parse():
    from sparse_prefill.eval.command import _floats, _ints

    assert _ints("2k,4K, 8192") == [2048, 4096, 8192]
    assert _floats("0,0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(Exception, match=r"depths are fractions of the haystack in \[0, 1\], got '0.5,1.5'"):
        _floats("0.5,1.5")


def test_eval_refuses_a_config_directory_and_a_config_for_another_model_before_any_sample(tmp_path, capsys, monkeypatch):
    """A directory was an IsADirectoryError traceback; a config of the wrong shape failed only after
    the dense samples had run."""
    from sparse_prefill import PatternConfig, VerticalSlash

    def no_sample(*args, **kwargs):
        raise AssertionError("a sample ran")

    monkeypatch.setattr(runner, "_evaluate", no_sample)
    common = ["eval", "needle", "--smoke", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    assert cli.main(common + ["--config", str(tmp_path)]) == 2
    assert f"--config '{tmp_path}': pattern config '{tmp_path}' is a directory" in capsys.readouterr().err
    config = tmp_path / "other-model.json"
    PatternConfig.uniform(2, 4, VerticalSlash(64, 256)).save(config)
    assert cli.main(common + ["--config", str(config)]) == 2
    assert ("does not fit model 'default': pattern config is for 2 layers x 4 query heads, but the model has "
            "30 layers x 9 query heads") in capsys.readouterr().err


def test_eval_refuses_lengths_that_cannot_fit_in_memory(tmp_path, capsys, monkeypatch):
    from sparse_prefill import long_prefill

    monkeypatch.setattr(long_prefill.memory, "_host_memory", lambda: (2**40, 2**30))
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: pytest.fail("a sample ran"))
    args = ["eval", "ppl", "--lengths", "64k", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--lengths 65536: a CPU prefill of 65,536 tokens needs at least" in err and "1.0 GiB available" in err


def test_eval_refuses_an_output_directory_it_cannot_write(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["eval", "needle", "--smoke", "--out", str(blocker / "out"), "--no-progress"]) == 2
    assert "is not a writable directory" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="Austen comes from a Debian package")
def test_austen_text_is_read_from_the_debian_package():
    text = load_text("austen")
    assert text.startswith("SENSE AND SENSIBILITY")
    assert "It is a truth universally acknowledged" in text and len(text) > 3_500_000


@pytest.mark.parametrize("lengths", [[4096], [4096, 8192]])
def test_ruler_report_from_hand_built_records(tmp_path, lengths):
    from sparse_prefill.eval.report import write_report

    records = []
    for label, hits in (("dense", 1), ("sparse + snapkv 1024 k9", 0)):
        for n in lengths:
            for task in ("niah_single", "vt"):
                for index in range(2):
                    score = float(hits) if task == "niah_single" else 0.5 * index
                    records.append({"label": label, "length": n, "task": task, "index": index, "score": score})
    summary = write_report("ruler", records, tmp_path)
    assert summary["methods"]["dense"]["by_task"]["niah_single"][lengths[0]] == 100.0
    assert summary["methods"]["sparse + snapkv 1024 k9"]["average"] == 12.5  # (0 + 0 + 0 + 50) / 4
    assert (tmp_path / "ruler.png").stat().st_size > 0
    table = (tmp_path / "ruler.md").read_text()
    assert "| sparse + snapkv 1024 k9 |" in table and "| dense |" in table


def _needle_records(label: str, length: int, scores: list[float]) -> list[dict]:
    return [{"label": label, "length": length, "task": "needle", "index": 0, "depth": i / 10,
             "key": f"needle/{length}/0/d{i}", "score": score} for i, score in enumerate(scores)]


def test_needle_report_gives_standard_errors_and_paired_differences_against_dense(tmp_path):
    from sparse_prefill.eval.report import write_report

    records = (_needle_records("dense", 2048, [1, 1, 0, 0]) + _needle_records("sparse", 2048, [1, 0, 0, 0, 1])
               + _needle_records("dense", 4096, [1, 1, 1, 1]) + _needle_records("sparse", 4096, [0, 0, 0, 1]))
    summary = write_report("needle", records, tmp_path)
    dense, sparse = summary["methods"]["dense"], summary["methods"]["sparse"]
    # Dense at 2K: mean 0.5, sample SD sqrt(4 * 0.25 / 3), over sqrt(4).
    assert dense["by_length"][2048] == 50.0 and dense["se_by_length"][2048] == pytest.approx(100 * (1 / 3) ** 0.5 / 2)
    assert dense["se_by_length"][4096] == 0.0 and "vs_dense" not in dense
    # Sparse at 2K counts its fifth record (no dense partner) in its score: 1,0,0,0,1.
    assert sparse["by_length"][2048] == 40.0 and sparse["se_by_length"][2048] == pytest.approx(100 * 0.06 ** 0.5)
    assert sparse["n_by_length"] == {2048: 5, 4096: 4}
    # The average is over all nine samples.
    assert sparse["average"] == pytest.approx(300 / 9)
    versus = sparse["vs_dense"]
    assert versus["unpaired"] == 1
    # 2K: differences 0, -1, 0, 0 -> -25 points, SD sqrt(0.75 / 3) = 0.5, SE 0.25.
    assert versus["by_length"][2048] == {"diff": -25.0, "se": 25.0, "pairs": 4, "differing": 1, "beyond_noise": False}
    # 4K: -1, -1, -1, 0 -> -75 points ± 25: beyond 2 SE.
    assert versus["by_length"][4096] == {"diff": -75.0, "se": 25.0, "pairs": 4, "differing": 3, "beyond_noise": True}
    # Both lengths: eight pairs, -1 four times and 0 four times -> -50 ± sqrt(2/7)/sqrt(8).
    assert versus["average"]["diff"] == -50.0 and versus["average"]["pairs"] == 8
    assert versus["average"]["se"] == pytest.approx(100 * (2 / 7 / 8) ** 0.5)
    table = (tmp_path / "needle.md").read_text()
    assert "| dense | 50.0 ± 28.9 | 100.0 ± 0.0 | 75.0 ± 16.4 |" in table
    assert "| sparse | -25.0 ± 25.0 (1/4) | **-75.0 ± 25.0 (3/4)** | **-50.0 ± 18.9 (4/8)** |" in table
    assert "|difference| > 2 SE" in table and "left out of the differences: sparse 1." in table


def test_needle_report_without_dense_or_with_single_samples_says_so(tmp_path):
    from sparse_prefill.eval.report import write_report

    summary = write_report("needle", _needle_records("sparse", 2048, [1]), tmp_path)
    assert "vs_dense" not in summary["methods"]["sparse"]
    table = (tmp_path / "needle.md").read_text()
    assert "| sparse | 100.0 ± – | 100.0 ± – |" in table and "Difference against dense" not in table
    with pytest.raises(ValueError, match="two 'dense' records for the same prompt 'needle/2048/0/d0'"):
        write_report("needle", _needle_records("dense", 2048, [1]) * 2, tmp_path)


@pytest.mark.parametrize("lengths", [[4096], [4096, 8192]])
def test_ruler_report_weighs_tasks_equally_in_standard_errors_and_paired_differences(tmp_path, lengths):
    """Records without a key pair by (task, length, index). Task a has four samples, task b two
    (and one sparse sample with no dense partner), so equal task weights differ from pooling."""
    from sparse_prefill.eval.report import write_report

    scores = {("dense", "a"): [1, 1, 0, 0], ("sparse", "a"): [1, 0, 0, 0],
              ("dense", "b"): [1, 0], ("sparse", "b"): [1, 0, 1]}
    records = [{"label": label, "length": n, "task": task, "index": index, "score": float(score)}
               for (label, task), values in scores.items() for n in lengths for index, score in enumerate(values)]
    summary = write_report("ruler", records, tmp_path)
    dense, sparse = summary["methods"]["dense"], summary["methods"]["sparse"]
    se_a, se_b = 100 * (1 / 3) ** 0.5 / 2, 50.0  # dense: SD over four 1,1,0,0 / 2; over two 1,0 / sqrt(2)
    for n in lengths:
        assert dense["by_task_se"]["a"][n] == pytest.approx(se_a) and dense["by_task_se"]["b"][n] == pytest.approx(se_b)
        assert dense["se_by_length"][n] == pytest.approx((se_a ** 2 + se_b ** 2) ** 0.5 / 2)
        # Equal task weights: (25 + 66.7) / 2, not the pooled 3 of 7.
        assert sparse["by_length"][n] == pytest.approx((25 + 200 / 3) / 2)
    assert dense["average_se"] == pytest.approx((se_a ** 2 + se_b ** 2) ** 0.5 / 2 / len(lengths) ** 0.5)
    versus = sparse["vs_dense"]
    assert versus["unpaired"] == len(lengths)
    # Task a: 0, -1, 0, 0 -> -25 ± 25; task b: 0, 0 -> 0 ± 0; the length: -12.5 ± sqrt(25² + 0²) / 2.
    for n in lengths:
        assert versus["by_task"]["a"][n]["diff"] == -25.0 and versus["by_task"]["b"][n]["se"] == 0.0
        assert versus["by_length"][n] == {"diff": -12.5, "se": 12.5, "pairs": 6, "differing": 1, "beyond_noise": False}
    assert versus["average"]["diff"] == -12.5 and versus["average"]["pairs"] == 6 * len(lengths)
    assert versus["average"]["se"] == pytest.approx(12.5 / len(lengths) ** 0.5)
    assert versus["average"]["differing"] == len(lengths)
    table = (tmp_path / "ruler.md").read_text()
    assert "| dense | " + " | ".join(["50.0 ± 28.9"] * len(lengths)) in table
    assert "| sparse | " + " | ".join(["-12.5 ± 12.5 (1/6)"] * len(lengths)) in table
    assert f"left out of the differences: sparse {len(lengths)}." in table
    assert "| dense | 50.0 ± " in table.split("Per task")[1]  # task a's average, ± over its lengths
    assert (tmp_path / "ruler.png").stat().st_size > 0
