"""The KV cache a prefill keeps for decoding: on the GPU, offloaded to pinned host memory, or FP8.

:class:`KVCache` holds every layer's prefilled K/V in the placement (``"device"`` or
``"offload"``) and storage dtype (the model's or float8_e4m3fn with one scale per token and KV
head) asked for, plus the K/V of tokens decoded since. It writes a layer as the forward produces it
(an offloaded copy runs on a side stream, overlapping the next layer) and hands the layers back in
order for decoding (an offloaded layer is fetched one layer ahead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .adapter import _Parts

FP8_MAX = 448.0  # largest finite float8_e4m3fn
PLACEMENTS = ("device", "offload")


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
