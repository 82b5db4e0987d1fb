"""Shared test helpers: the tiny model configuration (defined here only), paths, BatchNorm randomisation."""
from pathlib import Path
from typing import Dict, List

import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the overlock models with timm)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'

# Small enough for fast CPU tests, large enough to exercise every code path: one block per stage, and at 32-64 px
# inputs the Focus-Net maps are smaller than its kernels (ContMix's resize path).
TINY_KWARGS: Dict[str, object] = dict(
    depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 24, 32, 48], sub_num_heads=[2, 2], projection=64,
)


def tiny_cli_kwargs() -> List[str]:
    """TINY_KWARGS as ``--model-kwargs`` values of the command-line tools (``depth=[1,1,1,1]`` ...)."""
    return [f'{k}={v}'.replace(' ', '') for k, v in TINY_KWARGS.items()]


def tiny_model(name: str = 'overlock_xt', **kwargs) -> nn.Module:
    """A tiny OverLoCK of the variant ``name`` (its form: training or ``_reparam``), 7 classes, plain convs."""
    return timm.create_model(name, **{**TINY_KWARGS, 'num_classes': 7, 'use_gemm': False, **kwargs})


def na2d_golden() -> List[Dict[str, object]]:
    """natten 0.17's float64 na2d_av outputs and gradients (tests/data/golden_na2d_av.pt): a list of cases with
    'attn', 'value', 'kernel_size', 'grad_out', 'out', 'grad_attn', 'grad_value'."""
    return torch.load(DATA / 'golden_na2d_av.pt', weights_only=True)


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine params, so that fusing BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_((torch.rand(n, generator=gen) - 0.5) * 0.4)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            m.bias.copy_(0.1 * torch.randn(n, generator=gen))
