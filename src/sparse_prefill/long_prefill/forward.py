"""The chunked forward: a whole prompt through the model, attention at full length, the rest in chunks.

:func:`prefill` checks its arguments and the fit before allocating anything, runs the layers
(norms, projections, RoPE, MLP and residual adds chunk by chunk, through the per-chunk bodies of
:mod:`.layer`, fused or not; one attention call per layer),
keeps the KV cache if asked, and returns the last position's logits as a :class:`PrefillResult`.
An out-of-memory error mid-prefill frees the prefill's buffers before it is raised again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Iterator

import torch

from .adapter import _check_windows, _Parts, _parts
from .attention import AttentionFn, _model_attention
from .cache import KVCache, _check_kv_dtype, _check_placement
from .layer import LayerBodies, layer_bodies, rope_tables
from .memory import DEFAULT_CHUNK_SIZE, _check_fits, memory_needed


class _Stopwatch:
    """Sums the time of marked regions: CUDA events on a GPU (no synchronisation until read)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[Any] = []

    @contextmanager
    def region(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((start, end))
        else:
            begin = perf_counter()
            yield
            self.spans.append(perf_counter() - begin)

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
        return float(sum(self.spans))


@dataclass
class PrefillResult:
    """logits : Tensor [batch, vocab] at the last position, model dtype.
    cache : KVCache or None
    attention_seconds : float or None
        Time inside the attention calls, summed over layers (``profile=True`` only).
    communication_seconds : float or None
        Time inside the collectives of a context-parallel prefill (gathering K/V, broadcasting the
        logits), summed over layers (:func:`.context_parallel.context_parallel_prefill`, ``profile=True``).
    """

    logits: torch.Tensor
    cache: KVCache | None
    attention_seconds: float | None = None
    communication_seconds: float | None = None


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    cache: str | None = None,
    kv_dtype: torch.dtype | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attention: AttentionFn | None = None,
    fuse: bool | None = None,
    profile: bool = False,
) -> PrefillResult:
    """Run a Llama-like model over a long prompt; return the last position's logits and, if asked, the cache.

    Parameters
    ----------
    model : transformers causal LM
        Llama-like (see the module docstring), in eval mode, on one device.
    input_ids : LongTensor [batch, seq]
        Unpadded prompts of equal length, on the model's device.
    cache : None, "device" or "offload"
        None keeps no KV cache (prefill only: the first token's logits); "device" keeps it where
        the model is; "offload" copies it to pinned host memory layer by layer, overlapped with the
        next layer's compute. Pinning host memory is slow the first time (about 0.6 s per GiB
        measured on an H100 machine: 48 s for a 1M-token FP8 cache); PyTorch keeps freed pinned
        memory for reuse, so later prefills of the same size no longer pay it (their TTFT equals
        that of ``cache=None``).
    kv_dtype : torch.dtype, optional
        The cache's storage dtype: the model's (default) or ``torch.float8_e4m3fn``.
    chunk_size : int
        Tokens per chunk for everything but attention.
    attention : callable, optional
        A transformers attention function (``fn(module, q, k, v, mask, scaling=..., dropout=...)``
        -> ``([batch, seq, heads, head_dim], _)``) called once per layer on the whole sequence with
        no mask (causal). Default: sparse prefill's attention on a model switched with
        :func:`sparse_prefill.enable` (with that state's patterns and ``min_seq_len``),
        :func:`sdpa_attention` on a model set to one of transformers' dense implementations
        ("sdpa", "eager", "flash_attention_2", ...); any other implementation must be passed here.
    fuse : bool, optional
        Run the per-chunk work around attention (norms, projections, RoPE, MLP, residual adds)
        compiled with ``torch.compile``, which fuses its elementwise passes (same result up to
        rounding; :mod:`sparse_prefill.long_prefill.layer`). Default: on a GPU, where those passes
        are a third of the non-attention time; not on the CPU, where compiling (C++) takes longer
        than a CPU-sized prompt. The first fused prefill in a process compiles (tens of seconds);
        later ones, of any length and with any same-shaped model, reuse the compiled code, except
        once more on a GPU for the first prompt whose buffers pass 2**31 elements (64-bit
        indexing: 512K tokens at Llama-3-8B shapes).
    profile : bool
        Also time the attention calls (CUDA events on a GPU): ``PrefillResult.attention_seconds``.

    Raises
    ------
    PrefillMemoryError
        Before allocating, when the prefill cannot fit in the free GPU memory (or the host's memory
        for an offloaded cache); the message names the memory needed.
    torch.OutOfMemoryError
        If an allocation fails anyway; everything the prefill allocated is freed first.
    """
    parts = _parts(model)
    batch, seq_len = _check_input_ids(input_ids, parts)
    placement = _check_placement(cache)
    kv_dtype = _check_kv_dtype(kv_dtype, parts.dtype)
    if fuse is not None and not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True, False or None (fused on a GPU), got fuse={fuse!r}")
    _check_windows(parts, seq_len)
    need = memory_needed(model, seq_len, batch=batch, cache=placement, kv_dtype=kv_dtype, chunk_size=chunk_size)
    _check_fits(need, parts.device, seq_len, batch, placement, kv_dtype)
    # Only now read the ids (they may be a view of a much larger request that was just refused).
    _check_token_range(input_ids, parts)
    bodies = layer_bodies(parts.device.type == "cuda" if fuse is None else fuse)
    attention_fn = attention if attention is not None else _model_attention(model)
    try:
        with torch.no_grad():
            return _prefill(parts, input_ids, placement, kv_dtype, chunk_size, attention_fn, bodies, profile)
    except torch.OutOfMemoryError as error:
        message = str(error)
    # Outside the except block the traceback, and with it every frame holding the prefill's tensors,
    # is gone: hand the memory back before raising again.
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)
        torch.cuda.empty_cache()
    raise torch.OutOfMemoryError(
        f"out of memory during the prefill of {seq_len:,} tokens (estimated need {need.describe()}); its "
        f"buffers have been freed. {message}"
    )


def _check_input_ids(input_ids: Any, parts: _Parts) -> tuple[int, int]:
    """``(batch, seq)`` of unpadded prompts on the model's device, or the error naming what is wrong."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a [batch, seq] tensor, got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids (int64 or int32), got dtype={input_ids.dtype}")
    if input_ids.device != parts.device:
        raise ValueError(f"input_ids must be on the model's device {parts.device}, got {input_ids.device}")
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"input_ids must hold at least one token, got shape {tuple(input_ids.shape)}")
    return batch, seq_len


def _check_token_range(input_ids: torch.Tensor, parts: _Parts) -> None:
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= parts.vocab:
        raise ValueError(f"input_ids must lie in [0, {parts.vocab}), got values in [{low}, {high}]")


def _prefill(
    parts: _Parts,
    input_ids: torch.Tensor,
    placement: str | None,
    kv_dtype: torch.dtype,
    chunk_size: int,
    attention_fn: AttentionFn,
    bodies: LayerBodies,
    profile: bool,
) -> PrefillResult:
    batch, seq_len = input_ids.shape
    decoder, device, head_dim = parts.decoder, parts.device, parts.head_dim
    cache = KVCache.allocate(parts, batch, seq_len, placement, kv_dtype) if placement else None
    copy_stream = torch.cuda.Stream(device) if placement == "offload" and device.type == "cuda" else None
    stopwatch = _Stopwatch(device) if profile else None
    positions = torch.arange(seq_len, device=device)[None]  # [1, seq]
    cos, sin = rope_tables(decoder.rotary_emb, positions, parts.dtype, head_dim)  # [1, seq, head_dim]
    del positions
    hidden = decoder.embed_tokens(input_ids)  # [batch, seq, hidden]: the residual stream, updated in place
    for index, layer in enumerate(parts.layers):
        module = layer.self_attn
        q, k, v = bodies.project(layer, hidden, cos, sin, (parts.q_heads, parts.kv_heads, head_dim), chunk_size)
        with stopwatch.region() if stopwatch else _nothing():
            out, _ = attention_fn(module, q, k, v, None, scaling=module.scaling, dropout=0.0)  # [batch, seq, heads, dim]
        del q
        if cache is not None:
            cache.store(index, k, v, copy_stream)
        del k, v
        # The attention output lives through the MLPs; it is no larger than the Q/K/V it outlives
        # (PrefillMemory.qkv).
        bodies.finish(layer, hidden, out, chunk_size)
        del out
    logits = parts.head(decoder.norm(hidden[:, -1:]))[:, 0]  # [batch, vocab]
    del hidden
    if copy_stream is not None:
        torch.cuda.current_stream(device).wait_stream(copy_stream)
    return PrefillResult(logits=logits, cache=cache, attention_seconds=stopwatch.seconds() if stopwatch else None)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
