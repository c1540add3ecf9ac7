#!/usr/bin/env bash
# Installs sparse-prefill and runs the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh eval
exec sparse-prefill demo "$@"
