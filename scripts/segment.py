#!/usr/bin/env python3
"""Semantic segmentation with OverLoCK + UPerNet (the released ADE20K models, or your own): run a model on
images, evaluate it on an ADE20K-layout folder, or fine-tune one with the original's recipe.

    python -m scripts.segment predict photo.jpg photos/ --model upernet_overlock_t \\
        --checkpoint upernet_overlock_tiny_ade20k.pth --output pictures/
    python -m scripts.segment evaluate /data/ADEChallengeData2016 --model upernet_overlock_t \\
        --checkpoint upernet_overlock_tiny_ade20k.pth
    torchrun --nproc_per_node=8 -m scripts.segment train --data-dir /data/ADEChallengeData2016 \\
        --model upernet_overlock_t --pretrained-path overlock_t_in1k_224.pth --output runs/upernet_t

Checkpoints are the release's mmcv files (read with ``weights_only=True``) or ours. The test pipeline, the
metric and the training recipe are the original's mmseg 0.30 ones (docs/segmentation.md).
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.segment [--help]')

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import List, Optional  # noqa: E402

import torch  # noqa: E402

from utils.cli import UsageError, add_na2d_backend_arg, apply_na2d_backend, run_cli  # noqa: E402

_logger = logging.getLogger('segment')


def _model_args(p: argparse.ArgumentParser, weights_required: bool) -> None:
    from models.dense import SEGMENTERS
    p.add_argument('--model', default='upernet_overlock_t', choices=sorted(SEGMENTERS),
                   help='the segmenter (UPerNet on OverLoCK-T/S/B)')
    p.add_argument('--checkpoint', required=weights_required, default=None, metavar='FILE',
                   help='the released ADE20K file (upernet_overlock_{tiny,small,base}_ade20k.pth) or one of ours')
    p.add_argument('--num-classes', type=int, default=150, metavar='N', help='classes (ADE20K: 150)')
    p.add_argument('--reparam', action='store_true', help='evaluate the deploy form (merged branches)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='backbone constructor arguments (e.g. a smaller depth for experiments); channels= and '
                        'aux_channels= set the heads\' widths')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='mixed precision (bfloat16)')
    add_na2d_backend_arg(p)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='predict|evaluate|train')

    p = sub.add_parser('predict', help='segment images and write pictures (class colours over the image, a legend)')
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files or folders of images')
    p.add_argument('--output', required=True, metavar='DIR', help='where the pictures go (<name>.png)')
    p.add_argument('--save-labels', action='store_true', help='also write the class ids as <name>_labels.png')
    _model_args(p, weights_required=True)

    p = sub.add_parser('evaluate', help='mIoU, aAcc and a per-class table on an ADE20K-layout folder')
    p.add_argument('data', metavar='DATA', help='the dataset folder (images/<split>, annotations/<split>)')
    p.add_argument('--split', default='validation', metavar='NAME')
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--results-file', default='', metavar='FILE', help='write the per-class table as CSV')
    p.add_argument('--no-progress', action='store_true')
    _model_args(p, weights_required=True)

    p = sub.add_parser('train', help='fine-tune with the original recipe (torchrun for several GPUs)')
    p.add_argument('--data-dir', required=True, metavar='DIR', help='ADE20K-layout folder')
    p.add_argument('--train-split', default='training', metavar='NAME')
    p.add_argument('--val-split', default='validation', metavar='NAME')
    p.add_argument('--output', required=True, metavar='DIR', help='run directory')
    p.add_argument('--pretrained-path', default='', metavar='FILE',
                   help='ImageNet weights of the backbone (overlock_*_in1k_224.pth), as the released models began')
    p.add_argument('--finetune', default='', metavar='FILE', help='start from a whole segmenter\'s weights instead')
    p.add_argument('--resume', default='', metavar='FILE', help='continue a run (its last.pth; "auto": OUTPUT/last.pth)')
    p.add_argument('-b', '--batch-size', type=int, default=2, metavar='N', help='images per process (recipe: 2 x 8)')
    p.add_argument('--max-iters', type=int, default=160000, metavar='N')
    p.add_argument('--warmup-iters', type=int, default=1500, metavar='N')
    p.add_argument('--lr', type=float, default=6e-5)
    p.add_argument('--weight-decay', type=float, default=0.01)
    p.add_argument('--aux-loss-weight', type=float, default=0.4)
    p.add_argument('--crop-size', type=int, default=512, metavar='N', help='training crop (recipe: 512)')
    p.add_argument('--drop-path', type=float, default=None, metavar='P', help='default: the recipe\'s per variant')
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--eval-interval', type=int, default=8000, metavar='N', help='evaluate every N iterations (0: never)')
    p.add_argument('--ckpt-interval', type=int, default=8000, metavar='N', help='write last.pth every N iterations')
    p.add_argument('--log-interval', type=int, default=50, metavar='N')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    p.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=None, help=argparse.SUPPRESS)
    _model_args(p, weights_required=False)
    args = parser.parse_args(argv)
    for name in ('batch_size', 'max_iters', 'log_interval', 'ckpt_interval', 'num_classes'):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be >= 1')
    return args


def _build(args: argparse.Namespace, load: bool = True):
    from models.dense import create_segmenter, load_dense_checkpoint
    from utils.cli import parse_kwargs
    kwargs = parse_kwargs(args.model_kwargs)
    if getattr(args, 'drop_path', None) is not None:
        kwargs['drop_path_rate'] = args.drop_path
    try:
        model = create_segmenter(args.model, num_classes=args.num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f'--model {args.model} with {kwargs}: {e}') from None
    if load and args.checkpoint:
        meta = load_dense_checkpoint(model, args.checkpoint, 'segmentation')
        _logger.info('Loaded %s%s', args.checkpoint, f' (iteration {meta["iter"]})' if 'iter' in meta else '')
    if args.reparam:
        model.reparameterize()
    return model


def _class_names(n: int) -> List[str]:
    from models.dense import ADE20K_CLASSES
    return list(ADE20K_CLASSES) if n == len(ADE20K_CLASSES) else [f'class {i}' for i in range(n)]


def predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from utils.segmentation import draw_prediction, find_images, inference_transform, read_image, whole_inference
    from utils.train_step import autocast
    from tqdm import tqdm
    files = [f for path in args.images for f in find_images(path)]
    os.makedirs(args.output, exist_ok=True)
    device = torch.device(args.device)
    model = _build(args).to(device).eval()
    names = _class_names(args.num_classes)
    for path in tqdm(files, desc='segment', dynamic_ncols=True, leave=False):
        img = read_image(path)
        x, size = inference_transform(img)
        with autocast(args.amp, device, torch.bfloat16):
            pred = whole_inference(model, x[None].to(device), size).float().argmax(1)[0].cpu().numpy()
        stem = os.path.splitext(os.path.basename(path))[0]
        draw_prediction(img, pred, names).save(os.path.join(args.output, f'{stem}.png'))
        if args.save_labels:
            Image.fromarray(pred.astype(np.uint8)).save(os.path.join(args.output, f'{stem}_labels.png'))
    _logger.info('Wrote %d pictures to %s', len(files), args.output)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from utils.evaluate import markdown_table
    from utils.segmentation import ADE20KFolder
    from utils.seg_train import evaluate_segmentation
    dataset = ADE20KFolder(args.data, args.split)
    device = torch.device(args.device)
    model = _build(args).to(device)
    _logger.info('%s on %d images of %s', args.model, len(dataset), os.path.join(args.data, 'images', args.split))
    acc = evaluate_segmentation(model, dataset, device, args.num_classes, workers=args.workers,
                                amp_dtype=torch.bfloat16 if args.amp else None, progress=not args.no_progress)
    per, summary = acc.per_class(), acc.summary()
    rows = [{'class': name.strip(), 'IoU': round(100 * float(iou), 2) if iou == iou else 'nan',
             'Acc': round(100 * float(a), 2) if a == a else 'nan'}
            for name, iou, a in zip(_class_names(args.num_classes), per['IoU'], per['Acc'])]
    print(markdown_table(rows, ['class', 'IoU', 'Acc']))
    print(markdown_table([{k: round(v, 2) for k, v in summary.items()}], ['aAcc', 'mIoU', 'mAcc']))
    if args.results_file:
        import csv
        with open(args.results_file, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=['class', 'IoU', 'Acc'])
            writer.writeheader()
            writer.writerows(rows + [{'class': 'mean', 'IoU': round(summary['mIoU'], 2),
                                      'Acc': round(summary['mAcc'], 2)}])
    _logger.info('mIoU %.2f  mAcc %.2f  aAcc %.2f', summary['mIoU'], summary['mAcc'], summary['aAcc'])
    return 0


def train(args: argparse.Namespace) -> int:
    from models.dense import load_backbone_weights, load_dense_checkpoint
    from utils.distributed import cleanup, init_distributed
    from utils.seg_train import LAST, SegFineTune
    from utils.train_setup import remove_log_handlers, seed_all, setup_logging
    if args.finetune and args.pretrained_path:
        raise UsageError('--finetune and --pretrained-path both give the starting weights; pass only one')
    if args.resume == 'auto':
        last = os.path.join(args.output, LAST)
        args.resume = last if os.path.isfile(last) else ''
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError(f'--resume {args.resume} does not exist')
    if not args.resume and os.path.isfile(os.path.join(args.output, LAST)):
        raise UsageError(f'--output {args.output} holds another run; pass --resume auto to continue it, or another '
                         f'--output')
    info = init_distributed(args.device, args.local_rank)
    try:
        seed_all(args.seed + info.rank)
        if info.is_main:
            os.makedirs(args.output, exist_ok=True)
        setup_logging(info, os.path.join(args.output, 'log.txt') if info.is_main else None)
        apply_na2d_backend(args.na2d_backend, info.device)
        model = _build(args, load=False)
        if args.pretrained_path:
            load_backbone_weights(model.backbone, args.pretrained_path)
        elif args.finetune:
            load_dense_checkpoint(model, args.finetune, 'segmentation')
        elif not args.resume:
            _logger.warning('No --pretrained-path: the backbone starts from random weights (the recipe starts '
                            'from the ImageNet weights)')
        run = SegFineTune(args, info, model)
        if args.resume:
            run.restore(args.resume)
        _logger.info('Output %s | %d process(es) x batch %d | %d iterations', args.output, info.world_size,
                     args.batch_size, args.max_iters)
        return run.run()
    finally:
        cleanup()
        remove_log_handlers()


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    if args.command != 'train':
        apply_na2d_backend(args.na2d_backend, args.device)
    return {'predict': predict, 'evaluate': evaluate, 'train': train}[args.command](args)


if __name__ == '__main__':
    run_cli(main)
