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
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/tests.log" | tail -5
timeout 150 compute-sanitizer --tool memcheck --leak-check no python3 - <<'PY' 2>&1 | tee "$out/memcheck.log" | tail -4
import torch
from sparse_prefill import AShape, BlockCoverage, BlockSparse, Dense, VerticalSlash
from sparse_prefill.kernels import triton_sparse_attention
from sparse_prefill.synthetic import planted_qkv
p = planted_qkv(1, 8, 2, 4096 + 37, 128, dtype=torch.bfloat16, device="cuda")
out = triton_sparse_attention(p.q, p.k, p.v, [VerticalSlash(200, 1000), BlockSparse(16), AShape(64, 1000), Dense(),
                                              BlockCoverage(0.9), BlockSparse(2), AShape(0, 100), VerticalSlash(1, 1)])
torch.cuda.synchronize()
print("memcheck run finished, finite:", bool(torch.isfinite(out).all()))
PY
