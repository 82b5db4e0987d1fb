#!/usr/bin/env python3
"""Evaluate OverLoCK (or any timm) models on an ImageFolder: top-1, top-5, loss, images/s.

    python validate.py /data/imagenet --model overlock_t --pretrained
    python validate.py /data/imagenet --model overlock_t --checkpoint overlock_t_in1k_224.pth --reparam
    python validate.py /data/imagenet --model 'overlock*' --pretrained --results-file results.csv
    python validate.py /data/imagenet --model overlock_xt overlock_t --checkpoint xt.pth t.pth
    python validate.py /data/imagenet --onnx overlock_t.onnx     # an exported file, in ONNX Runtime (CPU)

DATA is the dataset root (its val/ or validation/ folder is used) or the class-folder root itself.
Checkpoints may be the original release's files, our training checkpoints (--use-ema: the EMA weights)
or deploy checkpoints from reparam.py (detected from the keys). See docs/evaluation.md.
"""
import argparse
import logging
import os

import torch

from utils.cli import UsageError, add_model_kwargs_arg, add_na2d_backend_arg, apply_na2d_backend, run_cli
from utils.evaluate import (
    append_results, build_eval_model, eval_dataset, evaluate, expand_model_names, is_deploy, markdown_table, rounded,
)
from utils.measure.dtypes import dtype_name, parse_dtype

_logger = logging.getLogger('validate')
TABLE_COLUMNS = ['model', 'checkpoint', 'top1', 'top5', 'loss', 'images_per_sec', 'img_size', 'crop_pct', 'reparam',
                 'params_m']


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DATA', help='dataset root (with val/) or a class-folder root')
    p.add_argument('--dataset', default='', metavar='NAME',
                   help='empty: image folders or DATA/val.tar; wds/NAME: webdataset shards in DATA; hfds/NAME: a '
                        'Hugging Face dataset (DATA: its cache folder)')
    p.add_argument('--split', default='val', metavar='NAME', help='the split to evaluate (val also finds validation)')
    p.add_argument('--class-map', default='', metavar='FILE', help='class name -> index file (tar, wds, hfds)')
    p.add_argument('--model', nargs='+', default=['overlock_xt'], metavar='NAME',
                   help='model name(s) or patterns such as "overlock*"')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help='the published weights')
    src.add_argument('--checkpoint', nargs='+', default=None, metavar='PATH',
                     help='checkpoint file(s), one per --model (or one for all)')
    src.add_argument('--onnx', nargs='+', default=None, metavar='FILE',
                     help='exported ONNX file(s) (scripts/export_onnx.py), run in ONNX Runtime on the CPU with the '
                          'preprocessing stored in the file')
    p.add_argument('--use-ema', action='store_true', help='the EMA weights of a training checkpoint')
    p.add_argument('--reparam', action='store_true', help='re-parameterise (merge branches) after loading')
    p.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint')
    p.add_argument('--img-size', type=int, default=None, help="default: the model's pretrained_cfg")
    p.add_argument('--crop-pct', type=float, default=None, help="default: the model's (0.925-0.975)")
    p.add_argument('--interpolation', default=None, help="default: the model's (bicubic)")
    add_model_kwargs_arg(p)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='mixed precision')
    p.add_argument('--amp-dtype', default='bfloat16', type=dtype_name, help='bfloat16 (bf16) or float16 (fp16)')
    p.add_argument('--channels-last', action='store_true')
    add_na2d_backend_arg(p)
    p.add_argument('--skip-corrupt', action='store_true', help='skip unreadable images (logged)')
    p.add_argument('--results-file', default='', metavar='F', help='append results to F.csv or F.json')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--threads', type=int, default=0, help='ONNX Runtime intra-op threads (0: its default)')
    return p.parse_args(argv)


def _dataset(args: argparse.Namespace, transform):
    """The evaluation set: an image folder, or tar / ``--dataset`` wds, hfds through timm's dataset factory."""
    from utils.data import build_timm_dataset, dataset_classes, split_tar
    tar = split_tar(args.data, args.split) if os.path.exists(args.data) else None
    if not args.dataset and tar is None and not args.class_map:
        dataset = eval_dataset(args.data, transform, skip_corrupt=args.skip_corrupt)
        return dataset, len(dataset.classes)
    dataset = build_timm_dataset(args.dataset, tar or args.data, args.split, is_training=False,
                                 class_map=args.class_map, batch_size=args.batch_size, num_workers=args.workers)
    dataset.transform = transform
    dataset.root = args.dataset or tar
    return dataset, len(dataset_classes(dataset))


def _validate_onnx(args: argparse.Namespace) -> int:
    """Evaluate exported files in ONNX Runtime (CPU, float32) with the preprocessing stored at export."""
    import timm.data
    from utils.export import OnnxRuntimeModel

    if args.batch_size < 1:
        raise UsageError('--batch-size must be >= 1')
    ignored = [flag for flag, on in (('--amp', args.amp), ('--channels-last', args.channels_last),
                                     ('--reparam', args.reparam), ('--use-ema', args.use_ema)) if on]
    if ignored:
        _logger.info('--onnx: %s do not apply to an exported file (float32, deploy form)', ' '.join(ignored))
    device = torch.device('cpu')
    results = []
    for path in args.onnx:
        model = OnnxRuntimeModel(path, threads=args.threads)
        meta = model.metadata
        arch = meta.get('architecture', path)
        if args.img_size and tuple(meta['input_size'][1:]) != (args.img_size, args.img_size):
            raise UsageError(f'--img-size {args.img_size}: {path} was exported for input '
                             f'{"x".join(map(str, meta["input_size"][1:]))}; export again at that size')
        overrides = {k: v for k, v in (('crop_pct', args.crop_pct), ('interpolation', args.interpolation)) if v}
        cfg = timm.data.resolve_data_config(overrides, pretrained_cfg=meta)
        transform = timm.data.create_transform(**cfg, is_training=False)
        dataset, n_classes = _dataset(args, transform)
        if model.num_classes and n_classes and model.num_classes != n_classes:
            raise UsageError(f'{dataset.root} has {n_classes} class folders but {path} has '
                             f'{model.num_classes} outputs')
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.workers, persistent_workers=False)
        _logger.info('%s (%s, ONNX Runtime): %d images, input %s, crop_pct %s, %s', arch, path, len(dataset),
                     cfg['input_size'][1:], cfg['crop_pct'], cfg['interpolation'])
        metrics = rounded(evaluate(model, loader, device, progress=not args.no_progress, desc=arch))
        if getattr(dataset, 'num_skipped', 0):
            _logger.warning('%d unreadable images were skipped', dataset.num_skipped)
        row = {'model': arch, 'checkpoint': path, **metrics, 'img_size': cfg['input_size'][-1],
               'crop_pct': cfg['crop_pct'], 'interpolation': cfg['interpolation'], 'reparam': True,
               'params_m': round(meta['params'] / 1e6, 3) if meta.get('params') else ''}
        _logger.info('%s: top-1 %.3f  top-5 %.3f  loss %.4f  %.1f images/s', arch, row['top1'], row['top5'],
                     row['loss'], row['images_per_sec'])
        results.append(row)
    print(markdown_table(results, TABLE_COLUMNS))
    if args.results_file:
        append_results(args.results_file, results)
    return 0


def main(argv=None) -> int:
    import timm.data

    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    apply_na2d_backend(args.na2d_backend, 'cpu' if args.onnx else args.device)
    if args.onnx:
        return _validate_onnx(args)
    names = expand_model_names(args.model)
    checkpoints = args.checkpoint or [None]
    if len(checkpoints) == 1:
        checkpoints = checkpoints * len(names)
    elif len(names) == 1:
        names = names * len(checkpoints)
    if len(checkpoints) != len(names):
        raise UsageError(f'{len(names)} models but {len(checkpoints)} checkpoints: give one checkpoint per model')
    if args.batch_size < 1:
        raise UsageError('--batch-size must be >= 1')
    device = torch.device(args.device)
    amp = parse_dtype(args.amp_dtype) if args.amp else None

    results = []
    for name, ckpt in zip(names, checkpoints):
        model = build_eval_model(name, checkpoint=ckpt, pretrained=args.pretrained, use_ema=args.use_ema,
                            num_classes=args.num_classes, model_kwargs=args.model_kwargs)
        arch = model.pretrained_cfg.get('architecture', name)
        if args.reparam:
            if is_deploy(model):
                _logger.info('%s is already in deploy form: --reparam changes nothing', arch)
            else:
                model.reparameterize()
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)

        overrides = {k: v for k, v in (('crop_pct', args.crop_pct), ('interpolation', args.interpolation)) if v}
        if args.img_size:
            overrides['input_size'] = (3, args.img_size, args.img_size)
        cfg = timm.data.resolve_data_config(overrides, model=model)
        transform = timm.data.create_transform(**cfg, is_training=False)
        dataset, n_classes = _dataset(args, transform)
        num_out = getattr(model, 'num_classes', None)
        if num_out and n_classes and num_out != n_classes:
            raise UsageError(
                f'{dataset.root} has {n_classes} class folders but the classifier of {arch} has '
                f'{num_out} outputs; use a checkpoint trained on these classes (or --num-classes to fine-tune)')
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
            pin_memory=device.type == 'cuda', persistent_workers=False)
        _logger.info('%s: %d images, input %s, crop_pct %s, %s', arch, len(dataset), cfg['input_size'][1:],
                     cfg['crop_pct'], cfg['interpolation'])
        metrics = rounded(evaluate(model, loader, device, amp=amp, channels_last=args.channels_last,
                                   progress=not args.no_progress, desc=arch))
        if getattr(dataset, 'num_skipped', 0):
            _logger.warning('%d unreadable images were skipped', dataset.num_skipped)
        row = {'model': arch, 'checkpoint': ckpt or ('pretrained' if args.pretrained else 'random init'),
               **metrics, 'img_size': cfg['input_size'][-1], 'crop_pct': cfg['crop_pct'],
               'interpolation': cfg['interpolation'], 'reparam': is_deploy(model),
               'params_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
        speed = row['images_per_sec']
        _logger.info('%s: top-1 %.3f  top-5 %.3f  loss %.4f%s', arch, row['top1'], row['top5'], row['loss'],
                     f'  {speed:.1f} images/s' if speed == speed else '')  # nan: not measurable
        results.append(row)
    print(markdown_table(results, TABLE_COLUMNS))
    if args.results_file:
        append_results(args.results_file, results)
    return 0


if __name__ == '__main__':
    run_cli(main)
