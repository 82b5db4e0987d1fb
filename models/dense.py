"""Dense prediction on OverLoCK: the original release's segmentation and detection backbones, and UPerNet.

The release trained its dense models with mmseg 0.30 / mmdet 2.28 on copies of the classification network
(``segmentation/models/overlock.py``, ``detection/models/overlock.py``). Here the backbone *is* the
classification network (:class:`OverLoCKBackbone` subclasses :class:`~models.overlock.OverLoCK` and reuses its
stages), with what the release's copies add: a LayerNorm2d on each of the four outputs and, for detection, a
projection of the Overview-Net output added to the last map. Two details decide whether a released file
gives the released numbers: stage 3 is fed with the *normalised* stage-2 map (the copies pass it on), and the
heads keep mmcv's module names (``ConvModule``'s ``conv`` / ``bn``) so that the checkpoints' keys load as they
are.

UPerNet (``UPerHead`` with a pyramid pooling module, and ``FCNHead`` as the auxiliary head on the /16 map) is
written in plain PyTorch with mmseg's structure, names and initialisation. The detection models build on the
same backbone (``models/detection.py``).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm2d, LayerScale
from .overlock import OverLoCK, check_input, variant_args, variant_short
from .weights import CheckpointError, checkpoint_filter_fn, extract_state_dict, read_checkpoint_file

__all__ = [
    'OverLoCKBackbone', 'create_backbone', 'ConvModule', 'UPerHead', 'FCNHead', 'UPerNet', 'SEGMENTERS',
    'create_segmenter', 'ADE20K_CLASSES', 'SEG_RELEASE_URL', 'checkpoint_task', 'load_dense_checkpoint',
    'load_backbone_weights',
]

# The released ADE20K UPerNet files (the release names the variants tiny / small / base there).
SEG_RELEASE_URL = 'https://github.com/LMMMEng/OverLoCK/releases/download/v1/upernet_overlock_{}_ade20k.pth'
_SEG_FILE_NAMES = {'t': 'tiny', 's': 'small', 'b': 'base'}


class OverLoCKBackbone(OverLoCK):
    """The original release's dense backbone: four maps at strides 4, 8, 16 and 32.

    The maps are Base-Net stages 1 and 2, the Focus-Net at /16 (its features and running context), and the
    Focus-Net output at /32, each through its own LayerNorm2d (``extra_norm``); the normalised stage-2 map is
    also what stage 3 receives, as in the release. With ``detection=True`` (the detection backbone) the /32 map
    adds ``h_proj`` of the normalised Overview-Net output. No classifier heads: ``state_dict()`` holds what the
    released files hold under ``backbone.``.

    Args:
        detection: build the detection backbone (``h_proj`` and a fifth LayerNorm2d).
        kwargs: :class:`~models.overlock.OverLoCK`'s arguments (e.g. a variant's, ``drop_path_rate``).
    """

    def __init__(self, detection: bool = False, **kwargs: Any):
        for key in ('num_classes', 'use_ds', 'global_pool', 'projection', 'drop_rate'):
            kwargs.pop(key, None)
        super().__init__(num_classes=0, use_ds=False, **kwargs)
        del self.head, self.head_drop  # no classifier (and none of its keys)
        dims = [c['num_chs'] for c in self.feature_info]
        self.out_channels = dims
        self.detection = detection
        if detection:
            fusion_dim = dims[3]
            self.h_proj = nn.Sequential(nn.Conv2d(self.embed_dim[3], fusion_dim, 1), LayerScale(fusion_dim, 1e-5))
            self.h_proj[0].apply(self._init_weights)
        self.extra_norm = nn.ModuleList([LayerNorm2d(d) for d in dims])
        if detection:
            self.extra_norm.append(LayerNorm2d(self.embed_dim[3]))  # on the Overview-Net output, for h_proj

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``[x4, x8, x16, x32]``: the four normalised maps."""
        x = self._stage1(check_input(x, self.in_chans))
        out4 = self.extra_norm[0](x)
        out8 = self.extra_norm[1](self._stage2(x))
        x = self._stage3(out8)  # the release feeds the normalised map on
        ctx = self._stage4(x)
        x, h, prior = self._focus3(x, ctx)
        out16 = self.extra_norm[2](torch.cat([x, h], dim=1))
        out32 = self.extra_norm[3](self._focus4(x, h, prior))
        if self.detection:
            out32 = out32 + self.h_proj(self.extra_norm[4](ctx))
        return [out4, out8, out16, out32]

    # The classification API does not apply to a backbone.
    def forward_features(self, x: torch.Tensor):
        raise NotImplementedError('OverLoCKBackbone returns its four maps from forward()')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        raise NotImplementedError('OverLoCKBackbone has no classifier')

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        raise NotImplementedError('OverLoCKBackbone has no classifier')


def create_backbone(variant: str, detection: bool = False, **kwargs: Any) -> OverLoCKBackbone:
    """The dense backbone of a variant (``overlock_t``, ``overlock_t_reparam``, ...); ``kwargs`` override its
    constructor arguments (e.g. ``drop_path_rate``)."""
    args = variant_args(variant)
    args.update(kwargs)
    return OverLoCKBackbone(detection=detection, **args)


# --- UPerNet (mmseg's UPerHead and FCNHead, mmcv's ConvModule names) ------------------------------------------

class ConvModule(nn.Module):
    """Convolution, BatchNorm, ReLU, named as mmcv's ``ConvModule`` (``conv``, ``bn``), without a conv bias
    (the norm has one); initialised as mmcv does (Kaiming normal, fan-out; BatchNorm 1 / 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class _DecodeHead(nn.Module):
    """What mmseg's ``BaseDecodeHead`` gives every head: the classifier ``conv_seg`` (registered first, as its
    key comes first in the released files; normal init, std 0.01) after 2-D dropout."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class UPerHead(_DecodeHead):
    """UPerNet's head (mmseg's ``UPerHead``): a pyramid pooling module on the coarsest map, an FPN over all
    four, their outputs upsampled to the finest map and fused; logits at stride 4.

    Args:
        in_channels: channels of the four input maps.
        channels: the head's width.
        num_classes: classes.
        pool_scales: output sizes of the pyramid pooling module.
        dropout: 2-D dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 512, num_classes: int = 150,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1)) for s in pool_scales])
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_resize(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(m) for conv, m in zip(self.lateral_convs, maps)]
        laterals.append(self._psp(maps[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """UPerNet's auxiliary head (mmseg's ``FCNHead`` with one 3x3 convolution, no input concatenation)."""

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))


class UPerNet(nn.Module):
    """The released ADE20K segmenter: :class:`OverLoCKBackbone` + :class:`UPerHead` + :class:`FCNHead` on the
    /16 map (mmseg's ``EncoderDecoder``). ``forward`` returns the logits at the input's size (bilinear, as
    mmseg's ``encode_decode``); in training mode with the auxiliary head, ``{'main': ..., 'aux': ...}`` at
    their own strides (4 and 16: the losses resize them to the labels).

    Args:
        backbone: the dense backbone (segmentation form).
        num_classes: classes (ADE20K: 150).
        channels: the decode head's width (512).
        aux_channels: the auxiliary head's width (256); 0: no auxiliary head.
        aux_index: which backbone map the auxiliary head reads (2: the /16 map).
    """

    def __init__(self, backbone: OverLoCKBackbone, num_classes: int = 150, channels: int = 512,
                 aux_channels: int = 256, aux_index: int = 2):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.decode_head = UPerHead(backbone.out_channels, channels, num_classes)
        self.aux_index = aux_index
        self.auxiliary_head = FCNHead(backbone.out_channels[aux_index], aux_channels, num_classes) \
            if aux_channels else None

    def forward(self, x: torch.Tensor):
        maps = self.backbone(x)
        logits = self.decode_head(maps)
        if self.training and self.auxiliary_head is not None:
            return {'main': logits, 'aux': self.auxiliary_head(maps[self.aux_index])}
        return _resize(logits, x.shape[2:])

    @torch.no_grad()
    def reparameterize(self) -> 'UPerNet':
        """The backbone's deploy form (merged DilatedReparamBlocks), in place; returns self."""
        self.backbone.reparameterize()
        return self


# Constructor arguments of the released segmenters (the original's configs): drop path of the backbone.
SEGMENTERS: Dict[str, Dict[str, Any]] = {
    'upernet_overlock_t': dict(variant='overlock_t', drop_path_rate=0.2),
    'upernet_overlock_s': dict(variant='overlock_s', drop_path_rate=0.3),
    'upernet_overlock_b': dict(variant='overlock_b', drop_path_rate=0.5),
}


def model_table_args(table: Dict[str, Dict[str, Any]], name: str, reparam: bool, kwargs: Dict[str, Any],
                     head_keys: Sequence[str]) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """A dense model's entry of its table: the backbone's variant (``_reparam`` for the deploy form), the
    backbone's arguments (the table's, overridden by ``kwargs``) and the heads' (``head_keys`` taken out of
    ``kwargs``)."""
    if name not in table:
        raise ValueError(f'unknown model {name!r}; known: {", ".join(table)}')
    cfg = dict(table[name])
    variant = cfg.pop('variant') + ('_reparam' if reparam else '')
    heads = {k: kwargs.pop(k) for k in head_keys if k in kwargs}
    cfg.update(kwargs)
    return variant, cfg, heads


def create_segmenter(name: str, num_classes: int = 150, reparam: bool = False, **kwargs: Any) -> UPerNet:
    """A UPerNet of ``SEGMENTERS`` (``upernet_overlock_t`` ...), randomly initialised; ``kwargs`` override the
    backbone's constructor arguments (e.g. ``drop_path_rate``, or a small ``depth`` for experiments), and
    ``channels`` / ``aux_channels`` the heads' widths (512 / 256 as released).

    Args:
        name: ``upernet_overlock_{t,s,b}``.
        num_classes: classes of both heads.
        reparam: build the backbone in deploy form.
    """
    variant, cfg, heads = model_table_args(SEGMENTERS, name, reparam, kwargs, ('channels', 'aux_channels'))
    return UPerNet(create_backbone(variant, **cfg), num_classes=num_classes, **heads)


def release_url(name: str) -> str:
    """The released ADE20K file of a segmenter name."""
    return SEG_RELEASE_URL.format(_SEG_FILE_NAMES[variant_short(SEGMENTERS[name]['variant'])])


# --- weight files ----------------------------------------------------------------------------------------------

# What the top-level names of a weight file's keys say it holds.
_TASK_KEYS = (('segmentation', ('decode_head.',)),
              ('detection', ('rpn_head.', 'roi_head.', 'neck.', 'rpn.', 'roi_heads.')),
              ('classification', ('head.', 'blocks1.', 'patch_embed1.')))


def checkpoint_task(state_dict: Dict[str, torch.Tensor]) -> str:
    """'segmentation', 'detection', 'classification' or 'unknown', from a state_dict's keys."""
    for task, prefixes in _TASK_KEYS:
        if any(k.startswith(prefixes) for k in state_dict):
            return task
    return 'unknown'


def load_dense_checkpoint(model: nn.Module, path: str, task: str) -> Dict[str, Any]:
    """Load a dense model's weights strictly: a released mmcv file (``meta``, ``state_dict``, maybe
    ``optimizer``; read with ``weights_only=True``; converted by the model's ``adapt_state_dict`` where it has
    one, as the detector converts mmdet's layout) or one of ours. A training-form file loads into a deploy-form
    backbone (merged on the fly). Returns the file's ``meta`` (empty for ours).

    Args:
        model: a :class:`UPerNet` (``task='segmentation'``) or a :class:`~models.detection.MaskRCNN`
            (``'detection'``).
        path: the file.
        task: what the file must hold; a file of another task is refused in one line.
    """
    checkpoint = read_checkpoint_file(path)
    state_dict = extract_state_dict(checkpoint, use_ema=False, source=f'checkpoint {path}')
    found = checkpoint_task(state_dict)
    if found != task:
        hint = {'classification': ' (ImageNet weights start a fine-tuning run: --pretrained-path)'}.get(found, '')
        raise CheckpointError(f'checkpoint {path} holds a {found} model, not a {task} one{hint}')
    adapt = getattr(model, 'adapt_state_dict', None)  # e.g. the detector's conversion of mmdet's layout
    if adapt is not None:
        try:
            state_dict = adapt(state_dict)
        except CheckpointError as e:
            raise CheckpointError(f'checkpoint {path}: {e}') from None
    state_dict = checkpoint_filter_fn(state_dict, model)  # merges training-form weights for a deploy model
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k} {list(v.shape)} vs {list(own[k].shape)}' for k, v in state_dict.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f'{len(x)} {what} ({", ".join(x[:3])}{", ..." if len(x) > 3 else ""})'
                 for what, x in (('missing keys', missing), ('unexpected keys', unexpected),
                                 ('shape mismatches', shapes)) if x]
        raise CheckpointError(f'checkpoint {path} does not fit this {task} model: {"; ".join(parts)}; build the '
                              f'model of the file\'s variant and class count')
    model.load_state_dict(state_dict)
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    return meta if isinstance(meta, dict) else {}


def load_backbone_weights(backbone: OverLoCKBackbone, path: str) -> None:
    """Start a dense backbone from ImageNet classification weights (the release's ``overlock_*_in1k_224.pth``):
    the file's ``state_dict`` (not its EMA, as mmcv's loader chose for the released models), the trunk loaded
    strictly, the classifier heads left out, the LayerNorms of the outputs (and ``h_proj``) left at their
    initialisation."""
    checkpoint = read_checkpoint_file(path)
    state_dict = extract_state_dict(checkpoint, use_ema=False, source=f'checkpoint {path}')
    if checkpoint_task(state_dict) != 'classification':
        raise CheckpointError(f'checkpoint {path} holds a {checkpoint_task(state_dict)} model, not ImageNet '
                              f'classification weights')
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(('head.', 'aux_head.'))}
    state_dict = checkpoint_filter_fn(state_dict, backbone)
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(('extra_norm.', 'h_proj.'))]
    if missing or unexpected:
        raise CheckpointError(f'checkpoint {path} does not fit this backbone: {len(missing)} missing, '
                              f'{len(unexpected)} unexpected keys ({", ".join((missing + unexpected)[:3])}); '
                              f'use the weights of the same variant')


# ADE20K's 150 classes, in the order of the released models' outputs (mmseg's ADE20KDataset).
ADE20K_CLASSES: Tuple[str, ...] = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet',
    'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher',
    'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)
assert len(ADE20K_CLASSES) == 150
