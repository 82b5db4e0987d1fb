"""Whole-model measurements: parameters, MACs, images/s and peak CUDA memory of one inference or training
step, and torch.profiler's table of a step.

Inference times eval-mode forward passes (the deploy form of OverLoCK with ``reparam``); training times a
whole step (forward, loss main + 0.4 x aux, backward, AdamW step; bf16/fp16 via autocast, fp16 with a
GradScaler).
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .dtypes import dtype_name, parse_dtype
from .timing import synchronize, time_ms

__all__ = ['ModelBench', 'PAPER_GFLOPS', 'COLUMNS', 'create', 'make_step', 'bench_model', 'profile_table',
           'peak_memory_mb', 'bench_models']

# The paper's GFLOPs (multiply-accumulates at 224 px) per variant, printed beside our count.
PAPER_GFLOPS = {'overlock_xt': 2.6, 'overlock_t': 5.5, 'overlock_s': 9.7, 'overlock_b': 16.7}
COLUMNS = ['model', 'params_train_m', 'params_deploy_m', 'params_deploy_no_aux_m', 'gmacs', 'paper_gflops',
           'images_per_s', 'peak_mem_mb']


@dataclass
class ModelBench:
    """What to time. ``dtype``: weights and inputs for inference, the autocast dtype for training.
    ``model_kwargs`` apply to the OverLoCK models only (the others are references at their defaults)."""
    mode: str = 'infer'
    batch_size: int = 8
    img_size: int = 224
    dtype: str = 'float32'
    channels_last: bool = False
    reparam: bool = False
    compile: bool = False
    warmup: int = 2
    iters: int = 5
    flops: bool = True
    model_kwargs: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ('infer', 'train'):
            raise ValueError(f"mode must be 'infer' or 'train', got {self.mode!r}")
        self.dtype = dtype_name(self.dtype)

    def kwargs_for(self, name: str) -> Dict[str, object]:
        # OverLoCK with its auxiliary head: the release's training step (main + 0.4 x aux) and parameter count
        return {'use_ds': True, **self.model_kwargs} if name.startswith('overlock') else {}


def _params(model: nn.Module):
    total = sum(p.numel() for p in model.parameters())
    no_aux = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('aux_head.'))
    return total, no_aux


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """CUDA: max allocated since the last reset (:func:`make_step` resets it per model); None elsewhere, where
    no per-model peak exists (a process's peak resident set only grows from one model to the next)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return None


def create(name: str, bench: ModelBench) -> nn.Module:
    """The model as it is timed: the deploy form for inference with ``reparam``."""
    import timm

    import models  # noqa: F401  (registers the overlock models)
    model = timm.create_model(name, **bench.kwargs_for(name))
    if bench.mode == 'infer' and bench.reparam and hasattr(model, 'reparameterize'):
        model.reparameterize()
    return model


def make_step(model: nn.Module, bench: ModelBench, device: torch.device) -> Callable[[], None]:
    """Move ``model`` to the device / dtype / layout of ``bench``; return a function running one step."""
    dtype = parse_dtype(bench.dtype)
    memory_format = torch.channels_last if bench.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    x = torch.randn(bench.batch_size, 3, bench.img_size, bench.img_size, device=device).contiguous(
        memory_format=memory_format)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    if bench.mode == 'infer':
        model.eval()
        if dtype != torch.float32:
            model.to(dtype)
            x = x.to(dtype)
        fn = torch.compile(model) if bench.compile else model

        def step():
            with torch.inference_mode():
                fn(x)
        return step

    model.train()
    fn = torch.compile(model) if bench.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    target = torch.randint(0, model.num_classes, (bench.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    crit = nn.CrossEntropyLoss()

    def step():
        with autocast:
            out = fn(x)
            loss = (crit(out['main'], target) + 0.4 * crit(out['aux'], target) if isinstance(out, dict)
                    else crit(out, target))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def bench_model(name: str, bench: ModelBench, device: torch.device) -> Dict[str, object]:
    """One table row (see :data:`COLUMNS`): params of the training form, the deploy form and the deploy form
    without the auxiliary head, GMACs at batch 1, the paper's GFLOPs (for a variant as published, at 224²:
    no ``model_kwargs``), images/s (median step) and peak memory (CUDA only, else empty)."""
    import timm

    from .macs import count_macs
    kwargs = bench.kwargs_for(name)
    row: Dict[str, object] = {'model': name}
    with torch.device('meta'):  # parameter counts only: no memory, no initialisation
        row['params_train_m'] = round(_params(timm.create_model(name, **kwargs))[0] / 1e6, 2)
        if name.startswith('overlock'):
            deploy_name = name if name.endswith('_reparam') else name + '_reparam'
            d_total, d_no_aux = _params(timm.create_model(deploy_name, **kwargs))
            row.update(params_deploy_m=round(d_total / 1e6, 2), params_deploy_no_aux_m=round(d_no_aux / 1e6, 2))
        else:
            row.update(params_deploy_m='', params_deploy_no_aux_m='')
    model = create(name, bench)
    if bench.flops:
        row['gmacs'] = round(count_macs(model, (1, 3, bench.img_size, bench.img_size)) / 1e9, 3)
        as_published = not bench.model_kwargs and bench.img_size == 224  # the paper counts at 224²
        row['paper_gflops'] = PAPER_GFLOPS.get(name.replace('_reparam', ''), '') if as_published else ''
    step = make_step(model, bench, device)
    timing = time_ms(step, device, warmup=bench.warmup, repeat=bench.iters)
    synchronize(device)
    peak = peak_memory_mb(device)
    row.update(images_per_s=round(bench.batch_size / (timing.median * 1e-3), 2),
               peak_mem_mb='' if peak is None else round(peak, 1))
    return row


def bench_models(names: Sequence[str], bench: ModelBench, device: torch.device) -> List[Dict[str, object]]:
    return [bench_model(name, bench, device) for name in names]


def profile_table(step: Callable[[], object], device: torch.device, steps: int = 3, row_limit: int = 20) -> str:
    """torch.profiler's table of ``steps`` calls of ``step``, by self device time (self CPU time on the CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort_by = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)



