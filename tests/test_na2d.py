"""Tests of the na2d_av op package (models/ops): semantics, gradients, dtypes, dispatch, bad input, memory."""
import logging
import sys
import types

import pytest
import torch

from models import ops
from models.ops import dispatch, natten_backend, torch_backend
from tests.helpers import na2d_golden
from tests.reference import reference_na2d_av, reference_rpb, reference_softmax_av, rel_err, window_starts


def _inputs(shape, k, dtype=torch.float64, grad=False, seed=0):
    b, g, h, w, c = shape
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(b, g, h, w, k * k, generator=gen, dtype=torch.float64).softmax(-1).to(dtype)
    value = torch.randn(b, g, h, w, c, generator=gen, dtype=torch.float64).to(dtype)
    return attn.requires_grad_(grad), value.requires_grad_(grad)


@pytest.fixture(autouse=True)
def _clean_dispatch(monkeypatch):
    """Every test starts from the automatic choice, no env var, nothing logged yet."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    monkeypatch.setattr(dispatch, '_override', None)
    monkeypatch.setattr(dispatch, '_logged', set())
    yield


# ---------------------------------------------------------------------------------------------------------
# Semantics and gradients

GOLDEN = na2d_golden()
NATTEN = pytest.mark.skipif(not natten_backend.is_available(), reason='natten <= 0.17 not installed')


@pytest.mark.parametrize('backend', ['torch', pytest.param('natten', marks=NATTEN)])
@pytest.mark.parametrize('case', range(len(GOLDEN)), ids=lambda i: f'k{GOLDEN[i]["kernel_size"]}_'
                         + 'x'.join(map(str, GOLDEN[i]['value'].shape)))
def test_golden(case, backend):
    c = GOLDEN[case]
    attn = c['attn'].clone().requires_grad_()
    value = c['value'].clone().requires_grad_()
    out = ops.na2d_av(attn, value, c['kernel_size'], backend=backend)
    (out * c['grad_out']).sum().backward()
    assert out.dtype == torch.float64
    assert rel_err(out, c['out']) < 1e-12
    assert rel_err(attn.grad, c['grad_attn']) < 1e-12
    assert rel_err(value.grad, c['grad_value']) < 1e-12


# (shape [B, G, H, W, C], K): square and not, H == K, borders on every side, tiled maps (a side > 16)
# with zero-padded last tiles, on both the scatter (K < 7) and the strided-copy (K >= 7) paths.
SHAPES = [
    ((1, 1, 5, 5, 2), 3), ((1, 2, 5, 7, 3), 5), ((2, 1, 7, 7, 2), 7), ((1, 1, 7, 9, 2), 7),
    ((1, 1, 9, 8, 2), 3), ((1, 1, 13, 14, 2), 13),
]
TILED = [((1, 2, 23, 18, 3), 5), ((1, 1, 19, 30, 2), 7), ((2, 1, 21, 40, 2), 13), ((1, 1, 17, 3, 2), 3)]


@pytest.mark.parametrize('shape,k', SHAPES + TILED)
def test_matches_bruteforce(shape, k):
    attn, value = _inputs(shape, k, grad=True)
    out = ops.na2d_av(attn, value, k)
    ref = reference_na2d_av(attn, value, k)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (attn, value), g)
    ref_grads = torch.autograd.grad(ref, (attn, value), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('strided', [False, True])
def test_dense_fill_paths_agree(monkeypatch, strided):
    """The strided-copy and the scatter fill of the dense matrices give the same result (tiled and not)."""
    monkeypatch.setattr(torch_backend, '_STRIDED_MIN_KERNEL', 1 if strided else 1000)
    torch_backend._plan.cache_clear()
    try:
        for shape, k in [((1, 2, 23, 18, 3), 5), ((1, 1, 14, 14, 2), 13), ((1, 1, 3, 20, 2), 3)]:
            attn, value = _inputs(shape, k, grad=True)
            out = ops.na2d_av(attn, value, k)
            torch.testing.assert_close(out, reference_na2d_av(attn, value, k), rtol=1e-12, atol=1e-12)
            ga, gv = torch.autograd.grad(out.square().sum(), (attn, value))
            ra, rv = torch.autograd.grad(reference_na2d_av(attn, value, k).square().sum(), (attn, value))
            torch.testing.assert_close(ga, ra, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gv, rv, rtol=1e-12, atol=1e-12)
    finally:
        torch_backend._plan.cache_clear()


@pytest.mark.parametrize('shape,k', [((1, 1, 3, 3, 2), 3), ((1, 2, 4, 6, 2), 3), ((1, 1, 5, 6, 1), 5)])
def test_gradcheck(shape, k):
    attn, value = _inputs(shape, k, grad=True)
    assert torch.autograd.gradcheck(lambda a, v: ops.na2d_av(a, v, k), (attn, value))


@pytest.mark.parametrize('shape,k', SHAPES[2:4] + [SHAPES[5]] + TILED[:2])
def test_gradcheck_fast(shape, k):
    attn, value = _inputs(shape, k, grad=True)
    assert torch.autograd.gradcheck(lambda a, v: ops.na2d_av(a, v, k), (attn, value), fast_mode=True)


def test_gradgradcheck():
    attn, value = _inputs((1, 1, 3, 4, 1), 3, grad=True)
    assert torch.autograd.gradgradcheck(lambda a, v: ops.na2d_av(a, v, 3), (attn, value))


@pytest.mark.parametrize('k', [3, 7])  # scatter and strided fill
@pytest.mark.parametrize('shape', [(0, 2, 9, 9, 2), (1, 0, 9, 9, 2), (1, 1, 9, 20, 0)])
def test_empty_inputs(shape, k):
    attn, value = _inputs(shape, k, grad=True)
    out = ops.na2d_av(attn, value, k)
    assert out.shape == value.shape
    out.sum().backward()
    assert attn.grad.shape == attn.shape and value.grad.shape == value.shape
    assert not attn.grad.any()


# ---------------------------------------------------------------------------------------------------------
# dtypes and layouts


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    shape, k = (2, 2, 14, 14, 16), 13
    attn32, value32 = _inputs(shape, k, dtype=torch.float32)
    ref = reference_na2d_av(attn32, value32, k)
    attn, value = attn32.to(dtype).requires_grad_(), value32.to(dtype).requires_grad_()
    out = ops.na2d_av(attn, value, k)
    assert out.dtype == dtype
    assert rel_err(out, ref) < 1e-2
    out.float().square().sum().backward()
    assert attn.grad.dtype == dtype and value.grad.dtype == dtype
    assert torch.isfinite(attn.grad).all() and torch.isfinite(value.grad).all()


def test_half_accumulates_in_float32():
    """1000 equal weights of ~1e-3 summed in float16 would lose digits; accumulated in float32 they do not."""
    k = 31
    attn = torch.full((1, 1, k, k, k * k), 1.0 / (k * k), dtype=torch.float16)
    value = torch.ones(1, 1, k, k, 4, dtype=torch.float16)
    out = ops.na2d_av(attn, value, k)
    exact = (attn.float().sum(-1, keepdim=True) * value.float())
    assert (out.float() - exact).abs().max().item() < 1e-3


def test_mixed_dtypes_promote():
    attn, value = _inputs((1, 2, 7, 7, 4), 5, dtype=torch.float32)
    out = ops.na2d_av(attn, value.bfloat16(), 5)
    assert out.dtype == torch.float32
    assert rel_err(out, reference_na2d_av(attn, value, 5)) < 1e-2


def test_non_contiguous_inputs():
    """The model's layout: value is a permuted view of [B, G, C, H, W], logits a slice of a larger tensor."""
    b, g, h, w, c, k = 2, 3, 9, 11, 4, 5
    value_cf = torch.randn(b, g, c, h, w, dtype=torch.float64)
    value = value_cf.permute(0, 1, 3, 4, 2)
    big = torch.randn(b, g, h, w, 9 + k * k + 3, dtype=torch.float64)
    attn = big[..., 9:9 + k * k].softmax(-1).transpose(2, 3).contiguous().transpose(2, 3)  # odd strides
    assert not value.is_contiguous() and not attn.is_contiguous()
    out = ops.na2d_av(attn, value, k)
    torch.testing.assert_close(out, ops.na2d_av(attn.contiguous(), value.contiguous(), k), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out, reference_na2d_av(attn, value, k), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Relative position bias and the softmax composition


@pytest.mark.parametrize('h,w,k', [(5, 5, 5), (7, 9, 3), (14, 13, 13), (6, 11, 5)])
def test_relative_position_bias(h, w, k):
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1, dtype=torch.float64, requires_grad=True)
    bias = ops.relative_position_bias(rpb, h, w, k)
    ref = reference_rpb(rpb.detach(), h, w, k)
    assert bias.shape == (3, h, w, k * k)
    torch.testing.assert_close(bias, ref, rtol=0, atol=0)
    # differentiable: each table entry receives the number of times it is used
    bias.sum().backward()
    counts = torch.zeros(2 * k - 1, 2 * k - 1, dtype=torch.float64)
    si, sj = window_starts(h, k), window_starts(w, k)
    for i in range(h):
        for j in range(w):
            counts[si[i] - i + k - 1:si[i] - i + 2 * k - 1, sj[j] - j + k - 1:sj[j] - j + 2 * k - 1] += 1
    torch.testing.assert_close(rpb.grad, counts.expand(3, -1, -1))


def test_na2d_softmax_av_matches_composition():
    b, g, h, w, c, s, k = 2, 2, 9, 10, 3, 3, 7
    big = torch.randn(b, g, h, w, s * s + k * k, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(g, 2 * k - 1, 2 * k - 1, dtype=torch.float64, requires_grad=True)
    value = torch.randn(b, g, c, h, w, dtype=torch.float64).permute(0, 1, 3, 4, 2).requires_grad_()
    logits = big[..., s * s:]  # non-contiguous slice, as in the model
    out = ops.na2d_softmax_av(logits, rpb, value, k)
    attn = torch.softmax(logits + reference_rpb(rpb, h, w, k), dim=-1)
    ref = reference_na2d_av(attn, value, k)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (big, rpb, value), g_out)
    ref_grads = torch.autograd.grad(ref, (big, rpb, value), g_out)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_compiles_without_graph_breaks():
    """Dispatch, checks and the rpb cache trace cleanly; the op itself is an opaque custom op."""
    k = 5
    logits = torch.randn(1, 2, 7, 8, k * k, requires_grad=True)
    rpb = torch.randn(2, 2 * k - 1, 2 * k - 1, requires_grad=True)
    value = torch.randn(1, 2, 7, 8, 3, requires_grad=True)
    fn = torch.compile(lambda a, b, c: ops.na2d_softmax_av(a, b, c, k), backend='aot_eager', fullgraph=True)
    out = fn(logits, rpb, value)
    ref = ops.na2d_softmax_av(logits, rpb, value, k)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), value)[0], torch.autograd.grad(ref.sum(), value)[0])


# ---------------------------------------------------------------------------------------------------------
# Memory: nothing K^2 times the size of value is kept for the backward


@pytest.mark.parametrize('shape,k', [((2, 2, 14, 14, 8), 13), ((1, 2, 30, 20, 8), 5)])
def test_saves_only_inputs_for_backward(shape, k):
    attn, value = _inputs(shape, k, dtype=torch.float32, grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.na2d_av(attn * 1, value * 1, k)  # non-leaf inputs, as in a network
    out.sum().backward()
    assert saved, 'nothing saved: the backward could not work'
    # a neighbourhood tensor [B, G, H, W, K*K, C] would be C times attn; the inputs are all that may be saved
    assert max(saved) <= max(attn.numel(), value.numel())
    assert sum(saved) <= attn.numel() + value.numel()


# ---------------------------------------------------------------------------------------------------------
# Backend selection


def _fake_natten(calls):
    def na2d_av(attn, value, kernel_size, dilation):
        calls.append(('natten', attn.dtype, kernel_size, dilation))
        return reference_na2d_av(attn, value, kernel_size)
    return types.SimpleNamespace(na2d_av=na2d_av)


def _fake_triton(calls, available=True):
    def na2d_av(attn, value, kernel_size):
        calls.append('triton.na2d_av')
        return reference_na2d_av(attn, value, kernel_size)

    def na2d_softmax_av(logits, rpb, value, kernel_size):
        calls.append('triton.na2d_softmax_av')
        return reference_softmax_av(logits, rpb, value, kernel_size)
    return types.SimpleNamespace(is_available=lambda: available, na2d_av=na2d_av, na2d_softmax_av=na2d_softmax_av,
                                 MAX_KERNEL_SIZE=15)


def test_default_backend_is_torch_without_natten():
    if natten_backend.is_available():
        pytest.skip('natten installed')
    assert 'torch' in ops.available_backends()
    assert ops.get_backend('cpu') == 'torch'


def test_backend_argument_and_set_backend():
    attn, value = _inputs((1, 1, 5, 5, 2), 3)
    ref = reference_na2d_av(attn, value, 3)
    torch.testing.assert_close(ops.na2d_av(attn, value, 3, backend='torch'), ref)
    ops.set_backend('torch')
    assert ops.get_backend('cpu') == 'torch'
    ops.set_backend('auto')
    assert dispatch._override is None
    with pytest.raises(ValueError, match=r"'bogus'.*auto\|triton\|natten\|torch"):
        ops.set_backend('bogus')
    with pytest.raises(ValueError, match="backend='bogus' is not a na2d_av backend"):
        ops.na2d_av(attn, value, 3, backend='bogus')
    with pytest.raises(ValueError, match='backend=1 is not a na2d_av backend'):
        ops.na2d_av(attn, value, 3, backend=1)


def test_unavailable_backend_errors(monkeypatch):
    monkeypatch.setattr(natten_backend, '_natten_functional', lambda: None)
    attn, value = _inputs((1, 1, 5, 5, 2), 3)
    with pytest.raises(ValueError, match=r"'natten' is not available.*available backends: \['torch'"):
        ops.na2d_av(attn, value, 3, backend='natten')
    with pytest.raises(ValueError, match="'natten' is not available"):
        ops.set_backend('natten')
    monkeypatch.setenv(ops.ENV_VAR, 'natten')
    with pytest.raises(ValueError, match=f"{ops.ENV_VAR}='natten' is not available.*available backends"):
        ops.na2d_av(attn, value, 3)
    monkeypatch.setenv(ops.ENV_VAR, 'nonsense')
    with pytest.raises(ValueError, match=f"{ops.ENV_VAR}='nonsense' is not a na2d_av backend"):
        ops.na2d_av(attn, value, 3)


def test_env_var_and_precedence(monkeypatch):
    calls = []
    monkeypatch.setattr(natten_backend, '_natten_functional', lambda: _fake_natten(calls))
    attn, value = _inputs((1, 1, 5, 5, 2), 3)
    ops.na2d_av(attn, value, 3)  # automatic on CPU: natten when installed
    assert len(calls) == 1 and ops.get_backend('cpu') == 'natten'
    monkeypatch.setenv(ops.ENV_VAR, 'torch')
    ops.na2d_av(attn, value, 3)
    assert len(calls) == 1 and ops.get_backend('cpu') == 'torch'
    ops.set_backend('natten')  # set_backend beats the env var
    ops.na2d_av(attn, value, 3)
    assert len(calls) == 2
    ops.na2d_av(attn, value, 3, backend='torch')  # the argument beats both
    assert len(calls) == 2
    monkeypatch.setenv(ops.ENV_VAR, 'AUTO')
    ops.set_backend(None)
    assert ops.get_backend('cpu') == 'natten'


def test_natten_wrapper_dtypes(monkeypatch):
    """natten gets one dtype, float32 for half inputs on the CPU; the output keeps the input dtype."""
    calls = []
    monkeypatch.setattr(natten_backend, '_natten_functional', lambda: _fake_natten(calls))
    attn, value = _inputs((1, 2, 7, 8, 3), 5, dtype=torch.bfloat16)
    out = ops.na2d_av(attn, value, 5, backend='natten')
    assert calls == [('natten', torch.float32, 5, 1)] and out.dtype == torch.bfloat16
    ref = reference_na2d_av(attn.float(), value.float(), 5)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize('version,usable', [('0.17.5', True), ('0.14.6+torch200cu118', True), ('0.20.1', False)])
def test_natten_probe_by_version(monkeypatch, version, usable):
    """Only natten <= 0.17 qualifies: later releases have no na2d_av or one with another layout."""
    functional = types.ModuleType('natten.functional')
    functional.na2d_av = _fake_natten([]).na2d_av
    natten = types.ModuleType('natten')
    natten.__version__, natten.functional = version, functional
    monkeypatch.setitem(sys.modules, 'natten', natten)
    monkeypatch.setitem(sys.modules, 'natten.functional', functional)
    monkeypatch.setattr(natten_backend, '_functional', natten_backend._UNPROBED)
    assert natten_backend.is_available() is usable
    assert ('natten' in ops.available_backends()) is usable


def test_triton_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, '_triton_module', lambda: _fake_triton(calls))
    monkeypatch.setenv('OVERLOCK_NA2D_SELFCHECK', '0')  # only the calls themselves (test_na2d_selfcheck.py)
    assert 'triton' in ops.available_backends()
    assert ops.get_backend('cuda') == 'triton'  # automatic choice for CUDA tensors
    assert ops.get_backend('cpu') != 'triton'
    assert dispatch._resolve(None, 'cuda', 17) != 'triton'  # kernels beyond the triton limit fall back
    attn, value = _inputs((1, 1, 5, 5, 2), 3)
    with pytest.raises(ValueError, match='CUDA tensors.*TRITON_INTERPRET=1'):
        ops.na2d_av(attn, value, 3, backend='triton')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    ops.na2d_av(attn, value, 3, backend='triton')
    logits = torch.randn(1, 1, 5, 5, 9, dtype=torch.float64)
    rpb = torch.randn(1, 5, 5, dtype=torch.float64)
    out = ops.na2d_softmax_av(logits, rpb, value, 3, backend='triton')
    assert calls == ['triton.na2d_av', 'triton.na2d_softmax_av']
    torch.testing.assert_close(out, ops.na2d_softmax_av(logits, rpb, value, 3, backend='torch'))


def test_available_backends_in_the_automatic_choice_order(monkeypatch):
    """available_backends() lists the registry in order of preference; the automatic choice takes the first one
    that takes the device: triton only for CUDA tensors, natten for CPU and CUDA, torch for anything."""
    monkeypatch.setattr(dispatch, '_triton_module', lambda: _fake_triton([]))
    monkeypatch.setattr(natten_backend, '_natten_functional', lambda: _fake_natten([]))
    assert ops.available_backends() == list(ops.BACKENDS) == ['triton', 'natten', 'torch']
    assert ops.get_backend('cuda') == 'triton' and ops.get_backend('cpu') == 'natten'
    assert ops.get_backend('mps') == 'torch'
    monkeypatch.setattr(natten_backend, '_natten_functional', lambda: None)
    assert ops.available_backends() == ['triton', 'torch'] and ops.get_backend('cpu') == 'torch'


def test_triton_unavailable_or_broken(monkeypatch):
    monkeypatch.setattr(dispatch, '_triton_module', lambda: _fake_triton([], available=False))
    assert 'triton' not in ops.available_backends()
    assert ops.get_backend('cuda') in ('torch', 'natten')



def test_triton_import_failure_means_unavailable(monkeypatch):
    def broken(name):
        raise RuntimeError('triton built for another CUDA')
    monkeypatch.setattr(dispatch.importlib, 'import_module', broken)
    monkeypatch.setattr(dispatch, '_triton', dispatch._UNPROBED)
    assert dispatch._triton_module() is None  # a failing import means "unavailable", not a crash
    assert 'triton' not in ops.available_backends()
    assert ops.get_backend('cuda') in ('torch', 'natten')


def test_choice_logged_once(caplog):
    attn, value = _inputs((1, 1, 5, 5, 2), 3)
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        for _ in range(3):
            ops.na2d_av(attn, value, 3, backend='torch')
            ops.get_backend('cpu')
    messages = [r.getMessage() for r in caplog.records if r.name == dispatch.__name__]
    assert messages == ['na2d_av: using the torch backend for cpu tensors']


# ---------------------------------------------------------------------------------------------------------
# Bad input: one ValueError naming both shapes


@pytest.mark.parametrize('attn_shape,value_shape,k,match', [
    ((1, 2, 5, 6, 49), (1, 2, 5, 6, 8), 7, 'feature map 5x6 is smaller than kernel_size 7'),
    ((1, 2, 9, 6, 49), (1, 2, 9, 6, 8), 7, 'feature map 9x6 is smaller than kernel_size 7'),
    ((1, 2, 8, 8, 49), (1, 3, 8, 8, 8), 7, 'differ in'),
    ((1, 2, 8, 8, 49), (1, 2, 8, 9, 8), 7, 'differ in'),
    ((1, 2, 8, 8, 25), (1, 2, 8, 8, 8), 7, 'kernel_size\\*\\*2 = 49'),
    ((1, 2, 8, 8, 36), (1, 2, 8, 8, 8), 6, 'positive odd'),
    ((2, 8, 8, 49), (2, 8, 8, 8), 7, '5-D'),
    ((1, 2, 8, 8, 49), (2, 8, 8, 8), 7, '5-D'),
])
def test_bad_input(attn_shape, value_shape, k, match):
    attn, value = torch.rand(attn_shape), torch.rand(value_shape)
    for fn in (lambda: ops.na2d_av(attn, value, k),
               lambda: ops.na2d_softmax_av(attn, torch.zeros(2, 2 * k - 1, 2 * k - 1), value, k)):
        with pytest.raises(ValueError, match=match) as e:
            fn()
        assert str(list(attn_shape)) in str(e.value) and str(list(value_shape)) in str(e.value)


def test_bad_dtype_and_rpb():
    attn, value = torch.rand(1, 1, 5, 5, 9), torch.rand(1, 1, 5, 5, 2)
    with pytest.raises(ValueError, match='floating-point'):
        ops.na2d_av(attn, value.long(), 3)
    with pytest.raises(ValueError, match=r'rpb must be \[G=1, 5, 5\].*got rpb \[1, 7, 7\]'):
        ops.na2d_softmax_av(attn, torch.zeros(1, 7, 7), value, 3)
    with pytest.raises(ValueError, match='smaller than kernel_size'):
        ops.relative_position_bias(torch.zeros(1, 5, 5), 2, 5, 3)
