"""Neighbourhood aggregation ops of ContMix: natten <= 0.17 ``na2d_av`` semantics without natten.

Backends: 'torch' (pure PyTorch, any device, always there), 'natten' (an installed natten <= 0.17) and
'triton' (CUDA kernels, when triton and ``triton_backend`` import). See ``dispatch`` for how one is chosen;
``OVERLOCK_NA2D_BACKEND=auto|torch|natten|triton`` overrides the automatic choice.
"""
from .dispatch import (
    BACKENDS, ENV_VAR, available_backends, contmix_softmax_av, get_backend, na2d_av, na2d_softmax_av,
    relative_position_bias, set_backend,
)

__all__ = [
    'na2d_av', 'na2d_softmax_av', 'contmix_softmax_av', 'relative_position_bias', 'available_backends', 'get_backend', 'set_backend',
    'BACKENDS', 'ENV_VAR',
]
