"""First-use self-check of the Triton kernels against the torch backend.

A GPU, a driver or a Triton build the kernels were never run on can fail to compile them, or run them into
wrong or non-finite numbers. So the first time in a process that the triton backend gets a kind of call, the
dispatcher (``models.ops.dispatch``) runs its kernels on a tiny case of that kind against the torch backend,
forward and backward. A kind is a :data:`Case`: the op, the inputs' dtypes, the value's dimension order (which
of its strides are 1 is what a launch specialises on) and the device; the tiny case has the call's channels per
group and window sizes, batch 1, 2 groups and a map 2 rows and 3 columns larger than the largest window.

A compile error, an exception, a non-finite value or a relative difference beyond :data:`TOLERANCE` logs one
line (the op and output, what happened, how to force a backend) and that kind of call goes to the torch backend
for the rest of the process. The result is kept: later calls cost a dictionary lookup. Under ``torch.compile``
the check runs while tracing (``dispatch`` calls it through ``assume_constant_result``), so no graph break.

``OVERLOCK_NA2D_SELFCHECK=0`` turns the check off.
"""
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

__all__ = ['SELFCHECK_ENV_VAR', 'Case', 'enabled', 'case_of', 'check', 'passed', 'failure', 'record_failure',
           'report', 'SelfCheckError']

_logger = logging.getLogger(__name__)

SELFCHECK_ENV_VAR = 'OVERLOCK_NA2D_SELFCHECK'

# (op, dtype names of the inputs, dimension order of value (or x), device, channels per group, window sizes):
# plain values, so torch.compile can pass it to a function whose result it takes as a constant.
Case = Tuple[str, Tuple[str, ...], Tuple[int, ...], str, int, Tuple[int, ...]]

# Relative difference (max |triton - torch| / max |torch|) allowed per output: accumulation order and rounding
# of the stored outputs only; a wrong kernel is off by far more.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_HOW_TO = ('force a backend with OVERLOCK_NA2D_BACKEND=torch (or --na2d-backend torch); '
           f'{SELFCHECK_ENV_VAR}=0 skips this check')

_results: Dict[tuple, Optional[str]] = {}  # kind of call -> None (passed) or what failed
_logged: Set[tuple] = set()  # kinds whose fallback was logged


class SelfCheckError(RuntimeError):
    """The Triton kernels failed their self-check where triton was chosen explicitly."""


def enabled() -> bool:
    return os.environ.get(SELFCHECK_ENV_VAR, '1').strip() != '0'


def _order(t: torch.Tensor) -> Tuple[int, ...]:
    """Dimensions from the outermost to the innermost in memory (ties in dimension order)."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))


def case_of(op: str, tensors: Sequence[torch.Tensor], layout_of: torch.Tensor, channels: int,
            sizes: Sequence[int]) -> Case:
    """The kind of a call: ``layout_of`` is the tensor whose dimension order the tiny case copies (value, or
    x for the two-window op)."""
    return (op, tuple(_DTYPE_NAMES.get(t.dtype) or str(t.dtype)[6:] for t in tensors), _order(layout_of),
            str(layout_of.device), int(channels), tuple(int(k) for k in sizes))


_DTYPE_NAMES = {d: str(d)[6:] for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


def _kind(case: Case) -> tuple:
    """What a result is kept for: the op, dtypes, dimension order and device (not the sizes)."""
    return case[:4]


def passed(case: Case) -> bool:
    """Whether this kind of call was checked and passed (the lookup every later call makes)."""
    return _results.get(_kind(case), '') is None


def failure(case: Case) -> Optional[str]:
    """What failed for this kind of call (its check, or a launch that raised), or None."""
    return _results.get(_kind(case))


def record_failure(case: Case, what: str) -> None:
    """Keep a failure seen outside the check (a launch that raised): this kind of call fails from now on."""
    _results[_kind(case)] = what


def report(case: Case, what: str, explicit: bool = False) -> str:
    """The line that says what failed and what happens now; logged once per kind of call when the automatic
    choice falls back (an explicit choice of triton raises it instead)."""
    op, dtypes, order, device = _kind(case)
    where = f'({"/".join(dtypes)}, dimension order {order}, {device})'
    if explicit:
        return (f'na2d {op}: the Triton kernels failed their self-check {where}: {what}; triton was chosen '
                f'explicitly, so nothing falls back: choose another backend (OVERLOCK_NA2D_BACKEND=torch or '
                f'--na2d-backend torch), or skip the check with {SELFCHECK_ENV_VAR}=0')
    line = (f'na2d {op}: the Triton kernels failed their self-check {where}: {what}; using the torch backend '
            f'for these calls from now on ({_HOW_TO})')
    if _kind(case) not in _logged:
        _logged.add(_kind(case))
        _logger.warning(line)
    return line


def _tensor(shape: Sequence[int], dtype: torch.dtype, device: str, order: Optional[Sequence[int]] = None,
            scale: float = 1.) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(shape) * 1000 + int(shape[-1]))
    data = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    out = torch.empty_permuted(shape, tuple(order or range(len(shape))), dtype=dtype, device=device)
    return out.copy_(data)


def _inputs(case: Case) -> List[torch.Tensor]:
    """The tiny case of a kind of call."""
    op, dtypes, order, device, c, sizes = case
    dtypes_ = [getattr(torch, d) for d in dtypes]
    k = max(sizes)
    g, h, w = 2, k + 2, k + 3
    if op == 'contmix_softmax_av':
        s, k = sizes
        return [_tensor((1, 2 * g * c, h, w), dtypes_[0], device, order),
                _tensor((1, g, h, w, s * s + k * k), dtypes_[1], device),
                _tensor((g, 2 * s - 1, 2 * s - 1), dtypes_[2], device, scale=0.5),
                _tensor((g, 2 * k - 1, 2 * k - 1), dtypes_[3], device, scale=0.5)]
    weights = _tensor((1, g, h, w, k * k), dtypes_[0], device)
    value = _tensor((1, g, h, w, c), dtypes_[-1], device, order)
    if op == 'na2d_av':
        return [weights, value]
    return [weights, _tensor((g, 2 * k - 1, 2 * k - 1), dtypes_[1], device, scale=0.5), value]


_OUTPUTS = {'na2d_av': ('out', 'grad_attn', 'grad_value'),
            'na2d_softmax_av': ('out', 'grad_logits', 'grad_rpb', 'grad_value'),
            'contmix_softmax_av': ('out', 'grad_x', 'grad_logits', 'grad_rpb_small', 'grad_rpb_large')}


def _forward_backward(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], stage: List[str],
                      ) -> List[torch.Tensor]:
    """Output and input gradients, whatever the caller's mode: the first call may come under no_grad or
    inference_mode (evaluation) or autocast (whose casts would make the two backends differ)."""
    device_type = inputs[0].device.type
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        stage[0] = 'forward'
        out = fn(*leaves)
        grad_out = _tensor(out.shape, out.dtype, str(out.device))
        stage[0] = 'backward'
        grads = torch.autograd.grad(out, leaves, grad_out)
    return [out.detach(), *grads]


def _tolerance(dtypes: Sequence[str]) -> float:
    return max(TOLERANCE[getattr(torch, d)] for d in dtypes)


def check(case: Case, triton_fn: Callable[..., torch.Tensor], torch_fn: Callable[..., torch.Tensor]) -> Optional[str]:
    """Run the check of this kind of call once per process (later calls return the kept result): None when
    the Triton kernels agree with the torch backend, else what failed (for :func:`report`)."""
    kind = _kind(case)
    if kind in _results:
        return _results[kind]
    start = time.perf_counter()
    op = case[0]
    inputs = _inputs(case)
    stage = ['setup']
    try:
        got = _forward_backward(triton_fn, inputs, stage)
        problem = None
    except Exception as e:  # a compile error or a failed launch: the finding itself, reported and recovered from
        lines = str(e).strip().splitlines()
        problem = f'{stage[0]} raised {type(e).__name__}: {lines[-1] if lines else ""}'.rstrip(': ')
    if problem is None:
        ref = _forward_backward(torch_fn, inputs, stage)
        bound = _tolerance(case[1])
        for name, g, r in zip(_OUTPUTS[op], got, ref):
            if g.shape != r.shape:
                problem = f'{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}'
            elif not torch.isfinite(g).all():
                problem = f'{name}: non-finite values'
            else:
                err = ((g.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-12)).item()
                if err > bound:
                    problem = f'{name}: relative difference {err:.1e} from the torch backend (at most {bound:.0e})'
            if problem is not None:
                break
    _results[kind] = problem
    _logger.debug('na2d %s: Triton self-check %s (%s, %.2f s)', op, 'passed' if problem is None else 'failed',
                  kind, time.perf_counter() - start)
    return problem
