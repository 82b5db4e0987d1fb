#!/usr/bin/env bash
# Train OverLoCK-S on ImageNet with the original recipe (configs/overlock_s.yaml) through torch.distributed.run (torchrun).
#
#   bash scripts/train_s_model.sh /path/to/imagenet [more train.py options]
#
# GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON, LAUNCHER as in scripts/dist_train.sh (default: one node of 8 GPUs).
CALLER=$0 exec bash "$(dirname "$0")/dist_train.sh" configs/overlock_s.yaml "$@"
