"""Backend registry, backend selection and input checks for the neighbourhood-aggregation ops.

Backends live in one registry (name -> :class:`Backend`: availability probe, automatic-choice rule, ops), in the
automatic choice's order of preference: 'triton' (CUDA tensors, K up to its kernels' MAX_KERNEL_SIZE), then
'natten' (an installed natten <= 0.17; CPU and CUDA tensors), then 'torch' (always there).

Selection order: the ``backend=`` argument > :func:`set_backend` > the environment variable
``OVERLOCK_NA2D_BACKEND`` (auto|triton|natten|torch) > the automatic choice: the first registered backend that
is available and takes the tensors' device and kernel size. The choice is logged once per (backend, device type).
Under ``torch.compile`` the backend is resolved while tracing and stays fixed in the compiled graph.

The triton backend needs triton >= 3.4 (:data:`TRITON_MIN_VERSION`; an older one is named in one log line and not
used). Before its first use per kind of call it checks its kernels against the torch backend (``selfcheck.py``;
``OVERLOCK_NA2D_SELFCHECK=0`` turns that off): the automatic choice then falls back to torch for what failed,
with one log line, and so it does in eager mode when a launch raises; an explicit choice of triton raises.
"""
import dataclasses
import importlib
import itertools
import logging
import os
from types import ModuleType
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

from . import composite, flops, natten_backend, selfcheck, torch_backend

__all__ = [
    'na2d_av', 'na2d_softmax_av', 'contmix_softmax_av', 'relative_position_bias', 'available_backends',
    'get_backend', 'set_backend', 'BACKENDS', 'ENV_VAR', 'Backend',
]

_logger = logging.getLogger(__name__)

ENV_VAR = 'OVERLOCK_NA2D_BACKEND'

_override: Optional[str] = None
_logged: Set[Tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the ops, as the registry holds it.

    Args:
        name: what ``backend=``, :func:`set_backend` and the environment variable call it.
        is_available: usable in this process at all (probed lazily, cached by the backend).
        takes: whether the automatic choice may give it tensors on (device type, kernel size K).
        na2d_av: ``(attn, value, kernel_size) -> out`` on validated inputs.
        na2d_softmax_av: a fused ``(logits, rpb, value, kernel_size) -> out``; None: the bias and softmax run in
            PyTorch, then ``na2d_av``.
        contmix_softmax_av: both windows of a ContMix block in one op, ``(x, logits, rpb_small, rpb_large,
            small, large) -> out [B, C, H, W]``; None: ``na2d_softmax_av`` per window, then a concatenation.
        device_error: for an explicit choice, why tensors of this device type cannot go to it (None: they can).
        unavailable_reason: what it needs, for the error when it is chosen but unavailable.
    """
    name: str
    is_available: Callable[[], bool]
    takes: Callable[[str, Optional[int]], bool]
    na2d_av: Callable[..., torch.Tensor]
    na2d_softmax_av: Optional[Callable[..., torch.Tensor]] = None
    contmix_softmax_av: Optional[Callable[..., torch.Tensor]] = None
    device_error: Callable[[str], Optional[str]] = lambda device_type: None
    unavailable_reason: Callable[[], str] = lambda: ''


# --- triton: imported lazily (triton is optional and its import is slow) ----------------------------------

_UNPROBED = object()
_triton = _UNPROBED  # the triton backend module once probed, None when it cannot be imported
_triton_unsupported: Optional[str] = None  # why the installed triton cannot run the kernels, once probed

# The kernels and their launcher use ``triton.knobs`` (Triton 3.4, the one torch 2.8 ships with).
TRITON_MIN_VERSION = (3, 4)
_TRITON_OPS = (('na2d_av_triton', flops.register_na2d_av),
               ('na2d_softmax_av_triton', flops.register_na2d_softmax_av),
               ('contmix_softmax_av_triton', flops.register_contmix_softmax_av))


def _version(text: str) -> Tuple[int, ...]:
    """The leading numbers of a version string ('3.4.0+git1' -> (3, 4, 0))."""
    numbers = []
    for part in text.split('.'):
        digits = ''.join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _triton_too_old() -> Optional[str]:
    """One line when the installed triton is older than the kernels need (None when it is recent enough)."""
    import triton
    installed = getattr(triton, '__version__', '0')
    if _version(installed) >= TRITON_MIN_VERSION:
        return None
    required = '.'.join(map(str, TRITON_MIN_VERSION))
    return (f'triton {installed} is installed, the Triton na2d kernels need triton >= {required} (torch >= 2.8); '
            f'using the torch backend')


def _triton_module() -> Optional[ModuleType]:
    """The triton backend module, or None when it (or triton itself) is missing, too old or fails to import."""
    global _triton, _triton_unsupported
    if _triton is _UNPROBED:
        _triton = None
        try:
            _triton_unsupported = _triton_too_old()
            if _triton_unsupported is not None:
                _logger.warning(_triton_unsupported)
                return None
            _triton = importlib.import_module(f'{__package__}.triton_backend')
        except ImportError as e:
            _logger.debug('triton na2d backend unavailable: %s', e)
        except Exception as e:  # a broken triton install must not break the model: fall back to the others
            _logger.warning('triton na2d backend failed to import, not using it: %s', e)
        if _triton is not None:
            for name, register in _TRITON_OPS:  # FLOP formulas of the ops the module defined
                if hasattr(torch.ops.overlock, name):
                    register(name)
    return _triton


def _triton_interpret() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


# The probes run eagerly while torch.compile traces (their imports and driver calls cannot be traced).
@torch.compiler.assume_constant_result
def _triton_ready() -> bool:
    """The triton backend imports and its kernels can run on this machine's GPU."""
    module = _triton_module()
    if module is None:
        return False
    try:
        return bool(module.is_available())
    except Exception as e:  # a probe that fails (driver trouble) means unavailable, not a crash
        _logger.warning('triton na2d backend probe failed, not using it: %s', e)
        return False


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    """Usable at all: on a GPU, or on the CPU through the triton interpreter (TRITON_INTERPRET=1)."""
    return _triton_ready() or (_triton_interpret() and _triton_module() is not None)


def _triton_takes(device_type: str, kernel_size: Optional[int]) -> bool:
    # the kernels cover K up to MAX_KERNEL_SIZE; larger kernels go to the next backend
    return device_type == 'cuda' and _triton_ready() and (
        kernel_size is None or kernel_size <= getattr(_triton_module(), 'MAX_KERNEL_SIZE', kernel_size))


def _triton_device_error(device_type: str) -> Optional[str]:
    if device_type == 'cuda' or (device_type == 'cpu' and _triton_interpret()):
        return None
    return (f'na2d_av backend triton runs on CUDA tensors (got {device_type}); set TRITON_INTERPRET=1 to run its '
            f'kernels on CPU tensors, or choose one of {[b for b in available_backends() if b != "triton"]}')


# --- the registry -------------------------------------------------------------------------------------------

_REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    Backend(
        name='triton',
        is_available=_triton_available,
        takes=_triton_takes,
        na2d_av=lambda attn, value, k: _triton_module().na2d_av(attn, value, k),
        na2d_softmax_av=lambda logits, rpb, value, k: _triton_module().na2d_softmax_av(logits, rpb, value, k),
        contmix_softmax_av=lambda *args: _triton_module().contmix_softmax_av(*args),
        device_error=_triton_device_error,
        unavailable_reason=lambda: _triton_unsupported or (
            'needs triton and models/ops/triton_backend.py importable, and a CUDA device (or TRITON_INTERPRET=1 '
            'for CPU tensors)'),
    ),
    Backend(
        name='natten',
        is_available=lambda: natten_backend.is_available(),
        takes=lambda device_type, k: device_type in ('cpu', 'cuda') and natten_backend.is_available(),
        na2d_av=lambda attn, value, k: natten_backend.na2d_av(attn, value, k),
        unavailable_reason=lambda: natten_backend.unavailable_reason(),
    ),
    Backend(
        name='torch',
        is_available=lambda: True,
        takes=lambda device_type, k: True,
        na2d_av=lambda attn, value, k: torch_backend.na2d_av(attn, value, k),
    ),
)}

BACKENDS: Tuple[str, ...] = tuple(_REGISTRY)  # in the automatic choice's order of preference


def available_backends() -> List[str]:
    """Backends usable in this environment, in the automatic choice's order of preference ('torch', always
    there, comes last). Which one a call uses also depends on the device: see :func:`get_backend`."""
    return [name for name, backend in _REGISTRY.items() if backend.is_available()]


def _check_name(name: str, source: str) -> str:
    """Normalise a backend name; ``source`` says where it came from in error messages (e.g. 'backend=')."""
    choices = ('auto',) + BACKENDS
    if not isinstance(name, str) or name.strip().lower() not in choices:
        raise ValueError(f'{source}{name!r} is not a na2d_av backend; choose one of {"|".join(choices)}')
    name = name.strip().lower()
    if name != 'auto' and not _REGISTRY[name].is_available():
        raise ValueError(f'{source}{name!r} is not available ({_REGISTRY[name].unavailable_reason()}); '
                         f'available backends: {available_backends()}')
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for all later calls (``None`` or ``'auto'`` restores the automatic choice).

    Raises ValueError for an unknown or unavailable backend.
    """
    global _override
    if name is None:
        _override = None
        return
    name = _check_name(name, 'set_backend: ')
    _override = None if name == 'auto' else name


def _auto(device_type: str, kernel_size: Optional[int]) -> str:
    for name, backend in _REGISTRY.items():
        if backend.takes(device_type, kernel_size):
            return name
    return 'torch'


def _resolve(backend: Optional[str], device_type: str, kernel_size: Optional[int] = None) -> str:
    return _choose(backend, device_type, kernel_size)[0]


def _choose(backend: Optional[str], device_type: str, kernel_size: Optional[int] = None) -> Tuple[str, bool]:
    """The backend of a call and whether it was chosen explicitly (argument, set_backend or environment)."""
    if backend is not None:
        name = _check_name(backend, 'na2d_av backend=')
    elif _override is not None:
        name = _override
    else:
        name = _check_name(os.environ.get(ENV_VAR, 'auto') or 'auto', f'environment variable {ENV_VAR}=')
    explicit = name != 'auto'
    if name == 'auto':
        name = _auto(device_type, kernel_size)
    else:
        error = _REGISTRY[name].device_error(device_type)
        if error is not None:
            raise ValueError(error)
    if (name, device_type) not in _logged and not torch.compiler.is_compiling():
        _logged.add((name, device_type))
        _logger.info('na2d_av: using the %s backend for %s tensors', name, device_type)
    return name, explicit


# --- the triton backend's self-check (see selfcheck.py) and its fallback to the torch backend ------------------


def _check_functions(case: selfcheck.Case) -> Tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """The op of a kind of call on the triton and on the torch backend, taking the tiny case's tensors."""
    op, sizes, module = case[0], case[5], _triton_module()
    if op == 'na2d_av':
        return (lambda a, v: module.na2d_av(a, v, sizes[0]),
                lambda a, v: na2d_av(a, v, sizes[0], backend='torch'))
    if op == 'na2d_softmax_av':
        return (lambda lg, r, v: module.na2d_softmax_av(lg, r, v, sizes[0]),
                lambda lg, r, v: na2d_softmax_av(lg, r, v, sizes[0], backend='torch'))
    return (lambda *t: module.contmix_softmax_av(*t, *sizes),
            lambda *t: contmix_softmax_av(*t, *sizes, backend='torch'))


# Runs eagerly while torch.compile traces (it launches kernels): the compiled graph holds the op it chose.
@torch.compiler.assume_constant_result
def _triton_passes(case: selfcheck.Case, explicit: bool) -> bool:
    """Whether this kind of call may use the Triton kernels: their self-check passed (run now on first use), or
    is off. When it failed: the automatic choice falls back to torch (one log line), an explicit one raises."""
    if selfcheck.passed(case):
        return True
    what = selfcheck.failure(case)
    if what is None and selfcheck.enabled():
        what = selfcheck.check(case, *_check_functions(case))
    if what is None:
        return True
    line = selfcheck.report(case, what, explicit)
    if explicit:
        raise selfcheck.SelfCheckError(line)
    return False


def _on_triton(case: selfcheck.Case, explicit: bool, run: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``run('triton')`` when this kind of call passed its self-check, else ``run('torch')``. In eager mode an
    automatic choice also falls back when a launch raises (a compile error the check did not meet): once,
    logged, and for the rest of the process; out-of-memory errors are the caller's and are raised."""
    if not _triton_passes(case, explicit):
        return run('torch')
    if explicit or torch.compiler.is_compiling():
        return run('triton')
    try:
        return run('triton')
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # the kernels could not run: report it and give the caller the torch result
        lines = str(e).strip().splitlines()
        what = f'a launch raised {type(e).__name__}' + (f': {lines[-1]}' if lines else '')
        selfcheck.record_failure(case, what)
        selfcheck.report(case, what)
        return run('torch')


def get_backend(device_type: str = 'cpu') -> str:
    """The backend a call without ``backend=`` uses for tensors on ``device_type`` ('cpu', 'cuda', ...)."""
    return _resolve(None, device_type)


# ---------------------------------------------------------------------------------------------------------
# Input checks: shapes only (cheap, and no data-dependent branching under torch.compile).


def _check(name: str, attn: torch.Tensor, value: torch.Tensor, kernel_size: int, what: str = 'attn') -> None:
    shapes = f'({what} {list(attn.shape)}, value {list(value.shape)})'
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'{name}: kernel_size must be a positive odd int, got {kernel_size!r} {shapes}')
    if attn.dim() != 5 or value.dim() != 5:
        raise ValueError(f'{name}: expected 5-D {what} [B, G, H, W, K*K] and value [B, G, H, W, C] {shapes}')
    if attn.shape[:4] != value.shape[:4]:
        raise ValueError(f'{name}: {what} and value differ in [B, G, H, W] {shapes}')
    k2 = kernel_size * kernel_size
    if attn.shape[4] != k2:
        raise ValueError(f'{name}: last dim of {what} must be kernel_size**2 = {k2} {shapes}')
    h, w = value.shape[2], value.shape[3]
    if h < kernel_size or w < kernel_size:
        raise ValueError(f'{name}: feature map {h}x{w} is smaller than kernel_size {kernel_size} {shapes}')
    if not attn.is_floating_point() or not value.is_floating_point():
        raise ValueError(f'{name}: expected floating-point tensors, got {what} {attn.dtype} and value {value.dtype} '
                         f'{shapes}')
    if attn.device != value.device:
        raise ValueError(f'{name}: {what} on {attn.device} and value on {value.device} {shapes}')


def na2d_av(
        attn: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: Optional[str] = None,
) -> torch.Tensor:
    """Neighbourhood aggregation with natten <= 0.17 semantics (dilation 1).

    ``out[b, g, i, j] = sum_{ki, kj} attn[b, g, i, j, ki*K + kj] * value[b, g, si(i) + ki, sj(j) + kj]`` with
    ``si(i) = clamp(i - K//2, 0, H - K)``: windows shift inwards at the borders and never read padding.

    Args:
        attn: [B, G, H, W, K*K] weights (any strides).
        value: [B, G, H, W, C] (any strides).
        kernel_size: odd K, at most H and W.
        backend: 'triton', 'natten', 'torch' or None/'auto' (see the module docstring for the order).
    Returns:
        [B, G, H, W, C]; float16/bfloat16 inputs are accumulated in float32 and returned in their dtype.
    """
    _check('na2d_av', attn, value, kernel_size)
    if composite.is_active():  # exporting to ONNX: standard ops only
        return composite.na2d_av(attn, value, kernel_size)
    name, explicit = _choose(backend, value.device.type, kernel_size)
    run = lambda name: _REGISTRY[name].na2d_av(attn, value, kernel_size)  # noqa: E731
    if name == 'triton':
        case = selfcheck.case_of('na2d_av', (attn, value), value, value.shape[-1], (kernel_size,))
        return _on_triton(case, explicit, run)
    return run(name)


# ---------------------------------------------------------------------------------------------------------
# Relative position bias.

def relative_position_bias(rpb: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """Per-query bias of the K x K neighbourhood.

    ``bias[g, i, j, ki*K + kj] = rpb[g, i' - i + K - 1, j' - j + K - 1]`` for the neighbour (i', j') =
    (si(i) + ki, sj(j) + kj) of query (i, j).

    Args:
        rpb: [G, 2K-1, 2K-1] learnable table.
        height, width: feature map size (at least K).
        kernel_size: odd K.
    Returns:
        [G, H, W, K*K], differentiable w.r.t. rpb.
    """
    k = kernel_size
    if rpb.dim() != 3 or rpb.shape[1] != 2 * k - 1 or rpb.shape[2] != 2 * k - 1:
        raise ValueError(f'relative_position_bias: rpb must be [G, {2 * k - 1}, {2 * k - 1}] for kernel_size {k}, '
                         f'got {list(rpb.shape)}')
    if height < k or width < k:
        raise ValueError(f'relative_position_bias: feature map {height}x{width} is smaller than kernel_size {k}')
    index = torch_backend.rpb_index(height, width, k, rpb)
    return rpb.flatten(1).index_select(1, index).view(rpb.shape[0], height, width, k * k)


def na2d_softmax_av(
        logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """``na2d_av(softmax(logits + relative_position_bias(rpb, H, W, K), -1), value, K)``.

    Args:
        logits: [B, G, H, W, K*K] (may be a non-contiguous slice of a larger tensor).
        rpb: [G, 2K-1, 2K-1] relative position bias table.
        value: [B, G, H, W, C].
        kernel_size: odd K, at most H and W.
        backend: as for :func:`na2d_av`; the triton backend fuses the bias, softmax and aggregation.
    Returns:
        [B, G, H, W, C].
    """
    _check('na2d_softmax_av', logits, value, kernel_size, what='logits')
    k = kernel_size
    if rpb.dim() != 3 or rpb.shape[0] != logits.shape[1] or rpb.shape[1] != 2 * k - 1 or rpb.shape[2] != 2 * k - 1:
        raise ValueError(f'na2d_softmax_av: rpb must be [G={logits.shape[1]}, {2 * k - 1}, {2 * k - 1}] for '
                         f'kernel_size {k}, got rpb {list(rpb.shape)} (logits {list(logits.shape)}, '
                         f'value {list(value.shape)})')
    if composite.is_active():  # exporting to ONNX: standard ops only
        return composite.na2d_softmax_av(logits, rpb, value, k)
    name, explicit = _choose(backend, value.device.type, k)

    def run(name: str) -> torch.Tensor:
        chosen = _REGISTRY[name]
        if chosen.na2d_softmax_av is not None:
            return chosen.na2d_softmax_av(logits, rpb, value, k)
        h, w = value.shape[2], value.shape[3]
        attn = torch.softmax(logits + relative_position_bias(rpb, h, w, k), dim=-1)
        return chosen.na2d_av(attn, value, k)

    if name == 'triton':
        case = selfcheck.case_of('na2d_softmax_av', (logits, rpb, value), value, value.shape[-1], (k,))
        return _on_triton(case, explicit, run)
    return run(name)


def contmix_softmax_av(
        x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor, rpb_large: torch.Tensor, small: int,
        large: int, backend: Optional[str] = None,
) -> torch.Tensor:
    """Both windows of a ContMix block: the first half of the channels of ``x`` aggregated with the small
    window (the first ``small**2`` logits, ``rpb_small``), the second half with the large one.

    The triton backend does it in one op that reads the logits in place and writes ``[B, C, H, W]``
    directly; the other backends run :func:`na2d_softmax_av` per window and concatenate.

    Args:
        x: [B, C, H, W]; channel ``m*C/2 + g*c + j`` is channel j of group g of window m (c = C / (2G)).
        logits: [B, G, H, W, small**2 + large**2].
        rpb_small, rpb_large: [G, 2s-1, 2s-1] and [G, 2K-1, 2K-1].
        small, large: the odd window sizes s and K.
    Returns:
        [B, C, H, W].
    """
    b, c, h, w = x.shape
    g = logits.shape[1]
    if logits.dim() != 5 or c % (2 * g) or logits.shape[-1] != small * small + large * large:
        raise ValueError(f'contmix_softmax_av: expected logits [B, G, H, W, {small * small + large * large}] with C '
                         f'divisible by 2G, got x {list(x.shape)} and logits {list(logits.shape)}')
    value = x.reshape(b, 2, g, c // (2 * g), h, w).permute(1, 0, 2, 4, 5, 3)
    name, explicit = _choose(backend, x.device.type, large)
    if _REGISTRY[name].contmix_softmax_av is not None and not composite.is_active():
        _check('contmix_softmax_av', logits[..., :small * small], value[0], small, what='logits')
        _check('contmix_softmax_av', logits[..., small * small:], value[1], large, what='logits')
        run = lambda name: (  # noqa: E731
            _REGISTRY[name].contmix_softmax_av(x, logits, rpb_small, rpb_large, small, large)
            if _REGISTRY[name].contmix_softmax_av is not None
            else contmix_softmax_av(x, logits, rpb_small, rpb_large, small, large, backend=name))
        if name == 'triton':
            case = selfcheck.case_of('contmix_softmax_av', (x, logits, rpb_small, rpb_large), x, c // (2 * g),
                                     (small, large))
            return _on_triton(case, explicit, run)
        return run(name)
    out_small = na2d_softmax_av(logits[..., :small * small], rpb_small, value[0], small, backend=name)
    out_large = na2d_softmax_av(logits[..., small * small:], rpb_large, value[1], large, backend=name)
    out = torch.cat([out_small, out_large], dim=1)  # [B, 2G, H, W, c]
    return out.permute(0, 1, 4, 2, 3).reshape(b, c, h, w)
