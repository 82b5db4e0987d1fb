"""Pure-PyTorch ``na2d_av`` (natten <= 0.17 semantics, dilation 1) for any device.

Layout: attn [B, G, H, W, K*K], value [B, G, H, W, C] -> out [B, G, H, W, C] with
``out[b, g, i, j] = sum_{ki, kj} attn[b, g, i, j, ki*K + kj] * value[b, g, si(i) + ki, sj(j) + kj]`` and
``si(i) = clamp(i - K//2, 0, H - K)`` (windows shift inwards at the borders).

How it is computed: the map is cut into tiles of Th x Tw query pixels. Every query of a tile only reads the
(Th + K - 1) x (Tw + K - 1) region of value around the tile, so the tile's attention rows are written into a
small dense matrix [Th*Tw, region] and the whole op becomes one batched matmul (BLAS / cuBLAS speed instead of
a K^2-long gather-multiply-add loop). OverLoCK's maps are small (14 x 14 and 7 x 7 at 224 px), so there the
tile is the whole map and no region gather is needed. Larger maps use tiles of about K/2 (at least 7) so the
dense matrices stay a few times the size of attn.

Three bilinear ops form a closed family, registered as ``torch.library`` custom ops (opaque to
``torch.compile``), each differentiable through the others, so gradients of any order work:

- ``na2d_av(attn, value)``: the forward aggregation;
- ``na2d_av_grad_attn(grad, value)``: ``<grad[p], value[nbr(p, n)]>`` -- the gradient w.r.t. attn;
- ``na2d_av_grad_value(grad, attn)``: scatter of ``attn[p, n] * grad[p]`` onto ``nbr(p, n)`` -- w.r.t. value.

Autograd saves only the inputs (attn and value); the dense per-tile matrices are transient and rebuilt in the
backward, so nothing K^2 times the size of value is kept between forward and backward.
"""
import functools
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from . import flops

__all__ = ['na2d_av', 'window_starts', 'rpb_index', 'is_available']

# Tiling (measured on CPU, 2 threads): a map side of at most max(_SINGLE_TILE_RATIO * K, _SINGLE_TILE_MIN) is one
# tile, so small maps (all of OverLoCK's at 224 px) are one dense matmul with no gathers; longer sides are cut
# into equal tiles of about max(K // 2 + 1, _TILE_MIN) queries, which keeps the dense rows at ~1.5-2.5 K.
_SINGLE_TILE_RATIO = 1.6
_SINGLE_TILE_MIN = 16
_TILE_MIN = 7
# From this kernel size on, the dense matrices are filled by a few strided block copies (K-long contiguous
# runs) instead of an index scatter; for smaller K the per-copy overhead loses (measured on CPU).
_STRIDED_MIN_KERNEL = 7
# Cached index plans (per map size, kernel size and device); bounded so many input sizes cannot pile up.
_PLAN_CACHE_SIZE = 64


def is_available() -> bool:
    """The torch backend runs everywhere."""
    return True


def window_starts(length: int, kernel_size: int, device: torch.device = None) -> torch.Tensor:
    """First neighbour of each position along one axis: ``clamp(i - K//2, 0, length - K)`` (int64 [length])."""
    return (torch.arange(length, device=device) - kernel_size // 2).clamp(0, length - kernel_size)


def _outside_inference_mode(fn):
    """Build cached tensors as normal tensors: one made under ``torch.inference_mode()`` could never be
    used by autograd afterwards (a later training step would fail to save it for backward). Eager only:
    dynamo cannot trace the mode switch."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


def _rpb_index(height: int, width: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    k = kernel_size
    kk = torch.arange(k, device=device)

    def rel(length: int) -> torch.Tensor:  # [length, K] in [0, 2K-2]: neighbour - query + K - 1
        pos = torch.arange(length, device=device)
        return window_starts(length, k, device)[:, None] + kk - pos[:, None] + (k - 1)

    return (rel(height)[:, None, :, None] * (2 * k - 1) + rel(width)[None, :, None, :]).reshape(-1)


_RPB_INDEX: Dict[Tuple[int, int, int, torch.device], torch.Tensor] = {}


def rpb_index(height: int, width: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """[H*W*K*K] index into ``rpb.flatten(1)`` [G, (2K-1)^2]: the bias cell of query (i, j), neighbour (ki, kj).

    Cached per size and device for real tensors in eager mode; while tracing (torch.compile, fake tensors)
    it is built afresh and folds into the graph.
    """
    if type(like) not in (torch.Tensor, torch.nn.Parameter) or torch.compiler.is_compiling():
        return _rpb_index(height, width, kernel_size, like.device)
    key = (height, width, kernel_size, like.device)
    index = _RPB_INDEX.get(key)
    if index is None:
        if len(_RPB_INDEX) >= _PLAN_CACHE_SIZE:
            _RPB_INDEX.clear()
        index = _RPB_INDEX[key] = _outside_inference_mode(_rpb_index)(height, width, kernel_size, like.device)
    return index


@dataclass(frozen=True)
class _AxisPlan:
    """Tiling of one axis of length L for kernel K.

    tile: T query positions per tile; num_tiles: n (the last tile is zero-padded up to n*T).
    region: R = positions of value one tile reads. rows: [n, R] value position of each region slot.
    local: [n*T, K] region slot of neighbour k of (padded) query position p.
    """
    length: int
    tile: int
    num_tiles: int
    region: int
    rows: torch.Tensor
    local: torch.Tensor

    @property
    def single(self) -> bool:
        return self.num_tiles == 1


def _axis_plan(length: int, kernel_size: int, device: torch.device) -> _AxisPlan:
    k = kernel_size
    if length <= max(_SINGLE_TILE_RATIO * k, _SINGLE_TILE_MIN):
        tile = length
    else:
        # Equal tiles; the zero padding of the last tile is less than num_tiles positions.
        n = -(-length // max(k // 2 + 1, _TILE_MIN))
        tile = -(-length // n)
    n = -(-length // tile)
    region = min(tile + k - 1, length)
    starts = window_starts(length, k)
    tile_first = torch.arange(n) * tile
    # A region starts at its first query's window start, moved back where it would run past the end;
    # it then holds every window of the tile (windows start at most T - 1 later, never past length - K).
    region_start = torch.minimum(starts[tile_first], torch.tensor(length - region))
    rows = region_start[:, None] + torch.arange(region)
    # Padded query positions (>= length) have zero attention; give them the last position's window.
    padded = torch.arange(n * tile).clamp(max=length - 1)
    local = starts[padded][:, None] + torch.arange(k) - region_start.repeat_interleave(tile)[:, None]
    return _AxisPlan(length, tile, n, region, rows.to(device), local.to(device))


@dataclass(frozen=True)
class _Run:
    """Tiles [t0, t1) x query offsets [u0, u1) of one axis whose window starts at region slot alpha + beta * u."""
    t0: int
    t1: int
    u0: int
    u1: int
    alpha: int
    beta: int


def _axis_runs(p: _AxisPlan) -> Tuple[_Run, ...]:
    """Split an axis into runs where the window start is constant or moves with the query (beta 0 or 1).

    Inside a run the dense matrix entries of a K-window form a strided view. Interior tiles all share one run
    pattern and are merged, so an axis has a handful of runs whatever its length.
    """
    first = p.local[:, 0].view(p.num_tiles, p.tile).tolist()
    per_tile = []
    for loc in first:
        runs, u = [], 0
        while u < p.tile:
            beta = 0 if u + 1 < p.tile and loc[u + 1] == loc[u] else 1
            v = u + 1
            while v < p.tile and loc[v] == loc[u] + beta * (v - u):
                v += 1
            runs.append((u, v, loc[u] - beta * u, beta))
            u = v
        per_tile.append(tuple(runs))
    out, t = [], 0
    while t < p.num_tiles:
        s = t + 1
        while s < p.num_tiles and per_tile[s] == per_tile[t]:
            s += 1
        out.extend(_Run(t, s, *run) for run in per_tile[t])
        t = s
    return tuple(out)


@dataclass(frozen=True)
class _Block:
    """One strided view of the dense matrices [N, nH, nW, Th*Tw, Rh*Rw] that holds a box of attention entries."""
    src: Tuple[slice, slice, slice, slice]  # slices of (nH, nW, Th, Tw) of the tiled attn [N, nH, nW, Th, Tw, K, K]
    size: Tuple[int, ...]  # (nH', nW', Th', Tw', K, K) -- the batch dim N is prepended at use
    stride: Tuple[int, ...]
    offset: int


def _blocks(ph: _AxisPlan, pw: _AxisPlan, k: int) -> Tuple[_Block, ...]:
    rr = ph.region * pw.region
    tile_stride = ph.tile * pw.tile * rr
    blocks = []
    for rh in _axis_runs(ph):
        for rw in _axis_runs(pw):
            blocks.append(_Block(
                src=(slice(rh.t0, rh.t1), slice(rw.t0, rw.t1), slice(rh.u0, rh.u1), slice(rw.u0, rw.u1)),
                size=(rh.t1 - rh.t0, rw.t1 - rw.t0, rh.u1 - rh.u0, rw.u1 - rw.u0, k, k),
                stride=(pw.num_tiles * tile_stride, tile_stride, pw.tile * rr + rh.beta * pw.region,
                        rr + rw.beta, pw.region, 1),
                offset=(rh.t0 * pw.num_tiles * tile_stride + rw.t0 * tile_stride + (rh.u0 * pw.tile + rw.u0) * rr
                        + (rh.alpha + rh.beta * rh.u0) * pw.region + rw.alpha + rw.beta * rw.u0),
            ))
    return tuple(blocks)


@dataclass(frozen=True)
class _Plan:
    h: _AxisPlan
    w: _AxisPlan
    index: torch.Tensor  # [nH*nW, Th*Tw, K*K]: dense column (region slot) of each attention entry
    blocks: Tuple[_Block, ...]  # the same map as strided block copies (used for K >= _STRIDED_MIN_KERNEL)
    kernel_size: int

    @property
    def strided(self) -> bool:
        return self.kernel_size >= _STRIDED_MIN_KERNEL

    @property
    def single(self) -> bool:
        return self.h.single and self.w.single

    @property
    def num_tiles(self) -> int:
        return self.h.num_tiles * self.w.num_tiles


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
@_outside_inference_mode
def _plan(height: int, width: int, kernel_size: int, device: torch.device) -> _Plan:
    k = kernel_size
    ph = _axis_plan(height, k, device)
    pw = _axis_plan(width, k, device)
    lh = ph.local.view(ph.num_tiles, 1, ph.tile, 1, k, 1)
    lw = pw.local.view(1, pw.num_tiles, 1, pw.tile, 1, k)
    index = (lh * pw.region + lw).reshape(ph.num_tiles * pw.num_tiles, ph.tile * pw.tile, k * k)
    return _Plan(ph, pw, index.contiguous(), _blocks(ph, pw, k), k)


def _to_tiles(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[N, H, W, D] -> [N * tiles, Th*Tw, D], zero-padded to whole tiles."""
    n, h, w, d = x.shape
    if plan.single:
        return x.reshape(n, h * w, d)
    ph, pw = plan.h, plan.w
    x = F.pad(x, (0, 0, 0, pw.num_tiles * pw.tile - w, 0, ph.num_tiles * ph.tile - h))
    x = x.view(n, ph.num_tiles, ph.tile, pw.num_tiles, pw.tile, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n * plan.num_tiles, ph.tile * pw.tile, d)


def _from_tiles(x: torch.Tensor, plan: _Plan, n: int) -> torch.Tensor:
    """Inverse of _to_tiles: [N * tiles, Th*Tw, D] -> [N, H, W, D] (padding dropped)."""
    ph, pw = plan.h, plan.w
    d = x.shape[-1]
    if plan.single:
        return x.view(n, ph.length, pw.length, d)
    x = x.view(n, ph.num_tiles, pw.num_tiles, ph.tile, pw.tile, d).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, ph.num_tiles * ph.tile, pw.num_tiles * pw.tile, d)
    return x[:, :ph.length, :pw.length]


def _regions(v: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[N, H, W, C] -> [N * tiles, Rh*Rw, C]: the value region each tile reads."""
    n, h, w, c = v.shape
    if plan.single:
        return v.reshape(n, h * w, c)  # a view, whatever the memory layout of the two map axes
    ph, pw = plan.h, plan.w
    if not ph.single:
        v = v.index_select(1, ph.rows.flatten())
    if not pw.single:
        v = v.index_select(2, pw.rows.flatten())
    v = v.view(n, ph.num_tiles, ph.region, pw.num_tiles, pw.region, c).permute(0, 1, 3, 2, 4, 5)
    return v.reshape(n * plan.num_tiles, ph.region * pw.region, c)


def _regions_backward(g: torch.Tensor, plan: _Plan, n: int) -> torch.Tensor:
    """Adjoint of _regions: sum [N * tiles, Rh*Rw, C] back onto [N, H, W, C] (regions overlap)."""
    ph, pw = plan.h, plan.w
    c = g.shape[-1]
    if plan.single:
        return g.view(n, ph.length, pw.length, c)
    g = g.view(n, ph.num_tiles, pw.num_tiles, ph.region, pw.region, c).permute(0, 1, 3, 2, 4, 5)
    g = g.reshape(n, ph.num_tiles * ph.region, pw.num_tiles * pw.region, c)
    if not pw.single:
        g = g.new_zeros(n, g.shape[1], pw.length, c).index_add_(2, pw.rows.flatten(), g)
    if not ph.single:
        g = g.new_zeros(n, ph.length, pw.length, c).index_add_(1, ph.rows.flatten(), g)
    return g


def _block_views(dense: torch.Tensor, tiles: torch.Tensor, plan: _Plan):
    """Pairs (view of dense, view of tiles) covering every attention entry once; tiles is [N * tiles, Th*Tw, K*K]."""
    n = dense.shape[0] // plan.num_tiles
    ph, pw, k = plan.h, plan.w, plan.kernel_size
    tiles = tiles.view(n, ph.num_tiles, pw.num_tiles, ph.tile, pw.tile, k, k)
    batch_stride = plan.num_tiles * ph.tile * pw.tile * ph.region * pw.region
    base = dense.storage_offset()
    for b in plan.blocks:
        view = dense.as_strided((n, *b.size), (batch_stride, *b.stride), base + b.offset)
        yield view, tiles[(slice(None), *b.src)]


def _dense(attn: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Scatter attn [N, H, W, K*K] into the per-tile dense matrices [N * tiles, Th*Tw, Rh*Rw]."""
    n = attn.shape[0]
    a = _to_tiles(attn, plan).contiguous()
    nt, tt, kk = plan.index.shape
    dense = a.new_zeros(n * nt, tt, plan.h.region * plan.w.region)
    if plan.strided:
        for dst, src in _block_views(dense, a, plan):
            dst.copy_(src)
    else:
        dense.view(n, nt, tt, dense.shape[-1]).scatter_(3, plan.index.expand(n, nt, tt, kk), a.view(n, nt, tt, kk))
    return dense


def _gather(dense: torch.Tensor, plan: _Plan, n: int) -> torch.Tensor:
    """Adjoint of _dense: read the attention entries [N, H, W, K*K] back out of [N * tiles, Th*Tw, Rh*Rw]."""
    nt, tt, kk = plan.index.shape
    if plan.strided:
        a = dense.new_empty(n * nt, tt, kk)
        for src, dst in _block_views(dense, a, plan):
            dst.copy_(src)
    else:
        a = dense.view(n, nt, tt, dense.shape[-1]).gather(3, plan.index.expand(n, nt, tt, kk)).view(n * nt, tt, kk)
    return _from_tiles(a, plan, n)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Half-precision inputs are accumulated in float32; float64 stays float64.
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return torch.promote_types(dtype, torch.float32)


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, G, H, W, D] -> [B*G, H, W, D] in the compute dtype (a view when possible)."""
    b, g, h, w, d = x.shape
    return x.to(dtype).reshape(b * g, h, w, d)


def _av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    b, g, h, w, c = value.shape
    dtype = _compute_dtype(attn, value)
    plan = _plan(h, w, kernel_size, value.device)
    dense = _dense(_flat(attn, dtype), plan)
    out = torch.bmm(dense, _regions(_flat(value, dtype), plan))
    out = _from_tiles(out, plan, b * g)
    return out.reshape(b, g, h, w, c).to(torch.promote_types(attn.dtype, value.dtype))


def _grad_attn(grad: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    b, g, h, w, c = value.shape
    dtype = _compute_dtype(grad, value)
    plan = _plan(h, w, kernel_size, value.device)
    scores = torch.bmm(_to_tiles(_flat(grad, dtype), plan), _regions(_flat(value, dtype), plan).transpose(1, 2))
    out = _gather(scores, plan, b * g)
    return out.reshape(b, g, h, w, kernel_size * kernel_size).to(torch.promote_types(grad.dtype, value.dtype))


def _grad_value(grad: torch.Tensor, attn: torch.Tensor, kernel_size: int) -> torch.Tensor:
    b, g, h, w, c = grad.shape
    dtype = _compute_dtype(grad, attn)
    plan = _plan(h, w, kernel_size, grad.device)
    dense = _dense(_flat(attn, dtype), plan)
    out = torch.bmm(dense.transpose(1, 2), _to_tiles(_flat(grad, dtype), plan))
    out = _regions_backward(out, plan, b * g)
    return out.reshape(b, g, h, w, c).to(torch.promote_types(grad.dtype, attn.dtype))


# ---------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, differentiable through each other.


@torch.library.custom_op('overlock::na2d_av_torch', mutates_args=())
def _na2d_av_op(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _av(attn, value, kernel_size)


@torch.library.custom_op('overlock::na2d_av_torch_grad_attn', mutates_args=())
def _grad_attn_op(grad: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _grad_attn(grad, value, kernel_size)


@torch.library.custom_op('overlock::na2d_av_torch_grad_value', mutates_args=())
def _grad_value_op(grad: torch.Tensor, attn: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _grad_value(grad, attn, kernel_size)


@_na2d_av_op.register_fake
def _(attn, value, kernel_size):
    return value.new_empty(value.shape, dtype=torch.promote_types(attn.dtype, value.dtype))


@_grad_attn_op.register_fake
def _(grad, value, kernel_size):
    return value.new_empty((*value.shape[:4], kernel_size * kernel_size),
                           dtype=torch.promote_types(grad.dtype, value.dtype))


@_grad_value_op.register_fake
def _(grad, attn, kernel_size):
    return grad.new_empty(grad.shape, dtype=torch.promote_types(grad.dtype, attn.dtype))


def _setup(ctx, inputs: Tuple, output: torch.Tensor) -> None:
    first, second, kernel_size = inputs
    ctx.save_for_backward(first, second)  # the op's inputs only; dense matrices are rebuilt in the backward
    ctx.kernel_size = kernel_size
    ctx.dtypes = (first.dtype, second.dtype)


def _cast(grad, dtype):
    return None if grad is None else grad.to(dtype)


def _av_backward(ctx, grad_out):
    attn, value = ctx.saved_tensors
    k = ctx.kernel_size
    ga = _grad_attn_op(grad_out, value, k) if ctx.needs_input_grad[0] else None
    gv = _grad_value_op(grad_out, attn, k) if ctx.needs_input_grad[1] else None
    return _cast(ga, ctx.dtypes[0]), _cast(gv, ctx.dtypes[1]), None


def _grad_attn_backward(ctx, upstream):
    # grad_attn(g, v)[p, n] = <g[p], v[nbr(p, n)]>: d/dg = na2d_av(upstream, v), d/dv = grad_value(g, upstream)
    grad, value = ctx.saved_tensors
    k = ctx.kernel_size
    gg = _na2d_av_op(upstream, value, k) if ctx.needs_input_grad[0] else None
    gv = _grad_value_op(grad, upstream, k) if ctx.needs_input_grad[1] else None
    return _cast(gg, ctx.dtypes[0]), _cast(gv, ctx.dtypes[1]), None


def _grad_value_backward(ctx, upstream):
    # sum_q u[q] . grad_value(g, a)[q] = sum_{p,n} a[p, n] <g[p], u[nbr(p, n)]>:
    # d/dg = na2d_av(a, u), d/da = grad_attn(g, u)
    grad, attn = ctx.saved_tensors
    k = ctx.kernel_size
    gg = _na2d_av_op(attn, upstream, k) if ctx.needs_input_grad[0] else None
    ga = _grad_attn_op(grad, upstream, k) if ctx.needs_input_grad[1] else None
    return _cast(gg, ctx.dtypes[0]), _cast(ga, ctx.dtypes[1]), None


_na2d_av_op.register_autograd(_av_backward, setup_context=_setup)
flops.register_na2d_av('na2d_av_torch')
_grad_attn_op.register_autograd(_grad_attn_backward, setup_context=_setup)
_grad_value_op.register_autograd(_grad_value_backward, setup_context=_setup)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Neighbourhood aggregation (inputs already validated by ``models.ops.na2d_av``).

    Args:
        attn: [B, G, H, W, K*K] weights.
        value: [B, G, H, W, C].
        kernel_size: odd K with K <= H, W.
    Returns:
        [B, G, H, W, C] in the promoted dtype of attn and value (half precision is accumulated in float32).
    """
    return _na2d_av_op(attn, value, kernel_size)
