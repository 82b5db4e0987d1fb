"""Mask R-CNN on OverLoCK: the original release's COCO models on torchvision's detection parts.

The release trained Mask R-CNN with mmdet 2.28 (``detection/configs/maskrcnn_overlock/``): the detection form of
the dense backbone (:class:`~models.dense.OverLoCKBackbone`), a 5-level FPN (the fifth by max-pooling), an RPN
with 3 anchors per place, and the standard RoI heads (two shared FC layers for boxes, four convolutions and a
deconvolution for 28x28 masks). Here those are torchvision's modules (``FeaturePyramidNetwork``, ``RPNHead``,
``RegionProposalNetwork``, ``RoIHeads``, ``TwoMLPHead``, ``MaskRCNNHeads`` ...), so training uses torchvision's
target assignment and losses. What decides whether a released file gives the released numbers is the
inference path, and there this module does what mmdet does rather than what torchvision does:

* anchors are not rounded and their strides are the levels' nominal ones (torchvision rounds base anchors and
  divides the padded size by the map size, which is not 64 at the pooled level of most images);
* RoIAlign is ``aligned=True`` with adaptive sampling, and RoIs go to levels by mmdet's rule;
* RPN proposals are kept when wider and taller than 0, and NMS is mmcv's (class offsets below 10,000 boxes);
* boxes are rescaled to the original image before the class-wise NMS, and masks are pasted by bilinear
  sampling into the original image (mmdet's ``_do_paste_mask``), thresholded at 0.5.

:func:`convert_mmdet_state_dict` maps a released file's keys (``neck.*``, ``rpn_head.*``, ``roi_head.*``) to
this model's and moves the background class from last (mmdet) to first (torchvision).
"""
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import FeaturePyramidNetwork, nms, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .dense import OverLoCKBackbone, create_backbone, model_table_args
from .overlock import variant_short

__all__ = [
    'COCO_CLASSES', 'DETECTORS', 'DET_RELEASE_URL', 'ImageMeta', 'FPNBackbone', 'NominalStrideAnchors',
    'LevelRoIAlign', 'DeltaXYWHCoder', 'MaskRCNN', 'batched_nms', 'paste_masks', 'convert_mmdet_state_dict',
    'is_mmdet_state_dict', 'create_detector',
    'release_url',
]

# The released COCO files: schedule 1x / 3x, variant tiny / small / base.
DET_RELEASE_URL = 'https://github.com/LMMMEng/OverLoCK/releases/download/v1/maskrcnn{}_overlock_{}_coco.pth'
_DET_FILE_NAMES = {'t': 'tiny', 's': 'small', 'b': 'base'}

FPN_CHANNELS = 256
STRIDES = (4, 8, 16, 32, 64)
ANCHOR_SIZES = tuple(8 * s for s in STRIDES)  # one scale (8) per level
ANCHOR_RATIOS = (0.5, 1.0, 2.0)


class ImageMeta(NamedTuple):
    """What the test-time post-processing needs of one input image (mmdet's ``img_meta``).

    Attributes:
        image_size: (h, w) of the resized image inside the padded batch (boxes are clipped to it).
        original_size: (h, w) of the image before resizing (boxes and masks are returned there).
        scale_factor: (w_scale, h_scale, w_scale, h_scale) of the resize, float32 as mmdet keeps it.
    """
    image_size: Tuple[int, int]
    original_size: Tuple[int, int]
    scale_factor: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


class FPNBackbone(nn.Module):
    """The detection backbone (``body``) with torchvision's FPN (``fpn``): five 256-channel maps named
    ``'0'`` .. ``'3'`` and ``'pool'`` (strides 4 .. 64), the last by max-pooling the /32 map, as mmdet's FPN
    with ``num_outs=5``."""

    def __init__(self, body: OverLoCKBackbone, out_channels: int = FPN_CHANNELS):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        for m in self.fpn.modules():  # mmdet's FPN init: Xavier (uniform), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


class NominalStrideAnchors(AnchorGenerator):
    """mmdet's anchors: base anchors centred on 0, computed in float32 and not rounded, shifted by each level's
    nominal stride (torchvision's generator rounds them and infers the stride from the padded size, which gives 61
    instead of 64 for a pooled map of 13 cells from an 800-pixel side)."""

    def __init__(self, sizes: Sequence[int] = ANCHOR_SIZES, ratios: Sequence[float] = ANCHOR_RATIOS,
                 strides: Sequence[int] = STRIDES):
        super().__init__(tuple((s,) for s in sizes), (tuple(ratios),) * len(sizes))
        self.strides = tuple(strides)

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device('cpu')) -> torch.Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)  # ratio-major, scale-minor, as mmdet
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)

    def forward(self, image_list: ImageList, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f'{len(feature_maps)} feature maps for {len(self.strides)} anchor strides')
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(torch.float32, device)  # base anchors in float32 whatever the features', as mmdet
        levels = []
        for stride, base, fmap in zip(self.strides, self.cell_anchors, feature_maps):
            h, w = fmap.shape[-2:]
            ys = torch.arange(h, device=device).to(dtype) * stride
            xs = torch.arange(w, device=device).to(dtype) * stride
            y, x = torch.meshgrid(ys, xs, indexing='ij')
            shifts = torch.stack([x.reshape(-1), y.reshape(-1)] * 2, dim=1)
            levels.append((shifts[:, None, :] + base.to(dtype)[None, :, :]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
                split_thr: int = 10000) -> torch.Tensor:
    """mmcv's ``batched_nms``: NMS within each ``idxs`` group, as one NMS over boxes offset per group below
    ``split_thr`` boxes, group by group above. Returns the kept indices by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if boxes.shape[0] < split_thr:
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for i in torch.unique(idxs):
        mask = (idxs == i).nonzero().view(-1)
        keep[mask[nms(boxes[mask], scores[mask], iou_threshold)]] = True
    keep = keep.nonzero().view(-1)
    return keep[scores[keep].argsort(descending=True)]


class DeltaXYWHCoder(BoxCoder):
    """torchvision's box coder (its ``encode`` serves the training targets) decoding in mmdet's arithmetic
    (``DeltaXYWHBBoxCoder``): deltas times the standard deviations ``1 / weights``, centres as ``(x1 + x2) / 2``,
    the log-size deltas clamped on both sides."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes.to(rel_codes.dtype)
        stds = rel_codes.new_tensor([1.0 / w for w in self.weights]).repeat(rel_codes.shape[-1] // 4)
        deltas = (rel_codes * stds).reshape(rel_codes.shape[0], -1, 4)
        centres = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
        sizes = (boxes[:, 2:] - boxes[:, :2])[:, None]
        xy = centres + sizes * deltas[..., :2]
        wh = sizes * deltas[..., 2:].clamp(-self.bbox_xform_clip, self.bbox_xform_clip).exp()
        return torch.cat([xy - wh * 0.5, xy + wh * 0.5], dim=-1).reshape(rel_codes.shape[0], -1)


class _RPN(RegionProposalNetwork):
    """torchvision's RPN (head, anchors, training targets and losses) with mmdet's proposal filter: the top
    ``pre_nms_top_n`` per level, clipped to the image, kept when wider and taller than ``min_size`` (strictly),
    NMS per level, the best ``post_nms_top_n``."""

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        objectness = objectness.detach().reshape(proposals.shape[0], -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                            for i, n in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        boxes_out, scores_out = [], []
        for boxes, logits, idx, (h, w) in zip(proposals, objectness, top, image_shapes):
            boxes, scores, lvl = boxes[idx], logits[idx].sigmoid(), levels[idx]
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
            valid = ((boxes[:, 2] - boxes[:, 0]) > self.min_size) & ((boxes[:, 3] - boxes[:, 1]) > self.min_size)
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[:self.post_nms_top_n()]
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
        return boxes_out, scores_out


class LevelRoIAlign(nn.Module):
    """mmdet's ``SingleRoIExtractor`` with mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``: each RoI pooled
    from one of the four finest maps, level ``floor(log2(sqrt(area) / 56 + 1e-6))`` clamped to 0..3.

    Called as torchvision's ``MultiScaleRoIAlign``: ``(features, boxes per image, image sizes)``.
    """

    def __init__(self, output_size: int, featmap_names: Sequence[str] = ('0', '1', '2', '3'),
                 strides: Sequence[int] = STRIDES[:4], finest_scale: int = 56, sampling_ratio: int = 0):
        super().__init__()
        self.output_size = (output_size, output_size)
        self.featmap_names = list(featmap_names)
        self.strides = tuple(strides)
        self.finest_scale = finest_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: Optional[List[Tuple[int, int]]] = None) -> torch.Tensor:
        maps = [features[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(maps) - 1).long()
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1]) + self.output_size)
        for level, (fmap, stride) in enumerate(zip(maps, self.strides)):
            inds = (levels == level).nonzero().view(-1)
            if inds.numel():
                out[inds] = roi_align(fmap, rois[inds].to(fmap.dtype), self.output_size, 1.0 / stride,
                                      self.sampling_ratio, aligned=True)
        return out


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int], threshold: float = 0.5,
                chunk: int = 64) -> torch.Tensor:
    """mmdet's mask pasting: each [h, w] mask probability map (``masks``: [N, h, w]) sampled bilinearly
    (``grid_sample``, ``align_corners=False``) at the pixel centres of its box in an image of ``size``, then
    thresholded. Only the boxes' region (plus a pixel) is sampled: outside it no pixel reaches 0.5. Returns
    [N, H, W] booleans."""
    n = masks.shape[0]
    img_h, img_w = size
    out = torch.zeros((n, img_h, img_w), dtype=torch.bool, device=masks.device)
    for s in range(0, n, chunk):
        m, b = masks[s:s + chunk, None].float(), boxes[s:s + chunk]
        x0i, y0i = (b.min(dim=0).values.floor()[:2] - 1).clamp(min=0).int().tolist()
        x1i = int(b[:, 2].max().ceil().add(1).clamp(max=img_w))
        y1i = int(b[:, 3].max().ceil().add(1).clamp(max=img_h))
        if x1i <= x0i or y1i <= y0i:
            continue
        x0, y0, x1, y1 = b.split(1, dim=1)
        ys = torch.arange(y0i, y1i, device=masks.device).float() + 0.5
        xs = torch.arange(x0i, x1i, device=masks.device).float() + 0.5
        ys = (ys - y0) / (y1 - y0) * 2 - 1
        xs = (xs - x0) / (x1 - x0) * 2 - 1
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)  # empty boxes, as mmdet
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
        grid = torch.stack([xs[:, None, :].expand(-1, ys.shape[1], -1), ys[:, :, None].expand(-1, -1, xs.shape[1])],
                           dim=3)
        sampled = F.grid_sample(m, grid.to(m.dtype), align_corners=False)[:, 0]
        out[s:s + chunk, y0i:y1i, x0i:x1i] = sampled >= threshold
    return out


class MaskRCNN(nn.Module):
    """Mask R-CNN with the original's settings (mmdet's ``mask_rcnn_r50_fpn.py`` as the OverLoCK configs use it).

    Input: a batch of normalised images padded to a multiple of 32 (``utils.detection`` prepares them as mmdet
    does) with an :class:`ImageMeta` per image. In training mode, ``forward(images, metas, targets)`` returns
    torchvision's losses (``targets``: dicts of ``boxes`` [N, 4] in the resized image, ``labels`` [N] in
    1..num_classes, ``masks`` [N, H, W]); in eval mode, ``forward(images, metas)`` returns per image a dict of
    ``boxes`` [N, 4] (x1, y1, x2, y2 in the original image), ``scores``, ``labels`` (1..num_classes; 0 is the
    background, as in torchvision) and ``masks`` ([N, H, W] booleans at the original size), at most 100.

    Args:
        backbone: the dense backbone (detection form).
        num_classes: object classes, background not counted (COCO: 80).
        score_thresh / nms_thresh / detections_per_img / mask_threshold: the test settings (0.05, 0.5, 100, 0.5).
        rpn_*: proposals per level before NMS and kept after it (train 2000 / 1000, test 1000 / 1000), NMS 0.7.
        channels: width of the FPN, the RPN and the mask head (256 as released).
        fc_channels: width of the box head's two FC layers (1024 as released).
    """

    def __init__(self, backbone: OverLoCKBackbone, num_classes: int = 80, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, mask_threshold: float = 0.5,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_train: int = 1000, rpn_post_nms_top_n_test: int = 1000,
                 rpn_nms_thresh: float = 0.7, channels: int = FPN_CHANNELS, fc_channels: int = 1024):
        super().__init__()
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.backbone = FPNBackbone(backbone, channels)
        anchors = NominalStrideAnchors()
        self.rpn = _RPN(anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
                        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
                        pre_nms_top_n=dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
                        post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
                        nms_thresh=rpn_nms_thresh, score_thresh=0.0)
        self.rpn.min_size = 0.0
        self.rpn.box_coder = DeltaXYWHCoder((1.0, 1.0, 1.0, 1.0))
        box_head = TwoMLPHead(channels * 7 * 7, fc_channels)
        box_predictor = FastRCNNPredictor(fc_channels, num_classes + 1)
        mask_head = MaskRCNNHeads(channels, (channels,) * 4, 1)
        mask_predictor = MaskRCNNPredictor(channels, channels, num_classes + 1)
        self.roi_heads = RoIHeads(
            LevelRoIAlign(7), box_head, box_predictor, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=512, positive_fraction=0.25, bbox_reg_weights=(10., 10., 5., 5.),
            score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
            mask_roi_pool=LevelRoIAlign(14), mask_head=mask_head, mask_predictor=mask_predictor)
        self.roi_heads.box_coder = DeltaXYWHCoder((10., 10., 5., 5.))
        self._init_heads()

    def _init_heads(self) -> None:
        """mmdet's initialisation of the parts torchvision initialises otherwise: the box head's FC layers
        (Xavier uniform), the classifier (normal, std 0.01) and the box regressor (std 0.001)."""
        for fc in (self.roi_heads.box_head.fc6, self.roi_heads.box_head.fc7):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        predictor = self.roi_heads.box_predictor
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)

    def forward(self, images: torch.Tensor, metas: Optional[Sequence[ImageMeta]] = None,
                targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if metas is None:
            metas = [ImageMeta(tuple(images.shape[-2:]), tuple(images.shape[-2:]))] * images.shape[0]
        if len(metas) != images.shape[0]:
            raise ValueError(f'{len(metas)} image metas for a batch of {images.shape[0]}')
        if self.training and targets is None:
            raise ValueError('training needs targets (boxes, labels, masks per image)')
        image_list = ImageList(images, [tuple(int(v) for v in m.image_size) for m in metas])
        features = self.backbone(images)
        proposals, rpn_losses = self.rpn(image_list, features, targets if self.training else None)
        if self.training:
            _, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
            return {**rpn_losses, **roi_losses}
        return self._detect(features, proposals, metas)

    @torch.no_grad()
    def _detect(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                metas: Sequence[ImageMeta]) -> List[Dict[str, torch.Tensor]]:
        """mmdet's ``simple_test`` with ``rescale=True``."""
        heads = self.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals))
        class_logits, box_deltas = heads.box_predictor(box_features)
        counts = [p.shape[0] for p in proposals]
        results, mask_rois = [], []
        for logits, deltas, props, meta in zip(class_logits.split(counts), box_deltas.split(counts), proposals, metas):
            scale = torch.tensor(meta.scale_factor, dtype=torch.float32, device=props.device).to(props.dtype)
            boxes = heads.box_coder.decode(deltas, [props])[:, 1:]  # [K, C, 4], background dropped
            h, w = meta.image_size
            boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                                 boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
            boxes = (boxes / scale).reshape(-1, 4)
            scores = F.softmax(logits, dim=-1)[:, 1:].reshape(-1)
            labels = torch.arange(1, self.num_classes + 1, device=props.device).repeat(props.shape[0])
            valid = (scores > heads.score_thresh).nonzero().view(-1)
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
            keep = batched_nms(boxes, scores, labels, heads.nms_thresh)[:heads.detections_per_img]
            results.append({'boxes': boxes[keep], 'scores': scores[keep], 'labels': labels[keep]})
            mask_rois.append(boxes[keep] * scale)  # back to the resized image, as mmdet pools the masks
        if not heads.has_mask():
            return results
        if sum(r.shape[0] for r in mask_rois) == 0:
            for r, meta in zip(results, metas):
                r['masks'] = torch.zeros((0,) + tuple(meta.original_size), dtype=torch.bool, device=r['boxes'].device)
            return results
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, mask_rois)))
        for r, rois, meta, lg in zip(results, mask_rois, metas, logits.split([m.shape[0] for m in mask_rois])):
            scale = torch.tensor(meta.scale_factor, dtype=torch.float32, device=rois.device).to(rois.dtype)
            probs = lg[torch.arange(lg.shape[0], device=lg.device), r['labels']].sigmoid()
            r['masks'] = paste_masks(probs, rois / scale, tuple(meta.original_size), self.mask_threshold)
        return results

    @staticmethod
    def adapt_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A weight file's state_dict in this model's layout: a released (mmdet) one converted, ours as it is."""
        return convert_mmdet_state_dict(state_dict) if is_mmdet_state_dict(state_dict) else state_dict

    @torch.no_grad()
    def reparameterize(self) -> 'MaskRCNN':
        """The backbone's deploy form (merged DilatedReparamBlocks), in place; returns self."""
        self.backbone.body.reparameterize()
        return self


# Constructor arguments of the released detectors (the original's configs): the backbone's drop path.
DETECTORS: Dict[str, Dict[str, Any]] = {
    'maskrcnn_overlock_t': dict(variant='overlock_t', drop_path_rate=0.2),
    'maskrcnn_overlock_s': dict(variant='overlock_s', drop_path_rate=0.4),
    'maskrcnn_overlock_b': dict(variant='overlock_b', drop_path_rate=0.6),
}


def create_detector(name: str, num_classes: int = 80, reparam: bool = False, **kwargs: Any) -> MaskRCNN:
    """A Mask R-CNN of ``DETECTORS`` (``maskrcnn_overlock_t`` ...), randomly initialised; ``kwargs`` override the
    backbone's constructor arguments (e.g. ``drop_path_rate``, or a small ``depth`` for experiments), and
    ``channels`` / ``fc_channels`` the heads' widths (256 / 1024 as released).

    Args:
        name: ``maskrcnn_overlock_{t,s,b}``.
        num_classes: object classes (COCO: 80).
        reparam: build the backbone in deploy form.
    """
    variant, cfg, heads = model_table_args(DETECTORS, name, reparam, kwargs, ('channels', 'fc_channels'))
    return MaskRCNN(create_backbone(variant, detection=True, **cfg), num_classes=num_classes, **heads)


def release_url(name: str, schedule: str = '1x') -> str:
    """The released COCO file of a detector name and schedule ('1x' or '3x')."""
    if schedule not in ('1x', '3x'):
        raise ValueError(f'schedule {schedule!r}: the release has 1x and 3x')
    return DET_RELEASE_URL.format(schedule, _DET_FILE_NAMES[variant_short(DETECTORS[name]['variant'])])


# --- released files ---------------------------------------------------------------------------------------------

def _mmdet_key(key: str) -> Optional[str]:
    """This model's name of a released file's key (None: not a detector key)."""
    if key.startswith('backbone.'):
        return 'backbone.body.' + key[len('backbone.'):]
    parts = key.split('.')
    if key.startswith('neck.lateral_convs.'):
        return f'backbone.fpn.inner_blocks.{parts[2]}.0.{parts[-1]}'
    if key.startswith('neck.fpn_convs.'):
        return f'backbone.fpn.layer_blocks.{parts[2]}.0.{parts[-1]}'
    rpn = {'rpn_head.rpn_conv': 'rpn.head.conv.0.0', 'rpn_head.rpn_cls': 'rpn.head.cls_logits',
           'rpn_head.rpn_reg': 'rpn.head.bbox_pred'}
    head = {'roi_head.bbox_head.shared_fcs.0': 'roi_heads.box_head.fc6',
            'roi_head.bbox_head.shared_fcs.1': 'roi_heads.box_head.fc7',
            'roi_head.bbox_head.fc_cls': 'roi_heads.box_predictor.cls_score',
            'roi_head.bbox_head.fc_reg': 'roi_heads.box_predictor.bbox_pred',
            'roi_head.mask_head.upsample': 'roi_heads.mask_predictor.conv5_mask',
            'roi_head.mask_head.conv_logits': 'roi_heads.mask_predictor.mask_fcn_logits'}
    stem = '.'.join(parts[:-1])
    if stem in rpn:
        return f'{rpn[stem]}.{parts[-1]}'
    if stem in head:
        return f'{head[stem]}.{parts[-1]}'
    if key.startswith('roi_head.mask_head.convs.'):
        return f'roi_heads.mask_head.{parts[3]}.0.{parts[-1]}'
    return None


def is_mmdet_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether a state_dict has the released (mmdet) layout rather than this model's."""
    return any(k.startswith(('rpn_head.', 'roi_head.', 'neck.')) for k in state_dict)


def convert_mmdet_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A released (mmdet) Mask R-CNN state_dict in this model's names. The box classifier's background row moves
    from last to first, and the class-specific box regressor and mask classifier get a zero background entry
    first (torchvision's layout); keys that are no part of a detector are reported."""
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        name = _mmdet_key(key)
        if name is None:
            unknown.append(key)
            continue
        if key.startswith('roi_head.bbox_head.fc_cls.'):
            value = torch.cat([value[-1:], value[:-1]])
        elif key.startswith(('roi_head.bbox_head.fc_reg.', 'roi_head.mask_head.conv_logits.')):
            rows = 4 if 'fc_reg' in key else 1
            value = torch.cat([value.new_zeros((rows,) + value.shape[1:]), value])
        out[name] = value
    if unknown:
        from .weights import CheckpointError
        raise CheckpointError(f'{len(unknown)} keys of the file are no part of a Mask R-CNN '
                              f'({", ".join(unknown[:3])}{", ..." if len(unknown) > 3 else ""})')
    return out


# COCO's 80 classes, in the order of the released models' outputs (mmdet's CocoDataset; category ids sorted).
COCO_CLASSES: Tuple[str, ...] = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
    'hair drier', 'toothbrush',
)
assert len(COCO_CLASSES) == 80
