#!/usr/bin/env python3
"""Issue 5's GPU measurements in one call: tables, a summary against the targets, one markdown file.

  1. na2d_av / fused kernels: correctness at OverLoCK-T's shapes in fp32/fp16/bf16 and op timing with
     achieved bandwidth vs the copy roofline (scripts/check_na2d_gpu.py);
  2. inference (deploy form, channels_last, batch 256) and training (AMP, batch 128) images/s and peak
     memory of OverLoCK-XT/T beside ConvNeXt-T (scripts/benchmark.py);
  3. the depthwise convolutions of OverLoCK-T (K = 17/15/13 and the small ones) timed alone in both layouts,
     summed per step and set against the step time: are they the bottleneck?
  4. torch.profiler's top kernels of one OverLoCK-T training step.

    python scripts/gpu_report.py --out docs/gpu_report.md     # CUDA
    python scripts/gpu_report.py --smoke                        # CPU: tiny models, Triton interpreter
"""
import os
import sys

# The Triton interpreter must be on before triton defines the kernels (at import).
if '--smoke' in sys.argv[1:]:
    os.environ['TRITON_INTERPRET'] = '1'

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'scripts')]

import benchmark  # noqa: E402
import check_na2d_gpu  # noqa: E402
from utils.evaluate import markdown_table  # noqa: E402
from utils.profiling import depthwise_convs, device_timer, profile_table, time_depthwise_convs  # noqa: E402

TARGETS = {'op_fwd_roofline': 0.5, 'infer': 0.7, 'train': 0.5}
SMOKE_KWARGS = ['depth=[1,1,1,1]', 'sub_depth=[1,1]', 'embed_dim=[16,24,32,48]', 'sub_num_heads=[2,2]',
                'projection=64']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=None, help='write every table and the summary to this markdown file')
    p.add_argument('--models', nargs='+', default=['overlock_xt', 'overlock_t', 'convnext_tiny'])
    p.add_argument('--target', default='overlock_t', help='the model held to the targets (default overlock_t)')
    p.add_argument('--reference', default='convnext_tiny', help='the model the targets are relative to')
    p.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'])
    p.add_argument('--infer-batch', type=int, default=256)
    p.add_argument('--train-batch', type=int, default=128)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--skip', nargs='*', default=[], choices=['op', 'model', 'dwconv', 'profile'],
                   help='parts to leave out')
    p.add_argument('--smoke', action='store_true',
                   help='CPU smoke run: tiny models at 32 px, Triton interpreter; numbers are meaningless')
    return p.parse_args(argv)


def bench_args(args, mode, models):
    argv = ['--mode', mode, '--models', *models, '--dtype', args.dtype, '--channels-last',
            '-b', str(args.infer_batch if mode == 'infer' else args.train_batch),
            '--warmup', str(args.warmup), '--iters', str(args.iters), '--no-flops']
    if mode == 'infer':
        argv.append('--reparam')
    if args.smoke:
        argv += ['--device', 'cpu', '--img-size', '32', '--model-kwargs', *SMOKE_KWARGS]
    return benchmark.parse_args(argv)


def result(ok):
    return 'PASS' if ok else 'MISS'


def op_part(args, sections, summary):
    res = check_na2d_gpu.run(check_na2d_gpu.parse_args(['--interpret'] if args.smoke else []))
    sections.append('## ContMix aggregation op\n\n' + '\n\n'.join(res['sections']))
    if res['check_rows']:
        worst = max(r['rel_err'] / r['bound'] for r in res['check_rows'])
        summary.append(['op correctness (all shapes, dtypes, gradients)', f'worst error / bound {worst:.2f}',
                        '<= 1', result(worst <= 1)])
    first_dtype = res['bench_rows'][0]['dtype'] if res['bench_rows'] else None
    for r in res['bench_rows']:
        if r['dtype'] == first_dtype:
            frac = r['fwd_bytes'] / (r['triton_fwd_ms'] * 1e-3) / 1e9 / res['copy_gbs']
            summary.append([f'{r["op"]} forward {r["shape"]} {r["dtype"]}, share of copy bandwidth',
                            f'{100 * frac:.0f}%', f'>= {100 * TARGETS["op_fwd_roofline"]:.0f}%',
                            result(frac >= TARGETS['op_fwd_roofline'])])


def model_part(args, sections, summary, device):
    step_ms = {}
    for mode in ('infer', 'train'):
        bargs = bench_args(args, mode, args.models)
        header, rows, cols = benchmark.run(bargs)
        table = markdown_table(rows, cols)
        print(f'\n{header}\n{table}')
        sections.append(f'## Model {mode}\n\n_{header}_\n\n{table}')
        ips = {r['model']: r['images_per_s'] for r in rows}
        step_ms[mode] = {name: 1e3 * bargs.batch_size / v for name, v in ips.items()}
        if args.target in ips and args.reference in ips:
            ratio = ips[args.target] / ips[args.reference]
            summary.append([f'{args.target} / {args.reference} {mode} images/s (batch {bargs.batch_size})',
                            f'{ratio:.2f}x', f'>= {TARGETS[mode]}x', result(ratio >= TARGETS[mode])])
    return step_ms


def dwconv_part(args, sections, summary, device, step_ms):
    timer = device_timer(device)
    for mode in ('infer', 'train'):
        bargs = bench_args(args, mode, [args.target])
        dtype = benchmark.DTYPES[bargs.dtype]
        model = benchmark.create(args.target, bargs).to(device=device, memory_format=torch.channels_last)
        model.train(mode == 'train')
        x = torch.randn(bargs.batch_size, 3, bargs.img_size, bargs.img_size, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            calls = depthwise_convs(model, x.contiguous(memory_format=torch.channels_last))
        del model
        rows = time_depthwise_convs(calls, device, dtype, backward=mode == 'train', timer=timer)
        large = [r for r in rows if r['kernel'] >= 7]
        total = {fmt: sum(r['calls'] * r[f'{fmt}_ms'] for r in rows) for fmt in ('nchw', 'nhwc')}
        total_large = sum(r['calls'] * r['nhwc_ms'] for r in large)
        table = markdown_table(
            [dict(conv=r['conv'], calls=r['calls'], nchw_ms=f'{r["nchw_ms"]:.3f}', nhwc_ms=f'{r["nhwc_ms"]:.3f}',
                  gbs=f'{r["gbs"]:.0f}') for r in rows], ['conv', 'calls', 'nchw_ms', 'nhwc_ms', 'gbs'])
        step = step_ms.get(mode, {}).get(args.target)
        share = f'{100 * total["nhwc"] / step:.0f}% of the {step:.1f} ms step' if step else 'step time not measured'
        text = (f'{args.target} {mode} ({"forward + backward" if mode == "train" else "forward"}, '
                f'batch {bargs.batch_size}, {bargs.dtype}): all depthwise convolutions {total["nhwc"]:.1f} ms '
                f'channels_last / {total["nchw"]:.1f} ms contiguous per step, K >= 7 {total_large:.1f} ms; {share}')
        print(f'\n{text}\n{table}')
        sections.append(f'## Depthwise convolutions, {mode}\n\n{text}\n\n{table}')
        if step:
            summary.append([f'{args.target} {mode}: depthwise convs (channels_last) share of step',
                            f'{100 * total["nhwc"] / step:.0f}% (K >= 7: {100 * total_large / step:.0f}%)',
                            'report', '-'])


def profile_part(args, sections, device):
    bargs = bench_args(args, 'train', [args.target])
    bargs.batch_size = min(bargs.batch_size, 64)  # the profiler's trace, not the throughput, is wanted here
    step = benchmark.make_step(benchmark.create(args.target, bargs), bargs, device)
    table = profile_table(step, device, steps=2, row_limit=25)
    print(f'\n{table}')
    sections.append(f'## Profiler: {args.target} training step (batch {bargs.batch_size}, {bargs.dtype})\n\n'
                    f'```\n{table}\n```')


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.models = ['overlock_xt', 'convnext_tiny']
        args.target, args.reference, args.dtype = 'overlock_xt', 'convnext_tiny', 'fp32'
        args.infer_batch = args.train_batch = 2
        args.warmup, args.iters = 0, 1
    elif not torch.cuda.is_available():
        sys.exit('gpu_report.py: no CUDA device; use --smoke for a CPU run of the script itself')
    device = torch.device('cpu' if args.smoke else 'cuda')
    env = check_na2d_gpu.environment(device, interpret=args.smoke)
    print(env)
    sections, summary = [], []
    step_ms = {}
    if 'op' not in args.skip:
        op_part(args, sections, summary)
    if 'model' not in args.skip:
        step_ms = model_part(args, sections, summary, device)
    if 'dwconv' not in args.skip:
        dwconv_part(args, sections, summary, device, step_ms)
    if 'profile' not in args.skip:
        profile_part(args, sections, device)
    table = markdown_table([dict(zip(('what', 'measured', 'target', 'result'), row)) for row in summary],
                           ['what', 'measured', 'target', 'result'])
    print(f'\nSummary\n{table}')
    if args.out is not None:
        text = f'# GPU report\n\n_{env}_\n\n## Summary\n\n' + table + '\n\n' + '\n\n'.join(sections) + '\n'
        tmp = args.out.with_name(args.out.name + '.tmp')
        tmp.write_text(text)
        os.replace(tmp, args.out)
        print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
