"""Neighbourhood aggregation ops of ContMix: natten <= 0.17 ``na2d_av`` semantics without natten.

Backends, in the automatic choice's order of preference: 'triton' (CUDA kernels, when triton and
``triton_backend`` import), 'natten' (an installed natten <= 0.17) and 'torch' (pure PyTorch, any device, always
there). ``dispatch`` holds their registry and the choice; ``OVERLOCK_NA2D_BACKEND=auto|triton|natten|torch``
overrides the automatic one. ``selfcheck`` checks the Triton kernels against the torch backend on first use
(``OVERLOCK_NA2D_SELFCHECK=0`` turns it off). ``flops`` counts the ops' FLOPs for ``torch.utils.flop_counter``.
"""
from .dispatch import (
    BACKENDS, ENV_VAR, available_backends, contmix_softmax_av, get_backend, na2d_av, na2d_softmax_av,
    relative_position_bias, set_backend,
)

__all__ = [
    'na2d_av', 'na2d_softmax_av', 'contmix_softmax_av', 'relative_position_bias', 'available_backends', 'get_backend', 'set_backend',
    'BACKENDS', 'ENV_VAR',
]
