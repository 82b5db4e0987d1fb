#!/usr/bin/env python3
"""Benchmark the na2d_av backends on OverLoCK's shapes (or any shape).

Times forward (under inference_mode) and forward + backward of every available backend and prints a table of
milliseconds (best of --repeat samples, median beside it) and GB/s against the bytes an ideal kernel must move
(fwd: attn + value + out; bwd additionally grad_out, attn, value in and grad_attn, grad_value out). For the
model presets it also sums the op time of one network forward (calls per network x time per call).

Examples:
    python scripts/bench_na2d.py                                  # OverLoCK-XT and -T shapes, batch 8, 2 threads
    python scripts/bench_na2d.py --models xt t s b --batch 128 --no-backward
    python scripts/bench_na2d.py --shape 1,8,56,56,32,13 --shape 2,4,30,41,16,7 --baseline
    OVERLOCK_NA2D_BACKEND=torch python scripts/bench_na2d.py --device cuda --dtype bfloat16
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models import ops  # noqa: E402

# Per variant at 224 x 224: ([B-less] value shape (G, H, W, C), kernel size, calls per network forward).
# Each ContMix block calls the op twice: the small 5 x 5 kernel and the large one (13 in stage 3, 7 in stage 4).
MODEL_SHAPES: Dict[str, List[Tuple[Tuple[int, int, int, int], int, int]]] = {
    'xt': [((8, 14, 14, 16), 13, 6), ((8, 14, 14, 16), 5, 6), ((12, 7, 7, 14), 7, 2), ((12, 7, 7, 14), 5, 2)],
    't': [((8, 14, 14, 16), 13, 12), ((8, 14, 14, 16), 5, 12), ((16, 7, 7, 16), 7, 2), ((16, 7, 7, 16), 5, 2)],
    's': [((16, 14, 14, 10), 13, 16), ((16, 14, 14, 10), 5, 16), ((32, 7, 7, 8), 7, 3), ((32, 7, 7, 8), 5, 3)],
    'b': [((12, 14, 14, 16), 13, 20), ((12, 14, 14, 16), 5, 20), ((18, 7, 7, 16), 7, 4), ((18, 7, 7, 16), 5, 4)],
}
DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def loop_baseline(attn: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """The obvious K*K gather-multiply-add loop through autograd (what a naive port does), for comparison."""
    h, w = value.shape[2:4]
    rows = ops.dispatch.torch_backend.window_starts(h, k, value.device)
    cols = ops.dispatch.torch_backend.window_starts(w, k, value.device)
    out = torch.zeros_like(value)
    for ki in range(k):
        slab = value.index_select(2, rows + ki)
        for kj in range(k):
            out = out + attn[..., ki * k + kj, None] * slab.index_select(3, cols + kj)
    return out


def parse_shape(text: str) -> Tuple[Tuple[int, ...], int]:
    try:
        b, g, h, w, c, k = (int(x) for x in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--shape {text!r}: expected B,G,H,W,C,K (six integers)') from None
    if k % 2 == 0 or k < 1 or h < k or w < k or min(b, g, c) < 1:
        raise argparse.ArgumentTypeError(f'--shape {text!r}: need odd K >= 1 with H, W >= K and B, G, C >= 1')
    return (b, g, h, w, c), k


def make_inputs(shape, k, dtype, device, layout, requires_grad):
    b, g, h, w, c = shape
    attn = torch.randn(b, g, h, w, k * k, device=device).softmax(-1).to(dtype)
    if layout == 'model':  # value as the model passes it: a permuted view of [B, G, C, H, W]
        value = torch.randn(b, g, c, h, w, device=device, dtype=dtype).permute(0, 1, 3, 4, 2)
    else:
        value = torch.randn(b, g, h, w, c, device=device, dtype=dtype)
    return attn.requires_grad_(requires_grad), value.requires_grad_(requires_grad)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int, min_time: float):
    """Best and median milliseconds per call; each sample runs enough calls to last ~min_time seconds."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_time / once))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / calls * 1e3)
    return min(samples), statistics.median(samples)


def bench_one(name: str, shape, k: int, args) -> Optional[Dict[str, float]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if name == 'loop':
        fn = loop_baseline
    else:
        def fn(a, v, k_):
            return ops.na2d_av(a, v, k_, backend=name)
    attn, value = make_inputs(shape, k, dtype, device, args.layout, requires_grad=False)
    size = attn.element_size()
    fwd_bytes = (attn.numel() + 2 * value.numel()) * size
    bwd_bytes = (2 * attn.numel() + 3 * value.numel()) * size
    with torch.inference_mode():
        fwd, fwd_med = timeit(lambda: fn(attn, value, k), device, args.warmup, args.repeat, args.min_time)
    res = dict(fwd=fwd, fwd_med=fwd_med, fwd_gbs=fwd_bytes / fwd / 1e6)
    if not args.no_backward:
        attn, value = make_inputs(shape, k, dtype, device, args.layout, requires_grad=True)
        grad = torch.randn(value.shape, device=device, dtype=dtype)

        def step():
            return torch.autograd.grad(fn(attn, value, k), (attn, value), grad)
        fb, fb_med = timeit(step, device, args.warmup, args.repeat, args.min_time)
        res.update(fb=fb, fb_med=fb_med, fb_gbs=(fwd_bytes + bwd_bytes) / fb / 1e6)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='*', default=['xt', 't'], choices=sorted(MODEL_SHAPES),
                        help='OverLoCK variants whose 224 px op shapes to time (default: xt t)')
    parser.add_argument('--shape', type=parse_shape, action='append', default=[],
                        help='extra shape B,G,H,W,C,K (repeatable)')
    parser.add_argument('--batch', type=int, default=8, help='batch size for the model shapes (default 8)')
    parser.add_argument('--backends', nargs='*', default=None,
                        help='backends to time (default: all available)')
    parser.add_argument('--baseline', action='store_true', help='also time the naive K*K loop through autograd')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=sorted(DTYPES))
    parser.add_argument('--layout', default='model', choices=['model', 'contiguous'],
                        help="value layout: 'model' = permuted view of [B,G,C,H,W] as in ContMix (default)")
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2; 0 = leave as is)')
    parser.add_argument('--no-backward', action='store_true', help='time the forward only')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeat', type=int, default=7, help='timed samples; best and median are reported')
    parser.add_argument('--min-time', type=float, default=0.2, help='seconds per timed sample (default 0.2)')
    args = parser.parse_args(argv)

    if args.batch < 1:
        parser.error(f'--batch must be >= 1, got {args.batch}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: CUDA is not available on this machine')
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    backends = args.backends if args.backends is not None else ops.available_backends()
    for name in backends:
        if name not in ops.available_backends():
            parser.error(f'--backends: {name!r} is not available here; available: {ops.available_backends()}')
    if args.baseline:
        backends = list(backends) + ['loop']

    cases = []  # (label, shape, k, calls per network or 0)
    for model in args.models:
        for (g, h, w, c), k, calls in MODEL_SHAPES[model]:
            cases.append((model, (args.batch, g, h, w, c), k, calls))
    cases += [('custom', shape, k, 0) for shape, k in args.shape]
    if not cases:
        parser.error('nothing to time: give --models and/or --shape')

    print(f'na2d_av benchmark: device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} '
          f'layout={args.layout} torch={torch.__version__}; best of {args.repeat} samples (median in brackets; '
          f'the best is the robust number on a shared machine)')
    head = f'{"case":<7} {"shape B,G,H,W,C":<20} {"K":>3} {"backend":<8} {"fwd ms":>16} {"fwd GB/s":>9}'
    if not args.no_backward:
        head += f' {"fwd+bwd ms":>18} {"f+b GB/s":>9}'
    print(head)
    print('-' * len(head))
    totals: Dict[Tuple[str, str], List[float]] = {}
    for label, shape, k, calls in cases:
        for name in backends:
            r = bench_one(name, shape, k, args)
            line = (f'{label:<7} {",".join(map(str, shape)):<20} {k:>3} {name:<8} '
                    f'{r["fwd"]:>8.3f} [{r["fwd_med"]:>6.3f}] {r["fwd_gbs"]:>9.2f}')
            if 'fb' in r:
                line += f' {r["fb"]:>9.3f} [{r["fb_med"]:>7.3f}] {r["fb_gbs"]:>9.2f}'
            print(line, flush=True)
            if calls:
                t = totals.setdefault((label, name), [0., 0.])
                t[0] += calls * r['fwd']
                t[1] += calls * r.get('fb', float('nan'))
    if totals:
        print(f'\nna2d_av time per network forward at 224 px, batch {args.batch} (sum over its calls):')
        for (label, name), (fwd, fb) in totals.items():
            extra = '' if args.no_backward else f', fwd+bwd {fb:.1f} ms'
            print(f'  overlock_{label:<3} {name:<8} fwd {fwd:.1f} ms{extra}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
