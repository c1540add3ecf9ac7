import json

import pytest
import torch

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, PatternConfig, VerticalSlash
from sparse_prefill.patterns import pattern_from_dict


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AShape(sink=-1, local=8), "AShape.sink must be >= 0"),
        (lambda: AShape(sink=4, local=0), "AShape.local must be >= 1"),
        (lambda: VerticalSlash(vertical=0, slash=10), "VerticalSlash.vertical must be >= 1"),
        (lambda: VerticalSlash(vertical=10, slash=-3), "VerticalSlash.slash must be >= 1"),
        (lambda: VerticalSlash(vertical=10, slash=10, last_q=0), "VerticalSlash.last_q must be >= 1"),
        (lambda: BlockSparse(top_k=0), "BlockSparse.top_k must be >= 1"),
        (lambda: BlockCoverage(0.0), r"BlockCoverage.coverage must be a number in \(0, 1\], got coverage=0.0"),
        (lambda: BlockCoverage(1.5), r"BlockCoverage.coverage must be a number in \(0, 1\], got coverage=1.5"),
        (lambda: BlockCoverage(-0.2), r"BlockCoverage.coverage must be a number in \(0, 1\], got coverage=-0.2"),
        (lambda: BlockCoverage(float("nan")), r"BlockCoverage.coverage must be a number in \(0, 1\], got coverage=nan"),
        (lambda: BlockCoverage("0.9"), r"BlockCoverage.coverage must be a number in \(0, 1\], got coverage='0.9'"),
        (lambda: BlockCoverage(True), r"BlockCoverage.coverage must be a number in \(0, 1\], got coverage=True"),
        (lambda: BlockCoverage(0.9, stride=3), "BlockCoverage.stride must be a power of two that divides 64, got stride=3"),
        (lambda: BlockCoverage(0.9, stride=128), "BlockCoverage.stride must be a power of two that divides 64, got stride=128"),
        (lambda: BlockCoverage(0.9, stride=48), "BlockCoverage.stride must be a power of two that divides 64, got stride=48"),
        (lambda: BlockCoverage(0.9, stride=0), "BlockCoverage.stride must be >= 1, got stride=0"),
    ],
)
def test_bad_budgets_raise_value_error_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("value", [1.5, "8", True, None])
def test_non_integer_budgets_raise_type_error(value):
    with pytest.raises(TypeError, match="VerticalSlash.vertical must be an int"):
        VerticalSlash(vertical=value, slash=10)
    with pytest.raises(TypeError, match=f"BlockCoverage.stride must be an int, got {type(value).__name__}"):
        BlockCoverage(0.9, stride=value)


def test_block_coverage_defaults_and_budget():
    assert BlockCoverage(1) == BlockCoverage(1.0, stride=16) and isinstance(BlockCoverage(1).coverage, float)
    assert {BlockCoverage(0.9, stride=s).stride for s in (1, 2, 4, 8, 16, 32, 64)} == {1, 2, 4, 8, 16, 32, 64}
    # Its budget is a share of each row's mass: it does not scale with the prompt.
    assert BlockCoverage(0.9, stride=8).scaled(4.0) == BlockCoverage(0.9, stride=8)


def test_patterns_are_frozen_and_hashable():
    pattern = VerticalSlash(1000, 6096)
    with pytest.raises(Exception):
        pattern.vertical = 3
    assert len({pattern, VerticalSlash(1000, 6096), AShape(4, 64)}) == 2


def test_config_json_round_trip(tmp_path):
    config = PatternConfig(
        (
            (VerticalSlash(100, 200), AShape(4, 64), BlockSparse(8), Dense(), BlockCoverage(0.98)),
            (Dense(), VerticalSlash(10, 20, last_q=32), AShape(0, 16), BlockSparse(2), BlockCoverage(0.5, stride=4)),
        ),
        {"model": "tiny"},
    )
    path = tmp_path / "patterns.json"
    config.save(path)
    loaded = PatternConfig.load(path)
    assert loaded == config
    assert loaded[1, 1] == VerticalSlash(10, 20, last_q=32)
    assert loaded[0, 4] == BlockCoverage(0.98) and loaded[1, 4] == BlockCoverage(0.5, stride=4)
    assert loaded.metadata["model"] == "tiny"
    # What the file holds for each kind: every field, by name.
    heads = json.loads(path.read_text())["layers"][1]
    assert heads[1] == {"type": "vertical_slash", "vertical": 10, "slash": 20, "last_q": 32}
    assert heads[3] == {"type": "block_sparse", "top_k": 2}
    assert heads[4] == {"type": "block_coverage", "coverage": 0.5, "stride": 4}
    assert pattern_from_dict({"type": "block_coverage", "coverage": 0.9}) == BlockCoverage(0.9, stride=16)


def test_uniform_and_model_check():
    config = PatternConfig.uniform(30, 9, VerticalSlash(1000, 6096))
    assert (config.n_layers, config.n_heads) == (30, 9)
    config.check_model(30, 9)
    with pytest.raises(ValueError, match=r"30 layers x 9 query heads, but the model has 32 layers x 32"):
        config.check_model(32, 32)


def test_reads_minference_format(tmp_path):
    data = [
        {"0": ["vertical_and_slash", 1000, 6096, 0.9], "1": ["stream_llm", 100, 800, 0.5]},
        {"1": ["block_sparse", 16, 0, 0.7], "0": ["vertical_and_slash", 3500, 100, 0.95]},
    ]
    path = tmp_path / "best_pattern.json"
    path.write_text(json.dumps(data))
    config = PatternConfig.load(path)
    assert config.layers == (
        (VerticalSlash(1000, 6096), AShape(sink=100, local=800)),
        (VerticalSlash(3500, 100), BlockSparse(16)),
    )
    assert config.metadata["scores"] == [[0.9, 0.5], [0.95, 0.7]]


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "non-empty JSON list"),
        ([{"0": ["nope", 1, 2, 0.1]}], "unknown pattern 'nope'"),
        ([{"0": ["vertical_and_slash", 1, 2]}], r"expected \[name, v, s, score\]"),
        ([{"1": ["vertical_and_slash", 1, 2, 0.3]}], "numbered 0..0"),
        ([{"x": ["vertical_and_slash", 1, 2, 0.3]}], "integers as strings"),
        ([{"0": ["vertical_and_slash", 1.5, 2, 0.3]}], "whole numbers"),
        ([{"0": ["vertical_and_slash", 0, 2, 0.3]}], "VerticalSlash.vertical must be >= 1"),
        ([{"0": ["stream_llm", 1, 2, 0.3]}, {"0": ["stream_llm", 1, 2, 0.3], "1": ["stream_llm", 1, 2, 0.3]}],
         "same, non-zero number of heads"),
    ],
)
def test_malformed_minference_config(data, message):
    with pytest.raises(ValueError, match=message):
        PatternConfig.from_minference(data)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PatternConfig.load(path)
    with pytest.raises(ValueError, match="not found"):
        PatternConfig.load(tmp_path / "missing.json")
    # A directory (`--config /tmp`) and a file that is not UTF-8 were tracebacks (IsADirectoryError,
    # UnicodeDecodeError) instead of a ValueError naming the path.
    with pytest.raises(ValueError, match=f"pattern config '{tmp_path}' is a directory; expected a JSON file"):
        PatternConfig.load(tmp_path)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(ValueError, match=r"is not UTF-8 JSON text \(byte 0xe9 at offset 5\)"):
        PatternConfig.load(latin)


def test_metadata_must_be_an_object(tmp_path):
    data = PatternConfig.uniform(1, 2, VerticalSlash(8, 64)).to_dict() | {"metadata": ["a", "b"]}
    path = tmp_path / "list-metadata.json"
    path.write_text(json.dumps(data))
    # Was: "cannot convert dictionary update sequence element #0 to a sequence".
    with pytest.raises(ValueError, match="pattern config 'metadata' must be a JSON object, got list"):
        PatternConfig.load(path)
    with pytest.raises(TypeError, match="PatternConfig.metadata must be a mapping .*, got list"):
        PatternConfig(((VerticalSlash(8, 64),),), ["a"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "other"}, "'format' must be"),
        ({"format": "sparse-prefill/pattern-config", "version": 9}, "'version' must be 1"),
        ({"format": "sparse-prefill/pattern-config", "version": 1, "layers": "x"}, "list of lists"),
        (
            {"format": "sparse-prefill/pattern-config", "version": 1, "n_layers": 1, "n_heads": 1,
             "layers": [[{"type": "vertical_slash", "vertical": 1}]]},
            r"bad fields for 'vertical_slash'",
        ),
        (
            {"format": "sparse-prefill/pattern-config", "version": 1, "n_layers": 2, "n_heads": 1,
             "layers": [[{"type": "dense"}]]},
            "declares n_layers, n_heads",
        ),
        ({"format": "sparse-prefill/pattern-config", "version": 1, "layers": [[{"type": "blocky"}]]},
         "unknown pattern type 'blocky'"),
        (
            {"format": "sparse-prefill/pattern-config", "version": 1, "n_layers": 1, "n_heads": 1,
             "layers": [[{"type": "block_coverage", "coverage": 2, "stride": 16}]]},
            r"BlockCoverage.coverage must be a number in \(0, 1\], got coverage=2",
        ),
        (
            {"format": "sparse-prefill/pattern-config", "version": 1, "n_layers": 1, "n_heads": 1,
             "layers": [[{"type": "block_coverage", "coverage": 0.9, "stride": 12}]]},
            "BlockCoverage.stride must be a power of two that divides 64, got stride=12",
        ),
        (
            {"format": "sparse-prefill/pattern-config", "version": 1, "n_layers": 1, "n_heads": 1,
             "layers": [[{"type": "block_coverage", "stride": 16}]]},
            r"layers\[0\]\[0\]: bad fields for 'block_coverage'",
        ),
    ],
)
def test_malformed_own_config(data, message):
    with pytest.raises(ValueError, match=message):
        PatternConfig.from_dict(data)


def test_pattern_from_dict_needs_type():
    with pytest.raises(ValueError, match="'type' key"):
        pattern_from_dict({"sink": 3})


def test_estimate_layer_refuses_a_pattern_count_other_than_the_query_heads():
    """A list for another model's heads (9 patterns for Gemma's 4 heads) once reached a GPU gather and
    died in a device-side assert; it must be a ValueError before any work."""
    from sparse_prefill.kinds import estimate_layer

    q, k = torch.randn(1, 4, 128, 16), torch.randn(1, 1, 128, 16)
    with pytest.raises(ValueError, match="one pattern per query head: got 9 for q_heads=4"):
        estimate_layer(q, k, [VerticalSlash(8, 64)] * 9, 0.25)
