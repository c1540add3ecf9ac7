"""Prefill and greedy decoding around any transformers causal LM, with a per-layer progress bar."""

from __future__ import annotations

import sys
import time

import torch

__all__ = ["prefill", "greedy_generate", "eos_ids"]


def _logits_kwarg(model) -> str:
    # transformers >= 4.50 names it logits_to_keep; older releases num_logits_to_keep.
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "logits_to_keep" if "logits_to_keep" in parameters else "num_logits_to_keep"


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
    start = time.perf_counter()
    with _layer_progress(model, label, progress):
        output = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **{_logits_kwarg(model): 1})
    return output.logits[:, -1], output.past_key_values, time.perf_counter() - start


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
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([position], device=input_ids.device),
        )
        logits, cache = output.logits[:, -1], output.past_key_values
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
