"""benchmarks/decode_recovery.py's measurement on random Q/K: the selections it compares and their recovery."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sparse_prefill.decoding import page_summaries, recovery_ratio, select_pages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_recovery", ROOT / "benchmarks" / "decode_recovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def qk(n_keys=700, steps=80, q_heads=6, kv_heads=2, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(1, kv_heads, n_keys, head_dim, generator=generator)
    k[:, :, ::37] *= 3  # a few loud keys, so that pages differ
    q = 2 * torch.randn(1, q_heads, steps, head_dim, generator=generator)
    return q, k, list(range(n_keys - steps, n_keys))


def test_selections_agree_with_the_library_and_the_oracle_is_best(bench):
    q, k, positions = qk()
    group = q.shape[1] // k.shape[1]
    ratios = bench.layer_recovery(q, k, positions, [128, 256], sink=16, local=64)
    for budget in (128, 256):
        dynamic, static = ratios[(budget, "dynamic")], ratios[(budget, "static")]
        oracle, static_oracle = ratios[(budget, "oracle")], ratios[(budget, "static_oracle")]
        assert dynamic.shape == (len(positions), q.shape[1])
        assert torch.equal(static[0], dynamic[0]) and torch.equal(static_oracle[0], oracle[0])
        assert not torch.equal(static, dynamic)  # the choices do drift over 80 steps
        for other in (dynamic, static, static_oracle):  # the oracle maximises the group's summed mass
            assert (oracle.unflatten(1, (-1, group)).sum(2) >= other.unflatten(1, (-1, group)).sum(2) - 1e-5).all()
        assert ((dynamic > 0) & (dynamic < 1)).all()
        for step in (0, 41, 79):  # the dynamic ratio is recovery_ratio of select_pages on the step's cache
            keys, query = k[:, :, : positions[step] + 1], q[:, :, step : step + 1]
            selection = select_pages(query, page_summaries(keys, 16), budget=budget, sink=16, local=64)
            torch.testing.assert_close(dynamic[step], recovery_ratio(query, keys, selection)[0])


def test_a_budget_covering_the_cache_recovers_everything(bench):
    q, k, positions = qk(n_keys=300, steps=8)
    ratios = bench.layer_recovery(q, k, positions, [304], sink=16, local=64)
    for method in bench.METHODS:
        torch.testing.assert_close(ratios[(304, method)], torch.ones(8, q.shape[1]))
