"""CPU deploy speed: models side by side on every inference runtime (``utils.runtime``), in one process.

Every (model, runtime) pair is prepared first (fused, exported, compiled), then timed in interleaved rounds:
per batch size, each round calls every pair ``iters`` times and keeps its fastest call, and the best round
counts. A busy machine slows all pairs of a round alike, so the ratios hold where the absolute numbers drift.
"""
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .timing import time_ms

__all__ = ['DEPLOY_COLUMNS', 'available_runtimes', 'bench_deploy', 'profile_top']

DEPLOY_COLUMNS = ['model', 'runtime', 'batch', 'images_per_s', 'vs_reference', 'vs_original', 'prepare_s',
                  'first_call_s']


def available_runtimes() -> List[str]:
    """The runtimes whose packages import here (eager and compile always)."""
    import importlib.util

    from utils.runtime import RUNTIMES
    optional = {'onnxruntime': ('onnx', 'onnxruntime', 'onnxscript'), 'openvino': ('onnx', 'openvino', 'onnxscript')}
    return [r for r in RUNTIMES if all(importlib.util.find_spec(p) for p in optional.get(r, ()))]


@dataclass
class _Pair:
    model: str
    runtime: str
    module: nn.Module
    prepare_s: float
    first_call_s: Dict[int, float]
    best_s: Dict[int, float]


def _call(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            module(x)
    return run


def bench_deploy(names: Sequence[str], runtimes: Sequence[str], batch_sizes: Sequence[int] = (1, 8),
                 img_size: int = 224, threads: int = 0, rounds: int = 3, iters: int = 3,
                 reference: Optional[str] = None, original: Optional[str] = None,
                 model_kwargs: Optional[Dict[str, object]] = None) -> List[Dict[str, object]]:
    """Images/s of each model on each runtime at each batch size (float32, CPU; OverLoCK in its fused form).

    Args:
        reference: a model among ``names`` whose images/s on the same runtime and batch each row is divided by
            (``vs_reference``).
        original: a checkout of the original release: its model code is timed too (eager, deploy form, as
            ``<name> (release code)``) and each OverLoCK row divided by it (``vs_original``).
        model_kwargs: constructor overrides for the OverLoCK models (e.g. a tiny one for a quick check).
    Returns one row per model, runtime and batch (see :data:`DEPLOY_COLUMNS`); ``first_call_s`` is the first
    call's time, which holds ``torch.compile``'s compilation.
    """
    import timm

    import models  # noqa: F401  (registers the overlock models)
    from utils.runtime import prepare
    from .original import load_original

    threads = threads or torch.get_num_threads()
    pairs: List[_Pair] = []
    for name in names:
        overlock = name.startswith('overlock')
        model = timm.create_model(name, **((model_kwargs or {}) if overlock else {})).eval()
        for runtime in runtimes:
            module, seconds = prepare(model, runtime, (3, img_size, img_size), threads=threads)
            pairs.append(_Pair(name, runtime, module, seconds, {}, {}))
        if original and overlock:
            start = time.perf_counter()
            variant = name.split('.')[0][len('overlock_'):].replace('_reparam', '')  # overlock_t.in1k -> t
            module = load_original(original, variant)
            pairs.append(_Pair(f'{name} (release code)', 'eager', module, time.perf_counter() - start, {}, {}))
    gen = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        x = torch.randn(batch, 3, img_size, img_size, generator=gen)
        for p in pairs:
            start = time.perf_counter()
            _call(p.module, x)()
            p.first_call_s[batch] = time.perf_counter() - start
        for _ in range(rounds):
            for p in pairs:
                best = time_ms(_call(p.module, x), warmup=0, repeat=iters).best * 1e-3
                p.best_s[batch] = min(p.best_s.get(batch, float('inf')), best)
    speed = {(p.model, p.runtime, b): b / s for p in pairs for b, s in p.best_s.items()}
    rows = []
    for batch in batch_sizes:
        for p in pairs:
            ips = speed[(p.model, p.runtime, batch)]
            ref = speed.get((reference, p.runtime, batch)) if reference else None
            orig = speed.get((f'{p.model} (release code)', 'eager', batch))
            rows.append({
                'model': p.model, 'runtime': p.runtime, 'batch': batch, 'images_per_s': round(ips, 2),
                'vs_reference': f'{ips / ref:.2f}x' if ref and p.model != reference else '',
                'vs_original': f'{ips / orig:.2f}x' if orig else '',
                'prepare_s': round(p.prepare_s, 1), 'first_call_s': round(p.first_call_s[batch], 1),
            })
    return rows


def profile_top(name: str, batch: int = 8, img_size: int = 224, row_limit: int = 12,
                model_kwargs: Optional[Dict[str, object]] = None) -> str:
    """torch.profiler's top entries (self CPU time) of the eager inference form of ``name``."""
    import timm

    import models  # noqa: F401
    from utils.runtime import inference_form
    from .model import profile_table
    module = inference_form(timm.create_model(name, **((model_kwargs or {}) if name.startswith('overlock') else {})))
    x = torch.randn(batch, 3, img_size, img_size)
    return profile_table(_call(module, x), torch.device('cpu'), steps=1, row_limit=row_limit)
