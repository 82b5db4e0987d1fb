"""Input-pipeline throughput: training images per second per worker process, and bytes per image handed
to the device, on a folder of real JPEG photographs.

:func:`build_photo_folder` makes that folder from the photographs that installed PyPI packages ship
(scikit-learn's two sample images and matplotlib's portrait), cropped at random and re-encoded as JPEG at
about 500x375, the size of a typical ImageNet training image. :func:`bench_loaders` runs the recipe's
augmentation, read from configs/base.yaml (decode, random-resized crop with random bilinear/bicubic, flip,
RandAugment rand-m9-mstd0.5-inc1), through our dataset and through timm's own ``create_loader`` on the same
folder in the same process, alternating them so that both see the same machine load.

:class:`DraftRandomResizedCrop` is the reduced-size JPEG decoding path: it draws the crop box from the image
header exactly as timm's ``RandomResizedCropAndInterpolation`` does (same random draws), and when the box
is at least twice the output size on both sides it lets libjpeg decode at 1/2, 1/4 or 1/8 scale (PIL's
``Image.draft``; the reduced box never smaller than the output) before cropping and resizing. The crop boxes,
flips and RandAugment draws are the same as the full-size path; the pixels differ slightly (DCT-domain
downscaling before the resize), so it is an option, off by default.
"""
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['BASE_CONFIG', 'recipe_augmentation', 'photo_sources', 'build_photo_folder', 'DraftRandomResizedCrop',
           'train_transform', 'our_dataset', 'our_loader', 'timm_loader', 'LoaderResult', 'time_loader', 'bench_loaders',
           'draft_difference']

BASE_CONFIG = str(Path(__file__).resolve().parents[2] / 'configs' / 'base.yaml')  # the release's recipe
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def recipe_augmentation(config: str = BASE_CONFIG) -> Dict[str, Any]:
    """The augmentation a training config sets (train.py's options, read as train.py reads ``-c``), as timm's
    ``create_transform`` arguments, random erasing included."""
    from utils.augment import train_transform_kwargs
    from utils.cli import parse_args_with_config
    from utils.config import build_train_parser
    args = parse_args_with_config(build_train_parser(), ['-c', config])
    model_cfg = {'interpolation': 'bicubic'}  # OverLoCK's (used only when the config turns augmentation off)
    return dict(train_transform_kwargs(args, model_cfg), re_prob=args.reprob, re_mode=args.remode,
                re_count=args.recount)


def photo_sources() -> List[str]:
    """Paths of the JPEG photographs shipped by installed packages (scikit-learn, matplotlib)."""
    paths = []
    try:
        from sklearn.datasets import load_sample_images
        paths += [p for p in load_sample_images().filenames if p.lower().endswith('.jpg')]
    except ImportError:
        pass
    try:
        from matplotlib import cbook
        paths.append(str(cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)))
    except (ImportError, OSError, ValueError):
        pass
    if not paths:
        raise RuntimeError('no sample photographs found: install scikit-learn or matplotlib')
    return paths


def build_photo_folder(root: str, num_images: int = 64, num_classes: int = 2, size: Tuple[int, int] = (500, 375),
                       quality: int = 90, seed: int = 0) -> int:
    """Write ``root/<class>/<n>.jpg``: ``num_images`` distinct JPEG photographs of ``size`` (width, height;
    swapped for portrait sources), each a random crop of 60-100 % of a source photograph's side, randomly
    flipped, resized with Lanczos and encoded at ``quality``. Deterministic for a seed. Returns the count."""
    from PIL import Image
    rng = random.Random(seed)
    sources = [Image.open(p).convert('RGB') for p in photo_sources()]
    for n in range(num_images):
        src = sources[n % len(sources)]
        w, h = size if src.width >= src.height else size[::-1]
        frac = rng.uniform(0.6, 1.0)
        cw = min(src.width, round(src.height * w / h)) * frac
        ch = cw * h / w
        left, top = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
        img = src.resize((w, h), Image.LANCZOS, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, f'class{n % num_classes}')
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f'{n:05d}.jpg'), quality=quality)
    return num_images


class DraftRandomResizedCrop:
    """timm's random-resized crop with reduced-size JPEG decoding: call it with the opened, not yet decoded
    image (``ImageFolderDataset.decode``); it returns the cropped and resized RGB image.

    Args:
        rrc: the ``RandomResizedCropAndInterpolation`` it replaces (size, scale, ratio, interpolation).
        min_ratio: decode at 1/r scale only when the crop box, so reduced, still has at least ``min_ratio``
            times the output size on both sides (1: the resize after it never enlarges).
    """

    def __init__(self, rrc, min_ratio: float = 1.0):
        self.rrc = rrc
        self.min_ratio = min_ratio
        self.used = 0  # images decoded at a reduced size (by this process)
        self.seen = 0

    def __call__(self, img):
        import torchvision.transforms.functional as F
        rrc = self.rrc
        i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)  # header only: same draws as timm's path
        interpolation = (random.choice(rrc.interpolation) if isinstance(rrc.interpolation, (tuple, list))
                         else rrc.interpolation)
        out_h, out_w = rrc.size
        self.seen += 1
        reduce = 1
        while reduce < 8 and min(h / (2 * reduce) / out_h, w / (2 * reduce) / out_w) >= self.min_ratio:
            reduce *= 2
        if reduce > 1 and getattr(img, 'format', None) == 'JPEG':
            full_w, full_h = img.size
            img.draft('RGB', (full_w // reduce, full_h // reduce))  # PIL scales by min(size // requested)
            sx, sy = img.size[0] / full_w, img.size[1] / full_h
            self.used += img.size[0] < full_w
            img = img.convert('RGB')
            box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)
            pil_interp = F.pil_modes_mapping[interpolation] if not isinstance(interpolation, int) else interpolation
            return img.resize((out_w, out_h), pil_interp, box=box)
        return F.resized_crop(img.convert('RGB'), i, j, h, w, rrc.size, interpolation)


def train_transform(img_size: int = 224, uint8: bool = True, **overrides):
    """The recipe's training transform (utils.augment.build_train_transform). ``uint8``: as the prefetcher
    path hands it over (no normalisation, erasing on the device); else float32, normalised and erased here."""
    from utils.augment import build_train_transform
    kw = dict(recipe_augmentation(), **overrides)
    return build_train_transform((3, img_size, img_size), MEAN, STD, use_prefetcher=uint8, **kw)


def our_dataset(root: str, img_size: int = 224, uint8: bool = True, draft: bool = False):
    """Our ImageFolderDataset with the recipe's transform; ``draft``: the reduced-size decoding path."""
    from torchvision import transforms

    from utils.data import ImageFolderDataset
    ds = ImageFolderDataset(root)
    tf = train_transform(img_size, uint8)
    if draft:
        ds.decode = DraftRandomResizedCrop(tf.transforms[0])
        tf = transforms.Compose(tf.transforms[1:])
    ds.transform = tf
    return ds


def _collate_uint8(batch):
    from timm.data.loader import fast_collate
    return fast_collate(batch)


def our_loader(root: str, batch_size: int, workers: int, img_size: int = 224, uint8: bool = True,
               draft: bool = False, seed: int = 0):
    """A DataLoader over :func:`our_dataset`: uint8 batches through timm's ``fast_collate`` (``uint8``), or
    float32 batches through the default collate."""
    ds = our_dataset(root, img_size, uint8, draft)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        collate_fn=_collate_uint8 if uint8 else None, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))


def timm_loader(root: str, batch_size: int, workers: int, img_size: int = 224, device: str = 'cpu'):
    """timm's own ``create_dataset`` + ``create_loader`` (prefetcher on) with the same recipe."""
    from timm.data import create_dataset, create_loader
    from utils.augment import install_posterize
    install_posterize()
    ds = create_dataset('', root=root, is_training=True)
    return create_loader(
        ds, input_size=(3, img_size, img_size), batch_size=batch_size, is_training=True, use_prefetcher=True,
        mean=MEAN, std=STD, num_workers=workers, distributed=False, pin_memory=False, device=torch.device(device),
        persistent_workers=workers > 0, **recipe_augmentation())


@dataclass
class LoaderResult:
    name: str
    workers: int
    images_per_s: float
    bytes_per_image: int
    dtype: str
    cpu_ms_per_image: Optional[float] = None  # workers == 0 only: the pipeline's CPU time, robust to load

    @property
    def per_worker(self) -> float:
        return self.images_per_s / max(1, self.workers)


def time_loader(name: str, loader, workers: int, batches: int, device: torch.device) -> LoaderResult:
    """Images/s in the steady state: the first ``1 + 2 * workers`` batches are untimed (worker start-up, and
    the batches the workers prefetch meanwhile), then ``batches`` batches are timed from one arrival to the
    last, each moved to ``device``. Bytes per image: the tensor the workers hand over. Keep ``batches`` plus
    the untimed ones within one epoch of the loader: an epoch boundary drains and refills the workers.
    With ``workers == 0`` the pipeline runs in this process and its CPU time per image is recorded too: on a
    machine shared with other jobs that is the robust number (1000 / it = images/s of one worker on an idle
    core)."""
    inner = getattr(loader, 'loader', loader)  # timm's PrefetchLoader wraps a DataLoader
    it = iter(inner)

    def next_batch():
        nonlocal it
        try:
            return next(it)[0]
        except StopIteration:
            it = iter(inner)
            return next(it)[0]

    first = next_batch()
    nbytes = first[0].numel() * first.element_size()
    dtype = str(first.dtype).replace('torch.', '')
    for _ in range(2 * max(1, workers)):
        next_batch()
    n = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        x = next_batch().to(device, non_blocking=True)
        n += x.shape[0]
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del it
    return LoaderResult(name, workers, n / elapsed, nbytes, dtype, 1e3 * cpu / n if workers == 0 else None)


def bench_loaders(root: str, workers: int = 1, batch_size: int = 32, batches: int = 8, rounds: int = 2,
                  img_size: int = 224, device: str = 'cpu', which: Sequence[str] = ('ours_float32', 'ours_uint8',
                                                                                    'ours_uint8_draft', 'timm'),
                  ) -> List[LoaderResult]:
    """Time each pipeline ``rounds`` times, interleaved (order reversed every other round); keep each one's
    best round.

    Pipelines: ``ours_float32`` (normalised and erased in the worker), ``ours_uint8`` (the prefetcher path),
    ``ours_uint8_draft`` (with :class:`DraftRandomResizedCrop`), ``timm`` (``create_loader``).
    """
    dev = torch.device(device)
    factories: Dict[str, Callable[[], object]] = {
        'ours_float32': lambda: our_loader(root, batch_size, workers, img_size, uint8=False),
        'ours_uint8': lambda: our_loader(root, batch_size, workers, img_size, uint8=True),
        'ours_uint8_draft': lambda: our_loader(root, batch_size, workers, img_size, uint8=True, draft=True),
        'timm': lambda: timm_loader(root, batch_size, workers, img_size, device),
    }
    unknown = [w for w in which if w not in factories]
    if unknown:
        raise ValueError(f'unknown pipeline(s) {unknown}; choose from {list(factories)}')
    best: Dict[str, LoaderResult] = {}

    def score(res: LoaderResult) -> float:
        return 1e3 / res.cpu_ms_per_image if res.cpu_ms_per_image else res.images_per_s

    for r in range(rounds):
        for name in (which if r % 2 == 0 else list(which)[::-1]):  # no pipeline always first or last
            res = time_loader(name, factories[name](), workers, batches, dev)
            if name not in best or score(res) > score(best[name]):
                best[name] = res
    return [best[name] for name in which]


def draft_difference(root: str, img_size: int = 224, samples: int = 64, seed: int = 0) -> Dict[str, float]:
    """Same random draws through the full-size and the reduced-size decoding path: the share of images
    decoded reduced, the mean absolute pixel difference (0-255) over those, and each path's pixel mean and
    standard deviation over all samples."""
    full, draft = our_dataset(root, img_size), our_dataset(root, img_size, draft=True)
    diffs, a_all, b_all = [], [], []

    def reseed(k):  # timm's transforms draw from python's, numpy's and torch's generators
        random.seed(seed + k)
        np.random.seed(seed + k)
        torch.manual_seed(seed + k)

    for k in range(samples):
        idx = k % len(full)
        reseed(k)
        a = np.asarray(full[idx][0], dtype=np.float64)
        reseed(k)
        used_before = draft.decode.used
        b = np.asarray(draft[idx][0], dtype=np.float64)
        if draft.decode.used > used_before:
            diffs.append(np.abs(a - b).mean())
        a_all.append(a)
        b_all.append(b)
    a_all, b_all = np.stack(a_all), np.stack(b_all)
    return dict(reduced_share=draft.decode.used / max(1, draft.decode.seen),
                mean_abs_diff=float(np.mean(diffs)) if diffs else 0.0,
                full_mean=float(a_all.mean()), draft_mean=float(b_all.mean()),
                full_std=float(a_all.std()), draft_std=float(b_all.std()))
