#!/usr/bin/env bash
# Installs sparse-prefill with its test extras and runs the test suite (CPU; GPU tests skip
# themselves without a GPU, kernel logic runs under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,eval
exec python3 -m pytest -q "$@"
