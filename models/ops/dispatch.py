"""Input checks and backend selection for the neighbourhood-aggregation ops.

Selection order: the ``backend=`` argument > :func:`set_backend` > the environment variable
``OVERLOCK_NA2D_BACKEND`` (auto|torch|natten|triton) > automatic: for CUDA tensors triton (for K up to its
kernels' MAX_KERNEL_SIZE), else natten, else torch; for CPU tensors natten, else torch. The choice is logged
once per (backend, device type).
Under ``torch.compile`` the backend is resolved while tracing and stays fixed in the compiled graph.
"""
import importlib
import logging
import os
from types import ModuleType
from typing import List, Optional, Set, Tuple

import torch

from . import composite, natten_backend, torch_backend

__all__ = [
    'na2d_av', 'na2d_softmax_av', 'relative_position_bias', 'available_backends', 'get_backend', 'set_backend',
    'BACKENDS', 'ENV_VAR',
]

_logger = logging.getLogger(__name__)

BACKENDS: Tuple[str, ...] = ('torch', 'natten', 'triton')
ENV_VAR = 'OVERLOCK_NA2D_BACKEND'

_override: Optional[str] = None
_logged: Set[Tuple[str, str]] = set()


_UNPROBED = object()
_triton = _UNPROBED  # the triton backend module once probed, None when it cannot be imported


def _triton_module() -> Optional[ModuleType]:
    """The triton backend module, or None when it (or triton itself) is missing or fails to import."""
    global _triton
    if _triton is _UNPROBED:
        _triton = None
        try:
            _triton = importlib.import_module(f'{__package__}.triton_backend')
        except ImportError as e:
            _logger.debug('triton na2d backend unavailable: %s', e)
        except Exception as e:  # a broken triton install must not break the model: fall back to the others
            _logger.warning('triton na2d backend failed to import, not using it: %s', e)
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


def _is_available(name: str) -> bool:
    if name == 'torch':
        return True
    if name == 'natten':
        return natten_backend.is_available()
    return _triton_available()


def available_backends() -> List[str]:
    """Backends usable in this environment, in order of preference ('torch' is always there)."""
    return [name for name in BACKENDS if _is_available(name)]


def _unavailable_message(name: str, source: str) -> str:
    why = {
        'natten': natten_backend.unavailable_reason(),
        'triton': 'needs triton and models/ops/triton_backend.py importable, and a CUDA device '
                  '(or TRITON_INTERPRET=1 for CPU tensors)',
    }.get(name, '')
    return f'{source}{name!r} is not available ({why}); available backends: {available_backends()}'


def _check_name(name: str, source: str) -> str:
    """Normalise a backend name; ``source`` says where it came from in error messages (e.g. 'backend=')."""
    choices = ('auto',) + BACKENDS
    if not isinstance(name, str) or name.strip().lower() not in choices:
        raise ValueError(f'{source}{name!r} is not a na2d_av backend; choose one of {"|".join(choices)}')
    name = name.strip().lower()
    if name != 'auto' and not _is_available(name):
        raise ValueError(_unavailable_message(name, source))
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
    if device_type == 'cuda' and _triton_ready():
        # the triton kernels cover K up to MAX_KERNEL_SIZE; larger kernels go to the next choice
        if kernel_size is None or kernel_size <= getattr(_triton_module(), 'MAX_KERNEL_SIZE', kernel_size):
            return 'triton'
    if natten_backend.is_available() and device_type in ('cpu', 'cuda'):
        return 'natten'
    return 'torch'


def _resolve(backend: Optional[str], device_type: str, kernel_size: Optional[int] = None) -> str:
    if backend is not None:
        name = _check_name(backend, 'na2d_av backend=')
    elif _override is not None:
        name = _override
    else:
        name = _check_name(os.environ.get(ENV_VAR, 'auto') or 'auto', f'environment variable {ENV_VAR}=')
    if name == 'auto':
        name = _auto(device_type, kernel_size)
    elif name == 'triton' and device_type != 'cuda' and not (device_type == 'cpu' and _triton_interpret()):
        raise ValueError(
            f'na2d_av backend triton runs on CUDA tensors (got {device_type}); set TRITON_INTERPRET=1 to run its '
            f'kernels on CPU tensors, or choose one of {[b for b in available_backends() if b != "triton"]}')
    if (name, device_type) not in _logged and not torch.compiler.is_compiling():
        _logged.add((name, device_type))
        _logger.info('na2d_av: using the %s backend for %s tensors', name, device_type)
    return name


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
        backend: 'torch', 'natten', 'triton' or None/'auto' (see the module docstring for the order).
    Returns:
        [B, G, H, W, C]; float16/bfloat16 inputs are accumulated in float32 and returned in their dtype.
    """
    _check('na2d_av', attn, value, kernel_size)
    if composite.is_active():  # exporting to ONNX: standard ops only
        return composite.na2d_av(attn, value, kernel_size)
    name = _resolve(backend, value.device.type, kernel_size)
    if name == 'natten':
        return natten_backend.na2d_av(attn, value, kernel_size)
    if name == 'triton':
        return _triton_module().na2d_av(attn, value, kernel_size)
    return torch_backend.na2d_av(attn, value, kernel_size)


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
    name = _resolve(backend, value.device.type, k)
    if name == 'triton':
        return _triton_module().na2d_softmax_av(logits, rpb, value, k)
    h, w = value.shape[2], value.shape[3]
    attn = torch.softmax(logits + relative_position_bias(rpb, h, w, k), dim=-1)
    if name == 'natten':
        return natten_backend.na2d_av(attn, value, k)
    return torch_backend.na2d_av(attn, value, k)
