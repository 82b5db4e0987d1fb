"""Counting multiply-accumulates (the paper's "FLOPs") of a model, ContMix's neighbourhood aggregation included.

``torch.utils.flop_counter.FlopCounterMode`` counts convolutions and matrix products (2 FLOPs per MAC); the
custom ``torch.ops.overlock.*`` ops register their formulas beside their definitions (``models/ops/flops.py``).
"""
from typing import Dict, Tuple

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


@torch.no_grad()
def macs_by_kind(model: nn.Module, input_size: Tuple[int, int, int, int]) -> Dict[str, int]:
    """Multiply-accumulates of the convolution and linear layers of one eval-mode forward pass, by kind:
    ``pointwise`` (1x1 convolutions and linear layers: GEMMs on a CPU), ``dense_conv`` (k x k, k > 1, not
    depthwise) and ``depthwise``: what a runtime must spend at least. ContMix's aggregation, norms and
    activations are left out (:func:`count_macs` has the aggregation)."""
    macs = {'pointwise': 0, 'dense_conv': 0, 'depthwise': 0}

    def count(module: nn.Module, inputs, out: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            macs['pointwise'] += out.numel() * module.in_features
            return
        taps = module.kernel_size[0] * module.kernel_size[1]
        kind = 'pointwise' if taps == 1 else 'depthwise' if module.groups == module.in_channels > 1 else 'dense_conv'
        macs[kind] += out.numel() * module.in_channels // module.groups * taps

    was_training = model.training
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        param = next(model.parameters(), None)
        model.eval()(torch.randn(*input_size, device=param.device if param is not None else 'cpu',
                                 dtype=param.dtype if param is not None else torch.float32))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return macs
