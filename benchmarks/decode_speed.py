"""One layer's decode attention: dense SDPA against sparse page selection + the Triton decode kernel.

Llama-3-8B shapes (32 query / 8 KV heads, head_dim 128), bf16 cache on the GPU, batch 1, one new
token over a cache of N keys with random values (speed does not depend on them). Per length:

  dense_cudnn, dense_flash   torch SDPA of the one query over the whole cache (cuDNN / FA2 backends)
  select                     sparse_prefill.decoding.select_pages: ranking-key kernel, then the radix select
                             (six launches, each row's pages split over ~4 programs per SM)
  kernel                     decode_attention over the selection (split-K kernel + merge)
  sparse                     both, as sparse_decode_attention runs them

CUDA events around each call, median of repeats after warm-up (benchmarks/timing.py). The cache
(128K: 512 MiB per layer) is far larger than L2, so the dense numbers are memory-bound as in a real
model. Eager launches: the selection's launches are in these times, and on an H200 their CPU cost
is most of it (2026-11-30: select 0.3-0.9 ms eager with ~10 launches, 0.24-0.36 ms with the fused
ranking kernel, against 0.15 ms for dense SDPA at 128K).

So each path is also timed as one CUDA graph (``*_graph_ms``): the step of GRAPH_LAYERS layers, each
with its own cache and summaries (so the summaries, 32 MiB a layer at 128K, are not served from the
50 MiB L2 as one layer's replayed alone would be), captured once and replayed; the time per layer.
That is the GPU's time, what a decoder that replays a captured step would see. The library's own
decoding loop launches eagerly today (the graphed numbers are a bound it does not reach yet).
Effective bandwidth: bytes of K and V each path reads (sparse: the selected pages plus the
summaries) over its time.

Usage (GPU machine, repository root):
    PYTHONPATH=src python3 benchmarks/decode_speed.py --out OUT.json [--lengths 131072 524288] [--budgets 2048 4096]
    PYTHONPATH=src python3 benchmarks/decode_speed.py --dry-run --out /tmp/decode.json   # CPU: the plumbing only
    python3 benchmarks/decode_speed.py --replot OUT.json   # redraw OUT.png from a saved JSON

The PNG beside the JSON: milliseconds per layer against cache length, dense and sparse, eager and graphed.

"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_prefill.decoding import DEFAULT_PAGE_SIZE, decode_attention, page_summaries, select_pages
from timing import cuda_ms  # benchmarks/timing.py

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GRAPH_LAYERS = 4


def graph_ms(step, repeats: int) -> float:
    """Median milliseconds of ``step()`` captured as one CUDA graph and replayed (its GPU time, without
    the CPU cost of launching its kernels one at a time)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, allocations) outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return cuda_ms(graph.replay, repeats=repeats, warmup=3)


def plot(results: dict, path: str) -> None:
    """Per-layer decode attention time against the cache length: dense and each budget, eager and graphed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["rows"], key=lambda row: row["n_keys"])
    lengths = [row["n_keys"] for row in rows]
    fig, (ax_eager, ax_graph) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    dense = [min(t for t in (row["dense_cudnn_ms"], row["dense_flash_ms"]) if t is not None) for row in rows]
    ax_eager.plot(lengths, dense, "ko-", label="dense SDPA")
    if all("dense_graph_ms" in row for row in rows):
        ax_graph.plot(lengths, [row["dense_graph_ms"] for row in rows], "ko-", label="dense SDPA")
    for index, budget in enumerate(entry["budget"] for entry in rows[0]["budgets"]):
        entries = [next(e for e in row["budgets"] if e["budget"] == budget) for row in rows]
        color = plt.cm.viridis(index / max(1, len(rows[0]["budgets"]) - 1) * 0.8)
        ax_eager.plot(lengths, [e["sparse_ms"] for e in entries], "o-", color=color, label=f"sparse, budget {budget}")
        if all("sparse_graph_ms" in e for e in entries):
            ax_graph.plot(lengths, [e["sparse_graph_ms"] for e in entries], "o-", color=color,
                          label=f"sparse, budget {budget}")
    for ax, title in ((ax_eager, "eager launches (as the library decodes today)"),
                      (ax_graph, f"one CUDA graph per step of {GRAPH_LAYERS} layers (GPU time)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached keys")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:  # the dry run draws no graphed times
            ax.legend(fontsize=8)
    ax_eager.set_ylabel("ms per layer and step")
    info = results["info"]
    fig.suptitle(f"decode attention, one layer, 32 query / 8 KV heads, head_dim 128, bf16: {info['gpu']}, "
                 f"torch {info['torch']}, triton {info.get('triton')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the JSON to write (the PNG goes beside it)")
    parser.add_argument("--replot", help="redraw the PNG of a saved JSON and exit")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="keys per page (default: the library's)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, one small length: checks the script runs")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as handle:
            plot(json.load(handle), args.replot.removesuffix(".json") + ".png")
        return
    if not args.out:
        parser.error("--out is required (or --replot)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    dense_backends = (("dense_cudnn", SDPBackend.CUDNN_ATTENTION), ("dense_flash", SDPBackend.FLASH_ATTENTION))
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        dense_backends = (("dense_cudnn", SDPBackend.MATH), ("dense_flash", SDPBackend.MATH))  # stand-ins
        args.lengths, args.budgets, args.repeats = [4096 + 37], [256, 1024], 2
    rows = []
    for n_keys in args.lengths:
        torch.manual_seed(n_keys)
        q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(1, KV_HEADS, n_keys, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        summaries = page_summaries(k, args.page_size)
        kv_bytes = 2 * k.numel() * k.element_size()
        row = {"n_keys": n_keys, "page_size": args.page_size}
        graphed = device.type == "cuda"
        if graphed:  # GRAPH_LAYERS layers' caches (the first is k, v) and summaries, for the graphed times
            layers = [(k, v, summaries)] + [
                (k2, v2, page_summaries(k2, args.page_size))
                for k2, v2 in ((torch.randn_like(k), torch.randn_like(v)) for _ in range(GRAPH_LAYERS - 1))]
        for name, backend in dense_backends:
            try:
                with sdpa_kernel(backend):
                    row[f"{name}_ms"] = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                                repeats=args.repeats, warmup=5)
            except RuntimeError as error:  # a backend that refuses the shape
                row[f"{name}_ms"] = None
                row[f"{name}_error"] = str(error)[:200]
        dense = min(t for t in (row["dense_cudnn_ms"], row["dense_flash_ms"]) if t is not None)
        row["dense_GBps"] = kv_bytes / dense / 1e6
        if graphed:
            backend = dict(dense_backends)["dense_cudnn" if row["dense_cudnn_ms"] == dense else "dense_flash"]

            def dense_step():
                with sdpa_kernel(backend):
                    for k_layer, v_layer, _ in layers:
                        F.scaled_dot_product_attention(q, k_layer, v_layer, enable_gqa=True)

            row["dense_graph_ms"] = graph_ms(dense_step, args.repeats) / GRAPH_LAYERS
        row["budgets"] = []
        for budget in args.budgets:
            selection = select_pages(q, summaries, budget=budget)
            select = cuda_ms(lambda: select_pages(q, summaries, budget=budget), repeats=args.repeats, warmup=5)
            kernel = cuda_ms(lambda: decode_attention(q, k, v, selection), repeats=args.repeats, warmup=5)
            total = cuda_ms(lambda: decode_attention(q, k, v, select_pages(q, summaries, budget=budget)),
                            repeats=args.repeats, warmup=5)
            read = (2 * selection.pages.numel() * args.page_size * HEAD_DIM * k.element_size()  # selected K and V
                    + 2 * summaries.key_min.numel() * k.element_size())  # the summaries
            entry = {"budget": budget, "selected_pages": selection.n_selected, "select_ms": select, "kernel_ms": kernel,
                     "sparse_ms": total, "speedup_vs_dense": dense / total, "sparse_GBps": read / total / 1e6}
            if graphed:

                def sparse_step(budget=budget):
                    for k_layer, v_layer, layer_summaries in layers:
                        decode_attention(q, k_layer, v_layer, select_pages(q, layer_summaries, budget=budget))

                entry["sparse_graph_ms"] = graph_ms(sparse_step, args.repeats) / GRAPH_LAYERS
                entry["graph_speedup_vs_dense"] = row["dense_graph_ms"] / entry["sparse_graph_ms"]
            row["budgets"].append(entry)
            print(f"N={n_keys:8d} budget={budget:5d}: dense {dense:.3f} ms, select {select:.3f}, kernel {kernel:.3f}, "
                  f"sparse {total:.3f} ms ({dense / total:.1f}x); graphed: dense {row.get('dense_graph_ms', float('nan')):.3f}, "
                  f"sparse {entry.get('sparse_graph_ms', float('nan')):.3f} ms", flush=True)
        rows.append(row)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run)"
    info = {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}
    import triton

    info["triton"] = triton.__version__
    with open(args.out, "w") as handle:
        results = {"info": info, "shapes": dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM), "rows": rows}
        json.dump(results, handle, indent=1)
    plot(results, args.out.removesuffix(".json") + ".png")


if __name__ == "__main__":
    main()
