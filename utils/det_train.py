"""Training and evaluating Mask R-CNN on COCO with the original release's 1x recipe, on the dense fine-tuning
loop (:mod:`utils.dense_train`: torchrun, atomic checkpoints, exact resume, preemption).

The recipe (``detection/configs/maskrcnn_overlock/mask_rcnn_overlock_*_in1k_fpn_1x_coco.py`` over mmdet 2.28):
AdamW, lr 2e-4, betas (0.9, 0.999), weight decay 0.05 except for parameters whose name contains ``norm``;
12 epochs, the lr divided by 10 after epochs 8 and 11, the first 500 iterations warmed up linearly from 0.001
of it; batch 2 per GPU on 8 GPUs, each batch of images of one aspect group (wider than high, or not); the
pipeline of :class:`utils.detection.TrainTransform`. The losses are torchvision's (docs/detection.md lists how
they differ from mmdet's).
"""
import argparse
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .cli import UsageError
from .data import EvalShardSampler
from .dense_train import DenseTrainer
from .detection import COCOFolder, TrainTransform, coco_evaluate, collate_test, collate_train, to_coco_json
from .distributed import DistInfo, all_gather_objects
from .train_step import autocast, close_loader

__all__ = ['step_lr', 'run_detection', 'evaluate_detection', 'DetTrain', 'BEST']

_logger = logging.getLogger('detect')

BEST = 'best_bbox_mAP.pth'


def step_lr(base_lr: float, it: int, epoch: int, steps: Sequence[int] = (8, 11), warmup_iters: int = 500,
            warmup_ratio: float = 0.001, gamma: float = 0.1) -> float:
    """The lr of iteration ``it`` (0-based, in epoch ``epoch``, 0-based) as mmcv's step schedule with linear
    warm-up sets it: ``base_lr`` times ``gamma`` per step epoch reached, scaled during warm-up by a factor rising
    linearly from ``warmup_ratio`` to 1."""
    lr = base_lr * gamma ** sum(epoch >= s for s in steps)
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


@torch.no_grad()
def run_detection(model: nn.Module, dataset: COCOFolder, device: torch.device, info: Optional[DistInfo] = None,
                  workers: int = 2, amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
                  on_result=None) -> Dict[str, List[Dict[str, Any]]]:
    """Run the detector over ``dataset`` one image at a time, as mmdet tests (each process a shard). Returns
    this process's COCO result entries ``{'bbox': [...], 'segm': [...]}``; ``on_result(index, result)`` sees
    each image's detections (e.g. to draw them)."""
    from tqdm import tqdm
    info = info or DistInfo()
    model.eval()
    sampler = EvalShardSampler(len(dataset), info.world_size, info.rank)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers,
                                         collate_fn=collate_test)
    entries: Dict[str, List[Dict[str, Any]]] = {'bbox': [], 'segm': []}
    batches = iter(loader)
    try:
        for x, metas, indices in tqdm(batches, total=len(sampler), disable=not progress, desc='COCO',
                                      dynamic_ncols=True, leave=False):
            with autocast(amp_dtype is not None, device, amp_dtype or torch.float32):
                result = model(x.to(device), metas)[0]
            bbox, segm = to_coco_json(result, dataset.img_ids[indices[0]], dataset.cat_ids)
            entries['bbox'] += bbox
            entries['segm'] += segm
            if on_result is not None:
                on_result(indices[0], result)
    finally:
        close_loader(batches)
    return entries


def evaluate_detection(model: nn.Module, dataset: COCOFolder, device: torch.device, info: Optional[DistInfo] = None,
                       workers: int = 2, amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
                       results_file: str = '') -> Dict[str, Dict[str, Any]]:
    """COCO box and mask AP of ``model`` on ``dataset`` (:func:`utils.detection.coco_evaluate`), the images
    sharded over the processes, the AP computed once and given to all. ``results_file``: also write the result
    entries (``<file>.bbox.json``, ``<file>.segm.json``, as mmdet's ``--format-only``)."""
    import json
    from .fileio import atomic_write_text
    info = info or DistInfo()
    local = run_detection(model, dataset, device, info, workers, amp_dtype, progress)
    if info.distributed:
        parts = all_gather_objects(local, info)
        local = {k: [e for p in parts for e in p[k]] for k in local}
    metrics = None
    if info.is_main:
        if results_file:
            for kind, entries in local.items():
                atomic_write_text(json.dumps(entries), f'{results_file}.{kind}.json')
        metrics = coco_evaluate(dataset.coco, local, dataset.img_ids, dataset.cat_ids)
    if info.distributed:
        metrics = all_gather_objects(metrics, info)[0]
    return metrics


class DetTrain(DenseTrainer):
    """One training run of a Mask R-CNN on a COCO-layout folder (``python -m scripts.detect train``).

    Epoch-based, as the recipe: ``--epochs`` passes over the training images (batches of one aspect group),
    the step schedule with warm-up by iteration; ``last.pth`` after every epoch (or every ``--ckpt-interval``
    iterations), at the end and on SIGTERM / SIGUSR1; an evaluation every ``--eval-interval`` epochs, the best
    box AP in ``best_bbox_mAP.pth``.

    Args:
        args: the parsed options of ``scripts.detect train``.
        info: process placement (:func:`utils.distributed.init_distributed`).
        model: the Mask R-CNN to train (backbone weights already loaded).
    """

    task = 'detection'
    metric = 'bbox_mAP'
    best_name = BEST

    def __init__(self, args: argparse.Namespace, info: DistInfo, model: nn.Module):
        train_set = COCOFolder(args.data_dir, args.train_split, transform=TrainTransform(tuple(args.img_scale)))
        if len(train_set.cat_ids) != model.num_classes:
            raise UsageError(f'{train_set.ann_file} has {len(train_set.cat_ids)} categories but the model '
                             f'{model.num_classes} classes; pass --num-classes {len(train_set.cat_ids)}')
        groups = train_set.aspect_groups()
        # one epoch's batches per process, as the sampler will deal them (each group cut into batches)
        batches = sum(-(-groups.count(g) // args.batch_size) for g in set(groups))
        per_epoch = -(-batches // info.world_size)
        super().__init__(args, info, model, train_set, args.epochs * per_epoch, args.ckpt_interval or per_epoch,
                         args.eval_interval * per_epoch, collate_fn=collate_train, groups=groups)
        self.val_set = COCOFolder(args.data_dir, args.val_split, scale=tuple(args.img_scale)) \
            if args.eval_interval else None

    def loss(self, batch) -> torch.Tensor:
        images, targets, sizes = batch
        from models.detection import ImageMeta
        metas = [ImageMeta(tuple(s), tuple(s)) for s in sizes]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = self.train_model(images.to(self.device, non_blocking=True), metas, targets)
        return sum(losses.values())

    def lr_at(self, it: int) -> float:
        return step_lr(self.args.lr, it, it // self.batches_per_epoch, self.args.lr_steps, self.args.warmup_iters)

    def evaluate(self) -> Dict[str, float]:
        metrics = evaluate_detection(self.model, self.val_set, self.device, self.info, workers=self.args.workers,
                                     amp_dtype=self.amp_dtype)
        return {f'{kind}_{name}': 100 * m[name] for kind, m in metrics.items() for name in ('mAP', 'mAP_50', 'mAP_75')}

    def format_metrics(self, metrics: Dict[str, float]) -> str:
        return '  '.join(f'{k} {v:.1f}' for k, v in metrics.items())
