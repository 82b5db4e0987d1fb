#!/usr/bin/env python3
"""Export an OverLoCK model to ONNX for ONNX Runtime or OpenVINO, check the file there, and optionally time it.

    python -m scripts.export_onnx --model overlock_xt --pretrained --output overlock_xt.onnx
    python -m scripts.export_onnx --model overlock_t --checkpoint model_best.pth --use-ema --output t.onnx
    python -m scripts.export_onnx --model overlock_xt --output xt_256x320.onnx --img-size 256 320
    python -m scripts.export_onnx --model overlock_xt --output xt.onnx --benchmark --threads 2
    python -m scripts.export_onnx --model overlock_xt --output xt_ov.onnx --runtime openvino --benchmark

The file holds standard ONNX operators only (opset 18 or newer, default 18), a dynamic batch axis, the input
resolution given by --img-size (default: the model's), and the model's preprocessing as metadata (read by
``validate.py DATA --onnx FILE [--runtime openvino]``). A training-form model is re-parameterised before
export. --runtime names the runtime the file is for (the same names as validate.py and scripts.benchmark):
onnxruntime (default) gets the fused channels-last graph (models.fused), openvino the deploy form, which its
CPU plugin lays out itself; each is faster there. After writing, the file's logits on that runtime are
compared with PyTorch's on a random batch (max relative error printed; above 1e-4 the file is removed and the
exit code is 1). See docs/evaluation.md.
"""
import argparse
import logging
import os

from utils.cli import UsageError, add_model_kwargs_arg, add_na2d_backend_arg, apply_na2d_backend, run_cli
from utils.evaluate import build_eval_model, expand_model_names, markdown_table
from utils.export import (
    DEFAULT_OPSET, EXPORT_RUNTIMES, MIN_OPSET, benchmark_onnx, check_export_runtime, check_opset, deploy_copy,
    export_and_check, input_size_arg,
)

_logger = logging.getLogger('export_onnx')

BENCH_COLUMNS = ['model', 'batch', 'img_size', 'threads', 'runtime', 'eager_img_s', 'runtime_img_s', 'vs_eager',
                 'onnx_mb']


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='overlock_xt', metavar='NAME', help='registered model (either form)')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help='the published weights')
    src.add_argument('--checkpoint', default=None, metavar='PATH', help='checkpoint file (any supported layout)')
    p.add_argument('--use-ema', action='store_true', help='the EMA weights of a training checkpoint')
    p.add_argument('--output', required=True, metavar='FILE', help='the .onnx file to write')
    p.add_argument('--runtime', default='onnxruntime', choices=EXPORT_RUNTIMES,
                   help='the runtime the file is for: its graph, the parity check and --benchmark '
                        '(default: onnxruntime; openvino is optional, pip install openvino)')
    p.add_argument('--img-size', type=int, nargs='+', default=None, metavar='N',
                   help="input resolution: N (square) or H W, each >= 32 (default: the model's)")
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                   help=f'ONNX opset (>= {MIN_OPSET}, default {DEFAULT_OPSET})')
    p.add_argument('--no-simplify', action='store_true', help='save the graph without onnxslim')
    p.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint')
    add_model_kwargs_arg(p)
    p.add_argument('--benchmark', action='store_true',
                   help='time the file on --runtime against PyTorch eager (CPU, float32) and print a table')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8], metavar='B', help='benchmark batches')
    p.add_argument('--threads', type=int, default=2, help='intra-op threads of both runtimes in the benchmark')
    p.add_argument('--iters', type=int, default=10, help='timed calls per batch size (median reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed calls before timing')
    add_na2d_backend_arg(p)  # the PyTorch side of the check and the benchmark; the file holds standard ops
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    apply_na2d_backend(args.na2d_backend, 'cpu')
    if any(c in args.model for c in '*?['):
        raise UsageError(f'--model {args.model}: give one model name, not a pattern')
    (name,) = expand_model_names([args.model])
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f'--output {args.output}: folder {out_dir} does not exist')
    if args.benchmark and (min(args.batch_sizes) < 1 or args.threads < 1 or args.iters < 1):
        raise UsageError('--batch-sizes, --threads and --iters must be >= 1')
    check_opset(args.opset)
    check_export_runtime(args.runtime)  # a missing package before the model is built
    model = build_eval_model(name, checkpoint=args.checkpoint, pretrained=args.pretrained, use_ema=args.use_ema,
                        num_classes=args.num_classes, model_kwargs=args.model_kwargs).eval()
    input_size = input_size_arg(args.img_size, model)
    model = deploy_copy(model)
    code = export_and_check(model, args.output, input_size, args.opset, not args.no_simplify, runtime=args.runtime)
    if code or not args.benchmark:
        return code
    rows = benchmark_onnx(model, args.output, batch_sizes=args.batch_sizes, threads=args.threads,
                          iters=args.iters, warmup=args.warmup, runtime=args.runtime)
    print(markdown_table(rows, BENCH_COLUMNS))
    return 0


if __name__ == '__main__':
    run_cli(main)
