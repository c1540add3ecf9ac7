"""Per-layer attention time at Llama-3-8B shapes: our sparse kernels against dense SDPA (GPU only).

Shapes: batch 1, 32 query heads, 8 KV heads, head_dim 128, bfloat16.
Workloads:
  planted  sparse_prefill.synthetic.planted_qkv with its documented defaults (RoPE-like distance
           decay, 2 sinks, 3 heavy columns, diagonals at seq/7, seq/3, seq/2, noise 0.4)
  random   plain Gaussian Q/K/V (the worst case: the top diagonals scatter)
Patterns, the same on every head: VerticalSlash(1000, 6096) with slash_block 64 (block diagonals,
the default) and 1 (single diagonals, the paper's exact set), AShape(64, 8192), BlockSparse(100).

For each (workload, length, pattern): index-build time (estimation + plan), kernel time, the
fraction of causal pairs the kernel multiplies (tiles x 64 x 64 + gathered columns) and keeps
exactly, and the kernel's effective TFLOP/s over the pairs it multiplies (4 * head_dim FLOPs a pair:
QK^T and PV). Dense: cuDNN and FlashAttention-2 through torch SDPA (K/V repeated outside the timed
region), measured up to --max-dense and extrapolated quadratically beyond (marked "estimated").

Usage: python benchmarks/kernels.py --out benchmarks/results [--lengths 32768 131072 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_prefill import AShape, BlockSparse, VerticalSlash
from sparse_prefill.index import AShapeIndex, BlockSparseIndex, VerticalSlashIndex
from sparse_prefill.kernels import build_plan, run_plan
from sparse_prefill.synthetic import planted_qkv
from timing import cuda_ms  # benchmarks/timing.py

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PATTERNS = {
    "vertical_slash": VerticalSlash(1000, 6096),
    "vertical_slash_exact": VerticalSlash(1000, 6096, slash_block=1),
    "a_shape": AShape(64, 8192),
    "block_sparse": BlockSparse(100),
}


def causal_pairs(seq: int) -> int:
    return seq * (seq + 1) // 2


def exact_kept_pairs(plan, seq: int) -> float:
    """Mean over heads of the exact kept pairs (docs/semantics.md), counted from the indices."""
    totals = []
    for index in plan.indices:
        if isinstance(index, VerticalSlashIndex) and index.slash_block == 1:
            columns, offsets = index.columns[0], index.diagonals[0]
            # column c keeps seq - c pairs, offset o keeps seq - o; (c, o) meet once when c + o < seq
            meets = torch.searchsorted(offsets.contiguous(), (seq - 1 - columns).contiguous(), right=True).sum()
            totals.append(((seq - columns).sum() + (seq - offsets).sum() - meets).item())
        elif isinstance(index, VerticalSlashIndex):  # block diagonals of 64 (seq a multiple of 64 here)
            columns, diagonals = index.columns[0], index.diagonals[0]
            n_blocks = seq // 64
            tiles = ((n_blocks - diagonals) * 64 * 64).sum() - (64 * 64 - 64 * 65 // 2) * n_blocks * int((diagonals == 0).any())
            # a column c lies in the tiles of query blocks c // 64 + d, d > 0 chosen (64 rows each), and
            # in the rows c.. of its own block when d = 0 is chosen
            later = torch.searchsorted(diagonals.contiguous(), (n_blocks - 1 - columns // 64).contiguous(), right=True)
            later = later - int((diagonals == 0).any())
            own = (64 - columns % 64) * int((diagonals == 0).any())
            totals.append(((seq - columns).sum() + tiles - (later * 64 + own).sum()).item())
        elif isinstance(index, BlockSparseIndex):
            tiles = index.block_mask()[0]
            on_diagonal = tiles.diagonal().sum().item()
            totals.append((tiles.sum().item() - on_diagonal) * 64 * 64 + on_diagonal * 64 * 65 / 2)
        elif isinstance(index, AShapeIndex):
            sink, local = index.sink, index.local
            band = local * seq - local * (local - 1) / 2
            rows_past = seq - local  # rows with keys outside the band: each adds min(sink, t), t = 1..rows_past
            extra = rows_past * (rows_past + 1) / 2 if rows_past <= sink else sink * (sink + 1) / 2 + (rows_past - sink) * sink
            totals.append(band + extra)
        else:
            totals.append(causal_pairs(seq))
    return statistics.mean(totals)


def make_workload(name: str, seq: int):
    if name == "planted":
        planted = planted_qkv(1, Q_HEADS, KV_HEADS, seq, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        return planted.q, planted.k, planted.v
    g = torch.Generator(device="cuda").manual_seed(seq)
    q = torch.randn(1, Q_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def dense_times(q, k, v, seq: int, max_dense: int, cache: dict) -> dict:
    """cuDNN and FA2 SDPA milliseconds (measured, or extrapolated quadratically from the largest measured)."""
    results = {}
    for backend_name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
        if seq <= max_dense:
            k_full = k.repeat_interleave(Q_HEADS // KV_HEADS, 1)
            v_full = v.repeat_interleave(Q_HEADS // KV_HEADS, 1)

            def dense():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

            ms = cuda_ms(dense, repeats=3 if seq <= 131072 else 1)
            del k_full, v_full
            cache[backend_name] = (seq, ms)
            results[backend_name] = {"ms": ms, "estimated": False}
        else:
            base_seq, base_ms = cache[backend_name]
            results[backend_name] = {"ms": base_ms * causal_pairs(seq) / causal_pairs(base_seq), "estimated": True}
        flops = 4 * HEAD_DIM * causal_pairs(seq) * Q_HEADS
        results[backend_name]["tflops"] = flops / results[backend_name]["ms"] / 1e9
    return results


_FLEX = {}


def flex_times(q, k, v, plan, pattern) -> dict | None:
    """FlexAttention on the same kept set: mask build ms and attention ms (compiled, GQA native).

    Block-Sparse: a BlockMask from our plan's key-block lists (off-diagonal blocks full, the
    diagonal block causal). A-shape: create_block_mask over the window's mask_mod, compiled (its
    natural use for a static pattern). Other patterns: None.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    if "attention" not in _FLEX:
        _FLEX["attention"] = torch.compile(flex_attention, dynamic=False)
    attention = _FLEX["attention"]
    batch, q_heads, seq, _ = q.shape
    n_blocks = plan.block_count.shape[1]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    if isinstance(pattern, BlockSparse):
        def build():
            count = plan.block_count.view(batch, q_heads, n_blocks)
            blocks = plan.blocks.view(batch, q_heads, n_blocks, -1)
            # Our lists are ascending with the diagonal block last: everything before it is full.
            full_count = (count - 1).clamp(min=0)
            diagonal = torch.arange(n_blocks, device=q.device, dtype=torch.int32).view(1, 1, n_blocks, 1)
            return BlockMask.from_kv_blocks(
                torch.ones_like(count), diagonal.expand(batch, q_heads, n_blocks, 1).contiguous(),
                full_count, blocks, BLOCK_SIZE=64, mask_mod=causal, seq_lengths=(seq, seq), compute_q_blocks=False,
            )
    elif isinstance(pattern, AShape):
        sink, local = pattern.sink, pattern.local

        def window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((kv_idx < sink) | (q_idx - kv_idx < local))

        def build():
            return _FLEX["create_block_mask"](window, None, None, seq, seq, device=q.device, BLOCK_SIZE=64)

        _FLEX.setdefault("create_block_mask", torch.compile(create_block_mask))
    else:
        return None
    build_ms = cuda_ms(build, repeats=3)
    block_mask = build()
    # Flex picks 128-wide tiles by default and refuses 64-wide mask blocks unless told.
    options = {"BLOCK_M": 64, "BLOCK_N": 64}
    attention_ms = cuda_ms(
        lambda: attention(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options), repeats=3
    )
    return {"build_ms": build_ms, "attention_ms": attention_ms, "total_ms": build_ms + attention_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 262144, 524288, 1048576])
    parser.add_argument("--workloads", nargs="+", default=["planted", "random"])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--max-dense", type=int, default=262144, help="longest length dense SDPA is measured at")
    parser.add_argument("--flex-max", type=int, default=262144, help="longest length FlexAttention is measured at")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scale = HEAD_DIM**-0.5
    rows = []
    for workload in args.workloads:
        dense_cache: dict = {}
        for seq in args.lengths:
            q, k, v = make_workload(workload, seq)
            dense = dense_times(q, k, v, seq, args.max_dense, dense_cache)
            for name, pattern in ((n, PATTERNS[n]) for n in args.patterns):
                patterns = [pattern] * Q_HEADS
                plan_ms = cuda_ms(lambda: build_plan(q, k, patterns, scale), repeats=3)
                plan = build_plan(q, k, patterns, scale)
                out = torch.empty_like(q)
                kernel_ms = cuda_ms(lambda: run_plan(q, k, v, plan, scale, out=out), repeats=3)
                flex = None
                if seq <= args.flex_max:
                    try:
                        flex = flex_times(q, k, v, plan, pattern)
                    except Exception as error:  # report, never hide: a failed baseline is a result too
                        flex = {"error": f"{type(error).__name__}: {error}"[:300]}
                computed = plan.computed_pairs().double().mean().item()
                kept = exact_kept_pairs(plan, seq)
                total_ms = plan_ms + kernel_ms
                row = {
                    "workload": workload, "seq": seq, "pattern": name, "budget": repr(pattern),
                    "index_ms": plan_ms, "kernel_ms": kernel_ms, "total_ms": total_ms,
                    "computed_fraction": computed / causal_pairs(seq), "kept_fraction": kept / causal_pairs(seq),
                    "kernel_tflops": 4 * HEAD_DIM * computed * Q_HEADS / kernel_ms / 1e9,
                    "dense": dense,
                    "flex": flex,
                    "speedup_vs_cudnn": dense["cudnn"]["ms"] / total_ms,
                    "speedup_vs_flash2": dense["flash2"]["ms"] / total_ms,
                    "index_share_of_cudnn": plan_ms / dense["cudnn"]["ms"],
                }
                rows.append(row)
                print(f"{workload:8s} {seq:>8d} {name:15s} index {plan_ms:8.2f} ms  kernel {kernel_ms:9.2f} ms  "
                      f"computed {row['computed_fraction']:6.1%} kept {row['kept_fraction']:6.1%}  "
                      f"{row['kernel_tflops']:6.1f} TF/s  cuDNN {dense['cudnn']['ms']:9.1f} ms"
                      f"{'*' if dense['cudnn']['estimated'] else ' '} ({dense['cudnn']['tflops']:.0f} TF/s)  "
                      f"x{row['speedup_vs_cudnn']:.2f}"
                      + (f"  flex {flex['total_ms']:.1f} ms (build {flex['build_ms']:.1f})" if flex and "total_ms" in flex else
                         f"  flex {flex}" if flex else ""), flush=True)
                plan = out = None  # frees them; pyflakes misreads a del after the lambdas above
            q = k = v = None  # frees them; pyflakes misreads a del after the lambdas above
            torch.cuda.empty_cache()
    meta = {
        "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "python": platform.python_version(),
        "shapes": {"batch": 1, "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
    }
    (args.out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, meta, args.out / "kernels.png")


def plot(rows: list, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        mine = [r for r in rows if r["workload"] == workload]
        lengths = sorted({r["seq"] for r in mine})
        first = [next(r for r in mine if r["seq"] == n) for n in lengths]
        for backend, style in (("cudnn", "k-"), ("flash2", "k--")):
            ax.plot(lengths, [r["dense"][backend]["ms"] for r in first], style, label=f"dense {backend}")
        for name in sorted({r["pattern"] for r in mine}, key=list(PATTERNS).index):
            ours = [next(r for r in mine if r["seq"] == n and r["pattern"] == name) for n in lengths]
            ax.plot(lengths, [r["total_ms"] for r in ours], "o-", label=f"{name} (index + kernel)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("ms per layer (32 q heads, 8 kv heads, d=128)")
        ax.set_title(f"{workload} workload")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"attention per layer, {meta['gpu']}, {meta['date']}\n"
                 f"torch {meta['torch']}, triton {meta['triton']}; dense past --max-dense is extrapolated", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(json_path: Path) -> None:
    """Redraw a PNG from a saved JSON (no GPU needed): python benchmarks/kernels.py --replot FILE.json"""
    data = json.loads(json_path.read_text())
    plot(data["rows"], data["meta"], json_path.with_suffix(".png"))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--replot"]:
        for name in sys.argv[2:]:
            replot(Path(name))
    else:
        main()
