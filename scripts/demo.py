#!/usr/bin/env python3
"""The whole pipeline on real images, on the CPU, with no download (``bash scripts/demo.sh`` or, from the
repository root, ``python -m scripts.demo``).

1. builds an ImageFolder from scikit-learn's handwritten digits (upscaled to 32 px);
2. trains a small OverLoCK with train.py;
3. validates the best checkpoint with validate.py;
4. re-parameterises it with reparam.py;
5. validates the deploy checkpoint (as overlock_xt_reparam) and checks the top-1 is unchanged.
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.demo [OUTDIR] (or bash scripts/demo.sh)')

import argparse  # noqa: E402
import csv  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from utils.checkpoint import BEST_FILE  # noqa: E402
from utils.demo_data import build_digits_imagefolder  # noqa: E402
from utils.measure.train_check import launch  # noqa: E402

# A small OverLoCK (~0.3M params) that learns the digits in a few CPU minutes.
MODEL_KWARGS = ['depth=[1,1,1,1]', 'sub_depth=[1,1]', 'embed_dim=[16,32,48,64]', 'sub_num_heads=[2,2]',
                'projection=128']


def run(cmd, log, show=False):
    """Run ``cmd`` from the repository root, its output into ``log``; with ``show`` also onto the terminal,
    line by line as it comes (training: the epochs' progress)."""
    print('$', ' '.join(cmd), flush=True)
    returncode, _ = launch(cmd, log, show=show)
    if returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f'demo step failed (exit {returncode}); log {log}:\n{tail}')
    with open(log) as f:
        return f.read()


def top1_from(results_csv):
    with open(results_csv) as f:
        return float(list(csv.DictReader(f))[-1]['top1'])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('output', nargs='?', default='output/demo', help='folder for data, run and results')
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--per-class', type=int, default=0, help='images per class (0: all ~180)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    args = p.parse_args()

    start = time.time()
    out = os.path.abspath(args.output)
    data, run_dir = os.path.join(out, 'digits'), os.path.join(out, 'run')
    os.makedirs(out, exist_ok=True)
    n_train, n_val = build_digits_imagefolder(data, size=32, limit=args.per_class)
    print(f'dataset: {data} ({n_train} train / {n_val} val images, 10 classes)')
    if args.threads:
        os.environ['OMP_NUM_THREADS'] = str(args.threads)

    py = sys.executable
    run([py, 'train.py', '--data-dir', data, '--model', 'overlock_xt', '--model-kwargs', *MODEL_KWARGS,
         '--img-size', '32', '-b', '32', '-j', '0', '--epochs', str(args.epochs), '--warmup-epochs', '1',
         '--sched-on-updates', '--cooldown-epochs', '0', '--lr', '3e-3', '--min-lr', '1e-5', '--weight-decay', '0.05',
         '--smoothing', '0.1', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0',
         '--scale', '0.6', '1.0', '--hflip', '0', '--drop-path', '0', '--crop-pct', '1.0', '--interpolation', 'bicubic',
         '--log-interval', '15', '--output', run_dir, '--overwrite'], os.path.join(out, 'train.log'), show=True)
    best = os.path.join(run_dir, BEST_FILE)
    results = os.path.join(out, 'results.csv')
    if os.path.exists(results):
        os.remove(results)
    common = ['--img-size', '32', '--crop-pct', '1.0', '-b', '64', '-j', '0', '--no-progress', '--results-file', results]
    run([py, 'validate.py', data, '--model', 'overlock_xt', '--checkpoint', best,
         '--model-kwargs', *MODEL_KWARGS, *common], os.path.join(out, 'validate.log'))
    top1 = top1_from(results)
    deploy = os.path.join(out, 'overlock_digits_deploy.pth')
    print(run([py, 'reparam.py', '--model', 'overlock_xt', '--checkpoint', best, '--output', deploy,
               '--img-size', '32', '--model-kwargs', *MODEL_KWARGS], os.path.join(out, 'reparam.log')).strip())
    run([py, 'validate.py', data, '--model', 'overlock_xt', '--checkpoint', deploy,
         '--model-kwargs', *MODEL_KWARGS, *common], os.path.join(out, 'validate_deploy.log'))
    top1_deploy = top1_from(results)

    print(f'\ntop-1 on the digits validation set: {top1:.2f}% (training form), {top1_deploy:.2f}% (deploy form)')
    print(f'outputs in {out}: digits/ (data), run/ (checkpoints, summary.csv, curves.png), '
          f'{os.path.basename(deploy)}, results.csv, *.log   [{time.time() - start:.0f} s]')
    if top1 != top1_deploy:
        sys.exit('error: the deploy model scored differently from the training form')
    return 0


if __name__ == '__main__':
    sys.exit(main())
