"""The original release's classification model code, built for timing beside ours.

The release's ``models/overlock.py`` imports natten (whose ``na2d_av`` current natten no longer has), mmengine
(for its pretrained loader) and einops. Here it is imported from a checkout of the release with natten's
``na2d_av`` served by this repository's op (the same backend our models use, so a ratio measures the model
code rather than the op) and mmengine's loader left out; its other imports (einops) must be installed.
Its ``register_model`` is bypassed so that timm's registry keeps our models.
"""
import contextlib
import importlib.util
import io
import os
import sys
import types
from typing import Iterator

from torch import nn

from utils.cli import UsageError

__all__ = ['load_original']


@contextlib.contextmanager
def _shimmed_imports() -> Iterator[None]:
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
    shims['natten.functional'].na2d_av = lambda attn, value, kernel_size, **_: na2d_av(attn, value, kernel_size)
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


def load_original(repo: str, variant: str, deploy: bool = True) -> nn.Module:
    """The release's ``overlock_<variant>`` (xt, t, s, b) from the checkout ``repo``, randomly initialised, in
    eval mode; ``deploy``: re-parameterised with its own ``reparam()``."""
    path = os.path.join(repo, 'models', 'overlock.py')
    if not os.path.isfile(path):
        raise UsageError(f'--original {repo}: no models/overlock.py there; give a checkout of '
                         f'https://github.com/LMMMEng/OverLoCK')
    spec = importlib.util.spec_from_file_location('overlock_original_release', path)
    module = importlib.util.module_from_spec(spec)
    with _shimmed_imports(), contextlib.redirect_stdout(io.StringIO()):  # it prints while building convs
        try:
            spec.loader.exec_module(module)
        except ImportError as e:
            raise UsageError(f'--original {repo}: the release\'s model code imports {e.name or e}, which is not '
                             f'installed here (pip install {e.name or "it"})') from None
        model = getattr(module, f'overlock_{variant}')().eval()
        if deploy:
            model.reparam()
    return model
