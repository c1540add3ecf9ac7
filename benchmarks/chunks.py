"""Sparse prefill in the shapes serving needs: chunks, a cached prefix, a padded batch (issue 14).

A Llama-3-8B-shaped transformers model (random bf16 weights, built as in ``e2e.py``) on one GPU,
through its own forward and a transformers ``DynamicCache``; only the attention differs between
``dense`` (transformers' SDPA) and ``sparse`` (``sparse_prefill.enable`` with ``--pattern`` on every
head, ``min_seq_len`` lowered so that every prefill in the run is sparse). Three workloads:

  chunked   one prompt of --seq tokens in one pass, and in --chunks equal chunks through the cache
            (``sparse_prefill.chunked_prefill``); time, and the first-token logits of sparse
            chunked against dense chunked and against sparse in one pass.
  cached    a cached prefix of --seq minus --suffix tokens, then a --suffix-token prefill on top of
            it: the suffix's time, sparse against dense, and its logits against dense.
  batch     --batch prompts of lengths spread from --seq / 4 to --seq, left-padded into one batch,
            against one prompt at a time: total time, and each prompt's logits against alone.

Why ``--pattern vertical_slash`` by default: random weights give diffuse attention, on which the
adaptive default preset (Block-Coverage 0.99) keeps nearly every block, so it would time dense work
through the sparse kernel (measured 2026-11-30: 376 ms of sparse kernel per layer at 128K against
cuDNN's ~250 ms). ``VerticalSlash(1000, 6096)``, as in ``e2e.py``, does a fixed amount of work per
row, the work real attention gets. For the same reason, the logits comparisons against dense say
how the shapes agree with each other (chunked against one pass), not how accurate sparse attention
is: this random model amplifies any perturbation (dense chunked against dense one pass differ by
0.04 from bf16 rounding alone). Accuracy is measured on real weights (docs/ACCURACY.md).

Times: CUDA events around each prefill (median of --repeats after one warm-up); on the CPU dry run
(--tiny), the wall clock, and the numbers mean nothing but every code path runs.

Usage (GPU machine, repository root):
    PYTHONPATH=src python3 benchmarks/chunks.py --out OUT            # 128K, 8 chunks, 8K suffix, batch of 4
        [--workloads chunked cached batch]                          # a subset (default: all three)
    (chunks.json is rewritten after every workload, so a run cut short keeps what it measured)
    python3 benchmarks/chunks.py --tiny --out /tmp/chunks           # CPU dry run, tiny model
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import sparse_prefill
from e2e import LLAMA3_8B, PATTERNS, TINY, TINY_PATTERNS, build_model, meta  # benchmarks/e2e.py
from sparse_prefill.patterns import PatternConfig

# Every prefill of the run (chunks, suffix, the shortest batch prompt) runs sparse: the comparison
# is of the shapes, not of the preset's dense fallback below 64K.
MIN_SEQ_LEN = {"gpu": 1024, "tiny": 64}
WORKLOADS = ("chunked", "cached", "batch")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=131072, help="prompt length (default 131072)")
    parser.add_argument("--chunks", type=int, default=8, help="chunks of the chunked prefill (default 8)")
    parser.add_argument("--suffix", type=int, default=8192, help="new tokens on the cached prefix (default 8192)")
    parser.add_argument("--batch", type=int, default=4, help="prompts in the padded batch (default 4)")
    parser.add_argument("--batch-max", type=int, default=65536,
                        help="longest prompt of the batch (default 65536: transformers builds a padded batch's mask as "
                        "batch x n x n booleans, 64 GiB for four 128K prompts)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                        help="which workloads to run (default: all three)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    parser.add_argument("--pattern", choices=["vertical_slash", "preset"], default="vertical_slash",
                        help="sparse attention on every head: e2e.py's VerticalSlash (default; fixed work per row) or "
                        "the default preset (adaptive: near dense on random weights)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (chunks.json, chunks.png)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, 512 tokens")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq, args.suffix, args.repeats, args.batch_max = 512, 128, 1, 256
    for name in ("seq", "chunks", "suffix", "batch", "repeats", "batch_max"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seq % args.chunks or (args.seq // args.chunks) % 64:
        parser.error(f"--seq must split into --chunks chunks of a multiple of 64 tokens, got {args.seq} / {args.chunks}")
    if args.suffix >= args.seq:
        parser.error(f"--suffix must be shorter than --seq, got {args.suffix} >= {args.seq}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA GPU; --tiny is the CPU dry run")
    return args


def timed(fn, repeats: int, device: torch.device):
    """(median milliseconds, last result) of ``fn()`` after one untimed warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cache_kwarg(model) -> str:
    from sparse_prefill.generation import _cache_kwarg

    return _cache_kwarg(model)


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def one_pass(model, ids, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs).logits[:, -1]


@torch.no_grad()
def on_prefix(model, ids, prefix: int) -> tuple[torch.Tensor, float]:
    """The suffix's logits and milliseconds, with the prefix prefilled (untimed) into a fresh cache."""
    cache = new_cache(model)
    model(input_ids=ids[:, :prefix], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    logits = model(input_ids=ids[:, prefix:], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return logits, (time.perf_counter() - begin) * 1e3


def run(args, save) -> dict:
    """The workloads of ``--workloads``; ``save(data)`` is called after each with everything measured so far."""
    device = torch.device("cpu" if args.tiny else "cuda")
    model = build_model(TINY if args.tiny else LLAMA3_8B, device)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, args.seq), generator=generator).to(device)
    rows, checks = [], {}
    min_seq_len = MIN_SEQ_LEN["tiny" if args.tiny else "gpu"]
    config = None
    if args.pattern == "vertical_slash":
        pattern = (TINY_PATTERNS if args.tiny else PATTERNS)["vertical_slash"]
        config = PatternConfig.uniform(model.config.num_hidden_layers, model.config.num_attention_heads, pattern)

    sparse_calls = {}
    data = {"meta": {**meta(device), "args": {k: str(v) for k, v in vars(args).items()},
                     "patterns": str(pattern) if config is not None else "preset default",
                     "min_seq_len": min_seq_len, "timing": "median of repeats after a warm-up"},
            "rows": rows, "checks": checks, "sparse_calls": sparse_calls}
    began = time.perf_counter()

    def both(fn, workload):
        """fn() under dense attention, then under sparse prefill: {"dense": x, "sparse": y}."""
        got = {"dense": fn()}
        print(f"[{time.perf_counter() - began:7.1f} s] {workload}: dense done", flush=True)
        state = sparse_prefill.enable(model, config, min_seq_len=min_seq_len)
        try:
            got["sparse"] = fn()
        finally:
            sparse_prefill.disable(model)
        print(f"[{time.perf_counter() - began:7.1f} s] {workload}: sparse done", flush=True)
        sparse_calls[workload] = sparse_calls.get(workload, 0) + state.sparse_calls  # layer calls that ran sparse
        return got

    # 1. Chunked against one pass.
    if "chunked" in args.workloads:
        measure_chunked(args, model, ids, both, rows, checks)
        save(data)

    # 2. A new prompt on a cached prefix.
    if "cached" in args.workloads:
        prefix = args.seq - args.suffix
        cached = both(lambda: [on_prefix(model, ids, prefix) for _ in range(args.repeats + 1)][1:], "cached")
        for path in ("dense", "sparse"):
            rows.append({"workload": "cached", "path": path, "how": f"{args.suffix} on {prefix} cached",
                         "tokens": args.suffix, "ms": statistics.median(ms for _, ms in cached[path])})
        checks["cached: sparse suffix vs dense suffix"] = rel(cached["sparse"][-1][0], cached["dense"][-1][0])
        save(data)

    # 3. A left-padded batch against one prompt at a time.
    if "batch" in args.workloads:
        data["meta"]["batch_lengths"] = measure_batch(args, model, vocab, generator, device, both, rows, checks)
        save(data)
    return data


def measure_chunked(args, model, ids, both, rows: list, checks: dict) -> None:
    """One prompt in one pass and in ``--chunks`` chunks through the cache, dense and sparse."""
    device = ids.device
    chunk = args.seq // args.chunks
    whole = both(lambda: timed(lambda: one_pass(model, ids), args.repeats, device), "chunked")
    chunked = both(lambda: timed(lambda: sparse_prefill.chunked_prefill(model, ids, chunk)[0], args.repeats, device), "chunked")
    for path in ("dense", "sparse"):
        rows.append({"workload": "chunked", "path": path, "how": "one pass", "tokens": args.seq, "ms": whole[path][0]})
        rows.append({"workload": "chunked", "path": path, "how": f"{args.chunks} chunks of {chunk}", "tokens": args.seq,
                     "ms": chunked[path][0]})
    checks["chunked: sparse chunked vs dense chunked (rel. L2 of first-token logits)"] = rel(chunked["sparse"][1], chunked["dense"][1])
    checks["chunked: sparse chunked vs sparse one pass"] = rel(chunked["sparse"][1], whole["sparse"][1])
    checks["chunked: dense chunked vs dense one pass"] = rel(chunked["dense"][1], whole["dense"][1])


def measure_batch(args, model, vocab: int, generator, device, both, rows: list, checks: dict) -> list[int]:
    """``--batch`` prompts of lengths spread up to ``--batch-max``, left-padded into one forward,
    against one prompt at a time, dense and sparse; returns the lengths."""
    top = args.batch_max
    lengths = [top // 4 + (top - top // 4) * i // max(1, args.batch - 1) // 64 * 64 for i in range(args.batch)]
    longest = max(lengths)
    batch_ids = torch.randint(3, vocab, (args.batch, longest), generator=generator).to(device)
    mask = torch.zeros(args.batch, longest, dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        mask[row, longest - n :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)

    def padded():
        return one_pass(model, batch_ids, attention_mask=mask, position_ids=positions)

    def alone():
        return torch.cat([one_pass(model, batch_ids[row : row + 1, longest - n :]) for row, n in enumerate(lengths)])

    batched, separate = both(lambda: timed(padded, args.repeats, device), "batch"), both(lambda: timed(alone, args.repeats, device), "batch")
    for path in ("dense", "sparse"):
        rows.append({"workload": "batch", "path": path, "how": f"{args.batch} prompts padded", "tokens": sum(lengths),
                     "ms": batched[path][0]})
        rows.append({"workload": "batch", "path": path, "how": "one at a time", "tokens": sum(lengths), "ms": separate[path][0]})
    checks["batch: sparse padded vs sparse alone (worst prompt)"] = max(
        rel(batched["sparse"][1][row], separate["sparse"][1][row]) for row in range(args.batch))
    return lengths


def plot(data: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in data["rows"])]
    figure, axes = plt.subplots(1, len(workloads), figsize=(max(7, 5 * len(workloads)), 4.5), squeeze=False)
    for axis, workload in zip(axes[0], workloads):
        rows = [r for r in data["rows"] if r["workload"] == workload]
        labels = sorted({r["how"] for r in rows}, key=lambda h: [r["how"] for r in rows].index(h))
        for offset, path in ((-0.2, "dense"), (0.2, "sparse")):
            values = [next(r["ms"] for r in rows if r["how"] == h and r["path"] == path) / 1e3 for h in labels]
            bars = axis.bar([i + offset for i in range(len(labels))], values, width=0.4, label=path)
            axis.bar_label(bars, fmt="%.2f", fontsize=8)
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
        axis.set_ylabel("seconds")
        axis.set_title(workload)
        axis.legend()
    figure.suptitle(f"sparse prefill in serving shapes; {data['meta'].get('gpu')}, {data['meta'].get('date')}")
    figure.tight_layout()
    path = out / "chunks.png"
    figure.savefig(path, dpi=110)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = run(args, save=lambda partial: (args.out / "chunks.json").write_text(json.dumps(partial, indent=1)))
    print(f"wrote {args.out / 'chunks.json'} and {plot(data, args.out)}")
    print(f"{'workload':9} {'path':7} {'how':28} {'tokens':>8} {'ms':>10}")
    for row in data["rows"]:
        print(f"{row['workload']:9} {row['path']:7} {row['how']:28} {row['tokens']:>8} {row['ms']:>10.1f}")
    for name, value in data["checks"].items():
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    main()
