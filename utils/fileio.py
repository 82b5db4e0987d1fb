"""Files written so that a kill at any moment leaves the old or the new content, never a truncated file; and
plain copies of objects for ``torch.load(..., weights_only=True)``."""
import os
import shutil
from typing import Any

import numpy as np
import torch

__all__ = ['atomic_save', 'atomic_write_text', 'link_or_copy', 'to_plain']


def _temp_path(path: str) -> str:
    # Same folder (os.replace must not cross filesystems), unique per process; created with the umask's
    # permissions like any other output file.
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: a kill at any moment
    leaves either the old or the new file, never a truncated one."""
    tmp = _temp_path(path)
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file atomically (temp file + ``os.replace``)."""
    tmp = _temp_path(path)
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` hold ``src``'s content atomically: a hard link when the filesystem allows (no extra disk
    and I/O; ``src`` is later replaced by a new inode, so the link keeps this content), else a copy."""
    tmp = _temp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_plain(obj: Any) -> Any:
    """A copy of ``obj`` that ``weights_only=True`` loads: Paths -> str, numpy -> Python/tensors,
    Namespaces and other objects -> dict/str."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, '__dict__') and type(obj).__name__ == 'Namespace':
        return to_plain(vars(obj))
    return str(obj)
