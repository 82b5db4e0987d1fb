#!/usr/bin/env bash
# Train, validate, re-parameterise and re-validate a small OverLoCK on real images (CPU, no download).
# Usage: bash scripts/demo.sh [OUTDIR]   (default: output/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m scripts.demo "$@"
