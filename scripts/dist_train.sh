#!/usr/bin/env bash
# Multi-process launcher behind scripts/train_{xt,t,s,b}_model.sh:
#
#   bash scripts/dist_train.sh CONFIG.yaml DATA_DIR [more train.py options]
#
# Environment (defaults: one node of 8 GPUs):
#   GPUS=8 NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
#   PYTHON=python3   the interpreter that has the requirements; it runs `-m torch.distributed.run` (torchrun)
#   LAUNCHER="..."   replaces "$PYTHON -m torch.distributed.run" (e.g. LAUNCHER=torchrun)
#   MAX_RESTARTS=0   torchrun restarts the workers in place after a failure this many times (with --resume auto
#                    --recovery-interval N they continue from the newest checkpoint; one node: see
#                    docs/training.md, "Preemption and failures")
# Two nodes: run on each node with NNODES=2, NODE_RANK=0 / 1 and MASTER_ADDR set to node 0's address.
# The batch in the configs is per GPU; with fewer GPUs pass --grad-accum-steps to keep the global batch.
set -euo pipefail

CALLER=${CALLER:-$0 CONFIG.yaml}
if [[ $# -lt 2 || "$2" == -* ]]; then
    echo "usage: $CALLER DATA_DIR [train.py options...]" >&2
    exit 2
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG=$1
DATA=$2
[[ "$CONFIG" = /* ]] || CONFIG="$REPO/$CONFIG"

PYTHON=${PYTHON:-python3}
if [[ -z "${LAUNCHER:-}" ]]; then
    if ! "$PYTHON" -c 'import torch.distributed.run' 2>/dev/null; then
        echo "error: $PYTHON cannot import torch; set PYTHON=/path/to/python of the environment that has the requirements" >&2
        exit 2
    fi
    LAUNCHER="$PYTHON -m torch.distributed.run"
fi

# shellcheck disable=SC2086  # LAUNCHER is a command line, split on purpose
exec $LAUNCHER --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="${GPUS:-8}" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    "$REPO/train.py" --config "$CONFIG" --data-dir "$DATA" "${@:3}"
