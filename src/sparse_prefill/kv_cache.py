"""KV-cache compression after prefill, as transformers ``Cache`` classes: SnapKV, PyramidKV, StreamingLLM.

Sparse prefill makes the first token fast, but the KV cache of a long prompt stays as long as the
prompt. These caches let the prefill attend to the whole context (sparsely or densely), then keep
only part of each layer's keys and values for decoding:

- :class:`SnapKVCache` (Li et al., 2024): per KV head, score every position before the last
  ``window`` by the attention the last ``window`` queries give it, smooth the scores with an
  average pool (kernel 5), keep the ``capacity - window`` best positions plus the window.
- :class:`PyramidKVCache` (Cai et al., 2024): SnapKV with a capacity that shrinks with depth
  (:func:`pyramid_capacities`), the same total over the layers.
- :class:`StreamingLLMCache` (Xiao et al., 2023): the first ``sink`` and the last
  ``capacity - sink`` positions.

Compression happens once per layer, right after that layer's prefill attention, so a layer's full
K/V is freed before the next layer runs. Decoding then appends to the compressed cache; nothing
more is evicted. A prompt no longer than a layer's capacity is kept whole.

How the scores reach the cache: the prefill's queries exist only inside the attention function,
and transformers does not hand the cache to it. So the link runs through the integration, one way:
:func:`sparse_prefill.enable` puts a forward pre-hook on every attention layer that notes the
compressing cache the layer is called with; sparse_prefill's attention function
(``integrations/transformers.py``), after the layer's prefill attention, asks that cache for the
layer waiting for scores (:meth:`pending_layer`), computes them with :func:`window_attention_scores`
(the attention the last ``window`` queries give each key: the statistic Vertical-Slash's estimator
computes from its last queries; the fused Triton pass on the GPU) and hands them to the layer's
``compress``. This module never calls into the attention. A model must therefore run with
sparse_prefill's attention (:func:`sparse_prefill.enable`; for a dense prefill,
``enable(model, preset="dense")``: exact attention through transformers' SDPA, every call).
StreamingLLM needs no scores and also works without it: it then compresses at the first decoding
step.

Positions: after compression a layer holds fewer keys than tokens were seen. ``get_seq_length``
reports the tokens seen, so the next token's position (RoPE) is right; ``get_mask_sizes`` reports
the keys held and shifts them so the causal mask of later tokens is right.

Limits: the prompt must be prefilled in one forward call (the first call is the one compressed; a
prompt fed in chunks would be compressed after its first chunk, and later chunks appended whole);
batches must be unpadded (every row keeps the same number of positions); models with
sliding-window layers are refused; a PyramidKV cache takes one token per step after compression
(its layers hold different lengths, and transformers builds one mask for all layers).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

import transformers
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .kinds.vertical_slash import last_query_statistics

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover - depends on the installed version
    raise ImportError(
        "sparse_prefill.kv_cache needs transformers >= 5 (its layered Cache API with get_mask_sizes(query_length)), "
        f"found transformers {transformers.__version__}"
    )

__all__ = [
    "METHODS",
    "DEFAULT_CAPACITY",
    "DEFAULT_WINDOW",
    "DEFAULT_SINK",
    "POOL_KERNEL",
    "PYRAMID_BETA",
    "SnapKVCache",
    "PyramidKVCache",
    "StreamingLLMCache",
    "make_kv_cache",
    "check_kv_options",
    "compresses",
    "cache_stats",
    "window_attention_scores",
    "snapkv_positions",
    "streaming_positions",
    "pyramid_capacities",
]

METHODS = ("full", "snapkv", "pyramidkv", "streamingllm")
DEFAULT_CAPACITY = 1024  # tokens kept per layer (PyramidKV: on average over the layers)
DEFAULT_WINDOW = 32  # SnapKV's observation window: the queries that vote, and the positions always kept
POOL_KERNEL = 5  # SnapKV's average-pool width: keeps a chosen token's neighbours, which carry its context
DEFAULT_SINK = 4  # StreamingLLM's attention sinks
PYRAMID_BETA = 20  # PyramidKV: the top layer keeps 1/beta of the mean budget


# --- which positions each method keeps -------------------------------------------------------------


def window_attention_scores(query: torch.Tensor, key: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Attention each key gets from the last ``window`` queries: column sums of their causal softmax.

    Parameters
    ----------
    query : Tensor [batch, q_heads, seq, head_dim]
    key : Tensor [batch, kv_heads, seq, head_dim]   (GQA: never repeated)
    window : int
        Number of last queries that vote (clamped to ``seq``).
    scale : float
        The attention's softmax scale.

    Returns
    -------
    Tensor [batch, q_heads, seq], float32 (float64 for float64 input). Row sums of the softmax are
    1, so every query head's scores sum to ``min(window, seq)``. Computed by Vertical-Slash's
    estimator statistics (:func:`sparse_prefill.kinds.vertical_slash.last_query_statistics`).
    """
    batch, q_heads, seq, _ = query.shape
    heads = list(range(q_heads))
    stats = last_query_statistics(query, key, heads, [window] * q_heads, scale)
    return stats.column_scores.view(batch, q_heads, seq)


def snapkv_positions(kv_scores: torch.Tensor, capacity: int, window: int, kernel: int = POOL_KERNEL) -> torch.Tensor:
    """SnapKV's choice, per batch element and KV head: ascending positions, ``min(capacity, seq)`` of them.

    Parameters
    ----------
    kv_scores : Tensor [batch, kv_heads, seq]
        Each key's attention from the observation window, summed over the KV head's query heads
        (:func:`window_attention_scores` summed over each group).
    capacity, window : int
        Positions kept, and how many of them are the window (the last ``window`` positions).
    kernel : int
        Odd width of the average pool over the prefix scores (1: no pooling). The pool pads with
        zeros and counts them, so the first and last ``kernel // 2`` prefix positions average over
        fewer real scores.

    Returns
    -------
    LongTensor [batch, kv_heads, min(capacity, seq)]: the ``capacity - window`` prefix positions
    (``< seq - window``) of highest pooled score, then ``seq - window .. seq - 1``, sorted.
    """
    batch, kv_heads, seq = kv_scores.shape
    device = kv_scores.device
    if seq <= capacity:
        return torch.arange(seq, device=device).expand(batch, kv_heads, seq)
    prefix = seq - window
    pooled = F.avg_pool1d(kv_scores[..., :prefix].reshape(batch * kv_heads, 1, prefix).float(), kernel,
                          stride=1, padding=kernel // 2).view(batch, kv_heads, prefix)
    chosen = pooled.topk(capacity - window, dim=-1).indices
    recent = torch.arange(prefix, seq, device=device).expand(batch, kv_heads, window)
    return torch.cat([chosen.sort(dim=-1).values, recent], dim=-1)


def streaming_positions(seq: int, capacity: int, sink: int = DEFAULT_SINK, device=None) -> torch.Tensor:
    """StreamingLLM's choice: ``0 .. sink - 1`` and the last ``capacity - sink`` positions (all if ``seq <= capacity``)."""
    if seq <= capacity:
        return torch.arange(seq, device=device)
    return torch.cat([torch.arange(sink, device=device), torch.arange(seq - (capacity - sink), seq, device=device)])


def pyramid_capacities(capacity: int, num_layers: int, window: int = DEFAULT_WINDOW, beta: int = PYRAMID_BETA) -> list[int]:
    """PyramidKV's per-layer capacities: linear in depth, from about twice the mean budget down to 1/beta of it.

    The budget beyond the window, ``B = capacity - window``, is split as ``B_top = B / beta`` for the
    last layer and ``B_bottom = 2 B - B_top`` for the first, linearly in between, rounded to whole
    tokens; every layer also keeps the window. The mean over the layers is ``capacity`` (to within
    rounding), so a PyramidKV cache holds as many tokens as a SnapKV cache of the same capacity.
    One layer gets ``capacity``.
    """
    _check_capacity(capacity, window, "window")
    _check_positive(num_layers, "num_layers")
    _check_positive(beta, "beta")
    budget = capacity - window
    if num_layers == 1:
        return [capacity]
    top = budget / beta
    bottom = 2 * budget - top
    return [window + round(bottom - (bottom - top) * layer / (num_layers - 1)) for layer in range(num_layers)]


# --- the cache ---------------------------------------------------------------------------------------

class _CompressingLayer(DynamicLayer):
    """One layer's cache: holds the whole prompt until its prefill attention has run, then a subset of it.

    ``window`` is how many last queries the selection needs scores from (0: none).
    """

    is_croppable = False  # the positions held are not a prefix of the sequence
    window = 0

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.seen = 0  # tokens this layer has been given, compressed or not
        self.pending = False  # holds a prompt longer than capacity, not yet compressed
        self.kept: torch.Tensor | None = None  # long [batch, kv_heads, n]: prompt positions kept, after compression

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.seen == 0:
            # Prefill: hold the prompt as given (no copy); the attention runs on all of it.
            self.keys, self.values = key_states, value_states
            self.seen = key_states.shape[-2]
            self.pending = self.seen > self.capacity
            return self.keys, self.values
        if key_states.shape[-2] > 1:  # more than one token after the prompt: a continuation, or a reused cache
            self._check_continues(key_states.shape[-2], kwargs)
        if self.pending:  # the prefill's attention never called back: compress now if no scores are needed
            if self.window:
                raise RuntimeError(
                    f"{type(self).__name__} needs the prefill's attention scores, which only sparse_prefill's attention "
                    "function provides: call sparse_prefill.enable(model) before the prefill (for a dense prefill, "
                    "sparse_prefill.enable(model, preset='dense'))"
                )
            self.compress(None)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def _check_continues(self, n_tokens: int, kwargs: dict) -> None:
        """Refuse tokens whose positions do not follow the ``seen`` ones: a cache reused for a second prompt.

        ``generate`` called again with a cache that already holds a prompt and its answer passes the
        prompt's tail at positions the cache has already seen (transformers slices the input by
        ``get_seq_length()``); appended, they would silently give a wrong answer. The positions come
        from the attention kwargs transformers' models hand to ``Cache.update`` (``kwargs=...``); a
        direct ``model(ids, past_key_values=cache)`` has none there and always continues. Checked only
        for multi-token updates: decoding steps stay free of a host sync.
        """
        attention_kwargs = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
        positions = attention_kwargs.get("position_ids")
        if not isinstance(positions, torch.Tensor) or positions.numel() == 0:
            return
        first = int(positions[..., 0].max())  # [batch, n] (or [3, batch, n]): an unpadded row starts at seen
        if first != self.seen:
            raise ValueError(
                f"this compressing KV cache has already seen {self.seen} tokens, but {n_tokens} new ones "
                f"start at position {first}: a compressing cache holds one prompt and its continuation. Reusing a "
                "cache for a second generate() call gives wrong answers; make a new one with make_kv_cache() for "
                "each prompt"
            )

    def select(self, scores: torch.Tensor | None) -> torch.Tensor:
        """Positions to keep, long [batch, kv_heads, n] ascending, from [batch, q_heads, seq] scores (or None)."""
        raise NotImplementedError

    def compress(self, scores: torch.Tensor | None) -> None:
        """Keep only the selected positions of the prompt. ``scores``: [batch, q_heads, seq] window scores, or None."""
        kept = self.select(scores).to(self.keys.device)
        index = kept[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, index)
        self.values = self.values.gather(2, index)
        self.kept = kept
        self.pending = False

    def get_seq_length(self) -> int:
        # Tokens seen, not keys held: transformers derives the next token's position from this.
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Keys held plus the new ones, numbered so that the new ones sit at their true positions:
        # the causal mask then lets each new token see every kept key and the new tokens before it.
        held = self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0
        return held + query_length, self.seen - held

    def reset(self) -> None:
        super().reset()
        self.seen, self.pending, self.kept = 0, False, None


class _SnapKVLayer(_CompressingLayer):
    def __init__(self, capacity: int, window: int, kernel: int):
        super().__init__(capacity)
        self.window, self.kernel = window, kernel

    def select(self, scores: torch.Tensor | None) -> torch.Tensor:
        batch, kv_heads, seq, _ = self.keys.shape
        kv_scores = scores.view(batch, kv_heads, -1, seq).sum(dim=2)  # a KV head's query heads vote together
        return snapkv_positions(kv_scores, self.capacity, self.window, self.kernel)


class _StreamingLayer(_CompressingLayer):
    def __init__(self, capacity: int, sink: int):
        super().__init__(capacity)
        self.sink = sink

    def select(self, scores: torch.Tensor | None) -> torch.Tensor:
        batch, kv_heads, seq, _ = self.keys.shape
        kept = streaming_positions(seq, self.capacity, self.sink, device=self.keys.device)
        return kept.expand(batch, kv_heads, -1)


class _CompressingCache(DynamicCache):
    """A DynamicCache (transformers' generate treats it as one) whose layers compress after prefill."""

    method = ""

    def __init__(self, layers: list[_CompressingLayer]):
        # Cache's own constructor: DynamicCache's would build plain DynamicLayers.
        Cache.__init__(self, layers=layers)

    def pending_layer(self, layer_idx: int) -> "_CompressingLayer | None":
        """The layer ``layer_idx`` if it holds a prompt longer than its capacity, waiting to be compressed.

        Its ``window`` says how many last queries its ``compress(scores)`` needs scores from (0: call
        ``compress(None)``). Asked by sparse_prefill's attention function after each layer's attention.
        """
        layer = self.layers[layer_idx] if 0 <= layer_idx < len(self.layers) else None
        return layer if layer is not None and layer.pending else None

    @property
    def kept_positions(self) -> list[torch.Tensor | None]:
        """Per layer: long [batch, kv_heads, n] prompt positions kept, or None if the layer kept the whole prompt."""
        return [layer.kept for layer in self.layers]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, capacity={[layer.capacity for layer in self.layers][:4]}...)"


class SnapKVCache(_CompressingCache):
    """SnapKV: per KV head, the prompt positions the last ``window`` queries attend to most, plus the window.

    Parameters
    ----------
    capacity : int
        Prompt positions kept per layer and KV head (>= ``window``); a shorter prompt is kept whole.
    num_layers : int
        The model's decoder layers (``config.num_hidden_layers``).
    window : int
        Observation window (default 32): its queries score the earlier positions, and it is always kept.
    kernel : int
        Odd width of the average pool over the scores (default 5).
    """

    method = "snapkv"

    def __init__(self, capacity: int = DEFAULT_CAPACITY, num_layers: int = 1, *, window: int = DEFAULT_WINDOW,
                 kernel: int = POOL_KERNEL):
        _check_positive(num_layers, "num_layers")
        _check_capacity(capacity, window, "window")
        _check_kernel(kernel)
        super().__init__([_SnapKVLayer(capacity, window, kernel) for _ in range(num_layers)])
        self.capacity, self.window, self.kernel = capacity, window, kernel


class PyramidKVCache(_CompressingCache):
    """PyramidKV: SnapKV's selection with a per-layer capacity from :func:`pyramid_capacities`.

    ``capacity`` is the mean over the layers; the other parameters are :class:`SnapKVCache`'s, plus
    ``beta`` (default 20): the last layer keeps ``(capacity - window) / beta`` positions beyond the window.
    """

    method = "pyramidkv"

    def __init__(self, capacity: int = DEFAULT_CAPACITY, num_layers: int = 1, *, window: int = DEFAULT_WINDOW,
                 kernel: int = POOL_KERNEL, beta: int = PYRAMID_BETA):
        _check_kernel(kernel)
        capacities = pyramid_capacities(capacity, num_layers, window, beta)
        super().__init__([_SnapKVLayer(c, window, kernel) for c in capacities])
        self.capacity, self.window, self.kernel, self.beta = capacity, window, kernel, beta

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if key_states.shape[-2] > 1 and layer.seen > 0 and any(other.kept is not None for other in self.layers):
            raise ValueError(
                f"PyramidKVCache takes one token per step after the prompt was compressed (its layers hold different "
                f"numbers of keys, and transformers builds one attention mask for all layers); got "
                f"{key_states.shape[-2]} tokens at layer {layer_idx}"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class StreamingLLMCache(_CompressingCache):
    """StreamingLLM: the first ``sink`` prompt positions and the last ``capacity - sink``.

    Parameters
    ----------
    capacity : int
        Prompt positions kept per layer (> ``sink``); a shorter prompt is kept whole.
    num_layers : int
        The model's decoder layers.
    sink : int
        Attention-sink tokens kept from the start (default 4).
    """

    method = "streamingllm"

    def __init__(self, capacity: int = DEFAULT_CAPACITY, num_layers: int = 1, *, sink: int = DEFAULT_SINK):
        _check_positive(num_layers, "num_layers")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ValueError(f"sink must be an int >= 0, got sink={sink!r}")
        _check_positive(capacity, "capacity")
        if capacity <= sink:
            raise ValueError(
                f"capacity must be larger than sink (it keeps the first sink and the last capacity - sink tokens), "
                f"got capacity={capacity}, sink={sink}"
            )
        super().__init__([_StreamingLayer(capacity, sink) for _ in range(num_layers)])
        self.capacity, self.sink = capacity, sink


_CLASSES: dict[str, Callable[..., _CompressingCache]] = {
    "snapkv": SnapKVCache, "pyramidkv": PyramidKVCache, "streamingllm": StreamingLLMCache,
}
_OPTIONS = {"full": (), "snapkv": ("window", "kernel"), "pyramidkv": ("window", "kernel", "beta"), "streamingllm": ("sink",)}


def compresses(cache: Any) -> bool:
    """Whether ``cache`` is one of this module's compressing caches (it holds one prompt, prefilled in one call)."""
    return isinstance(cache, _CompressingCache)


def check_kv_options(method: str, capacity: int | None = None, **options: Any) -> None:
    """Raise ``ValueError`` unless ``make_kv_cache(method, model, capacity, **options)`` would accept them.

    Needs no model: commands call it before loading one, so that a bad option is reported as such.
    """
    if method not in METHODS:
        raise ValueError(f"unknown KV cache method {method!r}; valid methods: {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(f"{method} takes the options {', '.join(_OPTIONS[method]) or '(none)'}; got {', '.join(unknown)}")
    if method != "full":  # the classes check capacity and options; one layer is enough to run those checks
        _CLASSES[method](DEFAULT_CAPACITY if capacity is None else capacity, 1, **options)


def make_kv_cache(method: str, model_or_config: Any, capacity: int | None = None, **options: Any) -> DynamicCache:
    """The cache for ``method`` sized for a model: pass it as ``past_key_values`` to the prefill or ``generate``.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`: ``"full"`` (transformers' DynamicCache), ``"snapkv"``,
        ``"pyramidkv"``, ``"streamingllm"``.
    model_or_config : transformers model or config
        Gives the number of layers. With a model, methods that need scores check that it runs
        sparse_prefill's attention.
    capacity : int, optional
        Tokens kept per layer (default :data:`DEFAULT_CAPACITY`); ignored for ``"full"``.
    **options
        Passed to the cache class (``window``, ``kernel``, ``beta``, ``sink``).
    """
    check_kv_options(method, capacity, **options)
    config = getattr(model_or_config, "config", model_or_config)
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not isinstance(getattr(text_config, "num_hidden_layers", None), int):
        raise TypeError(
            "make_kv_cache needs the model (or its transformers config) to size the cache per layer: model_or_config "
            f"must have config.num_hidden_layers, got {type(model_or_config).__name__}"
        )
    if method == "full":
        return DynamicCache(config=config)
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            f"KV compression supports models whose layers all use full attention; this model has layer types "
            f"{sorted(set(layer_types))}"
        )
    if method in ("snapkv", "pyramidkv") and hasattr(model_or_config, "config"):
        if config._attn_implementation != "sparse_prefill":
            raise ValueError(
                f"{method} scores the prompt with the prefill's queries, which sparse_prefill's attention hands over: call "
                f"sparse_prefill.enable(model) first (attn_implementation is {config._attn_implementation!r})"
            )
    capacity = DEFAULT_CAPACITY if capacity is None else capacity
    return _CLASSES[method](capacity, int(text_config.num_hidden_layers), **options)


def cache_stats(cache: Cache) -> dict:
    """Keys held per layer (mean over layers), tokens seen, and the bytes of all layers' K and V."""
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    held = [layer.keys.shape[-2] for layer in layers]
    return {
        "tokens_seen": cache.get_seq_length(),
        "keys_held_mean": sum(held) / len(held) if held else 0,
        "bytes": sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in layers),
    }


# --- the sparse prefill's side -------------------------------------------------------------------------


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def _check_capacity(capacity: Any, window: Any, window_name: str) -> None:
    _check_positive(window, window_name)
    _check_positive(capacity, "capacity")
    if capacity < window:
        raise ValueError(
            f"capacity must be at least the observation {window_name} (the window is always kept), "
            f"got capacity={capacity}, {window_name}={window}"
        )


def _check_kernel(kernel: Any) -> None:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd positive int (the pool is centred), got kernel={kernel!r}")
