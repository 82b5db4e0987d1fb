"""The parts of one training step, each small enough to test alone: the accumulation plan, the forward and
backward pass, the optimizer update, the guard against non-finite losses, the progress log and preemption.
"""
import contextlib
import datetime
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .checkpoint import LAST_FILE
from .cli import na2d_backend_advice
from .data import seed_worker
from .distributed import DistInfo, any_true

__all__ = [
    'NonFiniteLoss', 'Preemption', 'worker_init', 'die_with_parent', 'close_loader', 'autocast', 'compute_loss', 'accumulation_group',
    'forward_backward', 'optimizer_step', 'NonFiniteGuard', 'ProgressLog', 'fmt_eta',
]

_logger = logging.getLogger('train')


class NonFiniteLoss(RuntimeError):
    """A NaN / inf loss; the message names the step and the last good checkpoint."""


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop saves a recovery checkpoint at the next step boundary.

    SIGTERM also arms a deadline (``stop_timeout`` seconds): a launcher sends it when a peer has died (torchrun,
    before it restarts the workers) or when the allocation ends, and then kills the process after a grace period
    (torchrun: 30 s). When the save cannot finish in time — a dead peer blocks its collectives — the stacks of
    every thread are written to stderr and the process exits with code 1, so that a restart starts promptly.
    SIGUSR1, an early notice, has no deadline.

    Args:
        stop_timeout: seconds after SIGTERM (None: no deadline).
    """

    SIGNALS = tuple(s for s in (getattr(signal, 'SIGTERM', None), getattr(signal, 'SIGUSR1', None)) if s is not None)

    def __init__(self, stop_timeout: Optional[float] = None):
        self.signum: Optional[int] = None
        self.stop_timeout = stop_timeout
        self._previous: Dict[int, Any] = {}
        self._armed = False

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # only set a flag (and arm the deadline): logging or saving here is not safe
        if signum == getattr(signal, 'SIGTERM', None) and self.stop_timeout and not self._armed:
            import faulthandler
            import sys
            faulthandler.dump_traceback_later(self.stop_timeout, exit=True, file=sys.stderr)
            self._armed = True

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
        if self._armed:
            import faulthandler
            faulthandler.cancel_dump_traceback_later()
            self._armed = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        names = {getattr(signal, 'SIGTERM', -1): 'SIGTERM', getattr(signal, 'SIGUSR1', -2): 'SIGUSR1'}
        return names.get(self.signum, str(self.signum))


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent dies. Loader workers take SIGKILL (a
    hard-killed trainer leaves none behind, holding its sockets and memory); a trainer started by torchrun takes
    SIGTERM (a launcher that died leaves no orphaned run: it saves and stops). Elsewhere nothing; returns
    whether it is set."""
    import sys
    if not sys.platform.startswith('linux'):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def worker_init(worker_id: int) -> None:
    """DataLoader worker init: seed python/numpy, ignore the preemption signals, die with the parent."""
    seed_worker(worker_id)
    # Preemption signals are for the main process, which stops the loader cleanly; a worker killed by them
    # would make the next batch fail before the recovery checkpoint is written.
    for s in Preemption.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if die_with_parent() and os.getppid() == 1:  # the trainer died before the request took effect
        os._exit(0)


def close_loader(batches) -> None:
    """Stop a DataLoader iterator's workers now. On an error the traceback keeps the iterator alive until
    interpreter exit, where multiprocessing would SIGTERM the workers, which ignore it (see worker_init)."""
    shutdown = getattr(batches, '_shutdown_workers', None)  # absent for num_workers=0
    if shutdown is not None:
        shutdown()


def autocast(enabled: bool, device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` for ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_loss(criterion: Callable, output, target: torch.Tensor,
                 aux_ratio: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(loss, aux)``: ``main + aux_ratio x aux`` when the model returns both heads (an OverLoCK built with
    ``use_ds=True``, as ``build_model`` does; aux detached), else ``(criterion(output), None)``."""
    if isinstance(output, dict):
        main = criterion(output['main'], target)
        aux = criterion(output['aux'], target)
        return main + aux_ratio * aux, aux.detach()
    return criterion(output, target), None


def accumulation_group(i: int, n: int, accum: int) -> Tuple[int, bool]:
    """For batch ``i`` of ``n`` with ``accum`` batches per update: ``(group size, update after this batch)``.
    The last group of an epoch may be shorter; its losses are averaged over its own size."""
    start = (i // accum) * accum
    size = min(accum, n - start)
    return size, i + 1 == start + size


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, group_size: int,
                     scaler: Optional[torch.amp.GradScaler], amp_context: Callable,
                     no_sync: Optional[Callable] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward, loss, and backward of ``loss / group_size`` (scaled with ``scaler``); gradients add up
    until the update. ``no_sync``: DDP's context that skips the all-reduce (all batches of a group but the
    last). Returns the detached ``(loss, aux)``."""
    with no_sync() if no_sync is not None else contextlib.nullcontext():
        with amp_context():
            output = model(x)
            loss, aux = loss_fn(output, y)
        scaled = loss / group_size
        if scaler is not None:
            scaled = scaler.scale(scaled)
        scaled.backward()
    return loss.detach(), aux


def optimizer_step(optimizer: torch.optim.Optimizer, params: Callable, scaler: Optional[torch.amp.GradScaler],
                   clip_grad: Optional[float], clip_mode: str = 'norm') -> None:
    """Clip (after unscaling), step (the scaler skips a step whose gradients overflowed) and zero the grads."""
    from timm.utils import dispatch_clip_grad
    if scaler is not None:
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(params(), clip_grad, mode=clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip_grad is not None:
            dispatch_clip_grad(params(), clip_grad, mode=clip_mode)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class NonFiniteGuard:
    """Watches the losses for NaN / inf, checking lazily (one device sync per log interval), as the original
    handles them: where steps with a non-finite loss are skipped (the float16 loss scaler skips a step whose
    gradients overflow; ``--skip-nonfinite`` skips them without a scaler) training goes on, and stops only
    when ``limit`` consecutive updates had a non-finite loss; where nothing would skip them (float32,
    bfloat16), the first one stops the run before the weights it spoiled are saved.

    Losses are recorded with :meth:`add` per update; :meth:`check` raises :class:`NonFiniteLoss` naming the
    step and the last good checkpoint.

    Args:
        info: process placement (a stop on any process stops all of them).
        batches_per_epoch: for the message.
        output: run folder (the message names its ``last.pth``).
        tolerate: steps with a non-finite loss are skipped (loss scaler or --skip-nonfinite).
        limit: with ``tolerate``, stop after this many consecutive non-finite updates (0: never).
    """

    def __init__(self, info: DistInfo, batches_per_epoch: int, output: str, tolerate: bool = False,
                 limit: int = 0):
        self.info = info
        self.batches_per_epoch = batches_per_epoch
        self.output = output
        self.tolerate = tolerate
        self.limit = limit
        self.pending: List[Tuple[int, int, torch.Tensor]] = []  # (epoch, first batch, losses of one update)
        self.streak = 0  # consecutive updates with a non-finite loss
        self.skipped = 0  # updates with a non-finite loss seen while tolerating them

    def add(self, epoch: int, batch: int, losses: torch.Tensor) -> None:
        """Record the losses of one update whose first batch is ``batch`` (0-based) of ``epoch``."""
        self.pending.append((epoch, batch, losses.reshape(-1)))

    def skipped_now(self, epoch: int, batch: int) -> None:
        """An update already found non-finite and skipped (``--skip-nonfinite``, checked at once)."""
        self.skipped += 1
        self.streak += 1
        if self.limit and self.streak >= self.limit:  # every process took the same decision
            raise NonFiniteLoss(self._persist_message(epoch, batch))

    def advice(self) -> str:
        last = os.path.join(self.output, LAST_FILE)
        skip = '' if self.tolerate else ', or pass --skip-nonfinite to skip such steps'
        backend = na2d_backend_advice(self.info.device.type)
        backend = f'. {backend}' if backend else ''
        if os.path.isfile(last):
            return (f'last good checkpoint: {last}. Resume from it in float32 (drop --amp) or with a lower '
                    f'--lr{skip}{backend}')
        return f'no checkpoint written yet; restart in float32 (drop --amp) or with a lower --lr{skip}{backend}'

    def _persist_message(self, epoch: int, batch: int) -> str:
        return (f'non-finite loss in {self.streak} consecutive updates (the last at epoch {epoch + 1}, step '
                f'{batch + 1} of {self.batches_per_epoch}): skipping them did not help; {self.advice()}')

    def check(self) -> None:
        """Go through the recorded updates (one sync for all of them); raise NonFiniteLoss to stop."""
        pending = self.pending
        if not pending:
            return
        sizes = [p[2].numel() for p in pending]
        losses = torch.cat([p[2].float() for p in pending])
        finite = torch.isfinite(losses)
        if not self.tolerate:
            bad_local = not bool(finite.all())
            if any_true(bad_local, self.info):
                if bad_local:
                    i = int((~finite).nonzero()[0])
                    u = next(k for k in range(len(sizes)) if sum(sizes[:k + 1]) > i)
                    epoch, step = pending[u][0], pending[u][1] + i - sum(sizes[:u])
                    where = f'({float(losses[i])}) at epoch {epoch + 1}, step {step + 1} of {self.batches_per_epoch}'
                else:
                    where = f'on another process, epoch {pending[0][0] + 1} near step {pending[0][1] + 1}'
                raise NonFiniteLoss(f'non-finite loss {where}; {self.advice()}')
            pending.clear()
            return
        flags = finite.tolist()
        stop_at = None
        offset = 0
        before = self.skipped
        for (epoch, batch, _), n in zip(pending, sizes):
            if all(flags[offset:offset + n]):
                self.streak = 0
            else:
                self.skipped += 1
                self.streak += 1
                if self.limit and self.streak >= self.limit and stop_at is None:
                    stop_at = (epoch, batch + n - 1)
            offset += n
        if self.skipped > before:
            _logger.warning('epoch %d: %d update(s) with a non-finite loss skipped (%d so far)',
                            pending[-1][0] + 1, self.skipped - before, self.skipped)
        pending.clear()
        if any_true(stop_at is not None, self.info):
            if stop_at is None:
                raise NonFiniteLoss(f'non-finite losses persisted on another process; {self.advice()}')
            raise NonFiniteLoss(self._persist_message(*stop_at))


def fmt_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class ProgressLog:
    """The ``Train:`` line every ``interval`` updates: window and epoch mean loss, lr, images/s, data time
    per batch and the epoch's ETA. Sums stay on the device until a line is written.

    Args:
        interval: optimizer updates between lines.
        images_per_update: batch x accumulation x processes.
        device: where the loss sums live.
    """

    def __init__(self, interval: int, images_per_update: int, device: torch.device):
        self.interval = interval
        self.images_per_update = images_per_update
        self.window = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, batches since last line
        self.t_line = time.time()
        self.data_time = 0.0
        self.batches = 0
        self.updates = 0

    def add_loss(self, loss: torch.Tensor, finite: Optional[torch.Tensor] = None) -> None:
        """Add a batch's loss (``finite``: whether it counts; non-finite losses stay out of the means)."""
        if finite is None:
            self.window[0] += loss.double()
            self.window[1] += 1
        else:
            self.window[0] += torch.where(finite, loss, 0).double()
            self.window[1] += finite

    def add_data_time(self, seconds: float) -> None:
        self.data_time += seconds
        self.batches += 1

    def due(self, update_idx: int, last: bool) -> bool:
        return update_idx % self.interval == 0 or last

    def line(self, epoch: int, num_epochs: int, update_idx: int, updates_per_epoch: int, epoch_mean: float,
             lr: float) -> str:
        elapsed = time.time() - self.t_line
        left = (updates_per_epoch - update_idx) * elapsed / max(1, self.updates)
        w = self.window.tolist()
        width = len(str(updates_per_epoch))
        return (f'Train: {epoch + 1}/{num_epochs} [{update_idx:{width}d}/{updates_per_epoch} '
                f'({100.0 * update_idx / updates_per_epoch:3.0f}%)] loss {w[0] / max(1, w[1]):.4f} '
                f'({epoch_mean:.4f})  lr {lr:.3e}  '
                f'{self.updates * self.images_per_update / max(elapsed, 1e-9):.1f} img/s  '
                f'data {self.data_time / max(1, self.batches):.3f}s  ETA {fmt_eta(left)}')

    def reset(self) -> None:
        self.window.zero_()
        self.t_line, self.data_time, self.batches, self.updates = time.time(), 0.0, 0, 0
