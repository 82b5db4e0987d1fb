"""The fine-tuning loop shared by the dense-prediction recipes (``scripts.segment train``, ``scripts.detect
train``) on train.py's machinery: torchrun, atomic checkpoints, exact resume, preemption.

A run counts updates of the global batch; the data comes in shuffled epochs whose position is saved, so a
resumed run sees the samples of the uninterrupted one with the same augmentation (each sample seeded by its
place in the epoch). A subclass says what a batch's loss is, what the learning rate of an update is and how to
evaluate.
"""
import argparse
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .checkpoint import atomic_save, get_rng_state, set_rng_state, to_plain
from .cli import UsageError
from .data import ResumableSampler, SeededSamples
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, any_true, barrier, distribute_bn_stats
from .fileio import atomic_write_text
from .train_step import Preemption, autocast, close_loader, fmt_eta, worker_init

__all__ = ['param_groups', 'DenseTrainer', 'LAST']

LAST = 'last.pth'
CHECKPOINT_VERSION = 1


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups as the dense recipes' ``paramwise_cfg`` makes them: no weight decay for parameters whose name
    contains ``norm`` (mmcv matches the key as a substring of the full name), the set decay for the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if 'norm' in name else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


class DenseTrainer:
    """One fine-tuning run of a dense model (see the module's docstring).

    A subclass sets ``task`` (recorded in checkpoints; a resume checks it), ``metric`` (the evaluation's key that
    ranks checkpoints into ``best_name``) and implements :meth:`loss`, :meth:`lr_at` and :meth:`evaluate`.

    Args:
        args: the parsed options (``output``, ``model``, ``batch_size``, ``workers``, ``seed``, ``lr``,
            ``weight_decay``, ``amp``, ``amp_dtype``, ``log_interval``).
        info: process placement (:func:`utils.distributed.init_distributed`).
        model: the model to train (starting weights already loaded; on the CPU or its device).
        train_set: the training dataset (map-style).
        max_iters: updates of the run.
        ckpt_every / eval_every: write ``last.pth`` / evaluate every so many updates (and at the end; 0: never).
        collate_fn: the loader's collate function.
        groups: group id of every sample (a batch takes samples of one group; :class:`ResumableSampler`).
    """

    task = ''
    metric = ''
    best_name = ''

    def __init__(self, args: argparse.Namespace, info: DistInfo, model: nn.Module, train_set, max_iters: int,
                 ckpt_every: int, eval_every: int, collate_fn: Optional[Callable] = None,
                 groups: Optional[List[int]] = None):
        self.args, self.info, self.device = args, info, info.device
        self.model = model.to(self.device)
        self.max_iters, self.ckpt_every, self.eval_every = max_iters, ckpt_every, eval_every
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=args.lr,
                                           betas=(0.9, 0.999))
        self.scaler = torch.amp.GradScaler(self.device.type) if args.amp and args.amp_dtype == 'float16' else None
        self.amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
        self.train_set = train_set
        self.sampler = ResumableSampler(len(train_set), info.world_size, info.rank, True, args.seed,
                                        sample_seeds=True, groups=groups, batch_size=args.batch_size)
        if self.sampler.per_replica < args.batch_size:
            raise UsageError(f'--data-dir {args.data_dir}: {len(train_set)} training samples, fewer than one '
                             f'batch of {args.batch_size} per process; lower -b')
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            SeededSamples(train_set), batch_size=args.batch_size, sampler=self.sampler, num_workers=args.workers,
            drop_last=True, worker_init_fn=worker_init, generator=self.generator, collate_fn=collate_fn,
            pin_memory=self.device.type == 'cuda', persistent_workers=False)
        self.batches_per_epoch = self.sampler.per_replica // args.batch_size
        self.train_model = self.model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.iter, self.epoch, self.step = 0, 0, 0
        self.best: Optional[List[float]] = None  # [metric, iteration]
        self.history: List[Dict[str, float]] = []
        self.preemption = Preemption()
        self.logger = logging.getLogger(self.task or 'dense')

    # --- what a subclass says ------------------------------------------------------------------------------------

    def loss(self, batch) -> torch.Tensor:
        """The loss of one batch (from the loader) through ``self.train_model``."""
        raise NotImplementedError

    def lr_at(self, it: int) -> float:
        """The learning rate of update ``it`` (0-based)."""
        raise NotImplementedError

    def evaluate(self) -> Dict[str, float]:
        """Evaluate ``self.model`` (all processes take part); returns the metrics, ``self.metric`` among them."""
        raise NotImplementedError

    def format_metrics(self, metrics: Dict[str, float]) -> str:
        return '  '.join(f'{k} {v:.2f}' for k, v in metrics.items())

    # --- state ---------------------------------------------------------------------------------------------------

    def _state(self) -> Dict[str, Any]:
        """Everything a resume needs (all ranks call this: the RNG states are gathered)."""
        state = {
            'version': CHECKPOINT_VERSION, 'task': self.task, 'arch': self.args.model,
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
        if not isinstance(ckpt, dict) or ckpt.get('task') != self.task or 'optimizer' not in ckpt:
            raise CheckpointError(f'checkpoint {path} is not a training checkpoint of {self.task}; a released model '
                                  f'or weights start a new run with --finetune {path}')
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
            self.logger.warning('checkpoint from %d processes, now %d: the data order and random streams restart '
                                'from --seed at iteration %d', int(ckpt.get('world_size', 1)), self.info.world_size,
                                self.iter)
            self.step = 0
        self.logger.info('Resumed %s at iteration %d of %d', path, self.iter, self.max_iters)

    # --- training ------------------------------------------------------------------------------------------------

    def _update(self, batch) -> torch.Tensor:
        lr = self.lr_at(self.iter)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        with autocast(self.amp_dtype is not None, self.device, self.amp_dtype or torch.float32):
            loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def _after_update(self, loss_sum: torch.Tensor, count: int, t0: float) -> bool:
        """Log after an update; returns whether the caller resets its window."""
        a, info = self.args, self.info
        if self.iter % a.log_interval == 0 or self.iter == self.max_iters:
            loss = float(all_reduce_sum(loss_sum.clone(), info)) / max(1, count * info.world_size)
            elapsed = time.time() - t0
            eta = (self.max_iters - self.iter) * elapsed / max(1, count)
            if info.is_main:
                self.logger.info('Iter %d/%d  epoch %d  loss %.4f  lr %.3e  %.2f s/iter  ETA %s', self.iter,
                                 self.max_iters, self.epoch + 1, loss, self.optimizer.param_groups[0]['lr'],
                                 elapsed / max(1, count), fmt_eta(eta))
            return True
        return False

    def run(self) -> int:
        self.model.train()
        self.preemption.install()
        try:
            return self._loop()
        finally:
            self.preemption.restore()

    def _due(self, every: int) -> bool:
        return bool(every) and (self.iter % every == 0 or self.iter == self.max_iters)

    def _loop(self) -> int:
        a, info = self.args, self.info
        window = torch.zeros((), dtype=torch.float64, device=self.device)
        count, t0 = 0, time.time()
        while self.iter < self.max_iters:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.step * a.batch_size)
            self.generator.manual_seed(a.seed * 1000003 + self.epoch * 1009 + info.rank)
            batches = iter(self.loader)
            try:
                for batch in batches:
                    window += self._update(batch).double()
                    self.iter, self.step, count = self.iter + 1, self.step + 1, count + 1
                    if self._after_update(window, count, t0):
                        window.zero_()
                        count, t0 = 0, time.time()
                    if self._due(self.ckpt_every) or self.iter == self.max_iters:
                        self.save()
                    if self._due(self.eval_every):
                        self._evaluate_and_rank()
                    if self.iter == self.max_iters:
                        break
                    if any_true(self.preemption.requested, info):
                        self.save()
                        last = os.path.join(a.output, LAST)
                        self.logger.info('Preempted (%s) at iteration %d: saved %s; continue with --resume %s',
                                         self.preemption.name, self.iter, last, last)
                        return 0
            finally:
                close_loader(batches)
            if self.iter < self.max_iters:
                self.epoch, self.step = self.epoch + 1, 0
        if self.best is not None and info.is_main:
            self.logger.info('Done. Best %s %.2f at iteration %d (%s)', self.metric, self.best[0], int(self.best[1]),
                             os.path.join(a.output, self.best_name))
        return 0

    def _evaluate_and_rank(self) -> None:
        # Each process's BatchNorm statistics have moved with its own last batch; evaluate everywhere with rank
        # 0's (the ones saved), as mmcv's distributed evaluation hook does.
        distribute_bn_stats([self.model], self.info, 'broadcast')
        metrics = self.evaluate()
        self.model.train()
        self.history.append({'iter': self.iter, **metrics})
        if self.info.is_main:
            self.logger.info('Iter %d: %s', self.iter, self.format_metrics(metrics))
            keys = list(metrics)
            lines = [','.join(['iter'] + keys)] + [
                ','.join([str(int(r['iter']))] + [f'{r.get(k, float("nan")):.4f}' for k in keys]) for r in self.history]
            atomic_write_text('\n'.join(lines) + '\n', os.path.join(self.args.output, 'eval.csv'))
        value = metrics[self.metric]
        if math.isfinite(value) and (self.best is None or value > self.best[0]):
            self.best = [value, self.iter]
            self.save(os.path.join(self.args.output, self.best_name))
        self.save()  # last.pth holds the updated history and best
