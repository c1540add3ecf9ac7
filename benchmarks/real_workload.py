"""The kernel benchmark's real workload: SmolLM2-135M attention on the King James Bible (GPU only).

Post-RoPE Q/K/V are captured from several layers of the real model (9 query heads, 3 KV heads,
head_dim 64) at each length; beyond its native 8K context RoPE is rescaled with YaRN
(factor N / 8192). For each layer and pattern: index and kernel time against dense cuDNN and
FlashAttention-2 SDPA, the computed and exactly-kept fractions of the causal pairs, the recall
(dense attention mass on the kept set, averaged over query rows and heads) and the share of chosen
slashes beyond offset 8192.

Usage (GPU machine, repository root):
  PYTHONPATH=src python3 benchmarks/real_workload.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
      --text kjv.txt --out OUT [--lengths 8192 32768 131072] [--layers 1 8 15 22 29]
The text: the whole KJV from Debian's bible-kjv, `bible -f Genesis1:1-Revelation22:21`, verse
references stripped (`sed 's/^[^ ]* //'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import causal_pairs, exact_kept_pairs  # benchmarks/kernels.py
from timing import cuda_ms  # benchmarks/timing.py
from sparse_prefill import VerticalSlash
from sparse_prefill.integrations.capture import capture_qkv
from sparse_prefill.kernels import build_plan, run_plan
from sparse_prefill.models import load_model
from sparse_prefill.reference import attention_with_index

PATTERNS = {
    "vertical_slash": VerticalSlash(1000, 6096),
    "vertical_slash_2x": VerticalSlash(1000, 2 * 6096),
    "vertical_slash_exact": VerticalSlash(1000, 6096, slash_block=1),
}


def far_slash_share(plan, limit: int = 8192) -> float:
    """Share of chosen diagonals (in tokens of offset) beyond ``limit``, over heads."""
    shares = []
    for index in plan.indices:
        offsets = index.diagonals[0].double() * index.slash_block
        shares.append((offsets > limit).double().mean().item())
    return statistics.mean(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 15, 22, 29])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.text.read_text(encoding="utf-8")
    rows = []
    token_ids = None
    for seq in args.lengths:
        loaded = load_model(args.model, dtype=torch.bfloat16, device="cuda",
                            rope_scaling_for=seq if seq > 8192 else None, cache=False)
        if token_ids is None:
            token_ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
            print(f"text: {len(token_ids)} tokens", flush=True)
        if len(token_ids) < seq:
            raise ValueError(f"--text has {len(token_ids)} tokens, fewer than the length {seq}")
        ids = token_ids[None, :seq].cuda()
        captured = capture_qkv(loaded.model, ids, args.layers, device="cuda")
        del loaded
        torch.cuda.empty_cache()
        for layer, (q, k, v) in sorted(captured.items()):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[-1]
            scale = head_dim**-0.5
            k_full, v_full = k.repeat_interleave(q_heads // kv_heads, 1), v.repeat_interleave(q_heads // kv_heads, 1)
            dense = {}
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
                def run_dense():
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)
                dense[name] = cuda_ms(run_dense, repeats=5)
            k_full = v_full = None  # frees them; pyflakes misreads a del after the lambdas above
            for name, pattern in PATTERNS.items():
                patterns = [pattern] * q_heads
                index_ms = cuda_ms(lambda: build_plan(q, k, patterns, scale), repeats=5)
                plan = build_plan(q, k, patterns, scale)
                out = torch.empty_like(q)
                kernel_ms = cuda_ms(lambda: run_plan(q, k, v, plan, scale, out=out), repeats=5)
                _, recall = attention_with_index(q, k, v, plan.indices, scale=scale, chunk_size=1024, return_recall=True)
                computed = plan.computed_pairs().double().mean().item() / causal_pairs(seq)
                kept = exact_kept_pairs(plan, seq) / causal_pairs(seq)
                total = index_ms + kernel_ms
                row = {
                    "seq": seq, "layer": layer, "pattern": name, "budget": repr(pattern),
                    "index_ms": index_ms, "kernel_ms": kernel_ms, "total_ms": total,
                    "cudnn_ms": dense["cudnn"], "flash2_ms": dense["flash2"],
                    "speedup_vs_cudnn": dense["cudnn"] / total, "speedup_vs_flash2": dense["flash2"] / total,
                    "computed_fraction": computed, "kept_fraction": kept, "recall": recall.mean().item(),
                    "far_slash_share": far_slash_share(plan),
                    "kernel_tflops": 4 * head_dim * computed * causal_pairs(seq) * q_heads / kernel_ms / 1e9,
                    "cudnn_tflops": 4 * head_dim * causal_pairs(seq) * q_heads / dense["cudnn"] / 1e9,
                }
                rows.append(row)
                print(f"{seq:>7d} L{layer:<2d} {name:21s} index {index_ms:6.2f} kernel {kernel_ms:7.2f} ms "
                      f"cuDNN {dense['cudnn']:7.2f} ms x{row['speedup_vs_cudnn']:5.2f}  computed {computed:6.1%} "
                      f"kept {kept:6.1%} recall {row['recall']:.3f} far {row['far_slash_share']:.0%} "
                      f"{row['kernel_tflops']:.0f}/{row['cudnn_tflops']:.0f} TF/s", flush=True)
                plan = out = None  # frees them; pyflakes misreads a del after the lambdas above
        del captured
        torch.cuda.empty_cache()
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "model": "SmolLM2-135M-Instruct Q4_1 (bf16 after dequantisation)",
            "text": "King James Bible", "layers": args.layers}
    (args.out / "real_workload.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, meta, args.out / "real_workload.png")


def plot(rows: list, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq"] for r in rows})
    fig, (speed, recall) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in PATTERNS:
        mine = [[r for r in rows if r["seq"] == n and r["pattern"] == name] for n in lengths]
        speed.plot(lengths, [statistics.mean(r["speedup_vs_cudnn"] for r in rs) for rs in mine], "o-", label=name)
        recall.plot(lengths, [statistics.mean(r["recall"] for r in rs) for rs in mine], "o-", label=name)
    speed.axhline(1.0, color="k", lw=0.8)
    speed.set_ylabel("speedup over dense cuDNN (index + kernel)")
    recall.set_ylabel("recall (dense attention mass kept)")
    for ax in (speed, recall):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M on the KJV, mean over layers {meta['layers']}; {meta['gpu']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
