#!/usr/bin/env python3
"""Correctness and op-level timing of the Triton ``na2d_av`` kernels against the torch backend (issue 5).

On a CUDA device (the default):
  1. correctness at OverLoCK-T's real ContMix shapes (stage 3: 8 groups, 14 x 14, head dim 16, K = 13 and
     s = 5; stage 4: 16 groups, 7 x 7, K = 7 and s = 5) for the unfused and the fused op, in float32,
     float16 and bfloat16, forward and backward, against a float64 torch-backend reference; bounds: relative
     error (Frobenius) <= 1e-5 for float32 and <= 1e-2 for the half types;
  2. timing of forward and backward (``triton.testing.do_bench`` median, rotating input sets so no run
     finds its inputs in L2) for triton and the torch backend, with the achieved bandwidth against the
     bytes that must move (every input read once, every output written once) and its share of a measured
     device-to-device copy bandwidth (``dst.copy_(src)``: 2 bytes moved per byte copied).

With ``--interpret`` the same code runs on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``)
on tiny shapes: correctness, and one smoke timing with a wall-clock timer (numbers are meaningless; it
keeps the table code alive). Exit status 1 when a check fails.

    python scripts/check_na2d_gpu.py                       # CUDA: checks + timing table
    python scripts/check_na2d_gpu.py --out docs/na2d.md    # also write the tables as markdown
    python scripts/check_na2d_gpu.py --interpret           # CPU smoke run
"""
import os
import sys

# The interpreter must be switched on before triton defines the kernels (at import): look before importing.
if '--interpret' in sys.argv[1:]:
    os.environ['TRITON_INTERPRET'] = '1'

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # scripts run from anywhere; the one allowed sys.path edit

from utils.profiling import wall_timer  # noqa: E402  (median wall-clock ms: interpreter smoke runs)

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
BOUNDS = {'fp32': 1e-5, 'fp16': 1e-2, 'bf16': 1e-2}


@dataclass(frozen=True)
class Shape:
    """One na2d call of a ContMix block: value [B, G, H, W, C], window K."""
    name: str
    groups: int
    height: int
    width: int
    channels: int
    kernel_size: int


# OverLoCK-T at 224 px: stage 3 (C=256, 4 heads -> 8 groups, 16 channels each, K=13 / s=5 windows on 14x14),
# stage 4 (C=512, 8 heads -> 16 groups, 16 channels, K=7 / s=5 on 7x7).
OVERLOCK_T_SHAPES = (
    Shape('T stage3 K13', 8, 14, 14, 16, 13),
    Shape('T stage3 s5', 8, 14, 14, 16, 5),
    Shape('T stage4 K7', 16, 7, 7, 16, 7),
    Shape('T stage4 s5', 16, 7, 7, 16, 5),
)
TINY_SHAPES = (
    Shape('tiny K7', 1, 7, 8, 3, 7),
    Shape('tiny s5', 2, 5, 6, 2, 5),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--interpret', action='store_true',
                        help='run on the CPU under the Triton interpreter (tiny shapes, smoke timing)')
    parser.add_argument('--check-batch', type=int, nargs='+', default=None,
                        help='batch sizes of the correctness checks (default: 128 256 on CUDA, 1 interpreted); '
                             'backward is checked at the first one')
    parser.add_argument('--bench-batch', type=int, default=None,
                        help='batch size of the timing (default: 128 on CUDA, 1 interpreted)')
    parser.add_argument('--bench-dtypes', nargs='+', default=None, choices=list(DTYPES),
                        help='dtypes to time (default: bf16 fp32 on CUDA, fp32 interpreted)')
    parser.add_argument('--check-dtypes', nargs='+', default=list(DTYPES), choices=list(DTYPES),
                        help='dtypes to check (default: all)')
    parser.add_argument('--no-check', action='store_true', help='skip the correctness checks')
    parser.add_argument('--no-bench', action='store_true', help='skip the timing')
    parser.add_argument('--rep', type=int, default=200, help='do_bench repetition time in ms (default 200)')
    parser.add_argument('--out', type=Path, default=None, help='also write the tables to this markdown file')
    args = parser.parse_args(argv)
    if args.check_batch is not None and min(args.check_batch) < 1:
        parser.error('--check-batch must be positive')
    if args.bench_batch is not None and args.bench_batch < 1:
        parser.error('--bench-batch must be positive')
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f'--out {args.out}: directory {args.out.parent} does not exist')
    return args


# ---------------------------------------------------------------------------------------------------------
# Inputs, ops and bytes.


def make_inputs(shape: Shape, batch: int, dtype: torch.dtype, device: torch.device, fused: bool,
                seed: int = 0) -> List[torch.Tensor]:
    """Inputs laid out as ContMix passes them: logits a slice of the [.., s^2 + K^2] projection (fused) or
    softmaxed weights (unfused); value a channel-first view of a [B, 2*G*C, H, W] feature map."""
    gen = torch.Generator(device='cpu').manual_seed(seed)
    b, g, h, w, c, k = batch, shape.groups, shape.height, shape.width, shape.channels, shape.kernel_size

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    extra = 25 if k != 5 else 49  # the other window's logits share the last axis in ContMix
    logits = randn(b, g, h, w, extra + k * k)[..., extra:]
    value = randn(b, 2 * g * c, h, w).view(b, 2, g, c, h, w).permute(1, 0, 2, 4, 5, 3)[1]
    if not fused:
        return [torch.softmax(logits.float(), -1).to(dtype), value]
    rpb = randn(g, 2 * k - 1, 2 * k - 1)
    return [logits, rpb, value]


def op_fn(backend: str, fused: bool, kernel_size: int) -> Callable[..., torch.Tensor]:
    from models import ops
    if fused:
        return lambda logits, rpb, value: ops.na2d_softmax_av(logits, rpb, value, kernel_size, backend=backend)
    return lambda attn, value: ops.na2d_av(attn, value, kernel_size, backend=backend)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bytes_to_move(inputs: Sequence[torch.Tensor], out: torch.Tensor, backward: bool) -> int:
    """Minimum traffic: forward reads the inputs and writes out; backward reads grad_out and the inputs and
    writes one gradient per input (the fused kernels' float32 log-sum-exp is not counted)."""
    ins = sum(nbytes(t) for t in inputs)
    if not backward:
        return ins + nbytes(out)
    return nbytes(out) + 2 * ins  # grad_out (same size as out) + inputs read + their gradients written


# ---------------------------------------------------------------------------------------------------------
# Correctness.


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def check(shapes: Sequence[Shape], batches: Sequence[int], dtypes: Sequence[str], device: torch.device,
          ) -> List[Dict[str, object]]:
    rows = []
    for shape in shapes:
        for fused in (False, True):
            names = ('logits', 'rpb', 'value') if fused else ('attn', 'value')
            op = op_fn('triton', fused, shape.kernel_size)
            ref_op = op_fn('torch', fused, shape.kernel_size)
            for bi, batch in enumerate(batches):
                backward = bi == 0
                for dname in dtypes:
                    dtype = DTYPES[dname]
                    inputs = make_inputs(shape, batch, dtype, device, fused)
                    # the reference sees the same (rounded) numbers, in float64
                    ref_inputs = [t.double().requires_grad_(backward) for t in inputs]
                    leaves = [t.detach().requires_grad_(backward) for t in inputs]
                    with torch.set_grad_enabled(backward):
                        out = op(*leaves)
                        ref = ref_op(*ref_inputs)
                    results = [('out', out, ref)]
                    if backward:
                        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
                        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
                        ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
                        results += [(f'grad {n}', gr, r) for n, gr, r in zip(names, grads, ref_grads)]
                    for what, x, r in results:
                        err = rel_err(x, r)
                        ok = math.isfinite(err) and err <= BOUNDS[dname] and x.dtype == dtype
                        rows.append(dict(shape=shape.name, batch=batch, op='fused' if fused else 'na2d_av',
                                         dtype=dname, tensor=what, rel_err=err, bound=BOUNDS[dname], ok=ok))
                    del inputs, ref_inputs, leaves, out, ref, results
    return rows


# ---------------------------------------------------------------------------------------------------------
# Timing.


def cuda_timer(rep_ms: int) -> Callable[[Callable[[], object]], float]:
    import triton.testing
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode='median')


def copy_bandwidth(device: torch.device, timer, size_bytes: int) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write)."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes(src) / (ms * 1e-3) / 1e9


def rotation(set_bytes: int, l2_bytes: int) -> int:
    """Input sets to cycle through so that consecutive runs do not share data in L2 (2 to 4)."""
    return max(2, min(4, math.ceil(2 * l2_bytes / max(1, set_bytes))))


def bench(shapes: Sequence[Shape], batch: int, dtypes: Sequence[str], device: torch.device, timer,
          l2_bytes: int) -> List[Dict[str, object]]:
    rows = []
    for shape in shapes:
        for fused in (False, True):
            for dname in dtypes:
                dtype = DTYPES[dname]
                probe = make_inputs(shape, batch, dtype, device, fused)
                n_sets = rotation(sum(nbytes(t) for t in probe), l2_bytes)
                del probe
                sets = [make_inputs(shape, batch, dtype, device, fused, seed=s) for s in range(n_sets)]
                row = dict(shape=shape.name, batch=batch, op='fused' if fused else 'na2d_av', dtype=dname)
                for backend in ('triton', 'torch'):
                    op = op_fn(backend, fused, shape.kernel_size)
                    counter = iter(range(1 << 62))

                    def forward():
                        with torch.no_grad():
                            return op(*sets[next(counter) % n_sets])

                    out = forward()
                    row['fwd_bytes'] = bytes_to_move(sets[0], out, backward=False)
                    row[f'{backend}_fwd_ms'] = timer(forward)
                    leaves = [[t.detach().requires_grad_() for t in inputs] for inputs in sets]
                    outs = [op(*lv) for lv in leaves]
                    grads_out = [torch.randn_like(o) for o in outs]

                    def backward():
                        i = next(counter) % n_sets
                        return torch.autograd.grad(outs[i], leaves[i], grads_out[i], retain_graph=True)

                    row['bwd_bytes'] = bytes_to_move(sets[0], out, backward=True)
                    row[f'{backend}_bwd_ms'] = timer(backward)
                    del leaves, outs, grads_out, out
                rows.append(row)
                del sets
    return rows


# ---------------------------------------------------------------------------------------------------------
# Tables.


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def check_table(rows: Sequence[Dict[str, object]]) -> str:
    return markdown_table(
        ['shape', 'batch', 'op', 'dtype', 'tensor', 'rel err', 'bound', 'result'],
        [[r['shape'], r['batch'], r['op'], r['dtype'], r['tensor'], f'{r["rel_err"]:.2e}', f'{r["bound"]:.0e}',
          'PASS' if r['ok'] else 'FAIL'] for r in rows])


def bench_table(rows: Sequence[Dict[str, object]], copy_gbs: float) -> str:
    out = []
    for r in rows:
        for direction in ('fwd', 'bwd'):
            moved = r[f'{direction}_bytes']
            tri, ref = r[f'triton_{direction}_ms'], r[f'torch_{direction}_ms']
            gbs = moved / (tri * 1e-3) / 1e9
            out.append([r['shape'], r['batch'], r['op'], r['dtype'], direction, f'{moved / 1e6:.3g}',
                        f'{tri:.3f}', f'{gbs:.0f}', f'{100 * gbs / copy_gbs:.0f}%', f'{ref:.3f}',
                        f'{moved / (ref * 1e-3) / 1e9:.0f}', f'{ref / tri:.2f}x'])
    return markdown_table(
        ['shape', 'batch', 'op', 'dtype', 'dir', 'MB to move', 'triton ms', 'triton GB/s', '% of copy BW',
         'torch ms', 'torch GB/s', 'speedup'], out)


def environment(device: torch.device, interpret: bool) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({platform.processor() or "?"})'
    mode = 'Triton interpreter (TRITON_INTERPRET=1), timings meaningless' if interpret else 'compiled'
    return (f'device: {name}; torch {torch.__version__}; triton {triton.__version__}; CUDA {torch.version.cuda}; '
            f'{mode}; {datetime.datetime.now().astimezone().isoformat(timespec="minutes")}')


class SetupError(Exception):
    """No device / no triton: nothing to check (exit status 2)."""


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Checks and timings; returns the environment line, markdown sections, rows and the copy bandwidth."""
    if args.interpret:
        os.environ['TRITON_INTERPRET'] = '1'  # also when called with argv directly
        device = torch.device('cpu')
        shapes, check_batches, bench_batch = TINY_SHAPES, args.check_batch or [1], args.bench_batch or 1
        bench_dtypes = args.bench_dtypes or ['fp32']
    else:
        if not torch.cuda.is_available():
            raise SetupError('no CUDA device found; run with --interpret for the CPU (interpreter) smoke run')
        device = torch.device('cuda')
        shapes, check_batches, bench_batch = OVERLOCK_T_SHAPES, args.check_batch or [128, 256], args.bench_batch or 128
        bench_dtypes = args.bench_dtypes or ['bf16', 'fp32']
    try:
        from models.ops import triton_backend
    except ImportError as e:
        raise SetupError(f'the triton backend does not import ({e}); install triton') from None
    if args.interpret and not triton_backend.INTERPRET:
        raise SetupError('triton kernels were defined before TRITON_INTERPRET=1 was set; run the script as a '
                         'program')
    torch.backends.cuda.matmul.allow_tf32 = False  # the float64 reference is exact anyway; keep fp32 exact too

    env = environment(device, args.interpret)
    print(env)
    result: Dict[str, object] = dict(env=env, sections=[f'_{env}_'], check_rows=[], bench_rows=[], copy_gbs=None)
    if not args.no_check:
        rows = check(shapes, check_batches, args.check_dtypes, device)
        table = check_table(rows)
        print(f'\nCorrectness (relative error vs float64 torch reference)\n{table}')
        result['sections'].append(f'### Correctness (relative error vs float64 torch reference)\n\n{table}')
        result['check_rows'] = rows
    if not args.no_bench:
        if args.interpret:
            timer, l2, copy_size = wall_timer(repeats=1), 1 << 20, 1 << 22
            shapes = shapes[1:]  # the cheapest one: this only keeps the timing code exercised
        else:
            timer = cuda_timer(args.rep)
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            copy_size = 1 << 30
        copy_gbs = copy_bandwidth(device, timer, copy_size)
        rows = bench(shapes, bench_batch, bench_dtypes, device, timer, l2)
        table = bench_table(rows, copy_gbs)
        title = f'Timing (median; device-to-device copy: {copy_gbs:.0f} GB/s)'
        print(f'\n{title}\n{table}')
        result['sections'].append(f'### {title}\n\n{table}')
        result.update(bench_rows=rows, copy_gbs=copy_gbs)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except SetupError as e:
        print(f'check_na2d_gpu.py: {e}', file=sys.stderr)
        return 2
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + '.tmp')
        tmp.write_text('\n\n'.join(result['sections']) + '\n')
        os.replace(tmp, args.out)
        print(f'\nwrote {args.out}')
    if not all(r['ok'] for r in result['check_rows']):
        print('\nFAILED: some checks exceed their bounds (see the table)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
