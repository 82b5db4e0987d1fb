"""Object detection and instance segmentation on COCO as the original release ran them (mmdet 2.28, mmcv 1.7):
the dataset layout, the test and training pipelines, COCO box / mask AP with pycocotools, and pictures.

Images are decoded and resized with OpenCV as mmcv's default backend does (BGR, ``cv2.resize``), normalised as
mmcv does and padded to a multiple of 32, so a released model sees the pixels it was evaluated on. Annotations
are COCO json files read with pycocotools; polygons and RLEs become bitmaps as mmdet's ``LoadAnnotations``
makes them. The training pipeline draws its one random number (the flip) from numpy's global generator as mmdet
does.
"""
import contextlib
import io
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import DataError
from .segmentation import _cv2, normalize, palette, read_image, rescale_size

__all__ = [
    'TEST_SCALE', 'SIZE_DIVISOR', 'resize_keep_ratio', 'inference_transform', 'TrainTransform', 'COCOFolder',
    'collate_test', 'collate_train', 'to_coco_json', 'coco_evaluate', 'draw_detections', 'METRIC_NAMES',
]

_logger = logging.getLogger(__name__)

TEST_SCALE = (1333, 800)  # (long, short) edge limits of the original's COCO pipelines
SIZE_DIVISOR = 32
MIN_TRAIN_SIZE = 32  # mmdet drops training images with a side under 32 pixels


def _coco():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError('COCO data and metrics need pycocotools: pip install pycocotools') from None
    return COCO, mask_utils


def resize_keep_ratio(img: np.ndarray, scale: Tuple[int, int] = TEST_SCALE,
                      interpolation: str = 'bilinear') -> Tuple[np.ndarray, np.ndarray]:
    """mmcv's ``imrescale`` as mmdet's ``Resize(keep_ratio=True)`` uses it: the largest size within the (long,
    short) limits, rounded half up. Returns the resized array and mmdet's ``scale_factor`` (w_scale, h_scale,
    w_scale, h_scale) as float32."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    size = rescale_size(w, h, scale)
    flag = {'bilinear': cv2.INTER_LINEAR, 'nearest': cv2.INTER_NEAREST}[interpolation]
    out = cv2.resize(img, size, interpolation=flag)
    w_scale, h_scale = size[0] / w, size[1] / h
    return out, np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)


def _pad(img: np.ndarray, divisor: int = SIZE_DIVISOR) -> np.ndarray:
    h, w = img.shape[:2]
    out = np.zeros((math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor) + img.shape[2:], img.dtype)
    out[:h, :w] = img
    return out


def inference_transform(img: np.ndarray, scale: Tuple[int, int] = TEST_SCALE):
    """The original's COCO test pipeline on a BGR image: resize keeping the ratio to fit 1333x800 (bilinear),
    normalise, pad to a multiple of 32. Returns the [3, H, W] tensor and its :class:`~models.detection.ImageMeta`."""
    from models.detection import ImageMeta
    h, w = img.shape[:2]
    resized, factor = resize_keep_ratio(img, scale)
    x = _pad(normalize(resized))
    meta = ImageMeta(resized.shape[:2], (h, w), tuple(float(f) for f in factor))
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), meta


class TrainTransform:
    """The original 1x recipe's COCO training pipeline (mmdet 2.28): resize keeping the ratio to fit 1333x800
    (image bilinear, masks nearest, boxes scaled and clipped), horizontal flip with probability 0.5 (drawn with
    ``np.random.choice`` as mmdet), normalise, pad to a multiple of 32.

    Call it with a BGR image, boxes [N, 4] (x1, y1, x2, y2; float32), labels [N] and masks [N, H, W] (uint8);
    returns the [3, H', W'] tensor, the target dict (``boxes``, ``labels``, ``masks``, in the padded image) and
    the resized image's (h, w).
    """

    def __init__(self, scale: Tuple[int, int] = TEST_SCALE, flip_prob: float = 0.5):
        self.scale = scale
        self.flip_prob = flip_prob

    def __call__(self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, masks: np.ndarray):
        img, factor = resize_keep_ratio(img, self.scale)
        h, w = img.shape[:2]
        boxes = boxes * factor
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
        masks = np.stack([resize_keep_ratio(m, self.scale, 'nearest')[0] for m in masks]) if len(masks) \
            else np.zeros((0, h, w), dtype=np.uint8)
        flip = np.random.choice(['horizontal', None], p=[self.flip_prob, 1 - self.flip_prob]) == 'horizontal'
        if flip:
            img, masks = img[:, ::-1], masks[:, :, ::-1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
        x = _pad(normalize(np.ascontiguousarray(img)))
        padded = np.zeros((len(masks),) + x.shape[:2], dtype=np.uint8)
        padded[:, :h, :w] = masks
        target = {'boxes': torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
                  'labels': torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                  'masks': torch.from_numpy(padded)}
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), target, (h, w)


def _ann_to_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a uint8 [h, w] bitmap."""
    _, mask_utils = _coco()
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get('counts'), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(np.uint8)


class COCOFolder(torch.utils.data.Dataset):
    """A COCO-layout folder, as mmdet reads COCO 2017: ``annotations/instances_<split>.json`` and the images
    under ``<split>/`` (their ``file_name``).

    The classes are the annotation file's categories in its order (COCO's 80 for the released models); labels
    are 1..C in that order (0 is the background, as torchvision counts). For training (``transform`` given),
    images without annotations of these classes or with a side under 32 pixels are left out, crowd annotations
    and boxes under a pixel are dropped, as mmdet does; for testing every image is kept.

    Args:
        root: the dataset folder.
        split: e.g. ``val2017``.
        transform: :class:`TrainTransform` (training), or None: the test pipeline, giving
            ``(image tensor, ImageMeta, index)``.
        scale: the test pipeline's (long, short) edge limits.
    """

    def __init__(self, root: str, split: str = 'val2017', transform: Optional[TrainTransform] = None,
                 scale: Tuple[int, int] = TEST_SCALE):
        COCO, _ = _coco()
        self.root, self.split, self.transform, self.scale = root, split, transform, scale
        self.ann_file = os.path.join(root, 'annotations', f'instances_{split}.json')
        self.img_dir = os.path.join(root, split)
        if not os.path.isdir(root):
            raise DataError(f'data directory {root} does not exist')
        for path, what in ((self.ann_file, 'the annotation file'), (self.img_dir, 'the image folder')):
            if not os.path.exists(path):
                raise DataError(f'{root} is not a COCO-layout folder: {what} {path} is missing (expected '
                                f'annotations/instances_{split}.json and {split}/*.jpg, as COCO 2017)')
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(self.ann_file)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f'{self.ann_file} is not a json file ({e})') from None
        except (KeyError, TypeError, AssertionError) as e:
            raise DataError(f'{self.ann_file} is not a COCO annotation file (missing or wrong field: '
                            f'{type(e).__name__} {e}); it needs images, annotations and categories') from None
        if not self.coco.dataset.get('categories'):
            raise DataError(f'{self.ann_file} defines no categories')
        self.cat_ids = [c['id'] for c in self.coco.dataset['categories']]
        self.classes = [c['name'] for c in self.coco.dataset['categories']]
        self.cat2label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.img_ids = sorted(self.coco.getImgIds())
        if transform is not None:
            with_anns = {a['image_id'] for a in self.coco.anns.values() if a.get('category_id') in self.cat2label}
            self.img_ids = [i for i in self.img_ids if i in with_anns
                            and min(self.coco.imgs[i]['width'], self.coco.imgs[i]['height']) >= MIN_TRAIN_SIZE]
        if not self.img_ids:
            raise DataError(f'{self.ann_file} lists no {"annotated " if transform else ""}images')
        first = os.path.join(self.img_dir, self.coco.imgs[self.img_ids[0]]['file_name'])
        if not os.path.isfile(first):
            raise DataError(f'{first} (image {self.img_ids[0]} of {self.ann_file}) is missing; the images of '
                            f'split {split} belong in {self.img_dir}')

    def __len__(self) -> int:
        return len(self.img_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.img_dir, self.coco.imgs[self.img_ids[index]]['file_name'])

    def aspect_groups(self) -> List[int]:
        """mmdet's group flags: 1 for images wider than high, else 0 (a batch takes images of one group)."""
        return [int(self.coco.imgs[i]['width'] / self.coco.imgs[i]['height'] > 1) for i in self.img_ids]

    def annotations(self, index: int) -> Tuple[np.ndarray, np.ndarray, List[Any]]:
        """mmdet's ``_parse_ann_info``: boxes [N, 4] float32 (x1, y1, x1 + w, y1 + h), labels, segmentations;
        ignored, crowd, empty and off-image annotations left out."""
        info = self.coco.imgs[self.img_ids[index]]
        boxes, labels, segms = [], [], []
        for ann in self.coco.imgToAnns.get(self.img_ids[index], []):
            if ann.get('ignore', False) or ann.get('iscrowd', False) or ann.get('category_id') not in self.cat2label:
                continue
            x1, y1, w, h = ann['bbox']
            inter_w = max(0, min(x1 + w, info['width']) - max(x1, 0))
            inter_h = max(0, min(y1 + h, info['height']) - max(y1, 0))
            if inter_w * inter_h == 0 or ann.get('area', w * h) <= 0 or w < 1 or h < 1:
                continue
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(self.cat2label[ann['category_id']])
            segms.append(ann.get('segmentation'))
        return (np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64), segms)

    def __getitem__(self, index: int):
        path = self.image_path(index)
        img = read_image(path)
        info = self.coco.imgs[self.img_ids[index]]
        if img.shape[:2] != (info['height'], info['width']):
            raise DataError(f'{path} is {img.shape[1]}x{img.shape[0]} but {self.ann_file} says '
                            f'{info["width"]}x{info["height"]}')
        if self.transform is None:
            x, meta = inference_transform(img, self.scale)
            return x, meta, index
        boxes, labels, segms = self.annotations(index)
        h, w = img.shape[:2]
        masks = np.stack([_ann_to_mask(s, h, w) for s in segms]) if segms else np.zeros((0, h, w), np.uint8)
        return self.transform(img, boxes, labels, masks)


def _pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, x in enumerate(images):
        out[i, :, :x.shape[1], :x.shape[2]] = x
    return out


def collate_test(batch):
    """(padded images, metas, indices) of test samples."""
    return _pad_batch([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]


def collate_train(batch):
    """(padded images, targets, resized sizes) of training samples: images padded to the batch's largest, as
    mmcv's collate does."""
    return _pad_batch([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]


# --- metric -----------------------------------------------------------------------------------------------------

METRIC_NAMES = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')


def to_coco_json(result: Dict[str, torch.Tensor], image_id: int, cat_ids: Sequence[int]):
    """One image's detections as COCO result entries (mmdet's ``_segm2json``): boxes as [x, y, w, h], the
    category ids of the labels, masks as compressed RLE scored by their box. Returns (bbox entries, segm
    entries)."""
    _, mask_utils = _coco()
    boxes = result['boxes'].float().cpu().numpy()
    scores = result['scores'].float().cpu().numpy()
    labels = result['labels'].cpu().numpy()
    bbox_out, segm_out = [], []
    masks = result.get('masks')
    for i in range(boxes.shape[0]):
        x1, y1, x2, y2 = boxes[i].tolist()
        entry = {'image_id': int(image_id), 'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(scores[i]),
                 'category_id': int(cat_ids[int(labels[i]) - 1])}
        bbox_out.append(entry)
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i].cpu().numpy().astype(np.uint8)))
            rle['counts'] = rle['counts'].decode()
            segm_out.append({**{k: entry[k] for k in ('image_id', 'score', 'category_id')}, 'segmentation': rle})
    return bbox_out, segm_out


def coco_evaluate(coco_gt, results: Dict[str, List[Dict[str, Any]]], img_ids: Optional[Sequence[int]] = None,
                  cat_ids: Optional[Sequence[int]] = None, log: bool = True) -> Dict[str, Dict[str, Any]]:
    """COCO AP with pycocotools as mmdet 2.28 runs it (maxDets 100 / 300 / 1000, the 10 IoU thresholds).

    Args:
        coco_gt: the ground truth (``pycocotools.coco.COCO``).
        results: ``{'bbox': entries, 'segm': entries}`` (:func:`to_coco_json`).
        img_ids, cat_ids: what to evaluate over (default: all of the ground truth).
        log: log pycocotools' summary.

    Returns:
        ``{'bbox' | 'segm': {'mAP', 'mAP_50', ... (fractions), 'per_class': {name: AP}, 'stats': the 12}}``
        (nan where the ground truth has nothing to find, as for large objects in small images); a metric
        without any result gets zeros.
    """
    _coco()
    from pycocotools.cocoeval import COCOeval
    img_ids = list(img_ids if img_ids is not None else coco_gt.getImgIds())
    cat_ids = list(cat_ids if cat_ids is not None else coco_gt.getCatIds())
    out: Dict[str, Dict[str, Any]] = {}
    for iou_type, entries in results.items():
        if not entries:
            out[iou_type] = {**{k: 0.0 for k in METRIC_NAMES}, 'per_class': {}, 'stats': [0.0] * 12}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(e) for e in entries])
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = cat_ids
        evaluator.params.imgIds = img_ids
        evaluator.params.maxDets = [100, 300, 1000]
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if log:
            _logger.info('%s:\n%s', iou_type, summary.getvalue().rstrip())
        stats = [float(s) if s >= 0 else float('nan') for s in evaluator.stats]  # -1: no ground truth there
        precision = evaluator.eval['precision']  # [iou, recall, class, area, maxDets]
        per_class = {}
        for k, cat in enumerate(cat_ids):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[coco_gt.loadCats(cat)[0]['name']] = float(np.mean(p)) if p.size else float('nan')
        out[iou_type] = {**dict(zip(METRIC_NAMES, stats[:6])), 'per_class': per_class, 'stats': stats}
    return out


# --- pictures ---------------------------------------------------------------------------------------------------

def draw_detections(img_bgr: np.ndarray, result: Dict[str, torch.Tensor], class_names: Sequence[str],
                    score_thr: float = 0.3, alpha: float = 0.5):
    """The image with each detection scoring at least ``score_thr``: its mask tinted in its class's colour, its
    box outlined, its class and score written above it. Returns a PIL image."""
    from PIL import Image, ImageDraw, ImageFont
    colours = palette(len(class_names))
    keep = (result['scores'] >= score_thr).nonzero().view(-1).tolist()
    keep.sort(key=lambda i: -float(result['scores'][i]))
    rgb = img_bgr[:, :, ::-1].astype(np.float32)
    masks = result.get('masks')
    for i in reversed(keep):  # the best drawn last (on top)
        if masks is not None:
            m = masks[i].cpu().numpy().astype(bool)
            rgb[m] = (1 - alpha) * rgb[m] + alpha * colours[int(result['labels'][i]) - 1]
    picture = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i in reversed(keep):
        colour = tuple(int(v) for v in colours[int(result['labels'][i]) - 1])
        x1, y1, x2, y2 = [float(v) for v in result['boxes'][i]]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f'{class_names[int(result["labels"][i]) - 1]} {float(result["scores"][i]):.2f}'
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        y = max(0.0, y1 - (bottom - top) - 2)
        draw.rectangle([x1, y, x1 + (right - left) + 4, y + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 2, y), text, fill=(255, 255, 255) if sum(colour) < 400 else (0, 0, 0), font=font)
    return picture
