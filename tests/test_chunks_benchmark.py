"""The serving-shapes benchmark's CPU dry run (benchmarks/chunks.py --tiny): every workload runs, sparse.

Its times mean nothing on a CPU; it catches a broken benchmark before it costs device time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pattern", ["vertical_slash", "preset"])
def test_tiny_run_writes_every_workload_and_runs_sparse(tmp_path, pattern):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chunks.py"), "--tiny", "--out", str(tmp_path),
                             "--pattern", pattern],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "chunks.json").read_text())
    assert (tmp_path / "chunks.png").stat().st_size > 10_000
    assert {(r["workload"], r["path"]) for r in data["rows"]} == {
        (w, p) for w in ("chunked", "cached", "batch") for p in ("dense", "sparse")}
    assert all(r["ms"] > 0 and r["tokens"] > 0 for r in data["rows"])
    # Every workload's sparse runs went through the sparse path (4 layers per prefill at least).
    assert all(data["sparse_calls"][w] >= 4 for w in ("chunked", "cached", "batch")), data["sparse_calls"]
    # A padded sequence gets the same index as alone, whatever the pattern.
    assert data["checks"]["batch: sparse padded vs sparse alone (worst prompt)"] < 0.05, data["checks"]
    if pattern == "preset":
        # The default preset at 512 tokens keeps nearly every pair: sparse agrees with dense closely.
        assert all(0 <= value < 0.05 for value in data["checks"].values()), data["checks"]
    else:
        assert data["meta"]["patterns"].startswith("VerticalSlash(")
