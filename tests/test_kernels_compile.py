"""Every launched Triton kernel compiles for an H100/H200 (sm_90), on a machine without a GPU.

The kernel tests run on CPU under ``TRITON_INTERPRET=1``, and the interpreter accepts code that the
real compiler refuses: a kernel reading a plain Python global (``RADIX_BINS = 2048``), or calling
``n.to(tl.int64)`` on an int argument that Triton specialised to the constant 1 because it was 1 at
launch. Each such error used to surface only on a GPU machine. Triton compiles for a CUDA target
without a GPU (its NVIDIA backend bundles ptxas), so this test compiles every kernel as its launch
sites really launch it.

How the launches are found. Each entry of ``LAUNCH_SITES`` calls one of our launchers (``run_plan``,
``decode_over_pages``, ...) on ``meta`` tensors, with ``JITFunction.run`` and ``Autotuner.run``
replaced by a recorder: nothing runs, and what the launcher passes (tensors, ints, floats,
constexprs, num_warps) is recorded. Triton's own argument binder then turns each recorded call
into the signature, constexprs and attributes a real launch would compile (an int >= 2**31 becomes
``i64``, an int equal to 1 a constexpr 1, a pointer or int divisible by 16 gets ``tt.divisibility``),
and every autotune configuration the autotuner would try (after its pruning) is compiled.
A hand-written table of signatures was the alternative; it would repeat each launcher's argument
list and constexpr formulas (``max(16, next_power_of_2(head_dim))``), and could drift from the
launcher without failing. Recording the launcher's own call cannot drift, and meta tensors cost no
memory, so the cases use real sizes: 1M-token strides that overflow int32, and tiny shapes whose
ints are 1. What the entries choose is only the shapes, dtypes and options.

What is compiled. Every distinct variant goes through Triton's front end (the Python AST to TTIR,
and TTIR's passes; ~0.1 s): globals, constexpr specialisation and type errors are raised there.
The whole pipeline (TTGIR, LLVM, PTX and ptxas, down to a cubin: 1-13 s a compile) runs on each
kernel's first variant. num_warps and num_stages first matter in TTGIR (layouts, pipelining), so
the kernel's next variants are taken to TTGIR, each with one autotune configuration not compiled
yet, until every configuration has been. Compiling every variant to a cubin instead
takes minutes (``--stage cubin`` does it); this way the file takes 20 s on an idle 2-core machine.
Compiles run in a fresh process (the conftest sets ``TRITON_INTERPRET=1`` before kernels are
defined, and compiling needs it unset), with a worker per core and an empty Triton cache.

Every ``@triton.jit`` function in ``sparse_prefill`` must be either launched by a case here or
called from a launched kernel: a new kernel without a case fails ``test_every_kernel_is_covered``.
The test skips where Triton has no NVIDIA backend or no ptxas (never with a GPU present: that is a
broken install), and where Triton lacks the internals the recording uses (Triton 3.9 has them).

Run by hand: ``python tests/test_kernels_compile.py report.json`` (``--list`` only records).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # 20 s on an idle 2-core machine, up to a minute on a busy one

META = torch.device("meta")
TARGET_ARCH = 90  # sm_90: H100 and H200, our GPUs
H200_SMS = 132  # what torch reports as multi_processor_count on our H200s (an H100 SXM has 132 too)
SELF_CHECK_GLOBAL = 2048  # read by a deliberately broken kernel (see _broken_kernels)

# --- the launch sites: each entry calls one launcher on meta tensors -----------------------------------


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _qkv(dtype, batch, q_heads, kv_heads, q_len, seq, head_dim, transposed=False):
    """q [batch, q_heads, q_len, head_dim], k and v [batch, kv_heads, seq, head_dim]; ``transposed``:
    views of [batch, seq, heads, head_dim] tensors, as transformers' attention functions receive them."""
    def tensor(heads, length):
        if transposed:
            return _meta(batch, length, heads, head_dim, dtype=dtype).transpose(1, 2)
        return _meta(batch, heads, length, head_dim, dtype=dtype)

    return tensor(q_heads, q_len), tensor(kv_heads, seq), tensor(kv_heads, seq)


def _layer_indices(layer: str, batch: int, q_heads: int, seq: int, q_start: int) -> list:
    """One meta index per query head, of the kinds that make a layer's plan compile in the sparse
    kernel's loops: dense (diagonals), vertical_slash and a_shape (diagonals and columns),
    block_sparse (block lists; block_coverage's too), or all of them in a mixed layer."""
    from sparse_prefill.kinds.a_shape import AShapeIndex
    from sparse_prefill.kinds.block_sparse import BlockSparseIndex
    from sparse_prefill.kinds.dense import DenseIndex
    from sparse_prefill.kinds.vertical_slash import VerticalSlashIndex

    n_rows = -(-seq // 64) - q_start // 64
    kinds = {
        "dense": lambda: DenseIndex(batch),
        "vertical_slash": lambda: VerticalSlashIndex(columns=_meta(batch, 1000, dtype=torch.int64),
                                                     diagonals=_meta(batch, 96, dtype=torch.int64)),
        "a_shape": lambda: AShapeIndex(batch, sink=min(64, seq), local=min(4096, seq)),
        "block_sparse": lambda: BlockSparseIndex(_meta(batch * n_rows * 8, dtype=torch.int32),
                                                 _meta(batch, n_rows, dtype=torch.int64),
                                                 _meta(batch, n_rows, dtype=torch.int32), q_start // 64),
    }
    names = list(kinds) if layer == "mixed" else [layer]
    return [kinds[names[head % len(names)]]() for head in range(q_heads)]


def _sparse_attention(case):
    """kernels/sparse_attention.py ``run_plan`` (``_launch``): ``_sparse_attention_fwd``, as
    ``triton_sparse_attention`` (one sequence) and ``triton_attention_of_sequences`` (several) call it."""
    from sparse_prefill.kernels.plan import combine_plans, plan_from_indices
    from sparse_prefill.kernels.sparse_attention import run_plan

    def one(label, dtype, head_dim, layer, *, batch=1, q_heads=32, kv_heads=8, seq=16384, q_len=None, lse=False,
            transposed=False):
        q_len = seq if q_len is None else q_len
        with case(label):
            q, k, v = _qkv(dtype, batch, q_heads, kv_heads, q_len, seq, head_dim, transposed)
            q_start = seq - q_len
            plan = plan_from_indices(_layer_indices(layer, batch, q_heads, seq, q_start), batch, seq, META, q_start)
            lse_out = _meta(batch, q_heads, q_len, dtype=torch.float32) if lse else None
            run_plan(q, k, v, plan, head_dim**-0.5, lse=lse_out)

    def several(label, dtype, head_dim, layer, lengths, *, q_heads=32, kv_heads=8, packed=False, lse=False):
        """Whole sequences of ``lengths`` tokens: padded into a batch, or packed as
        ``sparse_attention_varlen`` lays them out (batch stride 0, [total, heads, head_dim] rows)."""
        n, total = len(lengths), sum(lengths)
        with case(label):
            plans = [plan_from_indices(_layer_indices(layer, 1, q_heads, length, 0), 1, length, META)
                     for length in lengths]
            if packed:
                offsets = [sum(lengths[:i]) for i in range(n)]
                q, out, k, v = (_meta(total, heads, head_dim, dtype=dtype).transpose(0, 1).unsqueeze(0)
                                .expand(n, -1, -1, -1) for heads in (q_heads, q_heads, kv_heads, kv_heads))
                lse_out = _meta(q_heads, total, dtype=torch.float32).unsqueeze(0).expand(n, -1, -1)
            else:
                offsets = [0] * n
                q, k, v = _qkv(dtype, n, q_heads, kv_heads, max(lengths), max(lengths), head_dim)
                out = torch.empty_like(q)
                lse_out = _meta(n, q_heads, max(lengths), dtype=torch.float32)
            plan = combine_plans(plans, offsets, offsets)
            run_plan(q, k, v, plan, head_dim**-0.5, out=out, lse=lse_out if lse else None)

    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 96, 128, 256):  # 96: a head padded to a wider tile (HEAD_DIM < HEAD_DIM_PADDED)
            one(f"{dtype} head_dim {head_dim}, mixed layer", dtype, head_dim, "mixed")
    for layer in ("dense", "vertical_slash", "block_sparse", "mixed"):
        one(f"{layer} layer, log-sum-exp", torch.bfloat16, 128, layer, lse=True)
        several(f"{layer} layer, sequences padded", torch.bfloat16, 128, layer, [3000, 700, 1])
        several(f"{layer} layer, sequences packed, log-sum-exp", torch.float16, 64, layer, [3000, 700, 65],
                packed=True, lse=True)
    one("SmolLM2 9/3 heads, transformers' layout, chunk of 4096 queries at 300K", torch.bfloat16, 64,
        "vertical_slash", q_heads=9, kv_heads=3, seq=300_000, q_len=4096, transposed=True)
    one("1M tokens, 32/8 heads (int64 strides)", torch.bfloat16, 128, "mixed", seq=2**20)
    one("one token, one head (ints specialised to 1)", torch.float16, 64, "dense", q_heads=1, kv_heads=1, seq=1,
        lse=True)
    several("one sequence of one token", torch.float16, 64, "dense", [1], q_heads=1, kv_heads=1, lse=True)


def _decode(case):
    """kernels/decode.py ``decode_over_pages``: ``_decode_split`` then ``_merge_splits``."""
    from sparse_prefill.kernels.decode import decode_over_pages

    def one(label, dtype, head_dim, *, batch=1, q_heads=32, kv_heads=8, capacity=131072, n_keys=100_000,
            n_selected=256, page_size=8, lse=False, slots_per_split=None):
        with case(label):
            q = _meta(batch, q_heads, 1, head_dim, dtype=dtype)
            k, v = (_meta(batch, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(2))
            pages = _meta(batch, kv_heads, n_selected, dtype=torch.int32)
            decode_over_pages(q, k, v, pages, n_keys, page_size, head_dim**-0.5, return_lse=lse,
                              slots_per_split=slots_per_split)

    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128, 256):
            one(f"{dtype} head_dim {head_dim}", dtype, head_dim)
    one("SmolLM2 9/3 heads, 16-key pages, log-sum-exp", torch.bfloat16, 64, q_heads=9, kv_heads=3, page_size=16,
        lse=True)
    one("MHA, 256 splits", torch.float16, 96, q_heads=8, kv_heads=8, n_selected=2048, slots_per_split=64)
    one("Gemma 3 4/1 heads, batch 4", torch.bfloat16, 256, batch=4, q_heads=4, kv_heads=1, capacity=32768,
        n_keys=32768)
    one("MHA 32 heads at 1M tokens (int64 strides)", torch.bfloat16, 128, q_heads=32, kv_heads=32,
        capacity=2**20, n_keys=2**20)
    one("one key, one head (ints specialised to 1)", torch.float16, 64, q_heads=1, kv_heads=1, capacity=1, n_keys=1,
        n_selected=1, lse=True)


def _page_scores(case):
    """kernels/decode.py ``page_bounds`` and ``page_ranking_keys`` (``_launch_bounds``):
    ``_page_bounds`` and ``_page_ranking_keys``."""
    from sparse_prefill.decoding import DEFAULT_LOCAL, DEFAULT_SINK, forced_pages
    from sparse_prefill.kernels.decode import page_bounds, page_ranking_keys

    def one(label, dtype, head_dim, *, batch=1, q_heads=32, kv_heads=8, capacity_pages=16384, n_keys=100_000,
            page_size=8):
        with case(label):
            n_pages = -(-n_keys // page_size)
            q = _meta(batch, q_heads, 1, head_dim, dtype=dtype)
            # The summaries are views of the filled pages of a larger storage (PageSummaries).
            key_min, key_max = (_meta(batch, kv_heads, capacity_pages, head_dim, dtype=dtype)[:, :, :n_pages]
                                for _ in range(2))
            page_bounds(q, key_min, key_max, head_dim**-0.5)
            first_free, first_local = forced_pages(n_keys, page_size, DEFAULT_SINK, DEFAULT_LOCAL)
            page_ranking_keys(q, key_min, key_max, head_dim**-0.5, first_free, first_local)

    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128, 256):
            one(f"{dtype} head_dim {head_dim}", dtype, head_dim)
    one("SmolLM2 9/3 heads, 16-key pages (one sink page)", torch.bfloat16, 64, q_heads=9, kv_heads=3, page_size=16)
    one("one page, one head (ints specialised to 1)", torch.float16, 80, q_heads=1, kv_heads=1, capacity_pages=1,
        n_keys=5)


def _top_pages(case):
    """kernels/decode.py ``top_pages``: ``_radix_counts`` (one per digit), ``_radix_tally``, ``_radix_write``
    (``decoding._choose`` on the GPU)."""
    from sparse_prefill.kernels.decode import top_pages

    for n_pages, n_selected, rows in ((16384, 256, (1, 8)), (131072, 2048, (1, 8)), (300, 256, (4, 8)),
                                      (1, 1, (1, 1))):
        with case(f"{n_selected} of {n_pages} pages, {rows[0]} x {rows[1]} rows"):
            top_pages(_meta(*rows, n_pages, dtype=torch.int64), n_selected)


def _block_coverage_mass(case):
    """kernels/coverage.py ``antidiagonal_tile_mass``: ``_antidiagonal_block_lse`` then ``_tile_mass``."""
    from sparse_prefill.kernels.coverage import antidiagonal_tile_mass

    def one(label, dtype, head_dim, stride, *, batch=1, q_heads=32, kv_heads=8, seq=65536, first_block=0, heads=None):
        with case(label):
            q, k, _ = _qkv(dtype, batch, q_heads, kv_heads, seq, seq, head_dim)
            # block_coverage.estimate passes the chunk's whole query blocks: a view past its partial first one.
            q_whole = q[:, :, first_block * 64:]
            ids = torch.arange(q_heads if heads is None else heads, device=META)
            antidiagonal_tile_mass(q_whole, k, ids, stride, head_dim**-0.5, first_block)

    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128, 256):
            one(f"{dtype} head_dim {head_dim}, stride 32 (the presets')", dtype, head_dim, 32)
    for stride in (1, 2, 4, 8, 16, 64):
        one(f"stride {stride}", torch.bfloat16, 64, stride, q_heads=9, kv_heads=3, seq=8192, first_block=3)
    one("1M tokens, 32/8 heads, one head at a time (int64 strides)", torch.bfloat16, 128, 32, seq=2**20, heads=1)
    one("one block, one head (ints specialised to 1)", torch.float16, 64, 16, q_heads=1, kv_heads=1, seq=64)


def _block_coverage_lists(case):
    """kernels/coverage.py ``coverage_block_lists``: ``_coverage_threshold`` then ``_write_blocks``."""
    from sparse_prefill.kernels.coverage import coverage_block_lists

    # Beyond 256 MiB of causal tiles the launcher reads the kept total back from the device, which a meta
    # tensor cannot do; the sizes stay below (the kernels' arguments do not depend on it).
    for rows, n_blocks, first_block in ((32, 16, 0), (16, 2048, 0), (4, 4096, 0), (4, 4700, 1000), (1, 1, 0)):
        with case(f"{rows} rows of {n_blocks} key blocks from query block {first_block}"):
            mass = _meta(rows, n_blocks - first_block, n_blocks, dtype=torch.float32)
            coverage_block_lists(mass, _meta(rows, dtype=torch.float32), first_block)


def _top_block_lists(case):
    """kernels/top_blocks.py ``top_block_lists``: ``_top_blocks``, rows held whole and read in chunks."""
    from sparse_prefill.kernels.top_blocks import top_block_lists

    for rows, n_blocks, first_block in ((9, 2048, 0), (4, 16384, 0), (4, 4700, 1000), (1, 1, 0)):
        with case(f"{rows} rows of {n_blocks} key blocks from query block {first_block}"):
            scores = _meta(rows, n_blocks - first_block, n_blocks, dtype=torch.float32)
            top_block_lists(scores, [64] * rows, first_block)


def _last_query(case):
    """kernels/last_query.py ``last_query_scores`` (``_row_statistics`` then ``_column_and_block_sums``),
    then ``diagonal_scores`` (``_diagonal_scores``) on what it returns and 1000 chosen columns."""
    from sparse_prefill.kernels.last_query import diagonal_scores, last_query_scores

    def one(label, dtype, head_dim, *, batch=1, q_heads=32, kv_heads=8, seq=65536, q_len=None, n_rows=64, heads=None):
        with case(label):
            q, k, _ = _qkv(dtype, batch, q_heads, kv_heads, seq if q_len is None else q_len, seq, head_dim)
            n = q_heads if heads is None else heads
            ids = torch.arange(n, device=META)
            _, block_sums, row_max, row_sum = last_query_scores(q, k, ids, _meta(batch * n, dtype=torch.int32), n_rows,
                                                                head_dim**-0.5)
            width = min(1000, seq)
            diagonal_scores(q, k, ids, _meta(batch * n, width, dtype=torch.int64), _meta(batch * n, dtype=torch.int64),
                            block_sums, row_max, row_sum, _meta(batch * n, n_rows, dtype=torch.bool), head_dim**-0.5)

    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128, 256):
            one(f"{dtype} head_dim {head_dim}, last_q 64", dtype, head_dim)
    one("SmolLM2 9/3 heads, batch 2, last_q 200", torch.bfloat16, 64, batch=2, q_heads=9, kv_heads=3, n_rows=200)
    one("1M tokens, 32/8 heads (int64 strides)", torch.bfloat16, 128, seq=2**20)
    one("a chunk of one query, one head (ints specialised to 1)", torch.float16, 64, q_heads=1, kv_heads=1, seq=1,
        q_len=1, n_rows=1)


LAUNCH_SITES = [_sparse_attention, _decode, _page_scores, _top_pages, _block_coverage_mass, _block_coverage_lists,
                _top_block_lists, _last_query]


# The kernels of _broken_kernels, and what the compiler must say about each.
BROKEN_KERNELS = {"_reads_plain_global": "Cannot access global variable SELF_CHECK_GLOBAL",
                  "_casts_an_int_that_may_be_one": "'int' object has no attribute 'to'"}


def _broken_kernels() -> dict:
    """Kernels that the interpreter runs and the compiler refuses, with their launch arguments."""
    import triton
    import triton.language as tl

    @triton.jit
    def _reads_plain_global(Out):
        tl.store(Out + tl.arange(0, 16), tl.full([16], SELF_CHECK_GLOBAL, tl.int32))

    @triton.jit
    def _casts_an_int_that_may_be_one(Out, n):  # n = 1 at launch: Triton makes it the constant 1
        tl.store(Out, n.to(tl.int64))

    return {"_reads_plain_global": (_reads_plain_global, [_meta(16, dtype=torch.int32)]),
            "_casts_an_int_that_may_be_one": (_casts_an_int_that_may_be_one, [_meta(1, dtype=torch.int64), 1])}


# --- recording launches ---------------------------------------------------------------------------------


@dataclass
class Launch:
    site: str  # the LAUNCH_SITES entry
    case: str
    kernel: object  # the JITFunction or Autotuner launched
    args: tuple
    kwargs: dict


@dataclass
class Recorder:
    launches: list[Launch] = field(default_factory=list)
    site: str = ""
    label: str = ""

    @contextlib.contextmanager
    def case(self, label: str):
        self.label = label
        yield

    @contextlib.contextmanager
    def patched(self):
        from unittest import mock

        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        def record(kernel, *args, **kwargs):
            self.launches.append(Launch(self.site, self.label, kernel, args, kwargs))

        # decode_over_pages splits its pages to fill the device's SMs; a meta tensor's device has none.
        sm_count = mock.patch("sparse_prefill.kernels.decode._sm_count", lambda device: H200_SMS)
        with mock.patch.object(JITFunction, "run", record), mock.patch.object(Autotuner, "run", record), sm_count:
            yield


def record_launches() -> list[Launch]:
    recorder = Recorder()
    with recorder.patched():
        for site in LAUNCH_SITES:
            recorder.site = site.__name__.lstrip("_")
            site(recorder.case)
        recorder.site = "self_check"
        for name, (kernel, args) in _broken_kernels().items():
            with recorder.case(name):
                kernel[(1,)](*args)
    return recorder.launches


# --- from recorded launches to compile jobs ---------------------------------------------------------------


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of the same dtype whose address is as aligned as the launch's would be (a fresh
    CUDA allocation is 256-byte aligned; a view is offset by its storage offset)."""
    misalignment = tensor.storage_offset() * tensor.element_size() % 16
    return torch.empty(32, dtype=torch.uint8)[misalignment : misalignment + 16].view(tensor.dtype)


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", TARGET_ARCH, 32)


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _configs(launch: Launch) -> list:
    """Each configuration the launch compiles (its autotuner's, pruned as it would), as a function
    that prepares the arguments as the autotuner does before that configuration's launch (its
    ``pre_hook``: a tensor descriptor's block follows the tile) and returns the launch options."""
    from triton.runtime.autotuner import Autotuner

    kernel, kwargs = launch.kernel, launch.kwargs
    if not isinstance(kernel, Autotuner):
        return [lambda: {}]
    kernel.nargs = dict(zip(kernel.arg_names, launch.args))

    def prepare(config):
        if config.pre_hook is not None:
            config.pre_hook({**kernel.nargs, **kwargs, **config.all_kwargs()})
        return config.all_kwargs()

    return [lambda config=config: prepare(config) for config in kernel.prune_configs(kwargs)]


def _specialise(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` computes them for an sm_90 device."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target())
    args = tuple(_placeholder(a) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: _placeholder(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    launch_options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    return signature, constexprs, attrs, launch_options


def _describe(fn, signature: dict, constexprs: dict, options: dict) -> str:
    """The parts of a variant that differ between launches: dtypes, int64 and constant ints, constexprs."""
    pointers = sorted({t for t in signature.values() if t.startswith("*") and t[1:] in ("bf16", "fp16")})
    wide = [name for name, t in signature.items() if t == "i64"]
    values = {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    declared = {param.name for param in fn.params if param.is_constexpr}
    ones = [name for name, t in signature.items() if t == "constexpr" and name not in declared]
    parts = [" ".join(p[1:] for p in pointers)]
    parts += [f"int64 {', '.join(wide)}"] if wide else []
    parts += [f"constant {', '.join(f'{n}={values[n]}' for n in ones)}"] if ones else []
    parts += [", ".join(f"{n}={v}" for n, v in values.items() if n not in ones)]
    parts += [", ".join(f"{k}={v}" for k, v in sorted(options.items()) if k in ("num_warps", "num_stages"))]
    return "; ".join(p for p in parts if p)


@dataclass
class Job:
    site: str
    case: str
    kernel: str  # "module.name", or "self_check.name"
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    stage: str  # the last one compiled: ttir, ttgir or cubin
    description: str

    @property
    def name(self) -> str:
        return self.kernel.rsplit(".", 1)[1]


def compile_jobs(launches: list[Launch], stage: str | None = None) -> list[Job]:
    """One job per distinct variant of a kernel. The kernel's first variant is compiled to a cubin;
    its next ones to TTGIR, each with one of the autotune configurations not compiled yet, until
    every configuration has been; the rest through the front end (TTIR). ``stage``: all to that one."""
    jobs: list[Job] = []
    seen: set[str] = set()
    taken: dict[str, list[str]] = {}  # kernel -> the configurations its jobs have compiled
    for launch in launches:
        fn = _jit_function(launch.kernel)
        kernel = f"{'self_check' if launch.site == 'self_check' else fn.fn.__module__}.{fn.__name__}"
        kwargs = {k: v for k, v in launch.kwargs.items() if k not in ("grid", "warmup")}
        variants = [(json.dumps(config, sort_keys=True), *_specialise(fn, launch.args, {**kwargs, **config}))
                    for config in (prepare() for prepare in _configs(launch))]
        key = repr((kernel, *(sorted(part.items()) for part in variants[0][1:4])))
        if key in seen:
            continue
        seen.add(key)
        done = taken.setdefault(kernel, [])
        untried = [v for v in variants if v[0] not in done]
        config, signature, constexprs, attrs, options = (untried or variants)[0]
        if stage:
            job_stage = stage
        elif not done:
            job_stage = "cubin"
        else:
            job_stage = "ttgir" if untried else "ttir"
        done.append(config)
        jobs.append(Job(launch.site, launch.case, kernel, signature, constexprs, attrs, options, job_stage,
                        _describe(fn, signature, constexprs, options)))
    return jobs


# --- compiling (in worker processes) ------------------------------------------------------------------------


def _kernel_registry() -> dict:
    registry = {f"{_jit_function(k).fn.__module__}.{name}": _jit_function(k) for name, k in _module_kernels().items()}
    registry.update({f"self_check.{name}": kernel for name, (kernel, _) in _broken_kernels().items()})
    return registry


_REGISTRY: dict = {}


def _compile(job: Job) -> tuple[float, str | None]:
    """Compile one job; (seconds, None) or (seconds, the compiler's error)."""
    import triton
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource, make_backend

    target = _target()
    start = time.perf_counter()
    try:
        fn = _REGISTRY[job.kernel]
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        if job.stage == "cubin":
            compiled = triton.compile(src, target=target, options=job.options)
            if not compiled.asm.get("cubin"):
                return time.perf_counter() - start, "the compiler returned no cubin"
        else:  # what triton.compile does, stopped after TTIR (or TTGIR)
            backend = make_backend(target)
            options = backend.parse_options(job.options)
            context = ir.context()
            ir.load_dialects(context)
            backend.load_dialects(context)
            module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                                 context)
            stages: dict = {}
            backend.add_stages(stages, options, src.language)
            metadata = {"hash": "not-cached", "target": target, **options.__dict__}
            for stage, lower in stages.items():
                module = lower(module, metadata)
                if stage == job.stage:
                    break
    except Exception as error:  # noqa: BLE001 - every compiler error is the finding
        return time.perf_counter() - start, f"{type(error).__name__}: {error}"[:4000]
    return time.perf_counter() - start, None


# --- coverage: every jit function launched or called from a launched one ----------------------------------


def _module_kernels() -> dict:
    """Every module-level ``@triton.jit`` function (or autotuned kernel) in ``sparse_prefill``, by name."""
    import importlib

    import sparse_prefill
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    root = Path(sparse_prefill.__file__).parent
    kernels = {}
    for path in sorted(root.rglob("*.py")):
        if "triton.jit" not in path.read_text():
            continue
        module = importlib.import_module(".".join(("sparse_prefill", *path.relative_to(root).with_suffix("").parts)))
        for name, value in vars(module).items():
            if isinstance(value, (JITFunction, Autotuner)) and _jit_function(value).fn.__module__ == module.__name__:
                kernels[name] = value
    return kernels


def coverage(launches: list[Launch]) -> dict:
    kernels = {name: _jit_function(k) for name, k in _module_kernels().items()}
    launched = {_jit_function(launch.kernel).__name__ for launch in launches if launch.site != "self_check"}
    called: set[str] = set()
    frontier = [kernels[name] for name in launched if name in kernels]
    while frontier:  # helpers: called by name from a launched kernel or from another helper
        source = frontier.pop().src
        for name, fn in kernels.items():
            if name not in launched | called and re.search(rf"\b{re.escape(name)}\s*\(", source):
                called.add(name)
                frontier.append(fn)
    return {"launched": sorted(launched), "helpers": sorted(called),
            "uncovered": sorted(set(kernels) - launched - called)}


# --- the subprocess's entry point -------------------------------------------------------------------------


def _cuda_compiler_missing() -> str | None:
    """Why this Triton cannot compile for CUDA at all, or None."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as error:
        return f"Triton is not importable: {error}"
    if "nvidia" not in backends:
        return f"Triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})"
    if not hasattr(triton, "knobs"):
        return None  # an older Triton: _recording_unsupported says so
    try:
        triton.knobs.nvidia.ptxas  # noqa: B018 - raises RuntimeError without a ptxas
    except RuntimeError as error:
        return f"Triton {triton.__version__} finds no ptxas: {error}"
    return None


def _recording_unsupported() -> str | None:
    """Why this Triton lacks the internals that turn a recorded call into a compile (Triton 3.9 has
    them; pyproject allows any 3.x, and the GPU machine has 3.6), or None."""
    import triton
    import triton.runtime.jit as jit
    from triton.compiler import ASTSource

    missing = [name for name, present in (
        ("triton.runtime.jit.create_function_from_signature", hasattr(jit, "create_function_from_signature")),
        ("JITFunction._pack_args", hasattr(jit.JITFunction, "_pack_args")),
        ("ASTSource.make_ir", hasattr(ASTSource, "make_ir")),
        ("triton.knobs", hasattr(triton, "knobs")),
    ) if not present]
    return f"Triton {triton.__version__} lacks {', '.join(missing)}" if missing else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="where to write the JSON report")
    parser.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    parser.add_argument("--list", action="store_true", help="record the launches and list the jobs, compile nothing")
    parser.add_argument("--stage", choices=("ttir", "ttgir", "cubin"), help="compile every variant to this stage")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    report: dict = {"unavailable": _cuda_compiler_missing(), "unsupported": None}
    if report["unavailable"] is None:
        report["unsupported"] = _recording_unsupported()
    if report["unavailable"] is None and report["unsupported"] is None:
        import triton

        start = time.perf_counter()
        with _workers(0 if args.list else args.workers) as pool:  # they start while the launches are recorded
            launches = record_launches()
            jobs = compile_jobs(launches, args.stage)
            report.update(coverage(launches), triton=triton.__version__, n_launches=len(launches),
                          record_seconds=round(time.perf_counter() - start, 1))
            if args.list:
                report["jobs"] = [{"kernel": j.name, "case": j.case, "stage": j.stage, "variant": j.description}
                                  for j in jobs]
            else:
                report["results"] = _run_jobs(jobs, pool)
        report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


def _load_kernels() -> None:
    _REGISTRY.update(_kernel_registry())


@contextlib.contextmanager
def _workers(n: int):
    """A pool of ``n`` spawned processes (a fork would share Triton's state), started at once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if n == 0:
        yield None
        return
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_load_kernels) as pool:
        for _ in range(n):
            pool.submit(int)
        yield pool


def _run_jobs(jobs: list[Job], pool) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    order = sorted(range(len(jobs)), key=lambda i: ("cubin", "ttgir", "ttir").index(jobs[i].stage))  # slowest first
    futures = {i: pool.submit(_compile, jobs[i]) for i in order}
    outcomes = {}
    for i, future in futures.items():
        with contextlib.suppress(BrokenProcessPool):
            outcomes[i] = future.result()
    # A compiler that aborts kills its worker and the pool: compile what is left one job at a time,
    # in a fresh process after each crash, so that a crash is reported against its own job.
    alone = None
    for i in (i for i in order if i not in outcomes):
        alone = alone or ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_load_kernels)
        try:
            outcomes[i] = alone.submit(_compile, jobs[i]).result()
        except BrokenProcessPool:
            outcomes[i] = (0.0, "the compiler crashed its process (its message is in the check's stderr)")
            alone.shutdown()
            alone = None
    if alone:
        alone.shutdown()
    return [{"site": job.site, "case": job.case, "kernel": job.name, "variant": job.description,
             "stage": job.stage, "seconds": round(outcomes[i][0], 2), "error": outcomes[i][1]}
            for i, job in enumerate(jobs)]


# --- the tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    import sparse_prefill

    directory = tmp_path_factory.mktemp("kernels_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(directory / "triton_cache")  # compile everything: no earlier run's cubins
    source = str(Path(sparse_prefill.__file__).parent.parent)  # the sparse_prefill this pytest imports
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    path = directory / "report.json"
    run = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0 or not path.exists():
        pytest.fail(f"the compile check exited with {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
    result = json.loads(path.read_text())
    if result["unavailable"]:
        if torch.cuda.is_available():
            pytest.fail(f"a GPU is present but Triton cannot compile for CUDA: {result['unavailable']}")
        pytest.skip(f"Triton cannot compile for CUDA here: {result['unavailable']}")
    if result["unsupported"]:  # an older Triton: its GPU runs (pytest -m gpu) compile the kernels instead
        pytest.skip(f"this test records launches through Triton 3.9's internals: {result['unsupported']}")
    return result


def test_every_launched_kernel_compiles_for_sm90(report):
    results = [r for r in report["results"] if r["site"] != "self_check"]
    failures = [r for r in results if r["error"]]
    message = "\n\n".join(f"{r['kernel']} ({r['site']}: {r['case']}; {r['variant']}) failed at {r['stage']}:\n"
                          f"{r['error']}" for r in failures)
    assert not failures, f"{len(failures)} of {len(results)} compiles failed for sm_{TARGET_ARCH}:\n\n{message}"
    assert {r["kernel"] for r in results if r["stage"] == "cubin"} == set(report["launched"])


def test_every_kernel_is_covered(report):
    assert not report["uncovered"], (
        f"@triton.jit functions neither launched by a case of {Path(__file__).name}'s LAUNCH_SITES nor called from a "
        f"launched kernel: {report['uncovered']}; add a case that calls their launcher")


def test_compile_errors_are_reported(report):
    """The broken kernels of _broken_kernels fail, and the report names the kernel and the error."""
    checks = {r["kernel"]: r for r in report["results"] if r["site"] == "self_check"}
    assert set(checks) == set(BROKEN_KERNELS)
    for name, expected in BROKEN_KERNELS.items():
        assert checks[name]["error"] and expected in checks[name]["error"], checks[name]


if __name__ == "__main__":
    sys.exit(main())
