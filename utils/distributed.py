"""Process-group setup for torchrun (RANK / WORLD_SIZE / LOCAL_RANK) and small collective helpers.

NCCL on CUDA, gloo on the CPU. Every helper is a no-op in a single process, so the training loop reads the
same either way.
"""
import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    'DistInfo', 'init_distributed', 'attempt_store', 'launched_by_torchrun', 'DEFAULT_DIST_TIMEOUT', 'barrier', 'all_reduce_sum', 'all_gather_objects', 'any_true',
    'distribute_bn_stats', 'cleanup',
]

_logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    """Where this process runs: rank 0 alone writes files and logs."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == '':
        return default
    try:
        return int(value)
    except ValueError:
        from .cli import UsageError
        raise UsageError(f'environment variable {name}={value!r} is not an integer (set by torchrun)') from None


DEFAULT_DIST_TIMEOUT = 1800  # seconds: above a first-use kernel compilation and a checkpoint write
_ATTEMPT_KEY = 'overlock/attempt_store'  # in the launcher's store: where this attempt's own store is


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run, or the legacy launch) started this process: it may restart it."""
    return 'TORCHELASTIC_RUN_ID' in os.environ


def _launcher_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The store at MASTER_ADDR:MASTER_PORT: torchrun's own (its agent serves it) or one rank 0 hosts."""
    addr, port = os.environ.get('MASTER_ADDR', '127.0.0.1'), _env_int('MASTER_PORT', 29500)
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        return dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    return dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)


def attempt_store(base: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta,
                  host: Optional[str] = None) -> dist.Store:
    """A store of this attempt alone, for the process group to form in.

    torchrun keeps one store across its restarts, and the process group writes the same keys in it every time,
    so a restarted rank can read the address of a peer that died (and fail to connect, or hang). Here rank 0
    starts a fresh store on a free port and announces it, with a random token, in the launcher's store; the
    other ranks connect to the announced store and check the token. An announcement left by an earlier attempt
    points at a store whose process is gone (every worker is restarted together), so a rank that reads it
    cannot connect and reads again until this attempt's announcement replaces it. No restart count is needed,
    so nodes whose agents count restarts differently still agree.

    Args:
        base: the launcher's store (every rank can reach it).
        host: the address other nodes reach rank 0 at (default: this host's fully qualified name; on one node,
            the loopback).
    """
    import socket
    import uuid
    if rank == 0:
        if host is None:
            host = os.environ.get('OVERLOCK_STORE_HOST') or (
                '127.0.0.1' if _env_int('LOCAL_WORLD_SIZE', world_size) == world_size else socket.getfqdn())
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set('token', token)
        base.set(_ATTEMPT_KEY, f'{token} {host} {store.port}')
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        token, host, port = base.get(_ATTEMPT_KEY).decode().split(' ')
        try:
            # A plain connection first: an earlier attempt's store refuses it at once (TCPStore itself would
            # retry for its whole timeout, logging each try).
            socket.create_connection((host, int(port)), timeout=2).close()
            store = dist.TCPStore(host, int(port), world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
            if store.get('token').decode() == token:
                store.set_timeout(timeout)
                return store
        except (OSError, RuntimeError, ValueError):  # refused (an earlier attempt's store is gone), timed out
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f'rank {rank}: no store of this attempt announced by rank 0 within '
                               f'{timeout.total_seconds():.0f}s (--dist-timeout)')
        time.sleep(0.1)


def init_distributed(device: Optional[str] = None, local_rank: Optional[int] = None,
                     init_method: str = 'env://', timeout: float = DEFAULT_DIST_TIMEOUT) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 and pick this process's device.

    Under torchrun the group forms in a store of its own per attempt (:func:`attempt_store`), so that the
    workers torchrun restarts (``--max-restarts``) form it again.

    Args:
        device: 'cuda', 'cpu', 'cuda:N' or None (CUDA when available).
        local_rank: ``--local-rank`` as ``python -m torch.distributed.launch`` passes it; used only when the
            LOCAL_RANK environment variable is not set.
        init_method: ``--dist_url``: where the processes meet (env:// reads MASTER_ADDR / MASTER_PORT, as
            torchrun sets them; tcp://HOST:PORT or file:///PATH otherwise).
        timeout: ``--dist-timeout``: seconds a collective (and forming the group) may wait for a peer.
    """
    from .cli import UsageError
    world_size = _env_int('WORLD_SIZE', 1)
    rank = _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', 0 if local_rank is None else local_rank)
    if device is None or device == '':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f'--device {device}: CUDA is not available on this machine; use --device cpu')
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise UsageError(f'LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs visible; '
                                 f'lower --nproc_per_node / GPUS')
            dev = torch.device('cuda', local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        kwargs = {'device_id': dev} if dev.type == 'cuda' else {}
        limit = datetime.timedelta(seconds=timeout)
        if init_method and init_method != 'env://':
            kwargs['init_method'] = init_method
        elif launched_by_torchrun():
            kwargs['store'] = attempt_store(_launcher_store(rank, world_size, limit), rank, world_size, limit)
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=limit, **kwargs)
        except ValueError as e:  # a malformed URL or a missing MASTER_ADDR
            raise UsageError(f'--dist_url {init_method}: {e}') from None
        _logger.info('Process group: %s, rank %d of %d, device %s', backend, rank, world_size, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)




def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over processes (in place) and return it."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_true(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is set on any process (all processes take the same branch)."""
    if not info.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (plain Python objects, e.g. RNG states)."""
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def distribute_bn_stats(modules, info: DistInfo, mode: str) -> bool:
    """``--dist-bn``: make the BatchNorm running statistics of ``modules`` equal on all processes with timm's
    ``distribute_bn``: 'reduce' averages them, 'broadcast' copies rank 0's; '' leaves them. SyncBatchNorm keeps
    them equal already (nothing to do). Returns whether anything was done.

    Without it each process keeps the statistics of its own shard of the data, and rank 0 saves its own."""
    if not info.distributed or not mode:
        return False
    modules = [m for m in modules if m is not None]
    if any(isinstance(sub, torch.nn.SyncBatchNorm) for m in modules for sub in m.modules()):
        return False
    from timm.utils import distribute_bn
    for m in modules:
        distribute_bn(m, info.world_size, reduce=mode == 'reduce')
    return True


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
