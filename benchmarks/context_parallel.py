"""Context-parallel prefill on several GPUs against one: TTFT, its split, peak memory per GPU, logits.

The model is benchmarks/e2e.py's: a ``LlamaConfig`` with Llama-3-8B's shapes and random bf16 weights
made on each GPU (speed and memory do not depend on the weights). Every rank holds the whole model
and the whole prompt (random token ids); ``sparse_prefill.long_prefill.context_parallel_prefill``
splits the positions in its zig-zag of 64-aligned pieces (docs/semantics.md, "Balanced context
parallelism") and all-gathers K/V per layer; the one-GPU row is ``long_prefill.prefill`` of the
same prompt on rank 0 while the other ranks wait. Paths (attention only differs):

  dense           one GPU: SDPA (cuDNN where torch picks it); context-parallel: SDPA per piece, the
                  non-square pieces with torch's lower-right CausalBias (FlashAttention-2)
  vertical_slash  sparse_prefill.enable, VerticalSlash(1000, 6096) on every head: the prompt's index,
                  estimated once from its last queries and shared by the pieces: one GPU's kept set
  block_coverage  sparse_prefill.enable, BlockCoverage(0.99, stride=32) (the default preset's
                  pattern): the same kept set as one GPU on every row

Every row records, per rank: TTFT (CUDA events around the whole call, after a barrier), the time
in attention and in the collectives (``profile=True``), the rest (non-attention work), and the
peak memory allocated; the row's context-parallel TTFT is the slowest rank's. Rows run from the
shortest length; a path whose one-GPU prefill cannot fit (``PrefillMemoryError``) records that
and keeps only its context-parallel row. ``--budget-s`` stops starting rows after that many
seconds; the JSON is rewritten after every row.

NVLink multicast (NVLS) must stay off on the lent multi-GPU machines: this script sets
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1`` in
its own environment before torch is imported; set them on the command line as well.

Usage (repository root):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src \\
        torchrun --nproc-per-node 2 benchmarks/context_parallel.py --out OUT [--lengths 131072 ...]
    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/context_parallel.py --tiny --out /tmp/cp
        # CPU dry run: gloo, a tiny model, lengths divided by 512
    python3 benchmarks/context_parallel.py --replot OUT/context_parallel.json
"""

from __future__ import annotations

import os

# Before torch (and NCCL with it) is imported, so that no process of the run ever uses NVLink
# multicast, whatever the launcher's environment says.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import sparse_prefill  # noqa: E402
from sparse_prefill import BlockCoverage, PatternConfig, VerticalSlash, sparse_attention  # noqa: E402
from sparse_prefill import long_prefill as lp  # noqa: E402
from sparse_prefill.distributed import context_parallel_layout  # noqa: E402
from e2e import LLAMA3_8B, TINY, build_model, meta, one_layer, rel  # noqa: E402  (benchmarks/e2e.py)

GIB = 2**30
PATTERNS = {"vertical_slash": VerticalSlash(1000, 6096), "block_coverage": BlockCoverage(0.99, stride=32)}
TINY_PATTERNS = {"vertical_slash": VerticalSlash(16, 64, last_q=16), "block_coverage": BlockCoverage(0.9, stride=8)}
PATHS = ("dense", *PATTERNS)


class Run:
    """One rank's state: the group, the model, the results (rank 0 writes them)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = not args.tiny
        if self.cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
            dist.init_process_group("nccl", device_id=self.device)
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.started = time.perf_counter()
        self.patterns = TINY_PATTERNS if args.tiny else PATTERNS
        shape = TINY if args.tiny else LLAMA3_8B
        self.model = build_model(shape, self.device)
        self.n_layers = len(self.model.get_decoder().layers)
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.model.parameters()) / GIB
        self.fuse = {"auto": None, "on": True, "off": False}[args.fuse]
        self.results: dict = {
            "meta": {**meta(self.device), "world": self.world, "backend": dist.get_backend(),
                     "env": {name: os.environ[name] for name in
                             ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
                     "fuse": {"auto": "on" if self.cuda else "off"}.get(args.fuse, args.fuse),
                     "chunk_size": args.chunk_size},
            "model": {"config": shape, "weights_gib": self.weights_gib},
            "patterns": {name: repr(pattern) for name, pattern in self.patterns.items()},
            "rows": [],
        }

    # -- bookkeeping ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def save(self) -> None:
        if self.rank == 0:
            self.args.out.mkdir(parents=True, exist_ok=True)
            (self.args.out / "context_parallel.json").write_text(json.dumps(self.results, indent=1))

    def agreed(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (the budget is rank 0's clock)."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def ids(self, seq: int) -> torch.Tensor:
        """Random token ids, the same on every rank and for every path at one length."""
        generator = torch.Generator(self.device).manual_seed(seq)
        return torch.randint(0, self.model.config.vocab_size, (1, seq), device=self.device, generator=generator)

    def clear(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def enable(self, path: str) -> None:
        if path != "dense":
            config = PatternConfig.uniform(self.n_layers, self.model.config.num_attention_heads, self.patterns[path])
            sparse_prefill.enable(self.model, config, min_seq_len=1)  # sparse at every length measured

    def disable(self, path: str) -> None:
        if path != "dense":
            sparse_prefill.disable(self.model)

    # -- timing ---------------------------------------------------------------------------------

    def timed(self, fn):
        """(result, seconds, peak GiB allocated) of ``fn()`` on this rank: CUDA events on a GPU."""
        self.clear()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        result = fn()
        if self.cuda:
            end.record()
            torch.cuda.synchronize()
            return result, start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated() / GIB
        return result, time.perf_counter() - begin, float("nan")

    def context_parallel(self, seq: int, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Every rank's numbers of one context-parallel prefill, and the logits."""
        dist.barrier()
        result, seconds, peak = self.timed(lambda: lp.context_parallel_prefill(
            self.model, ids, chunk_size=self.args.chunk_size, fuse=self.fuse, profile=True))
        layout = context_parallel_layout(seq, self.world)
        mine = {
            "rank": self.rank,
            "positions": layout.local_length(self.rank),
            "causal_pairs": layout.causal_pairs(self.rank),
            "ttft_s": seconds,
            "attention_s": result.attention_seconds,
            "communication_s": result.communication_seconds,
            "rest_s": seconds - result.attention_seconds - result.communication_seconds,
            "peak_gib": peak,
        }
        ranks: list = [None] * self.world
        dist.all_gather_object(ranks, mine)
        return {"ttft_s": max(r["ttft_s"] for r in ranks), "peak_gib": max(r["peak_gib"] for r in ranks),
                "ranks": ranks}, result.logits

    def one_device(self, ids: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """Rank 0's prefill of the whole prompt alone (the others wait at a barrier)."""
        numbers, logits = {}, None
        if self.rank == 0:
            try:
                result, seconds, peak = self.timed(lambda: lp.prefill(
                    self.model, ids, chunk_size=self.args.chunk_size, fuse=self.fuse, profile=True))
                numbers = {"ttft_s": seconds, "attention_s": result.attention_seconds,
                           "rest_s": seconds - result.attention_seconds, "peak_gib": peak}
                logits = result.logits
            except lp.PrefillMemoryError as error:
                numbers = {"does_not_fit": str(error)[:400]}
        dist.barrier()
        return numbers, logits


def warm_up(run: Run) -> None:
    """Out of the timed rows: the sparse kernels' autotuning (whole prompts and chunks), every path's
    first prefill (the fused bodies compile), and the fused bodies' variant for buffers past 2**31
    elements (one layer at the longest one-GPU length, as e2e.py does)."""
    args = run.args
    if run.cuda:
        config = run.model.config
        seq = 131072
        q = torch.randn(1, config.num_attention_heads, seq, config.head_dim, device=run.device, dtype=torch.bfloat16)
        k, v = (torch.randn(1, config.num_key_value_heads, seq, config.head_dim, device=run.device,
                            dtype=torch.bfloat16) for _ in range(2))
        for pattern in run.patterns.values():
            sparse_attention(q, k, v, pattern)
            sparse_attention(q[:, :, seq // 2 :], k, v, pattern)
        del q, k, v
    warm = run.ids(256 * run.world if args.tiny else 16384)
    for path in PATHS:
        run.enable(path)
        try:
            lp.context_parallel_prefill(run.model, warm, chunk_size=args.chunk_size, fuse=run.fuse)
            if run.rank == 0:
                lp.prefill(run.model, warm, chunk_size=args.chunk_size, fuse=run.fuse)
            dist.barrier()
        finally:
            run.disable(path)
    if run.cuda and run.fuse is not False:
        def no_attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
            return q.transpose(1, 2), None  # the bodies see the shapes and strides real attention gives

        longest = max(n for n in args.lengths if n <= args.one_device_max)
        with one_layer(run.model):
            try:
                lp.prefill(run.model, run.ids(longest), attention=no_attention, chunk_size=args.chunk_size,
                           fuse=run.fuse)
            except lp.PrefillMemoryError:
                pass
        dist.barrier()
    run.clear()
    run.log("warmed up")


def measure(run: Run, seq: int, path: str) -> dict:
    """One row: the context-parallel prefill of ``seq`` tokens on every rank, then one GPU's."""
    ids = run.ids(seq)
    run.enable(path)
    try:
        row = {"seq": seq, "path": path}
        # One layer of each prefill first, untimed: at a new length the kernels may compile again, where an
        # integer argument first passes 2**31. (With it, each rank's Vertical-Slash attention still took
        # 0.74-0.90x one GPU's on 2026-11-30: each piece then estimated its own index, whose diagonals
        # cost a piece more tiles per query than the prompt's index does; the pieces now share that.)
        with one_layer(run.model):
            run.context_parallel(seq, ids)
            if seq <= run.args.one_device_max:
                run.one_device(ids)
        run.clear()
        row["context_parallel"], cp_logits = run.context_parallel(seq, ids)
        if seq <= run.args.one_device_max:
            row["one_device"], logits = run.one_device(ids)
            if logits is not None:
                row["speedup"] = row["one_device"]["ttft_s"] / row["context_parallel"]["ttft_s"]
                row["logits_rel_err"] = rel(cp_logits, logits)
        return row
    finally:
        run.disable(path)
        run.clear()


def describe(row: dict) -> str:
    cp = row["context_parallel"]
    split = " / ".join(
        f"r{r['rank']} {r['ttft_s']:.2f}s (attn {r['attention_s']:.2f}, comm {r['communication_s']:.2f}, "
        f"rest {r['rest_s']:.2f}; {r['peak_gib']:.1f} GiB)" for r in cp["ranks"])
    one = row.get("one_device") or {}
    single = (f"one GPU {one['ttft_s']:.2f}s ({one['peak_gib']:.1f} GiB)" if "ttft_s" in one
              else "one GPU: does not fit" if one else "one GPU: not run")
    extra = f", {row['speedup']:.2f}x, logits rel err {row['logits_rel_err']:.1e}" if "speedup" in row else ""
    return f"{row['seq']:>8} {row['path']:<15} CP {cp['ttft_s']:.2f}s [{split}]; {single}{extra}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["rows"] if "context_parallel" in row]
    if not rows:
        return
    world = results["meta"]["world"]
    colors = {"dense": "k", "vertical_slash": "tab:blue", "block_coverage": "tab:orange"}
    fig, ((ax_ttft, ax_speed), (ax_split, ax_mem)) = plt.subplots(2, 2, figsize=(12, 9))
    for name, color in colors.items():
        mine = sorted((row for row in rows if row["path"] == name), key=lambda row: row["seq"])
        if not mine:
            continue
        xs = [row["seq"] for row in mine]
        ax_ttft.plot(xs, [row["context_parallel"]["ttft_s"] for row in mine], "o-", color=color,
                     label=f"{name}, {world} GPUs")
        ax_mem.plot(xs, [row["context_parallel"]["peak_gib"] for row in mine], "o-", color=color,
                    label=f"{name}, {world} GPUs (max over ranks)")
        single = [(row["seq"], row["one_device"]) for row in mine if "ttft_s" in row.get("one_device", {})]
        if single:
            ax_ttft.plot([x for x, _ in single], [one["ttft_s"] for _, one in single], "s--", color=color,
                         markerfacecolor="white", label=f"{name}, 1 GPU")
            ax_mem.plot([x for x, _ in single], [one["peak_gib"] for _, one in single], "s--", color=color,
                        markerfacecolor="white", label=f"{name}, 1 GPU")
        speed = [(row["seq"], row["speedup"]) for row in mine if "speedup" in row]
        if speed:
            ax_speed.plot(*zip(*speed), "o-", color=color, label=name)
        slowest = [max(row["context_parallel"]["ranks"], key=lambda r: r["ttft_s"]) for row in mine]
        for key, style in (("attention_s", "o-"), ("communication_s", "^:"), ("rest_s", "s--")):  # markers: one length too
            ax_split.plot(xs, [r[key] for r in slowest], style, color=color, label=f"{name}: {key[:-2]}")
    ax_speed.axhline(world, color="0.6", lw=1, label=f"ideal ({world}x)")
    if world == 2:
        ax_speed.axhline(1 / 0.55, color="r", ls=":", lw=1, label="target at 1M (TTFT <= 0.55x one GPU)")
    for ax, title, ylabel in ((ax_ttft, "time to first token", "seconds"),
                              (ax_speed, "one GPU's TTFT / context-parallel TTFT", "speedup"),
                              (ax_split, "context parallel, slowest rank: where the time goes", "seconds"),
                              (ax_mem, "peak memory allocated per GPU", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (ax_ttft, ax_split):
        ax.set_yscale("log")
    meta_info = results["meta"]
    model = "Llama-3-8B shapes" if results["model"]["config"] == LLAMA3_8B else "tiny model"
    fig.suptitle(f"context-parallel prefill, {model}, {world} x {meta_info.get('gpu')} "
                 f"({meta_info['date']}, torch {meta_info['torch']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--dense-max", type=int, default=524288,
                        help="dense and block_coverage rows up to this length (one GPU's dense 1M prefill takes "
                             "about 10 minutes; Block-Coverage keeps nearly every block of random weights' diffuse "
                             "attention, so its work is dense too)")
    parser.add_argument("--one-device-max", type=int, default=1 << 21, help="one-GPU rows up to this length")
    parser.add_argument("--chunk-size", type=int, default=lp.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                        help="the non-attention work compiled with torch.compile (auto: on a GPU)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no row after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run (gloo), tiny model, lengths / 512")
    parser.add_argument("--replot", type=Path, help="redraw the PNG from a saved JSON")
    args = parser.parse_args()
    if args.replot:
        results = json.loads(args.replot.read_text())
        plot(results, args.replot.with_suffix(".png"))
        for row in results["rows"]:
            print(describe(row) if "context_parallel" in row else row)
        return
    if args.tiny:
        args.lengths = [n // 512 for n in args.lengths]
        args.dense_max //= 512
        args.one_device_max //= 512
        args.chunk_size = 64
    run = Run(args)
    try:
        run.log(f"{run.world} ranks, model {run.weights_gib:.1f} GiB per rank; {run.results['meta']}")
        warm_up(run)
        for seq in sorted(args.lengths):
            for path in args.paths:
                if path in ("dense", "block_coverage") and seq > args.dense_max:
                    continue
                if run.agreed(run.elapsed() > args.budget_s):
                    run.results.setdefault("skipped", []).append({"seq": seq, "path": path, "why": "budget"})
                    continue
                try:
                    row = measure(run, seq, path)
                except Exception as error:  # noqa: BLE001 - recorded, and the next row is tried
                    if run.rank == 0:
                        traceback.print_exc()
                    row = {"seq": seq, "path": path, "error": f"{type(error).__name__}: {str(error)[:400]}"}
                    run.clear()
                run.results["rows"].append(row)
                run.log(describe(row) if "context_parallel" in row else str(row))
                run.save()
        run.results["elapsed_s"] = run.elapsed()
        run.save()
        if run.rank == 0:
            plot(run.results, args.out / "context_parallel.png")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
