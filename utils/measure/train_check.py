"""The GPU training check: ``train.py`` launched through torchrun with a shipped recipe, once per AMP dtype, on a
dataset that needs no download, and one table read from the runs' own outputs (``summary.csv`` and the log).

``python -m scripts.gpu_train_check`` is the command line over it; docs/benchmarks.md ("The GPU report") says
what it checks.
"""
import argparse
import csv
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['RunPlan', 'RunResult', 'plan_epochs', 'recipe_args', 'make_plan', 'train_command', 'launch', 'run_check',
           'read_run', 'report_markdown']

REPO = Path(__file__).resolve().parents[2]
TAIL_LINES = 30

# train.py's own log lines (utils/train_loop.py): the run's geometry at the start, and on CUDA the peak memory
# at the end of each epoch.
_GEOMETRY = re.compile(r'(\d+) process\(es\) x batch (\d+) x (\d+) accumulation = global batch (\d+) .*'
                       r', (\d+) updates per epoch')
_PEAK_MEM = re.compile(r'peak mem ([0-9.]+) GiB')
# torchrun's line when a worker fails; the traceback of its own that follows says nothing about the cause.
_LAUNCHER_FAILURE = re.compile(r'torch/distributed/elastic/.*failed \(exitcode: -?\d+\)')


@dataclass
class RunPlan:
    """What every run of the check shares: the launch and the options that differ from the recipe."""
    config: str  # the shipped recipe, e.g. configs/overlock_t.yaml
    data_dir: str
    processes: int
    batch: int
    workers: int
    epochs: int  # --epochs (the recipe's cool-down epochs come on top unless ``cooldown`` is set)
    cooldown: Optional[int]  # --cooldown-epochs when the requested steps leave no room for the recipe's
    updates_per_epoch: int
    expected_steps: int
    sync_bn: bool = True  # the recipe's --sync-bn (SyncBatchNorm when several CUDA processes train)
    device: str = 'cuda'
    flags: Sequence[str] = ('--channels-last', '--compile', '--model-ema')
    extra: Sequence[str] = ()  # further train.py options (the CPU smoke run: image size, tiny model)


@dataclass
class RunResult:
    """One run, as its outputs report it."""
    amp_dtype: str
    output: str
    log: str
    exit_code: Optional[int]  # None: killed after the time limit
    wall_s: float
    expected_steps: int
    steps: int = 0
    epochs: int = 0
    global_batch: int = 0
    first_epoch_s: Optional[float] = None
    images_per_s: Optional[float] = None
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    top1: Optional[float] = None
    ema_top1: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    skipped: Optional[int] = None
    tail: List[str] = field(default_factory=list)

    @property
    def problem(self) -> str:
        """Why the run fails the check ('' when it passes)."""
        if self.exit_code is None:
            return 'timed out'
        if self.exit_code != 0:
            return f'exit {self.exit_code}'
        if not self.epochs:
            return 'no epoch finished'
        if self.loss_last is None or not math.isfinite(self.loss_last):
            return 'loss not finite'
        if self.steps != self.expected_steps:
            return f'{self.steps} of {self.expected_steps} steps'
        return ''

    @property
    def verdict(self) -> str:
        return f'FAIL ({self.problem})' if self.problem else 'PASS'


def plan_epochs(n_train: int, batch: int, processes: int, steps: int, cooldown: int) -> Tuple[int, Optional[int], int]:
    """``(--epochs, --cooldown-epochs or None, updates per epoch)`` for about ``steps`` optimizer updates.

    train.py drops the last incomplete batch of each process's shard, so an epoch has
    ``ceil(n_train / processes) // batch`` updates; the recipe's cool-down epochs are kept and counted, and only
    when the steps asked for are too few for them is ``--cooldown-epochs 0`` passed.
    """
    per_process = math.ceil(n_train / processes)
    updates = per_process // batch
    if updates < 1:
        raise ValueError(f'{n_train} training images over {processes} process(es) give fewer than one batch of '
                         f'{batch} each; lower the batch')
    total = max(1, round(steps / updates))
    if total > cooldown:
        return total - cooldown, None, updates
    return total, 0, updates


def recipe_args(config: str) -> argparse.Namespace:
    """train.py's options as the recipe sets them (its parser with the config file as the defaults)."""
    from utils.cli import parse_args_with_config
    from utils.config import build_train_parser
    return parse_args_with_config(build_train_parser(), ['-c', config])


def make_plan(config: str, data_dir: str, n_train: int, processes: int, batch: int, workers: int, steps: int,
              device: str = 'cuda', compile: bool = True, extra: Sequence[str] = ()) -> RunPlan:
    """The runs' shared settings for about ``steps`` updates of the recipe ``config`` (a path under the
    repository root) on ``n_train`` training images. Raises ValueError when one batch does not fit."""
    recipe = recipe_args(str(REPO / config))
    epochs, cooldown, updates = plan_epochs(n_train, batch, processes, steps, recipe.cooldown_epochs)
    total = epochs + (recipe.cooldown_epochs if cooldown is None else cooldown)
    flags = ('--channels-last', '--compile', '--model-ema') if compile else ('--channels-last', '--model-ema')
    return RunPlan(config=config, data_dir=data_dir, processes=processes, batch=batch, workers=workers,
                   epochs=epochs, cooldown=cooldown, updates_per_epoch=updates, expected_steps=total * updates,
                   sync_bn=bool(recipe.sync_bn), device=device, flags=flags, extra=tuple(extra))


def train_command(plan: RunPlan, amp_dtype: str, output: str) -> List[str]:
    """torchrun (``python -m torch.distributed.run``) over train.py with the recipe and the check's changes."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={plan.processes}',
           'train.py', '-c', plan.config, '--data-dir', plan.data_dir, '-b', str(plan.batch),
           '-j', str(plan.workers), '--epochs', str(plan.epochs)]
    if plan.cooldown is not None:
        cmd += ['--cooldown-epochs', str(plan.cooldown)]
    if plan.device != 'cuda':
        cmd += ['--device', plan.device]
    cmd += ['--amp', '--amp-dtype', amp_dtype, *plan.flags, *plan.extra, '--output', output, '--overwrite']
    return cmd


def launch(cmd: Sequence[str], log: str, timeout: Optional[float] = None,
           show: bool = True) -> Tuple[Optional[int], float]:
    """Run ``cmd`` from the repository root in its own process group, its output into ``log`` (and onto the
    terminal with ``show``). Returns ``(exit code or None when killed after timeout seconds, wall seconds)``."""
    start = time.time()
    with open(log, 'w', encoding='utf-8') as f:
        proc = subprocess.Popen(list(cmd), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))

        def copy() -> None:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if show:
                    print('  ' + line, end='', flush=True)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code: Optional[int] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            _stop(proc)
        except BaseException:  # Ctrl-C: the launcher and its workers must not outlive the check
            _stop(proc)
            raise
        reader.join(timeout=10)
    return code, time.time() - start


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (train.py saves and exits), SIGKILL after a minute."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_check(plan: RunPlan, amp_dtypes: Sequence[str], work: Path, timeout: Optional[float] = None,
              show: bool = True) -> Tuple[List[RunResult], Dict[str, List[str]]]:
    """One run per AMP dtype, each into ``work/<dtype>/`` with its console log ``work/<dtype>.log``.
    Returns the results and the command lines as shown (``python`` for the interpreter's path)."""
    results, commands = [], {}
    for dtype in amp_dtypes:
        output, log = work / dtype, work / f'{dtype}.log'
        cmd = train_command(plan, dtype, str(output))
        commands[dtype] = ['python', *cmd[1:]]
        print(f'\n{dtype}: $ {shlex.join(commands[dtype])}', flush=True)
        code, wall = launch(cmd, str(log), timeout=timeout, show=show)
        result = read_run(RunResult(amp_dtype=dtype, output=str(output), log=str(log), exit_code=code, wall_s=wall,
                                    expected_steps=plan.expected_steps))
        print(f'{dtype}: {result.verdict}, log {log}', flush=True)
        results.append(result)
    return results, commands


def _float(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value not in (None, '') else None
    except ValueError:
        return None


def read_run(result: RunResult) -> RunResult:
    """Fill ``result`` from the run's ``summary.csv`` and its console log."""
    text = Path(result.log).read_text(encoding='utf-8', errors='replace') if os.path.exists(result.log) else ''
    lines = text.splitlines()
    cut = next((i for i, line in enumerate(lines) if _LAUNCHER_FAILURE.search(line)), len(lines))
    result.tail = lines[max(0, cut - TAIL_LINES):cut + 1]
    geometry = _GEOMETRY.search(text)
    updates = int(geometry.group(5)) if geometry else 0
    result.global_batch = int(geometry.group(4)) if geometry else 0
    peaks = _PEAK_MEM.findall(text)
    result.peak_mem_gib = max(map(float, peaks)) if peaks else None
    summary = Path(result.output) / 'summary.csv'
    if not summary.is_file():
        return result
    with open(summary, newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return result
    result.epochs = len(rows)
    result.steps = updates * len(rows)
    result.loss_first, result.loss_last = _float(rows[0].get('train_loss')), _float(rows[-1].get('train_loss'))
    result.top1, result.ema_top1 = _float(rows[-1].get('eval_top1')), _float(rows[-1].get('eval_ema_top1'))
    skipped = _float(rows[-1].get('nonfinite_skipped'))
    result.skipped = int(skipped) if skipped is not None else None
    times = [_float(r.get('epoch_time')) for r in rows]
    result.first_epoch_s = times[0]
    # The first epoch holds compilation and warm-up: images/s is the median of the later ones when there are any.
    steady = [t for t in (times[1:] or times) if t]
    if steady and updates and result.global_batch:
        result.images_per_s = updates * result.global_batch / statistics.median(steady)
    return result


def _num(value: Optional[float], fmt: str) -> str:
    return '–' if value is None else format(value, fmt)


def _row(r: RunResult) -> Dict[str, str]:
    loss = '–' if r.loss_last is None else f'{_num(r.loss_first, ".3f")} → {_num(r.loss_last, ".3f")}'
    return {
        'AMP': r.amp_dtype, 'result': r.verdict,
        'exit': '–' if r.exit_code is None else str(r.exit_code),
        'steps': f'{r.steps} / {r.expected_steps}', 'wall s': f'{r.wall_s:.0f}',
        '1st epoch s': _num(r.first_epoch_s, '.1f'), 'img/s': _num(r.images_per_s, '.0f'),
        'train loss 1st → last epoch': loss, 'top-1': _num(r.top1, '.2f'), 'EMA top-1': _num(r.ema_top1, '.2f'),
        'peak mem GiB': _num(r.peak_mem_gib, '.2f'),
        'non-finite skipped': '–' if r.skipped is None else str(r.skipped),
    }


def report_markdown(results: Sequence[RunResult], environment: str, plan: RunPlan,
                    commands: Dict[str, List[str]], title: str = 'GPU training check') -> str:
    """The check's report: environment, one table, the commands, and the log tail of every failed run."""
    from utils.evaluate import markdown_table
    rows = [_row(r) for r in results]
    cpu = plan.device == 'cpu'
    if plan.processes == 1:
        group = ('1 process: train.py runs without a process group (no DDP, NCCL or SyncBN; '
                 '`--gpus 2` or more exercises them)')
    else:
        sync_bn = 'SyncBN' if plan.sync_bn and not cpu else 'BatchNorm (SyncBN needs CUDA)' if cpu else 'BatchNorm'
        group = f'{plan.processes} processes: DDP over {"gloo" if cpu else "NCCL"}, {sync_bn}'
    epochs = plan.expected_steps // plan.updates_per_epoch
    parts = [
        f'# {title}', '', environment, '',
        f'{plan.config}: {epochs} epoch(s) of {plan.updates_per_epoch} update(s); {group}. '
        f'img/s: training images per second of an epoch (its data-loader start-up included), the median over '
        f'the epochs after the first, which includes compilation (`python -m scripts.gpu_report` times the '
        f'training step alone); top-1 after the last epoch on the validation split.', '',
        markdown_table(rows, list(rows[0]) if rows else []), '', 'Commands:', '', '```',
        *(shlex.join(commands[r.amp_dtype]) for r in results), '```',
    ]
    for r in results:
        if r.problem:
            parts += ['', f'## {r.amp_dtype}: last lines of {r.log}', '', '```', *r.tail, '```']
    return '\n'.join(parts) + '\n'
