"""The one dtype parser of the command lines: long and short names to ``torch.dtype``."""
import argparse
from typing import Dict

import torch

__all__ = ['DTYPES', 'dtype_name', 'parse_dtype', 'short_name']

DTYPES: Dict[str, torch.dtype] = {
    'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float64': torch.float64,
}
_ALIASES = {'fp32': 'float32', 'float': 'float32', 'fp16': 'float16', 'half': 'float16', 'bf16': 'bfloat16',
            'fp64': 'float64', 'double': 'float64'}
_SHORT = {'float32': 'fp32', 'float16': 'fp16', 'bfloat16': 'bf16', 'float64': 'fp64'}


def dtype_name(text: str) -> str:
    """The canonical name ('float32', 'float16', 'bfloat16', 'float64') of a long or short spelling.

    Raises ``argparse.ArgumentTypeError`` (a one-line usage error when used as an argparse ``type``).
    """
    name = _ALIASES.get(str(text).lower(), str(text).lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f'unknown dtype {text!r}; use one of {", ".join(list(DTYPES) + list(_ALIASES))}')
    return name


def parse_dtype(text: str) -> torch.dtype:
    """``torch.dtype`` of a long or short spelling ('bf16', 'bfloat16', 'fp32', ...)."""
    return DTYPES[dtype_name(text)]


def short_name(text: str) -> str:
    """'bf16', 'fp16', 'fp32' or 'fp64' (table labels)."""
    return _SHORT[dtype_name(text)]
