#!/usr/bin/env python3
"""Train OverLoCK on an ImageFolder dataset (one process, one GPU, or torchrun over GPUs and nodes); tar files,
webdataset shards (--dataset wds/...) and Hugging Face datasets (--dataset hfds/...) through timm's factory.

    python train.py -c configs/overlock_xt.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=8 train.py -c configs/overlock_xt.yaml --data-dir /data/imagenet

See docs/training.md for the recipe, resume, fine-tuning, memory relief and outputs.
"""
from utils.cli import run_cli
from utils.train_loop import main

if __name__ == '__main__':
    run_cli(main)
