"""Does sparse decoding keep the needle? Page-selection rules and page sizes against dense decoding.

On SmolLM2-135M (9 query / 3 KV heads, head_dim 64), needle prompts of ``sparse_prefill.eval``
(one five-digit passphrase hidden at a depth of Paul Graham's essays, chat-framed): one dense
prefill of all but the last prompt token, then greedy decoding of 8 tokens from a copy of its
cache under each configuration ``rule:page_size:budget``, so that every answer token, the first
included, comes from a decoding step. Correct: the passphrase is in the answer. Rules (how a KV
head's group of query heads ranks pages, see benchmarks/decode_selection.py):

  library    sparse_prefill.decoding.page_scores as installed (select_pages' rule, whatever it is)
  mass_sum   sum over the group of per-head softmaxes of the pages' logit bounds (the library's
             rule until 2026-11-30, fifth session)
  max_raw    max over the group of the raw bounds (a head whose bound is largest decides; the
             library's rule since then)
  oracle     the true attention mass of each page, summed over the group (needs every key: a bound
             on what any summary-based rule can do at that budget)

CPU only (about a minute per 4K prompt on one thread, 1.5-2 minutes per 8K one, most of it the
prefill). Results: decode_needle.json (4K), decode_needle_8k.json (8K, 5 depths), and, after the
library took max_raw with page 8, decode_needle_8k_rules.json and decode_needle_8k_library.json
(8K, 11 depths; docs/ACCURACY.md). Usage:
    PYTHONPATH=src python3 benchmarks/decode_needle.py --out benchmarks/results/decode_needle.json \
        --lengths 4096 --configs mass_sum:16:1024 max_raw:8:1024 oracle:16:1024
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import sparse_prefill.decoding as decoding
from sparse_prefill import disable, enable
from sparse_prefill.decoding import SparseDecoding, choose_pages, decode_attention, page_attention_mass
from sparse_prefill.eval.needle import needle_samples
from sparse_prefill.integrations import transformers as integration
from sparse_prefill.models import load_model

RULES = ("library", "mass_sum", "max_raw", "oracle")


def bound_scores(rule: str, library):
    """page_scores replaced by ``rule`` (``library``, the installed page_scores, for "library")."""
    if rule in ("library", "oracle"):
        return library

    def scores(q, summaries, scale=None):
        bounds = decoding.page_upper_bounds(q, summaries, scale)
        batch, kv_heads = summaries.shape[:2]
        grouped = bounds.view(batch, kv_heads, -1, bounds.shape[-1])  # [batch, kv_heads, group, n_pages]
        return grouped.softmax(dim=-1).sum(dim=2) if rule == "mass_sum" else grouped.amax(dim=2)

    return scores


def oracle_step(state, module, query, key, value, attention_mask, scaling, kwargs):
    """A decoding step that keeps the pages of largest true attention mass (same sink, window, budget)."""
    settings = state.decoding
    mass = page_attention_mass(query, key, settings.page_size, scale=scaling)
    selection = choose_pages(mass, key.shape[2], settings.page_size, budget=settings.budget, sink=settings.sink,
                             local=settings.local)
    return decode_attention(query, key, value, selection, scale=scaling).transpose(1, 2), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--depths", type=float, nargs="+", default=None, help="default: 0, 0.1, ..., 1")
    parser.add_argument("--configs", nargs="+", required=True, help="rule:page_size:budget, rule in " + ", ".join(RULES))
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    configs = []
    for text in args.configs:
        parts = text.split(":")
        if len(parts) != 3 or parts[0] not in RULES or not parts[1].isdigit() or not parts[2].isdigit():
            parser.error(f"--configs takes rule:page_size:budget with rule in {RULES}, got {text!r}")
        configs.append((parts[0], int(parts[1]), int(parts[2])))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    library_scores, library_step = decoding.page_scores, integration._sparse_decode_step
    results = {"model": "SmolLM2-135M-Instruct", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "new_tokens": args.new_tokens, "configs": [":".join(map(str, c)) for c in configs], "samples": []}
    for length in args.lengths:
        samples = needle_samples(tokenizer, [length], args.depths) if args.depths else needle_samples(tokenizer, [length])
        for sample in samples:
            ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                prefix = model(ids[:, :-1], use_cache=True).past_key_values

            def answer() -> str:
                cache, token, tokens = copy.deepcopy(prefix), ids[:, -1:], []
                with torch.no_grad():
                    for _ in range(args.new_tokens):
                        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                        tokens.append(int(token))
                return tokenizer.decode(tokens)

            answers = {"dense": answer()}
            for rule, page_size, budget in configs:
                decoding.page_scores = bound_scores(rule, library_scores)
                integration._sparse_decode_step = oracle_step if rule == "oracle" else library_step
                enable(model, decode=SparseDecoding(budget=budget, page_size=page_size))
                try:
                    answers[f"{rule}:{page_size}:{budget}"] = answer()
                finally:
                    disable(model)
                    decoding.page_scores, integration._sparse_decode_step = library_scores, library_step
            reference = sample.references[0]
            row = {"length": length, "n_tokens": int(ids.shape[1]), "depth": sample.meta["depth"], "reference": reference,
                   "answers": answers, "correct": {name: reference in text for name, text in answers.items()}}
            results["samples"].append(row)
            print(length, sample.meta["depth"], reference, {k: v for k, v in row["correct"].items()}, flush=True)
            with open(args.out, "w") as handle:  # after every sample: a run cut short keeps what it did
                json.dump(results, handle, indent=1)
    totals = {}
    for row in results["samples"]:
        for name, ok in row["correct"].items():
            key = f"{row['length']}/{name}"
            totals[key] = totals.get(key, 0) + int(ok)
    results["correct_per_length"] = totals
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(json.dumps(totals, indent=1))


if __name__ == "__main__":
    main()
