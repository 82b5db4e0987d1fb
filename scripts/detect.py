#!/usr/bin/env python3
"""Object detection and instance segmentation with OverLoCK + Mask R-CNN (the released COCO models, or your own):
run a model on images, evaluate it on a COCO-layout folder, or train one with the original's 1x recipe.

    python -m scripts.detect predict photo.jpg photos/ --model maskrcnn_overlock_t \\
        --checkpoint maskrcnn1x_overlock_tiny_coco.pth --output pictures/
    python -m scripts.detect evaluate /data/coco --model maskrcnn_overlock_t \\
        --checkpoint maskrcnn1x_overlock_tiny_coco.pth
    torchrun --nproc_per_node=8 -m scripts.detect train --data-dir /data/coco --model maskrcnn_overlock_t \\
        --pretrained-path overlock_t_in1k_224.pth --output runs/maskrcnn_t

Checkpoints are the release's mmcv files (read with ``weights_only=True``, converted to torchvision's layout on
load) or ours. The test pipeline, the metric and the training recipe are the original's mmdet 2.28 ones
(docs/detection.md).
"""
if __name__ == '__main__' and not __package__:
    raise SystemExit('run from the repository root as: python -m scripts.detect [--help]')

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import List, Optional  # noqa: E402

import torch  # noqa: E402

from utils.cli import UsageError, apply_na2d_backend, run_cli  # noqa: E402
from utils.dense_cli import add_model_args, add_train_args, build_model, check_positive, train_main  # noqa: E402

_logger = logging.getLogger('detect')


def _model_args(p: argparse.ArgumentParser, weights_required: bool) -> None:
    from models.detection import DETECTORS
    add_model_args(p, DETECTORS, 'maskrcnn_overlock_t', weights_required,
                   'the released COCO file (maskrcnn{1x,3x}_overlock_{tiny,small,base}_coco.pth) or one of ours', 80,
                   'object classes, background not counted (COCO: 80)',
                   'backbone constructor arguments (e.g. a smaller depth for experiments); channels= and '
                   'fc_channels= set the heads\' widths')
    p.add_argument('--img-scale', type=int, nargs=2, default=[1333, 800], metavar=('LONG', 'SHORT'),
                   help='resize images to fit these edge limits, keeping their ratio (recipe: 1333 800)')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='predict|evaluate|train')

    p = sub.add_parser('predict', help='detect objects in images and draw them (masks, boxes, classes, scores)')
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files or folders of images')
    p.add_argument('--output', required=True, metavar='DIR', help='where the pictures go (<name>.png)')
    p.add_argument('--score-thr', type=float, default=0.3, metavar='S', help='draw detections scoring at least S')
    p.add_argument('--save-json', action='store_true',
                   help='also write the detections as <name>.json (boxes x1 y1 x2 y2, classes, scores)')
    p.add_argument('--classes', default='', metavar='FILE',
                   help='class names, one per line (default: COCO\'s 80 for 80 classes)')
    _model_args(p, weights_required=True)

    p = sub.add_parser('evaluate', help='COCO box and mask AP on a COCO-layout folder')
    p.add_argument('data', metavar='DATA', help='the dataset folder (annotations/instances_<split>.json, <split>/)')
    p.add_argument('--split', default='val2017', metavar='NAME')
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--results-file', default='', metavar='PREFIX',
                   help='also write the detections as PREFIX.bbox.json and PREFIX.segm.json (COCO results format)')
    p.add_argument('--classwise', default='', metavar='FILE', help='write the per-class box and mask AP as CSV')
    p.add_argument('--no-progress', action='store_true')
    _model_args(p, weights_required=True)

    p = sub.add_parser('train', help='train with the original 1x recipe (torchrun for several GPUs)')
    add_train_args(p, 'train2017', 'val2017', batch_size=2, lr=2e-4, weight_decay=0.05,
                   eval_help='evaluate every N epochs (0: never)', eval_default=1,
                   ckpt_help='write last.pth every N iterations (0: after every epoch)', ckpt_default=0,
                   layout='COCO-layout')
    p.add_argument('--epochs', type=int, default=12, metavar='N')
    p.add_argument('--lr-steps', type=int, nargs='+', default=[8, 11], metavar='EPOCH',
                   help='epochs after which the lr drops tenfold')
    p.add_argument('--warmup-iters', type=int, default=500, metavar='N')
    _model_args(p, weights_required=False)
    args = parser.parse_args(argv)
    check_positive(args, 'batch_size', 'epochs', 'log_interval', 'num_classes')
    if getattr(args, 'ckpt_interval', 0) < 0 or getattr(args, 'eval_interval', 0) < 0:
        raise UsageError('--ckpt-interval and --eval-interval must be >= 0')
    return args


def _build(args: argparse.Namespace, load: bool = True):
    from models.detection import create_detector
    return build_model(args, create_detector, 'detection', load)


def _class_names(args: argparse.Namespace, dataset=None) -> List[str]:
    from models.detection import COCO_CLASSES
    if getattr(args, 'classes', ''):
        try:
            with open(args.classes) as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f'--classes {args.classes}: {e.strerror or e}') from None
        if len(names) != args.num_classes:
            raise UsageError(f'--classes {args.classes} names {len(names)} classes; the model has {args.num_classes}')
        return names
    if dataset is not None:
        return list(dataset.classes)
    if args.num_classes == len(COCO_CLASSES):
        return list(COCO_CLASSES)
    return [f'class {i}' for i in range(1, args.num_classes + 1)]


def predict(args: argparse.Namespace) -> int:
    import json
    from tqdm import tqdm
    from utils.detection import draw_detections, inference_transform
    from utils.segmentation import find_images, read_image
    from utils.train_step import autocast
    files = [f for path in args.images for f in find_images(path)]
    names = _class_names(args)
    os.makedirs(args.output, exist_ok=True)
    device = torch.device(args.device)
    model = _build(args).to(device).eval()
    for path in tqdm(files, desc='detect', dynamic_ncols=True, leave=False):
        img = read_image(path)
        x, meta = inference_transform(img, tuple(args.img_scale))
        with autocast(args.amp, device, torch.bfloat16):
            result = {k: v.cpu() for k, v in model(x[None].to(device), [meta])[0].items()}
        stem = os.path.splitext(os.path.basename(path))[0]
        draw_detections(img, result, names, args.score_thr).save(os.path.join(args.output, f'{stem}.png'))
        if args.save_json:
            entries = [{'box': [round(float(v), 2) for v in b], 'class': names[int(c) - 1], 'score': round(float(s), 4)}
                       for b, c, s in zip(result['boxes'], result['labels'], result['scores'])]
            with open(os.path.join(args.output, f'{stem}.json'), 'w') as f:
                json.dump(entries, f, indent=1)
    _logger.info('Wrote %d pictures to %s', len(files), args.output)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from utils.det_train import evaluate_detection
    from utils.detection import COCOFolder, METRIC_NAMES
    from utils.evaluate import markdown_table
    dataset = COCOFolder(args.data, args.split, scale=tuple(args.img_scale))
    if len(dataset.cat_ids) != args.num_classes:
        raise UsageError(f'{dataset.ann_file} has {len(dataset.cat_ids)} categories but the model {args.num_classes} '
                         f'classes; pass --num-classes {len(dataset.cat_ids)} with a model of that many')
    device = torch.device(args.device)
    model = _build(args).to(device)
    _logger.info('%s on %d images of %s', args.model, len(dataset), dataset.img_dir)
    metrics = evaluate_detection(model, dataset, device, workers=args.workers,
                                 amp_dtype=torch.bfloat16 if args.amp else None, progress=not args.no_progress,
                                 results_file=args.results_file)
    rows = [{'': kind, **{n: round(100 * m[n], 1) for n in METRIC_NAMES}} for kind, m in metrics.items()]
    print(markdown_table(rows, [''] + list(METRIC_NAMES)))
    if args.classwise:
        import csv
        with open(args.classwise, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['class', 'bbox_AP', 'segm_AP'])
            for name in metrics['bbox']['per_class']:
                writer.writerow([name] + [round(100 * metrics[k]['per_class'].get(name, float('nan')), 1)
                                          for k in ('bbox', 'segm')])
    _logger.info('box AP %.1f  mask AP %.1f', 100 * metrics['bbox']['mAP'], 100 * metrics['segm']['mAP'])
    return 0


def train(args: argparse.Namespace) -> int:
    from models.detection import create_detector
    from utils.det_train import DetTrain
    if any(s < 0 for s in args.lr_steps):
        raise UsageError(f'--lr-steps {" ".join(map(str, args.lr_steps))}: steps are epochs (>= 0)')
    return train_main(args, create_detector, 'detection', DetTrain,
                      lambda run: f'{args.epochs} epochs of {run.batches_per_epoch} iterations')


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    if args.command != 'train':
        apply_na2d_backend(args.na2d_backend, args.device)
    return {'predict': predict, 'evaluate': evaluate, 'train': train}[args.command](args)


if __name__ == '__main__':
    run_cli(main)
