"""The end-to-end benchmark's CPU dry run (benchmarks/e2e.py --tiny): checks, rows and the matmul floor.

Its times mean nothing on a CPU; it catches a broken benchmark before it costs device time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_records_every_path_with_its_matmul_floor(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    # --tiny divides the lengths by 512: 64 and 128 tokens, chunks of 64 (the second length has two).
    command = [sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--tiny", "--out", str(tmp_path),
               "--lengths", "32768", "65536", "--stages", "checks", "lengths", "cache", "generation",
               "--cache-seqs", "32768"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert "stage_errors" not in data, data["stage_errors"]
    assert (tmp_path / "e2e.png").stat().st_size > 10_000
    assert data["meta"]["fuse"] == "off"  # the default on a CPU
    checks = data["checks"]
    assert checks["chunked_vs_transformers_dense"]["rel_err"] == 0.0
    assert checks["chunked_vs_transformers_sparse"]["sparse_layers"] == 4
    floors = {floor["seq"]: floor for floor in data["matmul_floor"]}
    assert sorted(floors) == [64, 128] and floors[64]["chunk"] == floors[128]["chunk"] == 64
    assert floors[128]["floor_s"] == pytest.approx(2 * floors[64]["floor_s"])  # two chunks, one measurement
    rows = [row for row in data["rows"] if "ttft_s" in row]
    assert {row["path"] for row in rows} >= {"dense_cudnn", "dense_fa2", "vertical_slash", "a_shape"}
    for row in rows:
        assert row["matmul_floor_s"] == floors[row["seq"]]["floor_s"]
        assert row["rest_over_floor"] == pytest.approx(row["rest_s"] / row["matmul_floor_s"])
    # Generation after a 1M/1024-token prefill with the offloaded FP8 cache, dense and sparse decoding
    # from the same prefill: the default budget (2048 keys) covers this cache, so the tokens agree.
    # The cache modes at 32768/512 = 64 tokens: every placement and dtype kept its cache and decoded.
    modes = {row["mode"]: row for row in data["cache_modes"] if row["seq"] == 64 and row.get("pinned") != "warm"}
    assert sorted(modes) == ["device-bf16", "device-fp8", "offload-bf16", "offload-fp8"], data["cache_modes"]
    assert all(len(row["tokens_sparse"]) == 8 and "error" not in row for row in modes.values())
    assert modes["device-bf16"]["decode_logits_rel_err_vs_device_bf16"] == 0.0
    generated = [row for row in data["cache_modes"] if row["seq"] == 1024 and row.get("pinned") == "cold"]
    assert generated
    assert generated[0]["tokens_sparse"] == generated[0]["tokens"] and len(generated[0]["tokens"]) == 8
    assert generated[0]["generate_s_per_token"] > 0 and generated[0]["generate_sparse_s_per_token"] > 0
