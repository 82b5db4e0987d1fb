"""The Focus-Net block of OverLoCK: ContMix (context-mixing dynamic convolution) guided by the context prior.

Each pixel gets two dynamic depthwise kernels (a small s x s one and a large K x K one) whose weights are
computed from the pixel's affinity to 7 x 7 region centres of the *context* features, then aggregated over
the pixel's neighbourhood with ``na2d_av`` (natten <= 0.17 semantics; see ``models.ops``).
"""
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function
from torch import nn

from .layers import GRN, DilatedReparamBlock, LayerNorm2d, LayerScale, ResDWConv, SEModule
from .ops import contmix_softmax_av

__all__ = ['DynamicConvBlock']

_NUM_REGIONS = 7  # the context is pooled to 7 x 7 region centres


# The pieces below depend on tensor sizes or dispatch on the device in Python. They are leaves for torch.fx
# (timm's registry, which timm's fx feature extraction passes to its tracer, and torch.fx.wrap for plain
# symbolic_trace and torchvision's create_feature_extractor) and run as Python under torch.jit.script
# (the op's backend dispatch is not TorchScript).

@register_notrace_function
@torch.jit.ignore
def contmix_aggregate(x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor, rpb_large: torch.Tensor,
                      small: int, large: int) -> torch.Tensor:
    """``models.ops.contmix_softmax_av`` (both windows of a ContMix block) behind a traceable call."""
    return contmix_softmax_av(x, logits, rpb_small, rpb_large, small, large)


@register_notrace_function
def fit_window(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``x`` upsampled so that its short side is at least ``kernel_size`` (unchanged when it already is)."""
    H, W = x.shape[-2], x.shape[-1]
    if min(H, W) >= kernel_size:
        return x
    # max() guards float round-down (e.g. int(15 / 11 * 11) == 14)
    if H < W:
        size = (kernel_size, max(kernel_size, int(kernel_size / H * W)))
    else:
        size = (max(kernel_size, int(kernel_size / W * H)), kernel_size)
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


@register_notrace_function
def pool_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` average-pooled back to the spatial size of ``like`` (unchanged when it has it)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.adaptive_avg_pool2d(x, like.shape[-2:])


for _fn in ('contmix_aggregate', 'fit_window', 'pool_to'):
    torch.fx.wrap(_fn)


class DynamicConvBlock(nn.Module):
    """ContMix block of the Focus-Net.

    Args:
        dim: channels C of the Focus-Net features.
        ctx_dim: channels of the Overview-Net output; the running context and the prior have ctx_dim // 4.
        kernel_size: large dynamic kernel K (also the size of the DilatedReparamBlock in ``lepe``).
        smk_size: small dynamic kernel s.
        num_heads: heads h; the block uses 2h groups (h per kernel size).
        mlp_ratio: hidden ratio of the MLP (relative to ``dim``).
        ls_init_value: LayerScale init, or None for no LayerScale.
        res_scale: apply LayerScale to the identity path instead of the residual branch.
        drop_path: stochastic depth rate.
        is_first: first block of the Focus-Net: the context comes straight from the prior.
        is_last: last block: return the fused features whole instead of splitting off the context.
        use_gemm: allow the iGEMM large-kernel conv when installed.
        deploy: build the re-parameterised (deploy) form.
    """
    is_first: torch.jit.Final[bool]  # constants for TorchScript: the first block has no x_scale / h_scale
    is_last: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            ctx_dim: int,
            kernel_size: int = 7,
            smk_size: int = 5,
            num_heads: int = 2,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = None,
            res_scale: bool = False,
            drop_path: float = 0.,
            is_first: bool = False,
            is_last: bool = False,
            use_gemm: bool = True,
            deploy: bool = False,
    ):
        super().__init__()
        ctx_dim = ctx_dim // 4
        out_dim = dim + ctx_dim
        mlp_dim = int(dim * mlp_ratio)
        self.dim = dim
        self.ctx_dim = ctx_dim
        self.kernel_size = kernel_size
        self.smk_size = smk_size
        self.num_groups = num_heads * 2
        if dim % (2 * self.num_groups):
            raise ValueError(f'DynamicConvBlock: dim={dim} must be divisible by 4 * num_heads={4 * num_heads}')
        self.scale = (dim // self.num_groups) ** -0.5
        self.res_scale = res_scale
        self.is_first = is_first
        self.is_last = is_last

        # Parameters registered first: the original keeps rpb1/rpb2 at the top of each block's state_dict.
        self.rpb1 = nn.Parameter(torch.zeros(self.num_groups, 2 * smk_size - 1, 2 * smk_size - 1))
        self.rpb2 = nn.Parameter(torch.zeros(self.num_groups, 2 * kernel_size - 1, 2 * kernel_size - 1))
        if not is_first:
            self.x_scale = LayerScale(ctx_dim, init_value=1)
            self.h_scale = LayerScale(ctx_dim, init_value=1)
        self.dwconv1 = ResDWConv(out_dim, 3)
        self.norm1 = LayerNorm2d(out_dim)
        self.fusion = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim),
            nn.BatchNorm2d(out_dim),
            nn.GELU(),
            nn.Conv2d(out_dim, dim, 1),
            GRN(dim),
        )
        self.weight_query = nn.Sequential(
            nn.Conv2d(dim, dim // 2, 1, bias=False),
            nn.BatchNorm2d(dim // 2),
        )
        self.weight_key = nn.Sequential(
            nn.AdaptiveAvgPool2d(_NUM_REGIONS),
            nn.Conv2d(ctx_dim, dim // 2, 1, bias=False),
            nn.BatchNorm2d(dim // 2),
        )
        self.weight_proj = nn.Conv2d(_NUM_REGIONS ** 2, kernel_size ** 2 + smk_size ** 2, 1)
        self.dyconv_proj = nn.Sequential(
            nn.Conv2d(dim, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
        )
        self.lepe = nn.Sequential(
            DilatedReparamBlock(dim, kernel_size, deploy=deploy, use_gemm=use_gemm),
            nn.BatchNorm2d(dim),
        )
        self.se_layer = SEModule(dim)
        self.gate = nn.Sequential(
            nn.Conv2d(dim, dim, 1, bias=False),
            nn.BatchNorm2d(dim),
            nn.SiLU(),
        )
        self.proj = nn.Sequential(
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, out_dim, 1),
        )
        self.dwconv2 = ResDWConv(out_dim, 3)
        self.norm2 = LayerNorm2d(out_dim)
        self.mlp = nn.Sequential(
            nn.Conv2d(out_dim, mlp_dim, 1),
            nn.GELU(),
            ResDWConv(mlp_dim, 3),
            GRN(mlp_dim),
            nn.Conv2d(mlp_dim, out_dim, 1),
        )
        self.ls1 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # the block's output, features and context fused, before they are split: a named point for timm's
        # hook and fx feature extraction (no parameters)
        self.fused = nn.Identity()

    def _contmix(self, x_in: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """Dynamic-kernel aggregation of ``x`` [B, C, H, W]; kernels come from ``feat`` [B, C + c, H, W]."""
        K, s, G = self.kernel_size, self.smk_size, self.num_groups
        # A map smaller than the K x K window: ContMix runs on an upsampled map whose short side is K, then
        # pools back.
        x = fit_window(x_in, K)
        feat = fit_window(feat, K)
        B, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]

        query = self.weight_query(feat[:, :C]) * self.scale  # [B, C/2, H, W]
        key = self.weight_key(feat[:, C:])  # [B, C/2, 7, 7]: the region centres of the context
        query = query.reshape(B, G, -1, H * W)
        key = key.reshape(B, G, query.shape[2], -1)  # [B, G, c, 49]
        # logits = weight_proj(q^T k) over the 49 regions. Projecting the keys first
        # (q^T (k W^T) + b) is the same linear map and costs HW*c*L instead of HW*49*(c+L).
        proj_w = self.weight_proj.weight.flatten(1)  # [K^2 + s^2, 49]
        key = torch.matmul(key, proj_w.t())  # [B, G, c, L]
        logits = torch.matmul(query.transpose(-2, -1), key)  # [B, G, HW, L]
        # Under autocast the product is already rounded to bf16/fp16; adding the bias in that dtype keeps the
        # logits (the largest tensor the aggregation reads) at 2 bytes instead of promoting them to float32.
        # Without autocast the dtypes match and nothing changes.
        bias = self.weight_proj.bias
        assert bias is not None
        logits = logits + bias.to(logits.dtype)
        logits = logits.reshape(B, G, H, W, -1)

        # channel m * C/2 + g * c + j of x: half m=0 is mixed with the small kernel, m=1 with the large one
        out = contmix_aggregate(x, logits, self.rpb1, self.rpb2, s, K)  # [B, C, H, W]
        return pool_to(out, x_in)

    def forward(
            self, x: torch.Tensor, ctx: torch.Tensor, prior: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: Focus-Net features [B, C, H, W].
            ctx: running context [B, c, H, W] (the upsampled prior itself for the first block).
            prior: context prior from the Overview-Net [B, c, H, W].
        Returns:
            (x, ctx) for the next block, or (x with C + c channels, its context part) for the last block.
        """
        if not self.is_first:
            ctx = self.x_scale(ctx) + self.h_scale(prior)
        feat = self.dwconv1(torch.cat([x, ctx], dim=1))
        identity = feat
        feat = self.norm1(feat)
        x = self.fusion(feat)
        gate = self.gate(x)
        lepe = self.lepe(x)

        x = self._contmix(x, feat)
        x = self.se_layer(self.dyconv_proj(x) + lepe)
        x = self.proj(gate * x)

        if self.res_scale:
            x = self.ls1(identity) + self.drop_path(x)
            x = self.dwconv2(x)
            x = self.ls2(x) + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = identity + self.drop_path(self.ls1(x))
            x = self.dwconv2(x)
            x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

        x = self.fused(x)
        if self.is_last:
            return x, x[:, self.dim:]
        return x[:, :self.dim], x[:, self.dim:]
