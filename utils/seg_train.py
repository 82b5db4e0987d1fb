"""Fine-tuning and evaluating UPerNet on ADE20K with the original release's recipe, on the dense fine-tuning
loop (:mod:`utils.dense_train`: torchrun, atomic checkpoints, exact resume, preemption).

The recipe (``segmentation/configs/overlock/upernet_overlock_*_ade20k_8xb2.py`` over mmseg 0.30): AdamW, lr
6e-5, betas (0.9, 0.999), weight decay 0.01 except for parameters whose name contains ``norm``; a poly schedule
(power 1, floor 0) over 160k iterations, its first 1,500 iterations warmed up linearly from 1e-6 of it; batch 2
per GPU on 8 GPUs; cross-entropy (pixels of the ignore index count as zero in the mean, as mmseg's default),
plus 0.4 x the auxiliary head's; SyncBN on GPUs. The training pipeline is :class:`utils.segmentation.TrainTransform`.
"""
import argparse
import logging
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError
from .data import EvalShardSampler
from .dense_train import LAST, DenseTrainer, param_groups
from .distributed import DistInfo, all_reduce_sum
from .segmentation import IGNORE_INDEX, ADE20KFolder, IoUAccumulator, TrainTransform, whole_inference
from .train_step import autocast, close_loader

__all__ = ['poly_lr', 'param_groups', 'seg_loss', 'evaluate_segmentation', 'SegFineTune', 'LAST', 'BEST']

_logger = logging.getLogger('segment')

BEST = 'best_miou.pth'


def poly_lr(base_lr: float, it: int, max_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
            power: float = 1.0, min_lr: float = 0.0) -> float:
    """The lr of iteration ``it`` (0-based) as mmcv's poly schedule with linear warm-up sets it: the poly lr,
    scaled during warm-up by a factor rising linearly from ``warmup_ratio`` to 1."""
    lr = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


def seg_loss(output, target: torch.Tensor, aux_weight: float = 0.4) -> torch.Tensor:
    """mmseg's decode loss: logits resized to the labels (bilinear), per-pixel cross-entropy with ignored pixels
    contributing zero, averaged over all pixels; plus ``aux_weight`` x the auxiliary head's."""
    def ce(logits: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=target.shape[-2:], mode='bilinear', align_corners=False)
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction='none').mean()
    if isinstance(output, dict):
        return ce(output['main']) + aux_weight * ce(output['aux'])
    return ce(output)


def _eval_collate(batch):
    return batch[0]  # one image at a time: sizes differ


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: ADE20KFolder, device: torch.device, num_classes: int,
                          info: Optional[DistInfo] = None, workers: int = 2, amp_dtype: Optional[torch.dtype] = None,
                          progress: bool = False, on_prediction=None) -> IoUAccumulator:
    """The original's single-scale whole-image evaluation over ``dataset`` (each process a shard, the counts
    summed): returns the accumulated intersections and unions. ``on_prediction(index, pred)`` sees each
    prediction (e.g. to save it)."""
    from tqdm import tqdm
    info = info or DistInfo()
    model.eval()
    sampler = EvalShardSampler(len(dataset), info.world_size, info.rank)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers,
                                         collate_fn=_eval_collate)
    acc = IoUAccumulator(num_classes)
    batches = iter(loader)
    try:
        for x, label, size, index in tqdm(batches, total=len(sampler), disable=not progress, desc='mIoU',
                                          dynamic_ncols=True, leave=False):
            with autocast(amp_dtype is not None, device, amp_dtype or torch.float32):
                logits = whole_inference(model, x[None].to(device), size)
            pred = logits.float().argmax(1)[0].cpu().numpy()
            acc.add(pred, label.numpy())
            if on_prediction is not None:
                on_prediction(index, pred)
    finally:
        close_loader(batches)
    if info.distributed:
        counts = torch.from_numpy(np.stack([acc.intersect, acc.pred, acc.label])).to(device)
        all_reduce_sum(counts, info)
        acc.intersect, acc.pred, acc.label = (c.cpu().numpy() for c in counts)
    return acc


class SegFineTune(DenseTrainer):
    """One fine-tuning run of a UPerNet on an ADE20K-layout folder (``python -m scripts.segment train``).

    Iteration-based, as the recipe: ``--max-iters`` updates of the global batch, the poly schedule; ``last.pth``
    every ``--ckpt-interval`` updates and on SIGTERM / SIGUSR1, ``best_miou.pth`` the best evaluation.

    Args:
        args: the parsed options of ``scripts.segment train``.
        info: process placement (:func:`utils.distributed.init_distributed`).
        model: the UPerNet to train (backbone weights already loaded).
    """

    task = 'segmentation'
    metric = 'mIoU'
    best_name = BEST

    def __init__(self, args: argparse.Namespace, info: DistInfo, model: nn.Module):
        sync_bn = info.distributed and info.device.type == 'cuda'
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if args.batch_size * (info.world_size if sync_bn else 1) < 2:
            raise UsageError(f'-b {args.batch_size}: the pyramid pooling\'s BatchNorm (on a 1x1 map) needs at least 2 '
                             f'images per batch (SyncBatchNorm on several GPUs counts all of them); use -b 2')
        train_set = ADE20KFolder(args.data_dir, args.train_split,
                                 transform=TrainTransform(crop_size=(args.crop_size, args.crop_size)))
        super().__init__(args, info, model, train_set, args.max_iters, args.ckpt_interval, args.eval_interval)
        self.val_set = ADE20KFolder(args.data_dir, args.val_split) if args.eval_interval else None

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return seg_loss(self.train_model(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True),
                        self.args.aux_loss_weight)

    def lr_at(self, it: int) -> float:
        return poly_lr(self.args.lr, it, self.max_iters, self.args.warmup_iters)

    def evaluate(self) -> Dict[str, float]:
        acc = evaluate_segmentation(self.model, self.val_set, self.device, self.args.num_classes, self.info,
                                    workers=self.args.workers, amp_dtype=self.amp_dtype)
        summary = acc.summary()
        return {k: summary[k] for k in ('mIoU', 'mAcc', 'aAcc')}
