"""OverLoCK models. Importing this package registers the ``overlock_*`` models with timm.

Modules: ``overlock`` (the network, its variants and timm registration), ``contmix`` (the Focus-Net's ContMix
block), ``layers`` (shared layers, the DilatedReparamBlock), ``weights`` (loading weight files), ``ops`` (the
neighbourhood-aggregation op and its backends), ``fused`` (the inference form: ``fuse(model)``), ``dense`` (the
release's dense backbones and UPerNet; imported on use). Imports go one way, without cycles: dense -> overlock,
weights, layers; fused -> overlock, contmix, layers, ops; overlock -> contmix, weights, layers; contmix ->
layers, ops; weights -> layers.
"""
from .weights import (
    CLASSIFIER_KEYS, CheckpointError, checkpoint_filter_fn, extract_state_dict, guess_variant, is_deploy_state_dict,
    load_checkpoint, read_checkpoint_file,
)
from .contmix import DynamicConvBlock
from .layers import DilatedReparamBlock
from .fused import FusedOverLoCK, fuse
from .overlock import (
    MIN_INPUT_SIZE, OverLoCK, RepConvBlock, create_overlock, list_variants, reparameterize, variant_args,
)

__all__ = [
    'OverLoCK', 'RepConvBlock', 'DynamicConvBlock', 'DilatedReparamBlock', 'MIN_INPUT_SIZE',
    'CLASSIFIER_KEYS', 'CheckpointError', 'load_checkpoint', 'read_checkpoint_file', 'extract_state_dict',
    'checkpoint_filter_fn', 'is_deploy_state_dict', 'guess_variant', 'reparameterize', 'create_overlock',
    'list_variants', 'variant_args', 'FusedOverLoCK', 'fuse',
]
