"""Op-level timing: the ContMix aggregation (every backend, fused or not) and the depthwise convolutions.

Bytes that must move (the roofline an op is measured against): a forward reads every input once and
writes its output once; a backward reads the output gradient and every input once and writes one
gradient per input (the fused kernels' float32 log-sum-exp is not counted).
"""
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .shapes import DWConv, Na2dCall
from .timing import time_ms

__all__ = ['na2d_inputs', 'na2d_op', 'loop_baseline', 'bytes_to_move', 'time_na2d', 'copy_bandwidth',
           'time_depthwise_convs', 'gbs', 'default_backends']


def na2d_inputs(call: Na2dCall, batch: int, dtype: torch.dtype, device: torch.device, fused: bool,
                seed: int = 0, channels_last: bool = False, value_dtype: Optional[torch.dtype] = None,
                bias_dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """Inputs laid out as ContMix passes them, from a seeded CPU generator (the same numbers on any device).

    value is a view of a ``[B, 2*G*C, H, W]`` feature map (channel-first, or channels-last as the model runs it);
    the logits (fused) are a slice of a wider projection; the weights (unfused) are their softmax. ``dtype`` is
    the weights' (logits or attn); value and the bias table default to it (AMP: low-precision logits, float32
    value and bias). Returns [attn, value] or [logits, rpb, value].
    """
    gen = torch.Generator(device='cpu').manual_seed(seed)
    b, g, h, w, c, k = batch, call.groups, call.height, call.width, call.channels, call.kernel_size

    def randn(*size, to=dtype):
        return torch.randn(*size, generator=gen, dtype=torch.float32).to(device=device, dtype=to)

    extra = 25  # the other window's logits share the last axis in ContMix: the slice is not contiguous
    logits = randn(b, g, h, w, extra + k * k)[..., extra:]
    fmap = randn(b, 2 * g * c, h, w, to=value_dtype or dtype)
    if channels_last:
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    value = fmap.view(b, 2, g, c, h, w).permute(1, 0, 2, 4, 5, 3)[1]
    if not fused:
        return [torch.softmax(logits.float(), -1).to(dtype), value]
    return [logits, randn(g, 2 * k - 1, 2 * k - 1, to=bias_dtype or dtype), value]


def loop_baseline(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The obvious K*K gather-multiply-add loop through autograd (what a naive port does), for comparison."""
    from models.ops import torch_backend
    k = kernel_size
    rows = torch_backend.window_starts(value.shape[2], k, value.device)
    cols = torch_backend.window_starts(value.shape[3], k, value.device)
    out = torch.zeros_like(value)
    for ki in range(k):
        slab = value.index_select(2, rows + ki)
        for kj in range(k):
            out = out + attn[..., ki * k + kj, None] * slab.index_select(3, cols + kj)
    return out


def na2d_op(backend: str, fused: bool, kernel_size: int) -> Callable[..., torch.Tensor]:
    """The op of one backend ('torch', 'triton', 'natten', or 'loop' for :func:`loop_baseline`)."""
    from models import ops
    if backend == 'loop':
        if fused:
            raise ValueError('the loop baseline has no fused form')
        return lambda attn, value: loop_baseline(attn, value, kernel_size)
    if fused:
        return lambda logits, rpb, value: ops.na2d_softmax_av(logits, rpb, value, kernel_size, backend=backend)
    return lambda attn, value: ops.na2d_av(attn, value, kernel_size, backend=backend)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bytes_to_move(inputs: Sequence[torch.Tensor], out: torch.Tensor, backward: bool) -> int:
    """Minimum traffic of the forward, or of the backward alone (see the module docstring)."""
    ins = sum(_nbytes(t) for t in inputs)
    # backward: grad_out (the size of out) and the inputs read, one gradient per input written
    return _nbytes(out) + 2 * ins if backward else ins + _nbytes(out)


def time_na2d(call: Na2dCall, batch: int, dtype: torch.dtype, device: torch.device, backends: Iterable[str],
              fused: bool = False, backward: bool = True, **timing) -> List[Dict[str, object]]:
    """One row per backend: forward ms (no grad) and, with ``backward``, the backward alone
    (``torch.autograd.grad`` through a graph built once), with the bytes each must move.

    Args:
        timing: passed to :func:`~utils.measure.timing.time_ms` (warmup, repeat, min_time, flush_l2).
    """
    rows = []
    inputs = na2d_inputs(call, batch, dtype, device, fused)
    for backend in backends:
        op = na2d_op(backend, fused, call.kernel_size)
        with torch.no_grad():
            out = op(*inputs)
            fwd = time_ms(lambda: op(*inputs), device, **timing)
        row: Dict[str, object] = dict(shape=call.label, batch=batch, op='fused' if fused else 'na2d_av',
                                      dtype=str(dtype).replace('torch.', ''), backend=backend,
                                      fwd_ms=fwd.best, fwd_median_ms=fwd.median,
                                      fwd_bytes=bytes_to_move(inputs, out, backward=False))
        if backward:
            leaves = [t.detach().requires_grad_() for t in inputs]
            out = op(*leaves)
            grad = torch.randn_like(out)
            bwd = time_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), device, **timing)
            row.update(bwd_ms=bwd.best, bwd_median_ms=bwd.median, bwd_bytes=bytes_to_move(inputs, out, backward=True))
            del leaves, grad
        del out
        rows.append(row)
    return rows


def copy_bandwidth(device: torch.device, size_bytes: int = 1 << 30, **timing) -> float:
    """Device-to-device copy bandwidth in GB/s (``dst.copy_(src)``, counting read + write)."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, **timing).median
    return 2 * _nbytes(src) / (ms * 1e-3) / 1e9


def time_depthwise_convs(calls: Dict[DWConv, int], device: torch.device, dtype: torch.dtype, backward: bool,
                         **timing) -> List[Dict[str, object]]:
    """Time each distinct depthwise convolution alone (forward, or forward + backward for input and weight),
    contiguous (``nchw_ms``) and channels_last (``nhwc_ms``), median ms. ``gbs``: the faster layout's
    bandwidth, counting input + output + weight once for a forward and three times with the backward."""
    rows = []
    for conv_call, count in sorted(calls.items(), key=lambda kv: -kv[0].kernel):
        conv = nn.Conv2d(conv_call.channels, conv_call.channels, conv_call.kernel, conv_call.stride,
                         conv_call.padding, conv_call.dilation, groups=conv_call.channels, bias=conv_call.bias)
        conv = conv.to(device=device, dtype=dtype)
        x = torch.randn(conv_call.input, device=device, dtype=dtype)
        row: Dict[str, object] = dict(conv=conv_call.label, kernel=conv_call.kernel, calls=count)
        for fmt_name, fmt in (('nchw', torch.contiguous_format), ('nhwc', torch.channels_last)):
            conv = conv.to(memory_format=fmt)
            xi = x.contiguous(memory_format=fmt).requires_grad_(backward)
            with nullcontext() if backward else torch.no_grad():
                out = conv(xi)
            if backward:
                grad = torch.randn_like(out)

                def fn(conv=conv, xi=xi, grad=grad):
                    torch.autograd.grad(conv(xi), (xi, conv.weight), grad)
            else:
                def fn(conv=conv, xi=xi):
                    with torch.no_grad():
                        conv(xi)
            row[f'{fmt_name}_ms'] = time_ms(fn, device, **timing).median
        moved = (x.numel() + out.numel() + conv.weight.numel()) * x.element_size() * (3 if backward else 1)
        row['gbs'] = moved / (min(row['nchw_ms'], row['nhwc_ms']) * 1e-3) / 1e9
        rows.append(row)
    return rows


def gbs(nbytes: int, ms: float) -> float:
    """GB/s of moving ``nbytes`` in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def default_backends(baseline: bool = False) -> List[str]:
    """The backends available here (plus the naive loop with ``baseline``)."""
    from models import ops
    return list(ops.available_backends()) + (['loop'] if baseline else [])
