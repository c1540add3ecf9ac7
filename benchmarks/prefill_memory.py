"""Peak GPU memory and time of one long prefill through a Llama-3-8B-shaped model (GPU only).

The model is built from a LlamaConfig with Llama-3-8B's shapes (32 layers, 32 query / 8 KV heads,
head_dim 128, hidden 4096, MLP 14336, vocab 128256) and random weights created on the GPU in
bf16: speed and memory do not depend on the weights. One forward over random token ids, logits
for the last position only (``logits_to_keep=1``), KV cache kept, dense SDPA (transformers' own)
against sparse prefill (``sparse_prefill.enable`` with one pattern on every head).

Usage: PYTHONPATH=src python3 benchmarks/prefill_memory.py --tokens 131072 --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sparse_prefill
from sparse_prefill import PatternConfig, VerticalSlash


def llama3_8b_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=1 << 20,
        rope_theta=500000.0, attn_implementation="sdpa",
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def prefill(model, ids) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, logits_to_keep=1, use_cache=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    result = {"seconds": seconds, "peak_gib": peak / 2**30, "peak_over_weights_gib": (peak - before) / 2**30,
              "logits_shape": list(out.logits.shape)}
    del out
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = llama3_8b_shaped()
    weights = torch.cuda.memory_allocated() / 2**30
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    results = {"tokens": args.tokens, "weights_gib": weights}
    prefill(model, ids[:, :4096])  # warm-up: kernels compiled, handles created
    results["dense"] = prefill(model, ids)
    config = PatternConfig.uniform(32, 32, VerticalSlash(1000, 6096))
    sparse_prefill.enable(model, config)
    prefill(model, ids[:, :4096])
    results["sparse"] = prefill(model, ids)
    sparse_prefill.disable(model)
    results["meta"] = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    (args.out / "prefill_memory.json").write_text(json.dumps(results, indent=1))
    for name in ("dense", "sparse"):
        r = results[name]
        print(f"{name:6s} {args.tokens} tokens: {r['seconds']:.2f} s, peak {r['peak_gib']:.1f} GiB "
              f"({r['peak_over_weights_gib']:.1f} GiB over the {weights:.1f} GiB of weights), logits {r['logits_shape']}")


if __name__ == "__main__":
    main()
