"""Loading OverLoCK weights: the original release's files, our training and deploy-form weight files.

This module maps weight files onto a model. Saving and resuming the whole training state (optimizer, EMA,
schedule, RNG) is ``utils/checkpoint.py``; activation (gradient) checkpointing is a model option
(``OverLoCK.set_grad_checkpointing``). The three share the word "checkpoint" and nothing else.

Files are read with ``torch.load(weights_only=True)`` (a downloaded file must not run code). Every failure
becomes a :class:`CheckpointError` with a one-line message that names the file and what to do.

The module knows the OverLoCK parameter layout (classifier names, DilatedReparamBlock keys) but not the model
classes: :func:`guess_variant` finds the registered variants through timm's registry, so ``overlock.py`` can
import this module without a cycle.
"""
import logging
import os
import pickle
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.models import adapt_input_conv
from torch import nn

from .layers import DilatedReparamBlock

__all__ = [
    'CheckpointError', 'read_checkpoint_file', 'extract_state_dict', 'checkpoint_filter_fn',
    'load_checkpoint', 'is_deploy_state_dict', 'guess_variant', 'CLASSIFIER', 'AUX_CLASSIFIER', 'CLASSIFIER_KEYS',
    'FIRST_CONV',
]

_logger = logging.getLogger(__name__)

# The classifier layers (1x1 convs) of the main head and of the auxiliary head, as the original release names
# them. Fine-tuning re-initialises them when the class count changes; timm's pretrained cfg lists them.
CLASSIFIER = 'head.4'
AUX_CLASSIFIER = 'aux_head.2'
CLASSIFIER_KEYS = (CLASSIFIER, AUX_CLASSIFIER)
FIRST_CONV = 'patch_embed1.0'  # the stem's first conv: adapted to the model's input channels on load
_AUX_PREFIX = 'aux_head.'  # the auxiliary head: absent from models built with use_ds=False
_SPLIT_BN = '.aux_bn.'  # timm's SplitBatchNorm2d keeps the other splits' BatchNorms under this name
_PREFIXES = ('module.', '_orig_mod.')  # DDP / torch.compile wrappers


def _numpy_scalar_globals() -> list:
    import numpy as np
    core = getattr(np, '_core', None) or np.core
    return [core.multiarray.scalar, np.dtype] + [type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32')]


_NUMPY_SCALARS = _numpy_scalar_globals()


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


def read_checkpoint_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with readable errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    if os.path.isdir(path):
        raise CheckpointError(f'checkpoint {path} is a directory; pass the .pth file inside it')
    try:
        # numpy scalars and dtypes: mmcv's checkpoints (the released dense models) keep evaluation scores in
        # their 'meta'; nothing else beyond plain data is allowed.
        with torch.serialization.safe_globals(_NUMPY_SCALARS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        import re
        found = re.search(r'(?:Unsupported global|Unsupported operand)[^\n]*?(GLOBAL )?([\w.]+)', str(e))
        what = f'it holds {found.group(2)}' if found else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f'checkpoint {path} cannot be loaded safely (torch.load with weights_only=True refused it: {what}); '
            f're-save it as a plain state_dict of tensors') from e
    except Exception as e:  # torch.load raises many types on damaged files (RuntimeError, EOFError, KeyError...)
        raise CheckpointError(
            f'checkpoint {path} is truncated or not a PyTorch checkpoint '
            f'({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else "no details"}); '
            f'download or copy it again') from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(checkpoint: Any, use_ema: Optional[bool] = False, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint, wrapper prefixes removed.

    Args:
        checkpoint: a state_dict, or a dict holding one under 'state_dict' / 'model' (+ EMA keys).
        use_ema: True requires the EMA weights ('state_dict_ema' / 'model_ema'), None prefers them when
            present, False ignores them.
        source: name of the file, for messages.
    """
    if _is_state_dict(checkpoint):
        if use_ema:
            raise CheckpointError(f'{source} holds a plain state_dict, no EMA weights; drop --use-ema')
        state_dict = checkpoint
    elif isinstance(checkpoint, dict):
        ema_keys = [k for k in ('state_dict_ema', 'model_ema') if _is_state_dict(checkpoint.get(k))]
        keys = [k for k in ('state_dict', 'model') if _is_state_dict(checkpoint.get(k))]
        if use_ema and not ema_keys:
            raise CheckpointError(f'{source} has no EMA weights (top-level keys: {sorted(checkpoint)[:8]}); '
                                  f'drop --use-ema')
        if use_ema or (use_ema is None and ema_keys):
            state_dict = checkpoint[ema_keys[0]]
        elif keys:
            state_dict = checkpoint[keys[0]]
        else:
            raise CheckpointError(f'{source} holds no model weights (top-level keys: {sorted(checkpoint)[:8]})')
    else:
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not model weights')
    cleaned = {}
    for k, v in state_dict.items():
        while k.startswith(_PREFIXES):
            k = k[len('module.'):] if k.startswith('module.') else k[len('_orig_mod.'):]
        cleaned[k] = v
    return cleaned


def is_deploy_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for re-parameterised (deploy-form) weights: merged large-kernel convs, no branch BatchNorms."""
    return any(k.endswith('lk_origin.bias') for k in state_dict) and not any('.origin_bn.' in k for k in state_dict)


@torch.no_grad()
def _merge_block_weights(state_dict: Dict[str, torch.Tensor], prefix: str, block: DilatedReparamBlock) -> None:
    """Replace a training-form DilatedReparamBlock's weights in ``state_dict`` by their merged form."""
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    channels = sub['lk_origin.weight'].shape[0]
    tmp = DilatedReparamBlock(channels, block.kernel_size, deploy=False, use_gemm=False)
    tmp.to(sub['lk_origin.weight'].dtype)
    tmp.load_state_dict(sub)
    tmp.reparameterize()
    for k in sub:
        del state_dict[prefix + k]
    state_dict[prefix + 'lk_origin.weight'] = tmp.lk_origin.weight.detach().clone()
    state_dict[prefix + 'lk_origin.bias'] = tmp.lk_origin.bias.detach().clone()


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a state_dict to ``model``: merge training-form weights for a deploy model, adapt the first conv
    to the model's input channels (timm's ``adapt_input_conv``: grayscale sums the RGB filters, more channels
    repeat them), drop classifiers whose class count differs (they keep their fresh init: fine-tuning), drop
    an unused auxiliary head and the extra statistics of split BatchNorm training."""
    state_dict = extract_state_dict(state_dict, use_ema=None)
    model_sd = model.state_dict()
    conv = FIRST_CONV + '.weight'
    if conv in state_dict and conv in model_sd and state_dict[conv].shape[1] != model_sd[conv].shape[1] \
            and state_dict[conv].shape[0] == model_sd[conv].shape[0]:
        in_chans = model_sd[conv].shape[1]
        _logger.info('Adapting %s from %d to %d input channels.', FIRST_CONV, state_dict[conv].shape[1], in_chans)
        state_dict[conv] = adapt_input_conv(in_chans, state_dict[conv])
    for name, m in model.named_modules():
        if isinstance(m, DilatedReparamBlock):
            prefix = f'{name}.'
            if m.deploy and prefix + 'origin_bn.weight' in state_dict:
                _merge_block_weights(state_dict, prefix, m)
            elif not m.deploy and prefix + 'lk_origin.bias' in state_dict and prefix + 'origin_bn.weight' not in state_dict:
                raise CheckpointError(
                    'the checkpoint is in deploy form (re-parameterised); build the matching '
                    "'overlock_*_reparam' model to load it (or reparameterize() the model first)")
    for key in CLASSIFIER_KEYS:
        names = [key + suffix for suffix in ('.weight', '.bias') if key + suffix in state_dict]
        if not names:
            continue
        weight = key + '.weight'
        if weight not in model_sd:
            if key != AUX_CLASSIFIER or any(k.startswith(_AUX_PREFIX) for k in model_sd):
                _logger.info('Dropping %s: the model has no such classifier (num_classes=0?).', key)
        elif weight in state_dict and (state_dict[weight].shape[0] != model_sd[weight].shape[0]
                                       and state_dict[weight].shape[1:] == model_sd[weight].shape[1:]):
            # only the class count differs; other mismatches are another architecture, reported on load
            _logger.warning('Re-initialising %s: checkpoint has %d classes, the model %d.',
                            key, state_dict[weight].shape[0], model_sd[weight].shape[0])
        else:
            continue
        for name in names:
            del state_dict[name]
    if not any(k.startswith(_AUX_PREFIX) for k in model_sd):
        for k in [k for k in state_dict if k.startswith(_AUX_PREFIX)]:
            del state_dict[k]  # built with use_ds=False: the auxiliary head is not needed
    split = [k for k in state_dict if _SPLIT_BN in k and k not in model_sd]
    if split:
        # Trained with --split-bn (timm's SplitBatchNorm2d): the augmented splits' statistics; a split layer
        # evaluates with its main statistics, which are the plain BatchNorm keys.
        _logger.info('Dropping %d split-BatchNorm keys of the augmentation splits (%s ...): the main statistics '
                     'are used, as the split model evaluates', len(split), split[0])
        for k in split:
            del state_dict[k]
    return state_dict


def _brief(keys: List[str], n: int = 3) -> str:
    more = f', ... (+{len(keys) - n})' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def _mismatch(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Tuple[List[str], List[str], List[str]]:
    model_sd = model.state_dict()
    reinit = {k + s for k in CLASSIFIER_KEYS for s in ('.weight', '.bias')}
    missing = [k for k in model_sd if k not in state_dict and k not in reinit]
    unexpected = [k for k in state_dict if k not in model_sd]
    shapes = [f'{k} {list(state_dict[k].shape)} vs {list(model_sd[k].shape)}'
              for k in state_dict if k in model_sd and state_dict[k].shape != model_sd[k].shape]
    return missing, unexpected, shapes


def load_checkpoint(model: nn.Module, path: str, use_ema: Optional[bool] = False, strict: bool = True) -> nn.Module:
    """Load a checkpoint file into an OverLoCK model.

    Accepts the original release's files and ours: a plain state_dict, or one nested under 'state_dict' /
    'model' (EMA: 'state_dict_ema' / 'model_ema'), with 'module.' / '_orig_mod.' prefixes. Training-form
    weights load into a deploy-form model (merged on the fly); classifiers with another class count are
    re-initialised.

    Args:
        model: the target model.
        path: checkpoint file.
        use_ema: True: the EMA weights (error if absent); None: EMA when present; False: the raw weights.
        strict: fail on missing / unexpected keys (classifier re-initialisation excepted).
    """
    checkpoint = read_checkpoint_file(path)
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema, source=f'checkpoint {path}')
    try:
        state_dict = checkpoint_filter_fn(state_dict, model)
    except CheckpointError as e:
        raise CheckpointError(f'checkpoint {path}: {e}') from None
    missing, unexpected, shapes = _mismatch(state_dict, model)
    if shapes or (strict and (missing or unexpected)):
        variant = guess_variant(state_dict)
        hint = (f'; its keys fit {variant}' if variant else
                '; it fits none of the standard OverLoCK variants (a model built with other constructor '
                'arguments, e.g. --model-kwargs, must be rebuilt with the same ones)')
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing keys ({_brief(missing)})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected keys ({_brief(unexpected)})')
        if shapes:
            parts.append(f'{len(shapes)} shape mismatches ({_brief(shapes, 2)})')
        raise CheckpointError(f'checkpoint {path} does not fit this model: {"; ".join(parts)}{hint}')
    model.load_state_dict(state_dict, strict=False)
    _logger.info('Loaded %s%s', path, ' (EMA weights)' if use_ema else '')
    return model


def _signature(state_dict: Dict[str, Any], shape_of) -> Dict[str, Tuple[int, ...]]:
    skip = {k + s for k in CLASSIFIER_KEYS for s in ('.weight', '.bias')}
    return {k: tuple(shape_of(v)) for k, v in state_dict.items() if k not in skip and not k.startswith(_AUX_PREFIX)}


def guess_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The registered OverLoCK variant whose keys and shapes (classifiers aside) ``state_dict`` fits, if any."""
    import timm  # the variants are found through timm's registry (``models.overlock`` registers them)
    state_dict = extract_state_dict(state_dict, use_ema=None)
    target = _signature(state_dict, lambda v: v.shape)
    deploy = is_deploy_state_dict(state_dict)
    for name in timm.list_models('overlock_*'):
        if name.endswith('_reparam') != deploy:
            continue
        with torch.device('meta'):
            candidate = timm.create_model(name, use_gemm=False)
        if _signature(candidate.state_dict(), lambda v: v.shape) == target:
            return name
    return None
