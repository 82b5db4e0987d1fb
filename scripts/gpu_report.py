"""Every GPU measurement in one call: a summary against the targets, every table, one markdown file.

  1. the CUDA correctness tests (tests/test_gpu.py: the Triton kernels at OverLoCK-T's shapes, fp32/fp16/bf16,
     output and gradients against a float64 reference), run by pytest;
  2. the ContMix aggregation op: triton beside the torch backend at the target model's shapes, forward and
     backward, achieved bandwidth against the measured copy bandwidth;
  3. inference (deploy form, channels_last, batch 256) and training (AMP, batch 128) images/s and peak memory
     of OverLoCK-XT/T beside ConvNeXt-T;
  4. the depthwise convolutions of OverLoCK-T timed alone in both layouts, summed per step, against the step;
  5. torch.profiler's top kernels of one OverLoCK-T training step;
  6. the static cost model of the Triton kernels (utils/measure/static_gpu.py).

    python -m scripts.gpu_report --out docs/gpu_report.md     # CUDA
    python -m scripts.gpu_report --smoke                        # CPU: tiny models, Triton interpreter
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.gpu_report [--help]')

import os  # noqa: E402
import sys  # noqa: E402

# The Triton interpreter must be on before triton defines the kernels (at import).
if __name__ == '__main__' and '--smoke' in sys.argv[1:]:
    os.environ['TRITON_INTERPRET'] = '1'

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from utils.measure.dtypes import dtype_name  # noqa: E402
from utils.measure.report import PARTS, ReportConfig, run_report  # noqa: E402

SMOKE_KWARGS = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 24, 32, 48], sub_num_heads=[2, 2],
                    projection=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m scripts.gpu_report', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=None, help='write every table and the summary to this markdown file')
    p.add_argument('--models', nargs='+', default=['overlock_xt', 'overlock_t', 'convnext_tiny'])
    p.add_argument('--target', default='overlock_t', help='the model held to the targets (default overlock_t)')
    p.add_argument('--reference', default='convnext_tiny', help='the model the targets are relative to')
    p.add_argument('--dtype', type=dtype_name, default='bfloat16', help='model dtype (bf16, fp16, fp32)')
    p.add_argument('--infer-batch', type=int, default=256)
    p.add_argument('--train-batch', type=int, default=128)
    p.add_argument('--op-batch', type=int, default=128)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--skip', nargs='*', default=[], choices=PARTS, help='parts to leave out')
    p.add_argument('--smoke', action='store_true',
                   help='CPU run of the script itself: tiny models at 32 px, Triton interpreter; numbers meaningless')
    args = p.parse_args(argv)
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f'--out {args.out}: folder {args.out.parent} does not exist')
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = ReportConfig(models=args.models, target=args.target, reference=args.reference, dtype=args.dtype,
                       infer_batch=args.infer_batch, train_batch=args.train_batch, op_batch=args.op_batch,
                       warmup=args.warmup, iters=args.iters, skip=args.skip)
    if args.smoke:
        if os.environ.get('TRITON_INTERPRET') != '1':
            sys.exit('gpu_report: --smoke needs the Triton interpreter from the start; run it as a program')
        cfg.models, cfg.target, cfg.reference = ['overlock_xt', 'convnext_tiny'], 'overlock_xt', 'convnext_tiny'
        cfg.dtype, cfg.op_dtypes, cfg.img_size = 'float32', ('float32',), 32
        cfg.infer_batch = cfg.train_batch = cfg.op_batch = 2
        cfg.warmup, cfg.iters, cfg.smoke = 0, 1, True
        cfg.model_kwargs = dict(SMOKE_KWARGS)
    elif not torch.cuda.is_available():
        sys.exit('gpu_report: no CUDA device; use --smoke for a CPU run of the script itself')
    device = torch.device('cpu' if args.smoke else 'cuda')
    _, missed = run_report(cfg, device, args.out)
    return 0 if args.smoke or not missed else 1


if __name__ == '__main__':
    sys.exit(main())
