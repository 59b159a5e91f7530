#!/usr/bin/env bash
# One-command smoke run of the scaled scripts (see scaled_runs/gpu_smoke.py):
#   bash scaled_runs/gpu_smoke.sh            # one GPU, full-size SDXL + PixArt with random weights (~5 min on an H200)
#   bash scaled_runs/gpu_smoke.sh --tiny     # CPU, tiny networks (the tests run this)
# Extra flags go to gpu_smoke.py (--steps N, --out DIR, --scripts align_sdxl distill_pixart distill_cifar).
# Writes <out>/report.json and <out>/report.md (default out: runs/gpu_smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m scaled_runs.gpu_smoke "$@"
