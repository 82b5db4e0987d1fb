"""Image-folder datasets, a resumable distributed sampler and the loaders of train.py.

``DATA/train/<class>/<image>`` and ``DATA/val/<class>/<image>`` (or ``validation/``), as torchvision's
ImageFolder and timm expect. Problems with the data become :class:`DataError` with a one-line message.
"""
import logging
import math
import os
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    'DataError', 'IMG_EXTENSIONS', 'resolve_split', 'build_image_folder', 'ImageFolderDataset',
    'check_same_classes', 'ResumableSampler', 'EvalShardSampler', 'seed_worker',
]

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
_SPLIT_DIRS = {'train': ('train',), 'val': ('val', 'validation'), 'validation': ('validation', 'val')}


class DataError(ValueError):
    """A problem with the dataset on disk; the message names the path and what to do."""


def _class_dirs(root: str) -> List[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def _images_in(folder: str) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # deterministic order
        for name in sorted(filenames):
            if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith('.'):
                out.append(os.path.join(dirpath, name))
    return out


def resolve_split(data_dir: str, split: str) -> str:
    """The folder of ``split`` ('train' or 'val') inside ``data_dir``, checked to hold class folders.

    Args:
        data_dir: dataset root holding ``train/`` and ``val/`` (or ``validation/``).
        split: 'train' or 'val'.
    """
    if not data_dir:
        raise DataError('no data directory given; pass --data-dir holding train/ and val/ class folders')
    if not os.path.isdir(data_dir):
        raise DataError(f'data directory {data_dir} does not exist')
    names = _SPLIT_DIRS.get(split, (split,))
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            break
    else:
        wanted = ' or '.join(f'{n}/' for n in names)
        raise DataError(f'data directory {data_dir} has no {wanted} folder')
    if not _class_dirs(path):
        raise DataError(f'{path} holds no class folders (expected {path}/<class>/<image>)')
    return path


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` samples; ``transform`` may be set after construction (timm's loader does).

    Args:
        root: folder holding one sub-folder per class.
        transform: applied to the RGB PIL image.
        skip_corrupt: replace unreadable images by the next readable one (logged once per file) instead of
            raising :class:`DataError`.
        class_to_idx: class name -> index (e.g. the training set's, for the validation set).

    ``decode`` (set after construction, like ``transform``) replaces ``img.convert('RGB')``: it gets the opened,
    not yet decoded image, e.g. to decode a JPEG at a reduced size (``utils.measure.loader``).
    """

    def __init__(
            self,
            root: str,
            transform: Optional[Callable] = None,
            skip_corrupt: bool = False,
            class_to_idx: Optional[Dict[str, int]] = None,
    ):
        self.root = root
        self.transform = transform
        self.target_transform = None
        self.decode: Optional[Callable] = None
        self.skip_corrupt = skip_corrupt
        classes = _class_dirs(root) if os.path.isdir(root) else []
        if not classes:
            raise DataError(f'{root} holds no class folders (expected {root}/<class>/<image>)')
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(classes)}
        else:
            check_same_classes(list(class_to_idx), classes, root)
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.class_to_idx = dict(class_to_idx)
        self.samples: List[Tuple[str, int]] = []
        empty = []
        for c in classes:
            files = _images_in(os.path.join(root, c))
            if not files:
                empty.append(c)
            self.samples.extend((f, self.class_to_idx[c]) for f in files)
        if not self.samples:
            raise DataError(f'{root} holds no images (extensions: {" ".join(IMG_EXTENSIONS)})')
        if empty:
            _logger.warning('%s: %d class folders hold no images (%s)', root, len(empty), ', '.join(empty[:5]))
        self.targets = [t for _, t in self.samples]
        self.num_skipped = 0
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str):
        from PIL import Image, UnidentifiedImageError
        try:
            with open(path, 'rb') as f:
                img = Image.open(f)
                return img.convert('RGB') if self.decode is None else self.decode(img)
        except UnidentifiedImageError:
            reason = 'not a recognised image format'
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these on damaged files
            reason = f'{type(e).__name__}: {str(e).strip() or "damaged file"}'
        raise DataError(f'cannot read image {path} ({reason}); remove or replace it, or pass --skip-corrupt '
                        f'to skip unreadable images')

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(n):
            path, target = self.samples[(index + attempt) % n]
            try:
                img = self._load(path)
            except DataError:
                if not self.skip_corrupt:
                    raise
                self.num_skipped += 1
                if path not in self._warned:
                    self._warned.add(path)
                    _logger.warning('skipping unreadable image %s (--skip-corrupt)', path)
                continue  # deterministic replacement: the next sample in file order
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target
        raise DataError(f'{self.root}: no readable image at all')

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        if basename:
            return os.path.basename(path)
        return os.path.abspath(path) if absolute else os.path.relpath(path, self.root)

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        return [self.filename(i, basename, absolute) for i in range(len(self))]


def build_image_folder(
        root: str,
        transform: Optional[Callable] = None,
        skip_corrupt: bool = False,
        class_to_idx: Optional[Dict[str, int]] = None,
) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` over ``root`` (see its arguments)."""
    if not os.path.isdir(root):
        raise DataError(f'data directory {root} does not exist')
    return ImageFolderDataset(root, transform=transform, skip_corrupt=skip_corrupt, class_to_idx=class_to_idx)


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], where: str = '') -> None:
    """Raise :class:`DataError` unless both splits have the same class folders."""
    a, b = set(train_classes), set(val_classes)
    if a == b:
        return
    def brief(names: List[str]) -> str:
        return ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')

    only_train = sorted(a - b)
    only_val = sorted(b - a)
    parts = []
    if only_train:
        parts.append(f'{len(only_train)} only in train ({brief(only_train)})')
    if only_val:
        parts.append(f'{len(only_val)} only in val ({brief(only_val)})')
    prefix = f'{where}: ' if where else ''
    raise DataError(f'{prefix}train and val class folders differ: {"; ".join(parts)}')


class ResumableSampler(Sampler):
    """Shuffled, sharded sample indices that can start part-way through an epoch.

    Every process draws the same permutation from ``seed + epoch``, pads it to a multiple of ``num_replicas``
    and takes every ``num_replicas``-th index from ``rank``, as DistributedSampler does. ``set_start(k)``
    makes the next iteration skip this process's first ``k`` indices (the batches done before preemption).

    Args:
        num_samples: dataset length.
        num_replicas: processes.
        rank: this process.
        shuffle: permute each epoch.
        seed: base seed, shared by all processes.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        self.dataset_len = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.per_replica = math.ceil(num_samples / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = max(0, int(start))

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        total = self.per_replica * self.num_replicas
        indices += indices[:total - len(indices)]  # pad (wrap around) so that every process gets as many
        return indices[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()[self.start:]
        self.start = 0  # only the first iteration after a resume is partial
        return iter(indices)

    def __len__(self) -> int:
        return self.per_replica - self.start


class EvalShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``, no padding: summed metrics count each image once."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, num_samples, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: seed python/numpy from the worker's torch seed (derived from the loader's
    per-epoch generator), so augmentation is reproducible for a given seed, epoch and worker count."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
