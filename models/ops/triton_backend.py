"""Triton backend of ``na2d_av`` and the fused ``na2d_softmax_av`` (natten <= 0.17 semantics, dilation 1).

Runs on CUDA tensors, or on CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` is set
before triton is imported or after :func:`use_interpreter` (how the tests run it without a GPU). Importing
it raises ImportError when triton is missing; ``models.ops`` imports it lazily and falls back to the torch
backend.

Each kernel is wrapped in a ``torch.library`` custom op (namespace ``overlock``) with a fake implementation
and an autograd formula, so ``torch.compile`` sees one opaque node per call and no graph break:

- ``na2d_av_triton(attn, value, K)`` -> out; backward: ``na2d_av_triton_grad_attn`` and ``..._grad_value``.
- ``na2d_softmax_av_triton(logits, rpb, value, K)`` -> (out, lse): bias + softmax + aggregation in one kernel;
  only the per-query log-sum-exp (float32, 1/K^2 of the logits) is kept for the backward, which recomputes
  the softmax weights (``..._grad_logits`` and ``..._grad_value``). The rpb gradient is a sum of the logits
  gradient over the batch and the queries that share an rpb entry (an ``index_add``).
- ``contmix_softmax_av_triton(x, logits, rpb_small, rpb_large, s, K)``: both windows of a ContMix block,
  reading views of ``x`` [B, C, H, W] and of the whole logits tensor and writing [B, C, H, W] directly;
  its backward writes one gradient of the logits and one of ``x``.

Every launch is first built as a :class:`~models.ops.triton_plans.Launch` plan (``triton_plans.plan_*``), which
the static GPU model (``utils/measure/static_gpu.py``) reads without running anything.

Inputs are read in place through their strides (no ``.contiguous()`` copies). Outputs shaped like value
are laid out in value's dimension order; the rest are contiguous.
Double backward is not supported (the gradient ops have no autograd formula).
"""
import functools
import logging
from typing import Tuple

import torch

from . import torch_backend
from . import triton_plans as plans
from .triton_plans import (  # noqa: F401  (the plans' public names, also reachable from here)
    MAX_KERNEL_SIZE, Launch, compiled_kernels, launch_config, plan_contmix, plan_forward, plan_grad_attn,
    plan_grad_value, plan_softmax_av, use_interpreter,
)

__all__ = ['is_available', 'na2d_av', 'na2d_softmax_av', 'contmix_softmax_av', 'MAX_KERNEL_SIZE', 'use_interpreter']

_logger = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == 'INTERPRET':  # the current mode (``use_interpreter`` changes it in ``triton_plans``)
        return plans.INTERPRET
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def is_available() -> bool:
    """Triton importable (it is, or this module would not be) and a CUDA device, or the interpreter."""
    return plans.INTERPRET or _cuda_available()


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except RuntimeError as e:  # a broken driver reads as "no CUDA"
        _logger.debug('CUDA probe failed: %s', e)
        return False


def _forward(attn, rpb, value, kernel_size):
    launch, out, lse = plans.plan_forward(attn, rpb, value, kernel_size)
    if launch is not None:
        launch.run()
    return out, lse


def _grad_attn(grad, value, kernel_size, logits=None, rpb=None, lse=None, out=None, out_dtype=None):
    launch, ga = plans.plan_grad_attn(grad, value, kernel_size, logits, rpb, lse, out, out_dtype)
    if launch is not None:
        launch.run()
    return ga


def _grad_value(grad, attn, kernel_size, value_like, rpb=None, lse=None):
    launch, gv = plans.plan_grad_value(grad, attn, kernel_size, value_like, rpb, lse)
    if launch is not None:
        launch.run()
    return gv


# ---------------------------------------------------------------------------------------------------------
# Relative position bias gradient.


def _grad_rpb(grad_logits: torch.Tensor, rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Sum of grad_logits [B, G, H, W, K*K] over the batch and the entries that read the same rpb cell."""
    _, g, h, w, _ = grad_logits.shape
    acc = torch.float64 if grad_logits.dtype == torch.float64 else torch.float32
    per_pos = grad_logits.sum(0, dtype=acc).reshape(g, -1)
    index = torch_backend.rpb_index(h, w, kernel_size, grad_logits)
    grad = per_pos.new_zeros(g, (2 * kernel_size - 1) ** 2).index_add_(1, index, per_pos)
    return grad.view(rpb.shape).to(rpb.dtype)


# ---------------------------------------------------------------------------------------------------------
# Custom ops: unfused.


@torch.library.custom_op('overlock::na2d_av_triton', mutates_args=())
def _av_op(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _forward(attn, None, value, kernel_size)[0]


@_av_op.register_fake
def _(attn, value, kernel_size):
    return plans.empty_like_layout(value, value.shape, torch.promote_types(attn.dtype, value.dtype))


@torch.library.custom_op('overlock::na2d_av_triton_grad_attn', mutates_args=())
def _grad_attn_op(grad: torch.Tensor, value: torch.Tensor, kernel_size: int, dtype: torch.dtype) -> torch.Tensor:
    return _grad_attn(grad, value, kernel_size, out_dtype=dtype)


@_grad_attn_op.register_fake
def _(grad, value, kernel_size, dtype):
    return value.new_empty((*value.shape[:4], kernel_size * kernel_size), dtype=dtype)


@torch.library.custom_op('overlock::na2d_av_triton_grad_value', mutates_args=())
def _grad_value_op(grad: torch.Tensor, attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _grad_value(grad, attn, kernel_size, value)


@_grad_value_op.register_fake
def _(grad, attn, value, kernel_size):
    return plans.empty_like_layout(value, value.shape, value.dtype)


def _av_setup(ctx, inputs, output):
    attn, value, kernel_size = inputs
    ctx.save_for_backward(attn, value)
    ctx.kernel_size = kernel_size


def _av_backward(ctx, grad):
    attn, value = ctx.saved_tensors
    k = ctx.kernel_size
    ga = _grad_attn_op(grad, value, k, attn.dtype) if ctx.needs_input_grad[0] else None
    # value is passed for its layout and dtype only (it is saved anyway).
    gv = _grad_value_op(grad, attn, value, k) if ctx.needs_input_grad[1] else None
    return ga, gv, None


_av_op.register_autograd(_av_backward, setup_context=_av_setup)


# ---------------------------------------------------------------------------------------------------------
# Custom ops: fused bias + softmax + aggregation.


@torch.library.custom_op('overlock::na2d_softmax_av_triton', mutates_args=())
def _softmax_av_op(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor,
                   kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(logits, rpb, value, kernel_size)


@_softmax_av_op.register_fake
def _(logits, rpb, value, kernel_size):
    dtype = torch.promote_types(torch.promote_types(logits.dtype, rpb.dtype), value.dtype)
    return plans.empty_like_layout(value, value.shape, dtype), plans.lse_empty(logits, rpb, value)


@torch.library.custom_op('overlock::na2d_softmax_av_triton_grad_logits', mutates_args=())
def _grad_logits_op(grad: torch.Tensor, logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor,
                    lse: torch.Tensor, out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _grad_attn(grad, value, kernel_size, logits=logits, rpb=rpb, lse=lse, out=out, out_dtype=logits.dtype)


@_grad_logits_op.register_fake
def _(grad, logits, rpb, value, lse, out, kernel_size):
    return logits.new_empty((*value.shape[:4], kernel_size * kernel_size))


@torch.library.custom_op('overlock::na2d_softmax_av_triton_grad_value', mutates_args=())
def _softmax_grad_value_op(grad: torch.Tensor, logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor,
                           lse: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _grad_value(grad, logits, kernel_size, value, rpb=rpb, lse=lse)


@_softmax_grad_value_op.register_fake
def _(grad, logits, rpb, value, lse, kernel_size):
    return plans.empty_like_layout(value, value.shape, value.dtype)


def _softmax_av_setup(ctx, inputs, output):
    logits, rpb, value, kernel_size = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # out is kept for the softmax backward's D = <grad_out, out> (one [B, G, H, W, C] tensor, 1/K^2 of logits)
    ctx.save_for_backward(logits, rpb, value, lse, out)
    ctx.kernel_size = kernel_size


def _softmax_av_backward(ctx, grad, _grad_lse):
    logits, rpb, value, lse, out = ctx.saved_tensors
    k = ctx.kernel_size
    need_logits, need_rpb, need_value = ctx.needs_input_grad[:3]
    g_logits = g_rpb = g_value = None
    if need_logits or need_rpb:
        g_logits = _grad_logits_op(grad, logits, rpb, value, lse, out, k)
        if need_rpb:
            g_rpb = _grad_rpb(g_logits, rpb, k)
    if need_value:
        g_value = _softmax_grad_value_op(grad, logits, rpb, value, lse, k)
    return g_logits if need_logits else None, g_rpb, g_value, None


_softmax_av_op.register_autograd(_softmax_av_backward, setup_context=_softmax_av_setup)


@torch.library.custom_op('overlock::contmix_softmax_av_triton', mutates_args=())
def _contmix_op(x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor, rpb_large: torch.Tensor,
                small: int, large: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, _, _ = plans.contmix_empty(x, logits, rpb_small)
    lses = []
    for launch, lse in plans.contmix_forward_plans(x, logits, rpb_small, rpb_large, small, large, out):
        if launch is not None:
            launch.run()
        lses.append(lse)
    return out, lses[0], lses[1]


@_contmix_op.register_fake
def _(x, logits, rpb_small, rpb_large, small, large):
    out, _, _ = plans.contmix_empty(x, logits, rpb_small)
    b, g = logits.shape[:2]
    lse = plans.lse_empty(logits, rpb_small, x.new_empty((b, g, x.shape[2], x.shape[3], 1)))
    return out, lse, lse.clone()


@torch.library.custom_op('overlock::contmix_softmax_av_triton_backward', mutates_args=())
def _contmix_backward_op(grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor,
                         rpb_large: torch.Tensor, out: torch.Tensor, lse_small: torch.Tensor,
                         lse_large: torch.Tensor, small: int, large: int) -> Tuple[torch.Tensor, torch.Tensor]:
    launches, grad_logits, grad_x = plans.contmix_backward_plans(grad, x, logits, rpb_small, rpb_large, small, large,
                                                            out, (lse_small, lse_large))
    for _, launch in launches:
        if launch is not None:
            launch.run()
    return grad_logits, grad_x


@_contmix_backward_op.register_fake
def _(grad, x, logits, rpb_small, rpb_large, out, lse_small, lse_large, small, large):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), plans.empty_like_layout(x, x.shape, x.dtype)


def _contmix_setup(ctx, inputs, output):
    x, logits, rpb_small, rpb_large, small, large = inputs
    out, lse_small, lse_large = output
    ctx.mark_non_differentiable(lse_small, lse_large)
    ctx.save_for_backward(x, logits, rpb_small, rpb_large, out, lse_small, lse_large)
    ctx.sizes = small, large


def _contmix_backward(ctx, grad, _grad_lse_small, _grad_lse_large):
    x, logits, rpb_small, rpb_large, out, lse_small, lse_large = ctx.saved_tensors
    small, large = ctx.sizes
    grad_logits, grad_x = _contmix_backward_op(grad, x, logits, rpb_small, rpb_large, out, lse_small, lse_large,
                                               small, large)
    split = small * small
    g_rpb_small = _grad_rpb(grad_logits[..., :split], rpb_small, small) if ctx.needs_input_grad[2] else None
    g_rpb_large = _grad_rpb(grad_logits[..., split:], rpb_large, large) if ctx.needs_input_grad[3] else None
    return grad_x, grad_logits, g_rpb_small, g_rpb_large, None, None


_contmix_op.register_autograd(_contmix_backward, setup_context=_contmix_setup)


def contmix_softmax_av(x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor, rpb_large: torch.Tensor,
                       small: int, large: int) -> torch.Tensor:
    """Both windows of a ContMix block: ``na2d_softmax_av`` of the small window (the first ``small**2``
    logits, the first half of the channels) and of the large one (the rest), written straight into one
    ``[B, C, H, W]`` output laid out like ``x``. The backward writes one gradient of the whole logits
    tensor and one of ``x``: no slicing, ``cat`` or zero-filled slice gradients around the kernels.

    Args:
        x: [B, C, H, W] (any strides); channel m*C/2 + g*c + j is channel j of group g of window m.
        logits: [B, G, H, W, small**2 + large**2].
        rpb_small, rpb_large: [G, 2s-1, 2s-1] and [G, 2K-1, 2K-1].
    """
    return _contmix_op(x, logits, rpb_small, rpb_large, small, large)[0]


# ---------------------------------------------------------------------------------------------------------
# Public entry points (inputs validated by ``models.ops``).


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Neighbourhood aggregation with Triton kernels.

    Args:
        attn: [B, G, H, W, K*K] weights (any strides).
        value: [B, G, H, W, C] (any strides).
        kernel_size: odd K, 3 <= K <= 15, at most H and W.
    Returns:
        [B, G, H, W, C] in the promoted dtype of attn and value, laid out like value; accumulated in float32
        (float64 for float64 inputs).
    """
    return _av_op(attn, value, kernel_size)


def na2d_softmax_av(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``na2d_av(softmax(logits + relative_position_bias(rpb), -1), value)`` in one kernel.

    Args:
        logits: [B, G, H, W, K*K] (any strides, e.g. a slice of a larger last axis).
        rpb: [G, 2K-1, 2K-1] relative position bias.
        value: [B, G, H, W, C].
        kernel_size: odd K, 3 <= K <= 15, at most H and W.
    Returns:
        [B, G, H, W, C] in the promoted dtype of the three inputs, laid out like value.
    """
    return _softmax_av_op(logits, rpb, value, kernel_size)[0]

