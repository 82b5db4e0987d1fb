"""The fused inference form of OverLoCK: the deploy form with every BatchNorm, LayerScale and residual identity
folded into a neighbouring layer, and the activations channels-last (NHWC) from the stem to the head.

Why: on CPUs the 1x1 convolutions are most of the MACs, and they reach GEMM speed only as ``Linear`` layers on
channels-last activations (an NCHW 1x1 convolution pays for layout reorders around the GEMM); the many
per-channel affine layers (BatchNorm, LayerScale, the ``x + dw(x)`` identities) each cost a pass over memory.
Here they cost nothing:

* BatchNorms after a convolution fold into it, the BatchNorm before ``proj`` folds into its input side;
* ``x + dw3x3(x)`` is one depthwise convolution with 1 added to the centre tap;
* a LayerScale on a residual branch folds into its last layer; on the identity path (``res_scale``) its bias
  folds into the branch's last bias and the multiply goes into the residual add;
* the SE gates and the GRN scales are per sample and channel: where the map is large against the following
  1x1 layer's width they fold into that layer as per-sample weights (a batched GEMM of B small weight
  matrices) instead of scaling the activations;
* the context prior's interpolation, the depthwise convolutions and the pooling run on channels-last views,
  which oneDNN (and every exporter) handles without copies.

The result has its own parameter layout and is built from a loaded model, never saved: published weight files
keep loading into :class:`~models.overlock.OverLoCK` (training or ``_reparam`` form) as before, and
:func:`fuse` turns that into this form. Logits equal the model's to float32 rounding (``tests/test_fused.py``).
It runs eagerly, under ``torch.compile`` and through the ONNX exporter (``utils.export``).
"""
import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .contmix import _NUM_REGIONS, DynamicConvBlock, fit_window, pool_to
from .layers import GRN, LayerNorm2d, LayerScale, ResDWConv, SEModule, fuse_conv_bn
from .ops import contmix_softmax_av, na2d_softmax_av
from .overlock import OverLoCK, RepConvBlock, check_input

__all__ = ['FusedOverLoCK', 'fuse', 'fusable']

Tensor = torch.Tensor


# --- folding helpers (float64 arithmetic, stored in the model's dtype) ---------------------------------------

def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift``."""
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _conv_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one convolution, in float64."""
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if bn is None:
        return weight, bias
    return fuse_conv_bn(weight, bias, copy.deepcopy(bn).double())


def _with_identity(weight: Tensor) -> Tensor:
    """A depthwise kernel plus the identity: ``x + dw(x)`` as ``dw'(x)``."""
    weight = weight.clone()
    weight[:, 0, weight.shape[-2] // 2, weight.shape[-1] // 2] += 1
    return weight


def _layer_scale(ls: nn.Module, dim: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of a LayerScale, or of the identity when there is none."""
    if isinstance(ls, LayerScale):
        return ls.weight.double().flatten(), ls.bias.double()
    return like.new_ones(dim, dtype=torch.float64), like.new_zeros(dim, dtype=torch.float64)


def _grn(grn: GRN) -> Tuple[Tensor, Tensor]:
    return grn.gamma.double().flatten(), grn.beta.double().flatten()


def _linear_of(conv: nn.Conv2d) -> Tuple[Tensor, Tensor]:
    """A 1x1 convolution's (weight [out, in], bias [out]) in float64."""
    weight, bias = _conv_bn(conv, None)
    return weight.flatten(1), bias


class _Folded(nn.Module):
    """Holds folded tensors as frozen parameters in the source model's dtype (counted, moved with ``.to()``,
    initialisers of an exported graph; never trained)."""

    def _put(self, name: str, value: Optional[Tensor], like: Tensor) -> None:
        param = None if value is None else nn.Parameter(value.to(like.dtype).contiguous(), requires_grad=False)
        self.register_parameter(name, param)


# --- the NHWC building blocks ----------------------------------------------------------------------------------

def _dw(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise 'same' convolution of an NHWC tensor (through its channels-last NCHW view)."""
    k = weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """Dense 3x3 convolution of an NHWC tensor."""
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=stride, padding=weight.shape[-1] // 2)
    return y.permute(0, 2, 3, 1)


def _linear(x: Tensor, weight_t: Tensor, start: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """``start + (x * scale) @ weight_t`` for NHWC ``x``: one GEMM that accumulates onto ``start``, the bias
    [Cout] or an NHWC tensor (a residual with the bias in it). A per-sample ``scale`` [B, Cin] (SE gate, GRN) is
    folded into B weight matrices (a batched GEMM) where the map is large against the output width, so that
    no pass over ``x`` is made; elsewhere it scales ``x``, which is then the cheaper side."""
    b, h, w, c = x.shape
    cout = weight_t.shape[1]
    if scale is not None and start.dim() == 4 and h * w >= 2 * cout:
        weights = scale.unsqueeze(-1) * weight_t  # [B, Cin, Cout]
        return torch.baddbmm(start.reshape(b, h * w, cout), x.reshape(b, h * w, c), weights).view(b, h, w, cout)
    if scale is not None:
        x = x * scale[:, None, None, :]
    start = start.reshape(-1, cout) if start.dim() == 4 else start
    return torch.addmm(start, x.reshape(-1, c), weight_t).view(b, h, w, cout)


def _gelu_(x: Tensor) -> Tensor:
    """GELU in place, for a fresh output nothing else reads: on CPUs a new activation-sized tensor costs more
    (page faults on newly mapped memory) than the GELU itself."""
    return torch.ops.aten.gelu_(x)


def _grn_scale(x: Tensor, gamma: Tensor) -> Tensor:
    """GRN's per-sample, per-channel factor ``gamma * N(x) + 1`` [B, C] of an NHWC tensor."""
    if x.dtype in (torch.float16, torch.bfloat16):  # squares summed in float32: a 56x56 map overflows float16
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), dtype=torch.float32).to(x.dtype)
    else:  # a plain reduction: vector_norm over the non-inner axes is slower
        gx = x.square().sum(dim=(1, 2)).sqrt()
    return gamma * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + 1


class _SE(_Folded):
    """Squeeze-and-excitation as its per-sample, per-channel gate [B, C]."""

    def __init__(self, se: SEModule):
        super().__init__()
        fc1, fc2 = se.proj[1], se.proj[3]
        like = fc1.weight
        for name, conv in (('w1', fc1), ('w2', fc2)):
            w, b = _linear_of(conv)
            self._put(name, w, like)
            self._put(name.replace('w', 'b'), b, like)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(1, 2))
        return torch.sigmoid(F.linear(F.gelu(F.linear(s, self.w1, self.b1)), self.w2, self.b2))


class _MLP(_Folded):
    """``fc1 -> GELU -> x + dw3x3 -> GRN -> fc2`` with the input's per-sample scale (SE), the GRN and the
    LayerScale folded; adds the residual (``x * ls_weight`` or ``x``) inside the last GEMM."""

    def __init__(self, fc1: nn.Conv2d, dw: ResDWConv, grn: GRN, fc2: nn.Conv2d, ls_weight: Tensor, ls_bias: Tensor,
                 res_scale: bool):
        super().__init__()
        like = fc1.weight
        w1, b1 = _linear_of(fc1)
        self._put('w1t', w1.t(), like)
        self._put('b1', b1, like)
        self._put('dw_weight', _with_identity(dw.weight.double()), like)
        self._put('dw_bias', dw.bias.double(), like)
        gamma, beta = _grn(grn)
        w2, b2 = _linear_of(fc2)
        b2 = b2 + w2 @ beta  # GRN's beta goes through fc2 as a constant
        if res_scale:  # out = x * ls_w + ls_b + fc2(...): ls_b joins the bias, ls_w scales the residual
            self._put('res_weight', ls_weight, like)
            b2 = b2 + ls_bias
        else:  # out = x + ls(fc2(...)): the LayerScale folds into fc2
            w2, b2 = w2 * ls_weight[:, None], b2 * ls_weight + ls_bias
            self._put('res_weight', None, like)
        self._put('gamma', gamma, like)
        self._put('w2t', w2.t(), like)
        self._put('b2', b2, like)

    def forward(self, x: Tensor, residual: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        y = _linear(x, self.w1t, self.b1, scale)
        y = _dw(_gelu_(y), self.dw_weight, self.dw_bias)
        if self.res_weight is None:
            start = residual + self.b2
        else:
            start = torch.addcmul(self.b2, residual, self.res_weight)
        return _linear(y, self.w2t, start, _grn_scale(y, self.gamma))


class _RepConvBlock(_Folded):
    """:class:`~models.overlock.RepConvBlock`, fused."""

    def __init__(self, block: RepConvBlock):
        super().__init__()
        norm, lk, bn, se, fc1, _, dw, grn, fc2 = list(block.proj)[:9]
        assert isinstance(norm, LayerNorm2d) and lk.deploy
        like = fc1.weight
        self._put('dw_weight', _with_identity(block.dwconv.weight.double()), like)
        self._put('dw_bias', block.dwconv.bias.double(), like)
        self._put('ln_weight', norm.weight.double(), like)
        self._put('ln_bias', norm.bias.double(), like)
        self.eps = norm.eps
        lk_w, lk_b = _conv_bn(lk.lk_origin, bn)
        self._put('lk_weight', lk_w, like)
        self._put('lk_bias', lk_b, like)
        self.se = _SE(se)
        ls_w, ls_b = _layer_scale(block.ls, block.dwconv.out_channels, like)
        self.mlp = _MLP(fc1, dw, grn, fc2, ls_w, ls_b, block.res_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = _dw(x, self.dw_weight, self.dw_bias)
        y = F.layer_norm(x, x.shape[-1:], self.ln_weight, self.ln_bias, self.eps)
        y = _dw(y, self.lk_weight, self.lk_bias)
        return self.mlp(y, x, scale=self.se(y))


class _ContMixBlock(_Folded):
    """:class:`~models.contmix.DynamicConvBlock`, fused; ContMix itself is the model's op (``models.ops``),
    on the CPU reading its values from the channels-last features in place."""

    def __init__(self, block: DynamicConvBlock):
        super().__init__()
        like = block.rpb1
        self.dim, self.ctx_dim = block.dim, block.ctx_dim
        self.kernel_size, self.smk_size, self.num_groups = block.kernel_size, block.smk_size, block.num_groups
        self.is_first, self.is_last = block.is_first, block.is_last
        self.eps = block.norm1.eps
        self._put('rpb1', block.rpb1.detach(), like)
        self._put('rpb2', block.rpb2.detach(), like)
        if not block.is_first:  # ctx * xs_w + prior * hs_w + (xs_b + hs_b)
            self._put('xs_weight', block.x_scale.weight.double().flatten(), like)
            self._put('hs_weight', block.h_scale.weight.double().flatten(), like)
            self._put('ctx_bias', block.x_scale.bias.double() + block.h_scale.bias.double(), like)
        self._put('dw1_weight', _with_identity(block.dwconv1.weight.double()), like)
        self._put('dw1_bias', block.dwconv1.bias.double(), like)
        self._put('ln1_weight', block.norm1.weight.double(), like)
        self._put('ln1_bias', block.norm1.bias.double(), like)
        dw, bn, _, fc, grn = block.fusion
        w, b = _conv_bn(dw, bn)
        self._put('fusion_dw_weight', w, like)
        self._put('fusion_dw_bias', b, like)
        w, b = _linear_of(fc)
        self._put('fusion_weight', w, like)
        self._put('fusion_bias', b, like)
        gamma, beta = _grn(grn)
        self._put('grn_gamma', gamma, like)
        self._put('grn_beta', beta, like)
        # the query carries the attention scale; the key's projection onto the K^2 + s^2 logits is applied to the
        # 49 keys per sample (as in the block), the logits' bias after the product
        w, b = _conv_bn(block.weight_query[0], block.weight_query[1])
        self._put('q_weight', w.flatten(1) * block.scale, like)
        self._put('q_bias', b * block.scale, like)
        w, b = _conv_bn(block.weight_key[1], block.weight_key[2])
        self._put('k_weight', w.flatten(1), like)
        self._put('k_bias', b, like)
        self._put('logit_weight', block.weight_proj.weight.double().flatten(1), like)
        self._put('logit_bias', block.weight_proj.bias.double(), like)
        # lepe (large-kernel conv + BN) carries dyconv_proj's bias, so that dyconv_proj accumulates onto it
        w_d, b_d = _conv_bn(block.dyconv_proj[0], block.dyconv_proj[1])
        self._put('dyconv_weight', w_d.flatten(1), like)
        lk = block.lepe[0]
        assert lk.deploy, 'fuse a reparameterised block'
        w, b = _conv_bn(lk.lk_origin, block.lepe[1])
        self._put('lepe_weight', w, like)
        self._put('lepe_bias', b + b_d, like)
        self.se = _SE(block.se_layer)
        w, b = _conv_bn(block.gate[0], block.gate[1])
        self._put('gate_weight', w.flatten(1), like)
        self._put('gate_bias', b, like)
        # proj = Linear(BN(.)): the BatchNorm folds into the Linear's input side
        scale, shift = _bn_affine(block.proj[0])
        w, b = _linear_of(block.proj[1])
        b = b + w @ shift
        w = w * scale[None, :]
        out_dim = block.dim + block.ctx_dim
        ls_w, ls_b = _layer_scale(block.ls1, out_dim, like)
        if block.res_scale:
            self._put('res1_weight', ls_w, like)
            b = b + ls_b
        else:
            w, b = w * ls_w[:, None], b * ls_w + ls_b
            self._put('res1_weight', None, like)
        self._put('proj_t', w.t(), like)
        self._put('proj_b', b, like)
        self._put('dw2_weight', _with_identity(block.dwconv2.weight.double()), like)
        self._put('dw2_bias', block.dwconv2.bias.double(), like)
        self._put('ln2_weight', block.norm2.weight.double(), like)
        self._put('ln2_bias', block.norm2.bias.double(), like)
        fc1, _, dw_mlp, grn2, fc2 = block.mlp
        ls_w, ls_b = _layer_scale(block.ls2, out_dim, like)
        self.mlp = _MLP(fc1, dw_mlp, grn2, fc2, ls_w, ls_b, block.res_scale)

    def _contmix(self, x: Tensor, feat: Tensor) -> Tensor:
        """Dynamic-kernel aggregation of ``x`` [B, H, W, C]; kernels from ``feat`` [B, H, W, C + c]."""
        K, s, G, C = self.kernel_size, self.smk_size, self.num_groups, self.dim
        x_in = x  # a map smaller than the window: as the block, upsample (then pool back)
        x = fit_window(x.permute(0, 3, 1, 2), K).permute(0, 2, 3, 1)
        feat = fit_window(feat.permute(0, 3, 1, 2), K).permute(0, 2, 3, 1)
        B, H, W = x.shape[0], x.shape[1], x.shape[2]
        c = C // (2 * G)  # channels per group and window
        query = F.linear(feat[..., :C], self.q_weight, self.q_bias)  # [B, H, W, C/2]
        key = F.adaptive_avg_pool2d(feat[..., C:].permute(0, 3, 1, 2), _NUM_REGIONS).flatten(2)
        key = torch.matmul(self.k_weight, key) + self.k_bias[:, None]  # [B, C/2, 49]
        key = torch.matmul(key.view(B, G, c, -1), self.logit_weight.t())  # [B, G, c, K^2 + s^2]
        query = query.reshape(B, H * W, G, c).transpose(1, 2)  # [B, G, HW, c]
        logits = (torch.matmul(query, key) + self.logit_bias).view(B, G, H, W, -1)
        if x.is_cuda:  # the model's call: one fused Triton kernel for both windows where available
            out = contmix_softmax_av(x.permute(0, 3, 1, 2), logits, self.rpb1, self.rpb2, s, K).permute(0, 2, 3, 1)
        else:  # per window, the values read from the channels-last features in place
            value = x.reshape(B, H, W, 2, G, c).permute(3, 0, 4, 1, 2, 5)  # [2, B, G, H, W, c], views
            small = na2d_softmax_av(logits[..., :s * s], self.rpb1, value[0], s)
            large = na2d_softmax_av(logits[..., s * s:], self.rpb2, value[1], K)
            out = torch.stack([small, large], dim=1)  # [B, 2, G, H, W, c]
            out = out.permute(0, 3, 4, 1, 2, 5).reshape(B, H, W, C)
        return pool_to(out.permute(0, 3, 1, 2), x_in.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: Tensor, ctx: Tensor, prior: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.is_first:
            ctx = torch.addcmul(torch.addcmul(self.ctx_bias, ctx, self.xs_weight), prior, self.hs_weight)
        identity = _dw(torch.cat([x, ctx], dim=-1), self.dw1_weight, self.dw1_bias)
        feat = F.layer_norm(identity, identity.shape[-1:], self.ln1_weight, self.ln1_bias, self.eps)
        x = _gelu_(_dw(feat, self.fusion_dw_weight, self.fusion_dw_bias))
        x = F.linear(x, self.fusion_weight, self.fusion_bias)
        x = torch.addcmul(self.grn_beta, x, _grn_scale(x, self.grn_gamma)[:, None, None, :])
        gate = F.silu(F.linear(x, self.gate_weight, self.gate_bias), inplace=True)
        lepe = _dw(x, self.lepe_weight, self.lepe_bias)
        mixed = self._contmix(x, feat)
        y = torch.addmm(lepe.reshape(-1, self.dim), mixed.reshape(-1, self.dim), self.dyconv_weight.t())
        y = y.view(lepe.shape)
        scale = self.se(y)
        if self.res1_weight is None:
            start = identity + self.proj_b
        else:
            start = torch.addcmul(self.proj_b, identity, self.res1_weight)
        x = _linear(gate.mul_(y), self.proj_t, start, scale)
        x = _dw(x, self.dw2_weight, self.dw2_bias)
        y = F.layer_norm(x, x.shape[-1:], self.ln2_weight, self.ln2_bias, self.eps)
        x = self.mlp(y, x)
        if self.is_last:
            return x, x[..., self.dim:]
        return x[..., :self.dim], x[..., self.dim:]


class _ConvBN(_Folded):
    """A dense convolution with its BatchNorm folded, on NHWC (stem, downsampling)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        w, b = _conv_bn(conv, bn)
        self._put('weight', w, conv.weight)
        self._put('bias', b, conv.weight)
        self.stride = conv.stride[0]

    def forward(self, x: Tensor) -> Tensor:
        return _conv(x, self.weight, self.bias, self.stride)


class FusedOverLoCK(_Folded):
    """An OverLoCK classifier in the fused inference form (built by :func:`fuse`; eval only).

    Takes NCHW images like the model and returns the same logits (or pre-logits, or the spatial map for
    ``global_pool=''``).
    """

    def __init__(self, model: OverLoCK):
        super().__init__()
        like = model.patch_embed1[0].weight
        self.in_chans = model.in_chans
        self.global_pool = model.global_pool
        self.num_classes = model.num_classes
        self.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {})  # preprocessing, for exporters
        s = model.patch_embed1
        self.stem = nn.ModuleList([_ConvBN(s[0], s[1]), _ConvBN(s[3], s[4]), _ConvBN(s[6], s[7]), _ConvBN(s[9], s[10])])
        self.downsample = nn.ModuleList([_ConvBN(*getattr(model, f'patch_embed{i}')) for i in (2, 3, 4)])
        self.stages = nn.ModuleList([
            nn.ModuleList([_RepConvBlock(b) for b in getattr(model, f'blocks{i}')]) for i in (1, 2, 3, 4)])
        w, b = _linear_of(model.high_level_proj)
        self._put('prior_weight', w, like)
        self._put('prior_bias', b, like)
        self.focus3 = nn.ModuleList([_ContMixBlock(b) for b in model.sub_blocks3])
        self.ctx_down = nn.ModuleList([_ConvBN(*model.patch_embedx.x_proj), _ConvBN(*model.patch_embedx.h_proj)])
        self.focus4 = nn.ModuleList([_ContMixBlock(b) for b in model.sub_blocks4])
        w, b = _conv_bn(model.head[0], model.head[1])
        self._put('head_weight', w.flatten(1), like)
        self._put('head_bias', b, like)
        classifier = model.head[4]
        if isinstance(classifier, nn.Conv2d):
            w, b = _linear_of(classifier)
            self._put('fc_weight', w, like)
            self._put('fc_bias', b, like)
        else:
            self._put('fc_weight', None, like)
            self._put('fc_bias', None, like)
        self.eval()

    def _stage(self, x: Tensor, i: int) -> Tensor:
        x = self.downsample[i - 1](x) if i else x
        for blk in self.stages[i]:
            x = blk(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """The Focus-Net output [B, C4 + C4/4, H/32, W/32] as the model's (an NCHW view of channels-last memory)."""
        x = check_input(x, self.in_chans).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        for i, conv in enumerate(self.stem):
            x = conv(x) if i == 3 else _gelu_(conv(x))
        x = self._stage(self._stage(self._stage(x, 0), 1), 2)  # Base-Net
        ctx = self._stage(x, 3)  # Overview-Net
        prior = F.linear(ctx, self.prior_weight, self.prior_bias)
        prior_up = F.interpolate(prior.permute(0, 3, 1, 2), size=x.shape[1:3], mode='bilinear',
                                 align_corners=False).permute(0, 2, 3, 1)
        h = prior_up
        for blk in self.focus3:
            x, h = blk(x, h, prior_up)
        x, h = self.ctx_down[0](x.contiguous()), self.ctx_down[1](h.contiguous())  # the block's outputs are slices
        for blk in self.focus4:
            x, h = blk(x, h, prior)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from :meth:`forward_features`' output, as the model's ``forward_head`` (``pre_logits``: the
        pooled projection before the classifier)."""
        x = F.silu(F.linear(x.permute(0, 2, 3, 1), self.head_weight, self.head_bias), inplace=True)
        if self.global_pool:
            x = x.mean(dim=(1, 2))
        if self.fc_weight is not None and not pre_logits:
            x = F.linear(x, self.fc_weight, self.fc_bias)
        return x if self.global_pool else x.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def fusable(model: nn.Module) -> bool:
    """Whether :func:`fuse` takes ``model``: an OverLoCK classifier with its head (not a dense backbone or a
    model pruned to its features)."""
    head = getattr(model, 'head', None)
    return isinstance(model, OverLoCK) and isinstance(head, nn.Sequential) and isinstance(head[0], nn.Conv2d)


@torch.no_grad()
def fuse(model: OverLoCK) -> FusedOverLoCK:
    """The fused inference form of ``model`` (training or deploy form; the model itself is left unchanged)."""
    if not isinstance(model, OverLoCK):
        raise TypeError(f'fuse expects an OverLoCK model, got {type(model).__name__}')
    if not fusable(model):
        raise TypeError(f'fuse needs an OverLoCK classifier with its head; {type(model).__name__} has none (a '
                        f'dense backbone or a model pruned to its features)')
    source = copy.deepcopy(model).eval().reparameterize()
    return FusedOverLoCK(source)
