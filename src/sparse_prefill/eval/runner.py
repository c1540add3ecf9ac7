"""Running an evaluation: samples x methods on one model, resumable, with a progress bar."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..generation import eos_ids, greedy_generate
from ..models import PROMPT_STYLES, load_model, resolve_prompt_style
from .methods import METHODS, apply_method
from .needle import DEFAULT_DEPTHS, needle_samples
from .perplexity import position_losses, text_windows
from .report import write_report
from .ruler import TASKS as RULER_TASKS
from .ruler import ruler_samples
from .scoring import score_answer
from ..checks import check_device, check_writable_directory, load_config_option
from .store import ResultStore
from .texts import TEXTS

__all__ = ["EVAL_TASKS", "EvalSpec", "run_eval", "run_evals"]

EVAL_TASKS = ("needle", "ruler", "ppl")
PPL_BUCKETS = 16  # perplexity is reported per sixteenth of the window


@dataclass
class EvalSpec:
    """One ``sparse-prefill eval`` invocation (see ``sparse-prefill eval --help``)."""

    task: str
    out: Path
    model: str = "default"
    methods: Sequence[str] = METHODS
    config: str | None = None
    presets: Sequence[str] = ("default",)  # the sparse method runs once per preset, each under its own label
    lengths: Sequence[int] = (2048, 4096, 8192)
    samples: int | None = None
    depths: Sequence[float] = DEFAULT_DEPTHS
    ruler_tasks: Sequence[str] = RULER_TASKS
    haystack: str = "pg"
    text: str = "kjv"
    device: str = "auto"
    seed: int = 0
    rope_scaling: bool = True
    progress: bool = True
    kv: str = "full"  # KV cache kept for decoding (sparse_prefill.kv_cache.METHODS)
    kv_capacity: int | None = None
    kv_kernel: int | None = None  # SnapKV/PyramidKV pooling width (None: the method's default, 5)
    decode_budget: int | None = None  # sparse decoding with this budget in tokens (None: dense decoding)
    prompt_style: str = "auto"  # needle, ruler: chat, completion, or auto (the loaded model's own)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.task not in EVAL_TASKS:
            raise ValueError(f"unknown eval task {self.task!r}; expected one of {', '.join(EVAL_TASKS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--method: unknown {', '.join(unknown) or '(none given)'}; expected some of {', '.join(METHODS)}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 256 for n in self.lengths):
            raise ValueError(f"--lengths must be token counts >= 256, got {list(self.lengths)}")
        if self.samples is not None and (isinstance(self.samples, bool) or self.samples < 1):
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.samples is not None and self.task == "needle":
            raise ValueError("--samples applies to ruler and ppl; needle runs one prompt per length and depth (--depths)")
        unknown_tasks = [t for t in self.ruler_tasks if t not in RULER_TASKS]
        if self.task == "ruler" and (unknown_tasks or not self.ruler_tasks):
            raise ValueError(f"unknown RULER task(s) {', '.join(unknown_tasks) or '(none given)'}; "
                             f"expected some of {', '.join(RULER_TASKS)}")
        for name, value in (("--haystack", self.haystack), ("--text", self.text)):
            if value not in TEXTS:
                raise ValueError(f"{name} {value!r} is not a known text; expected one of {', '.join(TEXTS)}")
        if self.config is not None and "sparse" not in self.methods:
            raise ValueError("--config sets the sparse method's patterns; add sparse to --method")
        from ..presets import PRESETS

        if isinstance(self.presets, str):  # iterating "fast" would name presets "f", "a", ...
            raise ValueError(f"presets must be a sequence of preset names such as ('default', 'fast'), "
                             f"got the string {self.presets!r}")
        if not self.presets:
            raise ValueError(f"--preset names no preset; expected some of {', '.join(PRESETS)}")
        for preset in self.presets:
            if preset not in PRESETS:
                raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        twice = sorted({p for p in self.presets if list(self.presets).count(p) > 1})
        if twice:
            raise ValueError(f"--preset names {', '.join(twice)} more than once: each preset runs once")
        from ..kv_cache import METHODS as KV_METHODS

        if self.kv not in KV_METHODS:
            raise ValueError(f"--kv {self.kv!r} is not a KV cache method; expected one of {', '.join(KV_METHODS)}")
        if self.kv != "full" and self.task == "ppl":
            raise ValueError("--kv compresses the cache that decoding reads: it applies to needle and ruler, not ppl")
        if self.kv == "full" and self.kv_capacity is not None:
            raise ValueError(f"--kv-capacity applies to a compressing --kv (snapkv, pyramidkv, streamingllm); --kv full "
                             f"keeps every token, got --kv-capacity {self.kv_capacity}")
        from ..kv_cache import check_kv_options

        try:  # capacities and options need no model: checked before one loads
            check_kv_options(self.kv, self.kv_capacity, **self.kv_options())
        except ValueError as error:
            raise ValueError(f"--kv {self.kv}: {error}") from None
        if self.decode_budget is not None:
            if self.task == "ppl":
                raise ValueError("--decode-budget sets how decoding steps attend: it applies to needle and ruler, not ppl")
            try:
                self.decoding()
            except ValueError as error:
                raise ValueError(f"--decode-budget: {error}") from None
        if self.prompt_style not in ("auto", *PROMPT_STYLES):
            raise ValueError(f"--prompt-style must be auto, {' or '.join(PROMPT_STYLES)}, got {self.prompt_style!r}")
        if self.prompt_style != "auto" and self.task == "ppl":
            raise ValueError("--prompt-style frames the needle and ruler questions; ppl reads plain text")
        check_device(self.device, "--device")

    def decoding(self):
        """The sparse decoding asked for (``SparseDecoding``), or ``"dense"``."""
        from ..decoding import SparseDecoding

        return "dense" if self.decode_budget is None else SparseDecoding(budget=self.decode_budget)

    def kv_options(self) -> dict[str, int]:
        return {} if self.kv_kernel is None else {"kernel": self.kv_kernel}


def _label(method: str, config: str | None, preset: str = "default") -> str:
    """How a method's results are named: ``sparse`` is the default preset on every head; another
    preset (``sparse (fast)``) or a config file (``sparse (<file stem>)``) gets its own label."""
    if method != "sparse":
        return method
    if config:
        return f"sparse ({Path(config).stem})"
    return "sparse" if preset == "default" else f"sparse ({preset})"


def _kv_suffix(spec: EvalSpec) -> str:
    """A compressed KV cache and sparse decoding are part of the method's name: results of several
    --kv and --decode-budget runs share a table."""
    suffix = ""
    if spec.kv != "full":
        from ..kv_cache import DEFAULT_CAPACITY

        kernel = f" k{spec.kv_kernel}" if spec.kv_kernel is not None else ""
        suffix = f" + {spec.kv} {spec.kv_capacity or DEFAULT_CAPACITY}{kernel}"
    if spec.decode_budget is not None:
        suffix += f" + sparse decode {spec.decode_budget}"
    return suffix


def run_eval(spec: EvalSpec) -> dict[str, Any]:
    """Run what ``spec`` asks for that ``spec.out`` does not hold yet; write the report; return its summary."""
    return run_evals([spec])[0]


def run_evals(specs: Sequence[EvalSpec]) -> list[dict[str, Any]]:
    """Run several evaluations in turn (``sparse-prefill eval all``: needle, ruler, ppl); return their summaries.

    Every spec is checked first, then every spec's model-dependent checks run and its prompts are
    built, all before the first sample: a problem with the last task is reported before the first
    task spends hours. Each task stores, resumes and reports on its own, as :func:`run_eval` does.
    """
    for spec in specs:
        spec.check()
    plans = [_plan(spec) for spec in specs]
    return [_run(plan) for plan in plans]


@dataclass
class _Plan:
    """One checked evaluation, its model loaded and its prompts built: what is left is running them."""

    spec: EvalSpec
    device: torch.device
    dtype: torch.dtype
    config: Any  # PatternConfig, or None: the presets on every head
    out: Path
    native_context: int
    store: ResultStore
    items: list[Any]
    runs: list[tuple[str, str, str]]  # (method, preset, label)


def _runs(spec: EvalSpec) -> list[tuple[str, str, str]]:
    """What each prompt is run with, as (method, preset, label): every method once, the sparse method
    once per preset. Dense and a-shape ignore the preset and run once; their records name the first."""
    runs = []
    for method in spec.methods:
        for preset in spec.presets if method == "sparse" else spec.presets[:1]:
            runs.append((method, preset, _label(method, spec.config, preset) + _kv_suffix(spec)))
    return runs


def _plan(spec: EvalSpec) -> _Plan:
    device = check_device(spec.device, "--device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # None: the preset on every head; anything else: a PatternConfig file.
    config = load_config_option(spec.config) if spec.config is not None else None
    out = check_writable_directory(spec.out, "--out")
    # load_model keeps what it loaded for the process: under `eval all` the second and third task get
    # the first one's model object, so the model loads once (and once per YaRN length).
    base = load_model(spec.model, dtype=dtype, device=device)
    # What needs the model is checked once it is loaded, before any sample runs.
    if config is not None:
        try:
            config.check_model(*_model_shape(base.model))
        except ValueError as error:
            raise ValueError(f"--config {spec.config!r} does not fit model {spec.model!r}: {error}") from None
    if spec.kv != "full":  # models with sliding-window layers are refused here
        from ..kv_cache import make_kv_cache

        make_kv_cache(spec.kv, base.model.config, spec.kv_capacity, **spec.kv_options())
    too_long = [n for n in spec.lengths if n > base.native_context]
    if too_long and not spec.rope_scaling:
        raise ValueError(
            f"--lengths {too_long} exceed the model's context of {base.native_context} tokens and RoPE scaling "
            "is off (--no-rope-scaling); drop those lengths or allow scaling"
        )
    if device.type == "cpu":  # the longest prompt and its answer, on the memory this machine has now
        from ..generation import check_cpu_prefill_fits

        check_cpu_prefill_fits(base.model, max(spec.lengths), sparse=any(m != "dense" for m in spec.methods),
                               cache=spec.task != "ppl", what=f"--lengths {max(spec.lengths)}")
    store = ResultStore(out / f"{spec.task}.jsonl")
    style = None
    if spec.task != "ppl":
        try:
            style = base.prompt_style if spec.prompt_style == "auto" else resolve_prompt_style(spec.prompt_style, base.tokenizer)
        except ValueError as error:
            raise ValueError(f"--prompt-style {spec.prompt_style}: model {spec.model!r}: {error}") from None
        # Scores of chat and completion prompts are not comparable: one results directory holds one style.
        # Records from before prompt styles existed were all chat.
        stored = sorted({r.get("prompt_style", "chat") for r in store})
        if stored and stored != [style]:
            raise ValueError(f"--out {str(out)!r} holds {spec.task} results with {' and '.join(stored)} prompts and this run "
                             f"asks {style} prompts (--prompt-style {spec.prompt_style}): give another --out")
    return _Plan(spec=spec, device=device, dtype=dtype, config=config, out=out, native_context=base.native_context,
                 store=store, items=_items(spec, base.tokenizer, style), runs=_runs(spec))


def _run(plan: _Plan) -> dict[str, Any]:
    spec, store, items, runs = plan.spec, plan.store, plan.items, plan.runs
    todo = [(item, run) for item in items for run in runs if not store.done(item.key, run[2])]
    bar = _bar(len(items) * len(runs), len(items) * len(runs) - len(todo), spec)
    for length in sorted({item.length for item in items}):
        pending = [(item, run) for item, run in todo if item.length == length]
        if not pending:
            continue
        scaled = length if length > plan.native_context else None
        loaded = load_model(spec.model, dtype=plan.dtype, device=plan.device, rope_scaling_for=scaled)
        # One method (and preset) at a time over the length's prompts: the model is switched once each.
        for item, (method, preset, label) in sorted(pending, key=lambda pair: runs.index(pair[1])):
            state = apply_method(loaded.model, method, length, plan.config if method == "sparse" else None, preset,
                                 decode=spec.decoding())
            if method == "dense" and (spec.kv != "full" or spec.decode_budget is not None):
                # Dense prefill through sparse_prefill's attention (every call goes to SDPA): it hands
                # the compressing cache the prefill's queries, and decodes sparse if asked.
                from ..integrations.transformers import enable

                state = enable(loaded.model, preset="dense", decode=spec.decoding())
            record = _evaluate(spec, loaded, item, plan.device)
            record.update(key=item.key, label=label, method=method, config=spec.config or f"preset {preset}", length=length,
                          kv=spec.kv, kv_capacity=spec.kv_capacity, kv_kernel=spec.kv_kernel,
                          decode_budget=spec.decode_budget,
                          yarn=loaded.rope_scaling is not None,
                          sparse_layers=state.sparse_calls if state is not None else 0,
                          sparse_decode_layers=state.sparse_decode_calls if state is not None else 0)
            store.add(record)
            bar.update(1)
        apply_method(loaded.model, "dense", length)
    bar.close()
    return write_report(spec.task, list(store), plan.out)


def _model_shape(model: Any) -> tuple[int, int]:
    """(layers, query heads) of a transformers model, as a PatternConfig states them."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def _items(spec: EvalSpec, tokenizer: Any, style: str | None) -> list[Any]:
    if spec.task == "needle":
        return needle_samples(tokenizer, spec.lengths, spec.depths, haystack=spec.haystack, seed=spec.seed, style=style)
    if spec.task == "ruler":
        return ruler_samples(tokenizer, spec.lengths, spec.ruler_tasks, samples=spec.samples or 10,
                             haystack=spec.haystack, seed=spec.seed, style=style)
    return text_windows(tokenizer, spec.lengths, spec.samples or 4, text=spec.text, seed=spec.seed)


def _evaluate(spec: EvalSpec, loaded: Any, item: Any, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    if spec.task == "ppl":
        losses = position_losses(loaded.model, item.ids)
        buckets = torch.tensor_split(losses, PPL_BUCKETS)
        return {"task": "ppl", "text": item.text, "start": item.start, "n_tokens": item.length,
                "bucket_loss_sums": [float(b.sum()) for b in buckets], "bucket_counts": [len(b) for b in buckets],
                "seconds": round(time.perf_counter() - start, 3)}
    ids = loaded.tokenizer(item.prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    cache = None
    if spec.kv != "full":
        from ..kv_cache import make_kv_cache

        cache = make_kv_cache(spec.kv, loaded.model, spec.kv_capacity, **spec.kv_options())
    result = greedy_generate(loaded.model, ids, item.max_new_tokens, eos_ids(loaded), cache=cache)
    prediction = loaded.tokenizer.decode(result["tokens"], skip_special_tokens=True)
    record = {"task": item.task, "index": item.index, "n_tokens": item.n_tokens, **item.meta,
              "references": list(item.references), "prediction": prediction, "prompt_style": item.prompt_style,
              "score": score_answer(prediction, item.references, item.prompt_style),
              "prefill_seconds": round(result["prefill_seconds"], 3)}
    if cache is not None:  # keys per layer at the end of decoding: the kept prompt plus the new tokens
        from ..kv_cache import cache_stats

        record["kv_keys_held"] = cache_stats(result["cache"])["keys_held_mean"]
    return record


def _bar(total: int, done: int, spec: EvalSpec):
    class _Silent:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    if not spec.progress:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, initial=done, desc=f"eval {spec.task}", unit="sample", file=sys.stderr)
