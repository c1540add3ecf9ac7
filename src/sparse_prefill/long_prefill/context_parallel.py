"""Context parallelism: one long prompt's prefill spread over the ranks of a ``torch.distributed`` group.

:func:`context_parallel_prefill` is :func:`.forward.prefill` with the positions split over the
ranks. Each rank runs everything but attention (embedding, norms, projections, RoPE at the true
positions, MLP, residual adds: no communication) on its own positions only, and for attention
gathers every rank's keys and values and runs its own queries as chunks over the keys before them
(docs/semantics.md, "Queries that are the last part of the keys"). The positions are dealt in a
zig-zag (:func:`sparse_prefill.distributed.context_parallel_layout`): rank ``r`` of ``W`` holds
pieces ``r`` and ``2W - 1 - r`` of ``2W`` near-equal pieces cut at multiples of 64, so that every
rank holds as many positions as the others and as much causal attention work.

A separate function rather than a ``process_group=`` argument of :func:`.forward.prefill`: it is a
collective (every rank of the group must call it, with the same prompt), it keeps no KV cache and
takes no custom attention function, and its memory and failure modes are per rank; one entry point
per contract keeps both signatures honest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..distributed import ContextParallelLayout, attend_pieces, context_parallel_layout, gather_layout
from ..patterns import Dense, Pattern
from .adapter import _check_windows, _Parts, _parts
from .attention import _DENSE_IMPLEMENTATIONS
from .forward import PrefillResult, _check_input_ids, _check_token_range, _nothing, _Stopwatch
from .layer import LayerBodies, layer_bodies, rope_tables
from .memory import DEFAULT_CHUNK_SIZE, _check_fits, _kv_bytes_per_layer, memory_needed

__all__ = ["context_parallel_prefill"]

# A layer's attention in the context-parallel forward: the patterns of its query heads, or None for
# dense attention (the model is not switched to sparse prefill, the prompt is shorter than its
# min_seq_len, or every head of the layer is Dense).
_LayerPatterns = tuple[Pattern, ...] | None


def context_parallel_prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    group: Any = None,
    cache: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fuse: bool | None = None,
    profile: bool = False,
) -> PrefillResult:
    """Prefill a long prompt with its positions split over the ranks of ``group``; the same logits on every rank.

    A collective: every rank of ``group`` calls it with the same model and the same ``input_ids``.
    Each rank runs the non-attention work of ``seq / world`` positions and, per layer, the attention
    of those queries over the keys up to them: with ``W`` ranks, rank ``r`` holds pieces ``r`` and
    ``2W - 1 - r`` of the zig-zag of :func:`sparse_prefill.distributed.context_parallel_layout`
    (64-aligned pieces), so every rank's queries are ``seq / W`` positions (to within 128) with
    mean position ``seq / 2``: each rank does ``1 / W`` of the non-attention work and ``1 / W``
    of the dense causal attention pairs (``seq**2 / (2 W)``), and of any sparse attention whose
    per-query cost is affine in the position (fixed budgets). Per layer each rank all-gathers K
    and V (it receives ``(W - 1) / W`` of them: 2 GiB per layer at 1M tokens and Llama-3-8B shapes
    in bf16, for two ranks) and then runs each of its two pieces as a chunk over the keys before
    its end.

    Attention is what the model is set to use, decided for the whole prompt as one pass would:

    - a model switched with :func:`sparse_prefill.enable`: each piece is a chunk of sparse
      attention with the layer's patterns for the whole prompt's length (dense when the prompt is
      shorter than the state's ``min_seq_len``), through
      :func:`sparse_prefill.distributed.attend_pieces`. Per docs/semantics.md every row then
      keeps what one pass over the whole prompt keeps: Dense, A-shape, Block-Sparse and
      Block-Coverage because the pieces start at multiples of 64, Vertical-Slash because its
      index is estimated once from the prompt's last ``last_q`` queries and shared by the pieces;
    - a dense model: SDPA, with the causal mask aligned to the chunk's end (lower right).

    Parameters
    ----------
    model : transformers causal LM
        Llama-like (see :mod:`sparse_prefill.long_prefill`), in eval mode, on this rank's device
        (under NCCL: ``torch.cuda.current_device()``, e.g. ``torch.cuda.set_device(local_rank)``).
        Under gloo, a CPU model.
    input_ids : LongTensor [batch, seq]
        The whole prompt, the same on every rank (checked), on the model's device; each rank reads
        only its positions. ``seq >= 128 * world`` (two 64-token blocks per rank).
    group : ProcessGroup, optional
        The ranks sharing the prompt (default: the whole world).
    cache : None
        No KV cache is kept by a context-parallel prefill (the first token's logits only); any
        other value is refused.
    chunk_size, fuse
        As :func:`sparse_prefill.long_prefill.prefill`, for the rank's positions.
    profile : bool
        Also time the attention calls and the collectives: ``PrefillResult.attention_seconds``
        and ``PrefillResult.communication_seconds`` (this rank's).

    Returns
    -------
    PrefillResult
        ``logits`` [batch, vocab] at the prompt's last position, computed on the rank holding it
        and broadcast, so every rank returns the same tensor; ``cache`` None.

    Raises
    ------
    RuntimeError
        Without an initialised process group; or on every other rank when one rank's arguments are
        refused (that rank raises its own error), so that no rank is left waiting in a collective.
    ValueError, TypeError
        Bad arguments (as :func:`~sparse_prefill.long_prefill.prefill`, plus: a cache requested,
        ``input_ids`` that differ between ranks, a prompt too short for the group).
    PrefillMemoryError
        When this rank's share cannot fit in its free GPU memory, before anything is allocated.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context_parallel_prefill needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun); on one device use long_prefill.prefill"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise RuntimeError("context_parallel_prefill was called on a process that is not a member of group")
    try:
        parts, layout, patterns, state = _check_arguments(model, input_ids, cache, chunk_size, fuse, rank, world, group)
        error = None
    # Any refusal, whatever its type, is raised only after every rank has heard of it (_agree).
    except Exception as refused:  # noqa: BLE001
        error = refused
    _agree(input_ids if error is None else None, error, rank, world, group)
    bodies = layer_bodies(parts.device.type == "cuda" if fuse is None else fuse)
    with torch.no_grad():
        return _forward(parts, input_ids, layout, rank, group, patterns, state, chunk_size, bodies, profile)


def _collective_device(group: Any) -> torch.device:
    """Where the small tensors of the argument check travel: NCCL needs them on this rank's GPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_arguments(
    model: torch.nn.Module,
    input_ids: Any,
    cache: Any,
    chunk_size: Any,
    fuse: Any,
    rank: int,
    world: int,
    group: Any,
) -> tuple[_Parts, ContextParallelLayout, list[_LayerPatterns], Any]:
    """This rank's checks, before any collective: what :func:`.forward.prefill` checks, for this rank's share.

    Returns the model's parts, the layout, each layer's attention and the enable state (or None).
    """
    if cache is not None:
        raise ValueError(
            f"a context-parallel prefill keeps no KV cache (cache=None: the first token's logits only), got "
            f"cache={cache!r}; to generate from a cache, prefill on one device with long_prefill.prefill"
        )
    parts = _parts(model)
    batch, seq_len = _check_input_ids(input_ids, parts)
    if fuse is not None and not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True, False or None (fused on a GPU), got fuse={fuse!r}")
    device = _collective_device(group)
    if device.type == "cuda" and parts.device != device:
        raise ValueError(
            f"under NCCL the model must be on this rank's current CUDA device {device} "
            f"(torch.cuda.set_device(local_rank) before loading it), got the model on {parts.device}"
        )
    _check_windows(parts, seq_len)
    layout = context_parallel_layout(seq_len, world)
    _check_fits(_rank_memory(model, parts, layout, rank, batch, chunk_size), parts.device, seq_len, batch, None,
                parts.dtype)
    patterns, state = _layer_patterns(model, parts, seq_len)
    # Only now read the ids (they may be a view of a much larger request that was just refused).
    _check_token_range(input_ids, parts)
    return parts, layout, patterns, state


def _rank_memory(model, parts: _Parts, layout: ContextParallelLayout, rank: int, batch: int, chunk_size: int):
    """A rank's device peak: :func:`memory_needed` of its positions, plus the gathered keys and values.

    While V is gathered, the whole prompt's K, every rank's V rows (padded to the longest share: one
    prompt's worth) and the whole V live together: three times one of K or V at full length.
    """
    local = memory_needed(model, layout.local_length(rank), batch=batch, chunk_size=chunk_size)
    full_kv, _ = _kv_bytes_per_layer(parts, batch, layout.seq_len, parts.dtype)
    return dataclasses.replace(local, qkv=local.qkv + 3 * full_kv)


def _agree(input_ids: torch.Tensor | None, error: Exception | None, rank: int, world: int, group: Any) -> None:
    """Every rank learns whether every rank accepted its arguments and holds the same prompt; all raise, or none.

    A rank raising alone would leave the others waiting in the first all-gather of the forward. One
    small all-gather: per rank ``[accepted, batch, seq, checksum of the ids]``.
    """
    mine = [0, -1, -1, 0]
    if error is None:
        batch, seq_len = input_ids.shape
        # Position-weighted, so that the same tokens in another order differ. A hash, not a count:
        # where the sum passes 2**63 it wraps, alike on every rank.
        weights = torch.arange(seq_len, device=input_ids.device) % 65521 + 1
        mine = [1, batch, seq_len, int((input_ids.long() * weights).sum())]
    device = _collective_device(group)
    info = torch.tensor(mine, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=group)
    rows = [[int(x) for x in row.tolist()] for row in gathered]
    refused = [r for r, row in enumerate(rows) if row[0] == 0]
    if error is not None:
        raise error
    if refused:
        raise RuntimeError(
            f"context_parallel_prefill: rank(s) {refused} of {world} refused their arguments (their errors say "
            f"why); nothing was computed"
        )
    shapes = [tuple(row[1:3]) for row in rows]
    if len(set(shapes)) > 1:
        raise ValueError(
            "every rank must pass the same input_ids [batch, seq], got "
            + ", ".join(f"rank {r}: {shape}" for r, shape in enumerate(shapes))
        )
    if len({row[3] for row in rows}) > 1:
        raise ValueError(
            f"every rank must pass the same input_ids: the shapes agree ({shapes[rank]}) but the tokens differ "
            f"between ranks"
        )


def _layer_patterns(model: torch.nn.Module, parts: _Parts, seq_len: int) -> tuple[list[_LayerPatterns], Any]:
    """Each layer's attention for the whole prompt, decided as one pass over it decides, and the enable state.

    A model switched with :func:`sparse_prefill.enable` runs sparse from its ``min_seq_len`` on,
    with the budgets its config gives the whole prompt's length (a budget that follows the length
    follows the prompt's, not a piece's); a model set to a dense implementation runs SDPA.
    """
    # transformers is imported here, not with this module: the model is a transformers model.
    from ..integrations import transformers as integration

    name = model.config._attn_implementation
    state = integration.state_of(model)
    if state is None and name == integration.ATTENTION_NAME:
        state = integration._UNATTACHED  # selected by name, never enabled: the integration's default
    if state is None:
        if name not in _DENSE_IMPLEMENTATIONS:
            raise ValueError(
                f"a context-parallel prefill runs sparse prefill's attention (sparse_prefill.enable) or dense SDPA; "
                f"the model's attention implementation is {name!r}"
            )
        return [None] * parts.n_layers, None
    if seq_len < state.shortest_sparse(torch.empty(0, device=parts.device)):
        return [None] * parts.n_layers, state
    patterns: list[_LayerPatterns] = []
    for index, layer in enumerate(parts.layers):
        layer_idx = getattr(layer.self_attn, "layer_idx", index)
        heads = tuple(state.layer_patterns(layer_idx, parts.q_heads, seq_len))
        patterns.append(None if all(isinstance(pattern, Dense) for pattern in heads) else heads)
    return patterns, state


def _dense_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Dense causal attention of ``q`` [batch, q_heads, n, dim], the last ``n`` positions of ``k``/``v``
    [batch, kv_heads, m, dim]. Returns Tensor [batch, q_heads, n, dim].
    """
    gqa = q.shape[1] != k.shape[1]
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top left (query row r sees keys 0..r); a chunk's rows are the
    # last positions of the keys, which needs it aligned bottom right. torch's CausalBias runs that on
    # FlashAttention on a GPU (its native alignment) and as a materialised mask on the CPU.
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _forward(
    parts: _Parts,
    input_ids: torch.Tensor,
    layout: ContextParallelLayout,
    rank: int,
    group: Any,
    patterns: list[_LayerPatterns],
    state: Any,
    chunk_size: int,
    bodies: LayerBodies,
    profile: bool,
) -> PrefillResult:
    batch, seq_len = input_ids.shape
    decoder, device, head_dim = parts.decoder, parts.device, parts.head_dim
    attention_watch = _Stopwatch(device) if profile else None
    communication_watch = _Stopwatch(device) if profile else None
    positions = layout.positions(rank, device)  # [n]: this rank's rows
    n = positions.numel()
    # The prompt's last position rides along: RoPE variants that rescale with the length (dynamic
    # NTK, LongRoPE) read the largest position id, which must be the whole prompt's on every rank.
    with_last = torch.cat((positions, positions.new_tensor([seq_len - 1])))[None]  # [1, n + 1]
    cos, sin = rope_tables(decoder.rotary_emb, with_last, parts.dtype, head_dim)
    cos, sin = cos[:, :n], sin[:, :n]  # [1, n, head_dim]
    hidden = decoder.embed_tokens(input_ids[:, positions])  # [batch, n, hidden]: this rank's residual stream
    del positions, with_last
    pieces = layout.local_pieces(rank)
    last, last_piece = layout.last_rank(), layout.bounds[-1] - layout.bounds[-2]
    for index, layer in enumerate(parts.layers):
        module = layer.self_attn
        q, k, v = bodies.project(layer, hidden, cos, sin, (parts.q_heads, parts.kv_heads, head_dim), chunk_size)
        with communication_watch.region() if communication_watch else _nothing():
            keys = gather_layout(k, layout, group)  # [batch, kv_heads, seq, head_dim]
            del k
            values = gather_layout(v, layout, group)
            del v
        with attention_watch.region() if attention_watch else _nothing():
            if patterns[index] is None:
                out = torch.empty_like(q)  # [batch, q_heads, n, head_dim]
                for start, end, row in pieces:
                    rows = slice(row, row + end - start)
                    out[:, :, rows] = _dense_chunk_attention(
                        q[:, :, rows], keys[:, :, :end], values[:, :, :end], module.scaling
                    )
            else:
                out = attend_pieces(q, keys, values, patterns[index], module.scaling, pieces, last, last_piece, group)
        if state is not None:
            if patterns[index] is None:
                state.dense_calls += 1
            else:
                state.sparse_calls += 1
        del q, keys, values
        attention_out = out.transpose(1, 2)  # [batch, n, q_heads, head_dim], as the one-device forward hands it on
        bodies.finish(layer, hidden, attention_out, chunk_size)
        del out, attention_out
    if rank == last:  # the prompt's last position is this rank's last row
        logits = parts.head(decoder.norm(hidden[:, -1:]))[:, 0]  # [batch, vocab]
    else:
        logits = hidden.new_empty(batch, parts.vocab, dtype=parts.head.weight.dtype)
    del hidden
    with communication_watch.region() if communication_watch else _nothing():
        source = last if group is None else dist.get_global_rank(group, last)
        dist.broadcast(logits, src=source, group=group)
    return PrefillResult(
        logits=logits,
        cache=None,
        attention_seconds=attention_watch.seconds() if attention_watch else None,
        communication_seconds=communication_watch.seconds() if communication_watch else None,
    )
