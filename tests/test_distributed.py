"""Context-parallel sparse attention on two CPU processes (gloo): each rank's rows against one process."""

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash, sparse_attention

# Every kind; Vertical-Slash (head 4) is estimated from each rank's own last queries.
PATTERNS = [Dense(), AShape(4, 40), BlockSparse(2), BlockCoverage(0.8, stride=8), VerticalSlash(8, 64, last_q=16),
            BlockCoverage(0.9)]
SAME_AS_ONE_PASS = [0, 1, 2, 3, 5]  # on slices that start at a multiple of 64


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
    (docs/semantics.md); on slices that start at a multiple of 64, Dense, A-shape, Block-Sparse and
    Block-Coverage also equal the whole prompt's rows in one pass."""
    got = _run(slices)
    seq = sum(slices)
    q, k, v = _inputs(seq)
    whole = sparse_attention(q, k, v, PATTERNS)
    for rank, mine in enumerate(got):
        start, end = sum(slices[:rank]), sum(slices[: rank + 1])
        want = sparse_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], PATTERNS)
        torch.testing.assert_close(mine, want, rtol=0, atol=0)
        if start % 64 == 0:
            torch.testing.assert_close(mine[:, SAME_AS_ONE_PASS], whole[:, SAME_AS_ONE_PASS, start:end], rtol=1e-5, atol=1e-6)


def test_needs_an_initialised_process_group():
    from sparse_prefill.distributed import context_parallel_attention

    q, k, v = _inputs(64)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        context_parallel_attention(q, k, v, Dense())
