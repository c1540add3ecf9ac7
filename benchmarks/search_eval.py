"""Searched pattern config against the uniform default on SmolLM2: recall, cost and kernel time.

1. Search (unless --config is given): ``sparse_prefill.search.run.search`` at --length tokens on
   --samples calibration prompts of the King James Bible (text, needle, key-value in turn).
2. Held-out prompts at the same length (other windows, other needles and keys): per config and
   layer, the recall of the kept sets the GPU plan chose, the pairs the kernel computed (tiles and
   gathered columns) and the index and kernel times.
3. Longer prompts (--lengths, YaRN factor N / 8192): the same per layer, against dense cuDNN, for
   the uniform default at that length, the uniform 8K default scaled fixed and proportionally, and the
   searched config under its own rule, fixed and proportionally.

Usage (GPU machine, repository root):
  PYTHONPATH=src python3 benchmarks/search_eval.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
      --text kjv.txt --out OUT [--config patterns.json] [--samples 9] [--heldout 6] \\
      [--lengths 32768 131072]
Writes OUT/search_eval.json (rows and summary) and, after a search, the config, its heatmap and
the search's work directory as a tar file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from timing import cuda_ms  # benchmarks/timing.py
from sparse_prefill.kinds.vertical_slash import minference_budget
from sparse_prefill.kernels import build_plan, run_plan
from sparse_prefill.models import load_model
from sparse_prefill.patterns import PatternConfig
from sparse_prefill.search.candidates import score_indices
from sparse_prefill.search.prompts import calibration_prompt
from sparse_prefill.search.run import run_layers, search
from sparse_prefill.search.stats import BLOCK, COLUMN_PAIR_COST, causal_pairs


def plan_pairs(plan) -> tuple[float, float]:
    """Mean over heads of (tile pairs, gathered-column pairs) the kernel computes (batch 1): 64 x 64 per
    listed tile, and per query block its gathered columns in tiles of 64 (as ``SparsePlan.computed_pairs``)."""
    tiles = plan.diagonal_limit.sum(dim=1).double() + plan.block_count.sum(dim=1).double()
    column_tiles = (-(-plan.column_before.long() // BLOCK)).sum(dim=1).double()
    return float(tiles.mean()) * BLOCK * BLOCK, float(column_tiles.mean()) * BLOCK * BLOCK


def measure(loaded, prompt_ids, configs: dict, seq: int, *, layers, timing: bool, recall_layers, repeats: int,
            tag: dict) -> list:
    """Per layer: every config's plan (index and kernel time, pairs) and recall; dense cuDNN time."""
    rows = []

    def on_layer(layer, q, k, scale):
        q4, k4 = q[None].contiguous(), k[None].contiguous()
        v4 = torch.randn_like(k4)  # the kernel's time does not depend on V's values
        dense_ms = None
        if timing:
            group = q4.shape[1] // k4.shape[1]
            k_full, v_full = k4.repeat_interleave(group, 1), v4.repeat_interleave(group, 1)

            def dense():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    F.scaled_dot_product_attention(q4, k_full, v_full, is_causal=True)

            dense_ms = cuda_ms(dense, repeats=repeats)
            del k_full, v_full
        plans = {}
        for name, config in configs.items():
            patterns = list(config.layer_at(layer, seq))
            plan = build_plan(q4, k4, patterns, scale)
            row = {**tag, "seq": seq, "layer": layer, "config": name, "dense_ms": dense_ms}
            if timing:
                out = torch.empty_like(q4)
                row["index_ms"] = cuda_ms(lambda: build_plan(q4, k4, patterns, scale), repeats=repeats)
                row["kernel_ms"] = cuda_ms(lambda: run_plan(q4, k4, v4, plan, scale, out=out), repeats=repeats)
            row["tile_pairs"], row["column_pairs"] = plan_pairs(plan)
            row["kinds"] = sorted({p.kind for p in patterns})
            plans[name] = plan
            rows.append(row)
        if layer in recall_layers:
            scores = score_indices(q, k, scale, [plans[name].indices for name in configs])
            for row, score in zip(rows[-len(configs):], scores):
                row["recall"] = statistics.mean(score.recall)
                row["recall_heads"] = score.recall
        del plans

    run_layers(loaded.model, prompt_ids.to(loaded.model.device), layers, on_layer)
    return rows


def summarise(rows: list) -> list:
    table = []
    keys = sorted({(r["seq"], r["config"]) for r in rows}, key=lambda key: (key[0], list(dict.fromkeys(r["config"] for r in rows)).index(key[1])))
    for seq, name in keys:
        mine = [r for r in rows if r["seq"] == seq and r["config"] == name]
        pairs = causal_pairs(seq)
        entry = {
            "seq": seq, "config": name,
            "recall": statistics.mean(r["recall"] for r in mine if "recall" in r) if any("recall" in r for r in mine) else None,
            "min_layer_recall": min((r["recall"] for r in mine if "recall" in r), default=None),
            "computed": statistics.mean((r["tile_pairs"] + r["column_pairs"]) / pairs for r in mine),
            "weighted_density": statistics.mean((r["tile_pairs"] + COLUMN_PAIR_COST * r["column_pairs"]) / pairs for r in mine),
        }
        if all(r.get("kernel_ms") is not None for r in mine):
            # Sums over the layers of one prompt (means over prompts when there are several).
            n_prompts = len({r.get("prompt", 0) for r in mine})
            entry["index_ms"] = sum(r["index_ms"] for r in mine) / n_prompts
            entry["kernel_ms"] = sum(r["kernel_ms"] for r in mine) / n_prompts
            entry["dense_ms"] = sum(r["dense_ms"] for r in mine) / n_prompts
            entry["speedup"] = entry["dense_ms"] / (entry["index_ms"] + entry["kernel_ms"])
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="evaluate this config instead of searching")
    parser.add_argument("--configs", nargs="*", default=[],
                        help="NAME=PATH ...: evaluate these configs (under their own scaling rules) against the uniform "
                        "default instead of searching; no scaling variants")
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heldout", type=int, default=6)
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--recall-every", type=int, default=3, help="recall on every n-th layer beyond --length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="*", help="only these layers (a dry run); default all")
    parser.add_argument("--work-dir", type=Path, help="the search's work directory (default OUT/work)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timing = device == "cuda"
    text = args.text.read_text(encoding="utf-8")
    started = time.time()
    results = {"meta": {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if timing else "cpu",
                        "torch": torch.__version__, "model": str(args.model), "text": str(args.text)}, "rows": []}

    def save():
        results["summary"] = summarise(results["rows"])
        (args.out / "search_eval.json").write_text(json.dumps(results, indent=1))

    loaded = load_model(args.model, dtype=torch.bfloat16 if timing else torch.float32, device=device, cache=False)
    n_layers, n_heads = loaded.model.config.num_hidden_layers, loaded.model.config.num_attention_heads
    layers = args.layers if args.layers else list(range(n_layers))
    extra = {}
    for item in args.configs:
        name, _, path = item.partition("=")
        extra[name] = PatternConfig.load(path)
    if extra:
        config = None
    elif args.config is None:
        work = args.work_dir or args.out / "work"
        result = search(loaded, args.out / "smollm2-135m.json", samples=args.samples, length=args.length, text=text,
                        text_name="King James Bible", device=device, work_dir=work, progress=False,
                        layers=layers)
        config = result.config
        with tarfile.open(args.out / "search-work.tar.gz", "w:gz") as tar:
            tar.add(work, arcname="work")
        results["search"] = {**result.summary, "seconds": time.time() - started}
        print(f"search: {result.summary} in {time.time() - started:.0f} s", flush=True)
    else:
        config = PatternConfig.load(args.config)
    uniform = PatternConfig.uniform(n_layers, n_heads, minference_budget(args.length))
    configs = ({"uniform": uniform, **extra} if extra else
               {"uniform": uniform, "searched": config})
    for i in range(args.heldout):
        prompt = calibration_prompt(loaded.tokenizer, text, args.length, 100 + i, seed=1)
        results["rows"] += measure(loaded, prompt.input_ids, configs, args.length, layers=layers, timing=timing,
                                   recall_layers=set(layers), repeats=args.repeats,
                                   tag={"prompt": i, "kind": prompt.kind})
        save()
    print(f"held-out done at {time.time() - started:.0f} s", flush=True)
    del loaded

    reference = args.length
    for seq in args.lengths:
        loaded = load_model(args.model, dtype=torch.bfloat16 if timing else torch.float32, device=device,
                            rope_scaling_for=seq if seq > reference else None, cache=False)
        uniform_8k = PatternConfig.uniform(n_layers, n_heads, minference_budget(reference))
        searched = config.layers if config is not None else None
        long_configs = {"uniform": PatternConfig.uniform(n_layers, n_heads, minference_budget(seq)), **extra} if extra else {
            "uniform": PatternConfig.uniform(n_layers, n_heads, minference_budget(seq)),
            "uniform_fixed": uniform_8k,
            "uniform_proportional": PatternConfig(uniform_8k.layers, reference_length=reference, scaling="proportional"),
            "searched": config,
            "searched_fixed": PatternConfig(searched, config.metadata),
            "searched_proportional": PatternConfig(searched, config.metadata, reference_length=reference, scaling="proportional"),
        }
        prompt = calibration_prompt(loaded.tokenizer, text, seq, 300, seed=1)  # index 300: a plain text window
        results["rows"] += measure(loaded, prompt.input_ids, long_configs, seq, layers=layers, timing=timing,
                                   recall_layers=set(layers[:: args.recall_every]), repeats=args.repeats,
                                   tag={"prompt": 0, "kind": prompt.kind})
        save()
        print(f"{seq} done at {time.time() - started:.0f} s", flush=True)
        del loaded
        torch.cuda.empty_cache() if timing else None
    save()
    print(f"{'seq':>7} {'config':<22} {'recall':>7} {'min L':>6} {'computed':>9} {'w.dens':>7} {'index':>7} {'kernel':>8} {'dense':>8} {'x dense':>7}")
    for e in results["summary"]:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{e['seq']:>7} {e['config']:<22} {fmt(e['recall'], '7.4f')} {fmt(e['min_layer_recall'], '6.3f')} "
              f"{e['computed']:>9.4f} {e['weighted_density']:>7.4f} {fmt(e.get('index_ms'), '7.1f')} "
              f"{fmt(e.get('kernel_ms'), '8.1f')} {fmt(e.get('dense_ms'), '8.1f')} {fmt(e.get('speedup'), '7.2f')}")


if __name__ == "__main__":
    main()
