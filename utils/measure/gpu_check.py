"""The check a user runs on a new GPU node before training (``python -m scripts.gpu_check``).

Checks, each one row of the table:
  ``versions``      torch, triton, CUDA, driver, GPU name and architecture (information);
  ``triton cache``  the kernel cache folder is writable (a warning otherwise: every start compiles again);
  ``kernels <op> <dtype>``  every Triton kernel, forward and backward, through the public ops
                    (``contmix_softmax_av``, ``na2d_softmax_av``, ``na2d_av`` with ``backend='triton'``) at every
                    distinct ContMix shape of the eight variants (batch 8), value channels-last (as the model runs
                    it) and channel-first, in float32/float16/bfloat16 and AMP's mixes (float16/bfloat16 logits
                    with float32 value and bias), against the torch backend in float64 on the same rounded
                    inputs: all finite, relative error within the dtype's bound;
  ``train step <dtype>``  one OverLoCK-T AMP training step on the triton and on the torch backend: the losses
                    and gradient norms agree;
  ``second device`` a ContMix forward and backward on ``cuda:1`` when it is visible;
  ``2-process step``  a DistributedDataParallel step of 2 processes (NCCL, SyncBatchNorm) when 2 GPUs are
                    visible: finite loss, identical weights on both afterwards.
A one-line verdict follows; on a failure it gives the exact option that trains on the torch backend instead.
``smoke`` runs the same code on the CPU (Triton interpreter, a tiny model, gloo instead of NCCL; the 2-process
step on the torch backend).
"""
import json
import logging
import math
import os
import platform
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from utils.cli import FALLBACK_HINT

from .shapes import ContMixCall, Na2dCall, contmix_block_calls

__all__ = ['Result', 'CheckConfig', 'Case', 'MIXES', 'BOUNDS', 'LAYOUTS', 'OPS', 'kernel_cases', 'run_case',
           'summarise_cases', 'verdict', 'render', 'run_checks']

_logger = logging.getLogger(__name__)

PASS, FAIL, WARN, SKIP = 'PASS', 'FAIL', 'WARN', 'SKIP'

# (logits or attn, value, bias) dtypes; the amp_* mixes are what autocast hands ContMix (the logits come from a
# matmul, the value from BatchNorm + GELU, the bias is a float32 parameter).
MIXES: Dict[str, Tuple[torch.dtype, torch.dtype, torch.dtype]] = {
    'fp32': (torch.float32, torch.float32, torch.float32),
    'fp16': (torch.float16, torch.float16, torch.float16),
    'bf16': (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    'amp_fp16': (torch.float16, torch.float32, torch.float32),
    'amp_bf16': (torch.bfloat16, torch.float32, torch.float32),
}
# Relative Frobenius error of the output and of every input gradient against the float64 reference.
BOUNDS = {'fp32': 1e-5, 'fp16': 1e-2, 'bf16': 1e-2, 'amp_fp16': 1e-2, 'amp_bf16': 1e-2}
LAYOUTS = ('channels_last', 'channel_first')
OPS = ('contmix_softmax_av', 'na2d_softmax_av', 'na2d_av')
# Triton against torch backend, one AMP training step: relative difference of the loss, of the total gradient
# norm, and of the whole gradient vector.
TRAIN_BOUNDS = {'loss': 1e-2, 'grad_norm': 2e-2, 'grad': 1e-1}


@dataclass
class Result:
    """One row of the table: a check, its status (PASS, FAIL, WARN, SKIP), what it found, its seconds."""
    check: str
    status: str
    detail: str = ''
    seconds: float = 0.0


@dataclass
class CheckConfig:
    """What the check runs; the defaults are the GPU run, :meth:`smoke` the CPU one."""
    device: str = 'cuda'
    models: Sequence[str] = ()  # default: every registered OverLoCK variant
    img_size: int = 224
    batch: int = 8
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    train_model: str = 'overlock_t'
    train_img_size: int = 224
    train_batch: int = 8  # BatchNorm over fewer images makes the gradients too ill-conditioned to compare
    train_dtypes: Sequence[str] = ('bfloat16', 'float16')
    mixes: Sequence[str] = tuple(MIXES)
    layouts: Sequence[str] = LAYOUTS
    dist_backend: str = 'nccl'
    dist_na2d_backend: str = 'triton'  # the ContMix backend of the distributed step
    processes: int = 0  # processes of the distributed step; 0: 2 when 2 GPUs are visible, else skipped
    max_blocks: int = 0  # check only the smallest N ContMix blocks (0: all)
    smoke: bool = False

    @classmethod
    def smoke_config(cls, model_kwargs: Dict[str, object]) -> 'CheckConfig':
        """The CPU run of the check itself: a tiny model at 32 px with 3x3 and 5x5 windows, its smallest ContMix
        block, one AMP mix, channels_last only (the interpreter takes seconds per case), gloo, 2 processes. The
        2-process step runs the torch backend: on a CPU it checks DDP over gloo, and two more interpreters would
        only repeat the kernel cases at a multiple of the step's CPU time."""
        kwargs = dict(model_kwargs, kernel_size=[5, 5, 5, 5], smk_size=3)
        return cls(device='cpu', models=('overlock_xt',), img_size=32, batch=2, model_kwargs=kwargs,
                   train_model='overlock_xt', train_img_size=32, train_dtypes=('bfloat16',), mixes=('amp_bf16',),
                   layouts=('channels_last',), dist_backend='gloo', dist_na2d_backend='torch', processes=2,
                   max_blocks=1, smoke=True)


# --- versions and cache ---------------------------------------------------------------------------------------

def _driver_version() -> str:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else '?'
    except (OSError, subprocess.SubprocessError):
        return '?'


def versions(device: torch.device) -> Result:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'not installed'
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        gpu = f'{props.name} (sm_{props.major}{props.minor}, {torch.cuda.device_count()} visible)'
    else:
        gpu = f'none: CPU {platform.processor() or platform.machine()}'
    interp = ', Triton interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else ''
    return Result('versions', PASS, f'torch {torch.__version__}, triton {triton_version}, CUDA {torch.version.cuda}, '
                                    f'driver {_driver_version() if device.type == "cuda" else "-"}, GPU {gpu}{interp}')


def cache_check() -> Result:
    from utils.train_setup import triton_cache_dir, triton_cache_problem
    problem = triton_cache_problem()
    return Result('triton cache', WARN if problem else PASS, problem or f'{triton_cache_dir()} writable')


# --- the kernel cases -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One op at one shape, dtype mix and value layout (forward and backward)."""
    op: str
    shape: object  # ContMixCall for contmix_softmax_av, Na2dCall for the per-window ops
    mix: str
    layout: str
    batch: int

    @property
    def label(self) -> str:
        return f'{self.op} {self.shape.label} {self.mix} {self.layout} B{self.batch}'


def kernel_cases(calls: Sequence[ContMixCall], batch: int, mixes: Sequence[str] = tuple(MIXES),
                 layouts: Sequence[str] = LAYOUTS) -> List[Case]:
    """Every op at every distinct shape of ``calls`` (ContMix blocks, and their windows deduplicated), mix and
    layout; the one list of cases of the GPU check and of tests/test_gpu.py."""
    windows: List[Na2dCall] = []
    for call in calls:
        for w in call.windows():
            if w not in windows:
                windows.append(w)
    blocks = list(dict.fromkeys(ContMixCall(c.channels, c.groups, c.height, c.width, c.small, c.large)
                                for c in calls))
    cases = []
    for mix in mixes:
        for layout in layouts:
            cases += [Case('contmix_softmax_av', c, mix, layout, batch) for c in blocks]
            cases += [Case(op, w, mix, layout, batch) for op in OPS[1:] for w in windows]
    return cases


def case_inputs(case: Case, device: torch.device, seed: int = 0) -> Tuple[List[torch.Tensor], Callable]:
    """The case's inputs (laid out as the model passes them) and ``op(backend, *inputs)``."""
    from models import ops
    from .ops import na2d_inputs
    wdtype, vdtype, bdtype = MIXES[case.mix]
    channels_last = case.layout == 'channels_last'
    if case.op == 'contmix_softmax_av':
        c: ContMixCall = case.shape
        gen = torch.Generator(device='cpu').manual_seed(seed)

        def randn(*size, dtype):
            return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)
        x = randn(case.batch, c.channels, c.height, c.width, dtype=vdtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = randn(case.batch, c.groups, c.height, c.width, c.small ** 2 + c.large ** 2, dtype=wdtype)
        rpbs = [randn(c.groups, 2 * k - 1, 2 * k - 1, dtype=bdtype) for k in (c.small, c.large)]
        return [x, logits, *rpbs], lambda backend, *t: ops.contmix_softmax_av(*t, c.small, c.large, backend=backend)
    fused = case.op == 'na2d_softmax_av'
    k = case.shape.kernel_size
    inputs = na2d_inputs(case.shape, case.batch, wdtype, device, fused, seed, channels_last, vdtype, bdtype)
    if fused:
        return inputs, lambda backend, *t: ops.na2d_softmax_av(*t, k, backend=backend)
    return inputs, lambda backend, *t: ops.na2d_av(*t, k, backend=backend)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


class _TritonOps(TorchDispatchMode):
    """Counts the Triton backend's ops that really ran: an op that fell back to another backend (a self-check
    of the backend, say) must not pass as a checked kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.count += name.startswith('overlock::') and 'triton' in name
        return func(*args, **(kwargs or {}))

    def expect(self, what: str) -> None:
        if not self.count:
            raise RuntimeError(f'{what}: no Triton kernel ran (the op went to another backend)')


def run_case(case: Case, device: torch.device) -> Dict[str, float]:
    """Forward and backward of the case on the triton backend and of the torch backend in float64 on the same
    rounded inputs; the relative error of the output and of each input gradient (inf where not finite)."""
    inputs, op = case_inputs(case, device)
    leaves = [t.detach().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = op('torch', *ref_leaves)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    with _TritonOps() as ran:
        out = op('triton', *leaves)
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    ran.expect(case.op)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    errors = {'out': _rel_err(out, ref)}
    if not bool(torch.isfinite(out).all()):
        errors['out'] = math.inf
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        errors[f'grad{i}'] = _rel_err(g, r) if bool(torch.isfinite(g).all()) else math.inf
    return errors


def summarise_cases(outcomes: Sequence[Tuple[Case, Optional[Dict[str, float]], str, float]]) -> List[Result]:
    """One row per (op, mix): cases passed, the worst error against its bound, and the first failure.

    Args:
        outcomes: ``(case, errors or None, error message, seconds)`` per case (None: it raised).
    """
    rows: List[Result] = []
    groups: Dict[Tuple[str, str], list] = {}
    for outcome in outcomes:
        groups.setdefault((outcome[0].op, outcome[0].mix), []).append(outcome)
    for (op, mix), items in groups.items():
        bound = BOUNDS[mix]
        worst, failures, seconds = 0.0, [], 0.0
        for case, errors, message, took in items:
            seconds += took
            if errors is None:
                failures.append(f'{case.label}: {message}')
                continue
            case_worst = max(errors.values())
            worst = max(worst, case_worst)
            if not case_worst <= bound:
                bad = max(errors, key=errors.get)
                failures.append(f'{case.label}: {bad} error {case_worst:.2e}')
        ok = len(items) - len(failures)
        detail = f'{ok}/{len(items)} cases, worst {worst:.1e} (bound {bound:g})'
        if failures:
            detail += f'; first failure {failures[0]}'
        rows.append(Result(f'kernels {op} {mix}', FAIL if failures else PASS, detail, seconds))
    return rows


def kernel_checks(cfg: CheckConfig, device: torch.device) -> List[Result]:
    names = list(cfg.models)
    if not names:
        import models
        names = models.list_variants()
    calls = contmix_block_calls(names, cfg.img_size, **cfg.model_kwargs)
    if cfg.max_blocks:
        calls = calls[-cfg.max_blocks:]
    cases = kernel_cases(calls, cfg.batch, cfg.mixes, cfg.layouts)
    outcomes = []
    for case in cases:
        start = time.perf_counter()
        try:
            errors, message = run_case(case, device), ''
        except Exception as e:  # a compile error or a crash is this case's failure, not the check's end
            errors, message = None, f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'
            _logger.debug('%s failed', case.label, exc_info=True)
        outcomes.append((case, errors, message, time.perf_counter() - start))
    return summarise_cases(outcomes)


def second_device_check(cfg: CheckConfig, calls: Optional[Sequence[ContMixCall]] = None) -> Result:
    """A ContMix forward and backward on ``cuda:1`` (the launches must follow the tensors' device)."""
    if cfg.device != 'cuda' or torch.cuda.device_count() < 2:
        return Result('second device', SKIP, 'fewer than 2 GPUs visible')
    call = (calls or contmix_block_calls([cfg.train_model], cfg.img_size, **cfg.model_kwargs))[0]
    case = Case('contmix_softmax_av', call, 'amp_bf16', 'channels_last', cfg.batch)
    try:
        errors = run_case(case, torch.device('cuda', 1))
    except Exception as e:
        return Result('second device', FAIL, f'cuda:1 {case.label}: {type(e).__name__}: {e}'.splitlines()[0])
    worst = max(errors.values())
    ok = worst <= BOUNDS[case.mix]
    return Result('second device', PASS if ok else FAIL, f'cuda:1 {case.label}: worst error {worst:.1e}')


# --- a training step on both backends --------------------------------------------------------------------------

def _create(cfg: CheckConfig, name: str, device: torch.device) -> torch.nn.Module:
    import timm
    import models  # noqa: F401  (registers the overlock models)
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0, **cfg.model_kwargs).to(device).train()
    return model.to(memory_format=torch.channels_last)


def _batch(model: torch.nn.Module, device: torch.device, batch: int, img_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_chans, img_size, img_size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last), y


def _loss(model, x, y, device, amp_dtype):
    import torch.nn.functional as F
    from utils.train_step import compute_loss
    with torch.autocast(device.type, dtype=amp_dtype):
        loss, _ = compute_loss(F.cross_entropy, model(x), y, 0.4)
    return loss


def train_step_check(cfg: CheckConfig, device: torch.device, dtype_name: str) -> Result:
    """One AMP training step (forward, loss main + 0.4 aux, backward) of the same weights and batch on the
    triton and on the torch backend: the losses, gradient norms and gradients agree."""
    from models import ops
    from .dtypes import parse_dtype
    name = f'train step {dtype_name}'
    amp_dtype = parse_dtype(dtype_name)
    model = _create(cfg, cfg.train_model, device)
    x, y = _batch(model, device, cfg.train_batch, cfg.train_img_size)
    found = {}
    try:
        for backend in ('triton', 'torch'):
            ops.set_backend(backend)
            model.zero_grad(set_to_none=True)
            with _TritonOps() as ran:
                loss = _loss(model, x, y, device, amp_dtype)
                loss.backward()
            if backend == 'triton':
                ran.expect(cfg.train_model)
            grad = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
            found[backend] = (float(loss.detach()), grad)
    except Exception as e:
        return Result(name, FAIL, f'{cfg.train_model}: {type(e).__name__}: {e}'.splitlines()[0])
    finally:
        ops.set_backend(None)
    (loss_t, g_t), (loss_r, g_r) = found['triton'], found['torch']
    ref_norm = float(g_r.norm())
    diffs = {'loss': abs(loss_t - loss_r) / max(abs(loss_r), 1e-12),
             'grad_norm': abs(float(g_t.norm()) - ref_norm) / max(ref_norm, 1e-12),
             'grad': float((g_t - g_r).norm()) / max(ref_norm, 1e-12)}
    finite = all(math.isfinite(v) for v in (loss_t, loss_r, float(g_t.norm()), ref_norm))
    ok = finite and all(diffs[k] <= TRAIN_BOUNDS[k] for k in diffs)
    detail = (f'{cfg.train_model} B{cfg.train_batch} {cfg.train_img_size}px: loss {loss_t:.4f} vs {loss_r:.4f}, '
              f'grad norm {float(g_t.norm()):.4g} vs {ref_norm:.4g}; relative differences ' +
              ', '.join(f'{k} {v:.1e} (bound {TRAIN_BOUNDS[k]:g})' for k, v in diffs.items()))
    return Result(name, PASS if ok else FAIL, detail)


# --- a distributed step ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, cfg: CheckConfig, out_dir: str) -> None:
    """One process of the distributed step; writes ``rank<r>.json`` with what it saw."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    # as in training (utils/train_setup.py): size-1 dims of depthwise conv grads have other strides, same layout
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    device = torch.device('cuda', rank) if cfg.device == 'cuda' else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    result = {'rank': rank}
    try:
        dist.init_process_group(cfg.dist_backend, rank=rank, world_size=world)
        from models import ops
        ops.set_backend(cfg.dist_na2d_backend)
        model = _create(cfg, cfg.train_model, device)
        if device.type == 'cuda':  # SyncBatchNorm needs CUDA; the CPU run keeps BatchNorm
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = DistributedDataParallel(model, device_ids=[rank] if device.type == 'cuda' else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x, y = _batch(model, device, cfg.batch, cfg.train_img_size, seed=rank)  # each process its own images
        loss = _loss(ddp, x, y, device, torch.bfloat16)
        loss.backward()
        opt.step()
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        first = flat.clone()
        dist.broadcast(first, 0)
        result.update(loss=float(loss.detach()), max_weight_diff=float((flat - first).abs().max()),
                      sync_bn=sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()))
        dist.barrier()
    except Exception as e:
        result['error'] = f'{type(e).__name__}: {e}'.splitlines()[0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(result, f)


def dist_step_check(cfg: CheckConfig, timeout: float = 300.0) -> Result:
    """A DDP step of 2 processes with SyncBatchNorm (NCCL on 2 GPUs; gloo in the smoke run)."""
    name = '2-process step'
    world = cfg.processes or (2 if cfg.device == 'cuda' and torch.cuda.device_count() >= 2 else 0)
    if world < 2:
        return Result(name, SKIP, 'fewer than 2 GPUs visible')
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_dist_worker, args=(world, _free_port(), cfg, out_dir), nprocs=world,
                                     join=False, start_method='spawn')
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in context.processes:
                        p.kill()
                    return Result(name, FAIL, f'no answer within {timeout:.0f}s ({cfg.dist_backend})')
        except Exception as e:  # a process that died without writing its result
            return Result(name, FAIL, f'{type(e).__name__}: {e}'.splitlines()[0])
        found = []
        for rank in range(world):
            path = os.path.join(out_dir, f'rank{rank}.json')
            found.append(json.load(open(path)) if os.path.isfile(path) else {'error': 'no result'})
    errors = [f'rank {r["rank"] if "rank" in r else i}: {r["error"]}' for i, r in enumerate(found) if 'error' in r]
    if errors:
        return Result(name, FAIL, f'{cfg.dist_backend}: {errors[0]}')
    losses = [r['loss'] for r in found]
    diff = max(r['max_weight_diff'] for r in found)
    ok = all(math.isfinite(v) for v in losses) and diff == 0.0 and (cfg.device != 'cuda' or found[0]['sync_bn'] > 0)
    norm = (f'{found[0]["sync_bn"]} SyncBatchNorm layers' if cfg.device == 'cuda'
            else 'BatchNorm (SyncBatchNorm needs CUDA)')
    return Result(name, PASS if ok else FAIL,
                  f'{cfg.dist_backend}, {world} processes, {cfg.dist_na2d_backend} backend, {norm}, bf16 AMP: '
                  f'losses {", ".join(f"{v:.4f}" for v in losses)}, weights after the step differ by {diff:g}')


# --- the table and the verdict --------------------------------------------------------------------------------

def verdict(results: Sequence[Result]) -> Tuple[bool, str]:
    """``(passed, one line)``; a failure names the failed checks and the option that falls back to torch."""
    failed = [r.check for r in results if r.status == FAIL]
    warned = [r.check for r in results if r.status == WARN]
    if failed:
        return False, (f'FAIL: {len(failed)} check(s) failed ({", ".join(failed)}); train on the torch backend '
                       f'meanwhile with {FALLBACK_HINT}')
    note = f' (warnings: {", ".join(warned)})' if warned else ''
    return True, f'PASS: this node can train OverLoCK on the triton backend{note}'


def render(results: Sequence[Result]) -> str:
    """The markdown table and the verdict line."""
    from utils.evaluate import markdown_table
    rows = [dict(check=r.check, status=r.status, seconds=f'{r.seconds:.1f}', detail=r.detail) for r in results]
    return markdown_table(rows, ['check', 'status', 'seconds', 'detail']) + '\n\n' + verdict(results)[1]


def _timed(fn: Callable[[], object]) -> Tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_checks(cfg: CheckConfig, skip: Sequence[str] = ()) -> List[Result]:
    """Every check in order (``skip``: 'kernels', 'device', 'train', 'dist' to leave out)."""
    device = torch.device(cfg.device)
    results = [versions(device), cache_check()]
    if 'kernels' not in skip:
        results += kernel_checks(cfg, device)
    if 'train' not in skip:
        for dtype_name in cfg.train_dtypes:
            r, s = _timed(lambda d=dtype_name: train_step_check(cfg, device, d))
            r.seconds = s
            results.append(r)
    if 'device' not in skip:  # after the others: a launch with another device's pointers can break the context
        r, s = _timed(lambda: second_device_check(cfg))
        r.seconds = s
        results.append(r)
    if 'dist' not in skip:
        r, s = _timed(lambda: dist_step_check(cfg))
        r.seconds = s
        results.append(r)
    return results
