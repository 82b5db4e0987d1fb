"""The triton backend on a GPU it has not met: launches on the tensors' device, a version floor, and the
first-use self-check against the torch backend with its fallback (models/ops/selfcheck.py, dispatch.py).

Most tests replace the Triton op with a stand-in (NaN, an exception, a wrong result) so no kernel runs; the
slow ones run the real kernels under Triton's interpreter.
"""
import dataclasses
import logging
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip('triton')

from models.ops import dispatch, selfcheck, torch_backend, triton_backend as tb, triton_plans as plans  # noqa: E402


@pytest.fixture
def clean(monkeypatch):
    """No backend forced, no kept self-check results, the triton backend usable on CPU tensors."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(selfcheck.SELFCHECK_ENV_VAR, raising=False)
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(dispatch, '_override', None)
    monkeypatch.setattr(selfcheck, '_results', {})
    monkeypatch.setattr(selfcheck, '_logged', set())
    return monkeypatch


@pytest.fixture
def auto_triton(clean):
    """The automatic choice takes the triton backend for CPU tensors (as it does for CUDA ones)."""
    entry = dispatch._REGISTRY['triton']
    clean.setitem(dispatch._REGISTRY, 'triton', dataclasses.replace(entry, takes=lambda device_type, k: True))
    return clean


def _inputs(k=3, shape=(1, 2, 4, 5, 3)):
    b, g, h, w, c = shape
    return torch.randn(b, g, h, w, k * k), torch.randn(g, 2 * k - 1, 2 * k - 1), torch.randn(shape), k


def _stand_in(monkeypatch, behaviour):
    """Replace the triton backend's fused op by ``behaviour(torch_result, logits)``; returns its call count."""
    calls = []

    def fake(logits, rpb, value, k):
        calls.append(tuple(logits.shape))
        return behaviour(torch_backend.na2d_av(torch.softmax(
            logits + dispatch.relative_position_bias(rpb, *value.shape[2:4], k), -1), value, k), logits)

    monkeypatch.setattr(tb, 'na2d_softmax_av', fake)
    return calls


def _raise(out, logits):
    raise RuntimeError('CompilationError: at 12:4: no such thing\nsecond line')


BEHAVIOURS = {
    'nan': (lambda out, logits: out * float('nan'), 'out: non-finite values'),
    'raise': (_raise, 'forward raised RuntimeError: second line'),
    'mismatch': (lambda out, logits: out * 1.1, 'out: relative difference'),
}


@pytest.mark.parametrize('behaviour', sorted(BEHAVIOURS))
def test_failed_check_falls_back_once(auto_triton, caplog, behaviour):
    """A Triton op that returns NaN, raises or disagrees with torch: one log line naming the op, what happened
    and how to force a backend; this call and every later one of its kind get the torch result."""
    fn, expected = BEHAVIOURS[behaviour]
    calls = _stand_in(auto_triton, fn)
    logits, rpb, value, k = _inputs()
    ref = dispatch.na2d_softmax_av(logits, rpb, value, k, backend='torch')
    with caplog.at_level(logging.WARNING, logger='models.ops'):
        for _ in range(3):
            assert torch.equal(dispatch.na2d_softmax_av(logits, rpb, value, k), ref)
    assert len(calls) == 1  # the check's tiny case only
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    assert 'na2d_softmax_av' in lines[0] and expected in lines[0]
    assert 'OVERLOCK_NA2D_BACKEND=torch' in lines[0] and '--na2d-backend torch' in lines[0]


def test_check_passes_once_then_nothing(auto_triton):
    """A correct op: checked once on a tiny case, then called directly (no check on later calls)."""
    calls = _stand_in(auto_triton, lambda out, logits: out)
    logits, rpb, value, k = _inputs()
    for _ in range(3):
        dispatch.na2d_softmax_av(logits, rpb, value, k)
    tiny = calls[0]
    assert tiny != tuple(logits.shape) and calls[1:] == [tuple(logits.shape)] * 3


def test_kinds_are_checked_separately(auto_triton):
    """Dtypes and value layout make separate kinds; a failure of one leaves the others on triton."""
    calls = _stand_in(auto_triton, lambda out, logits: out * (1.1 if logits.dtype == torch.float64 else 1.))
    logits, rpb, value, k = _inputs()
    first = value.transpose(2, 3).contiguous().transpose(2, 3)  # another dimension order
    dispatch.na2d_softmax_av(logits, rpb, value, k)
    dispatch.na2d_softmax_av(logits, rpb, first, k)
    dispatch.na2d_softmax_av(logits.double(), rpb.double(), value.double(), k)  # fails: torch from now on
    dispatch.na2d_softmax_av(logits.double(), rpb.double(), value.double(), k)
    assert len(calls) == 2 * 2 + 1  # two kinds checked then run; the third checked only
    assert [v is None for v in selfcheck._results.values()] == [True, True, False]


def test_env_var_turns_check_off(auto_triton):
    calls = _stand_in(auto_triton, lambda out, logits: out * float('nan'))
    auto_triton.setenv(selfcheck.SELFCHECK_ENV_VAR, '0')
    logits, rpb, value, k = _inputs()
    assert torch.isnan(dispatch.na2d_softmax_av(logits, rpb, value, k)).all()
    assert calls == [tuple(logits.shape)] and not selfcheck._results


@pytest.mark.parametrize('how', ['argument', 'environment'])
def test_explicit_triton_raises(clean, how):
    """Triton chosen explicitly does not fall back: the failed check raises, saying how to get past it."""
    _stand_in(clean, lambda out, logits: out * float('nan'))
    logits, rpb, value, k = _inputs()
    kwargs = {'backend': 'triton'} if how == 'argument' else {}
    if how == 'environment':
        clean.setenv(dispatch.ENV_VAR, 'triton')
    for _ in range(2):  # the kept result raises again
        with pytest.raises(selfcheck.SelfCheckError, match='non-finite.*chosen explicitly.*OVERLOCK_NA2D_SELFCHECK=0'):
            dispatch.na2d_softmax_av(logits, rpb, value, k, **kwargs)


def test_launch_error_at_run_time_falls_back(auto_triton, caplog):
    """The check passed (tiny case) but a real call raises (e.g. a shape that compiles differently): logged
    once, the torch result returned, torch from then on; an explicit choice sees the error itself."""
    big = (2, 2, 4, 5, 3)

    def fails_when_big(out, logits):
        if logits.shape[0] == big[0]:
            raise RuntimeError('triton.compiler.errors.CompilationError: at 3:8')
        return out

    calls = _stand_in(auto_triton, fails_when_big)
    logits, rpb, value, k = _inputs(shape=big)
    ref = dispatch.na2d_softmax_av(logits, rpb, value, k, backend='torch')
    with caplog.at_level(logging.WARNING, logger='models.ops'):
        assert torch.equal(dispatch.na2d_softmax_av(logits, rpb, value, k), ref)
        assert torch.equal(dispatch.na2d_softmax_av(logits, rpb, value, k), ref)
    assert len(calls) == 2  # the check and the failed call; the third went to torch
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 'a launch raised RuntimeError: triton.compiler.errors.CompilationError: at 3:8' in line
    auto_triton.setattr(selfcheck, '_results', {})
    with pytest.raises(RuntimeError, match='CompilationError'):
        dispatch.na2d_softmax_av(logits, rpb, value, k, backend='triton')


def test_out_of_memory_is_not_swallowed(auto_triton):
    def oom(out, logits):
        if logits.shape[0] == 2:
            raise torch.OutOfMemoryError('CUDA out of memory')
        return out

    _stand_in(auto_triton, oom)
    logits, rpb, value, k = _inputs(shape=(2, 2, 4, 5, 3))
    with pytest.raises(torch.OutOfMemoryError):
        dispatch.na2d_softmax_av(logits, rpb, value, k)


@pytest.mark.parametrize('passes', [True, False])
def test_no_graph_break(auto_triton, passes):
    """Under torch.compile(fullgraph=True) the check runs while tracing and the graph holds the chosen op."""
    calls = _stand_in(auto_triton, lambda out, logits: out if passes else out * float('nan'))
    logits, rpb, value, k = _inputs()
    fn = torch.compile(lambda lg, r, v: dispatch.na2d_softmax_av(lg, r, v, k) * 2, fullgraph=True,
                       backend='eager')
    got = fn(logits, rpb, value)
    ref = dispatch.na2d_softmax_av(logits, rpb, value, k, backend='torch') * 2
    assert torch.allclose(got, ref)
    assert len(calls) >= 1 and (selfcheck._results and list(selfcheck._results.values())[0] is None) is passes


def _unit_strides(t):
    return {d for d in range(t.dim()) if t.stride(d) == 1}


@pytest.mark.parametrize('layout, c', [('channels_last', 3), ('channel_first', 3), ('channels_last', 1),
                                       ('channel_first', 1)])
def test_case_layout_and_tiny_inputs(layout, c):
    """The kind of a call: dtypes, value's dimension order, device. The tiny case has the call's dtypes,
    channels and dimension order, so the same strides are 1 (what a launch specialises), and a map larger than
    the window."""
    x = torch.randn(2, 2 * 2 * c, 6, 7)
    if layout == 'channels_last':
        x = x.to(memory_format=torch.channels_last)
    value = x.reshape(2, 2, 2, c, 6, 7).permute(1, 0, 2, 4, 5, 3)[0]
    attn = torch.randn(2, 2, 6, 7, 9, dtype=torch.bfloat16)
    case = selfcheck.case_of('na2d_av', (attn, value), value, c, (3,))
    assert case[:2] == ('na2d_av', ('bfloat16', 'float32')) and case[3] == 'cpu'
    a, v = selfcheck._inputs(case)
    assert a.dtype == torch.bfloat16 and v.dtype == torch.float32 and v.shape[-1] == c and v.shape[2] > 3
    assert _unit_strides(v) == _unit_strides(value)
    other = value.contiguous()
    assert selfcheck.case_of('na2d_av', (attn, other), other, c, (3,))[2] != case[2]


# ---------------------------------------------------------------------------------------------------------
# Launches on the tensors' device; the version floor.


def test_launch_on_tensor_device(monkeypatch):
    """Every launch runs with the tensors' CUDA device current (cuda:1 while cuda:0 is current), checked with a
    stand-in for torch.cuda.device; CPU tensors (the interpreter) need no guard."""
    entered = []
    launched = []

    class Guard:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    monkeypatch.setattr(torch.cuda, 'device', Guard)
    monkeypatch.setattr(plans, '_KERNELS', {'fwd': {(1,): lambda *a, **kw: launched.append(list(entered))}})
    on = lambda device: SimpleNamespace(device=torch.device(device))  # noqa: E731  (a tensor's device only)
    plans.Launch('fwd', (1,), (on('cuda:1'), 3), {}, 4, (), (), 0, lambda: ()).run()
    assert launched == [[torch.device('cuda', 1)]] and entered[-1] is None
    entered.clear()
    plans.Launch('fwd', (1,), (on('cpu'), 3), {}, 4, (), (), 0, lambda: ()).run()
    assert entered == [] and len(launched) == 2


def test_launch_device_is_first_tensor():
    k = 3
    logits, rpb, value = torch.randn(1, 1, 3, 4, 9), torch.randn(1, 5, 5), torch.randn(1, 1, 3, 4, 2)
    for _, launch in plans.plan_softmax_av(logits, rpb, value, k):
        assert launch.device == value.device


def test_old_triton_named_in_one_line(clean, caplog):
    """An older triton than the kernels need: one warning naming both versions and the fallback, the backend
    unavailable, and an explicit choice of it refused with the same reason."""
    import triton
    clean.setattr(triton, '__version__', '3.2.0')
    clean.setattr(dispatch, '_triton', dispatch._UNPROBED)
    clean.setattr(dispatch, '_triton_unsupported', None)
    with caplog.at_level(logging.WARNING, logger='models.ops'):
        assert dispatch._triton_module() is None
        assert dispatch._triton_module() is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert 'triton 3.2.0' in line and '>= 3.4' in line and 'torch backend' in line
    assert 'triton' not in dispatch.available_backends()
    with pytest.raises(ValueError, match='triton 3.2.0 is installed'):
        dispatch.set_backend('triton')


def test_version_parsing():
    assert dispatch._version('3.4.0') == (3, 4, 0) and dispatch._version('3.10.1+git8a2b') == (3, 10, 1)
    assert dispatch._version('3.3.1') < dispatch.TRITON_MIN_VERSION <= dispatch._version('3.4.0rc1')


def test_requirements_floor_matches():
    """requirements.txt asks for the triton (and torch) the code needs."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / 'requirements.txt').read_text()
    floor = '.'.join(map(str, dispatch.TRITON_MIN_VERSION))
    assert f'triton>={floor}' in text and 'torch>=2.8' in text


# ---------------------------------------------------------------------------------------------------------
# The real kernels under Triton's interpreter.


@pytest.fixture
def interpreted(auto_triton):
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    if hasattr(builder.options, 'sanitize_overflow'):
        auto_triton.setattr(builder, 'options', dataclasses.replace(builder.options, sanitize_overflow=False))
    was = plans.INTERPRET
    tb.use_interpreter(True)
    yield auto_triton
    tb.use_interpreter(was)


class _Poisoned:
    """A kernel table entry that launches the real kernel, then overwrites its output (argument ``index``)."""

    def __init__(self, kernel, index):
        self.kernel, self.index = kernel, index

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            args[self.index].fill_(float('nan'))
        return launch


@pytest.mark.slow
def test_real_kernels_pass_then_poisoned_grad_fails(interpreted, caplog):
    """The interpreted kernels pass their check (its one-time cost is measured here); a grad-value kernel made
    to write NaN fails it in the backward, named, and the two-window op falls back to torch."""
    s, k, (b, g, h, w, c) = 3, 5, (1, 2, 6, 7, 4)
    x = torch.randn(b, 2 * g * c, h, w).to(memory_format=torch.channels_last)
    logits = torch.randn(b, g, h, w, s * s + k * k)
    rpbs = torch.randn(g, 2 * s - 1, 2 * s - 1), torch.randn(g, 2 * k - 1, 2 * k - 1)
    start = time.perf_counter()
    dispatch.contmix_softmax_av(x, logits, *rpbs, s, k)
    first = time.perf_counter() - start
    assert list(selfcheck._results.values()) == [None]
    start = time.perf_counter()
    dispatch.contmix_softmax_av(x, logits, *rpbs, s, k)
    print(f'self-check under the interpreter: first call {first:.2f} s, next {time.perf_counter() - start:.2f} s')

    interpreted.setattr(plans, '_KERNELS', {**plans._KERNELS, 'grad_value': _Poisoned(plans._KERNELS['grad_value'], 4)})
    interpreted.setattr(selfcheck, '_results', {})
    with caplog.at_level(logging.WARNING, logger='models.ops'):
        out = dispatch.contmix_softmax_av(x, logits, *rpbs, s, k)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 'contmix_softmax_av' in line and 'grad_x: non-finite values' in line
    assert torch.allclose(out, dispatch.contmix_softmax_av(x, logits, *rpbs, s, k, backend='torch'))


@pytest.mark.slow
def test_real_kernels_compiled_graph(interpreted):
    """The real check while torch.compile traces: no graph break, the Triton op in the graph."""
    logits, rpb, value, k = _inputs()
    fn = torch.compile(lambda lg, r, v: dispatch.na2d_softmax_av(lg, r, v, k), fullgraph=True, backend='eager')
    got = fn(logits, rpb, value)
    assert list(selfcheck._results.values()) == [None]
    assert torch.allclose(got, dispatch.na2d_softmax_av(logits, rpb, value, k, backend='torch'), atol=1e-6)


def test_first_call_under_inference_and_autocast(auto_triton):
    """The first call may come from an evaluation (inference_mode) under autocast: the check still runs its
    backward and compares like with like, so a correct op passes."""
    calls = _stand_in(auto_triton, lambda out, logits: out)
    logits, rpb, value, k = _inputs()
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        dispatch.na2d_softmax_av(logits, rpb, value, k)
    assert list(selfcheck._results.values()) == [None] and len(calls) == 2
