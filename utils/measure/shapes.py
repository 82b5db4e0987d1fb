"""The op shapes a network really calls, read off the network itself.

:func:`na2d_calls` builds a variant on the ``meta`` device (no memory, no arithmetic), runs one forward
pass and records every ContMix aggregation op (``torch.ops.overlock.*na2d*``) with its shapes, so the
tables follow the variants' definitions instead of being typed by hand. :func:`depthwise_convs` does the
same for the depthwise ``nn.Conv2d`` calls (the Base-Net's and ``lepe``'s large kernels included).
"""
import math
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['Na2dCall', 'na2d_calls', 'ContMixCall', 'contmix_block_calls', 'DWConv', 'depthwise_convs',
           'meta_model']


@dataclass(frozen=True)
class Na2dCall:
    """One ContMix aggregation call: value ``[B, groups, height, width, channels]``, window ``kernel_size``,
    made ``calls`` times per forward pass of one image batch."""
    groups: int
    height: int
    width: int
    channels: int
    kernel_size: int
    calls: int = 1

    @property
    def label(self) -> str:
        return f'{self.height}x{self.width} G{self.groups} C{self.channels} K{self.kernel_size}'

    def value_shape(self, batch: int) -> Tuple[int, int, int, int, int]:
        return batch, self.groups, self.height, self.width, self.channels


class _Na2dRecorder(TorchDispatchMode):
    """Counts the calls of the forward aggregation ops of the ``overlock`` op namespace."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()  # e.g. 'overlock::na2d_av_torch'
        if name.startswith('overlock::') and 'na2d' in name and 'grad' not in name:
            weights = args[0]  # attn or logits [B, G, H, W, K*K]; value is the last tensor argument
            value = [a for a in args if isinstance(a, torch.Tensor)][-1]
            _, g, h, w, c = value.shape
            k = math.isqrt(weights.shape[-1])
            self.calls[Na2dCall(g, h, w, c, k)] += 1
        return func(*args, **(kwargs or {}))


def meta_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` on the meta device, in eval mode (shapes only)."""
    import timm

    import models  # noqa: F401  (registers the overlock models)
    with torch.device('meta'):
        return timm.create_model(name, **kwargs).eval()


def na2d_calls(name: str = 'overlock_t', img_size: int = 224, **kwargs) -> List[Na2dCall]:
    """The ContMix aggregation calls of one forward pass of model ``name`` at ``img_size``², largest kernel
    first, each with its number of calls per forward (batch-free shapes: use ``value_shape(batch)``).

    Args:
        name: a registered OverLoCK model (training or ``_reparam`` form: same calls).
        img_size: input side.
        kwargs: constructor overrides (e.g. a tiny variant).
    """
    model = meta_model(name, **kwargs)
    recorder = _Na2dRecorder()
    with recorder, torch.no_grad():
        model(torch.empty(1, model.in_chans, img_size, img_size, device='meta'))
    calls = [Na2dCall(c.groups, c.height, c.width, c.channels, c.kernel_size, n) for c, n in recorder.calls.items()]
    return sorted(calls, key=lambda c: (-c.height * c.width, -c.kernel_size))


@dataclass(frozen=True)
class ContMixCall:
    """One ContMix block's call of ``models.ops.contmix_softmax_av``: x ``[B, channels, height, width]``, logits
    ``[B, groups, height, width, small**2 + large**2]``, the two windows ``small`` and ``large``."""
    channels: int
    groups: int
    height: int
    width: int
    small: int
    large: int
    calls: int = 1

    @property
    def label(self) -> str:
        return f'{self.height}x{self.width} C{self.channels} G{self.groups} s{self.small} K{self.large}'

    def windows(self) -> Tuple[Na2dCall, Na2dCall]:
        """The two ``na2d_softmax_av`` calls the block makes where the backend has no fused ContMix op."""
        c = self.channels // (2 * self.groups)
        return (Na2dCall(self.groups, self.height, self.width, c, self.small),
                Na2dCall(self.groups, self.height, self.width, c, self.large))


def contmix_block_calls(names: Sequence[str] = ('overlock_t',), img_size: int = 224, **kwargs) -> List[ContMixCall]:
    """The distinct ContMix block calls of one forward pass of each model in ``names`` at ``img_size``² (the
    arguments ``models.contmix`` passes to ``contmix_softmax_av``, after its resize of small maps), largest map
    first, ``calls`` summed over the models.

    Args:
        names: registered OverLoCK models (training and ``_reparam`` forms make the same calls).
        img_size: input side.
        kwargs: constructor overrides (e.g. a tiny variant).
    """
    from models import contmix
    seen: Counter = Counter()
    op = contmix.contmix_softmax_av

    def record(x, logits, rpb_small, rpb_large, small, large, backend=None):
        b, c, h, w = x.shape
        seen[ContMixCall(c, logits.shape[1], h, w, small, large)] += 1
        return op(x, logits, rpb_small, rpb_large, small, large, backend=backend)

    for name in names:
        model = meta_model(name, **kwargs)
        with mock.patch.object(contmix, 'contmix_softmax_av', record), torch.no_grad():
            model(torch.empty(1, model.in_chans, img_size, img_size, device='meta'))
    calls = [ContMixCall(c.channels, c.groups, c.height, c.width, c.small, c.large, n) for c, n in seen.items()]
    return sorted(calls, key=lambda c: (-c.height * c.width, -c.large, -c.channels, -c.groups))


@dataclass(frozen=True)
class DWConv:
    """One depthwise convolution call: weights [C, 1, k, k] on an input [B, C, H, W]."""
    channels: int
    kernel: int
    dilation: int
    padding: int
    stride: int
    bias: bool
    input: Tuple[int, ...]

    @property
    def label(self) -> str:
        d = f' d{self.dilation}' if self.dilation > 1 else ''
        return f'k{self.kernel}{d} C{self.channels} {self.input[2]}x{self.input[3]}'


def _is_depthwise(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
            and m.kernel_size[0] == m.kernel_size[1])


def depthwise_convs(model: nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Dict[DWConv, int]:
    """Run ``model(x)`` once (no grad; under autocast to ``dtype`` if given) and count the depthwise
    convolution calls by configuration. Works on the meta device."""
    calls: Counter = Counter()

    def hook(m, inputs):
        calls[DWConv(m.in_channels, m.kernel_size[0], m.dilation[0], m.padding[0], m.stride[0],
                     m.bias is not None, tuple(inputs[0].shape))] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if _is_depthwise(m)]
    enabled = dtype is not None and dtype != torch.float32 and x.device.type != 'meta'
    try:
        with torch.no_grad(), torch.autocast(x.device.type if x.device.type != 'meta' else 'cpu',
                                             dtype=dtype or torch.bfloat16, enabled=enabled):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls
