"""Block-Sparse index estimation in PyTorch.

Queries and keys are mean-pooled over blocks of ``block`` tokens (the last block over the tokens it
has); a query block scores key block ``c`` by the scaled dot product of the pooled vectors, and
keeps its ``top_k`` causal key blocks, the diagonal block always among them.
"""

from __future__ import annotations

import torch

from ..index import BlockSparseIndex
from ..patterns import BlockSparse


def mean_pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[batch, seq, dim] -> [batch, ceil(seq / block), dim] block means, in float32 (float64 stays).

    Sums in the wider dtype without copying ``x`` (a 1M-token layer's queries are gigabytes).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, seq, dim = x.shape
    full = seq // block
    parts = [x[:, : full * block].reshape(batch, full, block, dim).sum(dim=2, dtype=dtype) / block]
    if seq > full * block:
        parts.append(x[:, full * block :].sum(dim=1, keepdim=True, dtype=dtype) / (seq - full * block))
    return torch.cat(parts, dim=1)


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """[batch, n_blocks, n_blocks] pooled scores; key blocks after the query block are -inf."""
    pooled_q = mean_pool_blocks(q, block)
    pooled_k = mean_pool_blocks(k, block)
    scores = torch.einsum("bqd,bkd->bqk", pooled_q, pooled_k) * scale
    n_blocks = scores.shape[1]
    future = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def block_sparse_index(q: torch.Tensor, k: torch.Tensor, pattern: BlockSparse, scale: float) -> BlockSparseIndex:
    """Estimate one head's Block-Sparse index (``q``, ``k``: [batch, seq, head_dim])."""
    scores = block_scores(q, k, pattern.block, scale)
    n_blocks = scores.shape[1]
    diagonal = torch.arange(n_blocks, device=q.device)
    scores[:, diagonal, diagonal] = float("inf")
    top = scores.topk(min(pattern.top_k, n_blocks), dim=2)
    # Query block b has only b + 1 causal key blocks: the rest of its top-k are -inf, dropped as -1.
    blocks = torch.where(top.values > float("-inf"), top.indices, n_blocks).sort(dim=2).values
    return BlockSparseIndex(blocks=torch.where(blocks == n_blocks, -1, blocks), block=pattern.block)
