"""The training run behind train.py: epochs, evaluation, outputs, preemption and resume.

The loop is timm's recipe (timm data transforms, Mixup/CutMix, soft-target CE, optimizer and scheduler
factories, the original's model EMA) written lean, with what long ImageNet runs need on top: resume that
reproduces the uninterrupted run (RNG states of every process, sampler position within the epoch), atomic
checkpoints, a preemption handler (SIGTERM / SIGUSR1) and a guard against non-finite losses.

The pieces live beside this file: ``train_setup`` builds (data, model, optimizer, loaders, loss, schedule),
``train_step`` holds the parts of a step, ``checkpoint`` the training state and its restoration.
"""
import argparse
import contextlib
import csv
import io
import itertools
import logging
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    CheckpointSaver, ResumePoint, atomic_write_text, get_rng_state, restore_training_state, set_rng_state, to_plain,
    training_state,
)
from .cli import apply_na2d_backend, parse_args_with_config
from .config import args_to_yaml, build_train_parser, check_train_args
from .distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, any_true, barrier, cleanup, distribute_bn_stats, init_distributed,
    launched_by_torchrun,
)
from .evaluate import MirrorTTA, evaluate
from .measure.dtypes import parse_dtype
from . import train_setup as setup
from .train_step import (
    NonFiniteGuard, NonFiniteLoss, Preemption, ProgressLog, accumulation_group, autocast, close_loader,
    compute_loss, die_with_parent, forward_backward, optimizer_step,
)

__all__ = ['main', 'Trainer', 'NonFiniteLoss', 'EXIT_NONFINITE', 'SUMMARY_COLUMNS']

_logger = logging.getLogger('train')

EXIT_NONFINITE = 3
SUMMARY_COLUMNS = ('epoch', 'train_loss', 'train_loss_aux', 'eval_loss', 'eval_top1', 'eval_top5')
def _fmt(value: Optional[float]) -> str:
    return '' if value is None else f'{value:.6g}'


class Trainer:
    """One training run (see :func:`main`).

    Args:
        args: parsed and checked options of train.py.
        info: process placement from :func:`init_distributed`.
    """

    def __init__(self, args: argparse.Namespace, info: DistInfo, notes: Optional[List[str]] = None):
        self.args = args
        self.info = info
        self.device = info.device
        self.notes = list(notes or [])  # lines for the log once it is set up (options taken otherwise, no effect)
        self.experiment = args.experiment  # the W&B project (resolve_output folds it into --output)
        self.preemption = Preemption(args.stop_timeout)
        self.resume = ResumePoint()
        self.global_step = 0  # optimizer updates done (skipped non-finite updates included)
        self.summary: List[Dict[str, Optional[float]]] = []
        self.wandb = None

    # --- setup ---------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build everything; whatever can reject the input comes before the output folder is touched."""
        args, info = self.args, self.info
        self.train_set, self.val_set = setup.build_datasets(args)
        self.global_batch = setup.resolve_batch(args, info, self.train_set)
        self.model, self.data_config = setup.build_model(args, info)
        self.ema = setup.build_ema(args, self.model)
        self.amp_dtype = parse_dtype(args.amp_dtype)
        self.scaler = setup.build_scaler(args, self.device)
        self.optimizer = setup.build_optimizer(args, self.model)
        self.loaders = setup.build_loaders(args, info, self.train_set, self.val_set, self.data_config)
        self.mixup, self.criterion = setup.build_loss(args)
        self.prepare_train, self.prepare_eval = setup.build_device_augment(args, self.data_config, self.device,
                                                                           self.mixup)
        self.scheduler, self.num_epochs = setup.build_scheduler(args, self.optimizer, self.loaders.updates_per_epoch)
        setup.resolve_output(args, info)
        setup.setup_logging(info, os.path.join(args.output, 'log.txt'))
        if info.is_main:
            for line in self.notes:
                _logger.info(line)
        if args.resume:
            self.resume = restore_training_state(
                args.resume, args, model=self.model, optimizer=None if args.no_resume_opt else self.optimizer,
                scheduler=self.scheduler, ema=self.ema, scaler=None if args.no_resume_opt else self.scaler,
                world_size=info.world_size, batches_per_epoch=self.loaders.batches_per_epoch,
                updates_per_epoch=self.loaders.updates_per_epoch)
            self.global_step = self.resume.global_step
            self.summary = self.resume.summary
        if args.start_epoch is not None:
            self._start_at(args.start_epoch)
        if info.is_main:
            saved = {k: v for k, v in to_plain(vars(args)).items() if k != 'config'}
            atomic_write_text(args_to_yaml(saved), os.path.join(args.output, 'args.yaml'))
            if args.log_wandb:
                self.wandb = _start_wandb(self.experiment, saved, args.output)
        self.saver = CheckpointSaver(args.output, args.checkpoint_hist, self.resume.best_k, ema=self.ema is not None,
                                     best_k_ema=self.resume.best_k_ema, decreasing=args.eval_metric == 'loss')
        self.guard = NonFiniteGuard(info, self.loaders.batches_per_epoch, args.output,
                                    tolerate=self.scaler is not None or args.skip_nonfinite, limit=args.nonfinite_limit)
        self.guard.skipped = self.resume.nonfinite_skipped

        # Position the schedule where the (resumed) run stands; a no-op at the start of a fresh run.
        if self.resume.epoch > 0 or self.resume.step > 0:
            self.scheduler.step(self.resume.epoch)
            if args.sched_on_updates:
                self.scheduler.step_update(num_updates=self.global_step)
        setup.prepare_kernel_cache(args, info, self.model, self.data_config, self.amp_dtype if args.amp else None)
        self.train_model, self.eval_model, self.ddp_model = setup.wrap_model(args, info, self.model)

    def _start_at(self, epoch: int) -> None:
        """``--start-epoch``: continue (or start) at the beginning of ``epoch`` (0-based), whatever a resumed
        checkpoint says, with the schedule and the update count of that epoch (as the original)."""
        if (epoch, 0) != (self.resume.epoch, self.resume.step):
            _logger.info('--start-epoch %d: training starts at epoch %d%s', epoch, epoch + 1,
                         f' (the checkpoint had {self.resume.epoch} done)' if self.args.resume else '')
        self.resume.epoch, self.resume.step = epoch, 0
        self.resume.epoch_stats = self.resume.rank_bn = None
        self.global_step = epoch * self.loaders.updates_per_epoch
        self.summary = [r for r in self.summary if int(r['epoch']) <= epoch]

    def _restore_rng(self) -> None:
        """RNG states last: everything built before (model init, EMA copy) drew random numbers in the original
        run too."""
        states, info = self.resume.rng, self.info
        if states is None:
            return
        if len(states) == info.world_size:
            set_rng_state(states[info.rank])
        else:
            _logger.warning('checkpoint from %d processes, now %d: random streams restart from --seed',
                            len(states), info.world_size)
            setup.seed_all(self.args.seed + info.rank + 7919 * self.resume.epoch)

    # --- one epoch -----------------------------------------------------------------------------------------

    def _amp(self):
        return autocast(self.args.amp, self.device, self.amp_dtype)

    def _loss(self, output, target: torch.Tensor):
        return compute_loss(self.criterion, output, target, self.args.aux_loss_ratio)

    def train_one_epoch(self, epoch: int) -> Optional[Dict[str, float]]:
        """Train epoch ``epoch`` (0-based). Returns its stats, or None when stopped for preemption."""
        args, info = self.args, self.info
        self.train_model.train()
        if self.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        start = self.resume.step if epoch == self.resume.epoch else 0
        self.loaders.set_epoch(epoch, start * args.batch_size)
        self.loaders.generator.manual_seed(args.seed * 1000003 + epoch * 1009 + info.rank)
        # loss_sum, aux_sum, batches (restored for a run resumed mid-epoch so the epoch means stay exact)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        saved = self.resume.epoch_stats
        if saved and isinstance(saved[0], (list, tuple)):  # one row per rank
            saved = saved[info.rank] if len(saved) == info.world_size else None
        if start and saved:
            stats += torch.tensor(saved, dtype=torch.float64, device=self.device)
        t_epoch = time.time()
        batches = loader_iter = iter(self.loaders.train)
        if self.loaders.streamed:
            if start:
                _logger.info('Streamed dataset: epoch %d restarts its shard stream (shard order of this epoch) and '
                             'trains its remaining %d of %d batches; model, optimizer, schedule and step count are '
                             'restored exactly, the images of the batches done before are not skipped',
                             epoch + 1, self.loaders.batches_per_epoch - start, self.loaders.batches_per_epoch)
            batches = itertools.islice(batches, self.loaders.batches_per_epoch - start)
        finished = False
        try:
            result = self._train_batches(epoch, start, batches, stats)
            finished = result is not None
        finally:
            if not (finished and self.loaders.persistent):  # persistent workers serve the next epoch too
                close_loader(loader_iter)
        if result is not None:
            result['epoch_time'] = time.time() - t_epoch
        return result

    def _skip_update(self, group: List[torch.Tensor], epoch: int, i: int) -> bool:
        """With --skip-nonfinite: whether this update's losses are non-finite on any process (one sync)."""
        if not self.args.skip_nonfinite:
            return False
        values = torch.stack([g.float() for g in group])
        skip = any_true(not bool(torch.isfinite(values).all()), self.info)
        if skip:
            _logger.warning('epoch %d step %d: non-finite loss, optimizer step skipped (%d so far)',
                            epoch + 1, i + 1, self.guard.skipped + 1)
            self.guard.skipped_now(epoch, i)
        return skip

    def _update(self, skip: bool) -> None:
        """The optimizer update (or its skip), the EMA and the per-update schedule."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step(self.optimizer, self.model.parameters, self.scaler, self.args.clip_grad,
                           self.args.clip_mode)
            if self.ema is not None:
                # The set decay from the first update (the original's ModelEmaV2); the step only drives
                # --model-ema-warmup.
                self.ema.update(self.model, step=self.global_step + 1 if self.args.model_ema_warmup else None)
        self.global_step += 1
        if self.args.sched_on_updates:
            self.scheduler.step_update(num_updates=self.global_step)

    def _record(self, group: List[Any], epoch: int, first: int, stats: torch.Tensor, log: ProgressLog) -> bool:
        """Add an update's losses to the guard, the epoch sums and the log window (non-finite losses stay out
        of the means, without a sync). Returns whether the model has an auxiliary loss."""
        self.guard.add(epoch, first, torch.stack([g[0] for g in group]))
        for loss, aux in group:
            finite = torch.isfinite(loss)
            stats[0] += torch.where(finite, loss, 0).double()
            stats[2] += finite
            log.add_loss(loss, finite)
            if aux is not None:
                stats[1] += torch.where(finite, aux, 0).double()
        return group[0][1] is not None

    def _preempt_requested(self, update_idx: int, last: bool, every: int) -> bool:
        """Whether a preemption signal reached any process (asked every ``every`` updates: one collective)."""
        return not last and update_idx % every == 0 and any_true(self.preemption.requested, self.info)

    def _train_batches(self, epoch: int, start: int, batches, stats: torch.Tensor) -> Optional[Dict[str, float]]:
        args, info = self.args, self.info
        n, accum = self.loaders.batches_per_epoch, args.grad_accum_steps
        group: List[Any] = []  # (loss, aux) of this accumulation group
        log = ProgressLog(args.log_interval, args.batch_size * accum * info.world_size, self.device)
        preempt_every = 1 if not info.distributed else max(1, min(args.log_interval, 10))
        has_aux = False
        # --debug-loss: autograd's anomaly mode over forward and backward names the op that made a NaN / inf
        anomaly = (lambda: torch.autograd.detect_anomaly(check_nan=True)) if args.debug_loss else contextlib.nullcontext
        t_data = time.time()
        for i, (x, y) in enumerate(batches, start=start):
            log.add_data_time(time.time() - t_data)
            x, y = self.prepare_train(x, y)  # normalise, mix, erase
            group_size, need_update = accumulation_group(i, n, accum)
            no_sync = self.ddp_model.no_sync if self.ddp_model is not None and not need_update else None
            with anomaly():
                group.append(forward_backward(self.train_model, x, y, self._loss, group_size, self.scaler,
                                              self._amp, no_sync))
            if not need_update:
                t_data = time.time()
                continue
            skip = self._skip_update([g[0] for g in group], epoch, i)
            if not skip:
                has_aux = self._record(group, epoch, i + 1 - len(group), stats, log) or has_aux
            group = []
            self._update(skip)
            log.updates += 1

            update_idx = (i + 1 + accum - 1) // accum  # updates done in this epoch
            last = i + 1 == n
            if log.due(update_idx, last):
                self.guard.check()
                if info.is_main:
                    mean = float(stats[0] / stats[2].clamp(min=1))
                    _logger.info(log.line(epoch, self.num_epochs, update_idx, self.loaders.updates_per_epoch, mean,
                                          self.optimizer.param_groups[0]['lr']))
                    if args.save_images:
                        self._save_batch_images(x, update_idx)
                log.reset()
            if self._preempt_requested(update_idx, last, preempt_every):
                self.guard.check()
                self._save_recovery(epoch, i + 1, stats)
                return None
            if args.recovery_interval and not last and self.global_step % args.recovery_interval == 0:
                self.guard.check()  # never save weights a non-finite loss spoiled
                self._save_periodic_recovery(epoch, i + 1, stats)
            t_data = time.time()

        self.guard.check()
        all_reduce_sum(stats, info)
        s = stats.tolist()
        return {
            'train_loss': s[0] / max(1.0, s[2]),
            'train_loss_aux': s[1] / max(1.0, s[2]) if has_aux or s[1] else None,
        }

    def _save_batch_images(self, x: torch.Tensor, update_idx: int) -> None:
        """``--save-images``: the batch as the model got it (normalised, mixed, erased), rescaled for viewing."""
        import torchvision
        path = os.path.join(self.args.output, f'train-batch-{update_idx}.jpg')
        torchvision.utils.save_image(x.detach().float().cpu(), path, padding=0, normalize=True)

    def score(self, model: nn.Module) -> Dict[str, float]:
        """Loss, top-1 and top-5 (%) over the validation set, summed over processes (each image once); with
        ``--tta 2`` of the logits averaged with those of the mirrored images."""
        if self.args.tta == 2:
            model = MirrorTTA(model)
        return evaluate(model, self.loaders.val, self.device, amp=self.amp_dtype if self.args.amp else None,
                        prepare=self.prepare_eval, info=self.info)

    # --- outputs -------------------------------------------------------------------------------------------

    def _checkpoint_state(self, epoch: int, step_in_epoch: int, metric: Optional[float],
                          epoch_stats: Optional[List[List[float]]] = None) -> Dict[str, Any]:
        """Everything resume needs; gathers every rank's RNG states (all ranks must call this)."""
        return training_state(
            self.args, epoch=epoch, step_in_epoch=step_in_epoch, global_step=self.global_step, model=self.model,
            optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema, scaler=self.scaler, metric=metric,
            summary=self.summary, rng=all_gather_objects(get_rng_state(), self.info), epoch_stats=epoch_stats,
            nonfinite_skipped=self.guard.skipped, world_size=self.info.world_size,
            updates_per_epoch=self.loaders.updates_per_epoch)

    def _columns(self) -> List[str]:
        cols = list(SUMMARY_COLUMNS)
        if self.ema is not None:
            cols += ['eval_ema_loss', 'eval_ema_top1', 'eval_ema_top5']
        cols += ['lr', 'epoch_time']
        if self.guard.tolerate:
            cols.append('nonfinite_skipped')
        return cols

    def _write_summary(self) -> None:
        cols = self._columns()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator='\n')
        writer.writerow(cols)
        for row in self.summary:
            writer.writerow([int(row['epoch']) if c == 'epoch' else _fmt(row.get(c)) for c in cols])
        atomic_write_text(buf.getvalue(), os.path.join(self.args.output, 'summary.csv'))
        try:
            from .plot import plot_curves
            plot_curves(self.summary, os.path.join(self.args.output, 'curves.png'))
        except (ImportError, OSError, ValueError) as e:  # a plot must never stop a run
            _logger.warning('could not draw curves.png: %s', e)

    def _bn_modules(self) -> Dict[str, nn.Module]:
        return {'model': self.model, **({'ema': self.ema.module} if self._ema_on_device else {})}

    @property
    def _ema_on_device(self) -> bool:
        """An EMA that lives beside the model (not --model-ema-force-cpu): evaluated, its BatchNorm
        statistics distributed."""
        return self.ema is not None and not self.args.model_ema_force_cpu

    def _rank_bn(self) -> Optional[List[Dict[str, Dict[str, torch.Tensor]]]]:
        """Every rank's BatchNorm running statistics (mid-epoch they differ per rank, and ``--dist-bn``
        averages them at the epoch's end, so each rank must resume its own)."""
        if not self.info.distributed:
            return None
        mine = {key: {n: b.detach().cpu() for n, b in m.named_buffers() if 'running_' in n}
                for key, m in self._bn_modules().items()}
        return all_gather_objects(mine, self.info)

    def _restore_rank_bn(self) -> None:
        saved = self.resume.rank_bn
        if not saved or len(saved) != self.info.world_size:
            return
        for key, m in self._bn_modules().items():
            buffers = dict(m.named_buffers())
            for name, value in saved[self.info.rank].get(key, {}).items():
                if name in buffers:
                    buffers[name].copy_(value)

    def _epoch_stats(self, stats: torch.Tensor) -> List[List[float]]:
        """Every rank's partial epoch sums (each rank resumes its own)."""
        return all_gather_objects(stats.tolist(), self.info)

    def _save_periodic_recovery(self, epoch: int, step_in_epoch: int, stats: torch.Tensor) -> None:
        """``--recovery-interval``: ``recovery.pth`` mid-epoch (the newest only), for a hard kill, which leaves
        no time to save; training goes on."""
        state = self._checkpoint_state(epoch, step_in_epoch, None, epoch_stats=self._epoch_stats(stats))
        state['rank_bn'] = self._rank_bn()
        if self.info.is_main:
            self.saver.save_recovery(state, self.saver.recovery_path)
            _logger.info('Recovery checkpoint: epoch %d, batch %d of %d (%s)', epoch + 1, step_in_epoch,
                         self.loaders.batches_per_epoch, self.saver.recovery_path)
        barrier(self.info)

    def _save_recovery(self, epoch: int, step_in_epoch: int, stats: torch.Tensor) -> None:
        state = self._checkpoint_state(epoch, step_in_epoch, None, epoch_stats=self._epoch_stats(stats))
        state['rank_bn'] = self._rank_bn()
        if self.info.is_main:
            self.saver.save_recovery(state)
        barrier(self.info)
        _logger.info('Preempted (%s) at epoch %d, batch %d of %d: saved %s. Continue with --resume %s',
                     self.preemption.name, epoch + 1, step_in_epoch, self.loaders.batches_per_epoch,
                     self.saver.last_path, self.saver.last_path)

    # --- run -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        args, info = self.args, self.info
        setup.setup_logging(info, None)
        setup.seed_all(args.seed + info.rank)
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        self.setup()
        _logger.info('Output %s | %d process(es) x batch %d x %d accumulation = global batch %d | lr %.3g | '
                     '%d epochs (%d + %d cool-down), %d updates per epoch | ContMix on the %s na2d backend',
                     args.output, info.world_size, args.batch_size, args.grad_accum_steps, self.global_batch, args.lr,
                     self.num_epochs, args.epochs, self.num_epochs - args.epochs, self.loaders.updates_per_epoch,
                     apply_na2d_backend(args.na2d_backend, self.device))
        self._restore_rank_bn()
        self._restore_rng()
        self.preemption.install()
        try:
            return self._loop()
        finally:
            self.preemption.restore()
            self.loaders.close()
            if self.wandb is not None:
                self.wandb.finish()

    def _distribute_bn(self) -> None:
        """``--dist-bn`` after each epoch, before evaluation and saving, for the model and its EMA (as the
        original's train.py)."""
        distribute_bn_stats([self.model, self.ema.module if self._ema_on_device else None], self.info,
                            self.args.dist_bn)

    def _evaluates(self, epoch: int, first: bool) -> bool:
        """Whether the model is evaluated after ``epoch`` (0-based): the original's ``--val-freq`` /
        ``--val-start-epoch`` rule, and always after the first epoch of a resumed run."""
        args = self.args
        return epoch % args.val_freq == 0 or epoch > args.val_start_epoch or (first and bool(args.resume))

    def _epoch_row(self, epoch: int, stats: Dict[str, float], evaluate_now: bool = True) -> Dict[str, Optional[float]]:
        """Evaluate the model (and the EMA) after ``epoch``: the summary row (evaluation columns None when
        the epoch is not evaluated)."""
        row: Dict[str, Optional[float]] = {
            'epoch': epoch + 1, 'train_loss': stats['train_loss'], 'train_loss_aux': stats['train_loss_aux'],
            'eval_loss': None, 'eval_top1': None, 'eval_top5': None,
        }
        if self.ema is not None:
            row.update(eval_ema_loss=None, eval_ema_top1=None, eval_ema_top5=None)
        if not evaluate_now:
            return row
        ev = self.score(self.eval_model)
        row.update(eval_loss=ev['loss'], eval_top1=ev['top1'], eval_top5=ev['top5'])
        if self._ema_on_device:
            ev_ema = self.score(self.ema.module)
            row.update(eval_ema_loss=ev_ema['loss'], eval_ema_top1=ev_ema['top1'], eval_ema_top5=ev_ema['top5'])
        return row

    def _metrics(self, row: Dict[str, Optional[float]]):
        """``(metric, metric_ema)`` that rank the best checkpoints (None: not ranked; a non-finite loss never
        ranks): ``--eval-metric`` of the model and of the EMA (``ema_top1``: the EMA's top-1 for both)."""
        name = 'top1' if self.args.eval_metric == 'ema_top1' else self.args.eval_metric

        def value(prefix: str) -> Optional[float]:
            loss = row.get(f'{prefix}loss')
            return row[f'{prefix}{name}'] if loss is not None and math.isfinite(loss) else None

        metric, metric_ema = value('eval_'), value('eval_ema_') if self.ema is not None else None
        return (metric_ema if self.args.eval_metric == 'ema_top1' else metric), metric_ema

    def _loop(self) -> int:
        args, info = self.args, self.info
        if self.resume.epoch >= self.num_epochs:
            _logger.info('Nothing to do: %d of %d epochs already done', self.resume.epoch, self.num_epochs)
            return 0
        first_epoch = self.resume.epoch
        for epoch in range(self.resume.epoch, self.num_epochs):
            stats = self.train_one_epoch(epoch)
            if stats is None:
                return 0  # preempted; recovery checkpoint written
            self._distribute_bn()
            lr = float(np.mean([g['lr'] for g in self.optimizer.param_groups]))
            row = self._epoch_row(epoch, stats, self._evaluates(epoch, epoch == first_epoch))
            row.update(lr=lr, epoch_time=stats['epoch_time'])
            if self.guard.tolerate:
                row['nonfinite_skipped'] = float(self.guard.skipped)
            self.summary.append(row)
            metric, metric_ema = self._metrics(row)

            # Step the schedule before saving so that the checkpoint holds the next epoch's lr.
            self.scheduler.step(epoch + 1, metric)
            state = self._checkpoint_state(epoch + 1, 0, metric)
            if info.is_main:
                self.saver.save_epoch(state, epoch + 1, metric, metric_ema)
                self.saver.drop_recovery()  # last.pth is newer now
                self._write_summary()
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in row.items() if v is not None}, step=epoch + 1)
            barrier(info)
            _logger.info(_epoch_line(row, self.num_epochs, self.device))
            if epoch + 1 < self.num_epochs and any_true(self.preemption.requested, info):
                _logger.info('Preempted after epoch %d: continue with --resume %s', epoch + 1, self.saver.last_path)
                return 0
        if self.saver.best is not None:
            _logger.info('Done. Best %s %.4g at epoch %d (%s)', args.eval_metric, self.saver.best[0],
                         self.saver.best[1], self.saver.best_path)
        if self.saver.best_ema is not None:
            _logger.info('Best EMA %s %.4g at epoch %d (%s)', 'top1' if args.eval_metric == 'ema_top1' else
                         args.eval_metric, self.saver.best_ema[0], self.saver.best_ema[1],
                         self.saver.ranking_ema.best_path)
        if self.guard.tolerate:
            _logger.info('Skipped %d optimizer steps with a non-finite loss', self.guard.skipped)
        return 0


def _epoch_line(row: Dict[str, Optional[float]], num_epochs: int, device: torch.device) -> str:
    """The log line of an epoch's row (without evaluation columns when the epoch was not evaluated)."""
    aux = f' (aux {row["train_loss_aux"]:.4f})' if row['train_loss_aux'] is not None else ''
    ev = ('  not evaluated (--val-freq)' if row['eval_loss'] is None else
          f'  eval loss {row["eval_loss"]:.4f}  top1 {row["eval_top1"]:.2f}  top5 {row["eval_top5"]:.2f}')
    ema = f'  ema top1 {row["eval_ema_top1"]:.2f}' if row.get('eval_ema_top1') is not None else ''
    mem = (f'  peak mem {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB'
           if device.type == 'cuda' else '')
    return (f'Epoch {int(row["epoch"])}/{num_epochs}: train loss {row["train_loss"]:.4f}{aux}{ev}{ema}  '
            f'{row["epoch_time"]:.1f}s{mem}')


def _start_wandb(project: str, config: Dict[str, Any], output: str):
    """``--log-wandb``: a Weights & Biases run (None, with one warning, when the package is missing)."""
    try:
        import wandb
    except ImportError:
        _logger.warning('--log-wandb: the wandb package is not installed (pip install wandb); metrics are not sent '
                        'to Weights & Biases (summary.csv has them)')
        return None
    wandb.init(project=project or None, config=config, dir=output)
    return wandb


def main(argv: Optional[List[str]] = None) -> int:
    """train.py: parse options (config file < command line), train, return the exit code."""
    parser = build_train_parser()
    args = parse_args_with_config(parser, argv)
    notes = check_train_args(args)
    if launched_by_torchrun():
        die_with_parent(signal.SIGTERM)  # a launcher killed outright leaves no orphaned run behind
    info = init_distributed(args.device, args.local_rank, init_method=args.dist_url, timeout=args.dist_timeout)
    limit = setup.apply_gpu_limit(args.gpu_limit, info.device)
    if limit:
        notes.append(limit)
    try:
        apply_na2d_backend(args.na2d_backend, info.device)  # a bad value stops here, before any data is read
        return Trainer(args, info, notes).run()
    except NonFiniteLoss as e:
        _logger.error('error: %s', e)
        return EXIT_NONFINITE
    finally:
        cleanup()
        setup.remove_log_handlers()
