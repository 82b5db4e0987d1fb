"""Where a model's time goes: its depthwise convolutions timed alone, and a profiler table of one step.

Issue 5 asks whether cuDNN's large-kernel depthwise convolutions (K = 17/15/13 in the Base-Net and the
ContMix ``lepe`` branch) bound OverLoCK's speed. :func:`depthwise_convs` records every depthwise
``nn.Conv2d`` a forward pass calls (with its input shape), :func:`time_depthwise_convs` times each distinct
one alone, in both memory layouts, so their summed time can be set against a whole step.
"""
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

__all__ = ['DWConv', 'depthwise_convs', 'time_depthwise_convs', 'wall_timer', 'device_timer', 'profile_table']


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


def depthwise_convs(model: nn.Module, x: torch.Tensor) -> Counter:
    """Run ``model(x)`` once (no grad) and count the depthwise convolution calls by configuration."""
    calls: Counter = Counter()

    def hook(m, inputs):
        calls[DWConv(m.in_channels, m.kernel_size[0], m.dilation[0], m.padding[0], m.stride[0],
                     m.bias is not None, tuple(inputs[0].shape))] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if _is_depthwise(m)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def wall_timer(repeats: int = 5) -> Callable[[Callable[[], object]], float]:
    """Median wall-clock ms of ``fn()`` (CPU; on CUDA use :func:`device_timer`)."""
    def timer(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    return timer


def device_timer(device: torch.device, rep_ms: int = 100) -> Callable[[Callable[[], object]], float]:
    """Median ms: ``triton.testing.do_bench`` on CUDA (L2 flushed between runs), wall clock elsewhere."""
    if device.type == 'cuda':
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode='median')
    return wall_timer()


def time_depthwise_convs(
        calls: Counter, device: torch.device, dtype: torch.dtype, backward: bool,
        timer: Callable[[Callable[[], object]], float],
) -> List[Dict[str, object]]:
    """Time each distinct call alone (forward, or forward + backward for input and weight) in contiguous
    (``nchw_ms``) and channels_last (``nhwc_ms``) layout. ``gbs``: the faster layout's bandwidth, counting
    input + output + weight once for a forward and three times for forward + backward (an estimate)."""
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
                    y = conv(xi)
                    torch.autograd.grad(y, (xi, conv.weight), grad)
            else:
                def fn(conv=conv, xi=xi):
                    with torch.no_grad():
                        conv(xi)
            row[f'{fmt_name}_ms'] = timer(fn)
        moved = (x.numel() + out.numel() + conv.weight.numel()) * x.element_size() * (3 if backward else 1)
        best = min(row['nchw_ms'], row['nhwc_ms'])
        row['gbs'] = moved / (best * 1e-3) / 1e9
        rows.append(row)
    return rows


def profile_table(step: Callable[[], object], device: torch.device, steps: int = 3, row_limit: int = 20) -> str:
    """torch.profiler's table of ``steps`` calls of ``step``, by self device time (self CPU time on the CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    sort_by = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'  # kernels / ops
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
