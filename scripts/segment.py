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
metric and the training recipe are the original's mmseg 0.30 ones (docs/dense.md).
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.segment [--help]')

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import List, Optional  # noqa: E402

import torch  # noqa: E402

from utils.cli import apply_na2d_backend, run_cli  # noqa: E402
from utils.dense_cli import add_model_args, add_train_args, build_model, check_positive, train_main  # noqa: E402

_logger = logging.getLogger('segment')


def _model_args(p: argparse.ArgumentParser, weights_required: bool) -> None:
    from models.dense import SEGMENTERS
    add_model_args(p, SEGMENTERS, 'upernet_overlock_t', weights_required,
                   'the released ADE20K file (upernet_overlock_{tiny,small,base}_ade20k.pth) or one of ours', 150,
                   'classes (ADE20K: 150)', 'backbone constructor arguments (e.g. a smaller depth for experiments); '
                   'channels= and aux_channels= set the heads\' widths')


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
    add_train_args(p, 'training', 'validation', batch_size=2, lr=6e-5, weight_decay=0.01,
                   eval_help='evaluate every N iterations (0: never)', eval_default=8000,
                   ckpt_help='write last.pth every N iterations', ckpt_default=8000, layout='ADE20K-layout')
    p.add_argument('--max-iters', type=int, default=160000, metavar='N')
    p.add_argument('--warmup-iters', type=int, default=1500, metavar='N')
    p.add_argument('--aux-loss-weight', type=float, default=0.4)
    p.add_argument('--crop-size', type=int, default=512, metavar='N', help='training crop (recipe: 512)')
    _model_args(p, weights_required=False)
    args = parser.parse_args(argv)
    check_positive(args, 'batch_size', 'max_iters', 'log_interval', 'ckpt_interval', 'num_classes')
    return args


def _build(args: argparse.Namespace, load: bool = True):
    from models.dense import create_segmenter
    return build_model(args, create_segmenter, 'segmentation', load)


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
    from models.dense import create_segmenter
    from utils.seg_train import SegFineTune
    return train_main(args, create_segmenter, 'segmentation', SegFineTune,
                      lambda run: f'{run.max_iters} iterations')


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    if args.command != 'train':
        apply_na2d_backend(args.na2d_backend, args.device)
    return {'predict': predict, 'evaluate': evaluate, 'train': train}[args.command](args)


if __name__ == '__main__':
    run_cli(main)
