"""Does train.py train on a GPU with the shipped recipe? One command, one table.

For each AMP dtype (float16 with its loss scaler, bfloat16), train.py is launched through torchrun
(``python -m torch.distributed.run --nproc_per_node=N``) with ``-c configs/overlock_t.yaml`` and
``--amp --amp-dtype D --channels-last --compile --model-ema``; only the data, batch, epochs, workers and output
differ from the recipe. The data is scikit-learn's handwritten digits upscaled to 224 px as an ImageFolder
(no download; ~1,440 training images), and the epochs are chosen so that about ``--steps`` optimizer updates
run (the recipe's cool-down epochs included). Each run's table row comes from its own outputs (summary.csv and
the log): steps done, wall time, images/s, train loss (finite?), top-1 of the model and of its EMA, peak GPU
memory, exit code; a failed run shows the last lines of its log. Exit code 1 when a run failed.

    python -m scripts.gpu_train_check --out docs/gpu_train_check.md    # CUDA, ~2 x 300 steps
    python -m scripts.gpu_train_check --smoke                           # CPU: tiny model, 32 px, a few steps
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.gpu_train_check [--help]')

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from utils.cli import UsageError, run_cli  # noqa: E402
from utils.measure.train_check import REPO, make_plan, report_markdown, run_check  # noqa: E402

AMP_DTYPES = ('float16', 'bfloat16')
# --smoke: the demo's small OverLoCK (scripts/demo.py), 32 px, a few images per class, no worker processes;
# no --compile (inductor takes minutes on the CPU).
SMOKE = dict(img_size=32, per_class=8, batch=16, steps=3, workers=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m scripts.gpu_train_check', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=None, help='also write the report to this markdown file')
    p.add_argument('--work', type=Path, default=Path('output/gpu_train_check'),
                   help='folder for the dataset, the runs and their logs (default output/gpu_train_check)')
    p.add_argument('--gpus', type=int, default=1, help='processes, one per GPU (--nproc_per_node; default 1)')
    p.add_argument('--steps', type=int, default=None, help='optimizer updates per run, about (default 300)')
    p.add_argument('-b', '--batch', type=int, default=None, help='batch per process (default 128)')
    p.add_argument('-j', '--workers', type=int, default=None, help='data loading processes per GPU (default 8)')
    p.add_argument('--dtypes', nargs='+', choices=AMP_DTYPES, default=list(AMP_DTYPES), help='AMP dtypes to run')
    p.add_argument('-c', '--config', default='configs/overlock_t.yaml', help='the recipe (default overlock_t)')
    p.add_argument('--timeout', type=float, default=3600, help='seconds before a run is stopped (default 3600)')
    p.add_argument('--quiet', action='store_true', help="don't stream the runs' output")
    p.add_argument('--smoke', action='store_true',
                   help='CPU run of the check itself (tiny model, 32 px, a few steps, no --compile)')
    args = p.parse_args(argv)
    defaults = dict(SMOKE) if args.smoke else dict(img_size=224, per_class=0, batch=128, steps=300, workers=8)
    for key in ('steps', 'batch', 'workers'):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.img_size, args.per_class = defaults['img_size'], defaults['per_class']
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would fail only after minutes of training, in one line naming the option."""
    if args.gpus < 1:
        raise UsageError(f'--gpus {args.gpus}: must be at least 1 (one process per GPU)')
    if args.steps < 1:
        raise UsageError(f'--steps {args.steps}: must be at least 1')
    if args.batch < 2 or args.batch % 2:
        raise UsageError(f'--batch {args.batch}: must be even and at least 2 (the recipe mixes pairs of images)')
    if args.workers < 0:
        raise UsageError(f'--workers {args.workers}: must be 0 or more')
    if not (REPO / args.config).is_file():
        raise UsageError(f'--config {args.config}: no such file in {REPO}')
    if args.out is not None:
        folder = args.out.parent
        if args.out.is_dir():
            raise UsageError(f'--out {args.out} is a folder; name a markdown file')
        if not folder.is_dir():
            raise UsageError(f'--out {args.out}: folder {folder} does not exist')
        if not os.access(folder, os.W_OK):
            raise UsageError(f'--out {args.out}: folder {folder} is not writable')
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            raise UsageError('no CUDA device; use --smoke for a CPU run of the check itself')
        if args.gpus > torch.cuda.device_count():
            raise UsageError(f'--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) visible')
    try:
        args.work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f'--work {args.work}: cannot create it ({e.strerror})') from None
    if not os.access(args.work, os.W_OK):
        raise UsageError(f'--work {args.work} is not writable')


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    import torch
    from scripts.demo import MODEL_KWARGS
    from utils.demo_data import build_digits_imagefolder
    from utils.measure.report import environment

    work = args.work.resolve()
    data = work / f'digits{args.img_size}'
    if data.exists():
        shutil.rmtree(data)  # rebuilt every time: a folder left by other settings must not mix in
    n_train, n_val = build_digits_imagefolder(str(data), size=args.img_size, limit=args.per_class)
    print(f'dataset: {data} ({n_train} train / {n_val} val images, 10 classes, {args.img_size} px)', flush=True)
    smoke = ['--img-size', str(args.img_size), '--model-kwargs', *MODEL_KWARGS] if args.smoke else []
    try:
        plan = make_plan(args.config, str(data), n_train, args.gpus, args.batch, args.workers, args.steps,
                         device='cpu' if args.smoke else 'cuda', compile=not args.smoke, extra=smoke)
    except ValueError as e:
        raise UsageError(f'--batch {args.batch}: {e}') from None
    env = environment(torch.device(plan.device))
    print(env, flush=True)
    results, commands = run_check(plan, args.dtypes, work, timeout=args.timeout, show=not args.quiet)

    title = 'GPU training check' + (' (--smoke: CPU, tiny model, numbers meaningless)' if args.smoke else '')
    text = report_markdown(results, env, plan, commands, title=title)
    print('\n' + text, end='', flush=True)
    if args.out is not None:
        from utils.fileio import atomic_write_text
        atomic_write_text(text, str(args.out))
        print(f'written to {args.out}')
    return 1 if any(r.problem for r in results) else 0


if __name__ == '__main__':
    run_cli(main)
