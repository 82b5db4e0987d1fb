"""Params, GFLOPs (MACs, as the paper counts them), images/s and peak CUDA memory of any timm models; the ContMix
aggregation op at the models' own shapes; the training input pipeline's images/s per worker.

    python -m scripts.benchmark --models overlock_xt overlock_t convnext_tiny --reparam          # CPU inference
    python -m scripts.benchmark --mode train --models overlock_t convnext_tiny --device cuda --dtype bfloat16 \\
        --channels-last --batch-size 128
    python -m scripts.benchmark --models overlock_t convnext_tiny --device cuda --dtype bfloat16 \\
        --channels-last --batch-size 256 --reparam --out docs/bench_infer.md
    python -m scripts.benchmark --mode na2d --models overlock_xt --baseline --threads 2  # the op, every backend
    python -m scripts.benchmark --mode loader --workers 2          # input pipeline vs timm's create_loader
    python -m scripts.benchmark --mode deploy --models overlock_xt overlock_t convnext_tiny --threads 2 \\
        --original ../OverLoCK                                     # CPU deploy: every runtime, batch 1 and 8

Inference times eval-mode forward passes (deploy form of OverLoCK with --reparam); training times a whole
step (forward, loss main + 0.4 x aux, backward, AdamW step; bf16/fp16 via autocast, fp16 with a GradScaler).
The na2d mode times forward and backward of each backend at every distinct ContMix call of the models (read
off the models themselves) and sums them per network forward. The loader mode builds a folder of JPEG
photographs (or reads --data-dir) and times our dataset and timm's loader with the recipe's augmentation.
The deploy mode times the models' inference forms (OverLoCK fused) on the CPU in PyTorch eager, torch.compile,
ONNX Runtime and OpenVINO side by side, with ratios to a reference model and to the original release's code.
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.benchmark [--help]')

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from utils.cli import (  # noqa: E402
    add_model_kwargs_arg, add_na2d_backend_arg, apply_na2d_backend, parse_kwargs, run_cli,
)
from utils.evaluate import markdown_table  # noqa: E402
from utils.measure.dtypes import dtype_name, parse_dtype  # noqa: E402

MODES = ('infer', 'train', 'na2d', 'loader', 'deploy')
PIPELINES = ('ours_float32', 'ours_uint8', 'ours_uint8_draft', 'timm')  # see utils.measure.loader.bench_loaders


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m scripts.benchmark', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=MODES, default='infer')
    p.add_argument('--models', nargs='+', default=['overlock_xt'], metavar='NAME')
    add_model_kwargs_arg(p, help='constructor overrides applied to the overlock models only, the others are built '
                                 'at their defaults (e.g. a tiny variant)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('-b', '--batch-size', type=int, default=8)
    p.add_argument('--device', default=None, help='default: cuda when available (--mode deploy: cpu)')
    p.add_argument('--dtype', type=dtype_name, default='float32',
                   help='inference / na2d: weights and inputs in this dtype; training: autocast dtype '
                        '(float32, bfloat16 or bf16, float16 or fp16)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--reparam', action='store_true', help='OverLoCK in deploy form (inference)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=5, help='timed steps (na2d: timed samples)')
    p.add_argument('--no-flops', action='store_true', help='skip the FLOP count')
    p.add_argument('--out', default='', help='also append the table to this markdown file')
    add_na2d_backend_arg(p)  # the models' backend (--mode infer/train); --mode na2d times --backends
    op = p.add_argument_group('--mode na2d')
    op.add_argument('--backends', nargs='*', default=None, help='backends to time (default: all available)')
    op.add_argument('--baseline', action='store_true', help='also time the naive K*K loop through autograd')
    op.add_argument('--no-backward', action='store_true', help='time the forward only')
    op.add_argument('--min-time', type=float, default=0.2, help='seconds per timed sample on the CPU')
    dp = p.add_argument_group('--mode deploy (CPU, float32, OverLoCK in its inference form: utils.runtime)')
    dp.add_argument('--runtimes', nargs='+', default=None, metavar='NAME',
                    help='eager, compile, onnxruntime, openvino (default: every one installed)')
    dp.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8], metavar='B')
    dp.add_argument('--reference', default='convnext_tiny', metavar='NAME',
                    help='divide each row by this model\'s images/s on the same runtime and batch (when in --models)')
    dp.add_argument('--original', default='', metavar='DIR',
                    help='a checkout of the original release: time its model code too (eager; natten\'s na2d_av as '
                         'a gather-einsum and as our op; needs einops)')
    dp.add_argument('--profile', action='store_true',
                    help='also print each model\'s GMACs by layer kind, the eager profile\'s top entries (OverLoCK) '
                         'and OpenVINO\'s per-layer counters (when openvino is timed)')
    ld = p.add_argument_group('--mode loader')
    ld.add_argument('--data-dir', default='', help='class-folder root of JPEGs (default: build one from the '
                                                   'photographs installed packages ship)')
    ld.add_argument('--workers', type=int, default=0,
                    help='DataLoader worker processes (0, the default: in this process, timed by its CPU time)')
    ld.add_argument('--photos', type=int, default=512, help='images in the built folder')
    ld.add_argument('--photo-size', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'))
    ld.add_argument('--batches', type=int, default=8,
                    help='timed batches per round (after 1 + 2 x workers untimed ones; keep both within an epoch)')
    ld.add_argument('--rounds', type=int, default=3, help='alternating rounds; the best is kept (also --mode deploy)')
    ld.add_argument('--pipelines', nargs='+', default=list(PIPELINES), choices=PIPELINES)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() and args.mode != 'deploy' else 'cpu'
    return args


def _check_models(args):
    import timm

    import models  # registers the overlock models
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        sys.exit(f'benchmark.py: unknown model(s) {", ".join(unknown)} for --models; OverLoCK models are: '
                 f'{", ".join(models.list_variants())} (any other timm model name works too)')


def run(args):
    """Benchmark ``args.models`` (--mode infer/train); returns (header line, rows, column names)."""
    from utils.measure.model import COLUMNS, ModelBench, bench_models
    _check_models(args)
    device = torch.device(args.device)
    bench = ModelBench(mode=args.mode, batch_size=args.batch_size, img_size=args.img_size, dtype=args.dtype,
                       channels_last=args.channels_last, reparam=args.reparam, compile=args.compile,
                       warmup=args.warmup, iters=args.iters, flops=not args.no_flops,
                       model_kwargs=parse_kwargs(args.model_kwargs))
    rows = bench_models(args.models, bench, device)
    cols = [c for c in COLUMNS if not (args.no_flops and c in ('gmacs', 'paper_gflops'))]
    header = (f'mode={args.mode} device={device.type} dtype={args.dtype} batch={args.batch_size} '
              f'img={args.img_size} channels_last={args.channels_last} reparam={args.reparam} '
              f'compile={args.compile} threads={torch.get_num_threads()} torch={torch.__version__}\n'
              f'peak_mem_mb: CUDA only, the most memory allocated while timing each model (its peak statistics '
              f'reset before it)')
    return header, rows, cols


def run_na2d(args):
    """Time the ContMix op at the models' distinct calls; returns (header, rows, columns, per-network sums)."""
    from models import ops
    from utils.measure.ops import default_backends, gbs, time_na2d
    from utils.measure.shapes import na2d_calls
    _check_models(args)
    device = torch.device(args.device)
    backends = args.backends if args.backends is not None else default_backends()
    for name in backends:
        if name not in ops.available_backends():
            sys.exit(f'benchmark.py: --backends {name!r} is not available here; available: '
                     f'{ops.available_backends()}')
    backends = list(backends) + (['loop'] if args.baseline else [])
    kwargs = parse_kwargs(args.model_kwargs)
    timing = dict(warmup=args.warmup, repeat=args.iters, min_time=args.min_time if device.type == 'cpu' else 0.0)
    rows, totals = [], []
    for name in args.models:
        sums = {b: [0.0, 0.0] for b in backends}
        for call in na2d_calls(name, args.img_size, **kwargs):
            for r in time_na2d(call, args.batch_size, parse_dtype(args.dtype), device, backends,
                               backward=not args.no_backward, **timing):
                row = dict(model=name, shape=call.label, calls=call.calls, backend=r['backend'],
                           fwd_ms=f'{r["fwd_ms"]:.3f}', fwd_median_ms=f'{r["fwd_median_ms"]:.3f}',
                           fwd_gbs=f'{gbs(r["fwd_bytes"], r["fwd_ms"]):.2f}')
                sums[r['backend']][0] += call.calls * r['fwd_ms']
                if not args.no_backward:
                    row.update(bwd_ms=f'{r["bwd_ms"]:.3f}', bwd_median_ms=f'{r["bwd_median_ms"]:.3f}',
                               bwd_gbs=f'{gbs(r["bwd_bytes"], r["bwd_ms"]):.2f}')
                    sums[r['backend']][1] += call.calls * r['bwd_ms']
                rows.append(row)
                print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
        totals += [dict(model=name, backend=b, fwd_ms=f'{f:.2f}', bwd_ms='' if args.no_backward else f'{bw:.2f}')
                   for b, (f, bw) in sums.items()]
    cols = ['model', 'shape', 'calls', 'backend', 'fwd_ms', 'fwd_median_ms', 'fwd_gbs']
    if not args.no_backward:
        cols += ['bwd_ms', 'bwd_median_ms', 'bwd_gbs']
    header = (f'mode=na2d device={device.type} dtype={args.dtype} batch={args.batch_size} img={args.img_size} '
              f'threads={torch.get_num_threads()} torch={torch.__version__}; best of {args.iters} samples '
              f'(median beside it), backward timed alone')
    return header, rows, cols, totals


def run_deploy(args):
    """Time the models on the deploy runtimes side by side; returns (header, rows, columns, profiles)."""
    from utils.measure.deploy import (
        DEPLOY_COLUMNS, MAC_COLUMNS, available_runtimes, bench_deploy, mac_rows, openvino_profile, profile_top,
    )
    from utils.runtime import RUNTIMES
    _check_models(args)
    if args.device != 'cpu':
        sys.exit(f'benchmark.py: --mode deploy runs on the CPU, got --device {args.device}')
    if args.img_size < 32 or args.rounds < 1 or args.iters < 1:
        sys.exit(f'benchmark.py: --mode deploy needs --img-size >= 32 and --rounds, --iters >= 1 (got '
                 f'{args.img_size}, {args.rounds}, {args.iters})')
    if args.original and args.model_kwargs:
        sys.exit('benchmark.py: --original times the release\'s variants as published; leave out --model-kwargs')
    have = available_runtimes()
    runtimes = args.runtimes or have
    for name in runtimes:
        if name not in RUNTIMES or name not in have:
            sys.exit(f'benchmark.py: --runtimes {name}: choose from {", ".join(have)} (installed here)'
                     + ('' if name in RUNTIMES else f'; known: {", ".join(RUNTIMES)}'))
    if min(args.batch_sizes) < 1:
        sys.exit('benchmark.py: --batch-sizes must be >= 1')
    if args.original and not os.path.isdir(args.original):
        sys.exit(f'benchmark.py: --original {args.original} is not a folder (give a checkout of the release)')
    rows = bench_deploy(args.models, runtimes, args.batch_sizes, args.img_size, torch.get_num_threads(),
                        rounds=args.rounds, iters=args.iters, original=args.original or None,
                        reference=args.reference if args.reference in args.models else None,
                        model_kwargs=parse_kwargs(args.model_kwargs))
    cpu = platform.processor()
    if os.path.exists('/proc/cpuinfo'):  # Linux names the CPU model only here
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    header = (f'mode=deploy cpu="{cpu}" threads={torch.get_num_threads()} img={args.img_size} float32 '
              f'torch={torch.__version__} runtimes={",".join(runtimes)}; best of {args.rounds} interleaved rounds of '
              f'{args.iters} calls; vs_reference: {args.reference} on the same runtime and batch')
    profiles = []
    if args.profile:
        kwargs, batch = parse_kwargs(args.model_kwargs), max(args.batch_sizes)
        profiles.append('GMACs per image of the convolution and linear layers, by kind:\n\n'
                        + markdown_table(mac_rows(args.models, args.img_size, kwargs), MAC_COLUMNS))
        profiles += [f'eager profile of {name}, batch {batch}:\n\n'
                     + profile_top(name, batch, args.img_size, model_kwargs=kwargs)
                     for name in args.models if name.startswith('overlock')]
        profiles += [f'OpenVINO per-layer counters of {name}, batch {batch}:\n\n'
                     + openvino_profile(name, batch, args.img_size, torch.get_num_threads(), model_kwargs=kwargs)
                     for name in args.models if 'openvino' in runtimes]
    return header, rows, DEPLOY_COLUMNS, profiles


def run_loader(args):
    """Time the input pipelines; returns (header, rows, columns)."""
    from utils.data import DataError
    from utils.measure.loader import bench_loaders, build_photo_folder, draft_difference
    if args.workers == 0 and not args.threads:
        torch.set_num_threads(1)  # as in a DataLoader worker (torch gives each worker one thread)
    if args.data_dir and not os.path.isdir(args.data_dir):
        sys.exit(f'benchmark.py: --data-dir {args.data_dir} does not exist (give a folder of class folders)')
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir
        if not root:
            root = tmp
            build_photo_folder(root, args.photos, size=tuple(args.photo_size))
        try:
            results = bench_loaders(root, workers=args.workers, batch_size=args.batch_size, batches=args.batches,
                                    rounds=args.rounds, img_size=args.img_size, device=args.device,
                                    which=args.pipelines)
        except DataError as e:
            sys.exit(f'benchmark.py: --data-dir: {e}')
        diff = draft_difference(root, args.img_size, samples=32) if 'ours_uint8_draft' in args.pipelines else None
    cpu = args.workers == 0  # one process: per-image CPU time, the number that does not depend on load

    def rate(r):  # images/s of one worker
        return 1e3 / r.cpu_ms_per_image if cpu else r.per_worker

    timm_rate = {r.name: rate(r) for r in results}.get('timm')
    rows = [dict(pipeline=r.name, workers=r.workers, images_per_s=f'{r.images_per_s:.1f}',
                 cpu_ms_per_image=f'{r.cpu_ms_per_image:.2f}' if cpu else '', per_worker=f'{rate(r):.1f}',
                 vs_timm=f'{rate(r) / timm_rate:.2f}x' if timm_rate else '', batch_dtype=r.dtype,
                 bytes_per_image=r.bytes_per_image) for r in results]
    source = args.data_dir or f'{args.photos} JPEG photographs at {args.photo_size[0]}x{args.photo_size[1]}'
    header = (f'mode=loader data={source} img={args.img_size} batch={args.batch_size} workers={args.workers} '
              f'device={args.device} best of {args.rounds} rounds of {args.batches} batches')
    if diff is not None:
        header += (f'\nreduced-size decoding: {100 * diff["reduced_share"]:.0f}% of crops decoded reduced; mean '
                   f'|difference| {diff["mean_abs_diff"]:.2f}/255 on those; pixel mean {diff["full_mean"]:.2f} -> '
                   f'{diff["draft_mean"]:.2f}, std {diff["full_std"]:.2f} -> {diff["draft_std"]:.2f}')
    if cpu:
        header += '\nper_worker = 1000 / cpu_ms_per_image (the pipeline ran in this process; its CPU time per image)'
    cols = ['pipeline', 'workers', 'images_per_s'] + (['cpu_ms_per_image'] if cpu else []) + \
        ['per_worker', 'vs_timm', 'batch_dtype', 'bytes_per_image']
    return header, rows, cols


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit(f'benchmark.py: --device {args.device}: CUDA is not available on this machine')
    apply_na2d_backend(args.na2d_backend, args.device)
    extra = ''
    if args.mode == 'na2d':
        header, rows, cols, totals = run_na2d(args)
        extra = (f'\n\nna2d time per network forward (backward) at {args.img_size} px, batch {args.batch_size}, '
                 f'summed over its calls, ms:\n\n' + markdown_table(totals, ['model', 'backend', 'fwd_ms', 'bwd_ms']))
    elif args.mode == 'loader':
        header, rows, cols = run_loader(args)
    elif args.mode == 'deploy':
        header, rows, cols, profiles = run_deploy(args)
        extra = ''.join(f'\n\n{p}' for p in profiles)
    else:
        header, rows, cols = run(args)
    table = markdown_table(rows, cols) + extra
    print(header)
    print(table)
    if args.out:
        with open(args.out, 'a') as f:
            f.write(f'\n{header}\n\n{table}\n')
    return 0


if __name__ == '__main__':
    run_cli(main)
