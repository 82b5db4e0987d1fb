"""Runs that torchrun restarts by itself (``--max-restarts``): the process group forms again after a worker was
killed, a stop signal has a deadline, loader workers die with their parent, and a hard-killed run continues
from its recovery checkpoint to the weights of an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from tests.helpers import REPO, free_port, load, read_summary, state_dicts_equal, subprocess_env

WORKER = """
import os, sys, time, torch, torch.distributed as dist
from utils.distributed import init_distributed
if os.environ['RANK'] == os.environ['DELAYED_RANK']:
    time.sleep(1.5)  # joins late: the other rank must not form the group with what an earlier attempt left
info = init_distributed('cpu', timeout=60)
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print('formed', int(t.item()), flush=True)
dist.barrier()
time.sleep(60)  # in the next collective's place until the launcher kills it
"""


def _start_round(port: int, round_: int, restarts: List[int]) -> List[subprocess.Popen]:
    procs = []
    for rank in range(2):
        env = subprocess_env()
        env.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK='0', LOCAL_WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port), TORCHELASTIC_RUN_ID='restarts', TORCHELASTIC_USE_AGENT_STORE='True',
                   # as on two nodes whose agents count restarts differently
                   TORCHELASTIC_RESTART_COUNT=str(restarts[rank]), DELAYED_RANK=str(round_ % 2))
        procs.append(subprocess.Popen([sys.executable, '-c', WORKER], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def test_the_group_forms_again_in_every_restart_round():
    """Plays torchrun: it hosts the store every attempt shares, starts 2 workers per round (one of them late,
    the two with different restart counts as on two nodes), and once they formed the group kills one with
    SIGKILL and the other as the agent does. Without a store of their own per attempt the restarted workers
    read the addresses the previous attempt left (and fail to connect, or hang)."""
    import torch.distributed as dist
    port = free_port()
    store = dist.TCPStore('127.0.0.1', port, is_master=True, wait_for_workers=False)  # the agent's
    restarts = [0, 0]
    for round_ in range(3):
        procs = _start_round(port, round_, restarts)
        try:
            for p in procs:  # each prints once the group formed and the all-reduce summed 1 + 2
                line = p.stdout.readline()
                assert line.strip() == 'formed 3', (round_, line, p.stderr.read() if p.poll() is not None else '')
        finally:
            os.kill(procs[1].pid, signal.SIGKILL)  # a worker dies
            procs[0].kill()  # the agent stops the rest before it restarts them
            for p in procs:
                p.wait(timeout=30)
        restarts[0] += 1  # only the failed node's agent counts the restart
    del store


STUCK = """
import os, signal, sys, time
from utils.train_step import Preemption
p = Preemption(stop_timeout={timeout})
p.install()
os.kill(os.getpid(), getattr(signal, '{sig}'))
time.sleep(0.2)
print('requested', p.requested, flush=True)
time.sleep(30)  # a save blocked by a dead peer
"""


@pytest.mark.parametrize('sig, ends', [('SIGTERM', True), ('SIGUSR1', False)])
def test_a_blocked_stop_after_sigterm_dumps_the_stacks_and_exits(sig, ends):
    start = time.time()
    proc = subprocess.Popen([sys.executable, '-c', STUCK.format(timeout=1.0, sig=sig)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if ends:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 1 and time.time() - start < 10
        assert 'requested True' in out and 'Timeout' in err and 'line 9 in <module>' in err  # where it was stuck
    else:  # an early notice (SIGUSR1) leaves the save all the time it needs
        assert proc.stdout.readline().strip() == 'requested True'
        time.sleep(2)
        assert proc.poll() is None
        proc.kill()
        proc.wait()


PARENT = """
import os, sys, time, torch
from utils.train_step import worker_init

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, i):
        return torch.tensor(os.getpid())

loader = torch.utils.data.DataLoader(Slow(), batch_size=1, num_workers=2, persistent_workers=True,
                                     worker_init_fn=worker_init)
pids = {int(x) for _, x in zip(range(6), loader)}
print(' '.join(map(str, sorted(pids))), flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f'/proc/{pid}/stat') as f:  # a zombie is gone (its parent has not reaped it yet)
        return f.read().split(')')[-1].split()[0] != 'Z'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the parent-death signal is Linux-only')
def test_loader_workers_die_with_a_killed_parent():
    proc = subprocess.Popen([sys.executable, '-c', PARENT], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


# --- end to end ----------------------------------------------------------------------------------------------

def _torchrun(argv: List[str], log: Path, rendezvous: str, restarts: int = 3) -> List[subprocess.Popen]:
    """The launch: one torchrun with 2 workers (static or standalone rendezvous), or two torchruns of one worker
    each, as two nodes meeting in a c10d rendezvous."""
    base = [sys.executable, '-m', 'torch.distributed.run', '--max-restarts', str(restarts)]
    if rendezvous == 'two-nodes':
        endpoint = f'127.0.0.1:{free_port()}'
        cmds = [base + ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint',
                        endpoint, '--rdzv-id', 'restarts'] for _ in range(2)]
    else:
        rdzv = ['--standalone'] if rendezvous == 'standalone' else ['--master_port', str(free_port())]
        cmds = [base + ['--nproc_per_node', '2', *rdzv]]
    procs = []
    with open(log, 'w') as f:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd + ['train.py', *argv], cwd=REPO, env=subprocess_env(), stdout=f,
                                          stderr=subprocess.STDOUT))
    return procs


def _processes_of(out: Path) -> List[str]:
    found = subprocess.run(['pgrep', '-f', str(out)], capture_output=True, text=True).stdout.split()
    return [p for p in found if int(p) != os.getpid()]


@pytest.fixture(scope='module')
def reference_run(data_dir, tmp_path_factory) -> Path:
    """One uninterrupted run that serves every case: its weights do not depend on -j."""
    ref = tmp_path_factory.mktemp('ref')
    [proc] = _torchrun(_restart_argv(data_dir, '0') + ['--output', str(ref)], ref / 'launch.log', 'static')
    assert proc.wait(timeout=300) == 0, (ref / 'launch.log').read_text()[-3000:]
    return ref


def _restart_argv(data_dir: Path, workers: str) -> List[str]:
    from tests.test_train import RESUME_ARGS
    return RESUME_ARGS + ['--data-dir', str(data_dir), '-j', workers, '--epochs', '2', '--recovery-interval', '2',
                          '--resume', 'auto']


def _kill_after_recovery(procs: List[subprocess.Popen], log: Path) -> float:
    """SIGKILL one worker of the last launcher once a recovery checkpoint is written mid-epoch; the time."""
    deadline = time.time() + 240
    while 'Recovery checkpoint: epoch 1, batch 2 of 3' not in log.read_text() and \
            all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.02)
    workers = subprocess.run(['pgrep', '-P', str(procs[-1].pid)], capture_output=True, text=True).stdout.split()
    assert workers, log.read_text()[-3000:]
    os.kill(int(workers[-1]), signal.SIGKILL)  # as the OOM killer would
    return time.time()


def _same_run(ref: Path, out: Path) -> None:
    a, b = load(ref / 'last.pth'), load(out / 'last.pth')
    assert state_dicts_equal(a, b) is None, state_dicts_equal(a, b)
    assert a['global_step'] == b['global_step']
    assert [r['train_loss'] for r in read_summary(out / 'summary.csv')] == \
        [r['train_loss'] for r in read_summary(ref / 'summary.csv')]


@pytest.mark.slow
def test_hard_kill_then_the_same_command_resumes_exactly(reference_run, data_dir, tmp_path):
    """Without restarts (the launcher gives up): SIGKILL of one worker mid-epoch leaves recovery.pth; the same
    command again continues from it to the weights of the uninterrupted run."""
    argv = _restart_argv(data_dir, '2') + ['--output', str(tmp_path / 'run')]
    procs = _torchrun(argv, tmp_path / 'first.log', 'static', restarts=0)
    try:
        _kill_after_recovery(procs, tmp_path / 'first.log')
        code = procs[0].wait(timeout=120)
    finally:
        if procs[0].poll() is None:
            procs[0].kill()
    assert code != 0
    recovery = load(tmp_path / 'run' / 'recovery.pth')
    assert (recovery['epoch'], recovery['step_in_epoch']) >= (0, 2)
    [proc] = _torchrun(argv, tmp_path / 'rerun.log', 'static', restarts=0)  # the same command
    assert proc.wait(timeout=300) == 0, (tmp_path / 'rerun.log').read_text()[-3000:]
    assert f'Resumed {tmp_path / "run" / "recovery.pth"}' in (tmp_path / 'rerun.log').read_text()
    _same_run(reference_run, tmp_path / 'run')


@pytest.mark.slow
@pytest.mark.parametrize('rendezvous, workers', [('static', '0'), ('standalone', '2'), ('two-nodes', '2')])
def test_torchrun_restarts_a_killed_run_by_itself_exactly(rendezvous, workers, reference_run, data_dir, tmp_path):
    """torchrun --max-restarts 3, 2 CPU processes (gloo), one worker SIGKILLed after a recovery checkpoint:
    torchrun restarts the workers, they resume from recovery.pth, torchrun exits 0 with the weights of an
    uninterrupted run; within 30 s of the kill the run is back; no process is left. ``two-nodes``: two torchruns
    of one worker each in a c10d rendezvous, the second one's worker killed (its agent counts a restart, the
    other's does not)."""
    out, log = tmp_path / 'run', tmp_path / 'launch.log'
    procs = _torchrun(_restart_argv(data_dir, workers) + ['--output', str(out)], log, rendezvous)
    try:
        killed = _kill_after_recovery(procs, log)
        while 'Resumed' not in log.read_text() and time.time() < killed + 120:
            time.sleep(0.05)
        back = time.time() - killed
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = log.read_text()
    assert codes == [0] * len(procs), text[-3000:]
    assert f'Resumed {out / "recovery.pth"}' in text and back < 30, (back, text[-2000:])
    _same_run(reference_run, out)
    deadline = time.time() + 5
    while _processes_of(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not _processes_of(out)
