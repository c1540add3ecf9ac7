#!/usr/bin/env bash
# The accuracy-speed frontier (benchmarks/frontier.py) on the GPU machine, from the repository root.
# Usage: bash benchmarks/frontier.sh MODEL.gguf TEXT.txt OUTDIR [frontier.py args...]
set -uo pipefail
usage="usage: frontier.sh MODEL TEXT OUTDIR [frontier.py args...]"
model=${1:?$usage}
text=${2:?$usage}
out=${3:?$usage}
shift 3
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi -L
python3 -c "import platform, torch, triton, transformers; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/frontier.py --model "$model" --text "$text" --out "$out" "$@" 2>&1 | tee "$out/frontier.log"
