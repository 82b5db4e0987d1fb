"""Training checkpoints (the state a run resumes from): atomic writes, best-k bookkeeping, RNG state as
tensors, the state dict of a run and its restoration.

Not to be confused with loading weights into a model (``models.load_checkpoint``, which reads these files
too) or with activation checkpointing (``--grad-checkpoint``, the model's ``set_grad_checkpointing``).

A training checkpoint is a dict that ``torch.load(..., weights_only=True)`` reads (tensors, numbers, strings,
plain containers only)::

    {'version': 1, 'arch': str, 'epoch': int (epochs completed), 'step_in_epoch': int (batches done in the
     next epoch; > 0 only for a recovery checkpoint), 'state_dict', 'state_dict_ema' (with EMA), 'optimizer',
     'scaler', 'scheduler', 'args': dict, 'metric': float | None, 'global_step', 'best_k', 'summary',
     'rng' (per-rank RNG states), 'epoch_stats' (per rank), 'nonfinite_skipped', 'best_k_ema' (with EMA),
     'rank_bn' (mid-epoch, several processes: every rank's BatchNorm running statistics)}
"""
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .fileio import atomic_save, atomic_write_text, link_or_copy as _link_or_copy, to_plain

__all__ = [
    'CHECKPOINT_VERSION', 'atomic_save', 'atomic_write_text', 'read_training_checkpoint', 'to_plain',
    'get_rng_state', 'set_rng_state', 'BestCheckpoints', 'CheckpointSaver', 'training_state', 'ResumePoint', 'restore_training_state',
    'SCHEDULE_OPTIONS', 'changed_options', 'describe_changes', 'RECOVERY_FILE', 'newest_checkpoint',
    'is_original_checkpoint', 'from_original',
    'LAST_FILE', 'BEST_FILE', 'BEST_EMA_FILE', 'EMA_FOLDER', 'epoch_file', 'is_epoch_file',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1

# The checkpoint file names of a run folder, spelled only here.
LAST_FILE = 'last.pth'  # every epoch, and mid-epoch on preemption: what --resume reads
RECOVERY_FILE = 'recovery.pth'  # every --recovery-interval updates; --resume auto takes the newer of the two
BEST_FILE = 'model_best.pth'
BEST_EMA_FILE = 'model_best_ema.pth'
EMA_FOLDER = 'checkpoints_ema'  # the EMA's best-k epoch files
_EPOCH_PREFIX, _EPOCH_SUFFIX = 'checkpoint-', '.pth'


def epoch_file(epoch: int) -> str:
    """The name of one of the best-k epoch files."""
    return f'{_EPOCH_PREFIX}{epoch}{_EPOCH_SUFFIX}'


def is_epoch_file(name: str) -> bool:
    return name.startswith(_EPOCH_PREFIX) and name.endswith(_EPOCH_SUFFIX)


def get_rng_state() -> Dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states as tensors and ints."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {
            'name': str(np_state[0]), 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
            'pos': int(np_state[2]), 'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4]),
        },
        'python': {
            'version': int(py_state[0]), 'state': torch.tensor(py_state[1], dtype=torch.int64),
            'gauss_next': py_state[2],
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore states captured by :func:`get_rng_state`."""
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# The version timm's CheckpointSaver writes (timm 0.6.12, the original release's train.py): 'epoch' is the
# 0-based epoch just finished, 'args' an argparse.Namespace, the float16 loss scaler under 'amp_scaler'.
ORIGINAL_VERSION = 2


def is_original_checkpoint(checkpoint: Dict[str, Any]) -> bool:
    """Whether a loaded training checkpoint was written by the original release's train.py (timm's saver)."""
    return checkpoint.get('version') == ORIGINAL_VERSION and 'global_step' not in checkpoint


def from_original(checkpoint: Dict[str, Any], path: str) -> Dict[str, Any]:
    """An original-release training checkpoint (timm 0.6.12's ``CheckpointSaver``: ``last.pth.tar`` /
    ``checkpoint-N.pth.tar``) in our layout: epochs completed, plain args, the loss scaler under 'scaler'. It
    has no scheduler, RNG or in-epoch state: the schedule of the command line is stepped to the next epoch
    (as timm's resume does) and the random streams restart from ``--seed``."""
    from models import CheckpointError
    from models.weights import extract_state_dict
    try:
        epoch = int(checkpoint['epoch']) + 1  # timm's saver: the epoch just done, 0-based
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f'checkpoint {path} (original release layout) has no valid epoch') from None
    args = checkpoint.get('args')
    args = to_plain(args) if args is not None else {}
    if not isinstance(args, dict):
        args = {}
    out = {
        'version': CHECKPOINT_VERSION, 'arch': checkpoint.get('arch'), 'epoch': epoch, 'step_in_epoch': 0,
        'state_dict': extract_state_dict(checkpoint['state_dict'], use_ema=False, source=f'checkpoint {path}'),
        'optimizer': checkpoint['optimizer'],
        # Only what identifies the weights is compared; the original's lr/epochs options are its command line's
        # (e.g. --lr before --auto-lr scaling), not the schedule it ran.
        'args': {k: args[k] for k in ('model', 'num_classes', 'in_chans') if k in args},
        'metric': checkpoint.get('metric'), 'original': True,
    }
    if isinstance(checkpoint.get('state_dict_ema'), dict):
        out['state_dict_ema'] = extract_state_dict(checkpoint['state_dict_ema'], use_ema=False,
                                                   source=f'checkpoint {path}')
    scaler = checkpoint.get('amp_scaler')
    if isinstance(scaler, dict):
        out['scaler'] = scaler
    return out


def read_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by train.py (``--resume``), or by the original release's train.py (converted
    with :func:`from_original`); errors are one-line :class:`CheckpointError`."""
    import argparse
    from models import CheckpointError, read_checkpoint_file
    # weights_only=True, with one class allowed beyond plain data: the original's saver stores the parsed
    # command line as an argparse.Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or 'optimizer' not in checkpoint:
        raise CheckpointError(f'checkpoint {path} is not a training checkpoint of train.py (no optimizer '
                              f'state); use --finetune {path} to start a new run from its weights')
    if is_original_checkpoint(checkpoint):
        return from_original(checkpoint, path)
    version = checkpoint.get('version')
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f'checkpoint {path} has format version {version}, this train.py reads '
                              f'{CHECKPOINT_VERSION}')
    return checkpoint


class BestCheckpoints:
    """The ``k`` best epochs by one metric (higher is better, or lower with ``decreasing``):
    ``<folder>/checkpoint-<epoch>.pth`` each, the best also as ``best_path``. Files are hard links to (or
    copies of) the epoch's ``last.pth``.

    Args:
        folder: where the ``checkpoint-<epoch>.pth`` files go.
        best_path: the file that holds the best epoch.
        max_history: how many to keep (0: none).
        entries: ``[(metric, epoch), ...]`` restored from a resumed checkpoint.
        decreasing: lower is better (``--eval-metric loss``).
    """

    def __init__(self, folder: str, best_path: str, max_history: int,
                 entries: Optional[List[Tuple[float, int]]] = None, decreasing: bool = False):
        self.folder = folder
        self.best_path = best_path
        self.max_history = max_history
        self.sign = 1.0 if decreasing else -1.0
        self.entries: List[Tuple[float, int]] = []
        for metric, epoch in entries or []:
            if os.path.exists(self.path_for(int(epoch))):  # a kill between writes may leave an entry without file
                self.entries.append((float(metric), int(epoch)))
        self.entries.sort(key=self._rank)

    def _rank(self, entry: Tuple[float, int]) -> Tuple[float, int]:
        return self.sign * entry[0], entry[1]  # ties: the earlier epoch stays ahead

    def path_for(self, epoch: int) -> str:
        return os.path.join(self.folder, epoch_file(epoch))

    @property
    def best(self) -> Optional[Tuple[float, int]]:
        return self.entries[0] if self.entries else None

    def updated(self, metric: Optional[float], epoch: int) -> List[Tuple[float, int]]:
        """The list after ranking ``epoch`` with ``metric`` (None or non-finite: not ranked)."""
        entries = [e for e in self.entries if e[1] != epoch]
        if metric is not None and math.isfinite(metric) and self.max_history > 0:
            entries.append((float(metric), epoch))
        entries.sort(key=self._rank)
        return entries[:self.max_history]

    def keep(self, source: str, epoch: int, new: List[Tuple[float, int]]) -> None:
        """Make the files follow ``new`` (from :meth:`updated`), ``source`` holding epoch ``epoch``."""
        if any(e == epoch for _, e in new):
            os.makedirs(self.folder, exist_ok=True)
            _link_or_copy(source, self.path_for(epoch))
        for _, e in self.entries:
            if all(e != e2 for _, e2 in new) and os.path.exists(self.path_for(e)):
                os.remove(self.path_for(e))
        self.entries = new
        if self.entries and self.entries[0][1] == epoch:
            _link_or_copy(source, self.best_path)


class CheckpointSaver:
    """Writes ``last.pth`` every epoch and keeps the ``k`` best epochs by a metric (higher is better) as
    ``checkpoint-<epoch>.pth``, the best one also as ``model_best.pth``; with ``ema=True`` also the ``k``
    best by the EMA's top-1 as ``checkpoints_ema/checkpoint-<epoch>.pth`` and ``model_best_ema.pth``
    (the original's second ranking).

    Args:
        output_dir: run directory.
        max_history: how many best checkpoints to keep per ranking (0: none).
        best_k: ``[(metric, epoch), ...]`` restored from a resumed checkpoint.
        ema: keep the EMA ranking too.
        best_k_ema: its list restored from a resumed checkpoint.
        decreasing: lower metrics are better (a loss).
    """

    def __init__(self, output_dir: str, max_history: int = 3, best_k: Optional[List[Tuple[float, int]]] = None,
                 ema: bool = False, best_k_ema: Optional[List[Tuple[float, int]]] = None, decreasing: bool = False):
        self.output_dir = output_dir
        self.ranking = BestCheckpoints(output_dir, os.path.join(output_dir, BEST_FILE), max_history, best_k,
                                       decreasing)
        self.ranking_ema = BestCheckpoints(os.path.join(output_dir, EMA_FOLDER),
                                           os.path.join(output_dir, BEST_EMA_FILE), max_history,
                                           best_k_ema, decreasing) if ema else None

    @property
    def last_path(self) -> str:
        return os.path.join(self.output_dir, LAST_FILE)

    @property
    def best_path(self) -> str:
        return self.ranking.best_path

    @property
    def best_k(self) -> List[Tuple[float, int]]:
        return self.ranking.entries

    def path_for(self, epoch: int) -> str:
        return self.ranking.path_for(epoch)

    @property
    def best(self) -> Optional[Tuple[float, int]]:
        return self.ranking.best

    @property
    def best_ema(self) -> Optional[Tuple[float, int]]:
        return self.ranking_ema.best if self.ranking_ema is not None else None

    def save_epoch(self, state: Dict[str, Any], epoch: int, metric: Optional[float],
                   metric_ema: Optional[float] = None) -> None:
        """Write ``last.pth`` (holding ``state`` plus the updated best-k lists) and refresh the best files."""
        new = self.ranking.updated(metric, epoch)
        state['best_k'] = [[m, e] for m, e in new]
        new_ema = None
        if self.ranking_ema is not None:
            new_ema = self.ranking_ema.updated(metric_ema, epoch)
            state['best_k_ema'] = [[m, e] for m, e in new_ema]
        atomic_save(state, self.last_path)
        self.ranking.keep(self.last_path, epoch, new)
        if self.ranking_ema is not None:
            self.ranking_ema.keep(self.last_path, epoch, new_ema)

    @property
    def recovery_path(self) -> str:
        return os.path.join(self.output_dir, RECOVERY_FILE)

    def save_recovery(self, state: Dict[str, Any], path: Optional[str] = None) -> None:
        """Write a mid-epoch checkpoint, best-k unchanged: ``last.pth`` (preemption) or ``path``
        (``recovery.pth`` every ``--recovery-interval`` updates, replacing the previous one)."""
        state['best_k'] = [[m, e] for m, e in self.ranking.entries]
        if self.ranking_ema is not None:
            state['best_k_ema'] = [[m, e] for m, e in self.ranking_ema.entries]
        atomic_save(state, path or self.last_path)

    def drop_recovery(self) -> None:
        """Remove ``recovery.pth`` once a newer ``last.pth`` holds the run."""
        if os.path.exists(self.recovery_path):
            os.remove(self.recovery_path)



def _progress(path: str) -> Optional[Tuple[int, int, int]]:
    """``(epoch, step_in_epoch, global_step)`` of a training checkpoint; None when unreadable."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- any unreadable file just does not compete (atomic writes make it rare)
        return None
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt:
        return None
    return int(ckpt['epoch']), int(ckpt.get('step_in_epoch', 0)), int(ckpt.get('global_step', 0))


def newest_checkpoint(output_dir: str) -> str:
    """``--resume auto``: the one of ``last.pth`` and ``recovery.pth`` in ``output_dir`` that is furthest into
    the run ('' when neither exists)."""
    found = []
    for name in (LAST_FILE, RECOVERY_FILE):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            progress = _progress(path)
            if progress is not None:
                found.append((progress, name == 'last.pth', path))  # a tie goes to last.pth
    if not found:
        last = os.path.join(output_dir, 'last.pth')
        return last if os.path.isfile(last) else ''  # unreadable: let --resume name the problem
    return max(found)[2]


def training_state(args, *, epoch: int, step_in_epoch: int, global_step: int, model, optimizer, scheduler,
                   ema=None, scaler=None, metric: Optional[float] = None, summary=None, rng=None,
                   epoch_stats: Optional[List[float]] = None, nonfinite_skipped: int = 0,
                   world_size: int = 1, updates_per_epoch: Optional[int] = None) -> Dict[str, Any]:
    """The checkpoint dict of a run (see the module docstring); ``rng``: every rank's :func:`get_rng_state`."""
    state = {
        'version': CHECKPOINT_VERSION,
        'arch': args.model,
        'epoch': epoch,
        'step_in_epoch': step_in_epoch,
        'global_step': global_step,
        'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scheduler': to_plain(scheduler.state_dict()),
        'args': to_plain(vars(args)),
        'metric': metric,
        'summary': to_plain(summary or []),
        'rng': rng,
        'epoch_stats': epoch_stats,
        'nonfinite_skipped': nonfinite_skipped,
        'world_size': world_size,
        'updates_per_epoch': updates_per_epoch,
    }
    if ema is not None:
        state['state_dict_ema'] = ema.module.state_dict()
    if scaler is not None:
        state['scaler'] = scaler.state_dict()
    return state


@dataclass
class ResumePoint:
    """Where a resumed run stands (from :func:`restore_training_state`)."""
    epoch: int = 0  # epochs completed
    step: int = 0  # batches of the next epoch done before a preemption
    global_step: int = 0
    epoch_stats: Optional[List[float]] = None
    nonfinite_skipped: int = 0
    summary: List[Dict[str, Any]] = field(default_factory=list)
    rng: Optional[List[Any]] = None
    rank_bn: Optional[List[Any]] = None  # mid-epoch: every rank's BatchNorm running statistics
    best_k: List[Tuple[float, int]] = field(default_factory=list)
    best_k_ema: List[Tuple[float, int]] = field(default_factory=list)
    checkpoint_args: Dict[str, Any] = field(default_factory=dict)
    schedule_changes: List[Tuple[str, Any, Any]] = field(default_factory=list)  # (option, checkpoint, now)


# Options that define the learning-rate schedule. When one of them differs from the checkpoint's, the
# schedule is rebuilt from the command line and stepped to the resumed epoch (timm's resume does the same);
# when none does, the scheduler's saved state is loaded, which keeps a resumed run bit-identical.
SCHEDULE_OPTIONS = ('sched', 'epochs', 'cooldown_epochs', 'warmup_epochs', 'warmup_lr', 'warmup_prefix', 'lr',
                    'min_lr', 'decay_epochs', 'decay_rate', 'sched_on_updates', 'patience_epochs', 'lr_noise',
                    'lr_noise_pct', 'lr_noise_std', 'lr_cycle_mul', 'lr_cycle_decay', 'lr_cycle_limit', 'lr_k_decay')
# Options a resumed run cannot change: the weights would not fit.
FIXED_OPTIONS = (('model', '--model'), ('num_classes', '--num-classes'), ('in_chans', '--in-chans'))


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return math.isclose(float(old), float(new), rel_tol=1e-12, abs_tol=0.0)
    return old == new


def changed_options(old_args: Dict[str, Any], args, names) -> List[Tuple[str, Any, Any]]:
    """``[(name, checkpoint value, current value)]`` for the ``names`` whose value differs; options the
    checkpoint does not record are taken as unchanged."""
    new = vars(args)
    return [(n, old_args[n], new.get(n)) for n in names if n in old_args and not _same(old_args[n], new.get(n))]


def describe_changes(changes: List[Tuple[str, Any, Any]]) -> str:
    """``'epochs 1 -> 2, lr 0.002 -> 0.001'``."""
    def fmt(v: Any) -> str:
        return f'{v:g}' if isinstance(v, float) else str(v)
    return ', '.join(f'{n} {fmt(a)} \u2192 {fmt(b)}' for n, a, b in changes)


def _load_module(module, state: Dict[str, Any], what: str, path: str) -> None:
    from models import CheckpointError
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = ' '.join(line.strip() for line in first[1:3]) if len(first) > 1 else str(e)
        raise CheckpointError(f'checkpoint {path}: {what} does not fit this model ({detail[:300]}); '
                              f'resume with the same --model, --model-kwargs and --num-classes') from None


def restore_training_state(path: str, args, *, model, optimizer, scheduler, ema=None, scaler=None,
                           world_size: int = 1, batches_per_epoch: int, updates_per_epoch: int) -> ResumePoint:
    """Load a checkpoint of train.py into the run's objects; RNG states are returned, not applied (they go
    last, after everything else that draws random numbers has been built). ``optimizer`` / ``scaler`` None:
    theirs are not restored (``--no-resume-opt``)."""
    from models import CheckpointError
    ckpt = read_training_checkpoint(path)
    if ckpt.get('arch') not in (None, args.model):
        raise CheckpointError(f'checkpoint {path} was trained with --model {ckpt.get("arch")}, '
                              f'not {args.model}; pass --model {ckpt.get("arch")}')
    old_args = dict(ckpt.get('args') or {})
    for name, flag in FIXED_OPTIONS:
        if name in old_args and old_args[name] is not None and getattr(args, name, None) is not None \
                and old_args[name] != getattr(args, name):
            raise CheckpointError(f'checkpoint {path} was trained with {flag} {old_args[name]}, not '
                                  f'{getattr(args, name)}: resume cannot change it (use --finetune {path} to '
                                  f'start a new run from its weights)')
    changes = changed_options(old_args, args, SCHEDULE_OPTIONS)
    old_updates = ckpt.get('updates_per_epoch')
    if old_updates is not None and args.sched_on_updates and int(old_updates) != updates_per_epoch:
        changes.append(('updates per epoch', int(old_updates), updates_per_epoch))
    _load_module(model, ckpt['state_dict'], 'state_dict', path)
    if ema is not None:
        if 'state_dict_ema' in ckpt:
            _load_module(ema.module, ckpt['state_dict_ema'], 'state_dict_ema', path)
        else:
            _logger.warning('%s has no EMA weights: the EMA restarts from the current weights', path)
            ema.module.load_state_dict(model.state_dict())
    if optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f'checkpoint {path}: optimizer state does not fit (--opt {args.opt}?): {e}') \
                from None
    else:
        _logger.info('%s: weights restored; the optimizer and loss scaler start afresh (--no-resume-opt)', path)
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if changes and optimizer is not None:
        # The saved schedule is replaced by the one just built from the command line; the optimizer's
        # groups keep their checkpointed lr until the caller steps the schedule to the resumed epoch.
        for group, base in zip(optimizer.param_groups, getattr(scheduler, 'base_values', [])):
            group['initial_lr'] = base
    elif ckpt.get('scheduler'):
        scheduler.load_state_dict(ckpt['scheduler'])
    point = ResumePoint(
        epoch=int(ckpt['epoch']), step=int(ckpt.get('step_in_epoch', 0)), epoch_stats=ckpt.get('epoch_stats'),
        nonfinite_skipped=int(ckpt.get('nonfinite_skipped', 0)), rng=ckpt.get('rng'), rank_bn=ckpt.get('rank_bn'),
        best_k=[(float(m), int(e)) for m, e in ckpt.get('best_k', [])],
        best_k_ema=[(float(m), int(e)) for m, e in ckpt.get('best_k_ema', [])],
        checkpoint_args=old_args, schedule_changes=changes)
    point.global_step = int(ckpt.get('global_step', point.epoch * updates_per_epoch))
    point.summary = [dict(r) for r in ckpt.get('summary', []) if int(r['epoch']) <= point.epoch]
    old = (int(ckpt.get('world_size', world_size)), int(point.checkpoint_args.get('batch_size', args.batch_size)))
    if point.step and old != (world_size, args.batch_size):
        # Another process count or batch: continue after about as many images as were done.
        done = point.step * old[0] * old[1]
        point.step = done // (world_size * args.batch_size)
        point.epoch_stats = None
        _logger.warning('checkpoint from %d processes x batch %d, now %d x %d: epoch %d continues after '
                        '~%d images, in another order', old[0], old[1], world_size, args.batch_size,
                        point.epoch + 1, done)
        point.step -= point.step % args.grad_accum_steps  # at an optimizer-update boundary
    if point.step >= batches_per_epoch:
        point.step = 0  # the data changed; restart the epoch
    if ckpt.get('original'):
        _logger.info('%s was written by the original release\'s train.py: weights, optimizer%s%s restored; the '
                     'schedule of the command line continues at epoch %d', path,
                     ', EMA' if 'state_dict_ema' in ckpt else '', ', loss scaler' if 'scaler' in ckpt else '',
                     point.epoch + 1)
    _logger.info('Resumed %s: %d epochs done%s', path, point.epoch,
                 f', {point.step} batches into epoch {point.epoch + 1}' if point.step else '')
    if changes:
        _logger.info('Options changed since the checkpoint: %s: schedule rebuilt from the command line, '
                     'resuming at epoch %d', describe_changes(changes), point.epoch + 1)
    return point
