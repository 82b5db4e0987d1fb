"""``na2d_av`` through an installed natten <= 0.17 (the original release's dependency).

natten 0.18 removed the unfused ``na2d_av`` op, so only older installs qualify. natten is imported lazily,
on first use: importing ``models`` never needs it.
"""
import importlib
import logging
import re
from types import ModuleType
from typing import Optional

import torch

__all__ = ['is_available', 'na2d_av', 'unavailable_reason']

_logger = logging.getLogger(__name__)


_UNPROBED = object()
_functional = _UNPROBED  # natten.functional once probed, None when unusable


def _natten_functional() -> Optional[ModuleType]:
    """natten.functional when it has ``na2d_av``, else None; imported on first call only."""
    global _functional
    if _functional is _UNPROBED:
        try:
            functional = importlib.import_module('natten.functional')
        except ImportError:
            functional = None
        except Exception as e:  # a broken install (e.g. built for another torch) must not break the model
            _logger.warning('natten is installed but failed to import, not using it: %s', e)
            functional = None
        if functional is not None and not _supported_version(importlib.import_module('natten')):
            functional = None
        _functional = functional if callable(getattr(functional, 'na2d_av', None)) else None
    return _functional


def _supported_version(natten) -> bool:
    """natten <= 0.17: later releases dropped ``na2d_av`` or changed its layout (heads after the map axes)."""
    match = re.match(r'(\d+)\.(\d+)', str(getattr(natten, '__version__', '')))
    if match is None:  # no version to go by: trust the presence of na2d_av
        return True
    if (int(match.group(1)), int(match.group(2))) <= (0, 17):
        return True
    _logger.info('natten %s is newer than 0.17; its na2d_av differs, not using it', natten.__version__)
    return False


@torch.compiler.assume_constant_result  # probed eagerly while tracing: torch.compile must not trace an import
def is_available() -> bool:
    """Whether an installed natten still has ``natten.functional.na2d_av`` (natten <= 0.17)."""
    return _natten_functional() is not None


def unavailable_reason() -> str:
    return 'needs natten <= 0.17 (with natten.functional.na2d_av) installed'


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """natten's ``na2d_av`` (dilation 1) on validated inputs; output in the promoted dtype of the inputs.

    Args:
        attn: [B, G, H, W, K*K].
        value: [B, G, H, W, C].
        kernel_size: odd K <= H, W.
    """
    functional = _natten_functional()
    if functional is None:
        raise RuntimeError(f'natten backend: {unavailable_reason()}')
    out_dtype = torch.promote_types(attn.dtype, value.dtype)
    dtype = out_dtype
    if value.device.type != 'cuda' or attn.dtype != value.dtype:
        # natten needs one dtype; its CPU kernels are float32/float64 only, so half is accumulated in float32.
        dtype = torch.promote_types(out_dtype, torch.float32)
    out = functional.na2d_av(attn.to(dtype).contiguous(), value.to(dtype).contiguous(), kernel_size, 1)
    return out.to(out_dtype)
