"""Context parallelism: one prompt's positions split over the ranks of a ``torch.distributed`` group.

Rank ``r`` holds a contiguous slice of the positions, ranks in order (rank 0 the first slice), for
everything in the model; only attention needs other ranks' data: the keys and values before its
slice. :func:`context_parallel_attention` gathers them and runs the sparse attention of the rank's
queries as the last positions of those keys, which is the chunk of docs/semantics.md ("Queries
that are the last part of the keys"). So, per rank:

- Dense, A-shape: exactly the one-process output on the same rows;
- Block-Sparse, Block-Coverage: exactly the one-process output on every whole 64-query block of the
  slice (slices that start at a multiple of 64 are whole throughout); a slice's partial first block
  keeps every causal key;
- Vertical-Slash: estimated from the rank's own last queries (each rank's own index).

Not yet here (issue 16): balancing the causal work across ranks (the last slice has the most keys),
passing K/V round a ring instead of gathering them all, and the model-level forward.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .attention import sparse_attention
from .patterns import Pattern

__all__ = ["context_parallel_attention"]


def _gather_positions(x: torch.Tensor, lengths: list[int], group) -> torch.Tensor:
    """Every rank's [batch, heads, n_r, dim] slice, concatenated along positions in rank order."""
    longest = max(lengths)
    padded = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[2])).contiguous()
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:, :, :n] for part, n in zip(parts, lengths)], dim=2)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
    group=None,
) -> torch.Tensor:
    """Sparse causal attention of this rank's slice of the positions.

    Parameters
    ----------
    q : Tensor [batch, q_heads, n, head_dim]
        This rank's queries: positions ``start .. start + n - 1``, where ``start`` is the total length
        of the lower ranks' slices.
    k, v : Tensor [batch, kv_heads, n, head_dim]
        This rank's keys and values, the same positions.
    patterns, scale
        As :func:`sparse_prefill.sparse_attention`.
    group : ProcessGroup, optional
        The ranks sharing the prompt (default: the whole world).

    Returns
    -------
    Tensor [batch, q_heads, n, head_dim]: this rank's rows of the attention (docs/semantics.md).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k and v must hold this rank's same positions, got lengths {q.shape[2]}, {k.shape[2]}, "
                         f"{v.shape[2]}")
    rank = dist.get_rank(group)
    sizes = torch.tensor([q.shape[2]], device=q.device)
    gathered = [torch.empty_like(sizes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, sizes, group=group)
    lengths = [int(n) for n in gathered]
    if min(lengths) < 1:
        raise ValueError(f"every rank must hold at least one position, got slice lengths {lengths}")
    end = sum(lengths[: rank + 1])
    keys = _gather_positions(k, lengths, group)[:, :, :end]
    values = _gather_positions(v, lengths, group)[:, :, :end]
    return sparse_attention(q, keys, values, patterns, scale=scale)
