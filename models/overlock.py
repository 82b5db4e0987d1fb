"""OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels.

Paper: https://arxiv.org/abs/2502.20087 (Lou & Yu, CVPR 2025). Original code: https://github.com/LMMMEng/OverLoCK

Three sub-networks share one trunk:
  * Base-Net (stem, stages 1-3 of RepConvBlocks) encodes low/mid-level features at /16;
  * Overview-Net (stage 4 of RepConvBlocks) produces a coarse /32 context, projected into the *context prior*;
  * Focus-Net (ContMix blocks at /16 then /32) looks closely, its dynamic kernels guided by that prior.
An auxiliary head on the Overview-Net output supervises the prior during training. It is opt-in, as timm's
auxiliary classifiers are (inception_v3's ``aux_logits``): built with ``use_ds=True`` (what ``train.py`` does
for the release's recipe), the model returns ``{'main': logits, 'aux': aux_logits}`` in training mode;
built without it (the default), ``aux_head`` is None and the model returns the logits in every mode, like any
timm classifier. Weight files with the auxiliary head load into both.

Parameter names follow the original release so its checkpoints load with ``strict=True``.
"""
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, reparameterize_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .weights import CLASSIFIER, FIRST_CONV, CheckpointError, checkpoint_filter_fn, load_checkpoint
from .contmix import DynamicConvBlock
from .layers import (
    GRN, DilatedReparamBlock, LayerNorm2d, LayerScale, ResDWConv, SEModule, downsample, stem,
)

__all__ = [
    'OverLoCK', 'RepConvBlock', 'CTXDownsample', 'reparameterize', 'create_overlock', 'list_variants',
    'variant_args', 'MIN_INPUT_SIZE',
]

_logger = logging.getLogger(__name__)

MIN_INPUT_SIZE = 32  # five stride-2 reductions leave a 1x1 map


@register_notrace_function  # a leaf for timm's fx tracer; torch.fx.wrap below for plain symbolic_trace
def check_input(x: torch.Tensor, in_chans: int, min_size: int = MIN_INPUT_SIZE) -> torch.Tensor:
    """``x`` itself, after checking that it is [B, in_chans, H, W] with H, W >= ``min_size``."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f'OverLoCK expects input [B, {in_chans}, H, W], got {x.shape} '
                         f'(build the model with in_chans=... for other channel counts)')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f'OverLoCK needs inputs of at least {min_size}x{min_size} pixels, got {x.shape}')
    return x


torch.fx.wrap('check_input')


class RepConvBlock(nn.Module):
    """Base-Net / Overview-Net block: residual dw 3x3, then a large-kernel DilatedReparamBlock, SE and a GRN MLP."""

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            mlp_ratio: float = 4.,
            ls_init_value: Optional[float] = None,
            res_scale: bool = False,
            drop_path: float = 0.,
            use_gemm: bool = True,
            deploy: bool = False,
    ):
        super().__init__()
        self.res_scale = res_scale
        mlp_dim = int(dim * mlp_ratio)
        self.dwconv = ResDWConv(dim, 3)
        self.proj = nn.Sequential(
            LayerNorm2d(dim),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy, use_gemm=use_gemm),
            nn.BatchNorm2d(dim),
            SEModule(dim),
            nn.Conv2d(dim, mlp_dim, 1),
            nn.GELU(),
            ResDWConv(mlp_dim, 3),
            GRN(mlp_dim),
            nn.Conv2d(mlp_dim, dim, 1),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        if self.res_scale:
            return self.ls(x) + self.proj(x)  # DropPath is the last layer of proj
        y = x
        last = len(self.proj) - 1
        for i, layer in enumerate(self.proj):
            if i == last:
                y = self.ls(y)  # LayerScale on the residual branch, before DropPath
            y = layer(y)
        return x + y


class CTXDownsample(nn.Module):
    """Downsamples the Focus-Net features and the running context together between its two stages."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        ctx_dim = out_dim // 4
        self.x_proj = nn.Sequential(
            nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_dim),
        )
        self.h_proj = nn.Sequential(
            nn.Conv2d(ctx_dim, ctx_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(ctx_dim),
        )

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


def _classifier(in_dim: int, num_classes: int) -> nn.Module:
    return nn.Conv2d(in_dim, num_classes, 1) if num_classes > 0 else nn.Identity()


def _check_pool(global_pool: str) -> None:
    if global_pool not in ('avg', ''):
        raise ValueError(f"OverLoCK pools by average ('avg') or not at all (''), got global_pool={global_pool!r}")


def _pool(global_pool: str) -> nn.Module:
    return nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()


class OverLoCK(nn.Module):
    """OverLoCK network.

    Args:
        depth: RepConvBlocks in stages 1-4 (stages 1-3 form the Base-Net, stage 4 the Overview-Net).
        sub_depth: ContMix blocks of the Focus-Net at /16 and /32.
        in_chans: input channels.
        embed_dim: channels of stages 1-4.
        kernel_size: large kernel per stage (stages 3/4 also set the ContMix kernel of the Focus-Net).
        mlp_ratio: MLP ratio of the RepConvBlocks per stage.
        sub_mlp_ratio: MLP ratio of the ContMix blocks per Focus-Net stage.
        sub_num_heads: heads of the ContMix blocks per Focus-Net stage.
        ls_init_value: LayerScale init per stage (None: no LayerScale).
        res_scale: LayerScale on the identity path (as released) rather than on the residual branch.
        smk_size: small dynamic kernel size of ContMix.
        deploy: build the re-parameterised form (merged DilatedReparamBlocks).
        use_gemm: allow the iGEMM large-kernel conv when installed.
        use_ds: build the auxiliary (deep supervision) head on the Overview-Net output; the model then returns
            ``{'main': logits, 'aux': aux_logits}`` in training mode (the release's recipe trains with it).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        projection: channels of the head's 1x1 projection (``head_hidden_size``, the pre-logits width).
        num_classes: classes (0: no classifier, ``forward`` returns the pre-logits).
        global_pool: 'avg', or '' for no pooling (``forward_head`` then keeps the [B, C, H, W] map).
        use_checkpoint: per stage, how many leading blocks run under activation checkpointing.
    """

    def __init__(
            self,
            depth: Sequence[int] = (2, 2, 2, 2),
            sub_depth: Sequence[int] = (4, 2),
            in_chans: int = 3,
            embed_dim: Sequence[int] = (96, 192, 384, 768),
            kernel_size: Sequence[int] = (7, 7, 7, 7),
            mlp_ratio: Union[float, Sequence[float]] = (4, 4, 4, 4),
            sub_mlp_ratio: Union[float, Sequence[float]] = (4, 4),
            sub_num_heads: Sequence[int] = (4, 8),
            ls_init_value: Sequence[Optional[float]] = (None, None, 1, 1),
            res_scale: bool = True,
            smk_size: int = 5,
            deploy: bool = False,
            use_gemm: bool = True,
            use_ds: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            projection: int = 1024,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            use_checkpoint: Sequence[int] = (0, 0, 0, 0),
    ):
        super().__init__()
        depth, sub_depth = list(depth), list(sub_depth)
        embed_dim, kernel_size = list(embed_dim), list(kernel_size)
        mlp_ratio = [mlp_ratio] * 4 if isinstance(mlp_ratio, (int, float)) else list(mlp_ratio)
        sub_mlp_ratio = [sub_mlp_ratio] * 2 if isinstance(sub_mlp_ratio, (int, float)) else list(sub_mlp_ratio)
        for name, value, n in (('depth', depth, 4), ('sub_depth', sub_depth, 2), ('embed_dim', embed_dim, 4),
                               ('kernel_size', kernel_size, 4), ('mlp_ratio', mlp_ratio, 4),
                               ('sub_mlp_ratio', sub_mlp_ratio, 2), ('sub_num_heads', sub_num_heads, 2),
                               ('ls_init_value', ls_init_value, 4), ('use_checkpoint', use_checkpoint, 4)):
            if len(value) != n:
                raise ValueError(f'OverLoCK: {name} needs {n} values, got {list(value)}')
        if sub_depth[1] < 1:
            raise ValueError('OverLoCK: sub_depth[1] must be >= 1 (the last Focus-Net block feeds the head)')
        _check_pool(global_pool)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.embed_dim = embed_dim
        ctx_dim = embed_dim[3] // 4
        fusion_dim = embed_dim[3] + ctx_dim
        self.global_pool = global_pool
        self.num_features = fusion_dim  # channels of forward_features' output (timm's definition)
        self.head_hidden_size = projection  # width of forward_head(pre_logits=True)
        self.grad_checkpointing = [int(n) for n in use_checkpoint]

        self.patch_embed1 = stem(in_chans, embed_dim[0])
        self.patch_embed2 = downsample(embed_dim[0], embed_dim[1])
        self.patch_embed3 = downsample(embed_dim[1], embed_dim[2])
        self.patch_embed4 = downsample(embed_dim[2], embed_dim[3])
        self.high_level_proj = nn.Conv2d(embed_dim[3], ctx_dim, 1)  # Overview-Net output -> context prior
        self.patch_embedx = CTXDownsample(embed_dim[2], embed_dim[3])

        dpr = torch.linspace(0, drop_path_rate, sum(depth) + sum(sub_depth), device='cpu').tolist()
        offsets = [sum(depth[:i]) for i in range(4)] + [sum(depth), sum(depth) + sub_depth[0]]
        for i in range(4):
            self.add_module(f'blocks{i + 1}', nn.ModuleList([
                RepConvBlock(
                    dim=embed_dim[i],
                    kernel_size=kernel_size[i],
                    mlp_ratio=mlp_ratio[i],
                    ls_init_value=ls_init_value[i],
                    res_scale=res_scale,
                    drop_path=dpr[offsets[i] + j],
                    use_gemm=use_gemm,
                    deploy=deploy,
                ) for j in range(depth[i])]))
        for i, stage in enumerate((2, 3)):
            self.add_module(f'sub_blocks{stage + 1}', nn.ModuleList([
                DynamicConvBlock(
                    dim=embed_dim[stage],
                    ctx_dim=embed_dim[3],
                    kernel_size=kernel_size[stage],
                    smk_size=smk_size,
                    num_heads=sub_num_heads[i],
                    mlp_ratio=sub_mlp_ratio[i],
                    ls_init_value=ls_init_value[stage],
                    res_scale=res_scale,
                    drop_path=dpr[offsets[4 + i] + j],
                    is_first=(i == 0 and j == 0),
                    is_last=(i == 1 and j == sub_depth[1] - 1),
                    use_gemm=use_gemm,
                    deploy=deploy,
                ) for j in range(sub_depth[i])]))

        self.aux_head: Optional[nn.Sequential] = nn.Sequential(
            nn.BatchNorm2d(embed_dim[3]),
            nn.AdaptiveAvgPool2d(1),
            _classifier(embed_dim[3], num_classes),
        ) if use_ds else None
        self.head = nn.Sequential(
            nn.Conv2d(fusion_dim, projection, 1, bias=False),
            nn.BatchNorm2d(projection),
            nn.SiLU(),
            _pool(global_pool),
            _classifier(projection, num_classes),
        )
        self.head_drop = nn.Dropout(drop_rate)
        # Dense-prediction features (timm's features_only / forward_intermediates), as the original's detection
        # and segmentation backbones take them: Base-Net stages 1 and 2, then the Focus-Net at /16 (features
        # and context) and its output at /32.
        # ``module`` names the layer whose output is the feature, for timm's hook and fx feature extractors.
        self.feature_info = [
            dict(num_chs=embed_dim[0], reduction=4, module=f'blocks1.{depth[0] - 1}'),
            dict(num_chs=embed_dim[1], reduction=8, module=f'blocks2.{depth[1] - 1}'),
            dict(num_chs=embed_dim[2] + ctx_dim, reduction=16, module=f'sub_blocks3.{sub_depth[0] - 1}.fused'),
            dict(num_chs=fusion_dim, reduction=32, module=f'sub_blocks4.{sub_depth[1] - 1}.fused'),
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- timm model API -------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed1',
            blocks=[
                (r'^blocks(\d+)\.(\d+)' if not coarse else r'^blocks(\d+)', None),
                (r'^patch_embed(\d+)', (0,)),
                (r'^(?:high_level_proj|patch_embedx)', (4,)),
                (r'^sub_blocks(\d+)\.(\d+)' if not coarse else r'^sub_blocks(\d+)', (5,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (``enable``) or none."""
        self.set_grad_checkpointing_stages([10 ** 6 if enable else 0] * 4)

    @torch.jit.ignore
    def set_grad_checkpointing_stages(self, num_blocks: Sequence[int]) -> None:
        """Checkpoint the first ``num_blocks[i]`` blocks of stage i+1 (the original's ``--ckpt-stg``).

        Stage 3 covers blocks3 and sub_blocks3, stage 4 blocks4 and sub_blocks4, as in the original.
        """
        if len(num_blocks) != 4:
            raise ValueError(f'set_grad_checkpointing_stages needs 4 values, got {list(num_blocks)}')
        self.grad_checkpointing = [int(n) for n in num_blocks]

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head[4]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace both classifiers (main and auxiliary, when built) with freshly initialised ones.

        ``global_pool`` ('avg' or '') changes the main head's pooling; the auxiliary head always pools.
        """
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
            self.head[3] = _pool(global_pool)
        self.num_classes = num_classes
        device = self.patch_embed1[0].weight.device
        self.head[4] = _classifier(self.head_hidden_size, num_classes).to(device)
        self.head[4].apply(self._init_weights)
        if self.aux_head is not None:
            self.aux_head[2] = _classifier(self.aux_head[0].num_features, num_classes).to(device)
            self.aux_head[2].apply(self._init_weights)

    @torch.no_grad()
    def reparameterize(self) -> 'OverLoCK':
        """Merge every DilatedReparamBlock in place: the deploy form, same outputs in eval mode.

        timm's ``reparameterize_model`` (and ``validate.py --reparam``) call this. Idempotent; returns self.
        """
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.reparameterize()
        return self

    def reparam(self) -> 'OverLoCK':
        """The original release's name for :meth:`reparameterize` (kept for code written against it)."""
        return self.reparameterize()

    def load_pretrained(self, path: str) -> None:
        """Called by timm for ``pretrained=True`` (custom_load): EMA weights when the file has them."""
        load_checkpoint(self, path, use_ema=None)

    # --- forward --------------------------------------------------------------------------------------------

    def _checkpoint(self, stage: int, index: int) -> bool:
        """Whether block ``index`` of ``stage`` runs under activation checkpointing."""
        return index < self.grad_checkpointing[stage] and torch.is_grad_enabled()

    # The stages are written out (not indexed by computed names) so that torch.jit.script compiles them.

    def _stage1(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed1(x)
        for i, blk in enumerate(self.blocks1):
            if not torch.jit.is_scripting() and self._checkpoint(0, i):
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _stage2(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed2(x)
        for i, blk in enumerate(self.blocks2):
            if not torch.jit.is_scripting() and self._checkpoint(1, i):
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _stage3(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed3(x)
        for i, blk in enumerate(self.blocks3):
            if not torch.jit.is_scripting() and self._checkpoint(2, i):
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _stage4(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed4(x)
        for i, blk in enumerate(self.blocks4):
            if not torch.jit.is_scripting() and self._checkpoint(3, i):
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    @torch.jit.unused
    def _stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Base-Net / Overview-Net stage ``stage`` (0-3): downsampling and its RepConvBlocks."""
        return (self._stage1, self._stage2, self._stage3, self._stage4)[stage](x)

    def forward_base(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Base-Net (stages 1-3, /16) and Overview-Net (stage 4, /32): returns (features, context)."""
        x = self._stage3(self._stage2(self._stage1(check_input(x, self.in_chans))))
        return x, self._stage4(x)

    def _focus3(self, x: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Focus-Net at /16: returns (features, running context, context prior)."""
        prior = self.high_level_proj(ctx)
        prior_up = F.interpolate(prior, size=x.shape[-2:], mode='bilinear', align_corners=False)
        h = prior_up
        for i, blk in enumerate(self.sub_blocks3):
            if not torch.jit.is_scripting() and self._checkpoint(2, i):
                x, h = checkpoint(blk, x, h, prior_up, use_reentrant=False)
            else:
                x, h = blk(x, h, prior_up)
        return x, h, prior

    def _focus4(self, x: torch.Tensor, h: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Focus-Net at /32: returns the fused output (features and context)."""
        x, h = self.patch_embedx(x, h)
        for i, blk in enumerate(self.sub_blocks4):
            if not torch.jit.is_scripting() and self._checkpoint(3, i):
                x, h = checkpoint(blk, x, h, prior, use_reentrant=False)
            else:
                x, h = blk(x, h, prior)
        return x

    def forward_focus(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Focus-Net guided by the context prior derived from the Overview-Net output ``ctx``."""
        x, h, prior = self._focus3(x, ctx)
        return self._focus4(x, h, prior)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The features of ``feature_info`` (timm's API; ``norm`` is accepted, OverLoCK has no final norm).

        Args:
            indices: the last n features if int, all if None, else the listed indices (0-3).
            stop_early: skip the rest of the network once the last requested feature is computed (only
                saves work for indices 0 and 1: the /16 Focus-Net needs the Overview-Net's context).
            intermediates_only: return only the list of features.
        Returns:
            The features, or (forward_features output, features).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'OverLoCK features are NCHW, got output_fmt={output_fmt!r}')
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        features = []
        x = check_input(x, self.in_chans)
        for stage in range(2):
            x = self._stage(x, stage)
            if stage in take:
                features.append(x)
        if stop_early and max_index < 2 and intermediates_only:
            return features
        x = self._stage3(x)
        x, h, prior = self._focus3(x, self._stage4(x))
        if 2 in take:
            features.append(torch.cat([x, h], dim=1))
        if stop_early and max_index < 3 and intermediates_only:
            return features
        x = self._focus4(x, h, prior)
        if 3 in take:
            features.append(x)
        return features if intermediates_only else (x, features)

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop the classifier heads (a feature extractor does not need them); the trunk stays whole."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.aux_head = None
            self.head = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity(), nn.AdaptiveAvgPool2d(1),
                                      nn.Identity())
            self.num_classes = 0
            self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Focus-Net output [B, C4 + C4/4, H/32, W/32]: what ``forward_head`` consumes."""
        base, ctx = self.forward_base(x)
        return self.forward_focus(base, ctx)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits [B, num_classes] from forward_features' output; ``pre_logits``: the pooled [B, head_hidden_size]
        projection before the classifier. With ``global_pool=''`` both keep the spatial map."""
        x = self.head[2](self.head[1](self.head[0](x)))  # 1x1 projection to head_hidden_size, BN, SiLU
        x = self.head_drop(self.head[3](x))  # global average pool (or none)
        if not pre_logits:
            x = self.head[4](x)  # 1x1 conv classifier
        return x.flatten(1) if self.global_pool != '' else x

    def forward_aux(self, ctx: torch.Tensor) -> torch.Tensor:
        """Auxiliary logits [B, num_classes] from the Overview-Net output (models built with ``use_ds=True``)."""
        if self.aux_head is None:
            raise RuntimeError('this OverLoCK model has no auxiliary head; build it with use_ds=True')
        return self.aux_head(ctx).flatten(1)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits; ``{'main': logits, 'aux': aux_logits}`` in training mode when built with ``use_ds=True``."""
        base, ctx = self.forward_base(x)
        logits = self.forward_head(self.forward_focus(base, ctx))
        if self.aux_head is not None and self.training and not torch.jit.is_scripting():
            return {'main': logits, 'aux': self.forward_aux(ctx)}
        return logits


def reparameterize(model: nn.Module) -> nn.Module:
    """Deploy form, in place, of any module whose submodules include OverLoCK models or blocks (an OverLoCK,
    timm's feature extractor around one, a detection backbone); returns it. Shorthand for timm's
    ``reparameterize_model(model, inplace=True)``, which calls ``reparameterize()`` on the submodules that have
    it; the merge itself is ``DilatedReparamBlock.reparameterize``."""
    return reparameterize_model(model, inplace=True)


# --- variants, configs, registration ----------------------------------------------------------------------

_RELEASE_URL = 'https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_{}_in1k_224.pth'

_VARIANT_ARGS: Dict[str, Dict[str, Any]] = {
    'xt': dict(depth=[2, 2, 3, 2], sub_depth=[6, 2], embed_dim=[56, 112, 256, 336], sub_num_heads=[4, 6]),
    't': dict(depth=[4, 4, 6, 2], sub_depth=[12, 2], embed_dim=[64, 128, 256, 512], sub_num_heads=[4, 8]),
    's': dict(depth=[6, 6, 8, 3], sub_depth=[16, 3], embed_dim=[64, 128, 320, 512], sub_num_heads=[8, 16]),
    'b': dict(depth=[8, 8, 10, 4], sub_depth=[20, 4], embed_dim=[80, 160, 384, 576], sub_num_heads=[6, 9]),
}
_COMMON_ARGS: Dict[str, Any] = dict(kernel_size=[17, 15, 13, 7], mlp_ratio=[4, 4, 4, 4], sub_mlp_ratio=[3, 3])
_CROP_PCT = {'xt': 0.925, 't': 0.95, 's': 0.95, 'b': 0.975}


def variant_args(name: str) -> Dict[str, Any]:
    """Constructor arguments of a registered variant name (``overlock_t``, ``overlock_t_reparam``)."""
    short = name[len('overlock_'):] if name.startswith('overlock_') else name
    deploy = short.endswith('_reparam')
    short = short[:-len('_reparam')] if deploy else short
    if short not in _VARIANT_ARGS:
        raise ValueError(f'unknown OverLoCK variant {name!r}; known: {list_variants()}')
    return dict(_COMMON_ARGS, **_VARIANT_ARGS[short], deploy=deploy)


def list_variants() -> List[str]:
    return [f'overlock_{v}{s}' for v in _VARIANT_ARGS for s in ('', '_reparam')]


def _create_overlock(variant: str, pretrained: bool = False, **kwargs) -> OverLoCK:
    model_args = variant_args(variant)
    model_args.update(kwargs)  # any constructor argument can be overridden
    feature_cfg = {'out_indices': (0, 1, 2, 3), 'feature_cls': 'getter', **(model_args.pop('feature_cfg', None) or {})}
    local_file = (model_args.get('pretrained_cfg_overlay') or {}).get('file')
    if pretrained and local_file:
        # timm would load a local file without our layout handling (and drop heads whose class count
        # matches the file but not the ImageNet cfg); load it ourselves, with readable errors.
        features = model_args.pop('features_only', False)
        out_indices = model_args.pop('out_indices', feature_cfg['out_indices'])
        model = build_model_with_cfg(OverLoCK, variant, False, **model_args)
        load_checkpoint(model, local_file, use_ema=None)
        return FeatureGetterNet(model, out_indices=out_indices) if features else model
    try:
        return build_model_with_cfg(
            OverLoCK, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=feature_cfg,
            **model_args,
        )
    except (OSError, ConnectionError) as e:  # urllib's URLError is an OSError
        if not pretrained or isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f'could not fetch the pretrained weights of {variant} ({e}). Offline? Download '
            f'{_RELEASE_URL.format(variant_short(variant))} elsewhere and load the local file with '
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH')) "
            f'or --checkpoint PATH.') from e


def create_overlock(name: str, **kwargs) -> OverLoCK:
    """``timm.create_model`` restricted to OverLoCK names, with an error that lists them."""
    import timm
    if name.split('.')[0] not in list_variants():
        raise ValueError(f'unknown model {name!r}; OverLoCK models are: {", ".join(list_variants())}')
    return timm.create_model(name, **kwargs)


def variant_short(variant: str) -> str:
    return variant[len('overlock_'):].replace('_reparam', '')


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.95, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        'first_conv': FIRST_CONV,
        # the main classifier only: timm's cfg names layers of the default model, and the auxiliary head
        # ('aux_head.2') is built on request (use_ds=True); our loader re-initialises both on a class change
        'classifier': CLASSIFIER,
        'custom_load': True,  # our loader understands the release's layout and converts to deploy form
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2502.20087',
        'origin_url': 'https://github.com/LMMMEng/OverLoCK',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    f'overlock_{v}{s}.in1k': _cfg(url=_RELEASE_URL.format(v), crop_pct=_CROP_PCT[v])
    for v in _VARIANT_ARGS for s in ('', '_reparam')
})


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-XT: 16M params (deploy form), 2.6 GFLOPs, 82.7% ImageNet top-1."""
    return _create_overlock('overlock_xt', pretrained, **kwargs)


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-T: 33M params (deploy form), 5.5 GFLOPs, 84.2% ImageNet top-1."""
    return _create_overlock('overlock_t', pretrained, **kwargs)


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-S: 56M params (deploy form), 9.7 GFLOPs, 84.8% ImageNet top-1."""
    return _create_overlock('overlock_s', pretrained, **kwargs)


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-B: 95M params (deploy form), 16.7 GFLOPs, 85.1% ImageNet top-1."""
    return _create_overlock('overlock_b', pretrained, **kwargs)


@register_model
def overlock_xt_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-XT in deploy form (DilatedReparamBlocks merged); loads training-form weights by merging them."""
    return _create_overlock('overlock_xt_reparam', pretrained, **kwargs)


@register_model
def overlock_t_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-T in deploy form."""
    return _create_overlock('overlock_t_reparam', pretrained, **kwargs)


@register_model
def overlock_s_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-S in deploy form."""
    return _create_overlock('overlock_s_reparam', pretrained, **kwargs)


@register_model
def overlock_b_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-B in deploy form."""
    return _create_overlock('overlock_b_reparam', pretrained, **kwargs)
