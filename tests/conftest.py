"""Shared fixtures. Tests run from the repository root on the CPU."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import models  # noqa: E402  (registers the overlock models with timm)

# Small enough for fast CPU tests, large enough to exercise every code path (resize path included).
TINY_KWARGS = dict(
    depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 24, 32, 48], sub_num_heads=[2, 2], projection=64,
)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY_KWARGS)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def randomize_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine params, so that fusing BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_((torch.rand(n, generator=gen) - 0.5) * 0.4)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA device (skipped without one; run by scripts.gpu_report)')
