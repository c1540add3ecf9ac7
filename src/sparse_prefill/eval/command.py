"""``sparse-prefill eval``: its flags and its handler."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .methods import METHODS
from .needle import DEFAULT_DEPTHS
from .ruler import TASKS as RULER_TASKS
from .texts import TEXTS

if TYPE_CHECKING:
    from .runner import EvalSpec

__all__ = ["add_eval_command"]

# --smoke: CI-sized, minutes on a 2-core CPU, still long enough (1K tokens) that the sparse path and
# the scoring are exercised on prompts the model answers.
SMOKE = {"lengths": [1024], "samples": 1, "depths": [0.0, 0.5, 1.0]}


_TOKEN_COUNT = re.compile(r"(\d+)(k?)", re.IGNORECASE)  # digits, optionally one trailing k (x 1024)


def _ints(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        # Strict: "1kk" was read as 1024 and "1k5" as 15.
        match = _TOKEN_COUNT.fullmatch(part.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated token counts, digits with an optional trailing k (x 1024) such as 2048,4096 "
                f"or 2k,4k; got {part.strip()!r} in {text!r}"
            )
        values.append(int(match[1]) * (1024 if match[2] else 1))
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0,0.5,1, got {text!r}")
    if not all(0.0 <= value <= 1.0 for value in values):  # NaN fails too
        raise argparse.ArgumentTypeError(f"depths are fractions of the haystack in [0, 1], got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _preset_names(text: str) -> list[str]:
    """``--preset default,fast`` as a list; an empty name (``default,,fast``, ``fast,``) is refused."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise ValueError(f"--preset takes preset names separated by commas, such as default,fast; got an empty "
                         f"name in {text!r}")
    return names


def add_eval_command(commands) -> None:
    parser = commands.add_parser(
        "eval", help="accuracy: needle in a haystack, RULER-style tasks or perplexity, dense vs sparse vs a-shape",
        description="Evaluate attention methods on a real model. Results go to OUT/<task>.jsonl one sample at a "
        "time (a rerun skips what is there), then OUT/<task>.md, OUT/<task>_summary.json and PNG plots. "
        "Task all runs needle, ruler and ppl in turn into the same OUT, each with its own defaults; an option "
        "that only some tasks read goes to those.",
    )
    parser.add_argument("task", help="needle, ruler, ppl, or all (the three in turn)")
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), 'gemma3-270m' (Gemma 3 270M, opt-in), a .gguf file or a model directory")
    parser.add_argument("--method", type=_names, default=list(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all three)")
    parser.add_argument("--config", help="sparse method's patterns: a config JSON (default: the --preset on every head)")
    parser.add_argument("--preset",
                        help="sparse method's preset instead of a --config: default (the default) or fast (results "
                        "labelled 'sparse (fast)'), or several separated by commas (default,fast: the sparse method "
                        "runs once per preset, into the same results)")
    parser.add_argument("--lengths", type=_ints,
                        help="prompt lengths in tokens, comma-separated; a trailing k means x 1024 (default 2k,4k,8k)")
    parser.add_argument("--samples", type=int, help="ruler and ppl: samples per length (and task); ruler default 10, "
                        "ppl default 4 (needle runs one prompt per length and --depths)")
    parser.add_argument("--depths", type=_floats,
                        help="needle: depths as fractions, comma-separated (default 0,0.1,...,1)")
    parser.add_argument("--tasks", type=_names, help=f"ruler: tasks (default: {', '.join(RULER_TASKS)})")
    parser.add_argument("--haystack", help=f"needle and ruler: filler text, {', '.join(TEXTS)} (default pg)")
    parser.add_argument("--text", help=f"ppl: the text, {', '.join(TEXTS)} (default kjv)")
    parser.add_argument("--out", default="eval-results", help="results directory (default eval-results)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rope-scaling", action="store_true",
                        help="refuse lengths beyond the model's context instead of applying YaRN")
    parser.add_argument("--kv", default="full", metavar="METHOD",
                        help="KV cache kept for decoding (needle, ruler): full (default), snapkv, pyramidkv or "
                        "streamingllm; results are labelled e.g. 'sparse + snapkv 1024'. Under all, --kv, "
                        "--kv-capacity and --kv-kernel go to needle and ruler; ppl, which does not decode, runs "
                        "with the full cache")
    parser.add_argument("--kv-capacity", type=int, metavar="C", help="tokens kept per layer by --kv (default 1024)")
    parser.add_argument("--kv-kernel", type=int, metavar="K",
                        help="SnapKV/PyramidKV average-pool width, odd (default 5); labels get ' kK'")
    parser.add_argument("--decode-budget", type=int, metavar="N",
                        help="needle, ruler: decode sparse, each step reading only the N keys per KV head its query "
                        "selects (docs/semantics.md, 'Sparse decoding'; default: dense decoding); labels get "
                        "' + sparse decode N'. Under all, ppl (which does not decode) runs without it")
    parser.add_argument("--prompt-style", choices=("auto", "chat", "completion"),
                        help="needle, ruler: chat (the question as the user's turn of the chat template) or completion "
                        "(document, question, then 'Answer: ...' for a base model to continue); auto (default): "
                        "completion for base models such as gemma3-270m and for tokenizers without a chat template, "
                        "chat otherwise. One --out holds one style")
    parser.add_argument("--smoke", action="store_true",
                        help="CI-sized: 1K tokens, one sample, three depths (sets --lengths, --samples and --depths)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=_handle)


# Options that only some tasks read: given to another task they would be silently ignored.
_APPLIES_TO = {"samples": ("ruler", "ppl"), "depths": ("needle",), "tasks": ("ruler",), "haystack": ("needle", "ruler"),
               "text": ("ppl",), "decode_budget": ("needle", "ruler"), "prompt_style": ("needle", "ruler")}
# Under `eval all`, where each option goes. --kv and its settings are checked by the task itself for a
# single task (ppl refuses them); under all they go to the tasks that decode.
_ROUTED = {**_APPLIES_TO, "kv": ("needle", "ruler"), "kv_capacity": ("needle", "ruler"), "kv_kernel": ("needle", "ruler")}
_DEFAULTS = {"lengths": [2048, 4096, 8192], "depths": list(DEFAULT_DEPTHS), "tasks": list(RULER_TASKS), "haystack": "pg",
             "text": "kjv", "preset": "default", "prompt_style": "auto"}
ALL = "all"  # the task that runs every EVAL_TASKS in turn


def _check_options(args: argparse.Namespace) -> str | None:
    """Options that conflict or do not apply to the task: the error message, or None."""
    from .runner import EVAL_TASKS

    if args.task not in (*EVAL_TASKS, ALL):
        return f"unknown eval task {args.task!r}; expected one of {', '.join(EVAL_TASKS)} or {ALL}"
    if args.smoke:
        given = [f"--{name}" for name in SMOKE if getattr(args, name) is not None]
        if given:
            return (f"--smoke sets --lengths 1k, --samples 1 and --depths 0,0.5,1; drop --smoke to choose "
                    f"{' and '.join(given)} yourself")
    for name, tasks in _APPLIES_TO.items():
        if getattr(args, name) is not None and args.task != ALL and args.task not in tasks:
            return f"--{name.replace('_', '-')} applies to {' and '.join(tasks)}, not {args.task}"
    if args.preset is not None:
        try:
            _preset_names(args.preset)
        except ValueError as error:
            return str(error)
    if args.preset is not None and args.config is not None:
        return "--preset and --config both choose the sparse method's patterns: give one"
    if args.preset is not None and "sparse" not in args.method:
        return "--preset chooses the sparse method's patterns; add sparse to --method"
    return None


def _spec(args: argparse.Namespace, task: str) -> EvalSpec:
    """The :class:`EvalSpec` of ``task``; under ``all``, without the options ``task`` does not read
    (those keep :class:`EvalSpec`'s defaults: ppl gets the full cache and dense decoding)."""
    from .runner import EvalSpec

    options = {"samples": args.samples, "depths": args.depths, "tasks": args.tasks, "haystack": args.haystack,
               "text": args.text, "decode_budget": args.decode_budget, "prompt_style": args.prompt_style,
               "kv": args.kv, "kv_capacity": args.kv_capacity, "kv_kernel": args.kv_kernel}
    if args.task == ALL:
        options = {name: value for name, value in options.items() if task in _ROUTED[name]}
    options["ruler_tasks"] = options.pop("tasks", RULER_TASKS)
    return EvalSpec(
        task=task, out=args.out, model=args.model, methods=args.method, config=args.config, presets=args.preset,
        lengths=args.lengths, device=args.device, seed=args.seed, rope_scaling=not args.no_rope_scaling,
        progress=not args.no_progress, **options,
    )


def _handle(args: argparse.Namespace) -> int:
    from .runner import EVAL_TASKS, run_evals

    problem = _check_options(args)
    if problem is not None:
        print(f"sparse-prefill eval: error: {problem}", file=sys.stderr)
        return 2
    for name, default in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.preset = _preset_names(args.preset)
    if args.smoke:
        args.lengths, args.depths = SMOKE["lengths"], SMOKE["depths"]
        args.samples = SMOKE["samples"] if args.task != "needle" else None  # needle: one prompt per depth
    tasks = EVAL_TASKS if args.task == ALL else (args.task,)
    try:
        # Every task's options are checked (EvalSpec.check, in run_evals) before the model loads.
        summaries = run_evals([_spec(args, task) for task in tasks])
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"sparse-prefill eval: error: {error}", file=sys.stderr)
        return 2
    for task in tasks:
        if len(tasks) > 1:
            print(f"## {task}\n")
        print((Path(args.out) / f"{task}.md").read_text(encoding="utf-8"))
    if len(tasks) > 1:
        written = ", ".join(f"{task}.md" for task in tasks)
        print(f"results, tables ({written}) and plots in {args.out}/", file=sys.stderr)
    else:
        print(f"results, table and plots in {args.out}/", file=sys.stderr)
    return 0 if all(summary["methods"] for summary in summaries) else 1
