"""Semantic segmentation on ADE20K as the original release ran it (mmseg 0.30, mmcv 1.7): the dataset layout,
the test and training pipelines step by step, whole-image inference, the mIoU metric and pictures of the
predictions.

Images are decoded and resized with OpenCV, as mmcv's default backend does (BGR, ``cv2.resize``), so a
released model sees the pixels it was evaluated on; annotations are read with Pillow, as mmseg reads them.
The training pipeline draws its random numbers from numpy's global generator in mmseg's order, so a worker
seeded alike augments alike.
"""
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError

__all__ = [
    'IMG_NORM', 'TEST_SCALE', 'CROP_SIZE', 'IGNORE_INDEX', 'read_image', 'read_label', 'reduce_zero_label',
    'rescale_size', 'normalize', 'inference_transform', 'TrainTransform', 'SegSample', 'ADE20KFolder', 'find_images',
    'whole_inference', 'IoUAccumulator', 'palette', 'draw_prediction',
]

_logger = logging.getLogger(__name__)

# The original's ADE20K config: normalisation (0-255 scale, RGB), test scale (long, short edge), crop.
IMG_NORM = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
TEST_SCALE = (2048, 512)
CROP_SIZE = (512, 512)
RATIO_RANGE = (0.5, 2.0)
SIZE_DIVISOR = 32
IGNORE_INDEX = 255
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def _cv2():
    try:
        import cv2
    except ImportError:
        raise DataError('segmentation needs OpenCV (the original\'s image backend): '
                        'pip install opencv-python-headless') from None
    return cv2


def read_image(path: str) -> np.ndarray:
    """An image file as a BGR uint8 array [H, W, 3] (OpenCV's decoder, EXIF orientation applied, as mmcv)."""
    cv2 = _cv2()
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f'cannot read image {path} ({e.strerror or e})') from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DataError(f'cannot read image {path} (not an image OpenCV decodes); remove or replace it')
    return img


def read_label(path: str) -> np.ndarray:
    """An annotation PNG as a uint8 array [H, W] of raw class ids (Pillow, as mmseg reads them)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            label = np.array(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f'cannot read annotation {path} ({type(e).__name__}: {e})') from None
    label = label.squeeze()
    if label.ndim != 2:
        raise DataError(f'annotation {path} has shape {label.shape}; expected a single-channel map of class ids')
    return label.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's ids: 0 ('other') becomes ignored (255), 1..150 become 0..149."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX
    return out.astype(np.uint8)


def rescale_size(w: int, h: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv's ``rescale_size`` for a (long, short) edge limit: the largest size that fits both, the ratio kept,
    rounded half up. Returns (w, h)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def normalize(img: np.ndarray) -> np.ndarray:
    """mmcv's ``imnormalize`` (BGR uint8 -> RGB float32, the 0-255 scale's mean and std): the constants rounded to
    float32 (mmseg stores them so), the arithmetic in float64, the result rounded to float32. (mmcv does this
    with OpenCV's ``subtract`` / ``multiply``, whose rounding changed in OpenCV 5; numpy gives mmcv's values of
    the OpenCV 4 it ran on.)"""
    mean = np.array(IMG_NORM['mean'], dtype=np.float32).astype(np.float64)
    stdinv = 1 / np.array(IMG_NORM['std'], dtype=np.float32).astype(np.float64)
    return ((img[:, :, ::-1].astype(np.float64) - mean) * stdinv).astype(np.float32)


def inference_transform(img: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The original's ADE20K test pipeline on a BGR image: resize keeping the ratio to fit 2048x512
    (bilinear), then to the next multiple of 32 (bicubic), normalise. Returns the [3, H, W] tensor and the
    original (h, w) the logits are resized back to."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    resized = cv2.resize(img, rescale_size(w, h, TEST_SCALE), interpolation=cv2.INTER_LINEAR)
    rh, rw = resized.shape[:2]
    multiple = (math.ceil(rw / SIZE_DIVISOR) * SIZE_DIVISOR, math.ceil(rh / SIZE_DIVISOR) * SIZE_DIVISOR)
    resized = cv2.resize(resized, multiple, interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(normalize(resized).transpose(2, 0, 1).copy()), (h, w)


class TrainTransform:
    """The original's ADE20K training pipeline (mmseg 0.30's transforms, random draws in its order from numpy's
    global generator): random rescale (0.5-2x of 2048x512), a 512x512 crop in which no class covers more than
    75 % (10 tries), horizontal flip (0.5), photometric distortion (brightness, contrast, saturation, hue),
    normalisation, padding to 512x512 (label padding ignored).

    Call it with a BGR image and its label (already reduced: 0-149, 255 ignored); returns the [3, 512, 512]
    float tensor and the [512, 512] int64 label.
    """

    def __init__(self, crop_size: Tuple[int, int] = CROP_SIZE, scale: Tuple[int, int] = TEST_SCALE,
                 ratio_range: Tuple[float, float] = RATIO_RANGE, cat_max_ratio: float = 0.75, flip_prob: float = 0.5):
        self.crop_size = crop_size
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob

    # -- geometry
    def _rescale(self, img: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        cv2 = _cv2()
        lo, hi = self.ratio_range
        ratio = np.random.random_sample() * (hi - lo) + lo
        scale = int(self.scale[0] * ratio), int(self.scale[1] * ratio)
        h, w = img.shape[:2]
        size = rescale_size(w, h, scale)
        return (cv2.resize(img, size, interpolation=cv2.INTER_LINEAR),
                cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))

    def _crop_box(self, shape: Tuple[int, ...]) -> Tuple[int, int, int, int]:
        margin_h, margin_w = max(shape[0] - self.crop_size[0], 0), max(shape[1] - self.crop_size[1], 0)
        y = np.random.randint(0, margin_h + 1)
        x = np.random.randint(0, margin_w + 1)
        return y, y + self.crop_size[0], x, x + self.crop_size[1]

    def _crop(self, img: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        box = self._crop_box(img.shape)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                patch = label[box[0]:box[1], box[2]:box[3]]
                ids, counts = np.unique(patch, return_counts=True)
                counts = counts[ids != IGNORE_INDEX]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(img.shape)
        return img[box[0]:box[1], box[2]:box[3]], label[box[0]:box[1], box[2]:box[3]]

    # -- photometric distortion (uint8 in, uint8 out)
    @staticmethod
    def _scale_shift(img: np.ndarray, alpha: float = 1., beta: float = 0.) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _contrast(self, img: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            img = self._scale_shift(img, alpha=np.random.uniform(0.5, 1.5))
        return img

    def _photometric(self, img: np.ndarray) -> np.ndarray:
        cv2 = _cv2()
        if np.random.randint(2):  # brightness
            img = self._scale_shift(img, beta=np.random.uniform(-32, 32))
        contrast_first = np.random.randint(2) == 1
        if contrast_first:
            img = self._contrast(img)
        if np.random.randint(2):  # saturation
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[:, :, 1] = self._scale_shift(hsv[:, :, 1], alpha=np.random.uniform(0.5, 1.5))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if np.random.randint(2):  # hue
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + np.random.randint(-18, 18)) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if not contrast_first:
            img = self._contrast(img)
        return img

    def __call__(self, img: np.ndarray, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        img, label = self._rescale(img, label)
        img, label = self._crop(img, label)
        if np.random.rand() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        img = self._photometric(np.ascontiguousarray(img))
        img = normalize(img)
        out = np.zeros((*self.crop_size, 3), dtype=np.float32)  # pad bottom / right
        out[:img.shape[0], :img.shape[1]] = img
        target = np.full(self.crop_size, IGNORE_INDEX, dtype=np.int64)
        target[:label.shape[0], :label.shape[1]] = label
        return torch.from_numpy(out.transpose(2, 0, 1).copy()), torch.from_numpy(target)


# --- data -----------------------------------------------------------------------------------------------------

@dataclass
class SegSample:
    image: str
    label: Optional[str]


def find_images(path: str) -> List[str]:
    """``path`` itself (one image) or the images in a folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f'{path} does not exist')
    found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMG_EXTENSIONS))
    if not found:
        raise DataError(f'{path} holds no images ({" ".join(IMG_EXTENSIONS)})')
    return found


class ADE20KFolder(torch.utils.data.Dataset):
    """An ADE20K-layout folder (``ADEChallengeData2016``): ``images/<split>/*.jpg`` with
    ``annotations/<split>/*.png`` of the same name.

    Args:
        root: the dataset folder.
        split: ``training`` or ``validation``.
        transform: ``TrainTransform`` (training), or None: the test pipeline, returning
            ``(image tensor, label, original size, index)`` with the raw-size reduced label.
    """

    def __init__(self, root: str, split: str = 'validation', transform: Optional[TrainTransform] = None):
        self.root, self.split, self.transform = root, split, transform
        images, labels = os.path.join(root, 'images', split), os.path.join(root, 'annotations', split)
        if not os.path.isdir(root):
            raise DataError(f'data directory {root} does not exist')
        for folder in (images, labels):
            if not os.path.isdir(folder):
                raise DataError(f'{root} is not an ADE20K-layout folder: {folder} is missing (expected '
                                f'images/{split}/*.jpg and annotations/{split}/*.png, as in ADEChallengeData2016)')
        names = sorted(n for n in os.listdir(images) if n.lower().endswith(IMG_EXTENSIONS))
        if not names:
            raise DataError(f'{images} holds no images')
        self.samples = []
        missing = []
        for n in names:
            label = os.path.join(labels, os.path.splitext(n)[0] + '.png')
            if not os.path.isfile(label):
                missing.append(n)
            self.samples.append(SegSample(os.path.join(images, n), label))
        if missing:
            raise DataError(f'{len(missing)} images in {images} have no annotation in {labels} (e.g. '
                            f'{os.path.splitext(missing[0])[0]}.png)')

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        img = read_image(sample.image)
        label = reduce_zero_label(read_label(sample.label))
        if img.shape[:2] != label.shape:
            raise DataError(f'{sample.label} is {label.shape[1]}x{label.shape[0]} but its image is '
                            f'{img.shape[1]}x{img.shape[0]}')
        if self.transform is not None:
            return self.transform(img, label)
        x, size = inference_transform(img)
        return x, torch.from_numpy(label.astype(np.int64)), size, index


# --- inference and metric ---------------------------------------------------------------------------------------

@torch.no_grad()
def whole_inference(model: torch.nn.Module, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """mmseg's whole-image inference: the logits for the [1, 3, H, W] input (at its size), resized to the
    original ``size`` (bilinear, ``align_corners=False``). Returns [1, classes, h, w]."""
    logits = model(x)
    return F.interpolate(logits, size=tuple(size), mode='bilinear', align_corners=False)


class IoUAccumulator:
    """Intersections and unions summed over a dataset, as mmseg computes its ``mIoU`` (pixels of the ignore index
    excluded; a class absent from both prediction and labels has IoU nan and is left out of the mean).

    Counts are int64 (exact); mmseg sums float32 counts, which differ from these at ~1e-7 relative on a whole
    dataset, far below the two decimals it reports.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersect = np.zeros(num_classes, dtype=np.int64)
        self.pred = np.zeros(num_classes, dtype=np.int64)
        self.label = np.zeros(num_classes, dtype=np.int64)

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        """One image: predicted class ids and (reduced) labels of the same shape."""
        pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
        if pred.shape != label.shape:
            raise ValueError(f'prediction and label differ in size: {pred.shape} vs {label.shape}')
        keep = label != self.ignore_index
        pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
        n = self.num_classes
        self.intersect += np.bincount(pred[pred == label], minlength=n)[:n]
        self.pred += np.bincount(pred, minlength=n)[:n]
        self.label += np.bincount(label, minlength=n)[:n]

    @property
    def union(self) -> np.ndarray:
        return self.pred + self.label - self.intersect

    def per_class(self) -> Dict[str, np.ndarray]:
        """``IoU`` and ``Acc`` per class (fractions; nan where undefined)."""
        with np.errstate(divide='ignore', invalid='ignore'):
            return {'IoU': self.intersect / self.union, 'Acc': self.intersect / self.label}

    def summary(self) -> Dict[str, float]:
        """``aAcc``, ``mIoU``, ``mAcc`` in percent (unrounded)."""
        per = self.per_class()
        with np.errstate(divide='ignore', invalid='ignore'):
            aacc = self.intersect.sum() / self.label.sum()
        return {'aAcc': 100 * float(aacc), 'mIoU': 100 * float(np.nanmean(per['IoU'])),
                'mAcc': 100 * float(np.nanmean(per['Acc']))}


# --- pictures -------------------------------------------------------------------------------------------------

def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (RGB uint8 [classes, 3]): hues spread by the golden ratio, three levels of
    saturation and value, so that neighbouring ids look different."""
    import colorsys
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        h = (i * 0.61803398875) % 1.0
        s, v = (0.95, 0.85, 0.65)[i % 3], (0.95, 0.75, 1.0)[(i // 3) % 3]
        out[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)]
    return out


def draw_prediction(img_bgr: np.ndarray, pred: np.ndarray, class_names: Sequence[str], alpha: float = 0.5,
                    max_legend: int = 20):
    """The image with each pixel tinted by its predicted class, and a legend of the classes shown (largest
    first). Returns a PIL image."""
    from PIL import Image, ImageDraw, ImageFont
    colours = palette(len(class_names))
    rgb = img_bgr[:, :, ::-1].astype(np.float32)
    overlay = (1 - alpha) * rgb + alpha * colours[pred].astype(np.float32)
    picture = Image.fromarray(np.clip(overlay + 0.5, 0, 255).astype(np.uint8))
    ids, counts = np.unique(pred, return_counts=True)
    order = np.argsort(-counts)
    shown = [int(ids[i]) for i in order if counts[i] >= 0.001 * pred.size][:max_legend]  # >= 0.1 % of the pixels
    font = ImageFont.load_default()
    row = 16
    legend = Image.new('RGB', (220, max(picture.height, row * len(shown) + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for k, c in enumerate(shown):
        y = 4 + k * row
        draw.rectangle([6, y, 20, y + 12], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
        share = 100 * counts[list(ids).index(c)] / pred.size
        draw.text((26, y), f'{class_names[c].strip()} ({share:.0f}%)', fill=(0, 0, 0), font=font)
    out = Image.new('RGB', (picture.width + legend.width, max(picture.height, legend.height)), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(legend, (picture.width, 0))
    return out
