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

__all__ = ['DEPLOY_COLUMNS', 'MAC_COLUMNS', 'available_runtimes', 'bench_deploy', 'profile_top', 'mac_rows',
           'openvino_profile']

DEPLOY_COLUMNS = ['model', 'runtime', 'batch', 'images_per_s', 'vs_reference', 'vs_release_gather',
                  'vs_release_op', 'prepare_s', 'first_call_s']
MAC_COLUMNS = ['model', 'pointwise_gmacs', 'dense_conv_gmacs', 'depthwise_gmacs', 'conv_linear_gmacs']
# the release's model code, timed with each stand-in for natten's na2d_av (utils.measure.original): a
# gather-einsum (divisor of vs_release_gather) and our op (vs_release_op: the model code alone)
_RELEASE = {'gather': 'release code, gather-einsum', 'op': 'release code, our op'}


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
        original: a checkout of the original release: its model code is timed too (eager, deploy form), with
            natten's ``na2d_av`` as a gather-einsum (``<name> (release code, gather-einsum)``, the divisor of
            ``vs_release_gather``) and as our op (``<name> (release code, our op)``, of ``vs_release_op``).
        model_kwargs: constructor overrides for the OverLoCK models (e.g. a tiny one for a quick check).
    Returns one row per model, runtime and batch (see :data:`DEPLOY_COLUMNS`); ``first_call_s`` is the first
    call's time, which holds ``torch.compile``'s compilation.
    """
    from utils.runtime import prepare
    from .original import load_original

    threads = threads or torch.get_num_threads()
    pairs: List[_Pair] = []
    for name in names:
        overlock = name.startswith('overlock')
        model = _create(name, model_kwargs)
        for runtime in runtimes:
            module, seconds = prepare(model, runtime, (3, img_size, img_size), threads=threads)
            pairs.append(_Pair(name, runtime, module, seconds, {}, {}))
        for na2d, label in (_RELEASE.items() if original and overlock else ()):
            start = time.perf_counter()
            variant = name.split('.')[0][len('overlock_'):].replace('_reparam', '')  # overlock_t.in1k -> t
            module = load_original(original, variant, na2d=na2d)
            pairs.append(_Pair(f'{name} ({label})', 'eager', module, time.perf_counter() - start, {}, {}))
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
            gather, op = (speed.get((f'{p.model} ({_RELEASE[na2d]})', 'eager', batch)) for na2d in ('gather', 'op'))
            rows.append({
                'model': p.model, 'runtime': p.runtime, 'batch': batch, 'images_per_s': round(ips, 2),
                'vs_reference': f'{ips / ref:.2f}x' if ref and p.model != reference else '',
                'vs_release_gather': f'{ips / gather:.2f}x' if gather else '',
                'vs_release_op': f'{ips / op:.2f}x' if op else '',
                'prepare_s': round(p.prepare_s, 1), 'first_call_s': round(p.first_call_s[batch], 1),
            })
    return rows


def _create(name: str, model_kwargs: Optional[Dict[str, object]]) -> nn.Module:
    import timm

    import models  # noqa: F401
    return timm.create_model(name, **((model_kwargs or {}) if name.startswith('overlock') else {})).eval()


def profile_top(name: str, batch: int = 8, img_size: int = 224, row_limit: int = 12,
                model_kwargs: Optional[Dict[str, object]] = None) -> str:
    """torch.profiler's top entries (self CPU time) of the eager inference form of ``name``."""
    from utils.runtime import inference_form
    from .model import profile_table
    module = inference_form(_create(name, model_kwargs))
    x = torch.randn(batch, 3, img_size, img_size)
    return profile_table(_call(module, x), torch.device('cpu'), steps=1, row_limit=row_limit)


def mac_rows(names: Sequence[str], img_size: int = 224, model_kwargs: Optional[Dict[str, object]] = None
             ) -> List[Dict[str, object]]:
    """GMACs per image of each model's (deploy form's) layers by kind (:func:`~utils.measure.macs.macs_by_kind`),
    one row per model (see :data:`MAC_COLUMNS`)."""
    from utils.export import deploy_copy
    from .macs import macs_by_kind

    rows = []
    for name in names:
        macs = macs_by_kind(deploy_copy(_create(name, model_kwargs)), (1, 3, img_size, img_size))
        rows.append({'model': name, **{f'{k}_gmacs': round(v / 1e9, 3) for k, v in macs.items()},
                     'conv_linear_gmacs': round(sum(macs.values()) / 1e9, 3)})
    return rows


def openvino_profile(name: str, batch: int = 8, img_size: int = 224, threads: int = 0, row_limit: int = 12,
                     model_kwargs: Optional[Dict[str, object]] = None, calls: int = 5) -> str:
    """OpenVINO's per-layer counters (``PERF_COUNT``) of ``name`` as the openvino runtime runs it, summed per
    layer type and kernel: a markdown table, largest first, with the total; of the fastest of ``calls`` calls
    (OpenVINO keeps the last call's counters), so that a busy moment does not inflate single layers."""
    import collections
    import os
    import tempfile

    from utils.evaluate import markdown_table
    from utils.export import OpenVinoModel, export_onnx
    from utils.runtime import inference_form

    form = inference_form(_create(name, model_kwargs), 'openvino')
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'model.onnx')
        export_onnx(form, path, input_size=(3, img_size, img_size))
        compiled = OpenVinoModel(path, threads=threads, config={'PERF_COUNT': 'YES'}).compiled
    request = compiled.create_infer_request()
    x = torch.randn(batch, 3, img_size, img_size).numpy()
    request.infer({0: x})  # warm-up
    best = None
    for _ in range(calls):
        request.infer({0: x})
        ms, layers = collections.Counter(), collections.Counter()
        for info in request.profiling_info:
            key = (info.node_type, info.exec_type)
            ms[key] += info.real_time.total_seconds() * 1e3
            layers[key] += 1
        if best is None or sum(ms.values()) < sum(best[0].values()):
            best = ms, layers
    ms, layers = best
    total = sum(ms.values())
    rows = [{'layer type': t, 'kernel': k, 'layers': layers[(t, k)], 'ms': f'{v:.1f}',
             'share': f'{100 * v / total:.1f} %'} for (t, k), v in ms.most_common(row_limit)]
    return (f'total {total:.1f} ms (fastest of {calls} calls)\n\n'
            + markdown_table(rows, ['layer type', 'kernel', 'layers', 'ms', 'share']))
