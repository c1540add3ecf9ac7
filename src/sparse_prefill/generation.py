"""Prefill and greedy decoding around any transformers causal LM, with a per-layer progress bar."""

from __future__ import annotations

import sys
import time

import torch

__all__ = ["prefill", "chunked_prefill", "greedy_generate", "eos_ids", "cpu_prefill_bytes", "check_cpu_prefill_fits"]


def _logits_kwarg(model) -> str:
    # transformers >= 4.50 names it logits_to_keep; older releases num_logits_to_keep.
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "logits_to_keep" if "logits_to_keep" in parameters else "num_logits_to_keep"


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40);
    # earlier 5.x releases know only past_key_values.
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    """The KV cache a forward returned, under either name."""
    return output.cache if "cache" in output else output.past_key_values


def _layer_progress(model, description: str, enabled: bool):
    """A tqdm bar advanced by each decoder layer's attention during one prefill; a no-op without tqdm."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext()
    from .integrations.transformers import _attention_modules

    @contextlib.contextmanager
    def bar():
        modules = _attention_modules(model)
        with tqdm(total=len(modules), desc=description, unit="layer", file=sys.stderr, leave=False) as progress:
            def advance(*_):
                progress.update(1)  # returns None: a hook that returns a value replaces the output

            # Forward hooks are torch's public way to observe a module; removed when the prefill ends.
            handles = [m.register_forward_hook(advance) for m in modules]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    return bar()


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, progress: bool = False, label: str = "prefill", cache=None):
    """Run the prompt ``input_ids`` [1, n]; returns (next-token logits [1, vocab], KV cache, seconds).

    Only the last position's logits are computed: an n x vocab tensor would be 49K floats per token.
    ``cache``: an empty transformers Cache to fill (e.g. a compressing one from
    :func:`sparse_prefill.kv_cache.make_kv_cache`); None lets the model make its default one.
    """
    _synchronize(input_ids.device)
    start = time.perf_counter()
    with _layer_progress(model, label, progress):
        output = model(input_ids=input_ids, use_cache=True, **{_cache_kwarg(model): cache, _logits_kwarg(model): 1})
    _synchronize(input_ids.device)  # CUDA runs asynchronously: the forward returns before the GPU is done
    return output.logits[:, -1], _returned_cache(output), time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def chunked_prefill(model, input_ids: torch.Tensor, chunk_size: int, cache=None):
    """Prefill ``input_ids`` [batch, n] through a KV cache, ``chunk_size`` tokens at a time.

    Each chunk attends to the cache, which holds every token before it; with sparse prefill enabled,
    every chunk of at least ``min_seq_len`` tokens runs sparse (its queries are the last part of
    the keys: docs/semantics.md). Activations then scale with the chunk, not the prompt. With
    Block-Coverage (the presets) and a ``chunk_size`` that is a multiple of 64, each query block
    keeps exactly what one pass over the whole prompt keeps.

    ``cache``: a transformers Cache to continue (a cached document, say), or None for a new
    DynamicCache. Returns ``(next-token logits [batch, vocab], cache)``. To ``generate`` from the
    cache afterwards, prefill all but the last token and pass the whole prompt: given a cache that
    already holds every prompt token, transformers' ``generate`` prefills the prompt again.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be an integer tensor [batch, n] with n >= 1, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    from .kv_cache import compresses

    if compresses(cache):
        # It would compress after the first chunk and keep every later chunk whole.
        raise ValueError(f"chunked_prefill needs a cache that keeps every token; {type(cache).__name__} compresses "
                         "the prompt after its first prefill call: prefill in one call with it")
    for start in range(0, input_ids.shape[1], chunk_size):
        output = model(input_ids=input_ids[:, start : start + chunk_size], use_cache=True,
                       **{_cache_kwarg(model): cache, _logits_kwarg(model): 1})
        cache = _returned_cache(output)
    return output.logits[:, -1], cache


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids=(), progress=False, label="prefill",
                    cache=None):
    """Greedy decoding after one timed prefill; decoding steps always run dense (one query each).

    ``cache`` as for :func:`prefill`. Returns ``dict(tokens=[...], prefill_seconds=...,
    decode_seconds=..., first_logits=Tensor [vocab], cache=the KV cache after decoding)``.
    """
    logits, cache, prefill_seconds = prefill(model, input_ids, progress, label, cache)
    first_logits = logits[0].float()
    tokens: list[int] = []
    start = time.perf_counter()
    position = input_ids.shape[1]
    for _ in range(max_new_tokens):
        token = int(logits.argmax(dim=-1))
        tokens.append(token)
        if token in eos_token_ids or len(tokens) == max_new_tokens:
            break
        step = torch.tensor([[token]], device=input_ids.device)
        output = model(
            input_ids=step,
            use_cache=True,
            cache_position=torch.tensor([position], device=input_ids.device),
            **{_cache_kwarg(model): cache},
        )
        logits, cache = output.logits[:, -1], _returned_cache(output)
        position += 1
    return {
        "tokens": tokens,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": time.perf_counter() - start,
        "first_logits": first_logits,
        "cache": cache,
    }


def eos_ids(loaded) -> tuple[int, ...]:
    ids = loaded.model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if loaded.tokenizer.eos_token_id is not None:
        ids.append(loaded.tokenizer.eos_token_id)
    return tuple(ids)


# --- will a prefill fit in this machine's memory (CPU) -----------------------------------------------


def cpu_prefill_bytes(model, n_tokens: int, *, sparse: bool = True, cache: bool = True) -> dict[str, int]:
    """What a CPU prefill of ``n_tokens`` through the model's own forward holds at its peak, beyond the weights.

    From the model's shapes, in the model's dtype (bytes per part, and ``"total"``):

    - ``kv_cache``: every layer's K and V, ``2 x layers x kv_heads x n x head_dim`` (0 with ``cache=False``);
    - ``hidden``: the residual stream and its normalised copy, ``2 x n x hidden``;
    - the larger of the two per-layer peaks, which never coexist: ``attention``, the sparse (masked)
      path's temporaries for one chunk of :data:`~sparse_prefill.masked_attention.CHUNK_SIZE` query
      rows over all ``n`` keys, per query head: logits, the kept-set mask as an additive bias and the
      probabilities (SDPA's math path), ``3 x chunk x n x q_heads``; 0 for dense (``sparse=False``),
      whose fused causal SDPA needs no ``n``-wide temporaries; and ``mlp``, ``3 x n x intermediate``
      (gate, up and their product).

    A lower bound by design, so that a refusal is certain: it leaves out the index estimator, Q/K/V
    and RoPE temporaries. Measured on SmolLM2-135M (float32, 2 cores), the sparse peak was 1.13x the
    estimate at 8K tokens (1.39 GiB) and 1.03x at 16K (2.54 GiB).
    """
    from .masked_attention import CHUNK_SIZE

    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    q_heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or q_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // q_heads)
    e = next(model.parameters()).element_size()
    n = int(n_tokens)
    parts = {
        "kv_cache": 2 * int(text.num_hidden_layers) * kv_heads * n * head_dim * e if cache else 0,
        "hidden": 2 * n * int(text.hidden_size) * e,
        "attention": 3 * min(CHUNK_SIZE, n) * n * q_heads * e if sparse else 0,
        "mlp": 3 * n * int(getattr(text, "intermediate_size", 0) or 0) * e,
    }
    parts["total"] = parts["kv_cache"] + parts["hidden"] + max(parts["attention"], parts["mlp"])
    return parts


def check_cpu_prefill_fits(model, n_tokens: int, *, sparse: bool = True, cache: bool = True, what: str = "prompt") -> None:
    """Raise :class:`~sparse_prefill.long_prefill.PrefillMemoryError` when a CPU prefill of ``n_tokens``
    cannot fit in the memory this machine has available now (the model is already loaded), with the numbers.

    Silent where the available memory is unknown (no ``/proc/meminfo``).
    """
    from .long_prefill.memory import PrefillMemoryError, _host_memory

    _, available = _host_memory()
    if available is None:
        return
    need = cpu_prefill_bytes(model, n_tokens, sparse=sparse, cache=cache)
    if need["total"] <= available:
        return
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    fits = int(n_tokens * available / need["total"])  # the need is about linear in n beyond one chunk
    parts = ", ".join(f"{name} {gib(value)}" for name, value in need.items() if name != "total" and value)
    raise PrefillMemoryError(
        f"{what}: a CPU prefill of {n_tokens:,} tokens needs at least {gib(need['total'])} beyond the model's weights "
        f"({parts}), but this machine has {gib(available)} available. About {fits:,} tokens in all fit here; "
        "for more, use a GPU (sparse_prefill.long_prefill prefills up to ~1M tokens there)"
    )
