"""The frontier benchmark's CPU dry run (benchmarks/frontier.py --tiny): schema, sanity of its numbers, plots.

The dry run runs the Triton kernels in the interpreter on a small planted workload; its times mean
nothing, but every code path the GPU run takes (plan, kernel, sampled-row error, recall, JSON,
PNG, table) runs, so a broken benchmark is caught before it costs device time.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "frontier.py"

ROW_KEYS = {
    "workload", "seq", "layer", "method", "budget", "index_ms", "kernel_ms", "total_ms", "dense_cudnn_ms",
    "dense_flash2_ms", "dense_extrapolated", "computed_fraction", "recall", "rel_l2", "rel_l2_last",
    "rel_l2_random", "speedup_vs_cudnn", "kernel_tflops", "cudnn_tflops", "index_share_of_cudnn",
}
METHODS = {"dense_cudnn", "dense_flash2", "vertical_slash", "block_sparse", "a_shape", "block_coverage", "default", "fast"}
DENSE = {"dense_cudnn", "dense_flash2"}
# The tiny sweeps gather at most 16 columns per head (VerticalSlash(16, .), AShape(16, .)).
MAX_GATHERED_COLUMNS = 16


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"frontier.py {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    result = run_script("--tiny", "--out", str(out))
    return out, json.loads((out / "frontier.json").read_text()), result.stdout


def max_computed_fraction(seq: int) -> float:
    """The most the formula can give: every causal 64 x 64 tile whole, plus, per query block, the
    64 x 64 tiles its gathered columns are multiplied in.

    At these tiny lengths the diagonal tiles, counted whole, are a quarter of all the causal pairs,
    so a budget that keeps nearly everything reports a computed fraction above 1 (at 128K the
    overcount is 0.05%).
    """
    n_blocks = -(-seq // 64)
    column_tiles = n_blocks * -(-MAX_GATHERED_COLUMNS // 64)
    pairs = (n_blocks * (n_blocks + 1) // 2 + column_tiles) * 64 * 64
    return pairs / (seq * (seq + 1) / 2)


def test_every_row_has_the_schema_and_every_method_appears(tiny_run):
    _, data, _ = tiny_run
    for key in ("date", "gpu", "torch", "triton", "python", "command"):
        assert key in data["meta"], key
    rows = data["rows"]
    assert rows
    for row in rows:
        missing = ROW_KEYS - set(row)
        assert not missing, (row["method"], row["budget"], missing)
        assert row["workload"] == "planted" and row["layer"] == 0
    assert {row["method"] for row in rows} == METHODS
    assert {row["seq"] for row in rows} == {256, 320}


def test_errors_recall_and_work_are_sane(tiny_run):
    _, data, _ = tiny_run
    for row in data["rows"]:
        where = (row["seq"], row["method"], row["budget"])
        assert -1e-6 <= row["recall"] <= 1 + 1e-6, where
        assert row["computed_fraction"] > 0, where
        assert row["total_ms"] > 0 and row["dense_cudnn_ms"] > 0, where
        assert math.isclose(row["speedup_vs_cudnn"], row["dense_cudnn_ms"] / row["total_ms"]), where
        if row["method"] in DENSE or row["budget"] == "dense":  # the baselines, and presets below their crossover
            assert row["rel_l2"] == 0 and row["recall"] == 1 and row["computed_fraction"] == 1, where
            assert row["index_ms"] == 0, where
        else:
            for key in ("rel_l2", "rel_l2_last", "rel_l2_random"):
                assert math.isfinite(row[key]) and row[key] >= 0, (where, key, row[key])
            assert row["computed_fraction"] <= max_computed_fraction(row["seq"]), where
            assert row["kernel_tflops"] > 0, where


def test_block_coverage_error_falls_as_coverage_grows(tiny_run):
    _, data, _ = tiny_run
    for seq in (256, 320):
        rows = [r for r in data["rows"] if r["method"] == "block_coverage" and r["seq"] == seq]
        by_coverage = sorted(rows, key=lambda r: float(r["budget"].split("/")[0]))
        assert len(by_coverage) >= 2
        smallest, largest = by_coverage[0], by_coverage[-1]
        assert largest["rel_l2"] <= smallest["rel_l2"], (seq, smallest, largest)
        assert largest["recall"] >= smallest["recall"] - 1e-6, seq


def test_plots_table_and_replot(tiny_run, tmp_path):
    out, data, stdout = tiny_run
    png = out / "frontier-planted.png"
    assert png.is_file() and png.stat().st_size > 0
    lines = stdout.splitlines()
    header_at = max(i for i, line in enumerate(lines) if "rel_l2 (last/random)" in line)
    assert len(lines) - header_at == len(data["rows"]) + 3  # the table comes last: header, rule, rows, legend
    result = run_script("--replot", str(out / "frontier.json"), "--out", str(tmp_path))
    assert (tmp_path / "frontier-planted.png").stat().st_size > 0
    assert "block_coverage" in result.stdout
