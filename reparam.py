#!/usr/bin/env python3
"""Turn a trained OverLoCK checkpoint into its deploy (re-parameterised) form.

    python reparam.py --model overlock_t --checkpoint output/run/model_best.pth --output overlock_t_deploy.pth --use-ema

Loads the training form, merges every DilatedReparamBlock (and its BatchNorms) into one large-kernel conv,
checks on random input that the deploy model's eval logits equal the training form's, reports parameters and
speed before/after, and saves {'arch': '<model>_reparam', 'state_dict': ...} for `overlock_*_reparam`
(`validate.py --checkpoint OUT` picks that model automatically). `--onnx FILE` also (or instead) writes the
model as ONNX for ONNX Runtime at --img-size (its fused inference form; see scripts/export_onnx.py, whose
--runtime writes a file for OpenVINO, and docs/evaluation.md).
"""
import argparse
import copy
import logging
import os

import torch

from utils.checkpoint import atomic_save
from utils.cli import UsageError, add_model_kwargs_arg, add_na2d_backend_arg, apply_na2d_backend, run_cli
from utils.evaluate import build_eval_model, is_deploy
from utils.measure import time_ms
from utils.export import DEFAULT_OPSET, check_opset, export_and_check

_logger = logging.getLogger('reparam')
TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, metavar='NAME', help='training-form model name, e.g. overlock_t')
    p.add_argument('--checkpoint', required=True, metavar='IN', help='trained checkpoint (any supported layout)')
    p.add_argument('--output', default=None, metavar='OUT', help='deploy checkpoint to write')
    p.add_argument('--onnx', default=None, metavar='FILE', help='also write an ONNX file for ONNX Runtime (CPU check)')
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset of --onnx (default {DEFAULT_OPSET})')
    p.add_argument('--use-ema', action='store_true', help='convert the EMA weights of a training checkpoint')
    p.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint')
    p.add_argument('--img-size', type=int, default=None, help="check/benchmark input size (default: model's)")
    add_model_kwargs_arg(p)
    p.add_argument('--batch-size', type=int, default=2, help='batch of the equivalence check and timing')
    p.add_argument('--bench-iters', type=int, default=3, help='timed forward passes of each form (0: skip)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', type=int, default=0)
    add_na2d_backend_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    apply_na2d_backend(args.na2d_backend, args.device)
    if args.model.endswith('_reparam'):
        raise UsageError(f'--model {args.model}: give the training-form name ({args.model[:-len("_reparam")]})')
    if not args.output and not args.onnx:
        raise UsageError('give --output (deploy checkpoint) and/or --onnx (ONNX file)')
    for flag, path in (('--output', args.output), ('--onnx', args.onnx)):
        if not path:
            continue
        if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(args.checkpoint):
            raise UsageError(f'{flag} must differ from --checkpoint (the input would be overwritten)')
        out_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(out_dir):
            raise UsageError(f'{flag} {path}: folder {out_dir} does not exist')
    if args.onnx:
        check_opset(args.opset)  # before the conversion: also says when onnx is not installed

    model = build_eval_model(args.model, checkpoint=args.checkpoint, use_ema=args.use_ema,
                        num_classes=args.num_classes, model_kwargs=args.model_kwargs)
    if is_deploy(model):  # build_eval_model switched to the _reparam model: the file is converted already
        raise UsageError(f'{args.checkpoint} is already in deploy form; nothing to convert')
    device = torch.device(args.device)
    model.to(device).eval()
    size = args.img_size or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    x = torch.randn(args.batch_size, model.in_chans, size, size, device=device,
                    generator=torch.Generator(device=device).manual_seed(args.seed))

    deploy = copy.deepcopy(model).reparameterize()
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    params = [sum(p.numel() for p in m.parameters()) for m in (model, deploy)]
    print(f'max relative error of deploy vs training-form logits: {err:.3e} (limit {TOLERANCE:g})')
    line = f'params: {params[0]:,} -> {params[1]:,}'
    if getattr(model, 'aux_head', None) is not None:  # a use_ds=True model (the release's layout)
        no_aux = [sum(p.numel() for n, p in m.named_parameters() if not n.startswith('aux_head.'))
                  for m in (model, deploy)]
        line += f' (without aux head: {no_aux[0]:,} -> {no_aux[1]:,})'
    print(line)
    if args.bench_iters > 0:
        with torch.no_grad():  # median ms of one forward pass of each form
            t_train, t_deploy = (time_ms(lambda m=m: m(x), device, warmup=1, repeat=args.bench_iters).median
                                 for m in (model, deploy))
        print(f'forward, batch {args.batch_size} at {size}px on {device.type}: {t_train:.1f} ms -> '
              f'{t_deploy:.1f} ms ({t_train / t_deploy:.2f}x)')
    if not err <= TOLERANCE:
        print(f'error: deploy model differs from the training form (max relative error {err:.3e}); not saved')
        return 1

    arch = model.pretrained_cfg.get('architecture', args.model) + '_reparam'
    if args.output:
        state_dict = {k: v.detach().cpu() for k, v in deploy.state_dict().items()}
        atomic_save({'version': 1, 'arch': arch, 'state_dict': state_dict}, args.output)
        print(f'saved {arch} weights to {args.output}')
    if args.onnx:
        return export_and_check(deploy.cpu(), args.onnx, (model.in_chans, size, size), args.opset,
                                metadata={'architecture': arch})
    return 0


if __name__ == '__main__':
    run_cli(main)
