"""Block-Coverage: per 64-query block, the fewest 64-key blocks holding a share of its attention mass.

The mass of every (query block, key block) tile is estimated by antidiagonal scoring (the idea of
XAttention, Xu et al. 2025): queries and keys are cut into groups of ``stride`` consecutive
tokens, and a query group meets a key group in ``stride`` products along an antidiagonal,
``q[a*S + t] . k[b*S + S-1-t]``. Each query and each key of the two groups appears in exactly one
product, so a heavy key column and a heavy diagonal both cross every antidiagonal once, at
``1/stride`` of the cost of the logits. Two scores are formed from the products, and a softmax
over each query group's causal key groups taken for each:

- the mean logit (XAttention's score): smooth, but it dilutes a single heavy key ``stride`` times
  and overrates the neighbourhood of the diagonal (on SmolLM2's layer 8 at 32K it chose tiles
  holding 73% of the mass for a target of 98%);
- the largest logit along the antidiagonal: it keeps a heavy key's or a heavy diagonal's weight
  (the one product that crosses it), but is noisier on smooth rows.

Their mean, summed per tile, estimates the tile's attention mass. (The mix beat either score alone
on the captured SmolLM2 layers when the second score was the log of the sum of the exponentials;
the largest logit gives the same error there, and the GPU's scoring pass takes 3.8 ms instead of
5.9 at 128K: docs/BENCHMARKS.md.) Each query block then keeps block 0 (attention sinks), its
diagonal block, and its heaviest other blocks down to the threshold at which the kept mass
reaches ``coverage`` of the row.

Unlike Vertical-Slash, whose index comes from the last queries, every query block is estimated
from its own queries: early rows get what they need, and the budget follows the prompt, the head
and the position. The index is a block list (:class:`~.block_sparse.BlockSparseIndex`): the kept
set, the GPU kernel's share and the cost are Block-Sparse's.

:func:`tile_mass` is the definition in PyTorch (the CPU path and the yardstick); on CUDA the
Triton kernels of :mod:`sparse_prefill.kernels.coverage` compute the same masses and threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .block_sparse import BlockSparseIndex, packed_lists, split_heads, with_partial_block
from .common import BLOCK, check_fraction, check_positive_int, device_values, float_dtype, n_blocks, on_triton, query_start

STRIDES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class BlockCoverage:
    """Every 64-query block keeps the fewest 64-key blocks holding ``coverage`` of its estimated attention mass.

    The mass of each (query block, key block) tile is estimated from the prompt by antidiagonal
    scoring with groups of ``stride`` tokens (``1/stride`` of the cost of the logits); block 0
    (attention sinks) and the diagonal block are always kept. The budget adapts to each prompt,
    head and query block: a query block whose attention is concentrated keeps few blocks, one whose
    attention is spread keeps many. Exact rule: docs/semantics.md.
    """

    coverage: float
    stride: int = 16
    kind: ClassVar[str] = "block_coverage"

    def __post_init__(self) -> None:
        object.__setattr__(self, "coverage", check_fraction("BlockCoverage", "coverage", self.coverage))
        check_positive_int("BlockCoverage", "stride", self.stride)
        if self.stride not in STRIDES:
            raise ValueError(f"BlockCoverage.stride must be a power of two that divides 64, got stride={self.stride}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "coverage": self.coverage, "stride": self.stride}

    def scaled(self, factor: float) -> "BlockCoverage":
        """The budget is a share of each row's mass: it follows the prompt by itself."""
        return self

    def label(self) -> str:
        """The budget in a few characters, for tables and plots: ``coverage/s<stride>``."""
        return f"{self.coverage:g}/s{self.stride}"


def antidiagonal_groups(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """[..., seq, dim] -> [..., n_blocks * 64 / stride, stride, dim], zero-padded to whole 64-blocks.

    Group ``a`` holds tokens ``a*S .. a*S + S-1`` in order, or reversed for keys, so that step ``t``
    of a query group meets step ``t`` of a key group along an antidiagonal.
    """
    seq, dim = x.shape[-2:]
    padded = n_blocks(seq) * BLOCK
    x = torch.nn.functional.pad(x, (0, 0, 0, padded - seq))
    grouped = x.reshape(*x.shape[:-2], padded // stride, stride, dim)
    return grouped.flip(-2) if reverse else grouped


def tile_mass(q: torch.Tensor, k: torch.Tensor, stride: int, scale: float, chunk_groups: int = 512,
              first_block: int = 0) -> torch.Tensor:
    """Estimated attention mass of every (query block, key block) tile, in PyTorch.

    Parameters
    ----------
    q : [heads, q_len, head_dim]
        The queries of query blocks ``first_block ..`` (positions ``64 * first_block`` on), one query
        head per row of the first dimension.
    k : [heads, kv_len, head_dim]
        Every key, the query head's KV head per row (GQA: the caller indexes K).
    stride : int
        Tokens per antidiagonal group; a power of two that divides 64.
    scale : float
        The attention's softmax scale.
    first_block : int
        The query block of ``q``'s first row (0 for a whole prompt).

    Returns
    -------
    float32 (float64 for float64 inputs) [heads, n_rows, n_blocks]
        Entry ``[h, r, c]`` for query block ``m = first_block + r``: the sum, over the query groups
        of block ``m`` that hold a real query, of their estimated mass on the key groups of block
        ``c`` (0 for ``c > m``): the mean of two softmaxes over a query group's causal key groups
        ``b <= a``, one of the mean logit along the antidiagonal,
        ``scale / S * sum_t q[a*S+t] . k[b*S+S-1-t]``, one of the largest,
        ``scale * max_t q[a*S+t] . k[b*S+S-1-t]``.
    """
    dtype = float_dtype(q)
    heads, kv_len, _ = k.shape
    nb = n_blocks(kv_len)
    per_block = BLOCK // stride
    q_groups = antidiagonal_groups(q.to(dtype), stride, reverse=False)  # [heads, groups, stride, dim]
    k_groups = antidiagonal_groups(k.to(dtype), stride, reverse=True)
    n_rows = nb - first_block
    q_groups = q_groups[:, : n_rows * per_block]
    first_group = first_block * per_block
    mass = torch.zeros(heads, n_rows, nb, dtype=dtype, device=q.device)
    key_groups = torch.arange(k_groups.shape[1], device=q.device)
    chunk_groups = max(per_block, chunk_groups // per_block * per_block)  # whole query blocks per chunk
    for head in range(heads):  # one head's [stride, rows, groups] logits at a time
        for start in range(0, n_rows * per_block, chunk_groups):
            rows = torch.arange(start, min(start + chunk_groups, n_rows * per_block), device=q.device)
            logits = torch.einsum("atd,btd->tab", q_groups[head, rows], k_groups[head]) * scale  # [S, rows, groups]
            future = key_groups[None, :] > (first_group + rows)[:, None]
            mean = logits.mean(dim=0).masked_fill(future, float("-inf"))
            peak = logits.amax(dim=0).masked_fill(future, float("-inf"))
            probs = (mean.softmax(dim=-1) + peak.softmax(dim=-1)) / 2
            probs = probs * ((first_group + rows) * stride < kv_len)[:, None]  # groups of padding only hold no query: 0
            per_tile = probs.view(len(rows), nb, per_block).sum(dim=2)
            first = start // per_block
            mass[head, first : first + len(rows) // per_block] = per_tile.view(-1, per_block, nb).sum(dim=1)
    return mass


def coverage_threshold(mass: torch.Tensor, coverage: torch.Tensor, first_block: int = 0) -> torch.Tensor:
    """Each query block's threshold: the free blocks whose mass is at or above it are kept.

    Parameters
    ----------
    mass : float [heads, n_rows, n_blocks]
        Estimated mass per tile, row ``r`` for query block ``first_block + r`` (entries above the
        diagonal are ignored).
    coverage : float [heads]
        Each head's share of a row's mass to keep, in (0, 1].

    Returns
    -------
    float [heads, n_rows]: the largest ``t`` such that the forced blocks (block 0 and the
    diagonal) plus the free blocks ``0 < c < m`` with ``mass >= t`` hold at least ``coverage`` of
    the row's total; ``inf`` when the forced blocks alone do; 0 (every free block) when rounding
    leaves the target out of reach. Otherwise it is one of the row's free masses.
    """
    n_rows, nb = mass.shape[1:]
    m = first_block + torch.arange(n_rows, device=mass.device)
    c = torch.arange(nb, device=mass.device)
    free = (c[None, :] > 0) & (c[None, :] < m[:, None])  # [query block, key block]
    causal = c[None, :] <= m[:, None]
    total = (mass * causal).sum(dim=2)
    needed = coverage.to(mass.dtype)[:, None] * total - (mass * (causal & ~free)).sum(dim=2)  # [heads, n_rows]
    ranked = torch.where(free, mass, float("-inf")).sort(dim=2, descending=True).values
    reached = torch.where(ranked > float("-inf"), ranked, 0.0).cumsum(dim=2) >= needed[:, :, None]
    # The first rank whose running sum reaches what the row needs sets the threshold.
    first = torch.where(reached.any(dim=2), reached.to(torch.int8).argmax(dim=2), nb - 1)
    threshold = ranked.gather(2, first[:, :, None])[:, :, 0].clamp(min=0.0)
    return torch.where(needed <= 0, float("inf"), threshold)


def blocks_at_threshold(mass: torch.Tensor, threshold: torch.Tensor, first_block: int = 0) -> torch.Tensor:
    """Kept key blocks [heads, n_rows, max_kept], ascending, padded with -1: block 0, the diagonal,
    and the free blocks whose mass is at least the row's ``threshold`` [heads, n_rows]; row ``r``
    is query block ``first_block + r``."""
    n_rows, nb = mass.shape[1:]
    m = first_block + torch.arange(n_rows, device=mass.device)
    c = torch.arange(nb, device=mass.device)
    causal = c[None, :] <= m[:, None]
    forced = (c[None, :] == 0) | (c[None, :] == m[:, None])
    keep = causal & (forced | (mass >= threshold[:, :, None]))
    max_kept = int(keep.sum(dim=2).max()) if n_rows else 1
    ranked = torch.where(keep, c, nb).sort(dim=2).values[:, :, :max_kept]
    return torch.where(ranked == nb, -1, ranked)


def estimate(q: torch.Tensor, k: torch.Tensor, heads: list[int], patterns: list[BlockCoverage], scale: float) -> list[BlockSparseIndex]:
    """Every Block-Coverage head of a layer (docs/semantics.md); a chunk's whole query blocks as in a
    whole prompt, a partial first one with every causal key block."""
    batch, q_heads, _, _ = q.shape
    kv_len = k.shape[2]
    group = q_heads // k.shape[1]
    q_start = query_start(q, k)
    first_block, whole = q_start // BLOCK, -(-q_start // BLOCK)
    q_whole = q[:, :, whole * BLOCK - q_start :]  # the chunk's whole query blocks
    n_rows = n_blocks(kv_len) - whole
    indices: list[BlockSparseIndex | None] = [None] * len(heads)
    for stride in sorted({p.stride for p in patterns}):
        same_stride = [j for j, p in enumerate(patterns) if p.stride == stride]
        step = len(same_stride)
        if on_triton(q) and n_rows:
            # The GPU pass holds two floats per (query group, key block) and head: up to 2 GiB of
            # them at a time (all 9 heads of SmolLM2 at 128K; one head at a time at 1M tokens), in
            # even shares (8 heads then 1 left the GPU idle through the second launch).
            per_head = 8 * batch * (n_rows * BLOCK // stride) * n_blocks(kv_len)
            shares = -(-len(same_stride) // max(1, 2**31 // per_head))
            step = -(-len(same_stride) // shares)
        for first in range(0, len(same_stride), step):
            mine = same_stride[first : first + step]
            ids = device_values([heads[j] for j in mine], q.device)
            coverage = device_values([patterns[j].coverage for j in mine] * batch, q.device, float_dtype(q))
            if not n_rows:  # a chunk inside one query block: only its partial block
                lists = packed_lists(torch.empty(batch, len(mine), 0, 1, dtype=torch.int32, device=q.device))
            elif on_triton(q):
                from ..kernels.coverage import antidiagonal_tile_mass, coverage_block_lists  # lazy: no Triton on import

                mass = antidiagonal_tile_mass(q_whole, k, ids, stride, scale, whole)
                blocks, start, count = coverage_block_lists(mass, coverage, whole)
                del mass  # 1 GiB per head at 1M tokens: free it before the next share's
                lists = blocks, start.view(batch, len(mine), n_rows), count.view(batch, len(mine), n_rows)
            else:
                mass = tile_mass(q_whole[:, ids].flatten(0, 1), k[:, ids // group].flatten(0, 1), stride, scale,
                                 first_block=whole)
                table = blocks_at_threshold(mass, coverage_threshold(mass, coverage, whole), whole)
                lists = packed_lists(table.view(batch, len(mine), *table.shape[1:]))
            for j, index in zip(mine, split_heads(*with_partial_block(*lists, q_start), first_block)):
                indices[j] = index
    return indices  # type: ignore[return-value]
