"""Training-time augmentation: timm's transforms with one compatibility op, and the batch-level steps that
run on the device.

The input pipeline is timm's prefetcher pipeline, as the original trained: workers decode, crop, flip and
RandAugment each image and hand over uint8 tensors (4x fewer bytes than float32; no per-image
normalisation); :func:`timm.data.fast_collate` stacks them; on the device, :class:`DeviceAugment`
normalises the batch, mixes it (Mixup/CutMix) and then randomly erases patches of the *mixed* images.


RandAugment's posterize ops can ask for 0 bits: with the recipe's ``rand-m9-mstd0.5-inc1`` the sampled
magnitude reaches 10 about once in a thousand images, and ``PosterizeIncreasing`` keeps ``4 - 4 = 0`` bits
(``Posterize`` does the same at magnitude 0). Pillow up to 10.x returned an all-black image for 0 bits,
which is what the original runs trained with (timm 0.6.12); newer Pillow raises ``ValueError`` and stops
training within minutes. :func:`install_posterize` puts :func:`posterize` into timm's op table so the
distribution stays the original's on any Pillow. It is needed as long as timm hands 0 bits to Pillow
unguarded (still so in timm 1.0.31); it is harmless afterwards, because for 1–8 bits it calls Pillow as
timm does.
"""
import argparse
import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from PIL import Image, ImageOps

__all__ = ['posterize', 'install_posterize', 'train_transform_kwargs', 'build_train_transform', 'build_eval_transform',
           'split_collate', 'DeviceAugment']

_logger = logging.getLogger(__name__)

# The op names of timm's RandAugment/AutoAugment tables that map to a posterize.
POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of each channel; 0 (or fewer) bits gives an all-black image,
    as Pillow < 11 did."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1 and img.mode in ('L', 'RGB'):
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def install_posterize() -> None:
    """Register :func:`posterize` for timm's posterize ops (idempotent). Ops built afterwards use it.

    If a future timm no longer has the table, this logs a warning instead of failing: the augmentation tests
    then show whether 0 bits still reach Pillow.
    """
    try:
        from timm.data import auto_augment
        table: Dict[str, Any] = auto_augment.NAME_TO_OP
    except (ImportError, AttributeError):
        _logger.warning('timm.data.auto_augment.NAME_TO_OP not found: RandAugment posterize left as timm has it')
        return
    for name in POSTERIZE_OPS:
        if name in table:
            table[name] = posterize


def train_transform_kwargs(args: argparse.Namespace, data_config: Dict[str, Any]) -> Dict[str, Any]:
    """train.py's options for the per-image augmentation as ``create_transform`` arguments (random erasing,
    applied to the mixed batch on the device, is not among them). As the original, ``--no-aug`` (or an empty
    ``--train-interpolation``) resizes with the model's interpolation."""
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config['interpolation']
    return dict(no_aug=args.no_aug, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=interpolation)


def build_train_transform(input_size: Tuple[int, int, int], mean, std, **kwargs: Any):
    """timm's training transform (``create_transform(is_training=True)``) with :func:`posterize` installed.
    With ``use_prefetcher=True`` it ends in a uint8 tensor (normalisation and random erasing are left to
    :class:`DeviceAugment`); with ``separate=True`` it is timm's three stages (for ``AugMixDataset``)."""
    from timm.data import create_transform
    install_posterize()
    return create_transform(input_size, is_training=True, mean=mean, std=std, **kwargs)


def build_eval_transform(input_size: Tuple[int, int, int], mean, std, **kwargs: Any):
    """timm's evaluation transform: resize, centre crop, normalise."""
    from timm.data import create_transform
    return create_transform(input_size, is_training=False, mean=mean, std=std, **kwargs)


def split_collate(batch):
    """The loader's collate without the prefetcher (float images): torch's ``default_collate``, except that
    tuples of augmentation splits become one batch ordered split by split, as timm's ``fast_collate`` orders
    them (so the first ``B`` images are the clean split)."""
    from torch.utils.data import default_collate
    if isinstance(batch[0][0], (tuple, list)):
        splits = len(batch[0][0])
        images = torch.cat([torch.stack([b[0][j] for b in batch]) for j in range(splits)])
        targets = default_collate([b[1] for b in batch])
        return images, targets.repeat((splits,) + (1,) * (targets.ndim - 1))
    return default_collate(batch)


class DeviceAugment:
    """The batch-level steps on the device, in the original's order: uint8 -> float, normalise, Mixup/CutMix,
    random erasing of the mixed batch, memory layout. With neither mixup nor erasing it serves evaluation.

    Args:
        mean, std: per-channel normalisation, in [0, 1] units as timm's data config gives them.
        device: where the batch goes.
        mixup: a ``timm.data.Mixup`` (None: off).
        re_prob, re_mode, re_count: timm's ``RandomErasing`` (``--reprob``, ``--remode``, ``--recount``).
        re_num_splits: with augmentation splits, erase all but the first (clean) one (timm's ``num_splits``).
        channels_last: return channels-last tensors.
        normalize: the batch comes as uint8 and is normalised here; False: it comes normalised (float).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 mixup: Optional[Callable] = None, re_prob: float = 0., re_mode: str = 'pixel', re_count: int = 1,
                 re_num_splits: int = 0, channels_last: bool = False, normalize: bool = True):
        self.device = device
        self.normalize = normalize
        # Like timm's PrefetchLoader: scale mean and std to 0-255 instead of the images to 0-1.
        self.mean = torch.tensor([m * 255 for m in mean], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([s * 255 for s in std], device=device).view(1, -1, 1, 1)
        self.mixup = mixup
        self.erase = None
        if re_prob > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count,
                                       num_splits=re_num_splits, device=device)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.normalize:
            x = x.float().sub_(self.mean).div_(self.std)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        if self.erase is not None:
            x = self.erase(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y
