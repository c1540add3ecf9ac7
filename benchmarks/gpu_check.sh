#!/usr/bin/env bash
# One device session: kernel tests on the GPU, a memory check, then the kernel benchmark.
# Usage (on the GPU machine, repository root): bash benchmarks/gpu_check.sh OUTDIR [benchmark args...]
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR [benchmark args]}
shift
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/tests.log" | tail -5
timeout 150 compute-sanitizer --tool memcheck --leak-check no python3 - <<'PY' 2>&1 | tee "$out/memcheck.log" | tail -4
import torch
from sparse_prefill import AShape, BlockSparse, Dense, VerticalSlash
from sparse_prefill.kernels import triton_sparse_attention
from sparse_prefill.synthetic import planted_qkv
p = planted_qkv(1, 8, 2, 4096 + 37, 128, dtype=torch.bfloat16, device="cuda")
out = triton_sparse_attention(p.q, p.k, p.v, [VerticalSlash(200, 1000), BlockSparse(16), AShape(64, 1000), Dense(),
                                              VerticalSlash(100, 500, slash_block=1), BlockSparse(2), AShape(0, 100), VerticalSlash(1, 1)])
torch.cuda.synchronize()
print("memcheck run finished, finite:", bool(torch.isfinite(out).all()))
PY
timeout 420 python3 benchmarks/kernels.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
