"""End-to-end time to first token of a Llama-3-8B-shaped model, 32K to 2M tokens, on one GPU.

The model is a ``LlamaConfig`` with Llama-3-8B's shapes (32 layers, 32 query / 8 KV heads,
head_dim 128, hidden 4096, MLP 14336, vocab 128256) and random bf16 weights made on the GPU:
speed and memory do not depend on the weights. Every prefill goes through
``sparse_prefill.long_prefill.prefill`` (chunked norms/MLP, last-position logits, no KV cache
unless said) over random token ids; only the attention differs between paths:

  dense_cudnn     torch SDPA, cuDNN backend          dense_fa2   torch SDPA, FlashAttention-2 backend
  vertical_slash  sparse_prefill.enable, VerticalSlash(1000, 6096) on every head
  a_shape         sparse_prefill.enable, AShape(64, 8192) on every head

Sparse paths fall back to dense below a crossover measured first in the same run (per-layer
attention, dense cuDNN against the pattern with its index build); where that makes a row dense,
the row ``<pattern>_forced`` is the sparse kernel anyway. TTFT: CUDA events around the whole
prefill (embedding to first-token logits); attention time: CUDA events around each layer's
attention call, summed. Dense paths run the whole model up to ``--full-dense-max`` tokens;
beyond that they run one layer (same code, same buffers) and are **estimated** as the sparse
run's non-attention time plus 32 times the measured layer's attention; FlashAttention-2 beyond
``--fa2-max`` is extrapolated quadratically from its last measured layer.

The non-attention work (norms, projections, RoPE, MLP, residual adds) runs fused by
``torch.compile`` on every path alike (``--fuse off``: as written). Its floor, the **matmul floor**, is
measured in the same run: the bare GEMMs of one layer (q/k/v/o projections, gate/up/down) at the
chunk size, times layers and chunks; each row records it next to its non-attention time
(``rest_over_floor``; the target is at most 1.25).

Also: GPU checks (chunked prefill against transformers' own forward, cuDNN with GQA, the fit
check's refusal, recovery from an out-of-memory error mid-prefill), the KV cache modes at 128K or
the ``--cache-seqs`` (on the GPU bf16 or FP8, offloaded bf16 or FP8, each with dense and sparse
generation), and generation after a ``--gen-seq`` prefill (1M) with an offloaded FP8 cache.

Usage (GPU machine, repository root):
    PYTHONPATH=src python3 benchmarks/e2e.py --out OUT [--lengths 32768 131072 ...]
    python3 benchmarks/e2e.py --tiny --out /tmp/e2e      # CPU dry run of every stage, tiny model
    python3 benchmarks/e2e.py --replot benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparse_prefill
from sparse_prefill import AShape, PatternConfig, VerticalSlash, sparse_attention
from sparse_prefill import long_prefill as lp
from timing import cuda_ms  # benchmarks/timing.py

GIB = 2**30
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=1 << 21,
    rope_theta=500000.0,
)
TINY = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=1 << 14,
)
PATTERNS = {"vertical_slash": VerticalSlash(1000, 6096), "a_shape": AShape(64, 8192)}
TINY_PATTERNS = {"vertical_slash": VerticalSlash(16, 64, last_q=16), "a_shape": AShape(8, 64)}


class Bench:
    """Shared state of one benchmark run: model, device, results, the JSON written after every step."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.cuda = self.device.type == "cuda"
        patterns = TINY_PATTERNS if args.tiny else PATTERNS
        self.patterns = {name: patterns[name] for name in args.paths}
        self.warmed: set[int] = set()  # lengths warm_length has run
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.results: dict = {"meta": meta(self.device), "rows": [], "cache_modes": [], "checks": {}}
        self.model = build_model(TINY if args.tiny else LLAMA3_8B, self.device)
        self.n_layers = len(self.model.get_decoder().layers)
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.model.parameters()) / GIB
        self.results["model"] = {"config": TINY if args.tiny else LLAMA3_8B, "weights_gib": self.weights_gib}
        self.crossover: dict[str, int] = {}
        self.fuse = {"auto": None, "on": True, "off": False}[args.fuse]
        self.results["meta"]["fuse"] = {"auto": "on" if self.cuda else "off"}.get(args.fuse, args.fuse)
        self.gemm_ms: dict[int, float] = {}  # rows -> one layer's bare GEMMs (matmul_floor)

    # -- bookkeeping ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def save(self) -> None:
        (self.out / "e2e.json").write_text(json.dumps(self.results, indent=1))

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def ids(self, seq: int) -> torch.Tensor:
        """Random token ids, the same for every path at one length."""
        generator = torch.Generator(self.device).manual_seed(seq)
        return torch.randint(0, self.model.config.vocab_size, (1, seq), device=self.device, generator=generator)

    def clear(self, release_pinned: bool = True) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            # PyTorch keeps freed pinned host memory for reuse; handing it back makes the next
            # offloaded prefill pin its memory anew (a "cold" cache).
            if release_pinned and hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()

    def dense(self, backend: str) -> lp.AttentionFn:
        """Dense causal attention through one SDPA backend (the math one on the CPU dry run)."""
        chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}[backend]
        if not self.cuda:
            chosen = SDPBackend.MATH
        repeat = backend == "cudnn" and self.results["checks"].get("cudnn_gqa") is False

        def attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
            with sdpa_kernel(chosen):
                if repeat:  # this cuDNN build cannot read grouped K/V: repeat them (counted in the time)
                    group = q.shape[1] // k.shape[1]
                    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                return lp.sdpa_attention(module, q, k, v, None, scaling=scaling)

        return attention

    # -- one timed prefill ----------------------------------------------------------------------

    def run_prefill(self, seq: int, attention=None, release_pinned: bool = True, **kwargs) -> dict:
        """Time one prefill; returns TTFT, attention time, peak memory (and the result under "_result")."""
        ids = self.ids(seq)
        self.clear(release_pinned)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        result = lp.prefill(self.model, ids, attention=attention, profile=True, chunk_size=self.args.chunk_size,
                            fuse=self.fuse, **kwargs)
        if self.cuda:
            end.record()
            torch.cuda.synchronize()
            ttft = start.elapsed_time(end) / 1e3
            peak = torch.cuda.max_memory_allocated() / GIB
        else:
            ttft, peak = time.perf_counter() - begin, float("nan")
        predicted = lp.memory_needed(
            self.model, seq, cache=kwargs.get("cache"), kv_dtype=kwargs.get("kv_dtype"), chunk_size=self.args.chunk_size
        )
        return {
            "ttft_s": ttft,
            "attention_s": result.attention_seconds,
            "rest_s": ttft - result.attention_seconds,
            "attention_share": result.attention_seconds / ttft,
            "peak_gib": peak,
            "predicted_peak_gib": self.weights_gib + predicted.device / GIB,
            "_result": result,
        }

    # -- the matmul floor -----------------------------------------------------------------------

    def layer_gemms_ms(self, rows: int) -> float:
        """Milliseconds of one layer's bare GEMMs on ``rows`` tokens: q/k/v/o projections, gate/up/down."""
        if rows not in self.gemm_ms:
            layer = self.model.get_decoder().layers[0]
            attention, mlp = layer.self_attn, layer.mlp
            dtype = attention.q_proj.weight.dtype

            def inputs(width: int) -> torch.Tensor:
                return torch.randn(rows, width, device=self.device, dtype=dtype)

            normed, attended = inputs(attention.q_proj.in_features), inputs(attention.o_proj.in_features)
            up = inputs(mlp.down_proj.in_features)
            # The GEMMs alone: no bias, norm, RoPE or activation; outputs allocated as the forward does.
            products = [(normed, attention.q_proj), (normed, attention.k_proj), (normed, attention.v_proj),
                        (attended, attention.o_proj), (normed, mlp.gate_proj), (normed, mlp.up_proj),
                        (up, mlp.down_proj)]

            def run() -> None:
                for x, linear in products:
                    F.linear(x, linear.weight)

            self.gemm_ms[rows] = cuda_ms(run, repeats=5, warmup=2)
            del normed, attended, up, products
        return self.gemm_ms[rows]

    def matmul_floor(self, seq: int) -> dict:
        """The non-attention GEMMs of a whole prefill of ``seq`` tokens: one layer's, measured at the
        chunk size (and at the last, shorter chunk), times layers and chunks."""
        chunk = min(self.args.chunk_size, seq)
        full, last = divmod(seq, chunk)
        per_layer_ms = full * self.layer_gemms_ms(chunk) + (self.layer_gemms_ms(last) if last else 0.0)
        floor_s = self.n_layers * per_layer_ms / 1e3
        layer = self.model.get_decoder().layers[0]
        # 2 FLOPs per multiply-add: every weight element meets every token once per layer.
        weights = sum(m.weight.numel() for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                                 layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                                 layer.mlp.down_proj))
        flops = 2 * seq * weights * self.n_layers
        return {"seq": seq, "chunk": chunk, "layer_chunk_ms": self.layer_gemms_ms(chunk), "floor_s": floor_s,
                "tflops": flops / floor_s / 1e12}


def build_model(shape: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of 8B weights
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def meta(device: torch.device) -> dict:
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, cudnn=torch.backends.cudnn.version())
    else:
        info.update(gpu="none (CPU dry run)", gpu_memory_gib=None)
    total, available = lp.memory._host_memory()
    info["host_memory_gib"] = None if total is None else total / GIB
    info["host_available_gib"] = None if available is None else available / GIB
    return info


@contextlib.contextmanager
def one_layer(model):
    """The model with only its first decoder layer (the per-layer measurement of dense attention)."""
    decoder = model.get_decoder()
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[:1])
    try:
        yield
    finally:
        decoder.layers = layers


def warm_length(bench: Bench, seq: int) -> None:
    """Compile what first runs at this length out of the timed runs: one layer through each sparse path.

    Inductor indexes with 32-bit integers while every buffer a kernel touches fits, guarding on it:
    Llama-3-8B's residual stream and Q buffer pass 2**31 elements at 512K tokens, where the fused
    bodies compile once more with 64-bit indices. The sparse path had one-time work at new lengths
    as well: on 2026-11-30 the first 1M prefill spent 11.6 s in attention, a second one 7.8 s (the
    Triton kernels compile again when an integer argument, a stride or an offset, first passes
    2**31 and is passed as 64-bit: the likeliest cause, not isolated). One layer per sparse path at
    each length costs about 1/32 of a sparse prefill there.
    """
    if not bench.cuda or seq in bench.warmed:
        return
    bench.warmed.add(seq)
    begin = time.perf_counter()
    with one_layer(bench.model):
        for name in bench.patterns:
            enabled(bench, name, 1)
            try:
                lp.prefill(bench.model, bench.ids(seq), chunk_size=bench.args.chunk_size, fuse=bench.fuse)
            finally:
                sparse_prefill.disable(bench.model)
            bench.clear()
    bench.log(f"sparse paths warmed at {seq} tokens (one layer): {time.perf_counter() - begin:.1f} s")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def probe_cudnn_gqa(bench: Bench) -> None:
    """Whether cuDNN SDPA reads grouped K/V (8 KV heads for 32 query heads) correctly, against FA2."""
    checks = bench.results["checks"]
    # cuDNN SDPA with grouped K/V (no repeat) against FlashAttention-2 on the same inputs.
    if bench.cuda:
        q = torch.randn(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            checks["cudnn_gqa_rel_err_vs_fa2"] = rel(out, ref)
            checks["cudnn_gqa"] = rel(out, ref) < 1e-2
        except RuntimeError as error:
            checks["cudnn_gqa"] = False
            checks["cudnn_gqa_error"] = str(error)[:300]
        bench.log(f"cuDNN with GQA: {checks['cudnn_gqa']} {checks.get('cudnn_gqa_rel_err_vs_fa2', '')}")
        del q, k, v, ref


def stage_checks(bench: Bench) -> None:
    """Correctness and fault handling on the device, before any timing."""
    checks = bench.results["checks"]
    model = bench.model
    seq = 512 if bench.tiny else 8192
    ids = bench.ids(seq)

    # The chunked prefill against transformers' own forward, dense and sparse.
    with torch.no_grad():
        expected = model(ids, logits_to_keep=1).logits[:, -1]
    got = lp.prefill(model, ids, chunk_size=seq // 8, fuse=bench.fuse).logits
    checks["chunked_vs_transformers_dense"] = {"seq": seq, "fuse": bench.results["meta"]["fuse"],
                                               "rel_err": rel(got, expected),
                                               "top1_equal": bool(torch.equal(got.argmax(-1), expected.argmax(-1)))}
    config = PatternConfig.uniform(bench.n_layers, model.config.num_attention_heads, bench.patterns["vertical_slash"])
    state = sparse_prefill.enable(model, config, min_seq_len=1)
    try:
        with torch.no_grad():
            expected_sparse = model(ids, logits_to_keep=1).logits[:, -1]
        calls = state.sparse_calls
        got_sparse = lp.prefill(model, ids, chunk_size=seq // 8, fuse=bench.fuse).logits
        sparse_layers = state.sparse_calls - calls
    finally:
        sparse_prefill.disable(model)
    checks["chunked_vs_transformers_sparse"] = {
        "seq": seq, "rel_err": rel(got_sparse, expected_sparse), "sparse_layers": sparse_layers,
        "rel_diff_sparse_vs_dense": rel(expected_sparse, expected),
    }
    bench.log(f"chunked vs transformers: dense {checks['chunked_vs_transformers_dense']}, "
              f"sparse {checks['chunked_vs_transformers_sparse']}")
    del expected, got, expected_sparse, got_sparse

    # A length that cannot fit is refused before allocating anything.
    huge = (1 << 22) if not bench.tiny else (1 << 34)
    before = torch.cuda.memory_allocated() if bench.cuda else 0
    begin = time.perf_counter()
    refusals = [("no_cache", huge, None)] + ([] if bench.tiny else [("device_cache_1m", 1 << 20, "device")])
    for name, length, cache in refusals:
        try:
            lp.prefill(model, torch.zeros(1, 1, dtype=torch.long, device=bench.device).expand(1, length), cache=cache)
            checks[f"fit_refusal_{name}"] = "NOT REFUSED"
        except lp.PrefillMemoryError as error:
            checks[f"fit_refusal_{name}"] = str(error)
    checks["fit_refusal_seconds"] = time.perf_counter() - begin
    checks["fit_refusal_allocated_bytes"] = (torch.cuda.memory_allocated() - before) if bench.cuda else 0
    bench.log(f"fit refusals: {checks['fit_refusal_no_cache'][:160]} ...")

    # An out-of-memory error in the middle of a prefill leaves nothing allocated behind.
    if bench.cuda:
        bench.clear()
        seq = 131072
        need = lp.memory_needed(model, seq).device
        oom_ids = bench.ids(seq)  # the caller's input, allocated before the baseline
        baseline = torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((baseline + need * 0.4) / total)
        raised = None
        try:
            lp.prefill(model, oom_ids, fuse=bench.fuse)
        except RuntimeError as error:  # torch.OutOfMemoryError expected; anything else is recorded
            raised = (type(error), str(error)[:300])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        # Measured after the except block: its traceback (and every frame it holds) is gone.
        if raised is None:
            checks["oom_recovery"] = "no OOM raised"
        else:
            checks["oom_recovery_message"] = raised[1]
            checks["oom_leaked_bytes"] = torch.cuda.memory_allocated() - baseline
            checks["oom_recovery"] = raised[0] is torch.OutOfMemoryError and checks["oom_leaked_bytes"] == 0
        del oom_ids
        after = lp.prefill(model, bench.ids(4096), fuse=bench.fuse).logits
        checks["oom_next_call_ok"] = bool(torch.isfinite(after.float()).all())
        bench.log(f"OOM recovery: {checks['oom_recovery']}, leaked {checks.get('oom_leaked_bytes')} B, "
                  f"next call ok {checks['oom_next_call_ok']}")
    bench.save()


def stage_crossover(bench: Bench) -> None:
    """Per-layer attention, dense cuDNN against each pattern (index included): where sparse starts to win."""
    lengths = [64, 128, 256, 512, 1024] if bench.tiny else [8192, 16384, 24576, 32768, 49152, 65536]
    heads, kv_heads = bench.model.config.num_attention_heads, bench.model.config.num_key_value_heads
    head_dim = bench.model.config.head_dim
    dense = bench.dense("cudnn")
    table = {"lengths": lengths, "dense_cudnn_ms": [], "default_sdpa_ms": []}
    for name in bench.patterns:
        table[f"{name}_ms"] = []
    for seq in lengths:
        q = torch.randn(1, heads, seq, head_dim, device=bench.device, dtype=torch.bfloat16)
        k, v = (torch.randn(1, kv_heads, seq, head_dim, device=bench.device, dtype=torch.bfloat16) for _ in range(2))
        table["dense_cudnn_ms"].append(cuda_ms(lambda: dense(None, q, k, v, None)))
        table["default_sdpa_ms"].append(cuda_ms(lambda: lp.sdpa_attention(None, q, k, v, None)))
        for name, pattern in bench.patterns.items():
            table[f"{name}_ms"].append(cuda_ms(lambda: sparse_attention(q, k, v, pattern)))
        q = k = v = None  # frees them; pyflakes misreads a del after the lambdas above
    for name in bench.patterns:
        wins = [s <= d for s, d in zip(table[f"{name}_ms"], table["dense_cudnn_ms"])]
        # The shortest length from which the sparse path wins at every measured length.
        start = next((i for i in range(len(lengths)) if all(wins[i:])), None)
        bench.crossover[name] = lengths[start] if start is not None else 2 * lengths[-1]
    table["crossover"] = dict(bench.crossover)
    bench.results["crossover"] = table
    bench.log(f"crossover: {table}")
    bench.save()


def enabled(bench: Bench, name: str, min_seq_len: int):
    config = PatternConfig.uniform(bench.n_layers, bench.model.config.num_attention_heads, bench.patterns[name])
    return sparse_prefill.enable(bench.model, config, min_seq_len=min_seq_len)


def stage_length(bench: Bench, seq: int) -> None:
    """All four paths at one length (dense measured whole, per layer, or extrapolated)."""
    rows = bench.results["rows"]
    warm_length(bench, seq)
    floor = bench.matmul_floor(seq)
    bench.results.setdefault("matmul_floor", []).append(floor)
    bench.log(f"{seq:>8} matmul floor {floor['floor_s']:.2f} s ({floor['tflops']:.0f} TF/s; one layer's GEMMs on "
              f"{floor['chunk']} tokens: {floor['layer_chunk_ms']:.2f} ms)")

    def record(row: dict) -> dict:
        row.pop("_result", None)
        row["seq"] = seq
        if "rest_s" in row:
            row["matmul_floor_s"] = floor["floor_s"]
            row["rest_over_floor"] = row["rest_s"] / floor["floor_s"]
        rows.append(row)
        bench.save()
        bench.log(f"{seq:>8} {row['path']:<22} {row.get('measured', ''):<12} TTFT {row.get('ttft_s', float('nan')):8.2f} s"
                  f"  attention {row.get('attention_share', float('nan')):5.1%}  peak {row.get('peak_gib', float('nan')):5.1f} GiB"
                  f"  {row.get('error', '')[:120]}")
        return row

    def attempt(path: str, fn) -> dict | None:
        if bench.over_budget():
            return record({"path": path, "error": "skipped: benchmark time budget spent"})
        try:
            return fn()
        except (lp.PrefillMemoryError, torch.OutOfMemoryError, RuntimeError) as error:
            traceback.print_exc()
            bench.clear()
            return record({"path": path, "error": f"{type(error).__name__}: {str(error)[:400]}"})

    sparse_rows = {}
    for name in bench.patterns:
        crossover = bench.crossover.get(name, 1)

        def sparse(name=name, crossover=crossover, forced=False):
            state = enabled(bench, name, 1 if forced else crossover)
            try:
                row = bench.run_prefill(seq)
            finally:
                sparse_prefill.disable(bench.model)
            row["sparse_layers"] = state.sparse_calls
            row["path"] = f"{name}_forced" if forced else name
            row["measured"] = "full"
            if state.sparse_calls == 0:
                row["note"] = f"dense fallback: {seq} < crossover {crossover}"
            return record(row)

        sparse_rows[name] = attempt(name, sparse)
        if seq < crossover:
            attempt(f"{name}_forced", lambda: sparse(forced=True))

    reference = next((r for r in sparse_rows.values() if r and "rest_s" in r), None)
    for backend in ("cudnn", "fa2"):
        path = f"dense_{backend}"
        full_max = bench.args.full_dense_max
        layer_max = bench.args.fa2_max if backend == "fa2" else bench.args.dense_layer_max

        def dense(backend=backend, path=path, full_max=full_max, layer_max=layer_max):
            if seq <= full_max:
                row = bench.run_prefill(seq, attention=bench.dense(backend))
                # The mean layer, for longer lengths to extrapolate from where no layer is measured alone.
                row.update(path=path, measured="full", layer_attention_s=row["attention_s"] / bench.n_layers)
                if reference is not None:  # what the one-layer estimate would have said
                    row["estimate_s"] = reference["rest_s"] + row["attention_s"]
                return record(row)
            if reference is None:
                raise RuntimeError("no sparse run at this length to take the non-attention time from")
            if seq <= layer_max:
                with one_layer(bench.model):
                    layer = bench.run_prefill(seq, attention=bench.dense(backend))
                per_layer, peak, how = layer["attention_s"], layer["peak_gib"], "one_layer"
            else:  # quadratic extrapolation from the longest measured layer of this backend
                measured = [r for r in bench.results["rows"] if r["path"] == path and "layer_attention_s" in r]
                if not measured:
                    raise RuntimeError(f"no measured {path} layer to extrapolate from")
                last = max(measured, key=lambda r: r["seq"])
                per_layer = last["layer_attention_s"] * (seq / last["seq"]) ** 2
                peak, how = float("nan"), f"extrapolated from {last['seq']}"
            row = {
                "path": path,
                "measured": how,
                "layer_attention_s": per_layer,
                "attention_s": bench.n_layers * per_layer,
                "rest_s": reference["rest_s"],
                "ttft_s": reference["rest_s"] + bench.n_layers * per_layer,
                "peak_gib": peak,
                "predicted_peak_gib": bench.weights_gib + lp.memory_needed(bench.model, seq).device / GIB,
                "rest_from": reference["path"],
            }
            row["attention_share"] = row["attention_s"] / row["ttft_s"]
            return record(row)

        attempt(path, dense)


def stage_cache_modes(bench: Bench, seq: int) -> None:
    """Vertical-Slash prefill with each cache mode, then greedy generation from the kept caches.

    Offloaded modes run twice: "cold" pins its host memory anew, "warm" reuses the pinned memory
    PyTorch kept from the cold run (what a server prefilling one prompt after another sees).
    """
    modes = [("device", None, "cold"), ("device", torch.float8_e4m3fn, "cold"), ("offload", None, "cold"),
             ("offload", None, "warm"), ("offload", torch.float8_e4m3fn, "cold"), ("offload", torch.float8_e4m3fn, "warm")]
    warm_length(bench, seq)
    out = bench.results["cache_modes"]
    reference_logits = None
    enabled(bench, "vertical_slash", bench.crossover.get("vertical_slash", 1))
    try:
        for placement, kv_dtype, pinned in modes:
            label = f"{placement}-{'fp8' if kv_dtype else 'bf16'}"
            if bench.over_budget():
                out.append({"seq": seq, "mode": label, "error": "skipped: benchmark time budget spent"})
                continue
            try:
                row = bench.run_prefill(seq, cache=placement, kv_dtype=kv_dtype, release_pinned=pinned == "cold")
                result = row.pop("_result")
                row.update(seq=seq, mode=label, pinned=pinned if placement == "offload" else None)
                if pinned == "cold":
                    first = result.logits.argmax(-1)[:, None]
                    logits = lp.decode_step(bench.model, result.cache, first)  # token 2's logits
                    if label == "device-bf16":
                        reference_logits = logits
                    if reference_logits is not None:  # none where the bf16 cache does not fit on the GPU
                        row["decode_logits_rel_err_vs_device_bf16"] = rel(logits, reference_logits)
                        row["decode_top1_equal_device_bf16"] = bool(
                            torch.equal(logits.argmax(-1), reference_logits.argmax(-1)))
                    time_generation(bench, result, row)
                out.append(row)
                del result
                bench.log(f"cache {label:<13} {pinned} {seq}: TTFT {row['ttft_s']:.2f} s peak {row['peak_gib']:.1f} GiB "
                          f"decode {row.get('generate_s_per_token', float('nan')):.3f} s/token dense, "
                          f"{row.get('generate_sparse_s_per_token', float('nan')):.3f} sparse, "
                          f"logits rel err {row.get('decode_logits_rel_err_vs_device_bf16', float('nan')):.3g}")
            except (lp.PrefillMemoryError, torch.OutOfMemoryError, RuntimeError) as error:
                traceback.print_exc()
                out.append({"seq": seq, "mode": label, "error": f"{type(error).__name__}: {str(error)[:400]}"})
            bench.clear(release_pinned=False)
            bench.save()
    finally:
        sparse_prefill.disable(bench.model)


def time_generation(bench: Bench, result, row: dict) -> None:
    """Greedy decoding from a prefill's kept cache, dense then sparse (the default budget), both from
    the same prefill (``generate`` starts from it each call). Per token: (time of n tokens - time of 2
    tokens) / (n - 2), the cost of a step without the set-up each call pays (sparse: page summaries
    of the whole cache), which ``*_setup_s`` records. A first 2-token call of each kind is not timed:
    it compiles the decode kernels and, for a device cache, copies it once into buffers with room
    for the new tokens (on 2026-11-30, untimed warm-up missing, that made the 2-token call the slower)."""
    n = bench.args.gen_tokens
    for decode, key in (("dense", ""), ("sparse", "_sparse")):
        lp.generate(bench.model, result, 2, decode=decode)
        seconds = {}
        for count in (2, n):
            begin = time.perf_counter()
            tokens = lp.generate(bench.model, result, count, decode=decode)
            if bench.cuda:
                torch.cuda.synchronize()
            seconds[count] = time.perf_counter() - begin
        per_token = (seconds[n] - seconds[2]) / (n - 2)
        row[f"generate{key}_s_per_token"] = per_token
        row[f"generate{key}_setup_s"] = seconds[2] - per_token
        row[f"tokens{key}"] = tokens[0].tolist()


def stage_long_generation(bench: Bench, seq: int) -> None:
    """The longest prompt with the cache kept (offloaded, FP8), a few generated tokens, then the same
    prefill again with the pinned host memory already there ("warm")."""
    out = bench.results["cache_modes"]
    warm_length(bench, seq)
    state = enabled(bench, "vertical_slash", bench.crossover.get("vertical_slash", 1))
    try:
        for pinned in ("cold", "warm"):
            if pinned == "warm" and bench.over_budget():
                break
            row = bench.run_prefill(seq, cache="offload", kv_dtype=torch.float8_e4m3fn, release_pinned=pinned == "cold")
            result = row.pop("_result")
            row.update(seq=seq, mode="offload-fp8", pinned=pinned, sparse_layers=state.sparse_calls)
            row["host_cache_gib"] = lp.memory_needed(
                bench.model, seq, cache="offload", kv_dtype=torch.float8_e4m3fn).host / GIB
            if pinned == "cold":
                time_generation(bench, result, row)
            del result
            out.append(row)
            bench.log(f"offloaded FP8 cache at {seq} ({pinned}): TTFT {row['ttft_s']:.2f} s, peak {row['peak_gib']:.1f} GiB, "
                      f"{row.get('generate_s_per_token', float('nan')):.2f} s/token, tokens {row.get('tokens')}")
            bench.clear(release_pinned=False)
            bench.save()
    except (lp.PrefillMemoryError, torch.OutOfMemoryError, RuntimeError) as error:
        traceback.print_exc()
        out.append({"seq": seq, "mode": "offload-fp8", "error": f"{type(error).__name__}: {str(error)[:400]}"})
    finally:
        sparse_prefill.disable(bench.model)
    bench.clear()
    bench.save()


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

PATH_STYLE = {
    "dense_cudnn": ("dense cuDNN SDPA", "black"),
    "dense_fa2": ("dense FlashAttention-2 SDPA", "0.55"),
    "vertical_slash": ("sparse Vertical-Slash (1000, 6096)", "tab:blue"),
    "a_shape": ("sparse A-shape (64, 8192)", "tab:orange"),
}


def tokens(n: int) -> str:
    return f"{n / (1 << 20):g}M" if n >= 1 << 20 else f"{n // 1024}K" if n >= 1024 else str(n)


def table(results: dict) -> str:
    """Markdown table of the rows, with × cuDNN at each length."""
    rows = [r for r in results["rows"] if "ttft_s" in r]
    dense = {r["seq"]: r["ttft_s"] for r in rows if r["path"] == "dense_cudnn"}
    how = {"full": "measured", "one_layer": "**estimated** (1 layer measured)"}
    lines = ["| seq | path | TTFT s | × cuDNN | attention s | rest s | rest / matmul floor | share in attention | "
             "peak GiB | how |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seq"], list(PATH_STYLE).index(r["path"].replace("_forced", "")), r["path"])):
        ratio = dense.get(r["seq"], float("nan")) / r["ttft_s"]
        measured = how.get(r["measured"], f"**estimated** (layer time {r['measured']} tokens, quadratic)")
        if r.get("note"):
            measured += f"; {r['note']}"
        peak = "–" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}"
        over_floor = f"{r['rest_over_floor']:.2f}" if "rest_over_floor" in r else "–"  # runs before the floor
        lines.append(
            f"| {tokens(r['seq'])} | {r['path']} | {r['ttft_s']:.2f} | {ratio:.2f} | {r['attention_s']:.2f} | "
            f"{r['rest_s']:.2f} | {over_floor} | {r['attention_share']:.0%} | {peak} | {measured} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "ttft_s" in r]
    if not rows:  # a run of the checks or cache stages only: nothing to draw
        return
    meta = results["meta"]
    fig, axes = plt.subplots(3, 2, figsize=(12, 12.5))
    (ax_ttft, ax_speed), (ax_attention, ax_rest), (ax_mem, ax_share) = axes
    dense = {r["seq"]: r for r in rows if r["path"] == "dense_cudnn"}
    for name, (label, color) in PATH_STYLE.items():
        mine = sorted((r for r in rows if r["path"] == name), key=lambda r: r["seq"])
        if not mine:
            continue
        xs = [r["seq"] for r in mine]
        full = [r["measured"] == "full" for r in mine]
        ax_ttft.plot(xs, [r["ttft_s"] for r in mine], "-", color=color, label=label)
        last = mine[-1]
        ax_ttft.annotate(f"{last['ttft_s']:.0f} s" if last["ttft_s"] >= 10 else f"{last['ttft_s']:.1f} s",
                         (last["seq"], last["ttft_s"]), textcoords="offset points",
                         xytext=(-34, -12 if name == "vertical_slash" else 4), fontsize=8, color=color)
        for ax, key in ((ax_ttft, "ttft_s"), (ax_attention, "attention_s"), (ax_rest, "rest_s")):
            if ax is not ax_ttft:
                ax.plot(xs, [r[key] for r in mine], "-", color=color, label=label)
            for x, r, f in zip(xs, mine, full):
                ax.plot(x, r[key], "o", color=color, markerfacecolor=color if f else "white")
        peaks = [(x, r["peak_gib"]) for x, r in zip(xs, mine) if r["peak_gib"] == r["peak_gib"]]
        if peaks:
            # Both sparse paths peak alike: draw A-shape dashed over Vertical-Slash so both show.
            ax_mem.plot(*zip(*peaks), "o--" if name == "a_shape" else "o-", color=color, label=label,
                        lw=2.5 if name == "vertical_slash" else 1.2)
        ax_share.plot(xs, [100 * r["attention_share"] for r in mine], "-", color=color, label=label)
        for x, r, f in zip(xs, mine, full):
            ax_share.plot(x, 100 * r["attention_share"], "o", color=color, markerfacecolor=color if f else "white")
        if name in ("vertical_slash", "a_shape"):
            pts = [(r["seq"], dense[r["seq"]]["ttft_s"] / r["ttft_s"]) for r in mine if r["seq"] in dense]
            if pts:
                ax_speed.plot(*zip(*pts), "o-", color=color, label=label)
                for x, y in pts:
                    below = name == "a_shape"
                    ax_speed.annotate(f"{y:.1f}×", (x, y), textcoords="offset points", xytext=(5, -12 if below else 5),
                                      fontsize=8, color=color)
    # What the rest of the model allows: dense TTFT over the non-attention time.
    caps = sorted((s, r["ttft_s"] / r["rest_s"]) for s, r in dense.items())
    if caps:
        ax_speed.plot(*zip(*caps), ":", color="0.4", label="bound: attention free")
    # The matmul floor: the non-attention GEMMs alone, measured in the same run (the last
    # measurement of a length wins).
    floor = sorted({f["seq"]: f["floor_s"] for f in results.get("matmul_floor", [])}.items())
    if floor:
        xs, ys = zip(*floor)
        ax_rest.plot(xs, ys, "--", color="k", lw=1.5, label="matmul floor (bare GEMMs, same run)")
        ax_rest.plot(xs, [1.25 * y for y in ys], ":", color="r", lw=1.2, label="target: 1.25 × floor")
        ax_ttft.plot(xs, ys, "--", color="0.5", lw=1, label="matmul floor of the rest")
    longest = max((r["seq"] for r in rows), default=0)
    for x, target in ((131072, 3), (1048576, 20)):
        if x > longest:
            continue
        ax_speed.plot(x, target, "r*", markersize=12)
        ax_speed.annotate(f"target {target}×", (x, target), textcoords="offset points", xytext=(-60, -14), fontsize=8, color="r")
    ax_speed.axhline(1, color="0.7", lw=0.8)
    if meta.get("gpu_memory_gib"):
        ax_mem.axhline(meta["gpu_memory_gib"], color="r", lw=0.8, ls="--")
        ax_mem.annotate(f"GPU memory {meta['gpu_memory_gib']:.0f} GiB", (max(r["seq"] for r in rows), meta["gpu_memory_gib"]),
                        textcoords="offset points", xytext=(0, -12), fontsize=8, color="r", ha="right")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ticks = sorted({r["seq"] for r in rows})
        ax.set_xticks(ticks, [tokens(t) for t in ticks])
        ax.minorticks_off()
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("time to first token (s)")
    ax_ttft.set_title("TTFT (hollow markers: dense estimated from one layer)")
    ax_speed.set_ylabel("TTFT speed-up over dense cuDNN (×)")
    ax_speed.set_yscale("log")
    ax_speed.set_title("speed-up over dense cuDNN, same run")
    ax_mem.set_ylabel("peak GPU memory (GiB, weights included)")
    ax_mem.set_ylim(bottom=0)
    ax_mem.set_title("peak GPU memory, no KV cache kept (dense from 256K: one layer)")
    ax_mem.legend(fontsize=8, loc="center left")
    ax_attention.set_yscale("log")
    ax_attention.set_ylabel("attention time (s, all layers)")
    ax_attention.set_title("attention (hollow markers: dense estimated from one layer)")
    ax_attention.legend(fontsize=8)
    ax_rest.set_yscale("log")
    ax_rest.set_ylabel("everything but attention (s)")
    ax_rest.set_title(f"the rest of the model (fuse: {meta.get('fuse', 'off')}) and its matmul floor")
    ax_rest.legend(fontsize=8)
    ax_share.set_ylabel("share of TTFT in attention (%)")
    ax_share.set_ylim(0, 100)
    ax_share.set_title("share of time in attention")
    ax_ttft.legend(fontsize=8)
    ax_speed.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"Llama-3-8B-shaped model (random bf16 weights), batch 1, prefill to first token — {meta['gpu']}, {meta['date']}\n"
        f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 262144, 524288, 1048576, 2097152])
    parser.add_argument("--stages", nargs="+", default=["checks", "crossover", "lengths", "cache", "generation"],
                        choices=["checks", "crossover", "lengths", "cache", "generation"])
    parser.add_argument("--paths", nargs="+", default=list(PATTERNS), choices=list(PATTERNS),
                        help="sparse paths to run (default: all); the dense paths always run")
    parser.add_argument("--full-dense-max", type=int, default=131072, help="dense runs the whole model up to this length")
    parser.add_argument("--dense-layer-max", type=int, default=1 << 20, help="cuDNN one-layer measurement up to this length")
    parser.add_argument("--fa2-max", type=int, default=524288, help="FA2 one-layer measurement up to this length")
    parser.add_argument("--cache-seqs", type=int, nargs="+", default=[131072],
                        help="lengths of the cache-mode comparison (prefill, then dense and sparse decoding)")
    parser.add_argument("--gen-tokens", type=int, default=8, help="tokens per generation timing (at least 3)")
    parser.add_argument("--gen-seq", type=int, default=1 << 20, help="prompt length of the generation stage")
    parser.add_argument("--chunk-size", type=int, default=lp.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                        help="the non-attention work compiled with torch.compile (auto: on a GPU)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip what is left after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with a tiny model and short lengths")
    parser.add_argument("--replot", type=Path, help="redraw the PNG and print the table from a saved JSON")
    args = parser.parse_args()
    if args.replot:
        results = json.loads(args.replot.read_text())
        plot(results, args.replot.with_suffix(".png"))
        print(table(results))
        return
    if args.gen_tokens < 3:
        parser.error(f"--gen-tokens must be at least 3 (a step is timed as n tokens minus 2), got {args.gen_tokens}")
    if args.tiny:
        # Half the others' scale: the cache (1024 tokens and the generated ones) then stays inside the
        # default sparse-decoding budget (2048 keys), where sparse decoding is dense token for token.
        args.gen_seq //= 1024
        args.lengths = [n // 512 for n in args.lengths]
        args.full_dense_max //= 512
        args.dense_layer_max //= 512
        args.fa2_max //= 512
        args.cache_seqs = [n // 512 for n in args.cache_seqs]
        args.chunk_size = 64
    bench = Bench(args)
    bench.log(f"model built: {bench.weights_gib:.1f} GiB of weights; {bench.results['meta']}")
    probe_cudnn_gqa(bench)
    # The sparse kernel picks its configuration (autotuning) on its first call: make that a long one.
    config = bench.model.config
    seq = 2048 if args.tiny else 131072
    q = torch.randn(1, config.num_attention_heads, seq, config.head_dim, device=bench.device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, config.num_key_value_heads, seq, config.head_dim, device=bench.device, dtype=torch.bfloat16)
            for _ in range(2))
    for pattern in bench.patterns.values():
        sparse_attention(q, k, v, pattern)
    del q, k, v
    # Compile and warm every path once at a short length.
    warm = bench.ids(256 if args.tiny else 4096)
    for attention in (bench.dense("cudnn"), bench.dense("fa2"), None):
        lp.prefill(bench.model, warm, attention=attention, fuse=bench.fuse)
    for name in bench.patterns:
        enabled(bench, name, 1)
        lp.prefill(bench.model, warm, fuse=bench.fuse)
        sparse_prefill.disable(bench.model)

    def stage(name: str, fn, *fn_args) -> None:
        # One failing stage must not lose the others' numbers: record it and go on.
        try:
            fn(bench, *fn_args)
        except Exception as error:  # noqa: BLE001 - recorded in the JSON, printed in full
            traceback.print_exc()
            bench.results.setdefault("stage_errors", {})[name] = f"{type(error).__name__}: {str(error)[:400]}"
            bench.clear()
            bench.save()

    if "checks" in args.stages:
        stage("checks", stage_checks)
    if "crossover" in args.stages:
        stage("crossover", stage_crossover)
    for seq in sorted(set(args.lengths) | set(args.cache_seqs if "cache" in args.stages else [])):
        if "lengths" in args.stages and seq in args.lengths:
            stage(f"length {seq}", stage_length, seq)
        if "cache" in args.stages and seq in args.cache_seqs:
            stage(f"cache modes {seq}", stage_cache_modes, seq)
    if "generation" in args.stages and not bench.over_budget():
        stage("generation", stage_long_generation, args.gen_seq)
    bench.results["elapsed_s"] = bench.elapsed()
    bench.save()
    plot(bench.results, args.out / "e2e.png")
    print(table(bench.results))
    print(json.dumps({k: v for k, v in bench.results["checks"].items() if "refusal_" not in k or "seconds" in k}, indent=1))


if __name__ == "__main__":
    main()
