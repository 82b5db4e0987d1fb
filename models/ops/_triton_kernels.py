"""Triton kernels of the ``na2d_av`` family (natten <= 0.17 semantics, dilation 1).

Notation: a (b, g) slice holds an H x W map; query (i, j) sees the K x K window whose first row is
``si(i) = clamp(i - K//2, 0, H - K)`` (first column ``sj(j)`` likewise) and neighbour ``n = ki*K + kj`` is
pixel ``(si(i) + ki, sj(j) + kj)``. Every kernel takes explicit element strides for every tensor, so
permuted or sliced views (ContMix's value is a channel-first view of its feature map, its logits a slice of
the last axis) are read in place without a copy.

Two tilings, both one program per tile of BLOCK_H x BLOCK_W pixels of one (b, g) slice:

- "window rows" (forward, grad w.r.t. attn/logits): a [queries, K*K] register tile holds the attention rows
  of the tile's queries (loaded coalesced along the window axis); the kernel loops over the C channels,
  gathering the matching [queries, K*K] value entries (consecutive window columns are consecutive pixels, so
  with a channel-first value they are consecutive addresses). The fused kernels add the relative position
  bias and take the softmax of the whole row in registers, so the softmaxed weights never reach memory.
- "inverse window" (grad w.r.t. value): each key pixel gathers from the queries whose windows contain it,
  a contiguous range ``[lo, hi]`` per axis (length K inside the map, up to 2K - 1 near the borders), with
  a [keys, C] accumulator. A gather, not an atomic scatter, so results are deterministic.

Accumulation is in float32 (float64 for float64 inputs; no ``tl.dot`` is used, so float64 works).
"""
import triton
import triton.language as tl


@triton.jit
def _window_start(pos, length, K: tl.constexpr):
    # natten <= 0.17: windows are centred, shifted inwards at the borders; never read padding.
    return tl.minimum(tl.maximum(pos - K // 2, 0), length - K)


@triton.jit
def _program_tile(G, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's batch and group (int64, for the base offsets) and the rows, columns and in-map mask of
    its BLOCK_H * BLOCK_W pixels. A 1-D grid (tiles of one (b, g) slice are consecutive programs, so they
    share that slice in L2; and no 65535 limit as on the second grid axis)."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    num_tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    pid = tl.program_id(0)
    bg = pid // num_tiles
    tile = pid % num_tiles
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    i = (tile // tiles_w) * BLOCK_H + offs // BLOCK_W
    j = (tile % tiles_w) * BLOCK_W + offs % BLOCK_W
    return (bg // G).to(tl.int64), (bg % G).to(tl.int64), i, j, (i < H) & (j < W)


@triton.jit
def _na2d_fwd_kernel(
        A, RPB, V, O, LSE,
        G, H, W, C,
        sa_b, sa_g, sa_h, sa_w, sa_n,
        sr_g, sr_h, sr_w,
        sv_b, sv_g, sv_h, sv_w, sv_c,
        so_b, so_g, so_h, so_w, so_c,
        sl_b, sl_g, sl_h, sl_w,
        K: tl.constexpr, KK_PAD: tl.constexpr, C_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
        FUSED: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """out = na2d_av(attn, value), or with FUSED: na2d_av(softmax(logits + bias(rpb)), value), lse stored."""
    b, g, i, j, qmask = _program_tile(G, H, W, BLOCK_H, BLOCK_W)
    si = _window_start(i, H, K)
    sj = _window_start(j, W, K)
    n = tl.arange(0, KK_PAD)
    ki = n // K
    kj = n % K
    mask = qmask[:, None] & (n < K * K)[None, :]

    a_ptrs = A + b * sa_b + g * sa_g + i[:, None] * sa_h + j[:, None] * sa_w + n[None, :] * sa_n
    a = tl.load(a_ptrs, mask=mask, other=0.).to(ACC_DTYPE)
    if FUSED:
        rh = si[:, None] + ki[None, :] - i[:, None] + (K - 1)
        rw = sj[:, None] + kj[None, :] - j[:, None] + (K - 1)
        bias = tl.load(RPB + g * sr_g + rh * sr_h + rw * sr_w, mask=mask, other=0.).to(ACC_DTYPE)
        x = tl.where(mask, a + bias, float('-inf'))
        m = tl.max(x, axis=1)
        m = tl.where(qmask, m, 0.)  # rows outside the map are all -inf; keep them finite
        p = tl.exp(x - m[:, None])
        denom = tl.sum(p, axis=1)
        denom = tl.where(qmask, denom, 1.)
        a = p / denom[:, None]
        lse = m + tl.log(denom)
        tl.store(LSE + b * sl_b + g * sl_g + i * sl_h + j * sl_w, lse, mask=qmask)

    v_ptrs = (V + b * sv_b + g * sv_g + (si[:, None] + ki[None, :]) * sv_h
              + (sj[:, None] + kj[None, :]) * sv_w)
    cols = tl.arange(0, C_PAD)
    acc = tl.zeros([BLOCK_H * BLOCK_W, C_PAD], dtype=ACC_DTYPE)
    for c in range(0, C):
        v = tl.load(v_ptrs + c * sv_c, mask=mask, other=0.).to(ACC_DTYPE)
        s = tl.sum(a * v, axis=1)
        acc += tl.where(cols[None, :] == c, s[:, None], 0.)
    o_ptrs = O + b * so_b + g * so_g + i[:, None] * so_h + j[:, None] * so_w + cols[None, :] * so_c
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=qmask[:, None] & (cols < C)[None, :])


@triton.jit
def _na2d_grad_attn_kernel(
        GO, V, A, RPB, LSE, GA,
        G, H, W, C,
        sg_b, sg_g, sg_h, sg_w, sg_c,
        sv_b, sv_g, sv_h, sv_w, sv_c,
        sa_b, sa_g, sa_h, sa_w, sa_n,
        sr_g, sr_h, sr_w,
        sl_b, sl_g, sl_h, sl_w,
        sga_b, sga_g, sga_h, sga_w, sga_n,
        K: tl.constexpr, KK_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
        FUSED: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """grad_attn[q, n] = <grad_out[q], value[nbr(q, n)]>; with FUSED the softmax backward on top of it:
    grad_logits = p * (grad_attn - sum_n p * grad_attn), p recomputed from logits, rpb and the saved lse."""
    b, g, i, j, qmask = _program_tile(G, H, W, BLOCK_H, BLOCK_W)
    si = _window_start(i, H, K)
    sj = _window_start(j, W, K)
    n = tl.arange(0, KK_PAD)
    ki = n // K
    kj = n % K
    mask = qmask[:, None] & (n < K * K)[None, :]

    go_ptrs = GO + b * sg_b + g * sg_g + i * sg_h + j * sg_w
    v_ptrs = (V + b * sv_b + g * sv_g + (si[:, None] + ki[None, :]) * sv_h
              + (sj[:, None] + kj[None, :]) * sv_w)
    dp = tl.zeros([BLOCK_H * BLOCK_W, KK_PAD], dtype=ACC_DTYPE)
    for c in range(0, C):
        go = tl.load(go_ptrs + c * sg_c, mask=qmask, other=0.).to(ACC_DTYPE)
        v = tl.load(v_ptrs + c * sv_c, mask=mask, other=0.).to(ACC_DTYPE)
        dp += go[:, None] * v
    if FUSED:
        x = tl.load(A + b * sa_b + g * sa_g + i[:, None] * sa_h + j[:, None] * sa_w + n[None, :] * sa_n,
                    mask=mask, other=0.).to(ACC_DTYPE)
        rh = si[:, None] + ki[None, :] - i[:, None] + (K - 1)
        rw = sj[:, None] + kj[None, :] - j[:, None] + (K - 1)
        x += tl.load(RPB + g * sr_g + rh * sr_h + rw * sr_w, mask=mask, other=0.).to(ACC_DTYPE)
        lse = tl.load(LSE + b * sl_b + g * sl_g + i * sl_h + j * sl_w, mask=qmask, other=0.).to(ACC_DTYPE)
        p = tl.where(mask, tl.exp(x - lse[:, None]), 0.)
        dot = tl.sum(p * dp, axis=1)
        dp = p * (dp - dot[:, None])
    ga_ptrs = GA + b * sga_b + g * sga_g + i[:, None] * sga_h + j[:, None] * sga_w + n[None, :] * sga_n
    tl.store(ga_ptrs, dp.to(GA.dtype.element_ty), mask=mask)


@triton.jit
def _inverse_range(pos, length, K: tl.constexpr):
    """First and last query whose window (along one axis) contains key position ``pos``."""
    # si(q) >= pos - K + 1 holds for every q when pos <= K - 1; beyond, si(q) = q - K//2 there.
    lo = tl.where(pos <= K - 1, 0, pos - K + 1 + K // 2)
    # si(q) <= pos holds for every q when pos >= length - K; below, si(q) = q - K//2 there.
    hi = tl.where(pos >= length - K, length - 1, pos + K // 2)
    return lo, hi


@triton.jit
def _na2d_grad_value_kernel(
        GO, A, RPB, LSE, GV,
        G, H, W, C,
        sg_b, sg_g, sg_h, sg_w, sg_c,
        sa_b, sa_g, sa_h, sa_w, sa_n,
        sr_g, sr_h, sr_w,
        sl_b, sl_g, sl_h, sl_w,
        sgv_b, sgv_g, sgv_h, sgv_w, sgv_c,
        K: tl.constexpr, C_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
        FUSED: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """grad_value[k] = sum over queries q whose window holds key k of attn[q, n(q, k)] * grad_out[q].

    With FUSED, attn[q, n] = exp(logits[q, n] + bias - lse[q]) is recomputed on the fly.
    """
    b, g, y, x, kmask = _program_tile(G, H, W, BLOCK_H, BLOCK_W)
    lo_h, hi_h = _inverse_range(y, H, K)
    lo_w, hi_w = _inverse_range(x, W, K)
    # Loop bounds are the largest ranges in the tile (K everywhere but near the borders); masks do the rest.
    num_h = tl.max(tl.where(kmask, hi_h - lo_h + 1, 0), axis=0)
    num_w = tl.max(tl.where(kmask, hi_w - lo_w + 1, 0), axis=0)

    cols = tl.arange(0, C_PAD)
    cmask = cols < C
    go_base = GO + b * sg_b + g * sg_g + cols[None, :] * sg_c
    lse_base = LSE + b * sl_b + g * sl_g
    acc = tl.zeros([BLOCK_H * BLOCK_W, C_PAD], dtype=ACC_DTYPE)
    for dh in range(0, num_h):
        # Everything that depends on the query row only is hoisted out of the inner loop.
        qi = lo_h + dh
        mask_h = kmask & (qi <= hi_h)
        ni = y - _window_start(qi, H, K)  # window row of key k in query q's window
        a_row = A + b * sa_b + g * sa_g + qi * sa_h + (ni * K + x) * sa_n
        go_row = go_base + qi[:, None] * sg_h
        if FUSED:
            rpb_row = RPB + g * sr_g + (y - qi + K - 1) * sr_h + (x + K - 1) * sr_w
            lse_row = lse_base + qi * sl_h
        for dw in range(0, num_w):
            qj = lo_w + dw
            m = mask_h & (qj <= hi_w)
            # window column of key k in query q's window: x - sj(qj) (x is folded into a_row)
            a = tl.load(a_row + qj * sa_w - _window_start(qj, W, K) * sa_n, mask=m, other=0.).to(ACC_DTYPE)
            if FUSED:
                a += tl.load(rpb_row - qj * sr_w, mask=m, other=0.).to(ACC_DTYPE)
                a = tl.where(m, tl.exp(a - tl.load(lse_row + qj * sl_w, mask=m, other=0.).to(ACC_DTYPE)), 0.)
            go = tl.load(go_row + qj[:, None] * sg_w, mask=m[:, None] & cmask[None, :], other=0.).to(ACC_DTYPE)
            acc += a[:, None] * go
    gv_ptrs = GV + b * sgv_b + g * sgv_g + y[:, None] * sgv_h + x[:, None] * sgv_w + cols[None, :] * sgv_c
    tl.store(gv_ptrs, acc.to(GV.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])
