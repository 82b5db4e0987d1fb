"""The training run behind train.py: setup, epochs, evaluation, checkpoints, preemption and resume.

The loop is timm's recipe (timm data transforms, Mixup/CutMix, soft-target CE, optimizer and scheduler
factories, ModelEmaV3) written lean, with what long ImageNet runs need on top: resume that reproduces the
uninterrupted run (RNG states of every process, sampler position within the epoch), atomic checkpoints,
a preemption handler (SIGTERM / SIGUSR1) and a guard against non-finite losses.
"""
import argparse
import contextlib
import csv
import datetime
import io
import logging
import math
import os
import random
import signal
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import models  # registers the overlock models with timm
from models import CheckpointError, load_checkpoint

from .checkpoint import (
    CHECKPOINT_VERSION, CheckpointSaver, atomic_write_text, get_rng_state, read_training_checkpoint, set_rng_state,
    to_plain,
)
from .cli import UsageError, create_model_from_args, parse_args_with_config
from .config import STALE_FILES, args_to_yaml, build_train_parser, check_train_args, run_files_in
from .data import DataError, EvalShardSampler, ResumableSampler, build_image_folder, check_same_classes, \
    resolve_split, seed_worker
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, any_true, barrier, cleanup, init_distributed

__all__ = ['main', 'Trainer', 'NonFiniteLoss', 'EXIT_NONFINITE', 'SUMMARY_COLUMNS']

_logger = logging.getLogger('train')

EXIT_NONFINITE = 3
SUMMARY_COLUMNS = ('epoch', 'train_loss', 'train_loss_aux', 'eval_loss', 'eval_top1', 'eval_top5')
_LOG_TAG = '_overlock_train_handler'


class NonFiniteLoss(RuntimeError):
    """A NaN / inf loss; the message names the step and the last good checkpoint."""


def _remove_log_handlers() -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _LOG_TAG, False)]:
        root.removeHandler(h)
        h.close()


def _setup_logging(info: DistInfo, log_file: Optional[str]) -> None:
    """Rank 0 logs INFO to the console and ``log_file``; other ranks only warnings and errors."""
    _remove_log_handlers()  # set up twice per run (console first, the file once the output folder exists)
    root = logging.getLogger()
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter('%(message)s' if info.is_main else f'[rank {info.rank}] %(message)s'))
    setattr(console, _LOG_TAG, True)
    root.addHandler(console)
    if log_file and info.is_main:
        fh = logging.FileHandler(log_file, mode='a', encoding='utf-8')
        fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        setattr(fh, _LOG_TAG, True)
        root.addHandler(fh)
    root.setLevel(logging.INFO if info.is_main else logging.WARNING)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _fmt_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def _fmt(value: Optional[float]) -> str:
    return '' if value is None else f'{value:.6g}'


class _Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop saves a recovery checkpoint at the next step boundary."""

    SIGNALS = tuple(s for s in (getattr(signal, 'SIGTERM', None), getattr(signal, 'SIGUSR1', None)) if s is not None)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # only set a flag: logging or saving inside a signal handler is not safe

    def install(self) -> None:
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (embedded use): no preemption handling
                pass

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _worker_init(worker_id: int) -> None:
    seed_worker(worker_id)
    # Preemption signals are for the main process, which stops the loader cleanly; a worker killed by them
    # would make the next batch fail before the recovery checkpoint is written.
    for s in _Preemption.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _close_loader(batches) -> None:
    """Stop a DataLoader iterator's workers now. On an error the traceback keeps the iterator alive until
    interpreter exit, where multiprocessing would SIGTERM the workers, which ignore it (see _worker_init)."""
    shutdown = getattr(batches, '_shutdown_workers', None)  # absent for num_workers=0
    if shutdown is not None:
        shutdown()


class Trainer:
    """One training run (see :func:`main`).

    Args:
        args: parsed and checked options of train.py.
        info: process placement from :func:`init_distributed`.
    """

    def __init__(self, args: argparse.Namespace, info: DistInfo):
        self.args = args
        self.info = info
        self.device = info.device
        self.preemption = _Preemption()
        self.summary: List[Dict[str, Optional[float]]] = []
        self.global_step = 0  # optimizer updates done (skipped non-finite updates included)
        self.start_epoch = 0
        self.resume_step = 0  # batches of start_epoch done before a preemption
        self.resume_stats: Optional[List[float]] = None
        self.nonfinite_skipped = 0
        self.rng_states: Optional[List[Any]] = None

    # --- setup ---------------------------------------------------------------------------------------------

    def _resolve_output(self) -> None:
        args, info = self.args, self.info
        if args.resume == 'auto':
            if not args.output:
                raise UsageError('--resume auto needs --output (the run directory to continue)')
            last = os.path.join(args.output, 'last.pth')
            args.resume = last if os.path.isfile(last) else ''
        if args.resume:
            if not os.path.exists(args.resume):
                raise UsageError(f'--resume {args.resume} does not exist')
            if not args.output:
                args.output = os.path.dirname(os.path.abspath(args.resume))
        if not args.output:
            stamp = all_gather_objects(datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), info)[0]
            args.output = os.path.join('output', 'train', f'{args.model}-{stamp}')
        existing = run_files_in(args.output)
        if existing and not args.resume and not args.overwrite:
            last = os.path.join(args.output, 'last.pth')
            raise UsageError(f'--output {args.output} holds another run ({", ".join(existing[:4])}); pass --resume '
                             f'{last} to continue it, --overwrite to replace it, or another --output')
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise UsageError(f'--output {args.output} is a file, not a directory')
        barrier(info)  # every rank has checked before rank 0 writes anything
        if info.is_main:
            os.makedirs(args.output, exist_ok=True)
            if not args.resume:  # a new run: nothing of an earlier one may mix into its outputs
                for name in existing + [n for n in STALE_FILES if os.path.isfile(os.path.join(args.output, n))]:
                    os.remove(os.path.join(args.output, name))
        barrier(info)

    def _setup_data(self) -> None:
        args = self.args
        train_dir = resolve_split(args.data_dir, args.train_split)
        val_dir = resolve_split(args.data_dir, args.val_split)
        self.train_set = build_image_folder(train_dir, skip_corrupt=args.skip_corrupt)
        val_classes = sorted(e.name for e in os.scandir(val_dir) if e.is_dir() and not e.name.startswith('.'))
        check_same_classes(self.train_set.classes, val_classes, args.data_dir)
        self.val_set = build_image_folder(val_dir, skip_corrupt=args.skip_corrupt,
                                          class_to_idx=self.train_set.class_to_idx)
        n_classes = len(self.train_set.classes)
        if args.num_classes is None:
            args.num_classes = n_classes
        elif args.num_classes < n_classes:
            raise DataError(f'--num-classes {args.num_classes} but {train_dir} has {n_classes} class folders')
        elif args.num_classes > n_classes:
            _logger.warning('--num-classes %d but %s has only %d class folders', args.num_classes, train_dir, n_classes)

    def _setup_batch(self) -> None:
        args, info = self.args, self.info
        if args.global_batch_size is not None:
            per = info.world_size * args.grad_accum_steps
            if args.global_batch_size < 1 or args.global_batch_size % per:
                raise UsageError(
                    f'--global-batch-size {args.global_batch_size} is not divisible by {info.world_size} '
                    f'processes x {args.grad_accum_steps} accumulation steps; pick a multiple of {per}')
            args.batch_size = args.global_batch_size // per
        self.global_batch = args.batch_size * info.world_size * args.grad_accum_steps
        if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax) and args.mixup_mode != 'elem' \
                and args.batch_size % 2:
            raise UsageError(f'-b {args.batch_size}: mixup/cutmix mix pairs of images, the batch per process '
                             f'must be even')
        if args.lr is None:
            args.lr = args.lr_base * self.global_batch / args.lr_base_size if args.auto_lr else args.lr_base
        per_rank = math.ceil(len(self.train_set) / info.world_size)
        if per_rank < args.batch_size:
            raise DataError(f'{self.train_set.root} has {len(self.train_set)} images, fewer than one batch of '
                            f'{args.batch_size} per process x {info.world_size} processes; lower -b')

    def _setup_model(self) -> None:
        from timm.data import resolve_data_config
        args, info = self.args, self.info
        extra = {}
        if args.drop is not None:
            extra['drop_rate'] = args.drop
        self.model = create_model_from_args(args, **extra)
        if args.finetune:
            load_checkpoint(self.model, args.finetune, use_ema=args.finetune_ema, strict=True)
            _logger.info('Fine-tuning from %s', args.finetune)
        self.data_config = resolve_data_config(
            dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
                 mean=args.mean, std=args.std), model=self.model)
        min_size = models.MIN_INPUT_SIZE if args.model.startswith('overlock') else 1
        if min(self.data_config['input_size'][1:]) < min_size:
            raise UsageError(f'--img-size {args.img_size}: {args.model} needs at least {min_size} pixels')
        self.model.to(self.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if args.sync_bn:
            if info.distributed and self.device.type == 'cuda':
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            elif info.is_main:
                _logger.warning('--sync-bn ignored: it needs CUDA and more than one process')
        n_params = sum(p.numel() for p in self.model.parameters())
        _logger.info('Model %s: %.2fM parameters, %d classes, input %s', args.model, n_params / 1e6,
                     args.num_classes, tuple(self.data_config['input_size']))

        self.ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

        self.amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype]
        self.scaler = None
        if args.amp and args.amp_dtype == 'float16':
            self.scaler = torch.amp.GradScaler(self.device.type)

        from timm.optim import create_optimizer_v2
        opt_kwargs = {}
        if args.opt_eps is not None:
            opt_kwargs['eps'] = args.opt_eps
        if args.opt_betas is not None:
            opt_kwargs['betas'] = tuple(args.opt_betas)
        try:
            self.optimizer = create_optimizer_v2(
                self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                layer_decay=args.layer_decay, **opt_kwargs)
        except (AssertionError, ValueError, KeyError) as e:  # timm's factory rejects unknown names this way
            raise UsageError(f'--opt {args.opt}: {e}') from None

    def _setup_loaders(self) -> None:
        from .augment import build_eval_transform, build_train_transform
        args, info = self.args, self.info
        cfg = self.data_config
        self.train_set.transform = build_train_transform(
            cfg['input_size'], no_aug=args.no_aug, scale=tuple(args.scale), ratio=tuple(args.ratio),
            hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, mean=cfg['mean'], std=cfg['std'], re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount)
        self.val_set.transform = build_eval_transform(
            cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'],
            std=cfg['std'], crop_pct=cfg['crop_pct'])
        self.train_sampler = ResumableSampler(len(self.train_set), info.world_size, info.rank, True, args.seed)
        self.loader_generator = torch.Generator()
        common = dict(num_workers=args.workers, pin_memory=args.pin_mem and self.device.type == 'cuda',
                      worker_init_fn=_worker_init, generator=self.loader_generator)
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=args.batch_size, sampler=self.train_sampler, drop_last=True, **common)
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=args.validation_batch_size or args.batch_size,
            sampler=EvalShardSampler(len(self.val_set), info.world_size, info.rank), **common)
        self.batches_per_epoch = self.train_sampler.per_replica // args.batch_size
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)

        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
            self.mixup = Mixup(
                mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=args.num_classes)
            self.criterion = SoftTargetCrossEntropy()  # mixup's targets are soft (and smoothed)
        elif args.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def _setup_schedule(self) -> None:
        from timm.scheduler import create_scheduler_v2
        args = self.args
        try:
            self.scheduler, self.num_epochs = create_scheduler_v2(
                self.optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
                cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
                warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
                step_on_epochs=not args.sched_on_updates, updates_per_epoch=self.updates_per_epoch)
        except (AssertionError, ValueError) as e:
            raise UsageError(f'--sched {args.sched}: {e}') from None
        if self.scheduler is None:
            raise UsageError(f'--sched {args.sched} is not a timm scheduler (e.g. cosine, step, tanh, poly)')

    def _resume(self) -> None:
        """Restore everything the uninterrupted run would hold at this point (RNG states last, in run())."""
        args, path = self.args, self.args.resume
        ckpt = read_training_checkpoint(path)
        if ckpt.get('arch') not in (None, args.model):
            raise CheckpointError(f'checkpoint {path} was trained with --model {ckpt.get("arch")}, '
                                  f'not {args.model}; pass --model {ckpt.get("arch")}')

        def load(module: nn.Module, state: Dict[str, Any], what: str) -> None:
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                first = str(e).strip().splitlines()
                detail = ' '.join(line.strip() for line in first[1:3]) if len(first) > 1 else str(e)
                raise CheckpointError(f'checkpoint {path}: {what} does not fit this model ({detail[:300]}); '
                                      f'resume with the same --model, --model-kwargs and --num-classes') from None

        load(self.model, ckpt['state_dict'], 'state_dict')
        if self.ema is not None:
            if 'state_dict_ema' in ckpt:
                load(self.ema.module, ckpt['state_dict_ema'], 'state_dict_ema')
            else:
                _logger.warning('%s has no EMA weights: the EMA restarts from the current weights', path)
                self.ema.module.load_state_dict(self.model.state_dict())
        try:
            self.optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f'checkpoint {path}: optimizer state does not fit (--opt {args.opt}?): {e}') from None
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        if ckpt.get('scheduler'):
            self.scheduler.load_state_dict(ckpt['scheduler'])
        self.start_epoch = int(ckpt['epoch'])
        self.resume_step = int(ckpt.get('step_in_epoch', 0))
        self.resume_stats = ckpt.get('epoch_stats')
        self.global_step = int(ckpt.get('global_step', self.start_epoch * self.updates_per_epoch))
        self.nonfinite_skipped = int(ckpt.get('nonfinite_skipped', 0))
        self.summary = [dict(r) for r in ckpt.get('summary', []) if int(r['epoch']) <= self.start_epoch]
        self.rng_states = ckpt.get('rng')
        self.best_k = [(float(m), int(e)) for m, e in ckpt.get('best_k', [])]
        old = (int(ckpt.get('world_size', self.info.world_size)),
               int(ckpt.get('args', {}).get('batch_size', args.batch_size)))
        if self.resume_step and old != (self.info.world_size, args.batch_size):
            # Another process count or batch: continue after about as many images as were done.
            done = self.resume_step * old[0] * old[1]
            self.resume_step = done // (self.info.world_size * args.batch_size)
            self.resume_stats = None
            _logger.warning('checkpoint from %d processes x batch %d, now %d x %d: epoch %d continues after '
                            '~%d images, in another order', old[0], old[1], self.info.world_size, args.batch_size,
                            self.start_epoch + 1, done)
            self.resume_step -= self.resume_step % args.grad_accum_steps  # at an optimizer-update boundary
        if self.resume_step >= self.batches_per_epoch:
            self.resume_step = 0  # the data changed; restart the epoch
        _logger.info('Resumed %s: %d epochs done%s', path, self.start_epoch,
                     f', {self.resume_step} batches into epoch {self.start_epoch + 1}' if self.resume_step else '')

    # --- steps ---------------------------------------------------------------------------------------------

    def _autocast(self):
        if not self.args.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loss(self, output, target: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(output, dict):
            main = self.criterion(output['main'], target)
            aux = self.criterion(output['aux'], target)
            return main + self.args.aux_loss_ratio * aux, aux.detach()
        return self.criterion(output, target), None

    def _checkpoint_state(self, epoch: int, step_in_epoch: int, metric: Optional[float],
                          epoch_stats: Optional[List[float]] = None) -> Dict[str, Any]:
        """Everything resume needs; gathers every rank's RNG states (all ranks must call this)."""
        rng = all_gather_objects(get_rng_state(), self.info)
        state = {
            'version': CHECKPOINT_VERSION,
            'arch': self.args.model,
            'epoch': epoch,
            'step_in_epoch': step_in_epoch,
            'global_step': self.global_step,
            'state_dict': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'scheduler': to_plain(self.scheduler.state_dict()),
            'args': to_plain(vars(self.args)),
            'metric': metric,
            'summary': to_plain(self.summary),
            'rng': rng,
            'epoch_stats': epoch_stats,
            'nonfinite_skipped': self.nonfinite_skipped,
            'world_size': self.info.world_size,
        }
        if self.ema is not None:
            state['state_dict_ema'] = self.ema.module.state_dict()
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        return state

    def _nonfinite_advice(self) -> str:
        last = os.path.join(self.args.output, 'last.pth')
        if os.path.isfile(last):
            return (f'last good checkpoint: {last}. Resume from it in float32 (drop --amp) or with a lower --lr, '
                    f'or pass --skip-nonfinite to skip such steps')
        return ('no checkpoint written yet; restart in float32 (drop --amp) or with a lower --lr, '
                'or pass --skip-nonfinite to skip such steps')

    def _check_finite(self, pending: List[Tuple[int, int, torch.Tensor]]) -> None:
        """Raise NonFiniteLoss for the first non-finite loss among ``pending`` (one sync for all of them)."""
        if not pending:
            return
        losses = torch.stack([p[2].float() for p in pending])
        finite = torch.isfinite(losses)
        bad_local = not bool(finite.all())
        if any_true(bad_local, self.info):
            where = 'on another process'
            if bad_local:
                i = int((~finite).nonzero()[0])
                epoch, step, value = pending[i][0], pending[i][1], float(losses[i])
                where = f'({value}) at epoch {epoch + 1}, step {step + 1} of {self.batches_per_epoch}'
            else:
                epoch, step = pending[0][0], pending[0][1]
                where = f'on another process, epoch {epoch + 1} near step {step + 1}'
            raise NonFiniteLoss(f'non-finite loss {where}; {self._nonfinite_advice()}')
        pending.clear()

    def train_one_epoch(self, epoch: int) -> Optional[Dict[str, float]]:
        """Train epoch ``epoch`` (0-based). Returns its stats, or None when stopped for preemption."""
        args, info = self.args, self.info
        self.train_model.train()
        if self.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        start = self.resume_step if epoch == self.start_epoch else 0
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.set_start(start * args.batch_size)
        self.loader_generator.manual_seed(args.seed * 1000003 + epoch * 1009 + info.rank)
        # loss_sum, aux_sum, batches (restored for a run resumed mid-epoch so the epoch means stay exact)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        if start and self.resume_stats:
            stats += torch.tensor(self.resume_stats, dtype=torch.float64, device=self.device)
        t_epoch = time.time()
        batches = iter(self.train_loader)
        try:
            result = self._train_batches(epoch, start, batches, stats)
        finally:
            _close_loader(batches)
        if result is not None:
            result['epoch_time'] = time.time() - t_epoch
        return result

    def _train_batches(self, epoch: int, start: int, batches, stats: torch.Tensor) -> Optional[Dict[str, float]]:
        args, info = self.args, self.info
        n, accum = self.batches_per_epoch, args.grad_accum_steps
        pending: List[Tuple[int, int, torch.Tensor]] = []  # losses not yet checked for NaN / inf
        group: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []  # losses of this accumulation group
        window = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum and batches since last log
        preempt_every = 1 if not info.distributed else max(1, min(args.log_interval, 10))
        t_log = time.time()
        data_time, updates_in_log, has_aux = 0.0, 0, False
        t_data = time.time()
        for i, (x, y) in enumerate(batches, start=start):
            data_time += time.time() - t_data
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            group_start = (i // accum) * accum
            group_size = min(accum, n - group_start)
            need_update = i + 1 == group_start + group_size
            sync = contextlib.nullcontext()
            if self.ddp_model is not None and not need_update:
                sync = self.ddp_model.no_sync()  # accumulate locally; all-reduce once per update
            with sync:
                with self._autocast():
                    output = self.train_model(x)
                    loss, aux = self._loss(output, y)
                scaled = loss / group_size
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            group.append((loss.detach(), aux))
            if not need_update:
                t_data = time.time()
                continue

            skip = False
            if args.skip_nonfinite:  # one sync per update: the step must be skipped before it happens
                values = torch.stack([g[0].float() for g in group])
                skip = any_true(not bool(torch.isfinite(values).all()), info)
                if skip:
                    self.nonfinite_skipped += 1
                    _logger.warning('epoch %d step %d: non-finite loss, optimizer step skipped (%d so far)',
                                    epoch + 1, i + 1, self.nonfinite_skipped)
            if not skip:  # skipped losses stay out of the epoch means
                for j, (loss_d, aux_d) in enumerate(group):
                    pending.append((epoch, i + 1 - len(group) + j, loss_d))
                    stats[0] += loss_d.double()
                    stats[2] += 1
                    window[0] += loss_d.double()
                    window[1] += 1
                    if aux_d is not None:
                        stats[1] += aux_d.double()
                        has_aux = True
            group = []
            if skip:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self._optimizer_step()
            self.global_step += 1
            if args.sched_on_updates:
                self.scheduler.step_update(num_updates=self.global_step)
            updates_in_log += 1

            update_idx = (i + 1 + accum - 1) // accum  # updates done in this epoch
            last = i + 1 == n
            if update_idx % args.log_interval == 0 or last:
                self._check_finite(pending)
                if info.is_main:
                    elapsed = time.time() - t_log
                    imgs = updates_in_log * args.batch_size * accum * info.world_size
                    left = (self.updates_per_epoch - update_idx) * elapsed / max(1, updates_in_log)
                    lr = self.optimizer.param_groups[0]['lr']
                    w = window.tolist()
                    _logger.info(
                        'Train: %d/%d [%*d/%d (%3.0f%%)] loss %.4f (%.4f)  lr %.3e  %.1f img/s  data %.3fs  ETA %s',
                        epoch + 1, self.num_epochs, len(str(self.updates_per_epoch)), update_idx,
                        self.updates_per_epoch, 100.0 * update_idx / self.updates_per_epoch,
                        w[0] / max(1, w[1]), float(stats[0] / stats[2].clamp(min=1)), lr,
                        imgs / max(elapsed, 1e-9), data_time / max(1, updates_in_log * accum), _fmt_eta(left))
                window.zero_()
                t_log, data_time, updates_in_log = time.time(), 0.0, 0
            if not last and update_idx % preempt_every == 0 and any_true(self.preemption.requested, info):
                self._check_finite(pending)
                self._save_recovery(epoch, i + 1, stats.tolist())
                return None
            t_data = time.time()

        self._check_finite(pending)
        all_reduce_sum(stats, info)
        s = stats.tolist()
        return {
            'train_loss': s[0] / max(1.0, s[2]),
            'train_loss_aux': s[1] / max(1.0, s[2]) if has_aux or s[1] else None,
        }

    def _optimizer_step(self) -> None:
        from timm.utils import dispatch_clip_grad
        args = self.args
        params = self.model.parameters
        if self.scaler is not None:
            if args.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(params(), args.clip_grad, mode=args.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if args.clip_grad is not None:
                dispatch_clip_grad(params(), args.clip_grad, mode=args.clip_mode)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Loss, top-1 and top-5 (%) over the validation set, summed over processes (each image once)."""
        model.eval()
        k = min(5, self.args.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, count
        batches = iter(self.val_loader)
        try:
            self._eval_batches(model, batches, sums, k)
        finally:
            _close_loader(batches)
        all_reduce_sum(sums, self.info)
        loss, top1, top5, count = sums.tolist()
        count = max(count, 1.0)
        return {'loss': loss / count, 'top1': 100.0 * top1 / count, 'top5': 100.0 * top5 / count}

    def _eval_batches(self, model: nn.Module, batches, sums: torch.Tensor, k: int) -> None:
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out = model(x)
            if isinstance(out, dict):
                out = out['main']
            out = out.float()
            sums[0] += F.cross_entropy(out, y, reduction='sum').double()
            top = out.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            sums[1] += hit[:, :1].sum()
            sums[2] += hit.sum()
            sums[3] += y.numel()

    # --- outputs -------------------------------------------------------------------------------------------

    def _columns(self) -> List[str]:
        cols = list(SUMMARY_COLUMNS)
        if self.ema is not None:
            cols += ['eval_ema_loss', 'eval_ema_top1', 'eval_ema_top5']
        cols += ['lr', 'epoch_time']
        if self.args.skip_nonfinite:
            cols.append('nonfinite_skipped')
        return cols

    def _write_summary(self) -> None:
        if not self.info.is_main:
            return
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

    def _save_recovery(self, epoch: int, step_in_epoch: int, stats: List[float]) -> None:
        state = self._checkpoint_state(epoch, step_in_epoch, None, epoch_stats=stats)
        if self.info.is_main:
            self.saver.save_recovery(state)
        barrier(self.info)
        name = {getattr(signal, 'SIGTERM', -1): 'SIGTERM', getattr(signal, 'SIGUSR1', -2): 'SIGUSR1'}.get(
            self.preemption.signum, str(self.preemption.signum))
        _logger.info('Preempted (%s) at epoch %d, batch %d of %d: saved %s. Continue with --resume %s',
                     name, epoch + 1, step_in_epoch, self.batches_per_epoch, self.saver.last_path,
                     self.saver.last_path)

    # --- run -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        args, info = self.args, self.info
        _setup_logging(info, None)
        _seed_all(args.seed + info.rank)
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        # Everything that can reject the input comes before the output directory is touched.
        self._setup_data()
        self._setup_batch()
        self._setup_model()
        self._setup_loaders()
        self._setup_schedule()
        self._resolve_output()
        _setup_logging(info, os.path.join(args.output, 'log.txt'))
        self.best_k: List[Tuple[float, int]] = []
        if args.resume:
            self._resume()
        if self.info.is_main:
            saved = {k: v for k, v in to_plain(vars(args)).items() if k != 'config'}
            atomic_write_text(args_to_yaml(saved), os.path.join(args.output, 'args.yaml'))
        self.saver = CheckpointSaver(args.output, args.checkpoint_hist, self.best_k)

        # Position the schedule where the (resumed) run stands; a no-op at the start of a fresh run.
        if self.start_epoch > 0 or self.resume_step > 0:
            self.scheduler.step(self.start_epoch)
            if args.sched_on_updates:
                self.scheduler.step_update(num_updates=self.global_step)

        self.eval_model = self.model
        self.train_model = self.model
        self.ddp_model = None
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == 'cuda' else None
            # Depthwise conv grads come back with other strides on size-1 dims only (same memory layout);
            # DDP's warning about it says nothing actionable.
            warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
            self.train_model = self.ddp_model
        if args.compile:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(self.model)

        _logger.info('Output %s | %d process(es) x batch %d x %d accumulation = global batch %d | lr %.3g | '
                     '%d epochs (%d + %d cool-down), %d updates per epoch', args.output, info.world_size,
                     args.batch_size, args.grad_accum_steps, self.global_batch, args.lr, self.num_epochs,
                     args.epochs, self.num_epochs - args.epochs, self.updates_per_epoch)

        # RNG states last: everything above (model init, EMA copy) consumed randomness in the original run too.
        if self.rng_states is not None:
            if len(self.rng_states) == info.world_size:
                set_rng_state(self.rng_states[info.rank])
            else:
                _logger.warning('checkpoint from %d processes, now %d: random streams restart from --seed',
                                len(self.rng_states), info.world_size)
                _seed_all(args.seed + info.rank + 7919 * self.start_epoch)

        self.preemption.install()
        try:
            return self._loop()
        finally:
            self.preemption.restore()

    def _loop(self) -> int:
        args, info = self.args, self.info
        if self.start_epoch >= self.num_epochs:
            _logger.info('Nothing to do: %d of %d epochs already done', self.start_epoch, self.num_epochs)
            return 0
        for epoch in range(self.start_epoch, self.num_epochs):
            stats = self.train_one_epoch(epoch)
            if stats is None:
                return 0  # preempted; recovery checkpoint written
            lr = float(np.mean([g['lr'] for g in self.optimizer.param_groups]))
            ev = self.evaluate(self.eval_model)
            row: Dict[str, Optional[float]] = {
                'epoch': epoch + 1, 'train_loss': stats['train_loss'], 'train_loss_aux': stats['train_loss_aux'],
                'eval_loss': ev['loss'], 'eval_top1': ev['top1'], 'eval_top5': ev['top5'],
            }
            if self.ema is not None:
                ev_ema = self.evaluate(self.ema.module)
                row.update(eval_ema_loss=ev_ema['loss'], eval_ema_top1=ev_ema['top1'], eval_ema_top5=ev_ema['top5'])
            row.update(lr=lr, epoch_time=stats['epoch_time'])
            if args.skip_nonfinite:
                row['nonfinite_skipped'] = float(self.nonfinite_skipped)
            self.summary.append(row)
            metric = row['eval_ema_top1'] if args.eval_metric == 'ema_top1' else row['eval_top1']
            if not math.isfinite(row['eval_ema_loss' if args.eval_metric == 'ema_top1' else 'eval_loss']):
                metric = None  # diverged weights never rank as best

            # Step the schedule before saving so that the checkpoint holds the next epoch's lr.
            self.scheduler.step(epoch + 1, metric)
            state = self._checkpoint_state(epoch + 1, 0, metric)
            if info.is_main:
                self.saver.save_epoch(state, epoch + 1, metric)
                self._write_summary()
            barrier(info)
            ema_msg = f'  ema top1 {row["eval_ema_top1"]:.2f}' if self.ema is not None else ''
            aux_msg = f' (aux {row["train_loss_aux"]:.4f})' if row['train_loss_aux'] is not None else ''
            _logger.info('Epoch %d/%d: train loss %.4f%s  eval loss %.4f  top1 %.2f  top5 %.2f%s  %.1fs',
                         epoch + 1, self.num_epochs, row['train_loss'], aux_msg, row['eval_loss'], row['eval_top1'],
                         row['eval_top5'], ema_msg, row['epoch_time'])
            if epoch + 1 < self.num_epochs and any_true(self.preemption.requested, info):
                _logger.info('Preempted after epoch %d: continue with --resume %s', epoch + 1, self.saver.last_path)
                return 0
        if self.saver.best is not None:
            _logger.info('Done. Best %s %.2f at epoch %d (%s)', args.eval_metric, self.saver.best[0],
                         self.saver.best[1], self.saver.best_path)
        if args.skip_nonfinite:
            _logger.info('Skipped %d optimizer steps with a non-finite loss', self.nonfinite_skipped)
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    """train.py: parse options (config file < command line), train, return the exit code."""
    parser = build_train_parser()
    args = parse_args_with_config(parser, argv)
    check_train_args(args)
    info = init_distributed(args.device)
    try:
        return Trainer(args, info).run()
    except NonFiniteLoss as e:
        _logger.error('error: %s', e)
        return EXIT_NONFINITE
    finally:
        cleanup()
        _remove_log_handlers()
