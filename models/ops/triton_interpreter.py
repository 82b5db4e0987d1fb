"""Triton's interpreter without its repeated patching, for the CPU runs of the Triton kernels (tests, the
``--smoke`` runs of the GPU tools, the backend's self-check under ``TRITON_INTERPRET=1``).

The interpreter replaces the builtins of ``triton.language`` (and some tensor methods) by host versions at every
kernel launch and puts the originals back afterwards. It does the same again at every call of a
``@triton.jit`` helper inside the launch, and never undoes that second time: the builtins it looks for have
already been replaced, so it finds none and rewrites a few attributes with equal ones. Our kernels call their
helpers in the inner loops, so the repeat runs at every iteration of those loops.
:func:`skip_repeated_patching` leaves the repeat out for helpers that see no language module the launch has
not patched (the results are the same bit for bit; tests/test_na2d_triton.py checks it).
"""
import inspect
import logging
from typing import Any, List, Set

__all__ = ['skip_repeated_patching']

_logger = logging.getLogger(__name__)
_installed = False


def skip_repeated_patching() -> bool:
    """Install the skip (once per process); False where this Triton's interpreter has another structure."""
    global _installed
    if _installed:
        return True
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch, scope_cls = getattr(interpreter, '_patch_lang', None), getattr(interpreter, '_LangPatchScope', None)
    if patch is None or scope_cls is None or not hasattr(scope_cls, 'restore'):
        _logger.info('Triton %s: its interpreter has no _patch_lang/_LangPatchScope as expected; its repeated '
                     'patching is left in place', triton.__version__)
        return False
    launches: List[Set[int]] = []  # the language modules patched by the launch in progress

    def languages(fn: Any) -> Set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_once(fn):
        seen = languages(fn)
        if launches:  # a helper called inside a launch
            return scope_cls() if seen <= launches[-1] else patch(fn)
        scope = patch(fn)  # a launch: patched now, restored when it ends
        launches.append(seen)
        restore = scope.restore

        def restore_launch():
            launches.pop()
            restore()
        scope.restore = restore_launch
        return scope

    patch_once.original = patch  # the interpreter's own (tests compare the two)
    interpreter._patch_lang = patch_once
    _installed = True
    return True
