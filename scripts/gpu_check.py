"""Check a new GPU node before training: versions, the Triton kernel cache, every Triton kernel forward and
backward at the eight variants' ContMix shapes in every dtype and layout against a float64 reference, the
second GPU, one OverLoCK-T AMP training step on triton vs torch, a 2-process NCCL step with SyncBatchNorm.
Prints a table and a one-line verdict; exit code 1 when a check failed, with the line that
trains on the torch backend instead. See docs/training.md ("Before training on a new GPU node").

    python -m scripts.gpu_check                 # on the GPU node
    python -m scripts.gpu_check --smoke         # CPU: tiny model, Triton interpreter, gloo
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.gpu_check [--help]')

import os  # noqa: E402
import sys  # noqa: E402

# The Triton interpreter must be on before triton defines the kernels (at import).
if __name__ == '__main__' and '--smoke' in sys.argv[1:]:
    os.environ['TRITON_INTERPRET'] = '1'

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from utils.cli import UsageError, run_cli  # noqa: E402
from utils.measure.gpu_check import CheckConfig, render, run_checks, verdict  # noqa: E402

SKIPPABLE = ('kernels', 'device', 'train', 'dist')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m scripts.gpu_check', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=None, help='also write the table and the verdict to this file')
    p.add_argument('--skip', nargs='*', default=[], choices=SKIPPABLE, help='checks to leave out')
    p.add_argument('--smoke', action='store_true',
                   help='CPU run of the check itself: tiny model at 32 px, Triton interpreter, gloo; proves nothing '
                        'about a GPU')
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    args = parse_args(argv)
    if args.out is not None and not args.out.parent.is_dir():
        raise UsageError(f'--out {args.out}: folder {args.out.parent} does not exist')
    if args.smoke:
        if os.environ.get('TRITON_INTERPRET') != '1':
            raise UsageError('--smoke needs the Triton interpreter from the start: run it as python -m '
                             'scripts.gpu_check --smoke')
        from scripts.gpu_report import SMOKE_KWARGS
        cfg = CheckConfig.smoke_config(SMOKE_KWARGS)
    elif not torch.cuda.is_available():
        raise UsageError('no CUDA device visible; this check is for GPU nodes (--smoke runs its code on the CPU)')
    else:
        cfg = CheckConfig()
    results = run_checks(cfg, args.skip)
    text = render(results)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text + '\n')
    return 0 if verdict(results)[0] else 1


if __name__ == '__main__':
    run_cli(main)
