#!/usr/bin/env bash
# The accuracy runs behind docs/ACCURACY.md: needle, RULER-style tasks and perplexity on SmolLM2-135M,
# dense vs sparse (uniform default budget, and the config shipped for the model) vs a-shape.
# Usage: benchmarks/accuracy.sh gpu|cpu OUTDIR [MODEL]
#   gpu: 2K-32K (YaRN beyond 8K); cpu: 2K-8K with fewer samples (hours on 2 cores otherwise).
# Results already in OUTDIR are kept and not recomputed.
set -euo pipefail
mode=${1:?usage: accuracy.sh gpu|cpu OUTDIR [MODEL]}
out=${2:?usage: accuracy.sh gpu|cpu OUTDIR [MODEL]}
model=${3:-default}
run() { python3 -m sparse_prefill.cli eval "$@" --model "$model" --out "$out" --no-progress; }
if [ "$mode" = gpu ]; then
  run needle --config uniform --lengths 2k,4k,8k,16k,32k
  run ppl --config uniform --lengths 8k,16k,32k --samples 4
  run ruler --config uniform --lengths 8k,16k --samples 5
else
  run needle --config uniform --lengths 2k,4k,8k --depths 0,0.25,0.5,0.75,1
  run ppl --config uniform --lengths 2k,4k,8k --samples 1
  run ruler --config uniform --lengths 2k --samples 2
fi
