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
- Vertical-Slash: exactly the one-process output on every row: the index is estimated once, from
  the whole prompt's last queries (on the last rank, which broadcasts them), and every rank
  keeps that index's set on its rows.

The last slice has the most keys. :func:`context_parallel_layout` balances the causal work with a
zig-zag: the prompt is cut at multiples of 64 into ``2 * world`` near-equal pieces and rank ``r``
holds pieces ``r`` and ``2 * world - 1 - r``, so every rank holds as many positions as any other
and as many causal (query, key) pairs, up to one 64-token block (docs/semantics.md, "Context
parallelism").
:func:`context_parallel_attention` takes such a layout (``layout=``) and then runs each of the
rank's two pieces as a chunk; :func:`sparse_prefill.long_prefill.context_parallel_prefill` runs a
whole model on it.

Not yet here (issue 16): passing K/V round a ring (merged with the log-sum-exp) instead of
gathering them all, and tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from .attention import attention_over_indices
from .checks import check_layer_patterns, check_scale
from .kinds import VerticalSlash, estimate_layer
from .patterns import Pattern

__all__ = ["BLOCK", "ContextParallelLayout", "attend_pieces", "context_parallel_attention", "context_parallel_layout",
           "gather_layout"]


# Piece boundaries fall on multiples of the 64-token query block of docs/semantics.md, so that every
# piece but the prompt's last starts and ends on whole blocks.
BLOCK = 64


@dataclass(frozen=True)
class ContextParallelLayout:
    """Which positions of a ``seq_len``-token prompt each of ``world`` ranks holds: a zig-zag.

    ``bounds`` cuts the prompt into ``2 * world`` pieces, piece ``c`` being positions
    ``bounds[c] .. bounds[c + 1] - 1``; rank ``r`` holds pieces ``r`` and ``2 * world - 1 - r``, in
    that order (ascending positions), and its rows are those two pieces one after the other.
    Built by :func:`context_parallel_layout`.
    """

    seq_len: int
    world: int
    bounds: tuple[int, ...]

    @property
    def n_pieces(self) -> int:
        return 2 * self.world

    def pieces(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The rank's two pieces as ``(start, end)`` positions, ascending."""
        first, second = rank, self.n_pieces - 1 - rank
        return (self.bounds[first], self.bounds[first + 1]), (self.bounds[second], self.bounds[second + 1])

    def local_pieces(self, rank: int) -> list[tuple[int, int, int]]:
        """``(start, end, row)`` per piece of the rank: its positions and the first of its local rows."""
        rows, out = 0, []
        for start, end in self.pieces(rank):
            out.append((start, end, rows))
            rows += end - start
        return out

    def local_length(self, rank: int) -> int:
        return sum(end - start for start, end in self.pieces(rank))

    def positions(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [local_length]: the positions of the rank's rows."""
        return torch.cat([torch.arange(start, end, device=device) for start, end in self.pieces(rank)])

    def owner(self, piece: int) -> tuple[int, int]:
        """``(rank, row)``: the rank holding piece ``piece`` and the local row it starts at."""
        if piece < self.world:
            return piece, 0
        rank = self.n_pieces - 1 - piece
        first_start, first_end = self.pieces(rank)[0]
        return rank, first_end - first_start

    def last_rank(self) -> int:
        """The rank holding the prompt's last position (rank 0: the last piece is its second)."""
        return self.owner(self.n_pieces - 1)[0]

    def causal_pairs(self, rank: int) -> int:
        """Causal (query, key) pairs of the rank's queries: its dense attention work."""
        # Query i meets keys 0..i: a piece [s, e) holds sum_{i=s}^{e-1} (i + 1) pairs.
        return sum((end * (end + 1) - start * (start + 1)) // 2 for start, end in self.pieces(rank))


def context_parallel_layout(seq_len: int, world: int) -> ContextParallelLayout:
    """The zig-zag layout of a ``seq_len``-token prompt over ``world`` ranks.

    The ``seq_len // 64`` whole 64-token blocks are dealt over ``2 * world`` pieces as evenly as
    possible (the first ``blocks % (2 * world)`` pieces one block more), the partial block at the
    end (``seq_len % 64`` tokens) goes to the last piece, and rank ``r`` holds pieces ``r`` and
    ``2 * world - 1 - r``. Every rank then holds ``seq_len / world`` positions to within 128, whose
    mean is the middle of the prompt up to the unevenly dealt blocks, so any per-query cost affine
    in the position (dense causal attention: ``i + 1`` keys; fixed sparse budgets and the
    non-attention work: a constant) is the same on every rank up to those blocks: the dense causal
    pairs differ by at most ``128 * seq_len`` between ranks, of ``seq_len**2 / (2 * world)`` each.

    Raises
    ------
    ValueError
        If ``world < 1`` or the prompt has fewer than ``2 * world`` whole blocks (``128 * world`` tokens).
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got world={world!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2 * world * BLOCK:
        raise ValueError(
            f"context parallelism over {world} ranks needs a prompt of at least {2 * world * BLOCK} tokens "
            f"(two {BLOCK}-token blocks per rank), got seq_len={seq_len!r}; run shorter prompts on one device"
        )
    n_pieces = 2 * world
    base, extra = divmod(seq_len // BLOCK, n_pieces)
    sizes = [BLOCK * (base + (piece < extra)) for piece in range(n_pieces)]
    sizes[-1] += seq_len % BLOCK
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return ContextParallelLayout(seq_len=seq_len, world=world, bounds=tuple(bounds))


def gather_layout(x: torch.Tensor, layout: ContextParallelLayout, group=None) -> torch.Tensor:
    """Every rank's rows of ``x``, put back in position order: the whole prompt's tensor on every rank.

    x : Tensor [batch, heads, n, dim], this rank's rows (``n = layout.local_length(rank)``), in
        the layout's order. Returns Tensor [batch, heads, layout.seq_len, dim].
    """
    lengths = [layout.local_length(rank) for rank in range(layout.world)]
    longest = max(lengths)
    padded = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[2])).contiguous()
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded, group=group)
    del padded
    pieces = []
    for piece in range(layout.n_pieces):
        rank, row = layout.owner(piece)
        size = layout.bounds[piece + 1] - layout.bounds[piece]
        pieces.append(parts[rank][:, :, row : row + size])
    return torch.cat(pieces, dim=2)


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
    layout: ContextParallelLayout | None = None,
) -> torch.Tensor:
    """Sparse causal attention of this rank's slice of the positions.

    Parameters
    ----------
    q : Tensor [batch, q_heads, n, head_dim]
        This rank's queries: positions ``start .. start + n - 1``, where ``start`` is the total length
        of the lower ranks' slices; or, with ``layout``, the positions ``layout.positions(rank)``.
    k, v : Tensor [batch, kv_heads, n, head_dim]
        This rank's keys and values, the same positions.
    patterns, scale
        As :func:`sparse_prefill.sparse_attention`.
    group : ProcessGroup, optional
        The ranks sharing the prompt (default: the whole world).
    layout : ContextParallelLayout, optional
        The zig-zag of :func:`context_parallel_layout` (balanced causal work); each of the rank's two
        pieces is then a chunk over the keys up to its end. Default: contiguous slices in rank order.

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
    if layout is not None:
        _check_layout(layout, q.shape[2], rank, dist.get_world_size(group))
        keys, values = gather_layout(k, layout, group), gather_layout(v, layout, group)
        last_piece = layout.bounds[-1] - layout.bounds[-2]
        return attend_pieces(q, keys, values, patterns, scale, layout.local_pieces(rank), layout.last_rank(), last_piece,
                             group)
    sizes = torch.tensor([q.shape[2]], device=q.device)
    gathered = [torch.empty_like(sizes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, sizes, group=group)
    lengths = [int(n) for n in gathered]
    if min(lengths) < 1:
        raise ValueError(f"every rank must hold at least one position, got slice lengths {lengths}")
    end = sum(lengths[: rank + 1])
    keys = _gather_positions(k, lengths, group)  # the whole prompt's: Vertical-Slash's estimate reads them all
    values = _gather_positions(v, lengths, group)
    return attend_pieces(q, keys, values, patterns, scale, [(end - q.shape[2], end, 0)], len(lengths) - 1, lengths[-1],
                         group)


def attend_pieces(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    scale: float | None,
    pieces: Sequence[tuple[int, int, int]],
    last_rank: int,
    last_piece: int,
    group=None,
) -> torch.Tensor:
    """This rank's rows of one layer's sparse attention, given the keys and values of the whole prompt.

    q : [batch, q_heads, n, head_dim], the rank's rows; ``pieces``: ``(start, end, row)`` per run of
    consecutive positions ``start .. end - 1`` held at local rows ``row ..``; keys, values :
    [batch, kv_heads, seq, head_dim], every position of the prompt; ``last_rank`` holds the prompt's
    last ``last_piece`` positions as its last rows. Every rank of ``group`` calls this once per
    layer, with the same patterns.

    Each piece is a chunk over the keys up to its end (docs/semantics.md), except that Vertical-Slash
    heads take the index of the whole prompt: ``last_rank`` broadcasts the prompt's last queries and
    every rank estimates that index from them, then keeps its set on its own rows, so the output is
    one pass's on every row. A per-piece estimate would also cost more: it spreads each piece's
    chosen diagonals over that piece's own queries, 0.68-0.77x one device's tiles per rank of two
    instead of 0.5x (random weights, 512K-1M tokens).
    """
    head_patterns = check_layer_patterns(patterns, q.shape[1])
    softmax_scale = check_scale(scale, q.shape[3])
    slash_heads = {h for h, pattern in enumerate(head_patterns) if isinstance(pattern, VerticalSlash)}
    others = set(range(len(head_patterns))) - slash_heads
    prompt: list = [None] * len(head_patterns)
    if slash_heads:
        n_last = min(max(head_patterns[h].last_q for h in slash_heads), keys.shape[2])
        if n_last > last_piece:  # the same test on every rank: all of them raise, none waits
            raise ValueError(f"Vertical-Slash's last_q={n_last} needs the prompt's last {n_last} positions on one rank, "
                             f"which holds only the last {last_piece}; use a smaller last_q or fewer ranks")
        if dist.get_rank(group) == last_rank:
            last_queries = q[:, :, q.shape[2] - n_last :].contiguous()
        else:
            last_queries = q.new_empty(q.shape[0], q.shape[1], n_last, q.shape[3])
        source = last_rank if group is None else dist.get_global_rank(group, last_rank)
        dist.broadcast(last_queries, src=source, group=group)
        prompt = estimate_layer(last_queries, keys, head_patterns, softmax_scale, heads=slash_heads)
    out = torch.empty_like(q)
    for start, end, row in pieces:
        rows = slice(row, row + end - start)
        piece_q, piece_k, piece_v = q[:, :, rows], keys[:, :, :end], values[:, :, :end]
        indices = estimate_layer(piece_q, piece_k, head_patterns, softmax_scale, heads=others) if others else prompt
        indices = [prompt[h].up_to(end) if h in slash_heads else index for h, index in enumerate(indices)]
        out[:, :, rows] = attention_over_indices(piece_q, piece_k, piece_v, indices, scale=softmax_scale)
    return out


def _check_layout(layout: ContextParallelLayout, n: int, rank: int, world: int) -> None:
    if not isinstance(layout, ContextParallelLayout):
        raise TypeError(
            f"layout must be a ContextParallelLayout (context_parallel_layout), got {type(layout).__name__}"
        )
    if layout.world != world:
        raise ValueError(f"layout is for {layout.world} ranks, but the process group has {world}")
    if n != layout.local_length(rank):
        raise ValueError(
            f"rank {rank} holds {layout.local_length(rank)} positions in the layout of {layout.seq_len} tokens, "
            f"got {n}"
        )
