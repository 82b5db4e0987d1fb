"""Launch plans of the Triton kernels of ``na2d_av``: what each kernel call is given, built without touching data.

A :class:`Launch` holds one kernel call (grid, arguments, compile-time constants) and what the static GPU model
needs besides (bytes, FLOPs, loop trip counts); ``plan_*`` build them for every op of ``triton_backend``
(meta tensors work too). The ops run the plans; ``utils/measure/static_gpu.py`` and the compile checks read the
same plans without running anything. This module also holds the kernel table: the kernels compiled for the GPU,
or run by Triton's interpreter on CPU tensors (:func:`use_interpreter`; ``triton_interpreter`` makes that faster).
"""
import contextlib
import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _triton_kernels
from .triton_interpreter import skip_repeated_patching

__all__ = ['Launch', 'MAX_KERNEL_SIZE', 'INTERPRET', 'compiled_kernels', 'use_interpreter', 'launch_config',
           'plan_forward', 'plan_grad_attn', 'plan_grad_value', 'plan_softmax_av', 'plan_contmix']

# The largest window the kernels take. Their results are checked against references up to it; compiled to
# cubins, they are checked for spills at the model's own launches (K <= 13: tests/test_triton_compile.py). The
# forward unrolls a window row (K + 1 columns, each a value row read for two queries), so its code and register
# use grow with K; larger windows go to the torch backend.
MAX_KERNEL_SIZE = 15

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
    if interpret:
        skip_repeated_patching()
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


_NUM_WARPS = 4
# Register cap of the forward launches (ptxas ``maxnreg``; None: ptxas decides). None because the forward
# holds two queries' accumulators per thread, and every cap low enough to raise occupancy makes it spill.
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


def empty_like_layout(ref: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``shape`` whose dimensions are laid out in memory in the order of ref's strides.

    The fake implementations use it too, so compiled graphs see the strides the kernels produce.
    """
    order = sorted(range(ref.dim()), key=lambda d: (-ref.stride(d), d))
    return torch.empty_permuted(shape, order, dtype=dtype, device=ref.device)


def _check_kernel_size(kernel_size: int) -> None:
    if kernel_size > MAX_KERNEL_SIZE:
        raise ValueError(f'triton na2d_av: kernel_size {kernel_size} > {MAX_KERNEL_SIZE} is not supported; '
                         f'use the torch backend (OVERLOCK_NA2D_BACKEND=torch)')


def lse_empty(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
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

    @property
    def device(self) -> torch.device:
        """The device of the launch's tensors (its first argument; an op's tensors share one device)."""
        return self.args[0].device

    def run(self) -> None:
        fn = _KERNELS[self.kernel]
        options = {} if self.max_registers is None or INTERPRET else {'maxnreg': self.max_registers}
        # Triton launches on the current CUDA device: make it the tensors' own (e.g. cuda:1 while 0 is current)
        device = self.device
        with torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext():
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
    out = empty_like_layout(value, value.shape, out_dtype) if dest is None else dest
    lse = lse_empty(attn, rpb, value) if fused else None
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
    gv = empty_like_layout(value_like, grad.shape, value_like.dtype) if dest is None else dest
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
    out, lse_s, lse_l = contmix_empty(x, logits, rpb_small)
    fwd = contmix_forward_plans(x, logits, rpb_small, rpb_large, small, large, out, gpu)
    launches += [(f'fwd K{k}', launch) for k, (launch, _) in zip((small, large), fwd)]
    if backward:
        grad = torch.empty_like(out) if grad is None else grad
        grads = contmix_backward_plans(grad, x, logits, rpb_small, rpb_large, small, large, out,
                                        (fwd[0][1], fwd[1][1]), gpu)[0]
        launches += grads
    return [(label, launch) for label, launch in launches if launch is not None]


def contmix_empty(x, logits, rpb_small):
    dtype = torch.promote_types(torch.promote_types(logits.dtype, rpb_small.dtype), x.dtype)
    return empty_like_layout(x, x.shape, dtype), None, None


def contmix_forward_plans(x, logits, rpb_small, rpb_large, small, large, out, gpu=False):
    groups = logits.shape[1]
    plans = []
    for half, (k, lg, rpb) in enumerate(((small, logits[..., :small * small], rpb_small),
                                         (large, logits[..., small * small:], rpb_large))):
        launch, _, lse = plan_forward(lg, rpb, _halves(x, groups)[half], k, gpu, dest=_halves(out, groups)[half])
        plans.append((launch, lse))
    return plans


def contmix_backward_plans(grad, x, logits, rpb_small, rpb_large, small, large, out, lses, gpu=False):
    groups = logits.shape[1]
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_x = empty_like_layout(x, x.shape, x.dtype)
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


