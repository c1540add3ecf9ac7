"""Prefill of very long prompts (up to ~1M tokens on one 80 GB GPU) through a Llama-like HF model.

A plain transformers forward over 1M tokens of a Llama-3-8B-shaped model needs far more than 80 GB:
the MLP's ``[seq, 14336]`` intermediates are 28 GiB each, RoPE makes four temporaries the size of
Q, logits over every position are ``seq x 128256`` floats, and the KV cache alone is 128 GiB in
bf16. :func:`prefill` runs the same model, with its own modules and weights, so that only what
attention needs lives at full length:

- everything but attention (norms, projections, RoPE, MLP, residual adds) runs in chunks of
  ``chunk_size`` tokens, writing into full-length Q/K/V buffers or adding into the residual
  stream in place;
- attention runs once per layer over the whole sequence, through the model's attention
  implementation (so :func:`sparse_prefill.enable` makes it sparse) or a function passed in;
- logits are computed for the last position only;
- the KV cache is not kept (``cache=None``, prefill only: the first token), kept on the GPU
  (``"device"``), or copied to pinned host memory layer by layer on a side stream while the next
  layer computes (``"offload"``); either can store FP8 (``kv_dtype=torch.float8_e4m3fn``, one
  scale per token and KV head), which halves its size.

:func:`generate` continues greedily from a kept cache (decoding is dense; an offloaded cache is
streamed back layer by layer, the next layer's copy overlapping the current layer's compute).
:func:`memory_needed` says what a prefill will take, and :func:`prefill` refuses a length that
cannot fit with a :class:`PrefillMemoryError` naming the memory needed, before allocating anything.
A CUDA out-of-memory error in the middle of a prefill frees everything the prefill allocated
before it is raised again, so the process can go on.

"Llama-like" means: decoder layers made of exactly ``input_layernorm``, ``self_attn``,
``post_attention_layernorm`` and ``mlp``; attention with separate ``q_proj``/``k_proj``/
``v_proj``/``o_proj`` (optionally Qwen3's ``q_norm``/``k_norm``), full rotate-half RoPE from the
model's ``rotary_emb``, no sliding window shorter than the prompt. Llama, Mistral (without a
window), Qwen2 and Qwen3 qualify; anything else is refused with the reason.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "KVCache",
    "PrefillMemory",
    "PrefillMemoryError",
    "PrefillResult",
    "decode_step",
    "generate",
    "memory_needed",
    "prefill",
    "sdpa_attention",
]

# Tokens per chunk for everything but attention: the MLP's chunk temporaries are then
# 3 x 32768 x 14336 bf16 = 2.6 GiB at Llama-3-8B shapes, and 32K-row matrix products still run at
# full tensor-core rate.
DEFAULT_CHUNK_SIZE = 32768

FP8_MAX = 448.0  # largest finite float8_e4m3fn
PLACEMENTS = ("device", "offload")
_LAYER_PARTS = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_OPTIONAL_ATTENTION_PARTS = {"q_norm", "k_norm"}


class PrefillMemoryError(ValueError):
    """A prefill that cannot fit: raised before anything is allocated; the message names the need."""


# ----------------------------------------------------------------------------------------------
# Model structure
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parts:
    decoder: torch.nn.Module
    head: torch.nn.Module
    layers: tuple[torch.nn.Module, ...]
    n_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype: torch.dtype
    device: torch.device


def _parts(model: torch.nn.Module) -> _Parts:
    """The modules a Llama-like causal LM is made of, or ValueError saying what does not fit."""
    name = type(model).__name__
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM (get_decoder, get_output_embeddings), got {name}")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    missing = [part for part in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, part)]
    if missing or head is None:
        raise ValueError(
            f"long prefill needs a Llama-like decoder (embed_tokens, layers, norm, rotary_emb) and an output "
            f"head; {name} lacks {missing or ['output embeddings']}"
        )
    layers = tuple(decoder.layers)
    if not layers:
        raise ValueError(f"long prefill needs at least one decoder layer; {name} has none")
    for index, layer in enumerate(layers):
        children = {child for child, _ in layer.named_children()}
        if children != _LAYER_PARTS:
            raise ValueError(
                f"long prefill supports Llama-like decoder layers made of {sorted(_LAYER_PARTS)}; "
                f"layer {index} of {name} has {sorted(children)}"
            )
        attention = {child for child, _ in layer.self_attn.named_children()}
        if not _ATTENTION_PARTS <= attention or attention - _ATTENTION_PARTS - _OPTIONAL_ATTENTION_PARTS:
            raise ValueError(
                f"long prefill needs attention with separate q_proj, k_proj, v_proj, o_proj (optionally q_norm, "
                f"k_norm); layer {index} of {name} has {sorted(attention)}"
            )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    first = layers[0].self_attn
    head_dim = int(first.head_dim)
    q_heads = first.q_proj.out_features // head_dim
    kv_heads = first.k_proj.out_features // head_dim
    weight = decoder.embed_tokens.weight
    return _Parts(
        decoder=decoder,
        head=head,
        layers=layers,
        n_layers=len(layers),
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=weight.shape[1],
        intermediate=int(getattr(config, "intermediate_size", 4 * weight.shape[1])),
        vocab=head.weight.shape[0],
        dtype=weight.dtype,
        device=weight.device,
    )


def _check_windows(parts: _Parts, seq_len: int) -> None:
    for index, layer in enumerate(parts.layers):
        attention = layer.self_attn
        # Qwen2/3 set the window on the module (None on full-attention layers); Mistral reads its config.
        if hasattr(attention, "sliding_window"):
            window = attention.sliding_window
        else:
            window = getattr(getattr(attention, "config", None), "sliding_window", None)
        if window is not None and window < seq_len:
            raise ValueError(
                f"long prefill computes full causal attention; layer {index} has a sliding window of {window} "
                f"tokens, shorter than the prompt ({seq_len}): such models are not supported"
            )


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Every layer's K/V of a prefilled batch, for decoding.

    keys, values : list of Tensor [batch, kv_heads, seq_len, head_dim], one per layer
        In the storage dtype (the model's, or float8_e4m3fn), on the model's device
        (``placement="device"``) or in pinned host memory (``"offload"``).
    key_scales, value_scales : list of Tensor [batch, kv_heads, seq_len] or None
        FP8 only: a stored value times its token's scale is the original.
    new_keys, new_values : list of Tensor [batch, kv_heads, n_new, head_dim] or None
        K/V of the tokens decoded since, on the model's device in the model's dtype.
    """

    placement: str
    dtype: torch.dtype
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_scales: list[torch.Tensor] | None
    value_scales: list[torch.Tensor] | None
    new_keys: list[torch.Tensor | None] = field(default_factory=list)
    new_values: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def prefilled(self) -> int:
        return self.keys[0].shape[2]

    @property
    def seq_len(self) -> int:
        """Tokens the cache holds: the prefill and every token decoded since."""
        new = self.new_keys[0]
        return self.prefilled + (0 if new is None else new.shape[2])

    @classmethod
    def allocate(cls, parts: _Parts, batch: int, seq_len: int, placement: str, dtype: torch.dtype) -> "KVCache":
        shape = (batch, parts.kv_heads, seq_len, parts.head_dim)
        offload = placement == "offload"
        device = torch.device("cpu") if offload else parts.device
        pin = offload and parts.device.type == "cuda"

        def empty(*size: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(size, dtype=dtype, device=device, pin_memory=pin)

        fp8 = dtype == torch.float8_e4m3fn
        n = parts.n_layers
        return cls(
            placement=placement,
            dtype=dtype,
            keys=[empty(*shape, dtype=dtype) for _ in range(n)],
            values=[empty(*shape, dtype=dtype) for _ in range(n)],
            key_scales=[empty(*shape[:3], dtype=parts.dtype) for _ in range(n)] if fp8 else None,
            value_scales=[empty(*shape[:3], dtype=parts.dtype) for _ in range(n)] if fp8 else None,
            new_keys=[None] * n,
            new_values=[None] * n,
        )

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """Write one layer's prefill K/V [batch, kv_heads, seq, head_dim] (model dtype, on the device).

        With a ``stream`` the copy runs there, after the work already queued on the current stream,
        and the caller goes on with the next layer meanwhile.
        """
        sources: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tensor, targets, scales in ((key, self.keys, self.key_scales), (value, self.values, self.value_scales)):
            if scales is None:
                sources.append((tensor, targets[layer]))
            else:
                quantized, scale = _quantize_fp8(tensor)
                sources += [(quantized, targets[layer]), (scale, scales[layer])]
        if stream is None:
            for source, target in sources:
                target.copy_(source)
            return
        stream.wait_stream(torch.cuda.current_stream(key.device))
        with torch.cuda.stream(stream):
            for source, target in sources:
                target.copy_(source, non_blocking=True)
        for source, _ in sources:
            # The allocator must not hand this memory out again before the copy has read it.
            source.record_stream(stream)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add decoded tokens' K/V [batch, kv_heads, n, head_dim]; returns all decoded tokens' K/V."""
        if self.new_keys[layer] is not None:
            key = torch.cat((self.new_keys[layer], key), dim=2)
            value = torch.cat((self.new_values[layer], value), dim=2)
        self.new_keys[layer], self.new_values[layer] = key, value
        return key, value

    def prefilled_layers(self, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's prefilled K/V on ``device`` in ``dtype``, in layer order.

        An offloaded cache is copied in on a side stream one layer ahead, so the next layer's copy
        overlaps this layer's compute.
        """
        if self.placement == "device" or device.type != "cuda":
            for layer in range(len(self.keys)):
                yield self._dequantized(layer, self._layer_tensors(layer), device, dtype)
            return
        stream = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)

        def fetch(layer: int) -> tuple[list[torch.Tensor], torch.cuda.Event]:
            with torch.cuda.stream(stream):
                tensors = [t.to(device, non_blocking=True) for t in self._layer_tensors(layer)]
                ready = torch.cuda.Event()
                ready.record(stream)
            return tensors, ready

        pending = fetch(0)
        for layer in range(len(self.keys)):
            tensors, ready = pending
            current.wait_event(ready)
            for tensor in tensors:
                tensor.record_stream(current)
            if layer + 1 < len(self.keys):
                pending = fetch(layer + 1)
            yield self._dequantized(layer, tensors, device, dtype)

    def _layer_tensors(self, layer: int) -> list[torch.Tensor]:
        tensors = [self.keys[layer], self.values[layer]]
        if self.key_scales is not None:
            tensors += [self.key_scales[layer], self.value_scales[layer]]
        return tensors

    @staticmethod
    def _dequantized(
        layer: int, tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = (t.to(device, non_blocking=True) for t in tensors[:2])
        if len(tensors) == 2:
            return key.to(dtype), value.to(dtype)
        key_scale, value_scale = (t.to(device, dtype) for t in tensors[2:])
        return key.to(dtype) * key_scale[..., None], value.to(dtype) * value_scale[..., None]


def _quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (float8_e4m3fn values, scale [...] in x's dtype), one scale per vector.

    Per token and head, because keys after RoPE have a few large channels whose size varies along
    the sequence: one scale per tensor would flush the small channels of most tokens to zero.
    """
    scale = (x.abs().amax(dim=-1) / FP8_MAX).clamp_min(torch.finfo(x.dtype).tiny)
    # Casting to float8_e4m3fn does not saturate (448 * (1 + 2**-8) becomes NaN): clamp after the
    # division, which rounds in x's dtype.
    return (x / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


# ----------------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------------


AttentionFn = Callable[..., tuple[torch.Tensor, Any]]


def sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Dense causal prefill attention with torch's SDPA, GQA without repeating K/V.

    transformers' attention-function contract: query [batch, q_heads, seq, head_dim], key/value
    [batch, kv_heads, seq, head_dim] -> ([batch, seq, q_heads, head_dim], None). The output is a
    transposed view, not a copy: at 1M tokens a contiguous copy is another 8 GiB. The SDPA backend
    is whatever torch picks, or the one a ``torch.nn.attention.sdpa_kernel`` context names.
    """
    if attention_mask is not None:
        raise ValueError("sdpa_attention computes plain causal attention and takes no attention_mask")
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2), None


def _model_attention(model: torch.nn.Module) -> AttentionFn:
    """The attention function the model is set to use; SDPA for "sdpa" and "eager" (same result)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    if name in (None, "sdpa", "eager"):
        return sdpa_attention
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"the model's attention implementation {name!r} is not registered with transformers")
    return ALL_ATTENTION_FUNCTIONS[name]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, n, head_dim], cos/sin [1, n, head_dim]; the operations of transformers' Llama."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _project_qkv(
    attention: torch.nn.Module, normed: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """normed [batch, n, hidden] -> q, k, v [batch, heads, n, head_dim], before RoPE."""
    batch, n, _ = normed.shape
    q = attention.q_proj(normed).view(batch, n, -1, head_dim)
    k = attention.k_proj(normed).view(batch, n, -1, head_dim)
    v = attention.v_proj(normed).view(batch, n, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm over head_dim before RoPE
        q, k = attention.q_norm(q), attention.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


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
    """

    logits: torch.Tensor
    cache: KVCache | None
    attention_seconds: float | None = None


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    cache: str | None = None,
    kv_dtype: torch.dtype | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attention: AttentionFn | None = None,
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
        no mask (causal). Default: the model's own implementation, so a model switched with
        :func:`sparse_prefill.enable` prefills sparse; "sdpa" and "eager" run :func:`sdpa_attention`.
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
    placement = _check_placement(cache)
    kv_dtype = _check_kv_dtype(kv_dtype, parts.dtype)
    _check_windows(parts, seq_len)
    need = memory_needed(model, seq_len, batch=batch, cache=placement, kv_dtype=kv_dtype, chunk_size=chunk_size)
    _check_fits(need, parts.device, seq_len, batch, placement, kv_dtype)
    # Only now read the ids (they may be a view of a much larger request that was just refused).
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= parts.vocab:
        raise ValueError(f"input_ids must lie in [0, {parts.vocab}), got values in [{low}, {high}]")
    attention_fn = attention if attention is not None else _model_attention(model)
    try:
        with torch.no_grad():
            return _prefill(parts, input_ids, placement, kv_dtype, chunk_size, attention_fn, profile)
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


def _prefill(
    parts: _Parts,
    input_ids: torch.Tensor,
    placement: str | None,
    kv_dtype: torch.dtype,
    chunk_size: int,
    attention_fn: AttentionFn,
    profile: bool,
) -> PrefillResult:
    batch, seq_len = input_ids.shape
    decoder, device, head_dim = parts.decoder, parts.device, parts.head_dim
    cache = KVCache.allocate(parts, batch, seq_len, placement, kv_dtype) if placement else None
    copy_stream = torch.cuda.Stream(device) if placement == "offload" and device.type == "cuda" else None
    stopwatch = _Stopwatch(device) if profile else None
    positions = torch.arange(seq_len, device=device)[None]  # [1, seq]
    cos, sin = decoder.rotary_emb(torch.empty(0, dtype=parts.dtype, device=device), positions)  # [1, seq, head_dim]
    if cos.shape[-1] != head_dim:
        raise ValueError(f"long prefill needs RoPE over the whole head ({head_dim}), got rotary dim {cos.shape[-1]}")
    del positions
    hidden = decoder.embed_tokens(input_ids)  # [batch, seq, hidden]: the residual stream, updated in place
    chunks = [(start, min(start + chunk_size, seq_len)) for start in range(0, seq_len, chunk_size)]
    for index, layer in enumerate(parts.layers):
        module = layer.self_attn
        q = hidden.new_empty(batch, parts.q_heads, seq_len, head_dim)
        k = hidden.new_empty(batch, parts.kv_heads, seq_len, head_dim)
        v = hidden.new_empty(batch, parts.kv_heads, seq_len, head_dim)
        for start, end in chunks:
            q_chunk, k_chunk, v_chunk = _project_qkv(module, layer.input_layernorm(hidden[:, start:end]), head_dim)
            q[:, :, start:end] = _rope(q_chunk, cos[:, start:end], sin[:, start:end])
            k[:, :, start:end] = _rope(k_chunk, cos[:, start:end], sin[:, start:end])
            v[:, :, start:end] = v_chunk
            del q_chunk, k_chunk, v_chunk
        with stopwatch.region() if stopwatch else _nothing():
            out, _ = attention_fn(module, q, k, v, None, scaling=module.scaling, dropout=0.0)  # [batch, seq, heads, dim]
        del q
        if cache is not None:
            cache.store(index, k, v, copy_stream)
        del k, v
        for start, end in chunks:
            hidden[:, start:end].add_(module.o_proj(out[:, start:end].reshape(batch, end - start, -1)))
        del out
        for start, end in chunks:
            residual = hidden[:, start:end]
            residual += layer.mlp(layer.post_attention_layernorm(residual))
    logits = parts.head(decoder.norm(hidden[:, -1:]))[:, 0]  # [batch, vocab]
    del hidden
    if copy_stream is not None:
        torch.cuda.current_stream(device).wait_stream(copy_stream)
    return PrefillResult(logits=logits, cache=cache, attention_seconds=stopwatch.seconds() if stopwatch else None)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def decode_step(model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence at position ``cache.seq_len``; return next-token logits [batch, vocab].

    ``tokens`` is a LongTensor [batch, 1] on the model's device; its K/V are appended to ``cache``.
    """
    with torch.no_grad():
        return _decode_step(_parts(model), cache, tokens)


def _decode_step(parts: _Parts, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    decoder, head_dim = parts.decoder, parts.head_dim
    batch = tokens.shape[0]
    hidden = decoder.embed_tokens(tokens)  # [batch, 1, hidden]
    position = torch.full((1, 1), cache.seq_len, device=parts.device)
    cos, sin = decoder.rotary_emb(hidden, position)
    prefilled = cache.prefilled_layers(parts.device, parts.dtype)
    for index, (layer, (old_k, old_v)) in enumerate(zip(parts.layers, prefilled)):
        module = layer.self_attn
        q, k, v = _project_qkv(module, layer.input_layernorm(hidden), head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        new_k, new_v = cache.append(index, k, v)
        keys, values = torch.cat((old_k, new_k), dim=2), torch.cat((old_v, new_v), dim=2)
        del old_k, old_v
        # One query attends to every cached key: no mask.
        out = F.scaled_dot_product_attention(
            q, keys, values, scale=module.scaling, enable_gqa=q.shape[1] != keys.shape[1]
        )
        del keys, values
        hidden = hidden + module.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return parts.head(decoder.norm(hidden))[:, -1]


def generate(model: torch.nn.Module, prefilled: PrefillResult, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of a prefill that kept its cache; dense attention over the cache.

    Parameters
    ----------
    model : the model :func:`prefill` ran
    prefilled : PrefillResult with a cache (``cache="device"`` or ``"offload"``); its cache grows
    max_new_tokens : int
        Tokens to produce; the first is the argmax of the prefill's logits.

    Returns
    -------
    LongTensor [batch, max_new_tokens]
    """
    parts = _parts(model)
    max_new_tokens = _check_positive_int(max_new_tokens, "max_new_tokens")
    if not isinstance(prefilled, PrefillResult) or prefilled.cache is None:
        raise ValueError("generate needs the result of prefill(..., cache='device' or 'offload'); this one kept no cache")
    tokens = [prefilled.logits.argmax(dim=-1)]  # [batch] each
    with torch.no_grad():
        for _ in range(max_new_tokens - 1):
            logits = _decode_step(parts, prefilled.cache, tokens[-1][:, None])
            tokens.append(logits.argmax(dim=-1))
    return torch.stack(tokens, dim=1)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


def _check_placement(cache: Any) -> str | None:
    if cache is not None and cache not in PLACEMENTS:
        raise ValueError(f"cache must be None, 'device' or 'offload', got cache={cache!r}")
    return cache


def _check_kv_dtype(kv_dtype: Any, model_dtype: torch.dtype) -> torch.dtype:
    if kv_dtype is None:
        return model_dtype
    if kv_dtype not in (model_dtype, torch.float8_e4m3fn):
        raise ValueError(
            f"kv_dtype must be None (the model's {model_dtype}), {model_dtype} or torch.float8_e4m3fn, "
            f"got kv_dtype={kv_dtype!r}"
        )
    return kv_dtype
