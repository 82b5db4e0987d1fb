"""Counting multiply-accumulates (the paper's "FLOPs") of a model, ContMix's neighbourhood aggregation included.

``torch.utils.flop_counter.FlopCounterMode`` counts convolutions and matrix products (2 FLOPs per MAC) but
not our custom ``na2d_av`` ops; their formula (one MAC per attention weight and channel) is registered here.
"""
from typing import Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_REGISTERED = False


def _na2d_flops(attn_shape, value_shape, *args, **kwargs) -> int:
    b, g, h, w, kk = attn_shape
    return 2 * b * g * h * w * kk * value_shape[-1]


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    import models.ops.torch_backend  # noqa: F401  (defines overlock::na2d_av_torch)
    register_flop_formula(torch.ops.overlock.na2d_av_torch)(
        lambda attn_shape, value_shape, *a, out_shape=None, **k: _na2d_flops(attn_shape, value_shape))
    try:
        import models.ops.triton_backend  # noqa: F401
        register_flop_formula(torch.ops.overlock.na2d_av_triton)(
            lambda attn_shape, value_shape, *a, out_shape=None, **k: _na2d_flops(attn_shape, value_shape))
        register_flop_formula(torch.ops.overlock.na2d_softmax_av_triton)(
            lambda logits_shape, rpb_shape, value_shape, *a, out_shape=None, **k: _na2d_flops(logits_shape, value_shape))
    except (ImportError, AttributeError, RuntimeError):
        pass  # no triton: its ops are never called
    _REGISTERED = True


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, int, int, int], device='cpu') -> int:
    """Multiply-accumulates of one eval-mode forward pass on an input of ``input_size`` (B, C, H, W)."""
    _register()
    was_training = model.training
    model.eval()
    x = torch.randn(*input_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2
