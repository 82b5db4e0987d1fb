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
from torch.utils.data import Dataset, IterableDataset, Sampler

__all__ = [
    'DataError', 'IMG_EXTENSIONS', 'resolve_split', 'build_image_folder', 'ImageFolderDataset',
    'check_same_classes', 'ResumableSampler', 'EvalShardSampler', 'seed_worker', 'EpochSeed', 'sample_seed',
    'SeededSamples',
    'split_tar', 'build_timm_dataset', 'dataset_classes', 'is_streamed', 'samples_per_rank',
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
        repeats: ``--epoch-repeats``: an epoch passes over the data this many times (successive permutations,
            the last one cut short for a fraction); 0 or 1: once.
        aug_repeats: ``--aug-repeats``: timm's ``RepeatAugSampler`` (each image ``aug_repeats`` times, the
            copies on different processes; as many images per process as one pass over the data gives, rounded
            down to 256s), seeded with ``seed + epoch``.
        sample_seeds: yield ``(index, seed)`` pairs for :class:`SeededSamples`: each sample's augmentation seeded
            by its place in the epoch.
        groups: a group id per sample (e.g. mmdet's aspect-ratio flags): every run of ``batch_size`` indices a
            process yields is of one group. Each epoch, each group is permuted and cut into batches (the last
            filled up from the group's start), the batches are shuffled and dealt to the processes in turn.
        batch_size: the batch of ``groups``.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 repeats: float = 0., aug_repeats: int = 0, sample_seeds: bool = False,
                 groups: Optional[Sequence[int]] = None, batch_size: int = 1):
        self.dataset_len = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.sample_seeds = sample_seeds
        self.repeat_aug = None
        self.groups = None
        if groups is not None:
            if len(groups) != num_samples:
                raise ValueError(f'{len(groups)} group ids for {num_samples} samples')
            self.batch_size = batch_size
            self.groups = [[i for i, g in enumerate(groups) if g == gid] for gid in sorted(set(groups))]
            batches = sum(math.ceil(len(m) / batch_size) for m in self.groups)
            self.per_replica = math.ceil(batches / num_replicas) * batch_size
            self.epoch_len = self.per_replica * num_replicas
        elif aug_repeats:
            from timm.data.distributed_sampler import RepeatAugSampler
            self.repeat_aug = RepeatAugSampler(range(num_samples), num_replicas=num_replicas, rank=rank,
                                               shuffle=shuffle, num_repeats=aug_repeats)
            self.epoch_len = len(self.repeat_aug) * num_replicas
            self.per_replica = len(self.repeat_aug)
        else:
            self.epoch_len = math.ceil(num_samples * repeats) if repeats > 0 else num_samples
            self.per_replica = math.ceil(self.epoch_len / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = max(0, int(start))

    def _grouped_indices(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        b = self.batch_size
        batches = []
        for members in self.groups:
            order = [members[j] for j in torch.randperm(len(members), generator=g)] if self.shuffle else list(members)
            while len(order) % b:
                order += order[:b - len(order) % b]
            batches += [order[k:k + b] for k in range(0, len(order), b)]
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g)]
        total = self.per_replica // b * self.num_replicas
        while len(batches) < total:  # wrap around, so that every process gets as many
            batches += batches[:total - len(batches)]
        return [i for batch in batches[self.rank:total:self.num_replicas] for i in batch]

    def _indices(self) -> List[int]:
        if self.groups is not None:
            return self._grouped_indices()
        if self.repeat_aug is not None:
            self.repeat_aug.set_epoch(self.seed + self.epoch)
            return list(self.repeat_aug)
        n = self.dataset_len
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            passes = [torch.randperm(n, generator=g) for _ in range(math.ceil(self.epoch_len / n))]
            indices = torch.cat(passes)[:self.epoch_len].tolist()
        else:
            indices = [i % n for i in range(self.epoch_len)]
        total = self.per_replica * self.num_replicas
        indices += indices[:total - len(indices)]  # pad (wrap around) so that every process gets as many
        return indices[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator:
        start, self.start = self.start, 0  # only the first iteration after a resume is partial
        indices = self._indices()
        if not self.sample_seeds:
            return iter(indices[start:])
        return iter([(index, sample_seed(self.seed, self.epoch, self.rank, position))
                     for position, index in enumerate(indices) if position >= start])

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


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of one sample's augmentation: the run's seed, the epoch, the process and the sample's place in
    the process's epoch."""
    return (seed * 1000003 + epoch * 1000033 + rank * 7919 + position * 104729 + 1) % 2 ** 31


class SeededSamples(Dataset):
    """Items ``(index, seed)`` of a :class:`ResumableSampler` with ``sample_seeds``: python's, numpy's and
    torch's random streams are seeded with the sample's seed before ``dataset[index]``, so that a sample's
    augmentation depends on its place in the epoch only — not on the loader worker that reads it, the number of
    workers (none included) or what was read before. A run resumed mid-epoch therefore augments its remaining
    samples as the uninterrupted run did. In the main process (``-j 0``) the streams are put back afterwards:
    they also serve the batch steps (mixing, erasing) and are part of the checkpoint.

    Args:
        dataset: the map-style dataset.
        seed_numpy: seed numpy too (``--worker-seeding all``); False leaves numpy's stream to torch's own
            worker seeding (timm's "part").
    """

    def __init__(self, dataset: Dataset, seed_numpy: bool = True):
        self.dataset = dataset
        self.seed_numpy = seed_numpy

    def __len__(self) -> int:
        return len(self.dataset)

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        if self.seed_numpy:
            np.random.seed(seed)
        torch.manual_seed(seed)

    def __getitem__(self, item):
        index, seed = item
        if torch.utils.data.get_worker_info() is not None:
            self._seed(seed)
            return self.dataset[index]
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            self._seed(seed)
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def epoch_worker_seed(seed: int, epoch: int, rank: int, worker_id: int) -> int:
    """The seed of one loader worker's random streams for one epoch."""
    return (seed * 1000003 + epoch * 1009 + rank * 101 + worker_id) % 2 ** 31


class EpochSeed:
    """Re-seeds each loader worker's python / numpy / torch random streams at the start of every epoch, from
    ``(seed, epoch, rank, worker)``: persistent workers (kept across epochs) then draw the same augmentation
    as workers started afresh each epoch, and a run resumed at an epoch boundary repeats it exactly. For
    streamed datasets, which have no sampler (map-style ones seed every sample: :class:`SeededSamples`).

    Wraps the dataset's transform; the epoch lives in shared memory, so the main process's
    :meth:`set_epoch` reaches workers that were started earlier. Without worker processes it does nothing
    (the main process's streams are part of the checkpoint).

    Args:
        transform: the per-image transform to call.
        seed: the run's ``--seed``.
        rank: this process.
        seed_numpy: re-seed numpy too (``--worker-seeding all``); False leaves numpy's stream to torch's own
            worker seeding (``part``, timm's partial seeding).
    """

    def __init__(self, transform: Callable, seed: int, rank: int = 0, seed_numpy: bool = True):
        import multiprocessing
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.seed_numpy = seed_numpy
        self._epoch = multiprocessing.Value('i', 0, lock=False)
        self._seeded_for = -1  # per worker (each holds its own copy of this attribute)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __call__(self, *inputs):
        info = torch.utils.data.get_worker_info()
        if info is not None and self._seeded_for != self._epoch.value:
            self._seeded_for = self._epoch.value
            s = epoch_worker_seed(self.seed, self._seeded_for, self.rank, info.id)
            random.seed(s)
            if self.seed_numpy:
                np.random.seed(s)
            torch.manual_seed(s)
        return self.transform(*inputs)


# --- timm's dataset factory: tar files, webdataset shards, Hugging Face datasets ----------------------------

# The package each --dataset prefix needs (imported on use: the image folder path needs neither).
_PREFIX_PACKAGES = {'wds': 'webdataset', 'hfds': 'datasets', 'torch': 'torchvision', 'tfds': 'tensorflow_datasets'}
_PIP_NAMES = {'tensorflow_datasets': 'tensorflow-datasets'}


def split_tar(data_dir: str, split: str) -> Optional[str]:
    """``data_dir`` itself when it is a .tar file, else ``data_dir/<split>.tar`` (``val`` also finds
    ``validation.tar``) when there is no ``<split>/`` folder; None otherwise (an image folder)."""
    if os.path.isfile(data_dir) and data_dir.endswith('.tar'):
        return data_dir
    if not os.path.isdir(data_dir):
        return None
    names = _SPLIT_DIRS.get(split, (split,))
    if any(os.path.isdir(os.path.join(data_dir, n)) for n in names):
        return None
    for name in names:
        path = os.path.join(data_dir, f'{name}.tar')
        if os.path.isfile(path):
            return path
    return None


def build_timm_dataset(name: str, root: str, split: str, *, is_training: bool, class_map: str = '',
                       batch_size: int = 1, seed: int = 42, num_workers: int = 0, download: bool = False,
                       repeats: float = 0.):
    """A dataset from timm's ``create_dataset``: ``name`` '' with ``root`` a .tar file (image tar),
    ``wds/NAME`` (webdataset shards in ``root``, an ``IterableDataset`` that splits its shards over processes
    and workers itself), ``hfds/NAME`` (a Hugging Face dataset, ``root`` its cache folder), ``torch/NAME`` (a
    torchvision dataset in ``root``) or ``tfds/NAME`` (TensorFlow datasets).

    Args:
        name: ``--dataset``.
        root: ``--data-dir``.
        split: ``--train-split`` / ``--val-split``.
        is_training: shuffle shards and samples (wds).
        class_map: ``--class-map`` file.
        batch_size: per process; a streamed epoch is a whole number of batches per worker.
        seed: shard shuffling seed, the same on every process (wds).
        num_workers: loader workers per process (a streamed epoch's length depends on it).
        download: let torch/ and tfds/ datasets download into ``root`` (``--dataset-download``).
        repeats: a streamed training epoch reads the shards this many times (``--epoch-repeats``).
    """
    from timm.data import create_dataset
    prefix = name.partition('/')[0].lower() if '/' in name else ''
    package = _PREFIX_PACKAGES.get(prefix)
    if package is not None:
        import importlib.util
        if importlib.util.find_spec(package) is None:
            raise DataError(f'--dataset {name} needs the {package} package: pip install '
                            f'{_PIP_NAMES.get(package, package)}')
    if class_map and not os.path.isfile(class_map):
        raise DataError(f'--class-map {class_map} does not exist')
    downloads = download and prefix in ('torch', 'tfds')
    if prefix != 'hfds' and root and not os.path.exists(root) and not downloads:
        hint = '; pass --dataset-download to fetch it there' if prefix in ('torch', 'tfds') else ''
        raise DataError(f'data directory {root} does not exist{hint}')
    what = f'--dataset {name}' if name else root
    extra = dict(download=True) if downloads else {}
    if repeats and is_training:
        extra['repeats'] = repeats
    try:
        ds = create_dataset(name, root=root or None, split=split, is_training=is_training,
                            class_map=class_map or None, batch_size=batch_size, seed=seed, **extra)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError, AssertionError, OSError) as e:
        # timm and its readers raise these for a missing split, shard list or info file; torchvision's datasets
        # a RuntimeError for missing files, an OSError (URLError) for a failed download
        detail = ' '.join(str(e).split())[:300]
        hint = '; pass --dataset-download to fetch it' if prefix in ('torch', 'tfds') and not downloads else ''
        raise DataError(f'{what}: cannot read split {split!r} from {root or "the Hugging Face cache"} '
                        f'({detail}){hint}') from None
    if isinstance(ds, IterableDataset):
        ds.set_loader_cfg(num_workers=num_workers)
    if len(ds) == 0:
        raise DataError(f'{what}: split {split!r} in {root} holds no samples')
    return ds


def dataset_classes(dataset) -> Dict[str, int]:
    """Class name -> index of any of our or timm's datasets ({} when the data does not say)."""
    if hasattr(dataset, 'class_to_idx'):
        return dict(dataset.class_to_idx)
    reader = getattr(dataset, 'reader', None)
    # timm's readers: class_to_idx (folder, hfds, wds with a class map), class_name_to_idx (image tar)
    return dict(getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None) or {})


def is_streamed(dataset) -> bool:
    """Whether ``dataset`` is read as a stream (no random access: no sampler, resume at epoch granularity)."""
    return isinstance(dataset, IterableDataset)


def samples_per_rank(dataset, world_size: int) -> int:
    """Training samples one process reads per epoch."""
    if is_streamed(dataset):
        return math.ceil(getattr(dataset.reader, 'num_samples', 0) / world_size)
    return math.ceil(len(dataset) / world_size)
