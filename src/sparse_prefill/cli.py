"""The ``sparse-prefill`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch

from .index import kept_fraction
from .patterns import AShape, BlockSparse, Dense, VerticalSlash
from .reference import reference_attention
from .synthetic import planted_qkv


def _demo(args: argparse.Namespace) -> int:
    """The three patterns on a planted synthetic input: kept fraction, recall and error against dense."""
    if args.seq < 1:
        raise SystemExit(f"sparse-prefill demo: --seq must be >= 1, got {args.seq}")
    torch.manual_seed(args.seed)
    planted = planted_qkv(
        batch=1, q_heads=4, kv_heads=2, seq=args.seq, head_dim=64, generator=torch.Generator().manual_seed(args.seed)
    )
    q, k, v = planted.q, planted.k, planted.v
    dense = reference_attention(q, k, v, Dense()).out
    # Budgets scaled to the demo length as the paper's (1000, 6096) relate to 128K: ~1% and ~5%.
    budget = max(args.seq // 64, 16)
    patterns = {
        "a-shape": AShape(sink=4, local=4 * budget),
        "vertical-slash": VerticalSlash(vertical=budget, slash=4 * budget),
        "block-sparse": BlockSparse(top_k=max(4 * budget // 64, 1)),
    }
    rows = []
    for name, pattern in patterns.items():
        start = time.perf_counter()
        result = reference_attention(q, k, v, pattern, return_indices=True, return_recall=True)
        seconds = time.perf_counter() - start
        error = (result.out - dense).norm() / dense.norm()
        kept = torch.stack([kept_fraction(index, args.seq) for index in result.indices]).mean()
        rows.append(
            {
                "pattern": name,
                "budget": repr(pattern),
                "kept_fraction": round(kept.item(), 4),
                "recall": round(result.recall.mean().item(), 4),
                "relative_error": round(error.item(), 4),
                "seconds": round(seconds, 3),
            }
        )
    if args.json:
        json.dump({"seq": args.seq, "planted_columns": planted.columns.tolist(),
                   "planted_offsets": planted.offsets.tolist(), "results": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"planted input: seq={args.seq}, 4 query heads, 2 KV heads, head_dim 64 "
          f"(planted diagonals at offsets {planted.offsets[0].tolist()})")
    print("recall = dense attention mass on the kept set; error = ||out - dense|| / ||dense||\n")
    print(f"{'pattern':<16}{'kept pairs':>12}{'recall':>9}{'error':>9}{'seconds':>9}  budget")
    for row in rows:
        print(f"{row['pattern']:<16}{row['kept_fraction']:>12.2%}{row['recall']:>9.3f}"
              f"{row['relative_error']:>9.3f}{row['seconds']:>9.2f}  {row['budget']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-prefill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the three sparse patterns on a built-in planted input")
    demo.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
