"""``sparse-prefill eval``: its flags and its handler."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .methods import METHODS
from .needle import DEFAULT_DEPTHS
from .ruler import TASKS as RULER_TASKS
from .texts import TEXTS

__all__ = ["add_eval_command"]

# --smoke: CI-sized, minutes on a 2-core CPU, still long enough (1K tokens) that the sparse path and
# the scoring are exercised on prompts the model answers.
SMOKE = {"lengths": [1024], "samples": 1, "depths": [0.0, 0.5, 1.0]}


def _ints(text: str) -> list[int]:
    try:
        values = [int(part.lower().replace("k", "")) * (1024 if part.lower().endswith("k") else 1)
                  for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 2048,4096 or 2k,4k, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0,0.5,1, got {text!r}")


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_eval_command(commands) -> None:
    parser = commands.add_parser(
        "eval", help="accuracy: needle in a haystack, RULER-style tasks or perplexity, dense vs sparse vs a-shape",
        description="Evaluate attention methods on a real model. Results go to OUT/<task>.jsonl one sample at a "
        "time (a rerun skips what is there), then OUT/<task>.md, OUT/<task>_summary.json and PNG plots.",
    )
    parser.add_argument("task", help="needle, ruler or ppl")
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or a model directory")
    parser.add_argument("--method", type=_names, default=list(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all three)")
    parser.add_argument("--config", help="sparse method's patterns: a config JSON (default: the --preset on every head)")
    parser.add_argument("--preset", default="default",
                        help="sparse method's preset when no --config: default or fast (results labelled 'sparse (fast)')")
    parser.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192],
                        help="prompt lengths in tokens, comma-separated; 'k' means 1024 (default 2k,4k,8k)")
    parser.add_argument("--samples", type=int, help="samples per length (and task): ruler default 10, ppl default 4")
    parser.add_argument("--depths", type=_floats, default=list(DEFAULT_DEPTHS),
                        help="needle depths as fractions, comma-separated (default 0,0.1,...,1)")
    parser.add_argument("--tasks", type=_names, default=list(RULER_TASKS), help=f"ruler tasks (default: {', '.join(RULER_TASKS)})")
    parser.add_argument("--haystack", default="pg", help=f"needle/ruler filler text: {', '.join(TEXTS)} (default pg)")
    parser.add_argument("--text", default="kjv", help=f"perplexity text: {', '.join(TEXTS)} (default kjv)")
    parser.add_argument("--out", default="eval-results", help="results directory (default eval-results)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rope-scaling", action="store_true",
                        help="refuse lengths beyond the model's context instead of applying YaRN")
    parser.add_argument("--kv", default="full", metavar="METHOD",
                        help="KV cache kept for decoding (needle, ruler): full (default), snapkv, pyramidkv or "
                        "streamingllm; results are labelled e.g. 'sparse + snapkv 1024'")
    parser.add_argument("--kv-capacity", type=int, metavar="C", help="tokens kept per layer by --kv (default 1024)")
    parser.add_argument("--kv-kernel", type=int, metavar="K",
                        help="SnapKV/PyramidKV average-pool width, odd (default 5); labels get ' kK'")
    parser.add_argument("--smoke", action="store_true", help="CI-sized: 1K tokens, one sample, three depths")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from .runner import EvalSpec, run_eval

    if args.smoke:
        args.lengths, args.samples, args.depths = SMOKE["lengths"], SMOKE["samples"], SMOKE["depths"]
    spec = EvalSpec(
        task=args.task, out=args.out, model=args.model, methods=args.method, config=args.config, preset=args.preset,
        lengths=args.lengths, samples=args.samples, depths=args.depths, ruler_tasks=args.tasks,
        haystack=args.haystack, text=args.text, device=args.device, seed=args.seed,
        rope_scaling=not args.no_rope_scaling, progress=not args.no_progress, kv=args.kv, kv_capacity=args.kv_capacity,
        kv_kernel=args.kv_kernel,
    )
    try:
        summary = run_eval(spec)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"sparse-prefill eval: error: {error}", file=sys.stderr)
        return 2
    print((Path(args.out) / f"{args.task}.md").read_text(encoding="utf-8"))
    print(f"results, table and plots in {args.out}/", file=sys.stderr)
    return 0 if summary["methods"] else 1
