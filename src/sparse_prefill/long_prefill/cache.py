"""The KV cache a prefill keeps for decoding: on the GPU, offloaded to pinned host memory, or FP8.

:class:`KVCache` holds every layer's prefilled K/V in the placement (``"device"`` or
``"offload"``) and storage dtype (the model's or float8_e4m3fn with one scale per token and KV
head) asked for, plus the K/V of tokens decoded since. It writes a layer as the forward produces it
(an offloaded copy runs on a side stream, overlapping the next layer) and hands the layers back in
order for decoding (an offloaded layer is fetched one layer ahead).

For sparse decoding it also keeps each layer's page summaries (:meth:`KVCache.summarise`, then
extended by every :meth:`KVCache.append`), writes decoded tokens in place into room reserved
ahead (:meth:`KVCache.reserve`), and hands out only the keys of selected pages
(:meth:`KVCache.gather_pages`): from pinned host memory, only those cross PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..decoding import PageSelection, PageSummaries, page_summaries
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
    summaries : list of PageSummaries or None
        Per layer, the page summaries of all its keys (FP8 ones as dequantized), on the model's
        device; built by :meth:`summarise`, extended by :meth:`append`.
    key_buffers, value_buffers : list of Tensor [batch, kv_heads, capacity, head_dim] or None
        Per layer, storage with room for decoded tokens (:meth:`reserve`); ``new_keys`` and
        ``new_values`` are then views of it. A device cache in the model's dtype keeps its prefill
        there too (``keys`` and ``values`` become views), so a layer is one tensor for the decode
        kernel; otherwise the buffers hold the decoded tokens only.
    """

    placement: str
    dtype: torch.dtype
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_scales: list[torch.Tensor] | None
    value_scales: list[torch.Tensor] | None
    new_keys: list[torch.Tensor | None] = field(default_factory=list)
    new_values: list[torch.Tensor | None] = field(default_factory=list)
    summaries: list[PageSummaries] | None = field(default=None, repr=False)
    key_buffers: list[torch.Tensor | None] | None = field(default=None, repr=False)
    value_buffers: list[torch.Tensor | None] | None = field(default=None, repr=False)

    @property
    def prefilled(self) -> int:
        return self.keys[0].shape[2]

    @property
    def seq_len(self) -> int:
        """Tokens the cache holds: the prefill and every token decoded since."""
        return self.layer_len(0)

    def layer_len(self, layer: int) -> int:
        """Tokens one layer holds (layers ahead of the others in the middle of a decode step hold one more)."""
        new = self.new_keys[layer]
        return self.prefilled + (0 if new is None else new.shape[2])

    @property
    def _one_buffer(self) -> bool:
        """Whether reserved storage holds a layer's prefill too: a device cache in the model's dtype."""
        return self.placement == "device" and self.key_scales is None

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
        """Add decoded tokens' K/V [batch, kv_heads, n, head_dim]; returns all decoded tokens' K/V.

        Into reserved room when the layer has some (:meth:`reserve`; it grows when full), by
        concatenation otherwise; the layer's page summaries, if any, take in the new keys.
        """
        if self.key_buffers is None or self.key_buffers[layer] is None:
            for new, tensors in ((key, self.new_keys), (value, self.new_values)):
                tensors[layer] = new if tensors[layer] is None else torch.cat((tensors[layer], new), dim=2)
        else:
            start = self.layer_len(layer)
            end = start + key.shape[2]
            self._reserve_layer(layer, end, key.device, key.dtype, grow=True)
            offset = 0 if self._one_buffer else self.prefilled  # position of the buffer's first slot
            for new, buffers, tensors in (
                (key, self.key_buffers, self.new_keys),
                (value, self.value_buffers, self.new_values),
            ):
                buffers[layer][:, :, start - offset : end - offset] = new
                tensors[layer] = buffers[layer][:, :, self.prefilled - offset : end - offset]
        if self.summaries is not None:
            # Not checked for NaN: that would wait for the GPU at every layer of every step.
            self.summaries[layer].append(key, check_finite=False)
        return self.new_keys[layer], self.new_values[layer]

    def rewind(self) -> None:
        """Forget every decoded token: the cache holds its prefill alone again, as prefill left it.

        Reserved buffers stay (the next decoded tokens overwrite their slots); page summaries,
        which took in the decoded keys, are dropped and built again when sparse decoding needs them.
        """
        if self.seq_len == self.prefilled:
            return
        layers = len(self.keys)
        self.new_keys, self.new_values = [None] * layers, [None] * layers
        self.summaries = None

    def reserve(self, extra: int, device: torch.device, dtype: torch.dtype) -> None:
        """Room in every layer for ``extra`` more decoded tokens, which :meth:`append` then writes in place.

        Decoded tokens go to buffers on ``device`` in ``dtype`` (the model's). A device cache in the
        model's dtype moves its prefill into the same buffer, so that a layer's K/V are one tensor
        (:meth:`contiguous_layer`): that copies the cache once, a layer at a time (one layer's
        worth of extra memory at the peak).
        """
        for layer in range(len(self.keys)):
            self._reserve_layer(layer, self.layer_len(layer) + extra, device, dtype)

    def _reserve_layer(
        self, layer: int, length: int, device: torch.device, dtype: torch.dtype, grow: bool = False
    ) -> None:
        """Make the layer's buffers hold at least ``length`` tokens (positions from 0); with ``grow``,
        room for at least as many more as were decoded (appends one by one stay O(1) amortised)."""
        offset = 0 if self._one_buffer else self.prefilled
        current = None if self.key_buffers is None else self.key_buffers[layer]
        if current is not None and offset + current.shape[2] >= length:
            return
        if self.key_buffers is None:
            self.key_buffers, self.value_buffers = [None] * len(self.keys), [None] * len(self.keys)
        decoded = self.layer_len(layer) - self.prefilled
        if grow:
            length = max(length, self.layer_len(layer) + max(decoded, 64))
        batch, kv_heads, _, head_dim = self.keys[layer].shape
        prefill_end = self.prefilled - offset  # the decoded tokens' first slot
        for stored, buffers, tensors in (
            (self.keys, self.key_buffers, self.new_keys),
            (self.values, self.value_buffers, self.new_values),
        ):
            if self._one_buffer:
                device, dtype = stored[layer].device, stored[layer].dtype
            buffer = torch.empty(batch, kv_heads, length - offset, head_dim, device=device, dtype=dtype)
            if self._one_buffer:
                buffer[:, :, : self.prefilled] = stored[layer]
                stored[layer] = buffer[:, :, : self.prefilled]
            if tensors[layer] is not None:
                buffer[:, :, prefill_end : prefill_end + decoded] = tensors[layer]
                tensors[layer] = buffer[:, :, prefill_end : prefill_end + decoded]
            buffers[layer] = buffer

    def contiguous_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's whole K/V [batch, kv_heads, layer_len, head_dim] as views of one buffer each, or
        None when they are not stored that way (before :meth:`reserve`, FP8, offloaded)."""
        if not self._one_buffer or self.key_buffers is None or self.key_buffers[layer] is None:
            return None
        n = self.layer_len(layer)
        return self.key_buffers[layer][:, :, :n], self.value_buffers[layer][:, :, :n]

    def whole_layer(self, layer: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole K/V [batch, kv_heads, layer_len, head_dim] on ``device`` in ``dtype``, as
        dense decoding reads them (FP8 dequantized, the prefill and the decoded tokens concatenated)."""
        contiguous = self.contiguous_layer(layer)
        if contiguous is not None:
            return contiguous
        key, value = self._dequantized(self._layer_tensors(layer), device, dtype)
        if self.new_keys[layer] is None:
            return key, value
        return torch.cat((key, self.new_keys[layer]), dim=2), torch.cat((value, self.new_values[layer]), dim=2)

    def summarise(self, device: torch.device, dtype: torch.dtype, page_size: int, capacity: int) -> None:
        """Build every layer's page summaries on ``device`` from its keys as attention reads them.

        FP8 keys are summarised dequantized (their bounds then hold for the keys the attention
        multiplies); an offloaded cache streams its keys in once, a layer ahead as in
        :meth:`prefilled_layers`. ``capacity`` (tokens) is reserved so appends do not reallocate.
        """
        summaries = []
        for layer, (key,) in enumerate(self.prefilled_layers(device, dtype, values=False)):
            layer_summaries = page_summaries(key, page_size, capacity=capacity, device=device)
            del key
            if self.new_keys[layer] is not None:
                layer_summaries.append(self.new_keys[layer])
            summaries.append(layer_summaries)
        self.summaries = summaries

    def gather_pages(self, layer: int, selection: PageSelection, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V of the selected pages of one layer, in page order: [batch, kv_heads, kept, head_dim]
        on ``device`` in ``dtype``, ``kept`` = :meth:`PageSelection.kept_keys`.

        Attention over them is attention over the selected pages (the softmax ignores key order).
        Prefilled keys are gathered where they are stored and then dequantized (FP8: only the kept
        ones are converted); decoded keys come from the device. From pinned host memory the host
        gathers into pinned staging and copies asynchronously, keys first, so the values' gather
        overlaps the keys' copy; the host must first wait for the page numbers.
        """
        n_keys, page_size, prefill = selection.n_keys, selection.page_size, self.prefilled
        # Pages are ascending and the window's (possibly partial) last page is always selected: the
        # missing keys of the partial page are the last entries.
        kept = selection.n_selected * page_size - (selection.n_pages * page_size - n_keys)

        def positions(on: torch.device) -> torch.Tensor:  # [batch, kv_heads, kept], int64
            pages = selection.pages.to(on).long()
            return (pages[..., None] * page_size + torch.arange(page_size, device=on)).flatten(2)[..., :kept]

        store = self.keys[layer].device
        on_store = positions(store)
        stored_positions = on_store.clamp(max=prefill - 1)  # decoded positions are replaced below
        gathered = [_gather_tokens(tensor, stored_positions, device) for tensor in self._layer_tensors(layer)]
        key, value = self._dequantized(gathered, device, dtype)
        if n_keys == prefill:
            return key, value
        on_device = on_store if store == device else positions(device)
        decoded = (on_device - prefill).clamp_(min=0)[..., None].expand(-1, -1, -1, key.shape[-1])
        from_prefill = (on_device < prefill)[..., None]
        key = torch.where(from_prefill, key, self.new_keys[layer].gather(2, decoded))
        value = torch.where(from_prefill, value, self.new_values[layer].gather(2, decoded))
        return key, value

    def prefilled_layers(self, device: torch.device, dtype: torch.dtype, *,
                         values: bool = True) -> Iterator[tuple[torch.Tensor, ...]]:
        """Each layer's prefilled K/V (only K with ``values=False``) on ``device`` in ``dtype``, in layer order.

        An offloaded cache is copied in on a side stream one layer ahead, so the next layer's copy
        overlaps this layer's compute.
        """
        if self.placement == "device" or device.type != "cuda":
            for layer in range(len(self.keys)):
                yield self._dequantized(self._layer_tensors(layer, values), device, dtype)
            return
        stream = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)

        def fetch(layer: int) -> tuple[list[torch.Tensor], torch.cuda.Event]:
            with torch.cuda.stream(stream):
                tensors = [t.to(device, non_blocking=True) for t in self._layer_tensors(layer, values)]
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
            yield self._dequantized(tensors, device, dtype)

    def _layer_tensors(self, layer: int, values: bool = True) -> list[torch.Tensor]:
        """The layer's stored K (and V), then their FP8 scales if any, in that order."""
        tensors = [self.keys[layer], self.values[layer]] if values else [self.keys[layer]]
        if self.key_scales is not None:
            tensors += [self.key_scales[layer], self.value_scales[layer]] if values else [self.key_scales[layer]]
        return tensors

    def _dequantized(
        self, tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`_layer_tensors`' list (or rows gathered from it) -> K (and V) on ``device`` in ``dtype``."""
        if self.key_scales is None:
            return tuple(t.to(device, non_blocking=True).to(dtype) for t in tensors)
        half = len(tensors) // 2
        stored = [t.to(device, non_blocking=True) for t in tensors[:half]]
        scales = [t.to(device, dtype) for t in tensors[half:]]
        return tuple(t.to(dtype) * scale[..., None] for t, scale in zip(stored, scales))


def _gather_tokens(tensor: torch.Tensor, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``positions`` [batch, kv_heads, m] of ``tensor`` [batch, kv_heads, n] or [batch, kv_heads, n,
    head_dim], gathered where the tensor is and then moved to ``device`` (asynchronously from pinned
    memory: the staging buffer is pinned, and PyTorch's pinned allocator keeps it until the copy is done)."""
    index = positions if tensor.dim() == 3 else positions[..., None].expand(-1, -1, -1, tensor.shape[3])
    source = tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor  # gather has no float8 kernel
    pinned = source.device.type == "cpu" and device.type == "cuda" and source.is_pinned()
    staging = torch.empty(index.shape, dtype=source.dtype, device=source.device, pin_memory=pinned)
    torch.gather(source, 2, index, out=staging)
    return staging.to(device, non_blocking=pinned).view(tensor.dtype)


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
