#!/usr/bin/env bash
# Installs sparse-prefill and runs the main job on its embedded default: the real model
# (SmolLM2-135M-Instruct) answering a needle question over ~6K tokens of public-domain text,
# prefilled sparsely and densely.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh eval
exec sparse-prefill run --demo --compare-dense "$@"
