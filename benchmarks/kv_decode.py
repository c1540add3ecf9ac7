"""KV-cache compression on the GPU: cache memory and decoding speed per token after a sparse prefill.

SmolLM2-135M-Instruct (GGUF, bf16 on the GPU, YaRN for the longest length + decode tokens, used
for every length: speed and memory do not depend on the RoPE factor) prefills the first N tokens of
the King James Bible with sparse attention (sparse_prefill's default preset), once
per KV method, into that method's cache; then greedy decoding, one token per step, eager PyTorch.

Per (length, method): the cache's K+V bytes after the prefill, the peak GPU memory of the prefill
(weights included), the prefill time, the median wall time of a decoding step (CUDA-synchronised,
after warm-up steps), how many decoded tokens match the full cache's, and how many layers computed
the SnapKV window scores (``kv_cache.window_attention_scores``: one call per compressing layer that
needs them).

Usage (GPU machine, repository root):
  PYTHONPATH=src python3 benchmarks/kv_decode.py --model SmolLM2-135M-Instruct.Q4_1.gguf --text kjv.txt \
      --out OUT [--lengths 32768 65536 131072] [--capacity 1024] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import sparse_prefill
from sparse_prefill import kv_cache
from sparse_prefill.generation import prefill
from sparse_prefill.models import load_model

METHODS = ("full", "snapkv", "pyramidkv", "streamingllm")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--capacity", type=int, default=kv_cache.DEFAULT_CAPACITY)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--min-seq-len", type=int, help="sparse prefill from this length (default: the library's)")
    parser.add_argument("--decode-sdpa", choices=["default", "flash", "efficient", "math"], default="default",
                        help="SDPA backend for decoding steps (default: PyTorch's choice, cuDNN on an H100)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    longest = max(args.lengths) + args.decode_tokens
    loaded = load_model(args.model, dtype=torch.bfloat16, device="cuda", rope_scaling_for=longest, cache=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    token_ids = tokenizer(args.text.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    if len(token_ids) < max(args.lengths):
        raise ValueError(f"--text has {len(token_ids)} tokens, fewer than {max(args.lengths)}")
    state = sparse_prefill.enable(model) if args.min_seq_len is None else sparse_prefill.enable(model, min_seq_len=args.min_seq_len)
    config_source = state.describe()
    weights = torch.cuda.memory_allocated()

    # Count the layers that computed SnapKV window scores.
    apart_calls = [0]
    computed_apart = kv_cache.window_attention_scores

    def counting(*a, **kw):
        apart_calls[0] += 1
        return computed_apart(*a, **kw)

    kv_cache.window_attention_scores = counting  # this script's own measurement, on our own module

    # Warm-up at the smallest length: Triton compilation and autotuning are not timed.
    ids = token_ids[None, : min(args.lengths)].cuda()
    prefill(model, ids, cache=kv_cache.make_kv_cache("snapkv", model, args.capacity))
    rows = []
    for seq in args.lengths:
        ids = token_ids[None, :seq].cuda()
        reference_tokens = None
        for method in args.methods:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cache = kv_cache.make_kv_cache(method, model, args.capacity)
            apart_calls[0] = 0
            sparse_before = state.sparse_calls
            torch.cuda.synchronize()
            logits, cache, prefill_seconds = prefill(model, ids, cache=cache)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            stats = kv_cache.cache_stats(cache)
            sparse_layers = state.sparse_calls - sparse_before
            tokens, step_seconds = [], []
            token = logits.argmax(dim=-1, keepdim=True)
            with decode_backend(args.decode_sdpa):
                for _ in range(args.decode_tokens):
                    tokens.append(int(token))
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    output = model(input_ids=token, past_key_values=cache, use_cache=True)
                    token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
                    torch.cuda.synchronize()
                    step_seconds.append(time.perf_counter() - start)
            if method == "full":
                reference_tokens = tokens
            timed = step_seconds[args.warmup_steps :]
            row = {
                "seq": seq,
                "method": method,
                "capacity": None if method == "full" else args.capacity,
                "cache_mib": stats["bytes"] / 2**20,
                "keys_held_mean": stats["keys_held_mean"],
                "prefill_s": prefill_seconds,
                "sparse_prefill_layers": sparse_layers,
                "prefill_peak_gib": peak / 2**30,
                "prefill_peak_over_weights_gib": (peak - weights) / 2**30,
                "decode_ms_per_token": 1e3 * statistics.median(timed),
                "decode_ms_p90": 1e3 * sorted(timed)[int(0.9 * (len(timed) - 1))],
                "scores_computed_apart_layers": apart_calls[0],
                "tokens_matching_full": None if reference_tokens is None else
                next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), len(tokens)),
            }
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            del cache, output, logits
    kv_cache.window_attention_scores = computed_apart

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": loaded.source,
        "rope_scaling": loaded.rope_scaling,
        "pattern_config": config_source,
        "capacity": args.capacity,
        "decode_tokens": args.decode_tokens,
        "warmup_steps": args.warmup_steps,
        "decode_sdpa": args.decode_sdpa,
        "rows": rows,
    }
    import transformers
    import triton

    result.update(transformers=transformers.__version__, triton=triton.__version__)
    (args.out / "kv_decode.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "kv_decode.png", args.capacity)
    print(f"\n{'seq':>7} {'method':<13} {'cache MiB':>10} {'peak GiB':>9} {'prefill s':>9} {'ms/token':>9} {'match':>6} {'apart':>6}")
    for r in rows:
        print(f"{r['seq']:>7} {r['method']:<13} {r['cache_mib']:>10.1f} {r['prefill_peak_gib']:>9.2f} {r['prefill_s']:>9.2f} "
              f"{r['decode_ms_per_token']:>9.2f} {str(r['tokens_matching_full']):>6} {r['scores_computed_apart_layers']:>6}")


def decode_backend(name: str):
    """Context pinning SDPA to one backend for the decoding steps; "default" leaves PyTorch's choice.

    Why: on the H100 PyTorch picks cuDNN, which builds an execution plan for every new key length,
    and every decoding step has a new one (see docs/BENCHMARKS.md, KV-cache compression).
    """
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return contextlib.nullcontext() if name == "default" else sdpa_kernel(backends[name])


def plot(rows: list[dict], path: Path, capacity: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seqs = [r["seq"] // 1024 for r in mine]
        left.plot(seqs, [r["cache_mib"] for r in mine], marker="o", label=method)
        right.plot(seqs, [r["decode_ms_per_token"] for r in mine], marker="o", label=method)
    left.set(xlabel="prompt (K tokens)", ylabel="KV cache (MiB)", yscale="log", title=f"cache after prefill (capacity {capacity})")
    right.set(xlabel="prompt (K tokens)", ylabel="ms per decoded token (median)", yscale="log",
              title="decoding step, SmolLM2-135M (eager, default SDPA)")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
