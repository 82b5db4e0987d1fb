"""The original release's classification model code, built for timing beside ours.

The release's ``models/overlock.py`` imports natten (whose ``na2d_av`` current natten no longer has), mmengine
(for its pretrained loader) and einops. Here it is imported from a checkout of the release with natten's
``na2d_av`` served by either

* ``'gather'``: a gather of each query's K x K neighbour values and an einsum with its weights, a plain-PyTorch
  stand-in for natten's kernel (which current natten no longer has), or
* ``'op'``: this repository's op, the backend our own models use, so that a ratio measures the model code alone,

and mmengine's loader left out; its other imports (einops) must be installed. Its ``register_model`` is
bypassed so that timm's registry keeps our models.
"""
import contextlib
import importlib.util
import io
import os
import sys
import types
from typing import Iterator

import torch
from torch import nn

from utils.cli import UsageError

__all__ = ['NA2D_STAND_INS', 'gather_na2d_av', 'load_original']

NA2D_STAND_INS = ('gather', 'op')


def gather_na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """natten's ``na2d_av`` (no dilation) as a gather and an einsum: ``attn`` [B, G, H, W, K*K] weights the
    K x K window of ``value`` [B, G, H, W, C] around each position (shifted inwards at the borders)."""
    from models.ops.composite import neighbours

    b, g, h, w, c = value.shape
    k = kernel_size
    index = torch.from_numpy(neighbours(h, w, k)).flatten().to(value.device)  # [H*W*K*K] flat positions
    gathered = value.reshape(b, g, h * w, c).index_select(2, index).view(b, g, h, w, k * k, c)
    return torch.einsum('bghwn,bghwnc->bghwc', attn, gathered)


@contextlib.contextmanager
def _shimmed_imports(na2d: str) -> Iterator[None]:
    """natten.functional.na2d_av, mmengine.runner.load_checkpoint and timm's register_model, for the import."""
    from timm.models import registry

    from models.ops import na2d_av

    def _no_loading(*args, **kwargs):
        raise RuntimeError('the original release is built without weights for timing')

    shims = {
        'natten': types.ModuleType('natten'),
        'natten.functional': types.ModuleType('natten.functional'),
        'mmengine': types.ModuleType('mmengine'),
        'mmengine.runner': types.ModuleType('mmengine.runner'),
    }
    stand_in = gather_na2d_av if na2d == 'gather' else na2d_av
    shims['natten.functional'].na2d_av = lambda attn, value, kernel_size, **_: stand_in(attn, value, kernel_size)
    shims['mmengine.runner'].load_checkpoint = _no_loading
    saved = {name: sys.modules.get(name) for name in shims}
    register = registry.register_model
    sys.modules.update(shims)
    registry.register_model = lambda fn: fn
    try:
        yield
    finally:
        registry.register_model = register
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_original(repo: str, variant: str, deploy: bool = True, na2d: str = 'gather') -> nn.Module:
    """The release's ``overlock_<variant>`` (xt, t, s, b) from the checkout ``repo``, randomly initialised, in
    eval mode; ``deploy``: re-parameterised with its own ``reparam()``; ``na2d``: what serves natten's
    ``na2d_av`` (one of :data:`NA2D_STAND_INS`)."""
    if na2d not in NA2D_STAND_INS:
        raise ValueError(f'na2d {na2d!r}: choose one of {", ".join(NA2D_STAND_INS)}')
    path = os.path.join(repo, 'models', 'overlock.py')
    if not os.path.isfile(path):
        raise UsageError(f'--original {repo}: no models/overlock.py there; give a checkout of '
                         f'https://github.com/LMMMEng/OverLoCK')
    spec = importlib.util.spec_from_file_location('overlock_original_release', path)
    module = importlib.util.module_from_spec(spec)
    with _shimmed_imports(na2d), contextlib.redirect_stdout(io.StringIO()):  # it prints while building convs
        try:
            spec.loader.exec_module(module)
        except ImportError as e:
            raise UsageError(f'--original {repo}: the release\'s model code imports {e.name or e}, which is not '
                             f'installed here (pip install {e.name or "it"})') from None
        model = getattr(module, f'overlock_{variant}')().eval()
        if deploy:
            model.reparam()
    return model
