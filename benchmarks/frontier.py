"""The accuracy-speed frontier: output error against time for every method and budget (GPU; --tiny on CPU).

A speed figure means nothing without its error: budgets of different methods do not buy the same
work. For every workload, length, layer, method and budget this measures, in one run:

- time: ``build_plan`` (index estimation + work list) and ``run_plan`` (the sparse kernel), CUDA
  events, warm-up first (it also triggers Triton's autotuning for the layer's shape), median of
  repeats; dense causal attention through torch SDPA with the cuDNN and FlashAttention-2 backends
  (K/V repeated to the query heads outside the timed region), measured up to ``--max-dense`` tokens
  and extrapolated quadratically in causal pairs beyond it (``dense_extrapolated``);
- error, on sampled query rows (the last 512 and 512 drawn uniformly from the rest, fixed seed):
  the kernel's output against exact dense causal attention in float32, ``rel_l2`` over all sampled
  rows and heads (root of summed squared errors over summed squared norms), ``rel_l2_last`` and
  ``rel_l2_random`` over each row set alone (early rows are served worst), and ``recall``, the dense
  attention mass on the kept set (mean over sampled rows and heads);
- work: ``computed_fraction`` (pairs the kernel multiplies over the causal pairs) and the kernel's
  effective TFLOP/s on them (4 * head_dim FLOPs a pair: QK^T and PV).

Workloads:
  real     post-RoPE Q/K/V captured from SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64, bf16)
           on the King James Bible (``--text``), YaRN RoPE scaling beyond 8K; layers ``--layers``;
           with ``--model gemma3-270m``, Gemma 3 270M's global layers (4 query heads, 1 KV head,
           head_dim 256; native context 32K: pass ``--layers 5 11 17``)
  planted  ``sparse_prefill.synthetic.planted_qkv`` at Llama-3-8B shapes (32 query heads, 8 KV
           heads, head_dim 128, bf16); reported as layer 0
Every head of a layer gets the same pattern. The sweeps are :data:`SWEEPS`; ``default`` and
``fast`` are the library's presets (:mod:`sparse_prefill.presets`), dense below their crossover.

Output (``--out``): ``frontier.json`` (``{"meta": ..., "rows": [...]}``, rewritten after every
workload and length, so a killed run keeps what it measured), ``frontier-<workload>.png`` (x: total
ms, y: rel_l2, one curve per method, one panel per length) and a table printed last.

Usage (GPU machine, repository root, ``PYTHONPATH=src``):
  python3 benchmarks/frontier.py --model SmolLM2-135M-Instruct.Q4_1.gguf --text kjv.txt --out OUT
      [--workloads real planted] [--lengths ...] [--layers 1 8 15 22 29] [--methods ...]
  python3 benchmarks/frontier.py --tiny --out DIR      # CPU dry run (Triton interpreter), for CI
  python3 benchmarks/frontier.py --replot OUT/frontier.json   # redraw the PNGs, no GPU needed
The text: the whole KJV from Debian's bible-kjv, ``bible -f Genesis1:1-Revelation22:21``, verse
references stripped (``sed 's/^[^ ]* //'``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash
from sparse_prefill.presets import PRESETS
from sparse_prefill.search.stats import causal_pairs
from timing import cuda_ms  # benchmarks/timing.py

# Budgets per method, every head of a layer gets the same pattern. Vertical-Slash budgets are
# MInference's numbers for 128K tokens, used as-is at every length.
SWEEPS = {
    "vertical_slash": [VerticalSlash(v, s) for v, s in
                       ((250, 1524), (500, 3048), (1000, 6096), (1000, 12192), (1000, 24384), (2000, 48768))],
    "block_sparse": [BlockSparse(top_k) for top_k in (16, 32, 64, 128, 256)],
    "a_shape": [AShape(64, local) for local in (2048, 8192, 32768)],
    "block_coverage": [BlockCoverage(c, stride=16) for c in (0.8, 0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.995)]
    + [BlockCoverage(c, stride=32) for c in (0.9, 0.95, 0.98, 0.985, 0.99, 0.995)] + [BlockCoverage(0.98, stride=8)],
}
# The CPU dry run: sizes the Triton interpreter gets through in seconds (seq 256-320 is 4-5 blocks).
TINY_SWEEPS = {
    "vertical_slash": [VerticalSlash(4, 64), VerticalSlash(16, 128)],
    "block_sparse": [BlockSparse(1), BlockSparse(2)],
    "a_shape": [AShape(4, 64), AShape(16, 128)],
    "block_coverage": [BlockCoverage(0.8, stride=16), BlockCoverage(0.99, stride=16)],
}
PRESET_METHODS = ("default", "fast")
METHODS = (*SWEEPS, *PRESET_METHODS)
DENSE_METHODS = ("dense_cudnn", "dense_flash2")

# The project's error sample: the last rows and as many random earlier rows (fixed seed).
SAMPLE_LAST, SAMPLE_RANDOM, SAMPLE_SEED = 512, 512, 0
# Rows of the float32 reference at a time: logits of one head are rows x seq floats (1 GiB at 1M x 256).
REFERENCE_ELEMENTS = 2**28

REAL = dict(q_heads=9, kv_heads=3, head_dim=64, dtype="bfloat16")  # SmolLM2-135M
REAL_GEMMA3 = dict(q_heads=4, kv_heads=1, head_dim=256, dtype="bfloat16")  # Gemma 3 270M's global layers
PLANTED = dict(q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
TINY = dict(batch=1, q_heads=4, kv_heads=2, head_dim=64, lengths=(256, 320), sample_last=64, sample_random=64)

# The frontier targets on the real 128K workload: (speed-up over dense cuDNN, error).
TARGETS = ((3.0, 0.03), (5.0, 0.08))
# The original MInference implementation on the same real 128K tensors, H200, 2026-11-30 (its own
# estimator, index converter and Triton kernel built from its sources; measured in a separate run,
# issue 13, with dense cuDNN at 41.9 ms): (V, S) budget -> (ms per layer, rel_l2). Drawn for reference
# in the real 128K panel; it is not part of this benchmark's run.
ORIGINAL_128K = {"250,1524": (20.6, 0.081), "500,3048": (29.7, 0.050), "1000,6096": (40.6, 0.030),
                 "1000,12192": (56.1, 0.017), "1000,24384": (83.5, 0.009), "2000,48768": (130.8, 0.005)}

ROW_KEYS = (
    "workload", "seq", "layer", "method", "budget", "index_ms", "kernel_ms", "total_ms", "dense_cudnn_ms",
    "dense_flash2_ms", "dense_extrapolated", "computed_fraction", "recall", "rel_l2", "rel_l2_last",
    "rel_l2_random", "speedup_vs_cudnn", "kernel_tflops", "cudnn_tflops", "index_share_of_cudnn",
)


# ----------------------------------------------------------------------------------------------
# Error against exact dense attention on sampled rows


def sample_rows(seq: int, n_last: int, n_random: int, seed: int = SAMPLE_SEED) -> dict[str, torch.Tensor]:
    """The sampled query rows: ``{"last": ..., "random": ...}``, long, ascending, on the CPU.

    ``n_last`` rows end the sequence; ``n_random`` are drawn without replacement from the rows
    before them. Both are clamped to what the sequence has (``random`` may be empty).
    """
    n_last = min(n_last, seq)
    earlier = seq - n_last
    generator = torch.Generator().manual_seed(seed)
    random_rows = torch.randperm(earlier, generator=generator)[: min(n_random, earlier)].sort().values
    return {"last": torch.arange(earlier, seq), "random": random_rows}


def sampled_error(q, k, v, out, indices, row_sets: dict, scale: float) -> dict:
    """Relative L2 error of ``out`` and recall of ``indices`` on the sampled rows, against float32 dense attention.

    Parameters
    ----------
    q : [batch, q_heads, seq, head_dim]; k, v : [batch, kv_heads, seq, head_dim]
        The layer's inputs; query head ``h`` reads KV head ``h // (q_heads // kv_heads)`` (K/V never repeated).
    out : [batch, q_heads, seq, head_dim]
        The kernel's output.
    indices : list of HeadIndex, one per query head
        What the plan kept; ``indices[h].kept_mask(rows, seq)`` is bool [batch, len(rows), seq].
    row_sets : dict of name -> long [n] rows
        From :func:`sample_rows`.

    Returns
    -------
    dict with ``rel_l2`` (all rows and heads), ``rel_l2_<name>`` per row set (None for an empty
    set) and ``recall`` (mean over sampled rows, heads and batch of the dense mass on the kept set).
    """
    batch, q_heads, seq, _ = q.shape
    group = q_heads // k.shape[1]
    device = q.device
    # One head and a few hundred rows at a time: at 1M tokens one row of logits is 4 MB.
    chunk = max(16, min(256, REFERENCE_ELEMENTS // (batch * seq)))
    keys = torch.arange(seq, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    squared_error = {name: zero.clone() for name in row_sets}
    squared_norm = {name: zero.clone() for name in row_sets}
    kept_mass, n_rows = zero.clone(), 0
    for kv_head in range(k.shape[1]):
        k32 = k[:, kv_head].float()  # [batch, seq, head_dim]
        v32 = v[:, kv_head].float()
        for head in range(kv_head * group, (kv_head + 1) * group):
            for name, rows in row_sets.items():
                for start in range(0, len(rows), chunk):
                    part = rows[start : start + chunk].to(device)
                    logits = torch.matmul(q[:, head, part].float(), k32.transpose(1, 2)) * scale  # [batch, rows, seq]
                    logits.masked_fill_(keys[None, :] > part[:, None], float("-inf"))
                    probs = logits.softmax(dim=-1)
                    logits = None  # frees a rows x seq buffer before the next one is made
                    reference = torch.matmul(probs, v32)  # [batch, rows, head_dim]
                    got = out[:, head, part].float()
                    squared_error[name] += (got - reference).double().square().sum()
                    squared_norm[name] += reference.double().square().sum()
                    kept = indices[head].kept_mask(part, seq)
                    kept_mass += probs.masked_fill_(~kept, 0.0).sum(dim=-1).double().sum()
                    n_rows += batch * len(part)
    result = {}
    for name in row_sets:
        norm = squared_norm[name].item()
        result[f"rel_l2_{name}"] = math.sqrt(squared_error[name].item() / norm) if norm > 0 else None
    total_norm = sum(value.item() for value in squared_norm.values())
    total_error = sum(value.item() for value in squared_error.values())
    result["rel_l2"] = math.sqrt(total_error / total_norm) if total_norm > 0 else float("nan")
    result["recall"] = kept_mass.item() / n_rows if n_rows else float("nan")
    return result


# ----------------------------------------------------------------------------------------------
# Timing


class DenseClock:
    """Dense SDPA times per workload shape: measured up to ``max_dense`` tokens, extrapolated beyond.

    Beyond ``max_dense`` the time is the largest measured length's, scaled by the ratio of causal
    pairs (attention is compute bound there). When nothing was measured yet for the workload, it is
    measured once at ``max_dense`` tokens on random inputs of the same shape.
    """

    def __init__(self, max_dense: int, repeats_for, tiny: bool):
        self.max_dense = max_dense
        self.repeats_for = repeats_for  # seq -> timed repeats
        self.tiny = tiny
        self.measured: dict[str, dict[int, dict[str, float]]] = {}

    def times(self, workload: str, q, k, v) -> tuple[dict[str, float], bool]:
        """``({"cudnn": ms, "flash2": ms}, extrapolated)`` for this workload at q's length."""
        seq = q.shape[2]
        mine = self.measured.setdefault(workload, {})
        if seq in mine:
            return mine[seq], False
        if seq <= self.max_dense:
            mine[seq] = self._measure(q, k, v)
            return mine[seq], False
        if not mine:
            batch, q_heads, _, head_dim = q.shape
            g = torch.Generator(device=q.device).manual_seed(0)
            shapes = ((batch, q_heads, self.max_dense, head_dim), (batch, k.shape[1], self.max_dense, head_dim))
            stand_in = [torch.randn(shapes[min(i, 1)], generator=g, device=q.device, dtype=q.dtype) for i in range(3)]
            mine[self.max_dense] = self._measure(*stand_in)
        base = max(mine)
        ratio = causal_pairs(seq) / causal_pairs(base)
        return {name: ms * ratio for name, ms in mine[base].items()}, True

    def _measure(self, q, k, v) -> dict[str, float]:
        group = q.shape[1] // k.shape[1]
        k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # SDPA wants equal heads

        def timed(backend) -> float:
            def dense():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

            return cuda_ms(dense, repeats=self.repeats_for(q.shape[2]))

        if self.tiny:  # no cuDNN or flash kernels on the CPU: one math-SDPA time stands in for both
            ms = timed(SDPBackend.MATH)
            return {"cudnn": ms, "flash2": ms}
        return {"cudnn": timed(SDPBackend.CUDNN_ATTENTION), "flash2": timed(SDPBackend.FLASH_ATTENTION)}


def measure_sparse(q, k, v, patterns: list, scale: float, out, repeats: int, warmup: int) -> tuple[float, float, object]:
    """``(index_ms, kernel_ms, plan)`` of one layer; ``out`` holds the kernel's output afterwards.

    The warm-up calls compile and autotune the Triton kernels for this layer's shape.
    """
    from sparse_prefill.kernels import build_plan, run_plan

    plans = []

    def build():
        plans[:] = [build_plan(q, k, patterns, scale)]  # keep the last one: it is the one run below

    index_ms = cuda_ms(build, repeats=repeats, warmup=warmup)
    plan = plans[0]
    out.fill_(float("nan"))  # a row the kernel leaves unwritten shows up as a NaN error
    kernel_ms = cuda_ms(lambda: run_plan(q, k, v, plan, scale, out=out), repeats=repeats, warmup=warmup)
    return index_ms, kernel_ms, plan


# ----------------------------------------------------------------------------------------------
# Rows


def make_row(layer: dict, method: str, budget: str, index_ms: float, kernel_ms: float, computed_pairs: float,
             errors: dict) -> dict:
    """One result row. ``layer`` holds workload, seq, layer, q_heads, head_dim, dense (ms), extrapolated;
    ``computed_pairs`` is the mean over heads of the pairs the kernel multiplies."""
    seq, head_dim, q_heads = layer["seq"], layer["head_dim"], layer["q_heads"]
    cudnn_ms = layer["dense"]["cudnn"]
    total_ms = index_ms + kernel_ms
    return {
        "workload": layer["workload"], "seq": seq, "layer": layer["layer"], "method": method, "budget": budget,
        "index_ms": index_ms, "kernel_ms": kernel_ms, "total_ms": total_ms,
        "dense_cudnn_ms": cudnn_ms, "dense_flash2_ms": layer["dense"]["flash2"],
        "dense_extrapolated": layer["extrapolated"],
        "computed_fraction": computed_pairs / causal_pairs(seq),
        "recall": errors["recall"], "rel_l2": errors["rel_l2"],
        "rel_l2_last": errors["rel_l2_last"], "rel_l2_random": errors["rel_l2_random"],
        "speedup_vs_cudnn": cudnn_ms / total_ms,
        # 4 * head_dim FLOPs a pair: 2 * head_dim for QK^T and as many for PV.
        "kernel_tflops": 4 * head_dim * computed_pairs * q_heads / kernel_ms / 1e9,
        "cudnn_tflops": 4 * head_dim * causal_pairs(seq) * q_heads / cudnn_ms / 1e9,
        "index_share_of_cudnn": index_ms / cudnn_ms,
    }


EXACT = {"recall": 1.0, "rel_l2": 0.0, "rel_l2_last": 0.0, "rel_l2_random": 0.0}


def dense_rows(layer: dict) -> list[dict]:
    """The dense baselines as rows of their own: exact, every causal pair computed."""
    pairs = causal_pairs(layer["seq"])
    return [make_row(layer, method, "dense", 0.0, layer["dense"][backend], pairs, EXACT)
            for method, backend in zip(DENSE_METHODS, ("cudnn", "flash2"))]


def measure_layer(layer: dict, q, k, v, methods: list, sweeps: dict, settings: dict, failures: list,
                  save=lambda rows: None) -> list[dict]:
    """Every selected method and budget on one layer's Q/K/V; returns the rows (dense ones first).

    ``save(rows)`` is called with this layer's rows after each budget (a 1M-token layer takes minutes:
    a run stopped at its time limit keeps what it measured)."""
    seq, q_heads, head_dim = layer["seq"], layer["q_heads"], layer["head_dim"]
    scale = head_dim**-0.5
    row_sets = sample_rows(seq, settings["sample_last"], settings["sample_random"])
    rows = dense_rows(layer)
    out = torch.empty_like(q)  # reused by every budget: at 1M tokens it is 8 GB
    jobs = [(m, p) for m in methods if m in sweeps for p in sweeps[m]]
    jobs += [(m, PRESETS[m].pattern_for(seq, on_cuda=True)) for m in methods if m in PRESET_METHODS]
    for method, pattern in jobs:
        budget = pattern.label()
        # Printed before the work, so a run killed mid-budget shows which one it was in.
        print(f"{layer['workload']:7s} {seq:>8d} L{layer['layer']:<2d} {method:14s} {budget:12s}", end=" ", flush=True)
        if isinstance(pattern, Dense):  # a preset below its crossover runs dense cuDNN, not our kernel
            row = make_row(layer, method, budget, 0.0, layer["dense"]["cudnn"], causal_pairs(seq), EXACT)
        else:
            try:
                index_ms, kernel_ms, plan = measure_sparse(q, k, v, [pattern] * q_heads, scale, out,
                                                           settings["repeats"], settings["warmup"])
                computed = plan.computed_pairs().double().mean().item()
                errors = sampled_error(q, k, v, out, plan.indices, row_sets, scale)
            except Exception as error:  # noqa: BLE001 - one failing budget must not cost the rest of a GPU run
                # Recorded and reported (the exit status says so); the next budget starts from a clean slate.
                failures.append({"workload": layer["workload"], "seq": seq, "layer": layer["layer"], "method": method,
                                 "budget": budget, "error": f"{type(error).__name__}: {error}"[:500],
                                 "out_of_memory": isinstance(error, torch.OutOfMemoryError)})
                print(f"FAILED: {type(error).__name__}: {str(error)[:200]}", flush=True)
                plan = None
                if q.is_cuda:
                    torch.cuda.empty_cache()
                continue
            plan = None  # frees the work list before the next budget builds its own
            row = make_row(layer, method, budget, index_ms, kernel_ms, computed, errors)
        rows.append(row)
        save(rows)
        print(f"index {row['index_ms']:8.2f} kernel {row['kernel_ms']:9.2f} ms  x{row['speedup_vs_cudnn']:5.2f}  "
              f"computed {row['computed_fraction']:6.1%}  rel_l2 {row['rel_l2']:.4f} "
              f"({fmt(row['rel_l2_last'])}/{fmt(row['rel_l2_random'])})  recall {row['recall']:.3f}  "
              f"{row['kernel_tflops']:5.0f} TF/s", flush=True)
    return rows


def fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# ----------------------------------------------------------------------------------------------
# Workloads


def planted_layers(lengths, shape: dict, dtype, device):
    """Yield ``(seq, {0: (q, k, v)})`` for the planted workload."""
    from sparse_prefill.synthetic import planted_qkv

    for seq in lengths:
        planted = planted_qkv(shape.get("batch", 1), shape["q_heads"], shape["kv_heads"], seq, shape["head_dim"],
                              dtype=dtype, device=device)
        yield seq, {0: (planted.q, planted.k, planted.v)}


def real_layers(lengths, layers, model: str, text_path: Path):
    """Yield ``(seq, {layer: (q, k, v)})`` captured from the real model on the text, the model freed first."""
    from sparse_prefill.integrations.capture import capture_qkv
    from sparse_prefill.models import load_model

    text = text_path.read_text(encoding="utf-8")
    token_ids = None
    for seq in lengths:
        print(f"real {seq}: capturing layers {list(layers)} from {model}", flush=True)
        loaded = load_model(model, dtype=torch.bfloat16, device="cuda",
                            rope_scaling_for=seq if seq > 8192 else None, cache=False)
        if token_ids is None:
            token_ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
            print(f"text: {len(token_ids)} tokens", flush=True)
        if len(token_ids) < seq:
            raise ValueError(f"--text has {len(token_ids)} tokens, fewer than the length {seq}")
        captured = capture_qkv(loaded.model, token_ids[None, :seq].cuda(), layers, device="cuda")
        loaded = None  # the model's weights and activations leave the GPU before anything is timed
        gc.collect()
        torch.cuda.empty_cache()
        yield seq, {layer: tuple(t.contiguous() for t in qkv) for layer, qkv in sorted(captured.items())}
        captured = None


# ----------------------------------------------------------------------------------------------
# Output: JSON, plots, table


def write_results(out_dir: Path, meta: dict, rows: list) -> Path:
    """Write ``frontier.json`` atomically (a run killed mid-write keeps the previous file)."""
    path = out_dir / "frontier.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(partial, path)
    return path


def curve_name(row: dict) -> str:
    """Block-Coverage gets one curve per stride: its budgets order by coverage only within one."""
    if row["method"] == "block_coverage" and "/s" in row["budget"]:
        return f"block_coverage s{row['budget'].split('/s')[1]}"
    if row["method"] in PRESET_METHODS:  # a preset whose pattern changed between runs: one point each
        return f"{row['method']} ({row['budget']})"
    return row["method"]


def mean_over_layers(rows: list) -> list[dict]:
    """One entry per (workload, seq, method, budget), in first-seen order (the sweep's order), means over layers."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["seq"], row["method"], row["budget"]), []).append(row)
    means = []
    for members in groups.values():
        entry = dict(members[0])
        for key in ROW_KEYS:
            values = [m[key] for m in members]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values) and key not in ("seq", "layer"):
                entry[key] = sum(values) / len(values)
            elif key == "rel_l2_random" and any(x is None for x in values):
                entry[key] = None
        entry["layers"] = sorted({m["layer"] for m in members})
        means.append(entry)
    return means


def plot(rows: list, meta: dict, out_dir: Path) -> list[Path]:
    """One PNG per workload: a panel per length, rel_l2 against total ms, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_over_layers(rows)
    paths = []
    for workload in sorted({r["workload"] for r in means}):
        mine = [r for r in means if r["workload"] == workload]
        lengths = sorted({r["seq"] for r in mine})
        curves = list(dict.fromkeys(curve_name(r) for r in mine if r["method"] not in DENSE_METHODS))
        colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(curves)}
        fig, axes = plt.subplots(1, len(lengths), figsize=(8.8 * len(lengths), 5), squeeze=False)
        for ax, seq in zip(axes[0], lengths):
            here = [r for r in mine if r["seq"] == seq]
            cudnn = next(r for r in here if r["method"] == "dense_cudnn")
            flash2 = next(r for r in here if r["method"] == "dense_flash2")
            estimated = " (extrapolated)" if cudnn["dense_extrapolated"] else ""
            if meta.get("tiny"):  # one CPU SDPA time stands in for both backends
                ax.axvline(cudnn["total_ms"], color="k", lw=1.2, label=f"dense CPU SDPA {cudnn['total_ms']:.1f} ms")
            else:
                ax.axvline(cudnn["total_ms"], color="k", lw=1.2,
                           label=f"dense cuDNN {cudnn['total_ms']:.1f} ms{estimated}")
                ax.axvline(flash2["total_ms"], color="k", lw=1.0, ls="--",
                           label=f"dense FA2 {flash2['total_ms']:.1f} ms{estimated}")
            for name in curves:
                # Exact rows (a preset that fell back to dense) have no place on a log error axis.
                points = [r for r in here if curve_name(r) == name and r["method"] not in DENSE_METHODS and r["rel_l2"] > 0]
                if not points:
                    continue
                preset = points[0]["method"] in PRESET_METHODS
                ax.plot([p["total_ms"] for p in points], [p["rel_l2"] for p in points],
                        "D" if preset else "o-", ms=8 if preset else 4, color=colors[name],
                        label=name)
                if not preset:  # the cheapest and the dearest budget, to read the direction of the sweep
                    for p in (points[0], points[-1]):
                        ax.annotate(p["budget"], (p["total_ms"], p["rel_l2"]), fontsize=6, color=colors[name],
                                    xytext=(3, 3), textcoords="offset points")
            if workload == "real" and seq == 131072:
                original = sorted(ORIGINAL_128K.values())
                ax.plot([ms for ms, _ in original], [error for _, error in original], "x--", color="0.45", ms=6,
                        label="MInference original (same tensors, separate run)")
                for speedup, error in TARGETS:
                    ax.plot([cudnn["total_ms"] / speedup], [error], "*", ms=16, color="gold", mec="k", zorder=5)
                    ax.annotate(f"target {speedup:g}x @{error:g}", (cudnn["total_ms"] / speedup, error), fontsize=8,
                                xytext=(6, -10), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("index + kernel ms per layer (log)")
            ax.set_ylabel("relative L2 error vs dense (sampled rows, log)")
            layers = cudnn.get("layers", [cudnn["layer"]])
            ax.set_title(f"{workload}, {seq} tokens" + (f", mean over layers {layers}" if workload == "real" else ""),
                         fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            # Outside the panel: inside, it hid the curves it names.
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        model = meta.get("workloads", {}).get(workload, {}).get("model", "").split(" (")[0]  # real: which model
        fig.suptitle(f"accuracy-speed frontier, {workload} workload{f' ({model})' if model else ''}; "
                     f"{meta.get('gpu', '?')}, {meta.get('date', '?')}; "
                     f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}"
                     + ("\nCPU dry run: times are wall-clock under the Triton interpreter, dense is CPU SDPA"
                        if meta.get("tiny") else ""), fontsize=9)
        fig.tight_layout()
        path = out_dir / f"frontier-{workload}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def print_table(rows: list) -> None:
    """The compact result table (means over layers), printed last so a remote log ends with it."""
    header = (f"{'workload':8s} {'seq':>8s} {'method':14s} {'budget':12s} {'total ms':>9s} {'x cuDNN':>7s} "
              f"{'computed':>8s} {'rel_l2 (last/random)':>24s} {'recall':>6s} {'TF/s':>5s} {'index':>6s}")
    print("\n" + header)
    print("-" * len(header))
    for r in mean_over_layers(rows):
        star = "*" if r["dense_extrapolated"] else " "
        print(f"{r['workload']:8s} {r['seq']:>8d} {r['method']:14s} {r['budget']:12s} {r['total_ms']:9.2f} "
              f"{r['speedup_vs_cudnn']:6.2f}{star} {r['computed_fraction']:8.1%} "
              f"{fmt(r['rel_l2']):>6s} ({fmt(r['rel_l2_last'])}/{fmt(r['rel_l2_random'])}) "
              f"{r['recall']:6.3f} {r['kernel_tflops']:5.0f} {r['index_share_of_cudnn']:6.1%}")
    print("x cuDNN: dense cuDNN ms / (index + kernel) ms, * = dense extrapolated; index: index ms / cuDNN ms;"
          " means over layers", flush=True)


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["real", "planted"], choices=["real", "planted"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to sweep (dense baselines are always measured)")
    parser.add_argument("--budgets", nargs="+", default=None, metavar="LABEL",
                        help="only these budgets of the swept methods, as labelled in the results (e.g. 0.95/s32 "
                        "1000,6096); presets and dense baselines are not filtered")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default: real 32768 131072; planted 131072 1048576)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 15, 22, 29], help="real workload layers")
    parser.add_argument("--model", default="default", help="SmolLM2 GGUF file or directory (real workload)")
    parser.add_argument("--text", type=Path, default=None, help="long text file (real workload)")
    parser.add_argument("--max-dense", type=int, default=262144, help="longest length dense SDPA is measured at")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats (default: 5 up to 131072 tokens, 3 beyond)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU dry run for CI: Triton interpreter, planted workload at small sizes, float16")
    parser.add_argument("--replot", type=Path, default=None, metavar="FILE.json",
                        help="redraw the PNGs from a saved JSON (into its folder, or --out) and print its table")
    args = parser.parse_args(argv)
    if args.budgets is not None:
        labels = {p.label() for method in args.methods if method in SWEEPS for p in SWEEPS[method]}
        unknown = sorted(set(args.budgets) - labels)
        if unknown:
            parser.error(f"--budgets {' '.join(unknown)} is not a budget of --methods; they have {' '.join(sorted(labels))}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got --repeats={args.repeats}")
    if args.max_dense < 1:
        parser.error(f"--max-dense must be positive, got --max-dense={args.max_dense}")
    if args.lengths is not None and min(args.lengths) < 1:
        parser.error(f"--lengths must be positive, got --lengths={args.lengths}")
    if args.replot is None and not args.tiny:
        if not torch.cuda.is_available():
            parser.error("the benchmark needs a CUDA GPU; --tiny is the CPU dry run, --replot redraws a JSON")
        if "real" in args.workloads and args.text is None:
            parser.error("the real workload needs --text FILE (the GPU machine has no network)")
        if args.text is not None and not args.text.is_file():
            parser.error(f"--text must be a file, got --text={args.text}")
    return args


def run_on_cpu_only() -> None:
    """The dry run's environment: Triton's interpreter, and no visible GPU.

    Both flags are read once, when triton is imported and when CUDA is first queried, so they must
    come first. Hiding the GPU also makes ``cuda_ms`` time the CPU work with the wall clock (CUDA
    events would time an empty stream on a machine that has a GPU).
    """
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("--tiny must set TRITON_INTERPRET=1 before triton is imported, and triton already was")
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        data = json.loads(args.replot.read_text())
        out_dir = args.out or args.replot.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in plot(data["rows"], data["meta"], out_dir):
            print(f"wrote {path}")
        print_table(data["rows"])
        return
    if args.tiny:
        run_on_cpu_only()
    out_dir = args.out or Path("benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.tiny:
        # The interpreter computes bfloat16 dots wrongly (tests/test_kernels.py): float16 on the CPU.
        device, dtype = "cpu", torch.float16
        workloads = ["planted"]
        sweeps = TINY_SWEEPS
        planted_shape = {k: TINY[k] for k in ("batch", "q_heads", "kv_heads", "head_dim")}
        lengths = {"planted": list(args.lengths or TINY["lengths"])}
        settings = {"sample_last": TINY["sample_last"], "sample_random": TINY["sample_random"]}
        repeats = args.repeats or 1
        warmup = 0  # nothing to compile or autotune in the interpreter
    else:
        device, dtype = "cuda", torch.bfloat16
        workloads = args.workloads
        sweeps = {m: [p for p in patterns if args.budgets is None or p.label() in args.budgets]
                  for m, patterns in SWEEPS.items()}
        planted_shape = PLANTED
        default_lengths = {"real": [32768, 131072], "planted": [131072, 1048576]}
        lengths = {w: sorted(args.lengths or default_lengths[w]) for w in workloads}
        settings = {"sample_last": SAMPLE_LAST, "sample_random": SAMPLE_RANDOM}
        repeats = args.repeats
        warmup = 1

    def repeats_for(seq: int) -> int:
        return repeats or (5 if seq <= 131072 else 3)

    dense_clock = DenseClock(args.max_dense, repeats_for, args.tiny)
    failures: list = []
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        **versions(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "tiny": args.tiny,
        "workloads": {
            "real": ({**REAL_GEMMA3, "batch": 1, "model": "Gemma 3 270M (gemma3-270m), bf16, native RoPE (32768)"}
                     if args.model == "gemma3-270m" else
                     {**REAL, "batch": 1, "model": f"SmolLM2-135M-Instruct ({args.model}), bf16, YaRN beyond 8192"})
                    | {"text": str(args.text), "layers": args.layers},
            "planted": {**planted_shape, "batch": planted_shape.get("batch", 1), "dtype": str(dtype).replace("torch.", ""),
                        "source": "sparse_prefill.synthetic.planted_qkv defaults"},
        },
        "lengths": lengths,
        "sweeps": {m: [p.label() for p in sweeps[m]] for m in args.methods if m in sweeps},
        "presets": {m: repr(PRESETS[m].pattern) + f", dense below {PRESETS[m].min_seq_len_cuda} tokens"
                    for m in args.methods if m in PRESET_METHODS},
        "error_rows": (f"last {settings['sample_last']} rows + {settings['sample_random']} uniform random earlier rows "
                       f"(seed {SAMPLE_SEED}), every query head, float32 dense causal reference"),
        "timing": (f"median of {repeats or '5 (<= 131072 tokens) / 3'} after {warmup} warm-up; "
                   + ("wall clock" if device == "cpu" else "CUDA events")),
        "max_dense": args.max_dense,
        "dense": ("CPU dry run: dense_cudnn_ms and dense_flash2_ms are both torch SDPA (math backend) on the CPU"
                  if args.tiny else "torch SDPA, cuDNN and FlashAttention-2 backends, K/V repeated outside the timing; "
                  "beyond max_dense extrapolated by causal pairs"),
        "failures": failures,
    }
    rows: list = []
    for workload in workloads:
        if workload == "real":
            source = real_layers(lengths["real"], args.layers, args.model, args.text)
        else:
            source = planted_layers(lengths["planted"], planted_shape, dtype, device)
        for seq, captured in source:
            settings["repeats"] = repeats_for(seq)
            settings["warmup"] = warmup
            first_q, first_k, first_v = next(iter(captured.values()))
            # Dense time depends on the shape only: measured once per length, shared by the layers.
            dense, extrapolated = dense_clock.times(workload, first_q, first_k, first_v)
            first_q = first_k = first_v = None
            print(f"{workload} {seq}: dense cuDNN {dense['cudnn']:.2f} ms, FA2 {dense['flash2']:.2f} ms"
                  f"{' (extrapolated)' if extrapolated else ''}", flush=True)
            for layer_id, (q, k, v) in captured.items():
                # The shape is the captured tensors' (SmolLM2 and Gemma 3 differ), never the workload's nominal one.
                layer = {"workload": workload, "seq": seq, "layer": layer_id, "q_heads": q.shape[1],
                         "head_dim": q.shape[3], "dense": dense, "extrapolated": extrapolated}
                rows += measure_layer(layer, q, k, v, args.methods, sweeps, settings, failures,
                                      save=lambda partial: write_results(out_dir, meta, rows + partial))
            captured = q = k = v = None
            if device == "cuda":
                torch.cuda.empty_cache()
            write_results(out_dir, meta, rows)
            plot(rows, meta, out_dir)
    path = write_results(out_dir, meta, rows)
    for png in plot(rows, meta, out_dir):
        print(f"wrote {png}")
    print(f"wrote {path}")
    if failures:
        print(f"\n{len(failures)} budgets failed (meta.failures in {path}):")
        for failure in failures:
            print(f"  {failure['workload']} {failure['seq']} L{failure['layer']} {failure['method']} {failure['budget']}: "
                  f"{failure['error'][:200]}")
    print_table(rows)
    # Out of memory is a result (the budget does not fit); any other failure is a bug to look at.
    if not all(failure["out_of_memory"] for failure in failures):
        sys.exit(1)


if __name__ == "__main__":
    main()
