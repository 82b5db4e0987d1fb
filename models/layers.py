"""Small layers shared by the OverLoCK blocks, and the DilatedReparamBlock.

Parameter names and registration order follow the original release so that its
checkpoints load with ``strict=True``.
"""
import importlib.util
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'LayerNorm2d', 'GRN', 'SEModule', 'LayerScale', 'ResDWConv', 'DilatedReparamBlock',
    'DILATED_REPARAM_BRANCHES', 'large_kernel_conv', 'has_igemm', 'stem', 'downsample',
    'fuse_conv_bn',
]

_logger = logging.getLogger(__name__)

# Branches (kernel sizes, dilations) added beside the K x K conv during training, per large kernel size K:
# the OverLoCK release's table. It extends UniRepLKNet's defaults (e.g. K = 17 there: kernels 5, 9, 3, 3, 3 at
# dilations 1, 2, 4, 5, 7) with one more undilated branch (7x7 for K = 9..17, 3x3 for K = 7; none for K = 5)
# and adds K = 19, which UniRepLKNet does not define. Checkpoints of the release need exactly these branches.
DILATED_REPARAM_BRANCHES: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    19: ((5, 7, 9, 9, 3, 3, 3), (1, 1, 1, 2, 4, 5, 7)),
    17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
    13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    11: ((5, 7, 5, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    9: ((5, 7, 5, 3, 3), (1, 1, 2, 3, 4)),
    7: ((5, 3, 3, 3), (1, 1, 2, 3)),
    5: ((3, 3), (1, 2)),
}

_IGEMM_CLS = None
_IGEMM_PROBED = False


def has_igemm() -> bool:
    """Whether the optional ``depthwise_conv2d_implicit_gemm`` extension is importable (probed once)."""
    global _IGEMM_CLS, _IGEMM_PROBED
    if not _IGEMM_PROBED:
        _IGEMM_PROBED = True
        if importlib.util.find_spec('depthwise_conv2d_implicit_gemm') is not None:
            try:
                from depthwise_conv2d_implicit_gemm import DepthWiseConv2dImplicitGEMM
                _IGEMM_CLS = DepthWiseConv2dImplicitGEMM
                _logger.info('Large-kernel depthwise convs use the iGEMM extension.')
            except (ImportError, OSError) as e:  # installed but broken (e.g. built for another torch)
                _logger.warning('depthwise_conv2d_implicit_gemm is installed but failed to import (%s); '
                                'using nn.Conv2d for large kernels.', e)
    return _IGEMM_CLS is not None


def large_kernel_conv(channels: int, kernel_size: int, bias: bool, use_gemm: bool = True) -> nn.Module:
    """Depthwise K x K conv, 'same' padding: the iGEMM kernel when installed and K > 5, else nn.Conv2d.

    Both have parameters ``weight`` [C, 1, K, K] and optional ``bias`` [C], so checkpoints are interchangeable.
    """
    if use_gemm and kernel_size > 5 and has_igemm():
        return _IGEMM_CLS(channels, kernel_size, bias=bias)
    return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt-V2), NCHW, zero-initialised so it starts as identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(-2, -1), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return (self.gamma * nx + 1) * x + self.beta


class SEModule(nn.Module):
    """Squeeze-and-excitation with a GELU bottleneck of max(16, dim // 8) channels."""

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        hidden = max(16, dim // reduction)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


class LayerScale(nn.Module):
    """Per-channel affine ``x * weight + bias``; stored as a depthwise 1x1 conv's parameters ([C,1,1,1], [C])."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class ResDWConv(nn.Conv2d):
    """Depthwise conv with a residual connection: ``x + dw(x)``. The module is the conv (original key names)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._conv_forward(x, self.weight, self.bias)  # not super().forward: TorchScript has no super()


def fuse_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv; returns (weight, bias)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    conv_bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias + (conv_bias - bn.running_mean) * scale


def _dilate_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """Dense equivalent of a dilated depthwise kernel: zeros between the taps."""
    if dilation == 1:
        return kernel
    c, _, k, _ = kernel.shape
    size = dilation * (k - 1) + 1
    dense = kernel.new_zeros(c, 1, size, size)
    dense[:, :, ::dilation, ::dilation] = kernel
    return dense


class DilatedReparamBlock(nn.Module):
    """Large depthwise conv plus parallel small dilated depthwise convs (UniRepLKNet), mergeable into one conv.

    Training form: ``origin_bn(lk_origin(x)) + sum_i dil_bn_i(dil_conv_i(x))``; :meth:`reparameterize` folds
    everything into a single K x K ``lk_origin`` with bias (the deploy form).
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False, use_gemm: bool = True):
        super().__init__()
        if kernel_size not in DILATED_REPARAM_BRANCHES:
            raise ValueError(
                f'DilatedReparamBlock: no branch table for kernel_size={kernel_size}; '
                f'supported sizes are {sorted(DILATED_REPARAM_BRANCHES)}')
        self.kernel_size = kernel_size
        self.use_gemm = use_gemm
        self.kernel_sizes, self.dilates = DILATED_REPARAM_BRANCHES[kernel_size]
        self.lk_origin = large_kernel_conv(channels, kernel_size, bias=deploy, use_gemm=use_gemm)
        self.deploy = deploy
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                self.add_module(f'dil_conv_k{k}_{r}', nn.Conv2d(
                    channels, channels, k, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=channels, bias=False))
                self.add_module(f'dil_bn_k{k}_{r}', nn.BatchNorm2d(channels))

    def _branches(self) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d, int]]:
        return [(getattr(self, f'dil_conv_k{k}_{r}'), getattr(self, f'dil_bn_k{k}_{r}'), r)
                for k, r in zip(self.kernel_sizes, self.dilates)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        # The children in registration order are (conv, BatchNorm) pairs: lk_origin, origin_bn, then dil_conv_*,
        # dil_bn_* per branch. Iterating children() rather than computed names keeps the release's keys and
        # lets torch.jit.script compile the block; the sum runs in the same order as the branch table.
        out: Optional[torch.Tensor] = None
        y = x
        for i, m in enumerate(self.children()):
            if i % 2 == 0:
                y = m(x)
            else:
                out = m(y) if out is None else out + m(y)
        assert out is not None
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the branches and BatchNorms into ``lk_origin`` (in place; a no-op in deploy form)."""
        if self.deploy:
            return
        weight, bias = fuse_conv_bn(self.lk_origin.weight, self.lk_origin.bias, self.origin_bn)
        big = self.kernel_size
        for conv, bn, r in self._branches():
            w, b = fuse_conv_bn(conv.weight, None, bn)
            w = _dilate_kernel(w, r)
            pad = big // 2 - w.shape[-1] // 2
            weight = weight + F.pad(w, [pad] * 4)
            bias = bias + b
        old = self.lk_origin.weight
        merged = large_kernel_conv(old.shape[0], big, bias=True, use_gemm=self.use_gemm)
        merged.to(device=old.device, dtype=old.dtype)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        self.lk_origin = merged
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f'dil_conv_k{k}_{r}')
            delattr(self, f'dil_bn_k{k}_{r}')
        self.deploy = True


def stem(in_chans: int, dim: int) -> nn.Sequential:
    """Four 3x3 conv-BN layers (two of stride 2): the /4 patch embedding of the Base-Net."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(half),
        nn.GELU(),
        nn.Conv2d(half, half, 3, padding=1, bias=False),
        nn.BatchNorm2d(half),
        nn.GELU(),
        nn.Conv2d(half, dim, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(dim),
        nn.GELU(),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False),
        nn.BatchNorm2d(dim),
    )


def downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    """3x3 stride-2 conv + BN between stages."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_dim),
    )
