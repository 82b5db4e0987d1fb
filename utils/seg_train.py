"""Fine-tuning and evaluating UPerNet on ADE20K with the original release's recipe, on train.py's machinery
(torchrun, atomic checkpoints, exact resume, preemption).

The recipe (``segmentation/configs/overlock/upernet_overlock_*_ade20k_8xb2.py`` over mmseg 0.30): AdamW, lr
6e-5, betas (0.9, 0.999), weight decay 0.01 except for parameters whose name contains ``norm``; a poly schedule
(power 1, floor 0) over 160k iterations, its first 1,500 iterations warmed up linearly from 1e-6 of it; batch 2
per GPU on 8 GPUs; cross-entropy (pixels of the ignore index count as zero in the mean, as mmseg's default),
plus 0.4 x the auxiliary head's; SyncBN on GPUs. The training pipeline is :class:`utils.segmentation.TrainTransform`.
"""
import argparse
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_save, get_rng_state, set_rng_state, to_plain
from .cli import UsageError
from .data import EvalShardSampler, ResumableSampler, SeededSamples
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, any_true, barrier
from .fileio import atomic_write_text
from .segmentation import IGNORE_INDEX, ADE20KFolder, IoUAccumulator, TrainTransform, whole_inference
from .train_step import Preemption, autocast, close_loader, fmt_eta, worker_init

__all__ = ['poly_lr', 'param_groups', 'seg_loss', 'evaluate_segmentation', 'SegFineTune', 'SEG_CHECKPOINT_VERSION']

_logger = logging.getLogger('segment')

SEG_CHECKPOINT_VERSION = 1
LAST = 'last.pth'
BEST = 'best_miou.pth'


def poly_lr(base_lr: float, it: int, max_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
            power: float = 1.0, min_lr: float = 0.0) -> float:
    """The lr of iteration ``it`` (0-based) as mmcv's poly schedule with linear warm-up sets it: the poly lr,
    scaled during warm-up by a factor rising linearly from ``warmup_ratio`` to 1."""
    lr = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups as the recipe's ``paramwise_cfg`` makes them: no weight decay for parameters whose name
    contains ``norm`` (mmcv matches the key as a substring of the full name), the set decay for the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if 'norm' in name else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


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


class SegFineTune:
    """One fine-tuning run of a UPerNet on an ADE20K-layout folder (``python -m scripts.segment train``).

    Iteration-based, as the recipe: ``--max-iters`` updates of the global batch, the data in shuffled epochs
    (the sampler's position is saved, so a resumed run sees the images of the uninterrupted one). Checkpoints
    (``last.pth``, every ``--ckpt-interval`` updates and on SIGTERM / SIGUSR1) hold everything a resume needs;
    ``best_miou.pth`` keeps the best evaluation.

    Args:
        args: the parsed options of ``scripts.segment train``.
        info: process placement (:func:`utils.distributed.init_distributed`).
        model: the UPerNet to train (backbone weights already loaded).
    """

    def __init__(self, args: argparse.Namespace, info: DistInfo, model: nn.Module):
        self.args, self.info, self.device = args, info, info.device
        self.model = model.to(self.device)
        sync_bn = info.distributed and self.device.type == 'cuda'
        if sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if args.batch_size * (info.world_size if sync_bn else 1) < 2:
            raise UsageError(f'-b {args.batch_size}: the pyramid pooling\'s BatchNorm (on a 1x1 map) needs at least 2 '
                             f'images per batch (SyncBatchNorm on several GPUs counts all of them); use -b 2')
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=args.lr,
                                           betas=(0.9, 0.999))
        self.scaler = torch.amp.GradScaler(self.device.type) if args.amp and args.amp_dtype == 'float16' else None
        self.amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
        self.train_set = ADE20KFolder(args.data_dir, args.train_split,
                                      transform=TrainTransform(crop_size=(args.crop_size, args.crop_size)))
        self.val_set = ADE20KFolder(args.data_dir, args.val_split) if args.eval_interval else None
        self.sampler = ResumableSampler(len(self.train_set), info.world_size, info.rank, True, args.seed,
                                        sample_seeds=True)
        if self.sampler.per_replica < args.batch_size:
            raise UsageError(f'--data-dir {args.data_dir}: {len(self.train_set)} training images, fewer than one '
                             f'batch of {args.batch_size} per process; lower -b')
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            SeededSamples(self.train_set), batch_size=args.batch_size, sampler=self.sampler, num_workers=args.workers,
            drop_last=True, worker_init_fn=worker_init, generator=self.generator,
            pin_memory=self.device.type == 'cuda', persistent_workers=False)
        self.batches_per_epoch = self.sampler.per_replica // args.batch_size
        self.train_model = self.model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.iter, self.epoch, self.step = 0, 0, 0
        self.best: Optional[List[float]] = None  # [mIoU, iteration]
        self.history: List[Dict[str, float]] = []
        self.preemption = Preemption()

    # --- state ---------------------------------------------------------------------------------------------------

    def _state(self) -> Dict[str, Any]:
        """Everything a resume needs (all ranks call this: the RNG states are gathered)."""
        state = {
            'version': SEG_CHECKPOINT_VERSION, 'task': 'segmentation', 'arch': self.args.model,
            'iter': self.iter, 'epoch': self.epoch, 'step_in_epoch': self.step,
            'state_dict': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'args': to_plain(vars(self.args)), 'rng': all_gather_objects(get_rng_state(), self.info),
            'best': self.best, 'history': to_plain(self.history), 'world_size': self.info.world_size,
        }
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        return state

    def save(self, path: Optional[str] = None) -> None:
        state = self._state()
        if self.info.is_main:
            atomic_save(state, path or os.path.join(self.args.output, LAST))
        barrier(self.info)

    def restore(self, path: str) -> None:
        """Continue a run from its ``last.pth`` (exactly: same data order, random streams and schedule)."""
        from models import CheckpointError, read_checkpoint_file
        ckpt = read_checkpoint_file(path)
        if not isinstance(ckpt, dict) or ckpt.get('task') != 'segmentation' or 'optimizer' not in ckpt:
            raise CheckpointError(f'checkpoint {path} is not a training checkpoint of scripts.segment train; '
                                  f'a released model or weights start a new run with --finetune {path}')
        if ckpt.get('arch') != self.args.model:
            raise CheckpointError(f'checkpoint {path} trains {ckpt.get("arch")}, not {self.args.model}; pass '
                                  f'--model {ckpt.get("arch")}')
        try:
            self.model.load_state_dict(ckpt['state_dict'])
        except RuntimeError as e:
            raise CheckpointError(f'checkpoint {path} does not fit the model ({str(e).splitlines()[0]})') from None
        self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        self.iter, self.epoch, self.step = int(ckpt['iter']), int(ckpt['epoch']), int(ckpt['step_in_epoch'])
        self.best, self.history = ckpt.get('best'), list(ckpt.get('history') or [])
        states = ckpt.get('rng') or []
        if len(states) == self.info.world_size and int(ckpt.get('world_size', 1)) == self.info.world_size:
            set_rng_state(states[self.info.rank])
        else:
            _logger.warning('checkpoint from %d processes, now %d: the data order and random streams restart '
                            'from --seed at iteration %d', int(ckpt.get('world_size', 1)), self.info.world_size,
                            self.iter)
            self.step = 0
        _logger.info('Resumed %s at iteration %d of %d', path, self.iter, self.args.max_iters)

    # --- training ------------------------------------------------------------------------------------------------

    def _set_lr(self) -> float:
        a = self.args
        lr = poly_lr(a.lr, self.iter, a.max_iters, a.warmup_iters)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        return lr

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.amp_dtype is not None, self.device, self.amp_dtype or torch.float32):
            loss = seg_loss(self.train_model(x), y, self.args.aux_loss_weight)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def evaluate(self) -> Dict[str, float]:
        acc = evaluate_segmentation(self.model, self.val_set, self.device, self.args.num_classes, self.info,
                                    workers=self.args.workers, amp_dtype=self.amp_dtype)
        self.model.train()
        return acc.summary()

    def _after_update(self, loss_sum: torch.Tensor, count: int, t0: float) -> bool:
        """Log, checkpoint and evaluate after an update; returns whether the run stops (preemption)."""
        a, info = self.args, self.info
        if self.iter % a.log_interval == 0 or self.iter == a.max_iters:
            loss = float(all_reduce_sum(loss_sum.clone(), info)) / max(1, count * info.world_size)
            elapsed = time.time() - t0
            eta = (a.max_iters - self.iter) * elapsed / max(1, count)
            if info.is_main:
                _logger.info('Iter %d/%d  loss %.4f  lr %.3e  %.2f s/iter  ETA %s', self.iter, a.max_iters, loss,
                             self.optimizer.param_groups[0]['lr'], elapsed / max(1, count), fmt_eta(eta))
            return True  # the caller resets its window
        return False

    def run(self) -> int:
        self.model.train()
        self.preemption.install()
        try:
            return self._loop()
        finally:
            self.preemption.restore()

    def _loop(self) -> int:
        a, info = self.args, self.info
        window = torch.zeros((), dtype=torch.float64, device=self.device)
        count, t0 = 0, time.time()
        while self.iter < a.max_iters:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.step * a.batch_size)
            self.generator.manual_seed(a.seed * 1000003 + self.epoch * 1009 + info.rank)
            batches = iter(self.loader)
            try:
                for x, y in batches:
                    self._set_lr()
                    window += self._update(x.to(self.device, non_blocking=True),
                                           y.to(self.device, non_blocking=True)).double()
                    self.iter, self.step, count = self.iter + 1, self.step + 1, count + 1
                    if self._after_update(window, count, t0):
                        window.zero_()
                        count, t0 = 0, time.time()
                    if self.iter % a.ckpt_interval == 0 or self.iter == a.max_iters:
                        self.save()
                    if a.eval_interval and (self.iter % a.eval_interval == 0 or self.iter == a.max_iters):
                        self._evaluate_and_rank()
                    if self.iter == a.max_iters:
                        break
                    if any_true(self.preemption.requested, info):
                        self.save()
                        _logger.info('Preempted (%s) at iteration %d: saved %s; continue with --resume %s',
                                     self.preemption.name, self.iter, os.path.join(a.output, LAST),
                                     os.path.join(a.output, LAST))
                        return 0
            finally:
                close_loader(batches)
            if self.iter < a.max_iters:
                self.epoch, self.step = self.epoch + 1, 0
        if self.best is not None and info.is_main:
            _logger.info('Done. Best mIoU %.2f at iteration %d (%s)', self.best[0], int(self.best[1]),
                         os.path.join(a.output, BEST))
        return 0

    def _evaluate_and_rank(self) -> None:
        a, info = self.args, self.info
        metrics = self.evaluate()
        self.history.append({'iter': self.iter, **metrics})
        if info.is_main:
            _logger.info('Iter %d: mIoU %.2f  mAcc %.2f  aAcc %.2f', self.iter, metrics['mIoU'], metrics['mAcc'],
                         metrics['aAcc'])
            lines = ['iter,mIoU,mAcc,aAcc'] + [f'{int(r["iter"])},{r["mIoU"]:.4f},{r["mAcc"]:.4f},{r["aAcc"]:.4f}'
                                               for r in self.history]
            atomic_write_text('\n'.join(lines) + '\n', os.path.join(a.output, 'eval.csv'))
        if math.isfinite(metrics['mIoU']) and (self.best is None or metrics['mIoU'] > self.best[0]):
            self.best = [metrics['mIoU'], self.iter]
            self.save(os.path.join(a.output, BEST))
        self.save()  # last.pth holds the updated history and best
