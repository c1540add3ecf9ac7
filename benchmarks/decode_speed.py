"""One layer's decode attention: dense SDPA against sparse page selection + the Triton decode kernel.

Llama-3-8B shapes (32 query / 8 KV heads, head_dim 128), bf16 cache on the GPU, batch 1, one new
token over a cache of N keys with random values (speed does not depend on them). Per length:

  dense_cudnn, dense_flash   torch SDPA of the one query over the whole cache (cuDNN / FA2 backends)
  select                     sparse_prefill.decoding.select_pages: bounds kernel, softmax, top-k
  kernel                     decode_attention over the selection (split-K kernel + merge)
  sparse                     both, as sparse_decode_attention runs them

CUDA events around each call, median of repeats after warm-up (benchmarks/timing.py). The cache
(128K: 512 MiB per layer) is far larger than L2, so the dense numbers are memory-bound as in a real
model. Eager launches: the selection's ~10 small launches are in these times, and on an H200 their CPU
cost is most of it (2026-11-30: select 0.3-0.9 ms eager against 0.15 ms for dense SDPA at 128K).

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

"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_prefill.decoding import decode_attention, page_summaries, select_pages
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, one small length: checks the script runs")
    args = parser.parse_args()
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
        json.dump({"info": info, "shapes": dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM), "rows": rows},
                  handle, indent=1)


if __name__ == "__main__":
    main()
