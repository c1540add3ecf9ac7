"""Sparse prefill inside Hugging Face transformers models, through its public attention registry.

transformers lets a library add an attention implementation by name
(``AttentionInterface.register``) and the mask builder that goes with it
(``AttentionMaskInterface.register``); a model then selects it with
``attn_implementation="sparse_prefill"``. This module registers one function under that name. It
runs :func:`sparse_prefill.sparse_attention` on prefill calls that are long enough and hands every
other call (decoding steps, short prompts, all-dense layers, sliding-window layers) to transformers'
own SDPA attention. Nothing of transformers is patched.

Usage::

    import sparse_prefill
    model = AutoModelForCausalLM.from_pretrained(...)
    sparse_prefill.enable(model, PatternConfig.load("patterns.json"))   # or None: the default
    model.generate(...)                                                  # prefill sparse, decode dense
    sparse_prefill.disable(model)                                        # back to what it was

or, after ``sparse_prefill.register()`` (or importing this module), load with
``attn_implementation="sparse_prefill"`` and attach a config with :func:`enable` afterwards. A model
selected by name but never enabled runs the ``"default"`` preset (:mod:`sparse_prefill.presets`).

When the sparse path runs
-------------------------
All of: the call prefills at least ``min_seq_len`` new tokens (default: the preset's crossover with
dense attention on the device: shorter prefills are faster dense), either a whole prompt or new
tokens on top of a KV cache (a cached document, then a long question; or the next chunk of
:func:`sparse_prefill.chunked_prefill`), the layer has a pattern other than
:class:`~sparse_prefill.Dense` on some head, and the layer has no sliding window shorter than the
keys (such layers are already local; they stay with SDPA). Decoding steps (one query) run dense.
A padded batch (left or right padding through ``attention_mask``) runs each sequence with its own
index over its own tokens, as if it were alone, all sequences and heads in one kernel launch on the
GPU (:mod:`sparse_prefill.varlen`; one sequence at a time on a CPU); a mask that is not
causal-with-padding raises ``ValueError`` rather than being silently ignored.

Tensor parallelism
------------------
A model loaded with transformers' tensor parallelism (``tp_plan="auto"`` or
``distributed_config=DistributedConfig(tp_plan="auto")`` under ``torchrun``) calls the attention
function on each rank with that rank's heads only. transformers shards ``q_proj``/``k_proj``/``v_proj``
column-wise into contiguous, equal slices of their output features, so rank ``r`` of ``W`` holds
query heads ``r H/W .. (r+1) H/W - 1`` and key/value heads ``r KV/W .. (r+1) KV/W - 1`` (which
keeps every query head with its own KV head). :func:`enable` reads ``W`` from the model's
``tp_size`` and ``r`` from the device mesh its attention weights are sharded over; each call then
runs the patterns of its global head ids, and raises ``ValueError`` when the heads it receives are
not ``H/W`` and ``KV/W`` (heads that do not split evenly, or a sharding this rule does not describe).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ..decoding import SparseDecoding, page_summaries, sparse_decode_attention
from ..kv_cache import compresses, window_attention_scores
from ..ops import attention_of_sequences_op, sparse_attention_op
from ..patterns import Dense, Pattern, PatternConfig
from ..presets import PRESETS, Preset, preset as preset_named
from ..varlen import Sequences

try:  # the public home of SDPA attention since transformers 4.48
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa_attention
except ImportError:  # pragma: no cover - older or reorganised transformers: take it from the registry
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as _ALL_ATTENTION_FUNCTIONS

    _sdpa_attention = _ALL_ATTENTION_FUNCTIONS["sdpa"]

__all__ = [
    "ATTENTION_NAME",
    "SparsePrefillState",
    "enable",
    "disable",
    "register",
    "sparse_prefill_attention",
    "state_of",
]

ATTENTION_NAME = "sparse_prefill"

@dataclass
class SparsePrefillState:
    """What :func:`enable` attaches to a model.

    config : PatternConfig or None
        Per-(layer, head) patterns; None means the preset's pattern on every head.
    preset : Preset
        The named operating point (:mod:`sparse_prefill.presets`): the pattern when ``config`` is
        None, and the default shortest sparse prefill.
    min_seq_len : int or None
        Shortest prefill that runs sparse; None: the preset's crossover for the device
        (:meth:`Preset.min_seq_len`).
    restore_implementation : str
        The attention implementation :func:`disable` puts back.
    sparse_calls, dense_calls : int
        Layer calls that took the sparse path and the dense (SDPA) path since :func:`enable`;
        a prefill of an ``L``-layer model adds ``L`` to one of them, as does every decoding step.
    heads : (int, int) or None
        The model's query and key/value heads per layer, all ranks together; None when unknown (a
        model selected by name and never enabled).
    tp_rank, tp_size : int
        This process's rank in the model's tensor-parallel group and the group's size (0 and 1
        without tensor parallelism): a layer call holds query heads ``tp_rank * H / tp_size`` on.
    decoding : SparseDecoding or None
        Settings of sparse decoding steps (:mod:`sparse_prefill.decoding`); None: decoding is dense.
    sparse_decode_calls : int
        Layer calls of decoding steps that read only their selected pages.
    cache : transformers Cache or None
        The KV cache the current forward call passes to the attention layers (noted by their
        forward pre-hooks); :attr:`compressing_cache` is it when it compresses
        (:mod:`sparse_prefill.kv_cache`).
    """

    config: PatternConfig | None = field(repr=False)
    preset: Preset
    min_seq_len: int | None
    restore_implementation: str
    sparse_calls: int = 0
    dense_calls: int = 0
    heads: tuple[int, int] | None = None
    tp_rank: int = 0
    tp_size: int = 1
    decoding: SparseDecoding | None = None
    sparse_decode_calls: int = 0
    cache: Any = field(default=None, repr=False)
    hooks: list = field(default_factory=list, repr=False)  # the pre-hooks' handles, removed by disable()
    # Sparse decoding's page summaries: per cache (weakly: a dropped cache takes them along), per layer.
    summaries: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = field(
        default_factory=weakref.WeakKeyDictionary, repr=False)

    def note_cache(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of every attention layer: remember the compressing cache it is called with.

        transformers gives the cache to the layer (which fills it) but not to the attention function,
        which alone sees the prefill's queries that SnapKV scores with. The cache is a keyword
        argument: ``cache`` in recent transformers, ``past_key_values`` before.
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cache = cache

    def forget_cache(self, *_: Any) -> None:
        """Forward hook (always called, errors included): the noted cache belongs to that layer call only,
        so an attention call made outside a layer's forward (long_prefill's) never sees a stale one."""
        self.cache = None

    @property
    def compressing_cache(self) -> Any:
        return self.cache if compresses(self.cache) else None

    def shortest_sparse(self, query: torch.Tensor) -> int:
        """The shortest prefill of ``query``'s device that runs sparse."""
        if self.min_seq_len is not None:
            return self.min_seq_len
        return self.preset.min_seq_len(query.is_cuda)

    def layer_patterns(self, layer_idx: int, n_heads: int, seq_len: int,
                       n_kv_heads: int | None = None) -> tuple[Pattern, ...]:
        """The patterns of the ``n_heads`` query heads a call of layer ``layer_idx`` holds, in its order.

        Under tensor parallelism those are this rank's slice of the layer's heads (global ids
        ``tp_rank * n_heads`` on); ``n_kv_heads``, when given, is checked against that slice too.
        """
        first = self._first_head(layer_idx, n_heads, n_kv_heads)
        if self.config is None:
            return (self.preset.pattern,) * n_heads
        # Budgets scaled by the config's rule.
        return self.config.layer_at(layer_idx, seq_len)[first : first + n_heads]

    def _first_head(self, layer_idx: int, n_heads: int, n_kv_heads: int | None) -> int:
        """Global id of the first of ``n_heads`` local query heads; ``ValueError`` unless they are an even share."""
        if self.heads is None:
            global_heads = self.config.n_heads if self.config is not None else None
            global_kv_heads = None
        else:
            global_heads, global_kv_heads = self.heads
        if self.config is None and self.tp_size == 1:
            return 0  # the same pattern on every head: nothing to map
        parallel = f" on tensor-parallel rank {self.tp_rank} of {self.tp_size}" if self.tp_size > 1 else ""
        if global_heads is not None and n_heads * self.tp_size != global_heads:
            raise ValueError(
                f"layer {layer_idx} attends with {n_heads} query heads{parallel}, but the model has "
                f"{global_heads} query heads per layer: sparse prefill maps a rank's heads to their global ids "
                f"(and its pattern config) only when every rank holds {global_heads} / {self.tp_size} of them"
            )
        if (n_kv_heads is not None and global_kv_heads is not None and self.tp_size > 1
                and n_kv_heads * self.tp_size != global_kv_heads):
            raise ValueError(
                f"layer {layer_idx} attends with {n_kv_heads} key/value heads{parallel}, but the model has "
                f"{global_kv_heads}: tensor-parallel sparse prefill needs them split evenly, as the query heads"
            )
        return self.tp_rank * n_heads

    def describe(self) -> str:
        """What runs, for reports: ``preset default (BlockCoverage(coverage=0.99, stride=16))`` or the config's source."""
        if self.config is None:
            return f"preset {self.preset.name} ({self.preset.pattern})"
        return f"config ({self.config.metadata.get('source', 'PatternConfig')})"


# Attention module -> state of its model. Weak keys: enabling a model never keeps it alive, and no
# attribute is added to transformers' objects.
_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, SparsePrefillState]" = weakref.WeakKeyDictionary()
# Used by models selected with attn_implementation="sparse_prefill" that were never enabled.
_UNATTACHED = SparsePrefillState(config=None, preset=PRESETS["default"], min_seq_len=None, restore_implementation="sdpa")


def register() -> None:
    """Register ``"sparse_prefill"`` with transformers' attention and attention-mask registries.

    Idempotent. Masks are built exactly as for ``"sdpa"`` (None when the mask is purely causal and
    a boolean [batch, 1, q, k] mask otherwise), which is what lets the attention function tell a
    padded batch from an unpadded one: an implementation name without a mask builder gets no mask.
    """
    AttentionInterface.register(ATTENTION_NAME, sparse_prefill_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def sparse_prefill_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: sparse on long prefill, transformers' SDPA otherwise.

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention layer; ``module.layer_idx`` selects the layer's patterns.
    query : Tensor [batch, q_heads, q_len, head_dim]
    key, value : Tensor [batch, kv_heads, kv_len, head_dim]
        ``kv_heads`` may divide ``q_heads`` (GQA); K/V are passed on without repeating.
    attention_mask : Tensor [batch, 1, q_len, kv_len] or None
        As built by transformers' ``sdpa_mask``: None for a purely causal mask.
    scaling : float, optional
        Softmax scale; ``1/sqrt(head_dim)`` when None.
    dropout : float
        Attention dropout probability; the sparse path is for inference and needs 0.

    Returns
    -------
    (Tensor [batch, q_len, q_heads, head_dim], None)
    """
    state = _STATES.get(module, _UNATTACHED)
    if state.decoding is not None and _is_decode_step(state, query, key, kwargs):
        return _sparse_decode_step(state, module, query, key, value, attention_mask, scaling, kwargs)
    sparse = _takes_sparse_path(state, module, query, key, kwargs)
    # Budgets that follow the prompt length follow the keys: a chunk's context is the whole prefix.
    patterns = state.layer_patterns(module.layer_idx, query.shape[1], key.shape[2], key.shape[1]) if sparse else ()
    if not sparse or all(isinstance(pattern, Dense) for pattern in patterns):
        state.dense_calls += 1
        out = _sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        _compress_cache(state, module, query, key, scaling)
        return out
    if dropout:
        raise ValueError(
            f"sparse prefill computes attention without dropout (inference only), got dropout={dropout}; "
            "call model.eval() or sparse_prefill.disable(model) for training"
        )
    _check_plain_softmax(kwargs)
    spans = None if attention_mask is None else _sequence_spans(attention_mask, query.shape[2], key.shape[2])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if spans is None:  # no padding: one call for the batch
        out = sparse_attention_op(query, key, value, patterns, scaling)  # [batch, q_heads, q_len, head_dim]
    else:
        out = _padded_sparse_attention(state, module, query, key, value, spans, scaling)
    _compress_cache(state, module, query, key, scaling)
    state.sparse_calls += 1
    # A view, not a copy: transformers' attention layers reshape it (copying then), and at 1M tokens a
    # contiguous copy here would be one more 8 GiB buffer at the peak (sparse_prefill.long_prefill).
    return out.transpose(1, 2), None


def _compress_cache(state: SparsePrefillState, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    scaling: float | None) -> None:
    """After a layer's attention: compress its layer of the call's compressing KV cache, if it waits.

    The scores it needs (the attention of the last ``window`` queries on every key) are computed
    here, where the queries are; the cache only selects from them.
    """
    cache = state.compressing_cache
    layer = cache.pending_layer(module.layer_idx) if cache is not None else None
    if layer is None:
        return
    scores = None
    if layer.window:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = window_attention_scores(query, key, layer.window, scale)
    layer.compress(scores)


def _check_plain_softmax(kwargs: dict) -> None:
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            "sparse attention supports plain softmax attention; this layer passes "
            f"softcap={kwargs.get('softcap')!r}, s_aux={'set' if kwargs.get('s_aux') is not None else None}"
        )


def _is_decode_step(state: SparsePrefillState, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    """One new token on a cache, in a layer that sees the whole cache (not a sliding-window layer)."""
    if query.shape[2] != 1 or key.shape[2] <= state.decoding.budget or state.cache is None:
        return False  # a cache within the budget is read whole: dense is exact and cheaper
    sliding_window = kwargs.get("sliding_window")
    return sliding_window is None or sliding_window >= key.shape[2]


def _sparse_decode_step(state: SparsePrefillState, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                        kwargs: dict):
    """A decoding step over the pages its query selects (docs/semantics.md, "Sparse decoding").

    The layer's page summaries follow the keys it is handed: built from all of them at the first
    step (after a compressing cache has compressed), then extended by the keys added since.
    """
    _check_plain_softmax(kwargs)
    # The mask is the same tensor in every layer of a step: checked once per step (_sequence_spans).
    if attention_mask is not None and _sequence_spans(attention_mask, 1, key.shape[2]) is not None:
        raise ValueError(
            "sparse decoding reads each sequence's selected pages and has no per-sequence length yet: a padded "
            "batch (or a mask that hides cache keys) cannot decode sparse; enable(model, decode='dense') for it"
        )
    settings = state.decoding
    per_layer = state.summaries.setdefault(state.cache, {})
    summaries = per_layer.get(module.layer_idx)
    n_keys = key.shape[2]
    if summaries is None or summaries.n_keys > n_keys or summaries.shape[:2] != tuple(key.shape[:2]):
        summaries = page_summaries(key, settings.page_size)
        per_layer[module.layer_idx] = summaries
    elif summaries.n_keys < n_keys:
        # A decoded key is finite whenever its step's output is: the NaN check would read the GPU.
        summaries.append(key[:, :, summaries.n_keys :], check_finite=False)
    out = sparse_decode_attention(query, key, value, summaries, budget=settings.budget, sink=settings.sink,
                                  local=settings.local, scale=scaling)
    state.sparse_decode_calls += 1
    return out.transpose(1, 2), None


def _takes_sparse_path(
    state: SparsePrefillState, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict
) -> bool:
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len > kv_len or q_len < state.shortest_sparse(query) or (q_len == 1 < kv_len):
        # A short prefill (on its own or on top of a cache), a decoding step (one new token on a
        # cache: dense, whatever min_seq_len says), or queries that are not the last positions of
        # the keys (nothing in transformers makes those).
        return False
    # Mistral, Qwen2/3 and Phi-3 pass their window here; a window shorter than the keys makes the
    # mask non-causal, and such a layer is local already.
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and sliding_window < kv_len:
        return False
    if not isinstance(getattr(module, "layer_idx", None), int):
        raise ValueError(
            f"sparse prefill needs the attention module's layer_idx to pick its patterns; "
            f"{type(module).__name__} has layer_idx={getattr(module, 'layer_idx', None)!r}"
        )
    return True


# The last mask checked and what it said: transformers hands every layer of a forward the same mask
# tensor, and checking it reads q_len x kv_len booleans (two passes), so it is checked once.
_LAST_SPANS: list = [None, None, None]  # [weak reference to the mask, its version, spans]


def _sequence_spans(attention_mask: torch.Tensor, q_len: int, kv_len: int):
    """:func:`_check_sequence_spans`, once per mask tensor (and in-place change of it)."""
    reference, version, spans = _LAST_SPANS
    if reference is not None and reference() is attention_mask and version == attention_mask._version:
        return spans
    spans = _check_sequence_spans(attention_mask, q_len, kv_len)
    _LAST_SPANS[:] = [weakref.ref(attention_mask), attention_mask._version, spans]
    return spans


def _check_sequence_spans(attention_mask: torch.Tensor, q_len: int, kv_len: int, chunk_size: int = 1024):
    """Each sequence's real keys ``[first, end)`` in a padded batch, or None when nothing is padded.

    ``attention_mask`` [batch, 1|heads, q_len, kv_len] as transformers builds it for SDPA (boolean,
    True = attend; or additive float). Raise ``ValueError`` unless every sequence's real keys are one
    contiguous run (left or right padding) and each real query (the last ``q_len`` positions)
    attends to exactly its causal real keys: any other mask would be silently ignored.
    """
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q_len, kv_len):
        raise ValueError(
            f"sparse prefill expects a [batch, 1, {q_len}, {kv_len}] attention mask, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    # transformers builds boolean masks (True = attend) for SDPA and additive float masks
    # (0 = attend, large negative = masked) for eager attention.
    def kept(block):
        return block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2

    device = attention_mask.device
    real_key = torch.zeros(attention_mask.shape[0], kv_len, dtype=torch.bool, device=device)
    for start in range(0, q_len, chunk_size):  # a key is real when some query attends to it
        real_key |= kept(attention_mask[:, :, start : start + chunk_size]).any(dim=2).any(dim=1)
    count = real_key.sum(dim=1)
    keys = torch.arange(kv_len, device=device)
    first = torch.where(real_key, keys, kv_len).amin(dim=1)
    end = first + count
    if not bool(((keys >= first[:, None]) & (keys < end[:, None])).eq(real_key).all()):
        raise ValueError(
            "sparse prefill supports padding at the start or the end of each sequence (left or right): "
            "this attention mask hides keys in the middle of a sequence. Call sparse_prefill.disable(model) "
            "for such a batch."
        )
    for start in range(0, q_len, chunk_size):
        local = torch.arange(start, min(start + chunk_size, q_len), device=device)
        rows = kv_len - q_len + local  # positions
        real_row = (rows[None, :] >= first[:, None]) & (rows[None, :] < end[:, None])  # [batch, rows]
        want = (keys[None, None, :] <= rows[None, :, None]) & real_key[:, None, :]  # [batch, rows, keys]
        got = kept(attention_mask[:, :, local])  # [batch, 1|heads, rows, keys]
        if not bool((got.eq(want[:, None]) | ~real_row[:, None, :, None]).all()):
            raise ValueError(
                "sparse prefill supports causal masks with padding only: this attention mask hides causal "
                "(query, key) pairs of real tokens or shows future ones. Call sparse_prefill.disable(model) "
                "for this batch."
            )
    if bool((first == 0).all() and (end == kv_len).all()):
        return None
    return list(zip(first.tolist(), end.tolist()))


def _padded_sparse_attention(state, module, query, key, value, spans, scaling) -> torch.Tensor:
    """A padded batch in one call: each sequence's real queries over its real keys, with its own index
    (as if it were alone and unpadded; sequences shorter than ``min_seq_len`` dense), every sequence
    and head in one kernel launch on the GPU; padding rows get zeros (nothing reads them)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len > q_len and any(end != kv_len for _, end in spans):
        raise ValueError("sparse prefill supports right padding on a prefill from an empty cache only; "
                         "a prefill on top of a cache needs left padding")
    sequences = Sequences.padded(spans, q_len, kv_len)
    shortest = state.shortest_sparse(query)
    patterns = [state.layer_patterns(module.layer_idx, query.shape[1], n_keys, key.shape[1])
                if n_keys - q_start >= shortest else (Dense(),) * query.shape[1]
                for n_keys, q_start in zip(sequences.seq, sequences.q_start)]
    return attention_of_sequences_op(query, key, value, sequences, patterns, scaling)


def enable(
    model: torch.nn.Module,
    config: PatternConfig | None = None,
    *,
    preset: str = "default",
    min_seq_len: int | None = None,
    decode: str | SparseDecoding = "dense",
) -> SparsePrefillState:
    """Switch ``model`` to sparse prefill: long prefills sparse, everything else transformers' SDPA.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model whose attention layers use transformers' attention registry
        (Llama, Mistral, Qwen2, Qwen3, Phi-3 and most recent architectures).
    config : PatternConfig or None
        One pattern per (layer, query head), checked against the model's shape. None (default): the
        preset's pattern on every head.
    preset : str
        A name in :data:`sparse_prefill.presets.PRESETS`: ``"default"`` (accurate: output error at
        most about 0.03 against dense attention on the real 128K workload), ``"fast"`` (faster,
        error about 0.08; docs/BENCHMARKS.md) or ``"dense"`` (exact attention, every call through
        transformers' SDPA: what a compressing KV cache needs for a dense prefill). It also sets
        the default ``min_seq_len``.
    min_seq_len : int
        Prefills shorter than this many tokens stay dense. None (default): the preset's crossover
        with dense attention on the prompt's device.
    decode : "dense", "sparse" or SparseDecoding
        How decoding steps attend: ``"dense"`` (default) reads the whole cache through SDPA;
        ``"sparse"`` (:class:`~sparse_prefill.decoding.SparseDecoding`'s defaults) or a
        ``SparseDecoding(budget=..., sink=..., local=..., page_size=...)`` reads only the pages each
        step's query selects, once the cache holds more than ``budget`` keys (any cache, compressed
        ones included; unpadded batches).

    Returns
    -------
    SparsePrefillState
        The attached state; its ``sparse_calls`` / ``dense_calls`` count layer calls per path.
        Calling :func:`enable` again replaces it.
    """
    if min_seq_len is not None and (
        isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int) or min_seq_len < 1
    ):
        raise ValueError(f"min_seq_len must be a positive int, got min_seq_len={min_seq_len!r} (or None: the preset's)")
    if config is not None and not isinstance(config, PatternConfig):
        raise TypeError(f"config must be a PatternConfig or None (a preset: preset='fast'), got {config!r}")
    if decode == "sparse":
        decode = SparseDecoding()
    elif decode != "dense" and not isinstance(decode, SparseDecoding):
        raise ValueError(f"decode must be 'dense', 'sparse' or a SparseDecoding, got decode={decode!r}")
    chosen = preset_named(preset)
    model_config = _model_config(model)
    n_layers, n_heads, n_kv_heads = _model_shape(model_config)
    if config is not None:
        config.check_model(n_layers, n_heads)
    attention_modules = _attention_modules(model)
    if not attention_modules:
        raise ValueError(
            f"found no attention layers (modules with an integer layer_idx) in {type(model).__name__}; "
            "sparse prefill works with models that use transformers' AttentionInterface"
        )
    tp_rank, tp_size = _tensor_parallel_rank(model, attention_modules)
    if n_heads % tp_size or n_kv_heads % tp_size:
        raise ValueError(
            f"the model is split over {tp_size} tensor-parallel ranks, but its {n_heads} query and {n_kv_heads} "
            f"key/value heads do not split evenly: sparse prefill cannot tell which heads a rank holds"
        )
    register()
    current = model_config._attn_implementation
    previous = _state_of_modules(attention_modules)
    restore = previous.restore_implementation if previous is not None else current
    if restore == ATTENTION_NAME:  # loaded with attn_implementation="sparse_prefill"
        restore = "sdpa"
    state = SparsePrefillState(config=config, preset=chosen, min_seq_len=min_seq_len, restore_implementation=restore,
                               heads=(n_heads, n_kv_heads), tp_rank=tp_rank, tp_size=tp_size,
                               decoding=decode if isinstance(decode, SparseDecoding) else None)
    if previous is not None:
        _remove_hooks(previous)
    for module in attention_modules:
        _STATES[module] = state
        state.hooks.append(module.register_forward_pre_hook(state.note_cache, with_kwargs=True))
        state.hooks.append(module.register_forward_hook(state.forget_cache, always_call=True))
    _set_attn_implementation(model, ATTENTION_NAME)
    return state


def disable(model: torch.nn.Module) -> None:
    """Undo :func:`enable`: restore the attention implementation the model had before it.

    A model loaded with ``attn_implementation="sparse_prefill"`` goes back to ``"sdpa"``. Calling
    this on a model that is not enabled only does that switch.
    """
    model_config = _model_config(model)
    attention_modules = _attention_modules(model)
    state = _state_of_modules(attention_modules)
    for module in attention_modules:
        _STATES.pop(module, None)
    if state is not None:
        _remove_hooks(state)
        _set_attn_implementation(model, state.restore_implementation)
    elif model_config._attn_implementation == ATTENTION_NAME:
        _set_attn_implementation(model, "sdpa")


def _remove_hooks(state: SparsePrefillState) -> None:
    for handle in state.hooks:
        handle.remove()
    state.hooks.clear()
    state.cache = None


def state_of(model: torch.nn.Module) -> SparsePrefillState | None:
    """The state :func:`enable` attached to ``model``, or None when it is not enabled."""
    return _state_of_modules(_attention_modules(model))


def _state_of_modules(modules: list[torch.nn.Module]) -> SparsePrefillState | None:
    return next((_STATES[m] for m in modules if m in _STATES), None)


def _model_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    return config


def _model_shape(model_config: Any) -> tuple[int, int, int]:
    """(layers, query heads, key/value heads) of the whole model, all tensor-parallel ranks together."""
    # Multimodal configs keep the language model's shape in a sub-config.
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    try:
        n_heads = int(text_config.num_attention_heads)
        n_kv_heads = getattr(text_config, "num_key_value_heads", None)
        return int(text_config.num_hidden_layers), n_heads, n_heads if n_kv_heads is None else int(n_kv_heads)
    except AttributeError as error:
        raise ValueError(
            f"cannot read num_hidden_layers / num_attention_heads from {type(text_config).__name__}: {error}"
        ) from None


def _tensor_parallel_rank(model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> tuple[int, int]:
    """(rank, size) of ``model``'s tensor-parallel group; (0, 1) for a model that is not split.

    The size is transformers' public ``model.tp_size`` (None when not split). The rank is this
    process's coordinate in the device mesh the attention layers' weights are sharded over (DTensor
    parameters, as transformers' tensor parallelism makes them): its ``"tp"`` dimension, or its only
    one. That is the rank whose contiguous slice of ``q_proj``'s output features this process holds.
    """
    size = getattr(model, "tp_size", None) or 1
    if size == 1:
        return 0, 1
    for module in attention_modules:
        for parameter in module.parameters():
            mesh = getattr(parameter, "device_mesh", None)  # a DTensor's
            if mesh is None:
                continue
            names = mesh.mesh_dim_names or ()
            if mesh.ndim != 1 and "tp" not in names:
                continue
            dim = "tp" if "tp" in names else None
            if mesh.size(0 if dim is None else names.index(dim)) != size:
                raise ValueError(f"the model says tp_size={size}, but its attention weights are sharded over "
                                 f"{mesh.size()} ranks ({mesh})")
            return mesh.get_local_rank(dim), size
    raise ValueError(
        f"the model is split over tp_size={size} tensor-parallel ranks, but no attention weight is a DTensor on a "
        "tensor-parallel device mesh: sparse prefill cannot tell which heads this rank holds"
    )


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    # The modules that call the attention function are the ones transformers gives a layer_idx and
    # a head count; decoder layers in some models carry a layer_idx too but never call it.
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
        and any(hasattr(module, name) for name in ("num_key_value_groups", "num_heads", "head_dim"))
    ]


def _set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54 checks the name is registered
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


# Registering a name is transformers' public extension mechanism; doing it on import makes
# attn_implementation="sparse_prefill" loadable as soon as this module is imported.
register()
