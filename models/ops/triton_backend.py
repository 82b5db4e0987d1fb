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

Every launch is first built as a :class:`Launch` plan (``plan_*``), which the static GPU model
(``utils/measure/static_gpu.py``) reads without running anything.

Inputs are read in place through their strides (no ``.contiguous()`` copies). Outputs shaped like value
are laid out in value's dimension order; the rest are contiguous.
Double backward is not supported (the gradient ops have no autograd formula).
"""
import functools
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import torch_backend
from . import _triton_kernels

__all__ = ['is_available', 'na2d_av', 'na2d_softmax_av', 'contmix_softmax_av', 'INTERPRET', 'MAX_KERNEL_SIZE']

_logger = logging.getLogger(__name__)

MAX_KERNEL_SIZE = 15  # K*K = 225 <= 256 entries per window row tile; larger K would need bigger tiles

_ACC_DTYPES = {
    torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32, torch.float64: tl.float64,
}
_KERNEL_NAMES = {'fwd': '_na2d_fwd_kernel', 'grad_attn': '_na2d_grad_attn_kernel',
                 'grad_value': '_na2d_grad_value_kernel'}


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> Dict[str, Any]:
    """The kernels compiled for the GPU (``interpret=False``) or run by Triton's interpreter.

    ``@triton.jit`` decides between the two when it runs (it reads ``triton.knobs.runtime.interpret``, i.e.
    TRITON_INTERPRET), for the kernels and for the helpers they call. So the mode ``_triton_kernels`` was
    imported in is used as it is, and the other mode gets a second copy of that module executed under
    ``knobs.runtime.scope()`` (which restores the knob and the environment afterwards).
    """
    imported = not isinstance(_triton_kernels._na2d_fwd_kernel, triton.runtime.jit.JITFunction)
    module = _triton_kernels
    if interpret != imported:
        from triton import knobs
        spec = importlib.util.spec_from_file_location(
            f'{_triton_kernels.__name__}_{"interpreted" if interpret else "compiled"}', _triton_kernels.__file__)
        module = importlib.util.module_from_spec(spec)
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            spec.loader.exec_module(module)
    return {name: getattr(module, attr) for name, attr in _KERNEL_NAMES.items()}


def compiled_kernels() -> Dict[str, triton.runtime.jit.JITFunction]:
    """The kernels as GPU (JIT-compiled) functions, whatever TRITON_INTERPRET said at import."""
    return _kernels(False)


# Triton reads TRITON_INTERPRET when ``@triton.jit`` runs, i.e. when ``_triton_kernels`` is imported; the
# launches go through this table, so :func:`use_interpreter` can switch later (tests do).
INTERPRET: bool = os.environ.get('TRITON_INTERPRET', '0') == '1'
_KERNELS: Dict[str, Any] = _kernels(INTERPRET)


def use_interpreter(enabled: bool = True) -> None:
    """Run the kernels under Triton's interpreter on CPU tensors (``enabled``) or compiled on CUDA tensors.

    Same effect as ``TRITON_INTERPRET=1`` before the first import, without it. The dispatcher still
    needs ``TRITON_INTERPRET=1`` in the environment to send CPU tensors to this backend.
    """
    global INTERPRET, _KERNELS
    INTERPRET = bool(enabled)
    _KERNELS = _kernels(INTERPRET)
    is_available.cache_clear()


_NUM_WARPS = 4
# Register cap of the forward launches (ptxas ``maxnreg``; None: ptxas decides). The forward keeps two
# queries' accumulators per thread and ptxas hoists a window row's loads: at OverLoCK's shapes it takes 72-115
# registers without a spill. Caps of 80, 96 or 112 made it spill (8-104 bytes per thread, read from the
# stack frame) for at most 1 % fewer estimated instructions (3 % more at 80), so none is set; a GPU
# measurement of occupancy against spills may change that.
_FORWARD_MAX_REGISTERS: Optional[int] = None


# How the kernels read channel rows: None lets each plan decide (see ``_split_rows``); True or False forces
# scalar or vector reads (the tests run both).
SPLIT_ROWS: Optional[bool] = None

# The key order of the grad-value kernel: None lets each plan choose (see ``plan_grad_value``); True or
# False forces pixel or spatial blocks (the tests run both).
GRAD_VALUE_BY_PIXEL: Optional[bool] = None


def _block_queries(gpu: bool = False) -> int:
    """Queries (or keys) per program: one per thread on the GPU. The interpreter pays per executed op, not
    per element, so it gets much larger blocks (fewer programs) unless ``gpu`` asks for the GPU's."""
    return 1 << 11 if INTERPRET and not gpu else 32 * _NUM_WARPS


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """Triton importable (it is, or this module would not be) and a CUDA device, or the interpreter."""
    if INTERPRET:
        return True
    try:
        return torch.cuda.is_available()
    except RuntimeError as e:  # a broken driver reads as "no CUDA"
        _logger.debug('CUDA probe failed: %s', e)
        return False


# ---------------------------------------------------------------------------------------------------------
# Launch helpers.


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def launch_config(height: int, width: int, channels: int, kernel_size: int, gpu: bool = False,
                  element_size: int = 4) -> Dict[str, int]:
    """Tile constants and num_warps of a launch (the same for all three kernels); ``gpu``: the GPU's even
    while the kernels run under the interpreter (the static GPU model asks for those).

    Every kernel works on BLOCK_Q pixels of the flattened [B, G, H, W] grid, one pixel row of C channels
    per thread, the channels in NCH <= 4 chunks of VEC: 16 bytes (4 float32 or 8 bf16/fp16 channels) when
    that gives at most 4 chunks, so each chunk is one 16-byte load when the channels are contiguous.
    ``element_size``: bytes per element of the channel rows read in the loop (value or grad_out).
    """
    c_pad = _pow2(channels)
    vec = min(c_pad, max(16 // max(1, min(element_size, 16)), c_pad // 4))
    return dict(C=channels, VEC=vec, NCH=c_pad // vec, BLOCK_Q=_block_queries(gpu), num_warps=_NUM_WARPS)


def _bf16_pairs(value: torch.Tensor, config: Dict[str, int]) -> bool:
    """Whether the forward reads a bfloat16 value as 32-bit channel pairs (widened by a shift or a mask, one
    instruction per element): contiguous channels, an even count in at most 2 chunks, every pair 4-byte
    aligned (even strides and offset; allocations are aligned)."""
    return (value.dtype == torch.bfloat16 and value.stride(-1) == 1 and config['C'] % 2 == 0
            and config['NCH'] <= 2 and config['VEC'] % 2 == 0 and value.storage_offset() % 2 == 0
            and all(s % 2 == 0 for s in value.stride()[:-1]))


def _split_rows(config: Dict[str, int], *rows: torch.Tensor) -> bool:
    """Whether the kernels read these [B, G, H, W, C] tensors' rows channel by channel (``SPLIT``).

    A chunk of a row is one vector load only when the compiler can prove its alignment: Triton marks a
    pointer argument 16-byte aligned, and an integer argument divisible by 16, when they are (allocations
    are aligned, so a view's storage offset decides). A row at ``g * 14`` channels is not provably aligned;
    Triton then lays a [queries, channels] chunk out with a row's channels across lanes, and every step
    that scales a row by its query's weight moves data through shared memory. :data:`SPLIT_ROWS` forces
    either way (the results are the same bits). Chunks wider than 16 channels (more than 64 channels) are
    always vector reads: the scalar reads stack at most 16 channels per chunk.
    """
    if config['VEC'] > 16:
        return False
    if SPLIT_ROWS is not None:
        return SPLIT_ROWS
    return any(t.stride(-1) == 1 and (t.storage_offset() * t.element_size() % 16 != 0
                                      or any(s % 16 != 0 for s in t.stride()[:-1]))
               for t in rows if t is not None)


def _grid(config: Dict[str, int], num_pixels: int) -> Tuple[int]:
    return (triton.cdiv(num_pixels, config['BLOCK_Q']),)


def _acc_dtype(*tensors: torch.Tensor):
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if dtype not in _ACC_DTYPES:
        raise TypeError(f'triton na2d_av: unsupported dtype {dtype}; use float16, bfloat16, float32 or float64')
    return _ACC_DTYPES[dtype]


def _empty_like_layout(ref: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``shape`` whose dimensions are laid out in memory in the order of ref's strides.

    The fake implementations use it too, so compiled graphs see the strides the kernels produce.
    """
    order = sorted(range(ref.dim()), key=lambda d: (-ref.stride(d), d))
    return torch.empty_permuted(shape, order, dtype=dtype, device=ref.device)


def _check_kernel_size(kernel_size: int) -> None:
    if kernel_size > MAX_KERNEL_SIZE:
        raise ValueError(f'triton na2d_av: kernel_size {kernel_size} > {MAX_KERNEL_SIZE} is not supported; '
                         f'use the torch backend (OVERLOCK_NA2D_BACKEND=torch)')


def _lse_empty(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per-query log-sum-exp, in the accumulation dtype (float64 only when an input is float64)."""
    dtype = torch.float64 if torch.float64 in (logits.dtype, rpb.dtype, value.dtype) else torch.float32
    return torch.empty(value.shape[:4], dtype=dtype, device=value.device)


# ---------------------------------------------------------------------------------------------------------
# Launch plans: what each kernel call is given, built without touching data (so meta tensors work too; the
# static GPU model in ``utils/measure/static_gpu.py`` reads the same plans the ops launch).


@dataclass
class Launch:
    """One kernel launch: the kernel's name in ``_triton_kernels``, its grid, arguments and compile-time
    constants, and what the static GPU model needs besides: the tensors the launch must read and write at
    least once, its floating-point operations and the trip counts of its loops.
    """
    kernel: str
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    num_warps: int
    reads: Tuple[torch.Tensor, ...]
    writes: Tuple[torch.Tensor, ...]
    flops: int
    # Iterations of each loop of the kernel whose trip count is not a compile-time constant, summed over all
    # programs, outermost first (an inner loop counts every iteration of its body). Loops with a constant trip
    # count (K*K) are read off the compiled code. A callable: only the static model asks.
    loop_trips: Callable[[], Tuple[int, ...]]
    # Register cap per thread given to ptxas (None: its own choice).
    max_registers: Optional[int] = None

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def min_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.reads + self.writes)

    def run(self) -> None:
        fn = _KERNELS[self.kernel]
        options = {} if self.max_registers is None or INTERPRET else {'maxnreg': self.max_registers}
        fn[self.grid](*self.args, num_warps=self.num_warps, **options, **self.constexprs)


def _window_spans(length: int, kernel_size: int, block: int) -> List[int]:
    """Per tile of ``block`` keys along one axis: the longest range of queries whose windows hold a key."""
    spans = []
    for start in range(0, length, block):
        best = 0
        for pos in range(start, min(start + block, length)):
            lo = 0 if pos <= kernel_size - 1 else pos - kernel_size + 1 + kernel_size // 2
            hi = length - 1 if pos >= length - kernel_size else pos + kernel_size // 2
            best = max(best, hi - lo + 1)
        spans.append(best)
    return spans


def plan_forward(attn: torch.Tensor, rpb: Optional[torch.Tensor], value: torch.Tensor, kernel_size: int,
                 gpu: bool = False, dest: Optional[torch.Tensor] = None,
                 ) -> Tuple[Optional[Launch], torch.Tensor, Optional[torch.Tensor]]:
    """The forward launch (None for empty inputs), the output (``dest`` when given: a view to write into)
    and the log-sum-exp (fused only)."""
    _check_kernel_size(kernel_size)
    fused = rpb is not None
    b, g, h, w, c = value.shape
    inputs = (attn, rpb, value) if fused else (attn, value)
    out_dtype = functools.reduce(torch.promote_types, [t.dtype for t in inputs])
    out = _empty_like_layout(value, value.shape, out_dtype) if dest is None else dest
    lse = _lse_empty(attn, rpb, value) if fused else None
    if out.numel() == 0:
        return None, out, lse
    config = launch_config(h, w, c, kernel_size, gpu, value.element_size())
    num_warps = config.pop('num_warps')
    pairs_w = (w + 1) // 2  # two horizontally adjacent queries per thread
    grid = _grid(config, b * g * h * pairs_w)
    k2 = kernel_size * kernel_size
    split = _split_rows(config, value, out)
    pairs = _bf16_pairs(value, config)
    if pairs:  # VEC: 32-bit words (channel pairs) per chunk, an accumulator each for even and odd channels
        config['VEC'] //= 2
    args = (
        attn, rpb if fused else attn, value, out, lse if fused else out,
        b * g * h * pairs_w, g, h, w, pairs_w,
        *attn.stride(),
        *(rpb.stride() if fused else (0, 0, 0)),
        *value.stride(),
        *out.stride(),
        *(lse.stride() if fused else (0, 0, 0, 0)),
    )
    queries = b * g * h * w
    flops = queries * k2 * (2 * c + (5 if fused else 0))
    launch = Launch('fwd', grid, args, dict(K=kernel_size, FUSED=fused, ACC_DTYPE=_acc_dtype(*inputs), **config,
                                            PAIRS=pairs, SPLIT=split),
                    num_warps, inputs, (out, lse) if fused else (out,), flops,
                    lambda: (), max_registers=_FORWARD_MAX_REGISTERS)
    return launch, out, lse


def plan_grad_attn(grad: torch.Tensor, value: torch.Tensor, kernel_size: int, logits: Optional[torch.Tensor] = None,
                   rpb: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                   gpu: bool = False, dest: Optional[torch.Tensor] = None) -> Tuple[Optional[Launch], torch.Tensor]:
    """Gradient w.r.t. attn, or with ``logits`` (and the forward's ``rpb``, ``lse`` and output ``out``) the
    gradient w.r.t. the logits of the fused op."""
    fused = logits is not None
    b, g, h, w, c = value.shape
    k2 = kernel_size * kernel_size
    inputs = (grad, value, logits, rpb) if fused else (grad, value)
    if out_dtype is None:
        out_dtype = functools.reduce(torch.promote_types, [t.dtype for t in inputs])
    ga = torch.empty((b, g, h, w, k2), dtype=out_dtype, device=value.device) if dest is None else dest
    if ga.numel() == 0:
        return None, ga
    config = launch_config(h, w, c, kernel_size, gpu, value.element_size())
    num_warps = config.pop('num_warps')
    grid = _grid(config, b * g * h * w)
    args = (
        grad, value, logits if fused else grad, rpb if fused else grad, lse if fused else grad,
        out if fused else grad, ga,
        b * g * h * w, g, h, w,
        *grad.stride(),
        *value.stride(),
        *(logits.stride() if fused else (0,) * 5),
        *(rpb.stride() if fused else (0,) * 3),
        *(lse.stride() if fused else (0,) * 4),
        *(out.stride() if fused else (0,) * 5),
        *ga.stride(),
    )
    flops = b * g * h * w * k2 * (2 * c + (6 if fused else 0))
    launch = Launch('grad_attn', grid, args,
                    dict(K=kernel_size, FUSED=fused, ACC_DTYPE=_acc_dtype(*inputs), **config,
                         SPLIT=_split_rows(config, grad, value, out if fused else None)), num_warps,
                    inputs + ((lse, out) if fused else ()), (ga,), flops, lambda: ())
    return launch, ga


def plan_grad_value(grad: torch.Tensor, attn: torch.Tensor, kernel_size: int, value_like: torch.Tensor,
                    rpb: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                    gpu: bool = False, dest: Optional[torch.Tensor] = None) -> Tuple[Optional[Launch], torch.Tensor]:
    """``value_like`` gives the layout and dtype of the result (value itself in the autograd formulas)."""
    fused = rpb is not None
    b, g, h, w, c = grad.shape
    gv = _empty_like_layout(value_like, grad.shape, value_like.dtype) if dest is None else dest
    if gv.numel() == 0:
        return None, gv
    config = launch_config(h, w, c, kernel_size, gpu, grad.element_size())
    num_warps = config.pop('num_warps')
    # Two key orders (see the kernel): spatial blocks loop over the map's largest inverse window; pixel
    # blocks (the (batch, group) slices of one pixel) loop over exactly their pixel's. The plan takes the
    # one with fewer loop iterations in all; the results are the same bits.
    spans_h = _window_spans(h, kernel_size, 1)
    spans_w = _window_spans(w, kernel_size, 1)
    num_h, num_w = max(spans_h), max(spans_w)
    blocks_per_pixel = triton.cdiv(b * g, config['BLOCK_Q'])
    spatial_programs = _grid(config, b * g * h * w)[0]
    by_pixel = GRAD_VALUE_BY_PIXEL
    if by_pixel is None:
        by_pixel = blocks_per_pixel * sum(spans_h) * sum(spans_w) < spatial_programs * num_h * num_w
    grid = (h * w * blocks_per_pixel,) if by_pixel else (spatial_programs,)
    inputs = (grad, attn, rpb) if fused else (grad, attn)
    args = (
        grad, attn, rpb if fused else grad, lse if fused else grad, gv,
        b * g * h * w, g, h, w, num_h, num_w, b * g, blocks_per_pixel,
        *grad.stride(),
        *attn.stride(),
        *(rpb.stride() if fused else (0,) * 3),
        *(lse.stride() if fused else (0,) * 4),
        *gv.stride(),
    )
    k2 = kernel_size * kernel_size
    flops = b * g * h * w * k2 * (2 * c + (3 if fused else 0))
    programs = math.prod(grid)

    def trips() -> Tuple[int, ...]:
        if by_pixel:
            return (blocks_per_pixel * sum(spans_h) * w,
                    blocks_per_pixel * sum(spans_h) * sum(spans_w))
        return programs * num_h, programs * num_h * num_w

    launch = Launch('grad_value', grid, args,
                    dict(K=kernel_size, FUSED=fused, ACC_DTYPE=_acc_dtype(*inputs), BY_PIXEL=by_pixel, **config,
                         SPLIT=_split_rows(config, grad, gv)),
                    num_warps,
                    inputs + ((lse,) if fused else ()), (gv,), flops, trips)
    return launch, gv


def _forward(attn, rpb, value, kernel_size):
    launch, out, lse = plan_forward(attn, rpb, value, kernel_size)
    if launch is not None:
        launch.run()
    return out, lse


def _grad_attn(grad, value, kernel_size, logits=None, rpb=None, lse=None, out=None, out_dtype=None):
    launch, ga = plan_grad_attn(grad, value, kernel_size, logits, rpb, lse, out, out_dtype)
    if launch is not None:
        launch.run()
    return ga


def _grad_value(grad, attn, kernel_size, value_like, rpb=None, lse=None):
    launch, gv = plan_grad_value(grad, attn, kernel_size, value_like, rpb, lse)
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
    return _empty_like_layout(value, value.shape, torch.promote_types(attn.dtype, value.dtype))


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
    return _empty_like_layout(value, value.shape, value.dtype)


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
    return _empty_like_layout(value, value.shape, dtype), _lse_empty(logits, rpb, value)


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
    return _empty_like_layout(value, value.shape, value.dtype)


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


def plan_softmax_av(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int,
                    backward: bool = True, gpu: bool = False) -> List[Tuple[str, Launch]]:
    """The launches of one ``na2d_softmax_av`` call (forward, and with ``backward`` the gradient of every
    input, as the autograd formula launches them), labelled 'fwd' / 'grad_logits' / 'grad_value'.

    Builds nothing but empty outputs, so meta tensors work (the static GPU model uses it, with ``gpu=True``:
    the GPU's tile sizes even while the kernels run under the interpreter).
    """
    launches = []
    fwd, out, lse = plan_forward(logits, rpb, value, kernel_size, gpu)
    launches.append(('fwd', fwd))
    if backward:
        grad = torch.empty_like(out)
        launches.append(('grad_logits', plan_grad_attn(grad, value, kernel_size, logits=logits, rpb=rpb, lse=lse,
                                                       out=out, out_dtype=logits.dtype, gpu=gpu)[0]))
        launches.append(('grad_value', plan_grad_value(grad, logits, kernel_size, value, rpb=rpb, lse=lse,
                                                       gpu=gpu)[0]))
    return [(label, launch) for label, launch in launches if launch is not None]


# ---------------------------------------------------------------------------------------------------------
# Both windows of a ContMix block in one op.


def _halves(t: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> its two [B, G, H, W, C/(2G)] views (channel m*C/2 + g*c + j), as ContMix splits value."""
    b, c, h, w = t.shape
    v = t.reshape(b, 2, groups, c // (2 * groups), h, w).permute(1, 0, 2, 4, 5, 3)
    return v[0], v[1]


def plan_contmix(x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor, rpb_large: torch.Tensor,
                 small: int, large: int, backward: bool = True, gpu: bool = False,
                 grad: Optional[torch.Tensor] = None) -> List[Tuple[str, Launch]]:
    """The launches of one ``contmix_softmax_av`` call (see :func:`contmix_softmax_av`), forward and with
    ``backward`` the gradients (of ``grad``, the output's, default uninitialised), every kernel reading and
    writing views of the block's own tensors. Run in order, the forward launches leave what the backward
    launches read."""
    launches = []
    out, lse_s, lse_l = _contmix_empty(x, logits, rpb_small)
    fwd = _contmix_forward_plans(x, logits, rpb_small, rpb_large, small, large, out, gpu)
    launches += [(f'fwd K{k}', launch) for k, (launch, _) in zip((small, large), fwd)]
    if backward:
        grad = torch.empty_like(out) if grad is None else grad
        grads = _contmix_backward_plans(grad, x, logits, rpb_small, rpb_large, small, large, out,
                                        (fwd[0][1], fwd[1][1]), gpu)[0]
        launches += grads
    return [(label, launch) for label, launch in launches if launch is not None]


def _contmix_empty(x, logits, rpb_small):
    dtype = torch.promote_types(torch.promote_types(logits.dtype, rpb_small.dtype), x.dtype)
    return _empty_like_layout(x, x.shape, dtype), None, None


def _contmix_forward_plans(x, logits, rpb_small, rpb_large, small, large, out, gpu=False):
    groups = logits.shape[1]
    plans = []
    for half, (k, lg, rpb) in enumerate(((small, logits[..., :small * small], rpb_small),
                                         (large, logits[..., small * small:], rpb_large))):
        launch, _, lse = plan_forward(lg, rpb, _halves(x, groups)[half], k, gpu, dest=_halves(out, groups)[half])
        plans.append((launch, lse))
    return plans


def _contmix_backward_plans(grad, x, logits, rpb_small, rpb_large, small, large, out, lses, gpu=False):
    groups = logits.shape[1]
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_x = _empty_like_layout(x, x.shape, x.dtype)
    launches = []
    split = small * small
    for half, (k, cols, rpb) in enumerate(((small, slice(0, split), rpb_small),
                                           (large, slice(split, None), rpb_large))):
        lg, g, v, o = logits[..., cols], _halves(grad, groups)[half], _halves(x, groups)[half], \
            _halves(out, groups)[half]
        launches.append((f'grad_logits K{k}', plan_grad_attn(g, v, k, logits=lg, rpb=rpb, lse=lses[half], out=o,
                                                             out_dtype=logits.dtype, gpu=gpu,
                                                             dest=grad_logits[..., cols])[0]))
        launches.append((f'grad_value K{k}', plan_grad_value(g, lg, k, v, rpb=rpb, lse=lses[half], gpu=gpu,
                                                             dest=_halves(grad_x, groups)[half])[0]))
    return launches, grad_logits, grad_x


@torch.library.custom_op('overlock::contmix_softmax_av_triton', mutates_args=())
def _contmix_op(x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor, rpb_large: torch.Tensor,
                small: int, large: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, _, _ = _contmix_empty(x, logits, rpb_small)
    lses = []
    for launch, lse in _contmix_forward_plans(x, logits, rpb_small, rpb_large, small, large, out):
        if launch is not None:
            launch.run()
        lses.append(lse)
    return out, lses[0], lses[1]


@_contmix_op.register_fake
def _(x, logits, rpb_small, rpb_large, small, large):
    out, _, _ = _contmix_empty(x, logits, rpb_small)
    b, g = logits.shape[:2]
    lse = _lse_empty(logits, rpb_small, x.new_empty((b, g, x.shape[2], x.shape[3], 1)))
    return out, lse, lse.clone()


@torch.library.custom_op('overlock::contmix_softmax_av_triton_backward', mutates_args=())
def _contmix_backward_op(grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, rpb_small: torch.Tensor,
                         rpb_large: torch.Tensor, out: torch.Tensor, lse_small: torch.Tensor,
                         lse_large: torch.Tensor, small: int, large: int) -> Tuple[torch.Tensor, torch.Tensor]:
    launches, grad_logits, grad_x = _contmix_backward_plans(grad, x, logits, rpb_small, rpb_large, small, large,
                                                            out, (lse_small, lse_large))
    for _, launch in launches:
        if launch is not None:
            launch.run()
    return grad_logits, grad_x


@_contmix_backward_op.register_fake
def _(grad, x, logits, rpb_small, rpb_large, out, lse_small, lse_large, small, large):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), _empty_like_layout(x, x.shape, x.dtype)


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
