"""Which pages should a sparse decode step keep? Recovery of GQA combination rules and page sizes.

On SmolLM2-135M (9 query / 3 KV heads) and ~8K tokens of the King James Bible: the post-RoPE Q/K of
every other layer are captured once, and the queries of 64 positions (the last 32 and 32 random ones
after position 1024) are treated as decode steps over the keys up to them. For every page size and
token budget, each rule ranks the free pages of every KV head (sink 16, window 64 forced, as
``sparse_prefill.decoding.select_pages`` does), and the recovery ratio (the dense attention mass
on the kept keys, averaged over query heads, steps and layers) is reported:

  max_raw    max over the group's query heads of the page's logit bound
  sum_raw    sum of the bounds
  mass_sum   sum of per-head softmaxes of the bounds (what select_pages uses)
  mass_max   max of per-head softmaxes
  oracle     the true attention mass of the page summed over the group (the best a shared page choice can do)

CPU only (about 5 minutes on 2 cores). Usage:
    PYTHONPATH=src python3 benchmarks/decode_selection.py --out benchmarks/results/decode_selection.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparse_prefill.decoding import choose_pages, page_summaries, page_upper_bounds
from sparse_prefill.integrations.capture import capture_qkv
from sparse_prefill.models import kjv_text, load_model

RULES = ("max_raw", "sum_raw", "mass_sum", "mass_max", "oracle")


def rule_scores(bounds: torch.Tensor, page_mass: torch.Tensor, kv_heads: int) -> dict[str, torch.Tensor]:
    """bounds, page_mass [q_heads, n_pages] -> {rule: [1, kv_heads, n_pages]}."""
    grouped = bounds.view(kv_heads, -1, bounds.shape[-1])  # [kv_heads, group, n_pages]
    scores = {
        "max_raw": grouped.amax(1), "sum_raw": grouped.sum(1), "mass_sum": grouped.softmax(-1).sum(1),
        "mass_max": grouped.softmax(-1).amax(1), "oracle": page_mass.view(kv_heads, -1, bounds.shape[-1]).sum(1),
    }
    return {rule: score[None] for rule, score in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--local", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model()
    ids = loaded.tokenizer(kjv_text(), return_tensors="pt").input_ids[:, : args.tokens]
    n = ids.shape[1]
    layers = list(range(0, loaded.model.config.num_hidden_layers, 2))
    start = time.time()
    captured = capture_qkv(loaded.model, ids, layers)
    steps = list(range(n - 32, n)) + sorted(torch.randint(1024, n - 32, (32,)).tolist())
    recovered: dict[tuple, list[float]] = {}
    for layer in layers:
        q, k, _ = captured[layer]
        kv_heads, head_dim = k.shape[1], k.shape[3]
        for page_size in args.page_sizes:
            for position in steps:
                keys, query = k[:, :, : position + 1], q[:, :, position : position + 1]
                summaries = page_summaries(keys, page_size)
                bounds = page_upper_bounds(query, summaries)[0]  # [q_heads, n_pages]
                logits = torch.matmul(query[0], keys[0].repeat_interleave(q.shape[1] // kv_heads, 0).transpose(-1, -2))
                probabilities = (logits[:, 0] * head_dim**-0.5).softmax(-1)  # [q_heads, keys]
                pad = summaries.n_pages * page_size - (position + 1)
                page_mass = torch.nn.functional.pad(probabilities, (0, pad)).view(q.shape[1], -1, page_size).sum(-1)
                for rule, scores in rule_scores(bounds, page_mass, kv_heads).items():
                    for budget in args.budgets:
                        selection = choose_pages(scores, position + 1, page_size, budget=budget, sink=args.sink,
                                                 local=args.local)
                        kept = selection.kept_mask()[0].repeat_interleave(q.shape[1] // kv_heads, 0)
                        recovered.setdefault((layer, page_size, budget, rule), []).append(
                            float((probabilities * kept).sum(-1).mean()))
        print(f"layer {layer} done at {time.time() - start:.0f} s", flush=True)
    mean = {key: sum(values) / len(values) for key, values in recovered.items()}
    table = {
        f"page{page_size}_budget{budget}": {rule: sum(mean[(l, page_size, budget, rule)] for l in layers) / len(layers)
                                           for rule in RULES}
        for page_size in args.page_sizes for budget in args.budgets
    }
    for name, row in table.items():
        print(f"{name:20s} " + " ".join(f"{rule}={value:.4f}" for rule, value in row.items()))
    result = {"tokens": n, "layers": layers, "steps": steps, "sink": args.sink, "local": args.local,
              "mean_recovery": table,
              "per_layer": {f"{l}/page{p}/budget{b}/{r}": v for (l, p, b, r), v in mean.items()}}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
