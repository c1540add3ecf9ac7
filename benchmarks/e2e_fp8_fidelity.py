"""How much an FP8 KV cache changes decoding on a real model (CPU, no GPU needed).

The 1M-token benchmark (benchmarks/e2e.py) keeps its cache in FP8 because bf16 does not fit in
the host's memory, but it runs random weights, whose next-token distributions say nothing about
fidelity. Here: SmolLM2-135M-Instruct (the default model, float32 on the CPU) prefills the first
``--tokens`` tokens of the King James Bible excerpt shipped with the package twice through
``sparse_prefill.long_prefill``, once keeping its cache exactly and once in FP8 (e4m3, one scale per
token and KV head). Both caches are then fed the same tokens, the exact cache's greedy
continuation (teacher forcing), and at every step the two next-token distributions are compared:
KL(exact || fp8) and whether their top-1 tokens agree.

Usage: python benchmarks/e2e_fp8_fidelity.py [--tokens 6144] [--steps 32] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparse_prefill import long_prefill as lp
from sparse_prefill.models import kjv_text, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=6144)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    loaded = load_model("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(kjv_text(), return_tensors="pt").input_ids[:, : args.tokens]
    exact = lp.prefill(model, ids, cache="device")
    fp8 = lp.prefill(model, ids, cache="device", kv_dtype=torch.float8_e4m3fn)
    token = exact.logits.argmax(-1, keepdim=True)  # [1, 1]
    kl, agree = [], []
    for _ in range(args.steps):
        log_exact = torch.log_softmax(lp.decode_step(model, exact.cache, token).float(), dim=-1)
        log_fp8 = torch.log_softmax(lp.decode_step(model, fp8.cache, token).float(), dim=-1)
        kl.append(float((log_exact.exp() * (log_exact - log_fp8)).sum()))
        agree.append(bool(log_exact.argmax() == log_fp8.argmax()))
        token = log_exact.argmax(-1, keepdim=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "model": str(loaded.source),
        "prompt_tokens": ids.shape[1],
        "steps": args.steps,
        "kl_mean": sum(kl) / len(kl),
        "kl_max": max(kl),
        "top1_agreement": sum(agree) / len(agree),
        "kl": kl,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e-fp8-fidelity.json").write_text(json.dumps(result, indent=1))
    print(f"{ids.shape[1]} tokens, {args.steps} teacher-forced steps: KL(exact || fp8) mean {result['kl_mean']:.2e}, "
          f"max {result['kl_max']:.2e}; top-1 agreement {result['top1_agreement']:.0%}")


if __name__ == "__main__":
    main()
