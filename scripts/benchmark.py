#!/usr/bin/env python3
"""Params, GFLOPs (MACs, as the paper counts them), images/s and peak memory of any timm models.

    python scripts/benchmark.py --models overlock_xt overlock_t convnext_tiny --reparam          # CPU inference
    python scripts/benchmark.py --mode train --models overlock_t convnext_tiny --device cuda --dtype bfloat16 \
        --channels-last --batch-size 128
    python scripts/benchmark.py --models overlock_t convnext_tiny --device cuda --dtype bfloat16 \
        --channels-last --batch-size 256 --reparam --out docs/bench_infer.md

Inference times eval-mode forward passes (deploy form of OverLoCK with --reparam); training times a whole
step (forward, loss main + 0.4 x aux, backward, AdamW step; bf16/fp16 via autocast, fp16 with a GradScaler).
"""
import argparse
import os
import resource
import sys
import time
from contextlib import nullcontext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # scripts/ may add the repository root (run as `python scripts/benchmark.py`)

import timm  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402  (registers the overlock models)
from utils.cli import parse_kwargs  # noqa: E402
from utils.evaluate import markdown_table  # noqa: E402
from utils.flops import count_macs  # noqa: E402

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
DTYPE_ALIASES = {'fp32': 'float32', 'fp16': 'float16', 'half': 'float16', 'bf16': 'bfloat16'}
PAPER_GFLOPS = {'overlock_xt': 2.6, 'overlock_t': 5.5, 'overlock_s': 9.7, 'overlock_b': 16.7}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=['infer', 'train'], default='infer')
    p.add_argument('--models', nargs='+', default=['overlock_xt'], metavar='NAME')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='constructor overrides applied to the overlock models (e.g. a tiny variant)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=8)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', type=lambda v: DTYPE_ALIASES.get(v, v), choices=list(DTYPES), default='float32',
                   help='inference: weights and inputs in this dtype; training: autocast dtype')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--reparam', action='store_true', help='OverLoCK in deploy form (inference)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--no-flops', action='store_true', help='skip the FLOP count')
    p.add_argument('--out', default='', help='also write the table to this markdown file')
    return p.parse_args(argv)


def _params(model):
    total = sum(p.numel() for p in model.parameters())
    no_aux = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('aux_head.'))
    return total, no_aux


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _peak_mem_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def make_step(model, args, device):
    """Move ``model`` to the device / dtype / layout of ``args``; return a function running one timed step
    (eval forward for --mode infer, forward + loss + backward + AdamW step for --mode train)."""
    dtype = DTYPES[args.dtype]
    model.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(
        memory_format=memory_format)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    if args.mode == 'infer':
        model.eval()
        if dtype != torch.float32:
            model.to(dtype)
            x = x.to(dtype)
        fn = torch.compile(model) if args.compile else model

        def step():
            with torch.inference_mode():
                fn(x)
    else:
        model.train()
        fn = torch.compile(model) if args.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        target = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        crit = torch.nn.CrossEntropyLoss()

        def step():
            with autocast:
                out = fn(x)
                loss = crit(out['main'], target) + 0.4 * crit(out['aux'], target) if isinstance(out, dict) \
                    else crit(out, target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return step


def model_kwargs(name, args):
    """--model-kwargs apply to the OverLoCK models only (the others are references at their defaults)."""
    return parse_kwargs(args.model_kwargs) if name.startswith('overlock') else {}


def create(name, args):
    """The model as it is timed: deploy form for --mode infer --reparam."""
    model = timm.create_model(name, **model_kwargs(name, args))
    if args.mode == 'infer' and args.reparam and hasattr(model, 'reparameterize'):
        model.reparameterize()
    return model


def bench_one(name, args, device):
    kwargs = model_kwargs(name, args)
    model = timm.create_model(name, **kwargs)
    row = {'model': name}
    train_params, _ = _params(model)
    if name.startswith('overlock'):
        deploy = timm.create_model(name + '_reparam' if not name.endswith('_reparam') else name, **kwargs)
        d_total, d_no_aux = _params(deploy)
        row.update(params_train_m=round(train_params / 1e6, 2), params_deploy_m=round(d_total / 1e6, 2),
                   params_deploy_no_aux_m=round(d_no_aux / 1e6, 2))
        del deploy
    else:
        row.update(params_train_m=round(train_params / 1e6, 2), params_deploy_m='', params_deploy_no_aux_m='')
    if args.mode == 'infer' and args.reparam and hasattr(model, 'reparameterize'):
        model.reparameterize()
    if not args.no_flops:
        row['gmacs'] = round(count_macs(model, (1, 3, args.img_size, args.img_size)) / 1e9, 3)
        row['paper_gflops'] = '' if kwargs else PAPER_GFLOPS.get(name.replace('_reparam', ''), '')

    step = make_step(model, args, device)
    for _ in range(args.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    row.update(images_per_s=round(args.batch_size / median, 2), peak_mem_mb=round(_peak_mem_mb(device), 1))
    return row


def run(args):
    """Benchmark ``args.models``; returns (header line, rows, column names)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        sys.exit(f'benchmark.py: unknown model(s) {", ".join(unknown)} for --models; OverLoCK models are: '
                 f'{", ".join(models.list_variants())} (any other timm model name works too)')
    device = torch.device(args.device)
    rows = [bench_one(name, args, device) for name in args.models]
    cols = ['model', 'params_train_m', 'params_deploy_m', 'params_deploy_no_aux_m', 'gmacs', 'paper_gflops',
            'images_per_s', 'peak_mem_mb']
    if args.no_flops:
        cols = [c for c in cols if c not in ('gmacs', 'paper_gflops')]
    header = (f'mode={args.mode} device={device.type} dtype={args.dtype} batch={args.batch_size} '
              f'img={args.img_size} channels_last={args.channels_last} reparam={args.reparam} '
              f'compile={args.compile} threads={torch.get_num_threads()} torch={torch.__version__}')
    return header, rows, cols


def main(argv=None):
    args = parse_args(argv)
    header, rows, cols = run(args)
    table = markdown_table(rows, cols)
    print(header)
    print(table)
    if args.out:
        with open(args.out, 'a') as f:
            f.write(f'\n{header}\n\n{table}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
