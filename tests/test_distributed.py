"""Context-parallel sparse attention on two CPU processes (gloo): each rank's rows against one process."""

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash, sparse_attention

# Every kind; Vertical-Slash (head 4) takes the whole prompt's index, estimated from its last queries.
PATTERNS = [Dense(), AShape(4, 40), BlockSparse(2), BlockCoverage(0.8, stride=8), VerticalSlash(8, 64, last_q=16),
            BlockCoverage(0.9)]
SLASH_HEADS = [4]  # the whole prompt's rows on any slice
CHUNK_HEADS = [0, 1, 2, 3, 5]  # a chunk's rows; the whole prompt's too on slices that start at a multiple of 64


def _inputs(seq: int):
    g = torch.Generator().manual_seed(0)
    q = 3 * torch.randn(1, 6, seq, 16, generator=g)
    k, v = (torch.randn(1, 2, seq, 16, generator=g) for _ in range(2))
    return q, k, v


def _rank_main(rank: int, world: int, init_file: str, slices: list[int], seq: int, results) -> None:
    from sparse_prefill.distributed import context_parallel_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, v = _inputs(seq)
        start, end = sum(slices[:rank]), sum(slices[: rank + 1])
        mine = context_parallel_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], PATTERNS)
        results[rank] = mine
    finally:
        dist.destroy_process_group()


def _run(slices: list[int]) -> list[torch.Tensor]:
    seq = sum(slices)
    with tempfile.TemporaryDirectory() as folder:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_rank_main, args=(len(slices), os.path.join(folder, "init"), slices, seq, results), nprocs=len(slices))
        return [results[r] for r in range(len(slices))]


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("slices", [[128, 128], [100, 156], [64, 64, 72]])
def test_context_parallel_equals_one_process(slices):
    """Every rank's rows equal one process's attention of the same queries over the keys up to them
    (docs/semantics.md), except Vertical-Slash's, which equal the whole prompt's rows in one pass on
    any slice; on slices that start at a multiple of 64, every kind equals one pass."""
    got = _run(slices)
    seq = sum(slices)
    q, k, v = _inputs(seq)
    whole = sparse_attention(q, k, v, PATTERNS)
    chunk_estimate_differs = False  # somewhere a per-chunk Vertical-Slash estimate would give other rows
    for rank, mine in enumerate(got):
        start, end = sum(slices[:rank]), sum(slices[: rank + 1])
        chunk = sparse_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], PATTERNS)
        torch.testing.assert_close(mine[:, CHUNK_HEADS], chunk[:, CHUNK_HEADS], rtol=0, atol=0)
        torch.testing.assert_close(mine[:, SLASH_HEADS], whole[:, SLASH_HEADS, start:end], rtol=1e-5, atol=1e-6)
        chunk_estimate_differs |= not torch.allclose(chunk[:, SLASH_HEADS], whole[:, SLASH_HEADS, start:end],
                                                     rtol=1e-3, atol=1e-3)
        if start % 64 == 0:
            torch.testing.assert_close(mine, whole[:, :, start:end], rtol=1e-5, atol=1e-6)
    assert chunk_estimate_differs


def test_needs_an_initialised_process_group():
    from sparse_prefill.distributed import context_parallel_attention

    q, k, v = _inputs(64)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        context_parallel_attention(q, k, v, Dense())


# -- the zig-zag layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seq", [1024, 1100, 4095, 131072 + 17])
def test_layout_covers_every_position_once_in_balanced_64_aligned_pieces(world, seq):
    from sparse_prefill.distributed import context_parallel_layout

    layout = context_parallel_layout(seq, world)
    assert layout.bounds[0] == 0 and layout.bounds[-1] == seq and len(layout.bounds) == 2 * world + 1
    assert all(bound % 64 == 0 for bound in layout.bounds[:-1])
    held = torch.cat([layout.positions(rank) for rank in range(world)])
    assert torch.equal(held.sort().values, torch.arange(seq))
    lengths = [layout.local_length(rank) for rank in range(world)]
    assert max(lengths) - min(lengths) < 128
    # Dense causal work: sum over queries of (position + 1), the same on every rank up to the blocks
    # dealt unevenly (< 128 queries of at most seq keys).
    pairs = [layout.causal_pairs(rank) for rank in range(world)]
    assert sum(pairs) == seq * (seq + 1) // 2
    assert max(pairs) - min(pairs) <= 128 * seq
    for rank in range(world):
        positions = layout.positions(rank)
        for start, end, row in layout.local_pieces(rank):
            assert torch.equal(positions[row : row + end - start], torch.arange(start, end))
    for piece in range(2 * world):
        rank, row = layout.owner(piece)
        assert layout.positions(rank)[row] == layout.bounds[piece]
    assert layout.last_rank() == 0 and int(layout.positions(0)[-1]) == seq - 1


def test_layout_refuses_prompts_shorter_than_two_blocks_per_rank():
    from sparse_prefill.distributed import context_parallel_layout

    assert context_parallel_layout(256, 2).bounds == (0, 64, 128, 192, 256)
    with pytest.raises(ValueError, match="at least 256 tokens .* got seq_len=255"):
        context_parallel_layout(255, 2)
    with pytest.raises(ValueError, match="world must be a positive int, got world=0"):
        context_parallel_layout(1024, 0)


def _layout_rank_main(rank: int, world: int, init_file: str, seq: int, results) -> None:
    from sparse_prefill.distributed import context_parallel_attention, context_parallel_layout

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, v = _inputs(seq)
        layout = context_parallel_layout(seq, world)
        rows = layout.positions(rank)
        results[rank] = context_parallel_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], PATTERNS, layout=layout)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("world, seq", [(2, 300), (3, 420)])
def test_context_parallel_attention_on_the_zig_zag_layout(world, seq):
    """With ``layout=``, each of a rank's two pieces is a chunk over the keys up to its end (Vertical-Slash
    with the whole prompt's index); every piece starts at a multiple of 64, so every kind equals one pass."""
    from sparse_prefill.distributed import context_parallel_layout

    with tempfile.TemporaryDirectory() as folder:
        results = mp.Manager().dict()
        mp.spawn(_layout_rank_main, args=(world, os.path.join(folder, "init"), seq, results), nprocs=world)
        got = [results[r] for r in range(world)]
    q, k, v = _inputs(seq)
    whole = sparse_attention(q, k, v, PATTERNS)
    layout = context_parallel_layout(seq, world)
    for rank, mine in enumerate(got):
        for start, end, row in layout.local_pieces(rank):
            piece = mine[:, :, row : row + end - start]
            chunk = sparse_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], PATTERNS)
            torch.testing.assert_close(piece[:, CHUNK_HEADS], chunk[:, CHUNK_HEADS], rtol=0, atol=0)
            torch.testing.assert_close(piece, whole[:, :, start:end], rtol=1e-5, atol=1e-6)


def _long_last_q_rank_main(rank: int, world: int, init_file: str, results) -> None:
    from sparse_prefill.distributed import context_parallel_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, v = _inputs(256)
        mine = slice(128 * rank, 128 * (rank + 1))
        try:
            context_parallel_attention(q[:, :, mine], k[:, :, mine], v[:, :, mine], VerticalSlash(8, 64, last_q=200))
            results[rank] = "no error"
        except ValueError as error:
            results[rank] = str(error)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_vertical_slash_last_q_beyond_the_last_rank_is_refused_on_every_rank():
    """The prompt's last 200 queries would span two ranks: every rank refuses, so none waits in the broadcast."""
    with tempfile.TemporaryDirectory() as folder:
        results = mp.Manager().dict()
        mp.spawn(_long_last_q_rank_main, args=(2, os.path.join(folder, "init"), results), nprocs=2)
        got = [results[r] for r in range(2)]
    for message in got:
        assert "last_q=200" in message and "last 128" in message, message


def test_vertical_slash_index_up_to_keeps_the_same_set_for_a_chunk():
    """A chunk ending at ``end`` keeps, over its keys, exactly what the whole prompt's index keeps there."""
    from sparse_prefill.kinds import VerticalSlashIndex

    index = VerticalSlashIndex(columns=torch.tensor([[0, 5, 70, 150, 290]]), diagonals=torch.tensor([[0, 1, 3, 4]]))
    for end in (1, 64, 100, 192, 256, 300):
        rows = torch.arange(end)
        chunk = index.up_to(end)
        assert bool((chunk.columns < end).all()) and bool((chunk.diagonals < -(-end // 64)).all())
        assert torch.equal(chunk.kept_mask(rows, end), index.kept_mask(rows, 300)[:, :, :end]), end


# -- long_prefill.context_parallel_prefill ---------------------------------------------------------------
#
# A tiny Llama in float64 (2 layers, 4 query / 2 KV heads), so that the context-parallel prefill can be
# held to the one-process long_prefill at 1e-10: any difference is a bug, not rounding. Prompts of
# 300 tokens on 2 ranks and 420 on 3: the prompt's last piece holds a partial 64-token block.

CP_SEQ = {2: 300, 3: 420}
CP_CHUNK = 37  # chunks of the non-attention work that divide neither the pieces nor the shares


def _cp_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.float64).eval()


def _cp_ids(seq: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _cp_configs():
    """Configs whose context-parallel rows equal one pass: "must_match" (Dense, A-shape, Block-Sparse and
    Block-Coverage on 64-aligned pieces, with budgets that scale with the prompt's length: each piece
    as a chunk) and "vertical_slash" (the prompt's index shared by the pieces; docs/semantics.md)."""
    from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, PatternConfig, VerticalSlash

    must_match = PatternConfig(
        ((Dense(), AShape(4, 40), BlockSparse(2), BlockCoverage(0.8, stride=8)),
         (BlockCoverage(0.9), BlockSparse(1), AShape(0, 70), BlockCoverage(0.7, stride=4))),
        reference_length=128, scaling="proportional",
    )
    vertical_slash = PatternConfig(
        ((VerticalSlash(8, 64, last_q=16), Dense(), VerticalSlash(4, 64, last_q=32), AShape(4, 40)),
         (VerticalSlash(8, 64, last_q=16),) * 4),
    )
    return {"must_match": must_match, "vertical_slash": vertical_slash}


def _cp_rank_main(rank: int, world: int, init_file: str, results) -> None:
    import sparse_prefill
    from sparse_prefill import long_prefill as lp

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, seq = _cp_model(), CP_SEQ[world]
        ids = _cp_ids(seq)
        if world == 2:  # refusals first: the group must still work after them
            results["errors", rank] = _cp_refusals(model, ids, rank)
        dense = lp.context_parallel_prefill(model, ids, chunk_size=CP_CHUNK, profile=True)
        results["dense", rank] = dense.logits
        results["profile", rank] = (dense.attention_seconds, dense.communication_seconds, dense.cache)
        for name, config in _cp_configs().items():
            state = sparse_prefill.enable(model, config, min_seq_len=64)
            try:
                results[name, rank] = lp.context_parallel_prefill(model, ids, chunk_size=CP_CHUNK).logits
                results[name, "calls", rank] = (state.sparse_calls, state.dense_calls)
            finally:
                sparse_prefill.disable(model)
    finally:
        dist.destroy_process_group()


def _cp_refusals(model, ids: torch.Tensor, rank: int) -> dict:
    """(type, message) of each refused call on this rank; every rank must raise, none may hang."""
    from sparse_prefill import long_prefill as lp

    calls = {
        "cache": dict(input_ids=ids, cache="device"),
        "cache_on_rank_1": dict(input_ids=ids, cache="device" if rank == 1 else None),
        "batch": dict(input_ids=ids[: 2 - rank]),
        "tokens": dict(input_ids=ids.roll(rank, dims=1)),
        "too_short": dict(input_ids=ids[:, :255]),
        "vocab": dict(input_ids=ids + 128 * rank),
    }
    errors = {}
    for name, kwargs in calls.items():
        try:
            lp.context_parallel_prefill(model, **kwargs)
        except Exception as error:  # noqa: BLE001
            errors[name] = (type(error).__name__, str(error))
        else:
            errors[name] = None
    return errors


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def cp_run(request):
    """One spawn per group size runs every scenario; returns (world, results)."""
    pytest.importorskip("transformers")
    if not dist.is_available() or sys.platform == "win32":
        pytest.skip("needs torch.distributed with gloo")
    world = request.param
    with tempfile.TemporaryDirectory() as folder:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_cp_rank_main, args=(world, os.path.join(folder, "init"), results), nprocs=world)
        return world, dict(results)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_context_parallel_prefill_dense_equals_one_process(cp_run):
    from sparse_prefill import long_prefill as lp

    world, results = cp_run
    model, ids = _cp_model(), _cp_ids(CP_SEQ[world])
    want = lp.prefill(model, ids, chunk_size=CP_CHUNK).logits
    with torch.no_grad():
        assert _rel(want, model(ids).logits[:, -1]) < 1e-12
    for rank in range(world):
        got = results["dense", rank]
        assert got.shape == (2, 128) and got.dtype == torch.float64
        assert _rel(got, want) < 1e-10, rank
        assert torch.equal(got, results["dense", 0])  # broadcast: the very same logits on every rank
        attention_s, communication_s, cache = results["profile", rank]
        assert attention_s > 0 and communication_s > 0 and cache is None


def _one_process_pieces(config, layout):
    """One process's attention with the context-parallel semantics: each piece of the layout a chunk over
    the keys up to its end, with the layer's patterns for the whole prompt."""
    from sparse_prefill import sparse_attention

    def attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        patterns = config.layer_at(module.layer_idx, k.shape[2])
        out = torch.cat([
            sparse_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], patterns, scale=scaling)
            for start, end in zip(layout.bounds[:-1], layout.bounds[1:])
        ], dim=2)
        return out.transpose(1, 2), None

    return attention


@pytest.mark.parametrize("name", ["must_match", "vertical_slash"])
def test_context_parallel_prefill_sparse_equals_one_pass(cp_run, name):
    """Every config equals one sparse pass over the whole prompt. Dense, A-shape, Block-Sparse and
    Block-Coverage because each piece, run as a chunk (docs/semantics.md), keeps that set; Vertical-Slash
    because its index is the prompt's, where running each piece as a chunk would differ."""
    import sparse_prefill
    from sparse_prefill import long_prefill as lp
    from sparse_prefill.distributed import context_parallel_layout

    world, results = cp_run
    seq = CP_SEQ[world]
    model, ids, config = _cp_model(), _cp_ids(seq), _cp_configs()[name]
    pieces = lp.prefill(model, ids, chunk_size=CP_CHUNK,
                        attention=_one_process_pieces(config, context_parallel_layout(seq, world))).logits
    sparse_prefill.enable(model, config, min_seq_len=64)
    try:
        one_pass = lp.prefill(model, ids, chunk_size=CP_CHUNK).logits
    finally:
        sparse_prefill.disable(model)
    dense = lp.prefill(model, ids, chunk_size=CP_CHUNK).logits
    assert _rel(one_pass, dense) > 1e-4  # the patterns really prune
    for rank in range(world):
        got = results[name, rank]
        assert results[name, "calls", rank] == (2, 0)  # both layers sparse, counted on the enable state
        assert _rel(got, one_pass) < 1e-10, rank
        if name == "must_match":
            assert _rel(got, pieces) < 1e-10, rank
        else:
            assert _rel(got, pieces) > 1e-6, rank


def test_context_parallel_prefill_refusals_reach_every_rank(cp_run):
    world, results = cp_run
    if world != 2:
        pytest.skip("the refusals run on 2 ranks")
    errors = [results["errors", rank] for rank in range(world)]
    for rank in range(world):
        assert errors[rank]["cache"][0] == "ValueError"
        assert "keeps no KV cache" in errors[rank]["cache"][1] and "cache='device'" in errors[rank]["cache"][1]
        assert errors[rank]["batch"] == (
            "ValueError", "every rank must pass the same input_ids [batch, seq], got rank 0: (2, 300), rank 1: (1, 300)"
        )
        assert errors[rank]["tokens"][0] == "ValueError"
        assert "the tokens differ between ranks" in errors[rank]["tokens"][1]
        assert errors[rank]["too_short"][0] == "ValueError"
        assert "at least 256 tokens" in errors[rank]["too_short"][1] and "seq_len=255" in errors[rank]["too_short"][1]
    # One rank's refusal: that rank raises its own error, the others say which rank refused.
    assert errors[1]["cache_on_rank_1"][0] == "ValueError" and "keeps no KV cache" in errors[1]["cache_on_rank_1"][1]
    assert errors[0]["cache_on_rank_1"] == (
        "RuntimeError", "context_parallel_prefill: rank(s) [1] of 2 refused their arguments (their errors say why); "
        "nothing was computed"
    )
    assert errors[1]["vocab"] == ("ValueError", "input_ids must lie in [0, 128), got values in [131, 255]")
    assert errors[0]["vocab"][0] == "RuntimeError"


def test_context_parallel_prefill_needs_an_initialised_process_group():
    pytest.importorskip("transformers")
    from sparse_prefill import long_prefill as lp

    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        lp.context_parallel_prefill(_cp_model(), _cp_ids(300))


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_context_parallel_benchmark_dry_run(tmp_path):
    """benchmarks/context_parallel.py --tiny under torchrun on two CPU processes: every row, the same logits
    as one process where the semantics agree, the JSON and the PNG. Its times mean nothing on a CPU."""
    import json
    import subprocess
    from pathlib import Path

    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               str(root / "benchmarks" / "context_parallel.py"), "--tiny", "--out", str(tmp_path),
               "--lengths", "131072", "262144"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "context_parallel.json").read_text())
    assert data["meta"]["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                   "NVSHMEM_DISABLE_NVLS": "1"}
    rows = data["rows"]
    assert [(row["seq"], row["path"]) for row in rows] == [
        (seq, path) for seq in (256, 512) for path in ("dense", "vertical_slash", "block_coverage")]
    for row in rows:
        ranks = row["context_parallel"]["ranks"]
        assert [r["positions"] for r in ranks] == [row["seq"] // 2] * 2
        assert ranks[0]["causal_pairs"] == ranks[1]["causal_pairs"]
        assert row["context_parallel"]["ttft_s"] == max(r["ttft_s"] for r in ranks)
        assert row["one_device"]["ttft_s"] > 0 and row["speedup"] > 0
        assert row["logits_rel_err"] < 1e-2, row  # every path keeps one GPU's set
    assert (tmp_path / "context_parallel.png").stat().st_size > 10_000


# -- tensor parallelism through transformers (tp_plan="auto") -------------------------------------------

TP_SEQ = 256


def _tp_config():
    """A different pattern on every head of each layer, so a rank that ran another rank's patterns (or the
    first heads' on every rank) would change the logits."""
    from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, PatternConfig, VerticalSlash

    return PatternConfig(
        ((VerticalSlash(8, 64, last_q=16), AShape(4, 40), BlockSparse(1), Dense()),
         (AShape(0, 70), BlockCoverage(0.7, stride=4), Dense(), VerticalSlash(4, 64, last_q=32))),
    )


def _tp_inputs():
    """Two prompts: one whole, one left-padded by 40 tokens (the padded path, one sequence at a time)."""
    ids = _cp_ids(TP_SEQ)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    return ids, mask


def _tp_save_model(folder: str) -> str:
    path = os.path.join(folder, "model")
    _cp_model().save_pretrained(path)  # 4 query heads, 2 KV heads, 2 layers, float64
    return path


def _tp_rank_main(rank: int, world: int, init_file: str, path: str, results) -> None:
    import sparse_prefill
    from transformers import AutoModelForCausalLM, DistributedConfig

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, distributed_config=DistributedConfig(tp_plan="auto", tp_size=world), dtype=torch.float64,
            attn_implementation="sdpa").eval()
        attention = model.model.layers[0].self_attn
        results["sharding", rank] = (model.tp_size, type(attention.q_proj.weight).__name__,
                                     tuple(attention.q_proj.weight.to_local().shape),
                                     tuple(attention.k_proj.weight.to_local().shape))
        ids, mask = _tp_inputs()
        state = sparse_prefill.enable(model, _tp_config(), min_seq_len=64)
        results["state", rank] = (state.tp_rank, state.tp_size, state.heads)
        with torch.no_grad():
            results["sparse", rank] = model(ids, attention_mask=mask).logits
            results["calls", rank] = (state.sparse_calls, state.dense_calls)
            state.tp_rank = world - 1 - rank  # another rank's heads: what a wrong mapping computes
            results["swapped", rank] = model(ids, attention_mask=mask).logits
        sparse_prefill.disable(model)
        with torch.no_grad():
            results["dense", rank] = model(ids, attention_mask=mask).logits
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_run():
    """Two gloo processes load the same saved tiny Llama with transformers' tensor parallelism; returns
    (the saved model, each rank's results)."""
    pytest.importorskip("transformers")
    if not dist.is_available() or sys.platform == "win32":
        pytest.skip("needs torch.distributed with gloo")
    from transformers import AutoModelForCausalLM

    world = 2
    with tempfile.TemporaryDirectory() as folder:
        path = _tp_save_model(folder)
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_tp_rank_main, args=(world, os.path.join(folder, "init"), path, results), nprocs=world)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa").eval()
        return model, dict(results)


def test_tensor_parallel_model_splits_heads_in_contiguous_rank_slices(tp_run):
    _, results = tp_run
    for rank in range(2):
        # q_proj [4 heads x 16, 64] and k_proj [2 heads x 16, 64] in halves: 2 query heads, 1 KV head per rank.
        assert results["sharding", rank] == (2, "DTensor", (32, 64), (16, 64))
        assert results["state", rank] == (rank, 2, (4, 2))


def test_tensor_parallel_sparse_prefill_equals_one_process(tp_run):
    """Each rank runs the patterns of its own global heads (rank r: heads 2r, 2r + 1): the logits equal one
    process's, and running another rank's patterns does not."""
    import sparse_prefill

    model, results = tp_run
    ids, mask = _tp_inputs()
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        state = sparse_prefill.enable(model, _tp_config(), min_seq_len=64)
        try:
            sparse = model(ids, attention_mask=mask).logits
        finally:
            sparse_prefill.disable(model)
    assert (state.tp_rank, state.tp_size, state.sparse_calls) == (0, 1, 2)
    real = mask.bool()
    assert _rel(sparse[real], dense[real]) > 1e-3  # the patterns really prune
    for rank in range(2):
        assert results["calls", rank] == (2, 0)  # both layers sparse on every rank
        assert _rel(results["dense", rank][real], dense[real]) < 1e-12, rank
        assert _rel(results["sparse", rank][real], sparse[real]) < 1e-12, rank
        assert _rel(results["swapped", rank][real], sparse[real]) > 1e-3, rank


def test_layer_patterns_are_the_rank_slice_of_the_global_heads():
    from sparse_prefill import Dense
    from sparse_prefill.integrations.transformers import SparsePrefillState
    from sparse_prefill.presets import PRESETS

    config = _tp_config()

    def state(rank, size, **kwargs):
        return SparsePrefillState(config=config, preset=PRESETS["default"], min_seq_len=64,
                                  restore_implementation="sdpa", heads=(4, 2), tp_rank=rank, tp_size=size, **kwargs)

    assert state(0, 1).layer_patterns(1, 4, TP_SEQ, 2) == config.layer(1)
    assert state(0, 2).layer_patterns(1, 2, TP_SEQ, 1) == config.layer(1)[:2]
    assert state(1, 2).layer_patterns(1, 2, TP_SEQ, 1) == config.layer(1)[2:]
    assert state(3, 4).layer_patterns(0, 1, TP_SEQ) == (Dense(),)
    with pytest.raises(ValueError, match="layer 0 attends with 3 query heads on tensor-parallel rank 1 of 2, "
                                         "but the model has 4 query heads"):
        state(1, 2).layer_patterns(0, 3, TP_SEQ)
    with pytest.raises(ValueError, match="layer 0 attends with 2 query heads, but the model has 4"):
        state(0, 1).layer_patterns(0, 2, TP_SEQ)  # a split the state was not told of
    with pytest.raises(ValueError, match="layer 1 attends with 2 key/value heads on tensor-parallel rank 0 of 2"):
        state(0, 2).layer_patterns(1, 2, TP_SEQ, 2)
    # The preset's pattern is the same on every head; under tensor parallelism the share is still checked.
    preset = SparsePrefillState(config=None, preset=PRESETS["fast"], min_seq_len=64, restore_implementation="sdpa",
                                heads=(4, 2), tp_rank=1, tp_size=2)
    assert preset.layer_patterns(0, 2, TP_SEQ, 1) == (PRESETS["fast"].pattern,) * 2
    with pytest.raises(ValueError, match="attends with 4 query heads on tensor-parallel rank 1 of 2"):
        preset.layer_patterns(0, 4, TP_SEQ, 2)


def test_enable_on_an_unsplit_model_is_rank_0_of_1():
    pytest.importorskip("transformers")
    import sparse_prefill
    from sparse_prefill import PatternConfig

    model = _cp_model()
    state = sparse_prefill.enable(model, _tp_config())
    assert (state.tp_rank, state.tp_size, state.heads) == (0, 1, (4, 2))
    sparse_prefill.disable(model)
    with pytest.raises(ValueError, match="pattern config is for 2 layers x 2 query heads, but the model has "
                                         "2 layers x 4 query heads"):
        sparse_prefill.enable(model, PatternConfig(tuple(heads[:2] for heads in _tp_config())))
