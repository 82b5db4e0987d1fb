"""Triton backend of na2d_av / na2d_softmax_av: values, gradients, dtypes, layouts, fake impls, compile.

On a machine with CUDA the kernels run compiled on the GPU. Without one they run on CPU tensors through
Triton's interpreter: Triton decides between the two when ``@triton.jit`` runs (it reads TRITON_INTERPRET
through ``triton.knobs.runtime.interpret`` at decoration), so the module fixture below does not rely on the
environment at import time; it swaps the backend's kernel table for interpreted copies of the same
functions (``triton_backend.use_interpreter``) and sets TRITON_INTERPRET=1 only so that the dispatcher
sends CPU tensors to the backend. Both are undone after this module.

References: natten 0.17's golden outputs (float64) and the brute-force loops of tests/reference.py.
"""
import dataclasses

import pytest
import torch

pytest.importorskip('triton')

from models.ops import dispatch, triton_backend as tb, triton_plans as plans  # noqa: E402
from tests.helpers import na2d_golden  # noqa: E402
from tests.reference import reference_na2d_av, reference_rpb, rel_err  # noqa: E402

GOLDEN = na2d_golden()

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'


def same_result(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two reduction orders or read paths of one computation agree: bit for bit under the interpreter (which
    runs them in the same order); within rounding when compiled, where ptxas may contract or reorder the
    arithmetic of two different kernels differently."""
    if not CUDA:
        return torch.equal(a, b)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(a.dtype, 1e-2)
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=tol, atol=tol * a.abs().max())


@pytest.fixture(scope='module', autouse=True)
def triton_kernels():
    """The compiled kernels on a GPU; otherwise the interpreter, its per-op int32 overflow checks off (at
    these shapes offsets cannot overflow, and the checks double the run time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(dispatch.ENV_VAR, raising=False)
        mp.setattr(dispatch, '_override', None)
        if CUDA:
            yield
            return
        from triton.runtime import interpreter
        mp.setenv('TRITON_INTERPRET', '1')
        builder = interpreter.interpreter_builder
        if hasattr(builder.options, 'sanitize_overflow'):
            mp.setattr(builder, 'options', dataclasses.replace(builder.options, sanitize_overflow=False))
        was = tb.INTERPRET
        tb.use_interpreter(True)
        try:
            yield
        finally:
            tb.use_interpreter(was)


def _dev(*tensors):
    return [t.to(DEVICE) for t in tensors]


def grads_of(fn, inputs, grad_out):
    """Output of fn(*inputs) and the gradients of <out, grad_out> w.r.t. the inputs. The leaves are detached
    views, so strided inputs reach fn with their strides."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), leaves)
    return out, grads


def ref_softmax_av(logits, rpb, value, k):
    """Float64 brute force on the CPU: softmax(logits + bias) aggregated over the window."""
    h, w = value.shape[2:4]
    attn = torch.softmax(logits.double() + _bias(rpb, h, w, k), -1)
    return reference_na2d_av(attn, value.double(), k)


def _bias(rpb, h, w, k):
    """reference_rpb's bias as a gather (differentiable w.r.t. rpb): reference_rpb numbers the cells."""
    index = reference_rpb(torch.arange(rpb[0].numel(), dtype=torch.float64).view(1, *rpb.shape[1:]), h, w, k)
    return rpb.double().flatten(1)[:, index.long().flatten()].view(rpb.shape[0], h, w, k * k)


def value_view(b, g, h, w, c, dtype, layout, half=1):
    """value as ContMix builds it: half of a [B, 2*G*C, H, W] map, channel-first (NCHW) or channel-last."""
    x = torch.randn(b, 2 * g * c, h, w, dtype=dtype, device=DEVICE)
    if layout == 'channel_last':
        x = x.to(memory_format=torch.channels_last)
    return x.reshape(b, 2, g, c, h, w).permute(1, 0, 2, 4, 5, 3)[half]


def fused_inputs(k, shape, dtype, layout='channel_first', offset=25):
    """logits a slice of a wider last axis starting ``offset`` entries in (ContMix's K-slice starts at s*s = 25,
    not 16-byte aligned), random rpb, value a view as ContMix passes it."""
    b, g, h, w, c = shape
    logits = torch.randn(b, g, h, w, offset + k * k, dtype=dtype, device=DEVICE)[..., offset:]
    rpb = torch.randn(g, 2 * k - 1, 2 * k - 1, dtype=dtype, device=DEVICE)
    return logits, rpb, value_view(b, g, h, w, c, dtype, layout)


def _check(names, got, ref, bound):
    for name, x, r in zip(names, got, ref):
        assert x.shape == r.shape, f'{name}: shape {tuple(x.shape)} != {tuple(r.shape)}'
        assert rel_err(x.cpu(), r.cpu()) < bound, f'{name}: rel err {rel_err(x.cpu(), r.cpu()):.2e}'


FUSED_NAMES = ('out', 'grad_logits', 'grad_rpb', 'grad_value')
PLAIN_NAMES = ('out', 'grad_attn', 'grad_value')


# ---------------------------------------------------------------------------------------------------------
# Values and gradients against references


@pytest.mark.slow
@pytest.mark.parametrize('case', range(len(GOLDEN)),
                         ids=lambda i: f'k{GOLDEN[i]["kernel_size"]}_' + 'x'.join(map(str, GOLDEN[i]['value'].shape)))
def test_golden_fp64(case):
    """natten 0.17's golden outputs and gradients (k = 5, 7, 13; non-square maps; maps exactly k wide)."""
    c = GOLDEN[case]
    k = c['kernel_size']
    out, grads = grads_of(lambda a, v: tb.na2d_av(a, v, k), _dev(c['attn'], c['value']), c['grad_out'].to(DEVICE))
    assert out.dtype == torch.float64
    _check(PLAIN_NAMES, (out, *grads), (c['out'], c['grad_attn'], c['grad_value']), 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize('case', [3, 5])  # k = 13 (the longest sums) and k = 7 with 12 channels
def test_golden_fp32(case):
    c = GOLDEN[case]
    k = c['kernel_size']
    out, grads = grads_of(lambda a, v: tb.na2d_av(a, v, k), _dev(c['attn'].float(), c['value'].float()),
                          c['grad_out'].float().to(DEVICE))
    assert out.dtype == grads[0].dtype == grads[1].dtype == torch.float32
    _check(PLAIN_NAMES, (out, *grads), (c['out'], c['grad_attn'], c['grad_value']), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('k,shape', [(3, (2, 1, 4, 6, 1)), (15, (1, 1, 15, 17, 5)), (5, (1, 2, 9, 7, 24))])
def test_unfused_matches_bruteforce(k, shape):
    """The smallest and the largest supported K, odd channel counts, B > 1, more than 16 channels."""
    attn = torch.randn(*shape[:4], k * k, dtype=torch.float64, device=DEVICE)
    value = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    got = grads_of(lambda a, v: tb.na2d_av(a, v, k), [attn, value], grad_out)
    ref = grads_of(lambda a, v: reference_na2d_av(a, v, k), [attn.cpu(), value.cpu()], grad_out.cpu())
    _check(PLAIN_NAMES, (got[0], *got[1]), (ref[0], *ref[1]), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['channel_first', 'channel_last'])
@pytest.mark.parametrize('k,shape', [(5, (2, 2, 6, 9, 3)), (7, (1, 2, 7, 11, 16))])
def test_fused_matches_reference(k, shape, layout):
    """Bias + softmax + aggregation: output and the gradients of logits, rpb and value; logits an unaligned
    slice, value a channel-first or channel-last view."""
    logits, rpb, value = fused_inputs(k, shape, torch.float64, layout)
    if layout == 'channel_last':
        assert value.stride(-1) == 1
    grad_out = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    got = grads_of(lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k), [logits, rpb, value], grad_out)
    ref = grads_of(lambda lg, r, v: ref_softmax_av(lg, r, v, k), [logits.cpu(), rpb.cpu(), value.cpu()],
                   grad_out.cpu())
    _check(FUSED_NAMES, (got[0], *got[1]), (ref[0], *ref[1]), 1e-12)


@pytest.mark.slow
def test_fused_matches_unfused():
    """The fused kernels agree with softmax + the unfused kernels (values and all three gradients)."""
    k, shape = 7, (2, 1, 8, 7, 6)
    logits, rpb, value = fused_inputs(k, shape, torch.float32)
    grad_out = torch.randn(shape, device=DEVICE)
    index = reference_rpb(torch.arange(rpb[0].numel(), dtype=torch.float64).view(1, *rpb.shape[1:]),
                          shape[2], shape[3], k).long().to(DEVICE)

    def unfused(lg, r, v):
        bias = r.flatten(1)[:, index.flatten()].view(r.shape[0], shape[2], shape[3], k * k)
        return tb.na2d_av(torch.softmax(lg + bias, -1), v, k)

    fused = grads_of(lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k), [logits, rpb, value], grad_out)
    plain = grads_of(unfused, [logits, rpb, value], grad_out)
    _check(FUSED_NAMES, (fused[0], *fused[1]), (plain[0], *plain[1]), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('fused', [False, True])
def test_gradcheck(fused):
    """Finite differences in float64 through every input (fast mode: one random direction)."""
    k, shape = 3, (1, 2, 3, 4, 2)
    logits, rpb, value = fused_inputs(k, shape, torch.float64, 'channel_last')
    if fused:
        fn, inputs = (lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k)), [logits, rpb, value]
    else:
        fn, inputs = (lambda a, v: tb.na2d_av(a, v, k)), [torch.softmax(logits, -1), value]
    leaves = [t.detach().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.slow
def test_multiple_blocks():
    """Small query blocks (many programs, a partial last block): as on the GPU, where a block is 128 queries."""
    k, shape = 5, (1, 1, 9, 10, 2)
    logits, rpb, value = fused_inputs(k, shape, torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plans, '_block_queries', lambda gpu=False: 16)  # 90 queries: 5 full blocks and one of 10
        assert tb.launch_config(9, 10, 2, k)['BLOCK_Q'] == 16
        got = grads_of(lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k), [logits, rpb, value], grad_out)
        attn = torch.softmax(logits, -1)
        got_plain = grads_of(lambda a, v: tb.na2d_av(a, v, k), [attn, value], grad_out)
    ref = grads_of(lambda lg, r, v: ref_softmax_av(lg, r, v, k), [logits.cpu(), rpb.cpu(), value.cpu()],
                   grad_out.cpu())
    _check(FUSED_NAMES, (got[0], *got[1]), (ref[0], *ref[1]), 1e-12)
    ref_plain = grads_of(lambda a, v: reference_na2d_av(a, v, k), [attn.cpu(), value.cpu()], grad_out.cpu())
    _check(PLAIN_NAMES, (got_plain[0], *got_plain[1]), (ref_plain[0], *ref_plain[1]), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('k, hw', [(5, (6, 6)), (3, (4, 6))])
def test_grad_value_key_orders(k, hw):
    """grad_value in spatial and in pixel key blocks (the loops of the latter run over exactly each pixel's
    inverse window, with scalar bounds): the same bits, and equal to the reference; small blocks so a pixel
    spans several programs, the last one partial (1 x 3 = 3 (batch, group) slices, blocks of 2)."""
    shape = (1, 3, *hw, 2)
    logits, rpb, value = fused_inputs(k, shape, torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    attn = torch.softmax(logits, -1)
    lse = tb._forward(logits, rpb, value, k)[1]  # what the fused backward reads
    got = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plans, '_block_queries', lambda gpu=False: 2)
        for by_pixel in (False, True):
            mp.setattr(plans, 'GRAD_VALUE_BY_PIXEL', by_pixel)
            launch, _ = tb.plan_grad_value(grad_out, logits, k, value, rpb=rpb, lse=lse)
            assert launch.constexprs['BY_PIXEL'] is by_pixel
            assert launch.programs == (hw[0] * hw[1] * 2 if by_pixel else -(-3 * hw[0] * hw[1] // 2))
            got[by_pixel] = (tb._grad_value(grad_out, logits, k, value, rpb=rpb, lse=lse),
                             tb._grad_value(grad_out, attn, k, value))
    assert same_result(got[True][0], got[False][0]) and same_result(got[True][1], got[False][1])
    ref = grads_of(lambda lg, r, v: ref_softmax_av(lg, r, v, k), [logits.cpu(), rpb.cpu(), value.cpu()],
                   grad_out.cpu())
    ref_plain = grads_of(lambda a, v: reference_na2d_av(a, v, k), [attn.cpu(), value.cpu()], grad_out.cpu())
    _check(('grad_value', 'grad_value'), got[True], (ref[1][2], ref_plain[1][1]), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('k, w', [(5, 5), (5, 6), (3, 7), (7, 8)])
def test_forward_column_pairs(k, w):
    """The forward takes two horizontally adjacent queries per thread, their windows d = 0 or 1 columns apart
    (0 at the borders): W = K (one window for the whole row), even and odd W (the last query of a row
    alone), fused and plain, against float64 brute force."""
    shape = b, g, h, w, c = (1, 2, k, w, 3)
    logits, rpb, value = fused_inputs(k, shape, torch.float64, 'channel_last')
    pairs = (w + 1) // 2
    assert tb.plan_forward(logits, rpb, value, k)[0].args[5:10] == (b * g * h * pairs, g, h, w, pairs)
    got, lse = tb._forward(logits, rpb, value, k)
    _check(('out',), (got,), (ref_softmax_av(logits.cpu(), rpb.cpu(), value.cpu(), k),), 1e-12)
    # every query's log-sum-exp, the second of a pair included (the backward recomputes the weights from it)
    ref_lse = torch.logsumexp(logits.double().cpu() + _bias(rpb.cpu(), h, w, k), -1)
    assert (lse.cpu() - ref_lse).abs().max() < 1e-12
    attn = torch.softmax(logits, -1)
    got = tb.na2d_av(attn, value, k)
    _check(('out',), (got,), (reference_na2d_av(attn.cpu(), value.cpu(), k),), 1e-12)


def test_forward_nonfinite_value_stays_in_its_windows():
    """An inf in value reaches exactly the queries whose windows hold it: the second query of a thread's pair
    leaves out the shared column outside its window rather than adding it times zero (0 * inf is NaN)."""
    k, shape = 3, (1, 1, 4, 6, 2)
    logits, rpb, value = fused_inputs(k, shape, torch.float64, 'channel_last')
    value[0, 0, 1, 1, 0] = float('inf')
    value[0, 0, 2, 4, 1] = float('-inf')
    attn = torch.softmax(logits, -1)
    fused = tb.na2d_softmax_av(logits, rpb, value, k), ref_softmax_av(logits.cpu(), rpb.cpu(), value.cpu(), k)
    plain = tb.na2d_av(attn, value, k), reference_na2d_av(attn.cpu(), value.cpu(), k)
    for got, ref in (fused, plain):
        finite = torch.isfinite(ref)
        assert 0 < finite.sum() < finite.numel()
        assert torch.equal(torch.isfinite(got.cpu()), finite)
        assert torch.allclose(got.cpu()[finite], ref[finite], rtol=1e-12, atol=0)


@pytest.mark.skipif(CUDA, reason='the interpreter runs where there is no GPU')
def test_interpreter_without_repeated_patching_gives_the_same_bits(monkeypatch):
    """models/ops/triton_interpreter.py: a forward and backward (kernels that call helpers in their loops) with
    the interpreter patching triton.language once per launch, and with its own patching at every helper call:
    the same bits; the first patches a few times per launch only."""
    from triton.runtime import interpreter

    from models.ops.triton_interpreter import skip_repeated_patching
    assert skip_repeated_patching()
    k, shape = 3, (1, 2, 4, 5, 3)
    logits, rpb, value = fused_inputs(k, shape, torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64)
    fn = lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k)  # noqa: E731
    patched, count = interpreter._patch_builtin, []
    monkeypatch.setattr(interpreter, '_patch_builtin', lambda *a: count.append(1) or patched(*a))
    runs = {}
    for repeat in (False, True):
        if repeat:
            monkeypatch.setattr(interpreter, '_patch_lang', interpreter._patch_lang.original)
        count.clear()
        out, grads = grads_of(fn, [logits, rpb, value], grad_out)
        runs[repeat] = ([out, *grads], len(count))
    assert all(torch.equal(a, b) for a, b in zip(runs[False][0], runs[True][0]))
    launches = 3  # forward, grad of the logits and bias, grad of the value
    assert runs[False][1] <= 4 * launches < 10 * 4 * launches < runs[True][1]


def test_grad_value_key_order_choice():
    """The plan takes pixel blocks where they need fewer loop iterations: a 5 x 5 window on a 7 x 7 map
    with many (batch, group) slices (25 instead of 49 per key), not a single small slice."""
    k = 5
    for slices, expected in ((128 * 16, True), (1, False)):
        grad = torch.empty(slices, 1, 7, 7, 14, device='meta')
        logits = torch.empty(slices, 1, 7, 7, k * k, device='meta')
        launch, _ = tb.plan_grad_value(grad, logits, k, grad, gpu=True)
        assert launch.constexprs['BY_PIXEL'] is expected
        if expected:
            outer, inner = launch.loop_trips()
            assert inner == launch.programs * 25


# ---------------------------------------------------------------------------------------------------------
# dtypes and layouts


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """Half inputs and outputs, float32 accumulation: rel err < 1e-2 against float64 on the rounded inputs."""
    k, shape = 5, (1, 2, 6, 7, 8)
    attn = torch.softmax(torch.randn(*shape[:4], k * k, device=DEVICE), -1).to(dtype)
    value = torch.randn(shape, device=DEVICE).to(dtype)
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    got = grads_of(lambda a, v: tb.na2d_av(a, v, k), [attn, value], grad_out)
    ref = grads_of(lambda a, v: reference_na2d_av(a, v, k), [attn.cpu().double(), value.cpu().double()],
                   grad_out.cpu().double())
    assert [t.dtype for t in (got[0], *got[1])] == [dtype] * 3
    _check(PLAIN_NAMES, (got[0], *got[1]), (ref[0], *ref[1]), 1e-2)

    logits, rpb, value = fused_inputs(k, shape, dtype, 'channel_last')
    got = grads_of(lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k), [logits, rpb, value], grad_out)
    ref = grads_of(lambda lg, r, v: ref_softmax_av(lg, r, v, k),
                   [logits.cpu().double(), rpb.cpu().double(), value.cpu().double()], grad_out.cpu().double())
    assert [t.dtype for t in (got[0], *got[1])] == [dtype] * 4
    _check(FUSED_NAMES, (got[0], *got[1]), (ref[0], *ref[1]), 1e-2)


@pytest.mark.slow
@pytest.mark.parametrize('channels', [14, 16])
def test_bf16_value_pairs(channels):
    """A bfloat16 value with contiguous channels is read as 32-bit channel pairs (widened by bit operations):
    the same float32 accumulation as the channel-by-channel read of a channel-first copy, so the same bits
    (14 channels: the masked last pair chunk; the stores interleave even and odd channels back)."""
    k, shape = 5, (2, 2, 6, 7, channels)
    logits, rpb, value = fused_inputs(k, shape, torch.bfloat16, 'channel_last')
    first = value_view(*shape, torch.bfloat16, 'channel_first')
    first.copy_(value)
    assert tb.plan_forward(logits, rpb, value, k)[0].constexprs['PAIRS']
    assert not tb.plan_forward(logits, rpb, first, k)[0].constexprs['PAIRS']
    assert not tb.plan_forward(logits, rpb, value.float(), k)[0].constexprs['PAIRS']
    out = tb.na2d_softmax_av(logits, rpb, value, k)
    assert out.dtype == torch.bfloat16 and out.shape == value.shape
    assert same_result(out, tb.na2d_softmax_av(logits, rpb, first, k))
    assert rel_err(out.cpu(), ref_softmax_av(logits.cpu().double(), rpb.cpu().double(), value.cpu().double(),
                                             k)) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_split_rows(dtype):
    """Rows of 14 channels per group (OverLoCK-XT's last stage) are not provably aligned for vector loads, so
    the plans read them channel by channel (bf16: word by word) and store them so; forced either way the
    forward and both gradients give the same bits, equal to the reference."""
    s, k, (b, g, h, w, c) = 3, 5, (1, 2, 5, 6, 14)
    x = torch.randn(b, 2 * g * c, h, w, device=DEVICE).to(dtype).to(memory_format=torch.channels_last)
    logits = torch.randn(b, g, h, w, s * s + k * k, device=DEVICE).to(dtype)
    rpb_s = torch.randn(g, 2 * s - 1, 2 * s - 1, device=DEVICE).to(dtype)
    rpb_k = torch.randn(g, 2 * k - 1, 2 * k - 1, device=DEVICE).to(dtype)
    grad_out = torch.randn(x.shape, device=DEVICE).to(dtype)
    inputs = [x, logits, rpb_s, rpb_k]
    launches = tb.plan_contmix(*inputs, s, k)
    assert len(launches) == 6 and all(launch.constexprs['SPLIT'] for _, launch in launches)
    assert not any(launch.constexprs['SPLIT'] for _, launch in tb.plan_contmix(
        torch.randn(b, 2 * g * 16, h, w, device=DEVICE).to(dtype).to(memory_format=torch.channels_last),
        logits, rpb_s, rpb_k, s, k))
    got = {}
    with pytest.MonkeyPatch.context() as mp:
        for split in (False, True):
            mp.setattr(plans, 'SPLIT_ROWS', split)
            assert all(launch.constexprs['SPLIT'] is split for _, launch in tb.plan_contmix(*inputs, s, k))
            out, grads = grads_of(lambda *t: tb.contmix_softmax_av(*t, s, k), inputs, grad_out)
            got[split] = (out, *grads)
    for name, a, b_ in zip(('out', 'grad_x', 'grad_logits', 'grad_rpb_small', 'grad_rpb_large'), got[False],
                           got[True]):
        assert same_result(a, b_), name
    ref = tb.contmix_softmax_av(*[t.double() for t in inputs], s, k)
    assert rel_err(got[True][0].double().cpu(), ref.cpu()) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('split', [None, True])
def test_split_rows_wide_channels(split):
    """More than 64 channels (chunks of 32) at strides not divisible by 16: read with vector loads whatever
    SPLIT_ROWS says (the channel-by-channel reads stack at most 16 channels), equal to brute force."""
    k, shape = 3, (1, 1, 3, 5, 72)
    attn = torch.randn(*shape[:4], k * k, dtype=torch.float64, device=DEVICE)
    value = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plans, 'SPLIT_ROWS', split)
        launch = tb.plan_forward(attn, None, value, k)[0]
        assert launch.constexprs['VEC'] == 32 and launch.constexprs['SPLIT'] is False
        got = tb.na2d_av(attn, value, k)
    _check(('out',), (got,), (reference_na2d_av(attn.cpu(), value.cpu(), k),), 1e-12)


def test_forward_register_cap_passed(monkeypatch):
    """A register cap set for the forward reaches the compiler (``maxnreg``) when compiled, and is left out
    when interpreted; the gradient launches leave ptxas its own choice, and so does the default."""
    k, shape = 3, (1, 1, 4, 4, 4)
    logits, rpb, value = torch.randn(*shape[:4], k * k), torch.randn(1, 5, 5), torch.randn(shape)
    assert dict(tb.plan_softmax_av(logits, rpb, value, k))['fwd'].max_registers is None
    monkeypatch.setattr(plans, '_FORWARD_MAX_REGISTERS', 80)
    launches = dict(tb.plan_softmax_av(logits, rpb, value, k))
    assert launches['fwd'].max_registers == 80
    assert launches['grad_logits'].max_registers is None and launches['grad_value'].max_registers is None
    seen = []
    kernel = lambda *args, **kwargs: seen.append(kwargs)  # noqa: E731
    monkeypatch.setattr(plans, '_KERNELS', {'fwd': {launches['fwd'].grid: kernel}})
    for interpret in (False, True):
        monkeypatch.setattr(plans, 'INTERPRET', interpret)
        launches['fwd'].run()
    assert seen[0]['maxnreg'] == plans._FORWARD_MAX_REGISTERS and 'maxnreg' not in seen[1]
    assert seen[0]['num_warps'] == seen[1]['num_warps'] == launches['fwd'].num_warps


@pytest.mark.slow
def test_bf16_logits():
    """bfloat16 logits with float32 rpb and value (what ContMix would pass if the projection stayed in bf16
    under autocast): float32 output; exact up to float32 rounding on the rounded logits, and within 1e-2 of
    the all-float32 result (the rounding of the logits to bf16 is the only loss, ~3e-3 here)."""
    k, shape = 7, (2, 2, 7, 9, 16)
    logits, rpb, value = fused_inputs(k, shape, torch.float32, 'channel_last')
    grad_out = torch.randn(shape, device=DEVICE)
    got = grads_of(lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k), [logits.bfloat16(), rpb, value], grad_out)
    assert got[0].dtype == torch.float32 and got[1][0].dtype == torch.bfloat16
    ref_rounded = grads_of(lambda lg, r, v: ref_softmax_av(lg, r, v, k),
                           [logits.bfloat16().cpu().double(), rpb.cpu(), value.cpu()], grad_out.cpu())
    _check(('out', 'grad_value'), (got[0], got[1][2]), (ref_rounded[0], ref_rounded[1][2]), 1e-5)
    # the logits gradient is stored in bf16 (the rpb gradient is summed from it)
    _check(('grad_logits', 'grad_rpb'), got[1][:2], ref_rounded[1][:2], 1e-2)
    full = grads_of(lambda lg, r, v: tb.na2d_softmax_av(lg, r, v, k), [logits, rpb, value], grad_out)
    _check(FUSED_NAMES, (got[0], *got[1]), (full[0], *full[1]), 1e-2)


def test_mixed_dtypes_promote():
    """AMP-style inputs (bf16 logits and value, fp32 rpb) give the promoted dtype, like the torch path."""
    k, shape = 5, (1, 1, 5, 6, 4)
    logits, rpb, value = fused_inputs(k, shape, torch.float32)
    logits, value = logits.bfloat16(), value.bfloat16()
    out = tb.na2d_softmax_av(logits, rpb, value, k)
    assert out.dtype == torch.float32
    assert rel_err(out.cpu(), ref_softmax_av(logits.cpu(), rpb.cpu(), value.cpu(), k)) < 1e-5


@pytest.mark.slow
def test_layouts():
    """Strided inputs are read in place and give exactly the contiguous result; outputs follow value's layout."""
    k, (b, g, h, w, c) = 5, (2, 1, 5, 7, 3)
    value = value_view(b, g, h, w, c, torch.float32, 'channel_first')
    attn = torch.randn(b, g, k * k, h, w, device=DEVICE).permute(0, 1, 3, 4, 2)  # window axis strided
    grad_out = torch.randn(b, g, h, w, c, device=DEVICE)
    out, (ga, gv) = grads_of(lambda a, v: tb.na2d_av(a, v, k), [attn, value], grad_out)
    out_c, (ga_c, gv_c) = grads_of(lambda a, v: tb.na2d_av(a, v, k), [attn.contiguous(), value.contiguous()],
                                   grad_out)
    assert same_result(out, out_c) and same_result(ga, ga_c) and same_result(gv, gv_c)
    assert rel_err(out.cpu(), reference_na2d_av(attn.cpu(), value.cpu(), k)) < 1e-6
    # value is a channel-first view: out and grad_value are channel-first too (no layout change for ContMix)
    assert out.stride(-1) == h * w and gv.stride(-1) == h * w, (out.stride(), gv.stride())
    assert out_c.is_contiguous() and gv_c.is_contiguous()
    grad_t = grad_out.transpose(2, 3).contiguous().transpose(2, 3)  # a strided grad_out, as after a permute
    _, (ga_t, gv_t) = grads_of(lambda a, v: tb.na2d_av(a, v, k), [attn, value], grad_t)
    assert torch.allclose(ga_t, ga) and torch.allclose(gv_t, gv)


# ---------------------------------------------------------------------------------------------------------
# Custom ops, compile, dispatch, bad input


@pytest.mark.slow
def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake impls (incl. strides), AOT dispatch."""
    k, shape = 3, (1, 2, 3, 4, 2)
    logits, rpb, value = fused_inputs(k, shape, torch.float64)
    attn = torch.softmax(logits, -1).detach()
    grad = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    out, lse = tb._softmax_av_op(logits, rpb, value, k)
    torch.library.opcheck(tb._av_op, (attn.clone().requires_grad_(), value.clone().requires_grad_(), k))
    torch.library.opcheck(tb._softmax_av_op, (logits.requires_grad_(), rpb.requires_grad_(), value, k))
    fake_only = [
        (tb._grad_attn_op, (grad, value, k, torch.float64)),
        (tb._grad_value_op, (grad, attn, value, k)),
        (tb._grad_logits_op, (grad, logits.detach(), rpb.detach(), value, lse, out, k)),
        (tb._softmax_grad_value_op, (grad, logits.detach(), rpb.detach(), value, lse, k)),
    ]
    for op, args in fake_only:
        torch.library.opcheck(op, args, test_utils=('test_schema', 'test_faketensor'))


@pytest.mark.slow
def test_compile_contmix():
    """A ContMix block compiles with fullgraph=True (no graph break) on the triton backend and matches eager
    torch-backend numbers, forward and backward."""
    import models.ops as ops
    from models.contmix import DynamicConvBlock
    block = DynamicConvBlock(16, 16, kernel_size=7, smk_size=5, num_heads=1, ls_init_value=1.,
                             res_scale=True, use_gemm=False).to(DEVICE).double().eval()
    with torch.no_grad():  # non-zero rpb so the bias path matters
        block.rpb1.normal_()
        block.rpb2.normal_()
    x = torch.randn(1, 16, 7, 9, dtype=torch.float64, device=DEVICE)
    ctx = torch.randn(1, 4, 7, 9, dtype=torch.float64, device=DEVICE)

    def run(fn):
        block.zero_grad()
        out = fn(x, ctx, ctx)[0]
        out.square().sum().backward()
        return out.detach(), block.rpb2.grad.clone(), block.weight_proj.weight.grad.clone()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, '_override', None)  # restored on exit
        ops.set_backend('torch')
        ref = run(block)
        ops.set_backend('triton')  # probes the backend now, not while dynamo traces
        got = run(torch.compile(block, fullgraph=True, backend='aot_eager', dynamic=False))
    _check(('out', 'grad rpb2', 'grad weight_proj'), got, ref, 1e-10)


def test_kernel_size_limit():
    attn = torch.randn(1, 1, 17, 17, 17 * 17, device=DEVICE)
    value = torch.randn(1, 1, 17, 17, 2, device=DEVICE)
    with pytest.raises(ValueError, match='kernel_size 17 .*torch backend'):
        tb.na2d_av(attn, value, 17)


def test_dispatch(monkeypatch):
    """models.ops picks the triton backend when forced, and its results match the torch backend."""
    import models.ops as ops
    k, shape = 5, (1, 2, 6, 6, 4)
    logits, rpb, value = fused_inputs(k, shape, torch.float32)
    monkeypatch.setenv(ops.ENV_VAR, 'triton')
    assert ops.get_backend(torch.device(DEVICE).type) == 'triton'
    got = ops.na2d_softmax_av(logits, rpb, value, k)
    ref = ops.na2d_softmax_av(logits, rpb, value, k, backend='torch')
    assert rel_err(got, ref) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for the GPU (no device needed): code that only the interpreter accepts fails
# here, and so do register spills at the launch configurations of OverLoCK-T's stage 3 and XT's stage 4.


@pytest.mark.slow
@pytest.mark.parametrize('h,k,g,c,dtype', [(14, 13, 8, 16, torch.float32), (7, 7, 12, 14, torch.bfloat16)])
def test_kernels_compile_for_sm90(h, k, g, c, dtype):
    """OverLoCK-T's stage 3 (the largest window) in float32 and XT's stage 4 (14 channels per group, rows read
    channel by channel) in bfloat16; the training launches of every variant in bfloat16, for sm_80 and sm_90:
    tests/test_triton_compile.py."""
    from utils.measure import sass
    if not sass.has_toolchain():
        pytest.skip('no sm_90 toolchain (ptxas/nvdisasm) in triton')
    b = 2
    proj = torch.empty(b, g, h, h, 25 + k * k, dtype=dtype, device='meta')
    x = torch.empty(b, 2 * g * c, h, h, dtype=dtype, device='meta').to(memory_format=torch.channels_last)
    value = x.reshape(b, 2, g, c, h, h).permute(1, 0, 2, 4, 5, 3)[1]
    rpb = torch.empty(g, 2 * k - 1, 2 * k - 1, dtype=dtype, device='meta')
    for label, launch in tb.plan_softmax_av(proj[..., 25:], rpb, value, k, gpu=True):
        code = sass.kernel_code(launch)
        assert code.spill_bytes == 0, f'{label}: {code.spill_bytes} bytes of spills per thread'
        # the forward holds two queries per thread and takes what ptxas needs without spilling (up to 115
        # at these shapes); the gradients hold one
        if label != 'fwd':
            assert code.registers <= 96, f'{label}: {code.registers} registers per thread'


# ---------------------------------------------------------------------------------------------------------
# Both windows of a ContMix block in one op


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['channel_first', 'channel_last'])
def test_contmix_two_windows(layout):
    """One op for both windows equals the per-window composition (float64 brute force): output in x's
    layout, and the gradients of x, the whole logits tensor and both rpb tables."""
    s, k, (b, g, h, w, c) = 3, 5, (2, 2, 6, 7, 3)
    x = torch.randn(b, 2 * g * c, h, w, dtype=torch.float64, device=DEVICE)
    if layout == 'channel_last':
        x = x.to(memory_format=torch.channels_last)
    logits = torch.randn(b, g, h, w, s * s + k * k, dtype=torch.float64, device=DEVICE)
    rpb_s = torch.randn(g, 2 * s - 1, 2 * s - 1, dtype=torch.float64, device=DEVICE)
    rpb_k = torch.randn(g, 2 * k - 1, 2 * k - 1, dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)

    def reference(x_, lg, rs, rk):
        v = x_.reshape(b, 2, g, c, h, w).permute(1, 0, 2, 4, 5, 3)
        out = torch.cat([ref_softmax_av(lg[..., :s * s], rs, v[0], s), ref_softmax_av(lg[..., s * s:], rk, v[1], k)],
                        1)
        return out.permute(0, 1, 4, 2, 3).reshape(b, 2 * g * c, h, w)

    inputs = [x, logits, rpb_s, rpb_k]
    got = grads_of(lambda *t: tb.contmix_softmax_av(*t, s, k), inputs, grad_out)
    ref = grads_of(reference, [t.cpu() for t in inputs], grad_out.cpu())
    assert got[0].stride() == x.stride()
    _check(('out', 'grad_x', 'grad_logits', 'grad_rpb_small', 'grad_rpb_large'), (got[0], *got[1]),
           (ref[0], *ref[1]), 1e-12)


@pytest.mark.slow
def test_contmix_dispatch_and_opcheck(monkeypatch):
    """models.ops.contmix_softmax_av: the triton op when the backend is triton, the per-window composition
    otherwise (equal results); the op's fake implementations and autograd registration pass opcheck."""
    import models.ops as ops
    s, k, (b, g, h, w, c) = 3, 5, (1, 2, 5, 6, 2)
    x = torch.randn(b, 2 * g * c, h, w, device=DEVICE)
    logits = torch.randn(b, g, h, w, s * s + k * k, device=DEVICE)
    rpb_s, rpb_k = torch.randn(g, 5, 5, device=DEVICE), torch.randn(g, 9, 9, device=DEVICE)
    ref = ops.contmix_softmax_av(x, logits, rpb_s, rpb_k, s, k, backend='torch')
    monkeypatch.setenv(ops.ENV_VAR, 'triton')
    got = ops.contmix_softmax_av(x, logits, rpb_s, rpb_k, s, k)
    assert rel_err(got.cpu(), ref.cpu()) < 1e-5
    with pytest.raises(ValueError, match='contmix_softmax_av'):
        ops.contmix_softmax_av(x, logits[..., 1:], rpb_s, rpb_k, s, k)
    args = (x.double().requires_grad_(), logits.double().requires_grad_(), rpb_s.double().requires_grad_(),
            rpb_k.double().requires_grad_(), s, k)
    torch.library.opcheck(tb._contmix_op, args)
