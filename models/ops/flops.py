"""FLOP formulas of the ``overlock::*`` custom ops, for ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts PyTorch's convolutions and matrix products (2 FLOPs per multiply-accumulate) but knows
nothing of custom ops. Each backend registers its ops here where it defines them, so a count covers whichever
backend ran. The neighbourhood aggregation does one multiply-accumulate per attention weight and channel; the
softmax and bias of the fused op are not counted (as FlopCounterMode counts no elementwise op).
"""
from typing import Sequence, Set

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ['na2d_flops', 'register_na2d_av', 'register_na2d_softmax_av', 'register_contmix_softmax_av']

_registered: Set[str] = set()


def na2d_flops(attn_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """FLOPs (2 per multiply-accumulate) of aggregating attn [B, G, H, W, K*K] over value [B, G, H, W, C]."""
    b, g, h, w, kk = attn_shape
    return 2 * b * g * h * w * kk * value_shape[-1]


def _register(name: str, formula) -> None:
    if name in _registered:  # FlopCounterMode refuses a second registration
        return
    register_flop_formula(getattr(torch.ops.overlock, name))(formula)
    _registered.add(name)


def register_na2d_av(name: str) -> None:
    """Count ``torch.ops.overlock.<name>(attn, value, kernel_size)`` as a neighbourhood aggregation."""
    _register(name, lambda attn_shape, value_shape, *args, out_shape=None, **kwargs:
              na2d_flops(attn_shape, value_shape))


def register_na2d_softmax_av(name: str) -> None:
    """Count ``torch.ops.overlock.<name>(logits, rpb, value, kernel_size)`` as a neighbourhood aggregation."""
    _register(name, lambda logits_shape, rpb_shape, value_shape, *args, out_shape=None, **kwargs:
              na2d_flops(logits_shape, value_shape))


def register_contmix_softmax_av(name: str) -> None:
    """Count ``torch.ops.overlock.<name>(x, logits, rpb_small, rpb_large, small, large)``: both windows of a
    ContMix block, each aggregating half of the channels of x [B, C, H, W]."""
    def formula(x_shape, logits_shape, *args, out_shape=None, **kwargs) -> int:
        b, c, h, w = x_shape
        return b * c * h * w * logits_shape[-1]  # 2 FLOPs x (C / 2) channels x (s^2 + K^2) weights per pixel
    _register(name, formula)
