"""Triton kernels of the ``na2d_av`` family (natten <= 0.17 semantics, dilation 1).

Notation: a (b, g) slice holds an H x W map; query (i, j) sees the K x K window whose first row is
``si(i) = clamp(i - K//2, 0, H - K)`` (first column ``sj(j)`` likewise) and neighbour ``n = ki*K + kj`` is
pixel ``(si(i) + ki, sj(j) + kj)``. Every kernel takes explicit element strides for every tensor, so
permuted or sliced views (ContMix's value is a view of its [B, C, H, W] map, channel-first or channel-last,
its logits a slice of the last axis) are read in place without a copy.

One tiling for all three kernels: a program takes BLOCK_Q consecutive pixels (forward: pixel pairs) of the
flattened [B, G, H, W] grid, one per thread, its C channels in at most 4 chunks of VEC (a 16-byte vector load
each when the channels are contiguous and provably aligned; otherwise channel by channel, ``SPLIT``), so
per-pixel work is done once per pixel and no lane idles at a map's edge.

- forward: two horizontally adjacent queries per thread (their windows share K of K + 1 columns, so a value
  row is read once for both), a loop over the window rows with the columns unrolled; the fused forward
  makes a max pass over logits + bias, then the sum pass.
- grad w.r.t. attn/logits: a loop over the K*K window positions; each step reads one weight and one value
  row per query (fused: p recomputed from the saved log-sum-exp, D = <grad_out, out>).
- grad w.r.t. value ("inverse window"): each key pixel gathers from the queries whose windows contain it,
  a contiguous range ``[lo, hi]`` per axis (length K inside the map, up to 2K - 1 near the borders); the
  loops run over the map's largest range with out-of-range queries clamped and weighted by zero. A gather,
  not an atomic scatter, so results are deterministic.

Accumulation is in float32 (float64 for float64 inputs; no ``tl.dot`` is used, so float64 works).
"""
import triton
import triton.language as tl


@triton.jit
def _window_start(pos, length, K: tl.constexpr):
    # natten <= 0.17: windows are centred, shifted inwards at the borders; never read padding.
    return tl.minimum(tl.maximum(pos - K // 2, 0), length - K)


@triton.jit
def _query_block(N, G, H, W, BLOCK_Q: tl.constexpr):
    """BLOCK_Q consecutive queries of the flattened [B, G, H, W] grid: batch and group (int64, for the base
    offsets), row, column and whether the query exists. Queries past the end repeat the last one, so all
    their loads are in bounds without masks; only their stores are masked. Consecutive queries are neighbours
    in a row: their windows overlap and share cache lines. No query of a tile idles at a map's edge."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < N
    q = tl.minimum(q, N - 1)
    j = q % W
    i = (q // W) % H
    bg = q // (W * H)
    return (bg // G).to(tl.int64), (bg % G).to(tl.int64), i, j, qmask


@triton.jit
def _add(a, b):
    return a + b


# The kernels call only builtins and functions of this file (no ``tl.zeros``/``tl.sum``, which are jit
# functions of triton's library, built in the mode triton was imported in), so a copy of this module can be
# built for Triton's interpreter after triton was imported for the GPU, or the other way round (see
# ``triton_backend._kernels``). Row sums reduce with triton's own sum combine function wherever it can be
# called (the interpreter recognises it and sums with numpy), else with ``_add``.
_SUM_COMBINE = (tl.standard._sum_combine if triton.knobs.runtime.interpret
                or isinstance(tl.standard._sum_combine, triton.runtime.jit.JITFunction) else _add)


@triton.jit
def _row_sum(x):
    """Sum over the last axis of a 2-D tensor."""
    return tl.reduce(x, 1, _SUM_COMBINE)


@triton.jit
def _col(base, c: tl.constexpr, stride, C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Channel c of the rows at ``base`` [Q]; zero past C."""
    if c < C:
        return tl.load(base + c * stride).to(ACC_DTYPE)
    return tl.full(base.shape, 0, ACC_DTYPE)


# [Q, 2, ..., 2] stacks of channels c + step * (binary index), built from 1-D loads by tl.join (which adds an
# innermost axis held by the same thread), so the row stays with its thread.
@triton.jit
def _cols2(base, c: tl.constexpr, step: tl.constexpr, stride, C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    return tl.join(_col(base, c, stride, C, ACC_DTYPE), _col(base, c + step, stride, C, ACC_DTYPE))


@triton.jit
def _cols4(base, c: tl.constexpr, step: tl.constexpr, stride, C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    return tl.join(_cols2(base, c, 2 * step, stride, C, ACC_DTYPE),
                   _cols2(base, c + step, 2 * step, stride, C, ACC_DTYPE))


@triton.jit
def _cols8(base, c: tl.constexpr, step: tl.constexpr, stride, C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    return tl.join(_cols4(base, c, 2 * step, stride, C, ACC_DTYPE),
                   _cols4(base, c + step, 2 * step, stride, C, ACC_DTYPE))


@triton.jit
def _cols16(base, c: tl.constexpr, step: tl.constexpr, stride, C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    return tl.join(_cols8(base, c, 2 * step, stride, C, ACC_DTYPE),
                   _cols8(base, c + step, 2 * step, stride, C, ACC_DTYPE))


@triton.jit
def _split_chunk(base, k: tl.constexpr, stride, C: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``_chunk`` as VEC scalar loads per row: for rows whose alignment the compiler cannot prove (e.g. 14
    channels per group). A 2-D load would then be laid out with a row's channels across lanes, and every
    use of a per-query weight would be a layout conversion through shared memory (a barrier per step)."""
    c = k * VEC
    if VEC == 1:
        x = _col(base, c, stride, C, ACC_DTYPE)
    elif VEC == 2:
        x = _cols2(base, c, 1, stride, C, ACC_DTYPE)
    elif VEC == 4:
        x = _cols4(base, c, 1, stride, C, ACC_DTYPE)
    elif VEC == 8:
        x = _cols8(base, c, 1, stride, C, ACC_DTYPE)
    else:
        tl.static_assert(VEC == 16, 'VEC must be a power of two <= 16')
        x = _cols16(base, c, 1, stride, C, ACC_DTYPE)
    return tl.reshape(x, [x.shape[0], VEC])


@triton.jit
def _chunk(base, k: tl.constexpr, stride, C: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
           SPLIT: tl.constexpr = False):
    """Columns [k*VEC, (k+1)*VEC) of the rows starting at ``base`` [Q] (pointers), as [Q, VEC]; zero past C.

    Channels are split into at most 4 chunks of VEC, each its own [Q, VEC] tensor: Triton then gives every
    thread whole query rows (one vector load per chunk, e.g. 16 bytes), so per-query work (weights,
    softmax) runs once per query instead of once per lane of a row split across lanes. ``SPLIT``: rows not
    known to be aligned for a vector load, read with ``_split_chunk``.
    """
    if SPLIT:
        return _split_chunk(base, k, stride, C, VEC, ACC_DTYPE)
    cols = k * VEC + tl.arange(0, VEC)
    ptrs = base[:, None] + cols[None, :] * stride
    if (k + 1) * VEC <= C:  # the whole chunk is inside the row: no mask
        return tl.load(ptrs).to(ACC_DTYPE)
    return tl.load(ptrs, mask=(cols < C)[None, :], other=0.).to(ACC_DTYPE)


@triton.jit
def _split_store_chunk(base, k: tl.constexpr, stride, x, qmask, C: tl.constexpr, VEC: tl.constexpr):
    """The store of ``_split_chunk``: channel by channel, each column of ``x`` (whose rows stay with their
    threads) picked out inside the thread."""
    cols = tl.arange(0, VEC)
    for t in tl.static_range(VEC):
        if k * VEC + t < C:
            col = _row_sum(tl.where(cols[None, :] == t, x, 0.))
            tl.store(base + (k * VEC + t) * stride, col.to(base.dtype.element_ty), mask=qmask)


@triton.jit
def _store_chunk(base, k: tl.constexpr, stride, x, qmask, C: tl.constexpr, VEC: tl.constexpr,
                 SPLIT: tl.constexpr = False):
    if SPLIT:
        _split_store_chunk(base, k, stride, x, qmask, C, VEC)
        return
    cols = k * VEC + tl.arange(0, VEC)
    tl.store(base[:, None] + cols[None, :] * stride, x.to(base.dtype.element_ty),
             mask=qmask[:, None] & (cols < C)[None, :])


@triton.jit
def _accumulate(acc0, acc1, acc2, acc3, a, base, stride, C: tl.constexpr, VEC: tl.constexpr, NCH: tl.constexpr,
                ACC_DTYPE: tl.constexpr, SPLIT: tl.constexpr):
    """acc_k += a * chunk k of the rows at ``base``, for the NCH chunks in use (a: [Q] weights)."""
    acc0 += a[:, None] * _chunk(base, 0, stride, C, VEC, ACC_DTYPE, SPLIT)
    if NCH > 1:
        acc1 += a[:, None] * _chunk(base, 1, stride, C, VEC, ACC_DTYPE, SPLIT)
    if NCH > 2:
        acc2 += a[:, None] * _chunk(base, 2, stride, C, VEC, ACC_DTYPE, SPLIT)
        acc3 += a[:, None] * _chunk(base, 3, stride, C, VEC, ACC_DTYPE, SPLIT)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_chunks(base, stride, acc0, acc1, acc2, acc3, qmask, C: tl.constexpr, VEC: tl.constexpr,
                  NCH: tl.constexpr, SPLIT: tl.constexpr):
    """Store the NCH chunks in use at the rows starting at ``base``."""
    _store_chunk(base, 0, stride, acc0, qmask, C, VEC, SPLIT)
    if NCH > 1:
        _store_chunk(base, 1, stride, acc1, qmask, C, VEC, SPLIT)
    if NCH > 2:
        _store_chunk(base, 2, stride, acc2, qmask, C, VEC, SPLIT)
        _store_chunk(base, 3, stride, acc3, qmask, C, VEC, SPLIT)


@triton.jit
def _pairs(base, k: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr, SPLIT: tl.constexpr = False):
    """bfloat16 channels [2*k*VEC, 2*(k+1)*VEC) of the rows at ``base`` [Q] (contiguous channels, pairs 4-byte
    aligned), read as VEC 32-bit words and widened to float32 by bit operations: (even, odd) channels, each
    [Q, VEC]; zero past C. One instruction per element (a shift or a mask), where a bf16 load converted with
    ``.to`` costs two for every odd channel."""
    if SPLIT:  # words one by one (see ``_split_chunk``); a 32-bit load needs only 4-byte alignment
        x = _split_chunk(base.to(tl.pointer_type(tl.int32)), k, 1, C // 2, VEC, tl.int32)
        return (x << 16).to(tl.float32, bitcast=True), (x & -65536).to(tl.float32, bitcast=True)
    cols = k * VEC + tl.arange(0, VEC)
    ptrs = base.to(tl.pointer_type(tl.int32))[:, None] + cols[None, :]
    if (k + 1) * 2 * VEC <= C:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(cols < C // 2)[None, :], other=0)
    return (x << 16).to(tl.float32, bitcast=True), (x & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _store_pairs(base, k: tl.constexpr, stride, even, odd, qmask, C: tl.constexpr, VEC: tl.constexpr,
                 SPLIT: tl.constexpr = False):
    # interleaved back into channel order: one contiguous chunk of 2 * VEC channels
    _store_chunk(base, k, stride, tl.reshape(tl.join(even, odd), [even.shape[0], 2 * VEC]), qmask, C, 2 * VEC,
                 SPLIT)


@triton.jit
def _weight(a_ptr, r_ptr, m, ok, FUSED: tl.constexpr, ACC_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """One window position's weight for a query: attn, or with FUSED exp2((logit + bias) * log2(e) - m) (m in
    log2 units); with MASKED zero where ``ok`` is false (nothing is read there)."""
    if MASKED:
        a = tl.load(a_ptr, mask=ok, other=0.).to(ACC_DTYPE)
    else:
        a = tl.load(a_ptr).to(ACC_DTYPE)
    if FUSED:
        if MASKED:
            a = tl.where(ok, tl.exp2((a + tl.load(r_ptr, mask=ok, other=0.).to(ACC_DTYPE)) * 1.4426950408889634 - m),
                         0.)
        else:
            a = tl.exp2((a + tl.load(r_ptr).to(ACC_DTYPE)) * 1.4426950408889634 - m)
    return a


@triton.jit
def _window_max(a_row, r_row, sa_n, sr_h, sr_w, K: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """max over the window of logits + bias, in log2 units (``a_row``/``r_row``: position (0, 0))."""
    m = tl.full(a_row.shape, float('-inf'), ACC_DTYPE)
    for ki in range(0, K):  # a row's positions unrolled: constant offsets, no division for (ki, kj)
        a_k = a_row + ki * K * sa_n
        r_k = r_row + ki * sr_h
        for kj in tl.static_range(K):
            m = tl.maximum(m, tl.load(a_k + kj * sa_n).to(ACC_DTYPE) + tl.load(r_k + kj * sr_w).to(ACC_DTYPE))
    return m * 1.4426950408889634


@triton.jit
def _add_weighted(acc, bcc, wa, wb, x, ok_b, USE_A: tl.constexpr, GUARD_B: tl.constexpr):
    if USE_A:
        acc += wa[:, None] * x
    if GUARD_B:  # x may lie outside b's window: leave it out there (adding 0 * x would turn an inf into NaN)
        bcc = tl.where(ok_b[:, None], bcc + wb[:, None] * x, bcc)
    else:
        bcc += wb[:, None] * x
    return acc, bcc


@triton.jit
def _accumulate2(a0, a1, a2, a3, b0, b1, b2, b3, wa, wb, v, sv_c, ok_b, C: tl.constexpr, VEC: tl.constexpr,
                 NCH: tl.constexpr, ACC_DTYPE: tl.constexpr, PAIRS: tl.constexpr, SPLIT: tl.constexpr,
                 USE_A: tl.constexpr, GUARD_B: tl.constexpr):
    """A value row read (and widened) once, added to two queries' accumulators: ``a*`` with weight ``wa``
    (unless not USE_A), ``b*`` with ``wb`` (with GUARD_B only where ``ok_b``). With PAIRS (bf16 read as
    channel pairs) a0/a1 hold the even/odd channels of chunk 0 and a2/a3 those of chunk 1; otherwise a_k
    holds chunk k."""
    if PAIRS:
        even, odd = _pairs(v, 0, C, VEC, SPLIT)
        a0, b0 = _add_weighted(a0, b0, wa, wb, even, ok_b, USE_A, GUARD_B)
        a1, b1 = _add_weighted(a1, b1, wa, wb, odd, ok_b, USE_A, GUARD_B)
        if NCH > 1:
            even, odd = _pairs(v, 1, C, VEC, SPLIT)
            a2, b2 = _add_weighted(a2, b2, wa, wb, even, ok_b, USE_A, GUARD_B)
            a3, b3 = _add_weighted(a3, b3, wa, wb, odd, ok_b, USE_A, GUARD_B)
    else:
        a0, b0 = _add_weighted(a0, b0, wa, wb, _chunk(v, 0, sv_c, C, VEC, ACC_DTYPE, SPLIT), ok_b, USE_A, GUARD_B)
        if NCH > 1:
            a1, b1 = _add_weighted(a1, b1, wa, wb, _chunk(v, 1, sv_c, C, VEC, ACC_DTYPE, SPLIT), ok_b, USE_A, GUARD_B)
        if NCH > 2:
            a2, b2 = _add_weighted(a2, b2, wa, wb, _chunk(v, 2, sv_c, C, VEC, ACC_DTYPE, SPLIT), ok_b, USE_A, GUARD_B)
            a3, b3 = _add_weighted(a3, b3, wa, wb, _chunk(v, 3, sv_c, C, VEC, ACC_DTYPE, SPLIT), ok_b, USE_A, GUARD_B)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _store_out(o_row, so_c, acc0, acc1, acc2, acc3, mask, C: tl.constexpr, VEC: tl.constexpr, NCH: tl.constexpr,
               PAIRS: tl.constexpr, SPLIT: tl.constexpr):
    if PAIRS:
        _store_pairs(o_row, 0, so_c, acc0, acc1, mask, C, VEC, SPLIT)
        if NCH > 1:
            _store_pairs(o_row, 1, so_c, acc2, acc3, mask, C, VEC, SPLIT)
    else:
        _store_chunks(o_row, so_c, acc0, acc1, acc2, acc3, mask, C, VEC, NCH, SPLIT)


@triton.jit
def _na2d_fwd_kernel(
        A, RPB, V, O, LSE,
        N, G, H, W, WP,
        sa_b, sa_g, sa_h, sa_w, sa_n,
        sr_g, sr_h, sr_w,
        sv_b, sv_g, sv_h, sv_w, sv_c,
        so_b, so_g, so_h, so_w, so_c,
        sl_b, sl_g, sl_h, sl_w,
        K: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr, NCH: tl.constexpr, BLOCK_Q: tl.constexpr,
        FUSED: tl.constexpr, ACC_DTYPE: tl.constexpr, PAIRS: tl.constexpr, SPLIT: tl.constexpr = False,
):
    """out = na2d_av(attn, value), or with FUSED: na2d_av(softmax(logits + bias(rpb)), value), lse stored.

    Each thread takes two horizontally adjacent queries, a = (i, 2p) and b = (i, 2p + 1) (N = B*G*H*WP pairs,
    WP = ceil(W / 2); at an odd W the last b is a copy of a and not stored). Their windows share the rows and
    K of their K + 1 columns (b's starts d = 0 or 1 columns after a's), so each value row is read and widened
    once for both: per window row K + 1 value reads for 2K weighted sums. The loop runs over the window rows,
    the K + 1 columns unrolled: every weight and value pointer is at a constant offset from its row's.

    With FUSED a first loop finds each query's maximum (logits and bias only), the second accumulates
    exp2(x - max) * value and the sum of the weights: no [queries, K*K] tile, no reduction across threads, no
    rescaling of the accumulator. Channels as in the other kernels: NCH chunks of VEC per thread.
    """
    b, g, i, jp, amask = _query_block(N, G, H, WP, BLOCK_Q)
    ja = 2 * jp
    jb = tl.minimum(ja + 1, W - 1)
    bmask = amask & (ja + 1 < W)
    si = _window_start(i, H, K)
    sja = _window_start(ja, W, K)
    d = _window_start(jb, W, K) - sja  # b's window starts d columns after a's
    # b's weights and bias are addressed by the shared column t = d + (b's window column)
    aa_row = A + b * sa_b + g * sa_g + i * sa_h + ja * sa_w
    ab_row = A + b * sa_b + g * sa_g + i * sa_h + jb * sa_w - d * sa_n
    v_row = V + b * sv_b + g * sv_g + si * sv_h + sja * sv_w
    # column offsets t * sv_w in 64 bits: ptxas keeps them out of the loop. tl.cast, not .to: a launch passes
    # a W-stride of 1 (channel-first value, or C = 1) as a constant, a plain int
    sv_w = tl.cast(sv_w, tl.int64)
    a0 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    a1 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    a2 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    a3 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    b0 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    b1 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    b2 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    b3 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    ma = tl.full([BLOCK_Q], 0., ACC_DTYPE)
    mb = tl.full([BLOCK_Q], 0., ACC_DTYPE)
    la = tl.full([BLOCK_Q], 0., ACC_DTYPE)
    lb = tl.full([BLOCK_Q], 0., ACC_DTYPE)
    ra_row = RPB
    rb_row = RPB
    if FUSED:
        ra_row = RPB + g * sr_g + (si - i + K - 1) * sr_h + (sja - ja + K - 1) * sr_w
        rb_row = RPB + g * sr_g + (si - i + K - 1) * sr_h + (sja - jb + K - 1) * sr_w
        ma = _window_max(aa_row, ra_row, sa_n, sr_h, sr_w, K, ACC_DTYPE)
        mb = _window_max(ab_row + d * sa_n, rb_row + d * sr_w, sa_n, sr_h, sr_w, K, ACC_DTYPE)
    first = d == 0  # b uses shared column 0 (d = 0) or column K (d = 1)
    last = d != 0
    for ki in range(0, K):
        aa_k = aa_row + ki * K * sa_n
        ab_k = ab_row + ki * K * sa_n
        ra_k = ra_row + ki * sr_h
        rb_k = rb_row + ki * sr_h
        v_k = v_row + ki * sv_h
        for t in tl.static_range(K + 1):
            if t < K:
                wa = _weight(aa_k + t * sa_n, ra_k + t * sr_w, ma, amask, FUSED, ACC_DTYPE, False)
                la += wa
            else:
                wa = la  # not used
            ok_b = amask  # b's window holds shared column t (0 < t < K always; 0 and K as d says)
            if t == 0:
                ok_b = first
                wb = _weight(ab_k, rb_k, mb, ok_b, FUSED, ACC_DTYPE, True)
            elif t == K:
                ok_b = last
                wb = _weight(ab_k + K * sa_n, rb_k + K * sr_w, mb, ok_b, FUSED, ACC_DTYPE, True)
            else:
                wb = _weight(ab_k + t * sa_n, rb_k + t * sr_w, mb, ok_b, FUSED, ACC_DTYPE, False)
            lb += wb
            if t < K:
                v = v_k + t * sv_w
            else:  # column K exists only when d = 1; otherwise re-read column K - 1 (and leave it out)
                v = v_k + (K - 1 + d) * sv_w
            a0, a1, a2, a3, b0, b1, b2, b3 = _accumulate2(a0, a1, a2, a3, b0, b1, b2, b3, wa, wb, v, sv_c, ok_b, C,
                                                          VEC, NCH, ACC_DTYPE, PAIRS, SPLIT, t < K, t == 0)
    if FUSED:
        inv = 1. / la
        a0 *= inv[:, None]
        a1 *= inv[:, None]
        a2 *= inv[:, None]
        a3 *= inv[:, None]
        inv = 1. / lb
        b0 *= inv[:, None]
        b1 *= inv[:, None]
        b2 *= inv[:, None]
        b3 *= inv[:, None]
        l_row = LSE + b * sl_b + g * sl_g + i * sl_h
        tl.store(l_row + ja * sl_w, (ma + tl.log2(la)) * 0.6931471805599453, mask=amask)
        tl.store(l_row + jb * sl_w, (mb + tl.log2(lb)) * 0.6931471805599453, mask=bmask)
    o_row = O + b * so_b + g * so_g + i * so_h
    _store_out(o_row + ja * so_w, so_c, a0, a1, a2, a3, amask, C, VEC, NCH, PAIRS, SPLIT)
    _store_out(o_row + jb * so_w, so_c, b0, b1, b2, b3, bmask, C, VEC, NCH, PAIRS, SPLIT)


@triton.jit
def _dot_chunks(go0, go1, go2, go3, base, stride, C: tl.constexpr, VEC: tl.constexpr, NCH: tl.constexpr,
                ACC_DTYPE: tl.constexpr, SPLIT: tl.constexpr):
    """Per query, <its grad_out row (chunks go0..go3), the row at ``base``>, summed inside each thread."""
    dot = _row_sum(go0 * _chunk(base, 0, stride, C, VEC, ACC_DTYPE, SPLIT))
    if NCH > 1:
        dot += _row_sum(go1 * _chunk(base, 1, stride, C, VEC, ACC_DTYPE, SPLIT))
    if NCH > 2:
        dot += _row_sum(go2 * _chunk(base, 2, stride, C, VEC, ACC_DTYPE, SPLIT))
        dot += _row_sum(go3 * _chunk(base, 3, stride, C, VEC, ACC_DTYPE, SPLIT))
    return dot


@triton.jit
def _na2d_grad_attn_kernel(
        GO, V, A, RPB, LSE, O, GA,
        N, G, H, W,
        sg_b, sg_g, sg_h, sg_w, sg_c,
        sv_b, sv_g, sv_h, sv_w, sv_c,
        sa_b, sa_g, sa_h, sa_w, sa_n,
        sr_g, sr_h, sr_w,
        sl_b, sl_g, sl_h, sl_w,
        so_b, so_g, so_h, so_w, so_c,
        sga_b, sga_g, sga_h, sga_w, sga_n,
        K: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr, NCH: tl.constexpr, BLOCK_Q: tl.constexpr,
        FUSED: tl.constexpr, ACC_DTYPE: tl.constexpr, SPLIT: tl.constexpr = False,
):
    """grad_attn[q, n] = <grad_out[q], value[nbr(q, n)]>; with FUSED the softmax backward on top of it:
    grad_logits = p * (grad_attn - D) with D = sum_n p * grad_attn = <grad_out[q], out[q]> (the forward's
    output) and p recomputed from logits, rpb and the saved lse.

    Tiled like the forward: grad_out rows of BLOCK_Q queries in registers, a loop over the K*K window
    positions reading one value row per query and writing one gradient per query; the channel sum stays
    inside each thread.
    """
    b, g, i, j, qmask = _query_block(N, G, H, W, BLOCK_Q)
    si = _window_start(i, H, K)
    sj = _window_start(j, W, K)
    go_row = GO + b * sg_b + g * sg_g + i * sg_h + j * sg_w
    go0 = _chunk(go_row, 0, sg_c, C, VEC, ACC_DTYPE, SPLIT)
    go1 = _chunk(go_row, 1, sg_c, C, VEC, ACC_DTYPE, SPLIT) if NCH > 1 else go0
    go2 = _chunk(go_row, 2, sg_c, C, VEC, ACC_DTYPE, SPLIT) if NCH > 2 else go0
    go3 = _chunk(go_row, 3, sg_c, C, VEC, ACC_DTYPE, SPLIT) if NCH > 2 else go0
    v_row = V + b * sv_b + g * sv_g + si * sv_h + sj * sv_w
    ga_row = GA + b * sga_b + g * sga_g + i * sga_h + j * sga_w
    if FUSED:
        o_row = O + b * so_b + g * so_g + i * so_h + j * so_w
        d = _dot_chunks(go0, go1, go2, go3, o_row, so_c, C, VEC, NCH, ACC_DTYPE, SPLIT)
        lse2 = tl.load(LSE + b * sl_b + g * sl_g + i * sl_h + j * sl_w).to(ACC_DTYPE) * 1.4426950408889634
        a_row = A + b * sa_b + g * sa_g + i * sa_h + j * sa_w
        r_row = RPB + g * sr_g + (si - i + K - 1) * sr_h + (sj - j + K - 1) * sr_w
    for n in range(0, K * K):
        ki = n // K
        kj = n - ki * K
        v = v_row + (ki * sv_h + kj * sv_w)
        dp = _dot_chunks(go0, go1, go2, go3, v, sv_c, C, VEC, NCH, ACC_DTYPE, SPLIT)
        if FUSED:
            x = tl.load(a_row + n * sa_n).to(ACC_DTYPE) + tl.load(r_row + ki * sr_h + kj * sr_w).to(ACC_DTYPE)
            dp = tl.exp2(x * 1.4426950408889634 - lse2) * (dp - d)
        tl.store(ga_row + n * sga_n, dp.to(GA.dtype.element_ty), mask=qmask)


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
        N, G, H, W, NH, NW, NBG, NBLK,
        sg_b, sg_g, sg_h, sg_w, sg_c,
        sa_b, sa_g, sa_h, sa_w, sa_n,
        sr_g, sr_h, sr_w,
        sl_b, sl_g, sl_h, sl_w,
        sgv_b, sgv_g, sgv_h, sgv_w, sgv_c,
        K: tl.constexpr, C: tl.constexpr, VEC: tl.constexpr, NCH: tl.constexpr, BLOCK_Q: tl.constexpr,
        FUSED: tl.constexpr, ACC_DTYPE: tl.constexpr, BY_PIXEL: tl.constexpr = False,
        SPLIT: tl.constexpr = False,
):
    """grad_value[k] = sum over queries q whose window holds key k of attn[q, n(q, k)] * grad_out[q].

    With FUSED, attn[q, n] = exp(logits[q, n] + bias - lse[q]) is recomputed on the fly. BLOCK_Q keys of the
    flattened [B, G, H, W] grid, one key row per thread (channels in NCH chunks of VEC, like the forward);
    the loops run over the NH x NW queries of the largest inverse window of the map (NH = K inside the map,
    more near the borders); a query outside a key's range is clamped to a valid one and weighted by zero,
    so no load needs a mask.

    With BY_PIXEL the keys of a program are instead BLOCK_Q of the NBG (batch, group) slices at one pixel
    (NBLK programs per pixel): the key's inverse window is then the same for the whole program, so the loops
    run over exactly the queries that reach it (K x K inside the map, e.g. 25 instead of 49 on average for
    a 5 x 5 window on a 7 x 7 map) with scalar bounds and scalar index arithmetic, and no query is weighted
    by zero. The queries are visited in the same order either way, so both give the same bits.
    """
    if BY_PIXEL:
        pid = tl.program_id(0)
        pix = pid // NBLK
        bg = (pid - pix * NBLK) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        kmask = bg < NBG
        bg = tl.minimum(bg, NBG - 1)
        b = (bg // G).to(tl.int64)
        g = (bg % G).to(tl.int64)
        y = pix // W
        x = pix - y * W
    else:
        b, g, y, x, kmask = _query_block(N, G, H, W, BLOCK_Q)
    lo_h, hi_h = _inverse_range(y, H, K)
    lo_w, hi_w = _inverse_range(x, W, K)
    go_base = GO + b * sg_b + g * sg_g
    a_base = A + b * sa_b + g * sa_g + x * sa_n
    if FUSED:
        r_base = RPB + g * sr_g + (y + K - 1) * sr_h + (x + K - 1) * sr_w
        l_base = LSE + b * sl_b + g * sl_g
    acc0 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    acc1 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    acc2 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    acc3 = tl.full([BLOCK_Q, VEC], 0., ACC_DTYPE)
    if BY_PIXEL:
        for qi in range(lo_h, hi_h + 1):
            a_row = a_base + (qi * sa_h + (y - _window_start(qi, H, K)) * K * sa_n)
            go_row = go_base + qi * sg_h
            if FUSED:
                r_row = r_base - qi * sr_h
                l_row = l_base + qi * sl_h
            for qj in range(lo_w, hi_w + 1):
                a = tl.load(a_row + (qj * sa_w - _window_start(qj, W, K) * sa_n)).to(ACC_DTYPE)
                if FUSED:
                    a = tl.exp2((a + tl.load(r_row - qj * sr_w).to(ACC_DTYPE)
                                 - tl.load(l_row + qj * sl_w).to(ACC_DTYPE)) * 1.4426950408889634)
                go = go_row + qj * sg_w
                acc0, acc1, acc2, acc3 = _accumulate(acc0, acc1, acc2, acc3, a, go, sg_c, C, VEC, NCH, ACC_DTYPE, SPLIT)
    else:
        for dh in range(0, NH):
            # Everything that depends on the query row only is hoisted out of the inner loop.
            qi = lo_h + dh
            ok_h = qi <= hi_h
            qi = tl.minimum(qi, hi_h)
            a_row = a_base + qi * sa_h + (y - _window_start(qi, H, K)) * K * sa_n  # key's window row in q's window
            go_row = go_base + qi * sg_h
            if FUSED:
                r_row = r_base - qi * sr_h
                l_row = l_base + qi * sl_h
            for dw in range(0, NW):
                qj = lo_w + dw
                ok = ok_h & (qj <= hi_w)
                qj = tl.minimum(qj, hi_w)
                # window column of key k in query q's window: x - sj(qj) (x is folded into a_base)
                a = tl.load(a_row + qj * sa_w - _window_start(qj, W, K) * sa_n).to(ACC_DTYPE)
                if FUSED:
                    a = tl.exp2((a + tl.load(r_row - qj * sr_w).to(ACC_DTYPE)
                                 - tl.load(l_row + qj * sl_w).to(ACC_DTYPE)) * 1.4426950408889634)
                a = tl.where(ok, a, 0.)
                go = go_row + qj * sg_w
                acc0, acc1, acc2, acc3 = _accumulate(acc0, acc1, acc2, acc3, a, go, sg_c, C, VEC, NCH, ACC_DTYPE, SPLIT)
    gv_row = GV + b * sgv_b + g * sgv_g + y * sgv_h + x * sgv_w
    _store_chunks(gv_row, sgv_c, acc0, acc1, acc2, acc3, kmask, C, VEC, NCH, SPLIT)
