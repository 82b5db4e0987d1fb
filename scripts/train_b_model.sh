#!/usr/bin/env bash
# Train OverLoCK-B on ImageNet with the original recipe (configs/overlock_b.yaml) through torchrun.
#
#   bash scripts/train_b_model.sh /path/to/imagenet [more train.py options]
#
# Environment (defaults: one node of 8 GPUs):
#   GPUS=8 NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
# Two nodes: run on each node with NNODES=2, NODE_RANK=0 / 1 and MASTER_ADDR set to node 0's address.
# The batch in the config is per GPU (256); with fewer GPUs pass --grad-accum-steps to keep 2048 in total.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 DATA_DIR [train.py options...]" >&2
    exit 2
fi
DATA=$1
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${GPUS:-8}

REPO="$(cd "$(dirname "$0")/.." && pwd)"
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    "$REPO/train.py" --config "$REPO/configs/overlock_b.yaml" --data-dir "$DATA" "${@:2}"
