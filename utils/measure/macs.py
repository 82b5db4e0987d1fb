"""Counting multiply-accumulates (the paper's "FLOPs") of a model, ContMix's neighbourhood aggregation included.

``torch.utils.flop_counter.FlopCounterMode`` counts convolutions and matrix products (2 FLOPs per MAC); the
custom ``torch.ops.overlock.*`` ops register their formulas beside their definitions (``models/ops/flops.py``).
"""
from typing import Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import models.ops  # noqa: F401  (defines the overlock ops and registers their FLOP formulas)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, int, int, int], device='cpu') -> int:
    """Multiply-accumulates of one eval-mode forward pass on an input of ``input_size`` (B, C, H, W)."""
    was_training = model.training
    model.eval()
    x = torch.randn(*input_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2
