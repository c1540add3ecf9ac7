#!/usr/bin/env bash
# One device session: the kernel tests on the GPU, then a compute-sanitizer memory check of the kernel.
# (Speed and accuracy: benchmarks/frontier.sh.)
# Usage (on the GPU machine, repository root): bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# Autotuning compiles every kernel config for each new shape, and long_prefill compiles its fused
# layer bodies once: the GPU tests take several minutes (the kernels' at real sizes: 192 s on an H200).
timeout 540 python3 -m pytest -q -p no:cacheprovider -m gpu --durations=10 tests/test_kernels.py tests/test_gpu.py \
  tests/test_decoding.py 2>&1 | tee "$out/tests.log" | tail -16
timeout 150 compute-sanitizer --tool memcheck --leak-check no python3 - <<'PY' 2>&1 | tee "$out/memcheck.log" | tail -4
import torch
from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash
from sparse_prefill.kernels import triton_sparse_attention
from sparse_prefill.synthetic import planted_qkv
p = planted_qkv(1, 8, 2, 4096 + 37, 128, dtype=torch.bfloat16, device="cuda")
patterns = [VerticalSlash(200, 1000), BlockSparse(16), AShape(64, 1000), Dense(),
            BlockCoverage(0.9), BlockSparse(2), AShape(0, 100), VerticalSlash(1, 1)]
out = triton_sparse_attention(p.q, p.k, p.v, patterns)
# A chunk whose first query block is partial (queries from position 1037), with the log-sum-exp.
chunk, lse = triton_sparse_attention(p.q[:, :, 1037:], p.k, p.v, patterns, return_lse=True)
# A sparse decoding step over a cache whose last page is partial.
from sparse_prefill.decoding import page_summaries, sparse_decode_attention
summaries = page_summaries(p.k, 16)
step = sparse_decode_attention(p.q[:, :, -1:], p.k, p.v, summaries, budget=1024)
torch.cuda.synchronize()
print("memcheck run finished, finite:", all(bool(torch.isfinite(t).all()) for t in (out, chunk, lse, step)))
PY
