"""The one timer of the measurement code: CUDA events on CUDA, the wall clock elsewhere.

Every number this package prints goes through :func:`time_ms`: it warms the function up, then takes
``repeat`` samples and reports the best and the median milliseconds per call. On a CUDA device a sample
is bracketed by CUDA events (device time, no host overhead between launches counted twice); on the CPU by
``time.perf_counter``. A sample runs the function several times when one call is shorter than
``min_time`` seconds, so that small CPU ops are not lost in the clock's resolution.
"""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

__all__ = ['Timing', 'time_ms', 'synchronize']


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: ``best`` and ``median`` of the samples."""
    best: float
    median: float
    samples: List[float]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class _L2Flush:
    """Overwrites a buffer twice the size of the GPU's L2 cache, so a timed call finds no input in it."""

    def __init__(self, device: torch.device):
        size = 2 * torch.cuda.get_device_properties(device).L2_cache_size
        self.buffer = torch.empty(max(size, 1 << 20) // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def time_ms(
        fn: Callable[[], object],
        device: Optional[torch.device] = None,
        warmup: int = 3,
        repeat: int = 10,
        min_time: float = 0.0,
        flush_l2: bool = False,
) -> Timing:
    """Time ``fn()``; returns milliseconds per call.

    Args:
        fn: the work, with its inputs bound.
        device: where ``fn`` runs (CUDA: events; otherwise the wall clock). Default: the CPU.
        warmup: untimed calls first (compilation, caches, allocator).
        repeat: timed samples.
        min_time: seconds one sample should last at least; a sample then runs ``fn`` as many times as that
            takes and reports the time per call (0: one call per sample).
        flush_l2: CUDA only: clear the L2 cache before every timed call (one call per sample then).
    """
    device = torch.device('cpu') if device is None else torch.device(device)
    cuda = device.type == 'cuda'
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls = 1
    flush = _L2Flush(device) if (cuda and flush_l2) else None
    if min_time > 0 and flush is None:
        start = time.perf_counter()
        fn()
        synchronize(device)
        once = max(time.perf_counter() - start, 1e-7)
        calls = max(1, int(min_time / once))
    samples = []
    for _ in range(max(1, repeat)):
        if flush is not None:
            flush()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / calls)
        else:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) * 1e3 / calls)
    return Timing(best=min(samples), median=statistics.median(samples), samples=samples)
