"""The memory model and the fit check: what a prefill will allocate, known before it allocates.

:func:`memory_needed` adds up a prefill's buffers (:class:`PrefillMemory`) from the model's shapes
alone, and :func:`_check_fits` compares that with the free GPU memory and the host's memory, so
that a prompt that cannot fit is refused with :class:`PrefillMemoryError` naming the need, instead
of failing minutes into the prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter import _check_positive_int, _Parts, _parts
from .cache import _check_kv_dtype, _check_placement

# Tokens per chunk for everything but attention: the MLP's chunk temporaries are then
# 3 x 32768 x 14336 bf16 = 2.6 GiB at Llama-3-8B shapes, and 32K-row matrix products still run at
# full tensor-core rate.
DEFAULT_CHUNK_SIZE = 32768


class PrefillMemoryError(ValueError):
    """A prefill that cannot fit: raised before anything is allocated; the message names the need."""


@dataclass(frozen=True)
class PrefillMemory:
    """Bytes a prefill needs beyond the model's weights, by part.

    The device peak (:attr:`device`) is the residual stream, RoPE tables, cache and logits, plus one
    layer's Q/K/V and whichever is larger of the attention call's memory and a chunk's temporaries
    (they never coexist). Measured on an H100 at Llama-3-8B shapes (docs/BENCHMARKS.md), the sparse
    path's peak is 0.14 GiB below it at 1M tokens and dense attention stays below it.

    hidden : residual stream [batch, seq, hidden]
    rotary : cos and sin [seq, head_dim]
    qkv : one layer's Q, K, V [batch, heads, seq, head_dim]
    attention : what the attention call allocates: its output (Q's size), plus 1/32 of that for
        the sparse plan's index buffers (measured: 1.4% of Q at 1M tokens)
    chunk : temporaries of one chunk (the MLP's gate, up and product, and its input and output)
    kv_cache : the cache on the device (``"device"``) or one layer in flight to the host (``"offload"``)
    logits : last-position logits
    host : pinned host memory of an offloaded cache (rounded up to powers of two per tensor, as
        PyTorch's pinned-memory allocator does)
    """

    hidden: int
    rotary: int
    qkv: int
    attention: int
    chunk: int
    kv_cache: int
    logits: int
    host: int

    @property
    def device(self) -> int:
        return self.hidden + self.rotary + self.kv_cache + self.logits + self.qkv + max(self.attention, self.chunk)

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {_gib(getattr(self, name))}"
            for name in ("hidden", "qkv", "attention", "chunk", "kv_cache", "rotary")
            if getattr(self, name)
        )
        return f"{_gib(self.device)} (peak of: {parts})"


def _gib(n_bytes: int | float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def _pinned_size(n_bytes: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n_bytes))) if n_bytes else 0


def _kv_bytes_per_layer(parts: _Parts, batch: int, seq_len: int, kv_dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one of K or V, bytes of its scales) in the cache's storage dtype."""
    elements = batch * parts.kv_heads * seq_len * parts.head_dim
    scales = batch * parts.kv_heads * seq_len * parts.dtype.itemsize if kv_dtype == torch.float8_e4m3fn else 0
    return elements * kv_dtype.itemsize, scales


def memory_needed(
    model: torch.nn.Module,
    seq_len: int,
    *,
    batch: int = 1,
    cache: str | None = None,
    kv_dtype: torch.dtype | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PrefillMemory:
    """What :func:`prefill` of ``batch`` prompts of ``seq_len`` tokens will allocate, without allocating.

    Parameters are those of :func:`prefill`; ``cache`` is None, ``"device"`` or ``"offload"``.
    """
    parts = _parts(model)
    seq_len = _check_positive_int(seq_len, "seq_len")
    batch = _check_positive_int(batch, "batch")
    chunk = min(_check_positive_int(chunk_size, "chunk_size"), seq_len)
    placement = _check_placement(cache)
    kv_dtype = _check_kv_dtype(kv_dtype, parts.dtype)
    e = parts.dtype.itemsize
    q_bytes = batch * parts.q_heads * seq_len * parts.head_dim * e
    kv_bytes = batch * parts.kv_heads * seq_len * parts.head_dim * e
    rows = batch * chunk
    # The MLP's act(gate), up and their product live together; the norms' float32 temporaries and
    # the projections' RoPE temporaries are smaller at every Llama-like shape.
    chunk_bytes = rows * (3 * parts.intermediate + 2 * parts.hidden) * e
    stored, scales = _kv_bytes_per_layer(parts, batch, seq_len, kv_dtype)
    per_layer = 2 * (stored + scales)
    if placement == "device":
        cache_bytes, host = parts.n_layers * per_layer, 0
    elif placement == "offload":
        # One layer's cache stays on the device until its copy to the host is done; the host side
        # is allocated per layer and tensor.
        cache_bytes = per_layer
        host = parts.n_layers * 2 * (_pinned_size(stored) + _pinned_size(scales))
    else:
        cache_bytes, host = 0, 0
    return PrefillMemory(
        hidden=batch * seq_len * parts.hidden * e,
        rotary=2 * seq_len * parts.head_dim * e,
        qkv=q_bytes + 2 * kv_bytes,
        attention=q_bytes + q_bytes // 32,
        chunk=chunk_bytes,
        kv_cache=cache_bytes,
        logits=batch * parts.vocab * 4,
        host=host,
    )


def _host_memory() -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo, None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.strip()}
    except (OSError, ValueError, IndexError):
        return None, None
    return info.get("MemTotal"), info.get("MemAvailable")


def _device_available(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    # Memory PyTorch's allocator holds but does not use is free to this process too.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _check_fits(
    need: PrefillMemory, device: torch.device, seq_len: int, batch: int, placement: str | None, kv_dtype: torch.dtype
) -> None:
    what = f"prefill of {seq_len:,} tokens (batch {batch})"
    advice = ["fewer tokens"]
    if placement is not None:
        advice.append("cache=None (prefill only, no generation)")
        if kv_dtype != torch.float8_e4m3fn:
            advice.append("kv_dtype=torch.float8_e4m3fn (half the cache)")
    host_need = need.host
    if device.type == "cuda":
        available = _device_available(device)
        if need.device > available:
            if placement == "device":
                advice.append("cache='offload' (the cache in host memory)")
            raise PrefillMemoryError(
                f"{what} needs about {need.describe()} of GPU memory beyond the model's weights, but only "
                f"{_gib(available)} is free on {device}; try {', or '.join(advice)}"
            )
    else:
        host_need += need.device
    if host_need:
        total, _ = _host_memory()
        if total is not None and host_need > total:
            held = "the offloaded KV cache" if device.type == "cuda" else "all working buffers, on the CPU"
            raise PrefillMemoryError(
                f"{what} needs {_gib(host_need)} of host memory ({held}), but this machine has "
                f"{_gib(total)} in all; try {', or '.join(advice)}"
            )
