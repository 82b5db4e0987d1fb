"""The GPU node check (python -m scripts.gpu_check): its case list, table, verdict and fallback line with injected
results (fast), and the whole check on the CPU through the Triton interpreter (slow)."""
import math

import pytest
import torch

from tests.helpers import TINY_KWARGS, run_program
from utils.measure import gpu_check as gc
from utils.measure.shapes import ContMixCall, Na2dCall, contmix_block_calls


def _results(*statuses):
    return [gc.Result(f'check {i}', s, f'detail {i}', 0.5) for i, s in enumerate(statuses)]


def test_verdict_passes_when_nothing_failed():
    ok, line = gc.verdict(_results(gc.PASS, gc.SKIP, gc.PASS))
    assert ok and line.startswith('PASS') and '--na2d-backend' not in line
    ok, line = gc.verdict(_results(gc.PASS, gc.WARN))
    assert ok and 'warnings: check 1' in line


def test_one_failure_fails_the_verdict_and_prints_the_fallback_line():
    results = _results(gc.PASS, gc.FAIL, gc.SKIP)
    ok, line = gc.verdict(results)
    assert not ok and line.startswith('FAIL: 1 check(s) failed (check 1)')
    assert '--na2d-backend torch' in line and 'OVERLOCK_NA2D_BACKEND=torch' in line
    text = gc.render(results)
    assert text.splitlines()[-1] == line
    assert '| check 1 | FAIL | 0.5 | detail 1 |' in text


def test_script_exit_code_follows_the_verdict(monkeypatch, capsys, tmp_path):
    from scripts import gpu_check as script
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    for statuses, code in (((gc.PASS, gc.WARN), 0), ((gc.PASS, gc.FAIL), 1)):
        monkeypatch.setattr(script, 'run_checks', lambda cfg, skip, s=statuses: _results(*s))
        out = tmp_path / 'check.md'
        assert script.main(['--smoke', '--out', str(out)]) == code
        printed = capsys.readouterr().out
        assert printed.strip() == out.read_text().strip()
        assert ('--na2d-backend torch' in printed) == (code == 1)


def test_summary_row_per_op_and_dtype_names_the_first_failure():
    call = Na2dCall(2, 7, 7, 4, 5)
    ok_case = gc.Case('na2d_av', call, 'bf16', 'channels_last', 8)
    bad_case = gc.Case('na2d_av', call, 'bf16', 'channel_first', 8)
    crash = gc.Case('na2d_av', call, 'fp32', 'channel_first', 8)
    rows = gc.summarise_cases([
        (ok_case, {'out': 1e-3, 'grad0': 2e-3}, '', 1.0),
        (bad_case, {'out': 1e-3, 'grad1': math.inf}, '', 1.0),
        (crash, None, 'CompilationError: boom', 0.5),
    ])
    assert [(r.check, r.status) for r in rows] == [('kernels na2d_av bf16', gc.FAIL), ('kernels na2d_av fp32', gc.FAIL)]
    assert '1/2 cases' in rows[0].detail and 'channel_first' in rows[0].detail and 'grad1 error inf' in rows[0].detail
    assert 'CompilationError: boom' in rows[1].detail and rows[0].seconds == 2.0
    good = gc.summarise_cases([(ok_case, {'out': 1e-3}, '', 1.0)])
    assert good[0].status == gc.PASS and 'worst 1.0e-03 (bound 0.01)' in good[0].detail


def test_cases_cover_every_op_mix_layout_and_deduplicated_shape():
    calls = [ContMixCall(32, 4, 13, 13, 5, 13, 2), ContMixCall(48, 4, 7, 7, 5, 7, 1),
             ContMixCall(32, 4, 13, 13, 5, 13, 3)]  # the same block in another model: counted once
    cases = gc.kernel_cases(calls, 8)
    blocks, windows = 2, 4  # (13x13 c4 s5, 13x13 c4 K13, 7x7 c6 s5, 7x7 c6 K7)
    assert len(cases) == len(gc.MIXES) * len(gc.LAYOUTS) * (blocks + 2 * windows)
    assert {c.mix for c in cases} == set(gc.MIXES) and {c.layout for c in cases} == set(gc.LAYOUTS)
    assert {c.op for c in cases} == set(gc.OPS) and all(c.batch == 8 for c in cases)
    assert len({c.label for c in cases}) == len(cases)
    assert gc.MIXES['amp_bf16'] == (torch.bfloat16, torch.float32, torch.float32)


def test_block_calls_are_read_off_the_models():
    calls = contmix_block_calls(['overlock_xt_reparam'], 32, **TINY_KWARGS)
    # the tiny model's two Focus-Net stages, resized up to their window
    assert [(c.label, c.calls) for c in calls] == [('13x13 C32 G4 s5 K13', 1), ('7x7 C48 G4 s5 K7', 1)]
    assert calls[0].windows() == (Na2dCall(4, 13, 13, 4, 5), Na2dCall(4, 13, 13, 4, 13))


@pytest.mark.parametrize('op', gc.OPS)
def test_case_inputs_are_laid_out_as_the_model_runs_them(op):
    call = ContMixCall(32, 4, 7, 7, 3, 5)
    shape = call if op == 'contmix_softmax_av' else call.windows()[1]
    cl = gc.case_inputs(gc.Case(op, shape, 'amp_fp16', 'channels_last', 2), torch.device('cpu'))[0]
    cf = gc.case_inputs(gc.Case(op, shape, 'amp_fp16', 'channel_first', 2), torch.device('cpu'))[0]
    contmix = op == 'contmix_softmax_av'
    value_cl, value_cf = (cl[0], cf[0]) if contmix else (cl[-1], cf[-1])
    weights = cl[1] if contmix else cl[0]
    assert value_cl.dtype == torch.float32 and weights.dtype == torch.float16  # AMP: fp16 logits, fp32 value
    assert torch.equal(value_cl, value_cf)  # the same numbers, other strides
    assert value_cl.stride()[1 if contmix else -1] == 1  # channels innermost
    assert value_cf.stride()[3] == 1  # width innermost (dim 3 is W in both layouts of the arguments)


def test_run_case_compares_with_the_float64_reference(monkeypatch):
    """With the torch backend standing in for triton (and counted as triton) the errors are rounding only; a
    backend returning NaN is reported as an infinite error; an op that ran no Triton kernel is a failure."""
    from models import ops
    real = ops.contmix_softmax_av
    monkeypatch.setattr(ops, 'contmix_softmax_av', lambda *a, backend=None: real(*a, backend='torch'))
    case = gc.Case('contmix_softmax_av', ContMixCall(16, 2, 5, 5, 3, 5), 'fp32', 'channels_last', 2)
    with pytest.raises(RuntimeError, match='no Triton kernel ran'):
        gc.run_case(case, torch.device('cpu'))
    monkeypatch.setattr(gc._TritonOps, 'expect', lambda self, what: None)
    errors = gc.run_case(case, torch.device('cpu'))
    assert set(errors) == {'out', 'grad0', 'grad1', 'grad2', 'grad3'} and max(errors.values()) < 1e-5
    monkeypatch.setattr(ops, 'contmix_softmax_av',
                        lambda *a, backend=None: real(*a, backend='torch') * (float('nan') if backend else 1.0))
    assert gc.run_case(case, torch.device('cpu'))['out'] == math.inf


def test_no_gpu_is_a_one_line_error(monkeypatch, capsys):
    from scripts import gpu_check as script
    from utils.cli import run_cli
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: script.main([]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and '--smoke' in err


@pytest.mark.slow
def test_smoke_run_on_the_cpu(tmp_path):
    """The whole check on the CPU: Triton interpreter, tiny model, gloo; every check runs and passes."""
    out = tmp_path / 'check.md'
    proc = run_program(['-m', 'scripts.gpu_check', '--smoke', '--out', str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for op in gc.OPS:
        assert f'| kernels {op} amp_bf16 | PASS |' in text
    assert '| train step bfloat16 | PASS |' in text and '| 2-process step | PASS | ' in text
    assert 'gloo, 2 processes, torch backend' in text
    assert '| second device | SKIP |' in text and text.strip().splitlines()[-1].startswith('PASS')


def test_device_checks_skip_without_a_second_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    cfg = gc.CheckConfig()
    assert gc.second_device_check(cfg).status == gc.SKIP
    assert gc.dist_step_check(cfg).status == gc.SKIP
    assert gc.cache_check().status in (gc.PASS, gc.WARN)


@pytest.mark.slow
def test_train_step_agrees_when_both_backends_are_the_same(monkeypatch):
    """The training-step comparison itself: identical backends give identical losses and gradients."""
    from models import ops
    real = ops.set_backend
    monkeypatch.setattr(ops, 'set_backend', lambda name: real(None if name == 'triton' else name))
    monkeypatch.setattr(gc._TritonOps, 'expect', lambda self, what: None)
    cfg = gc.CheckConfig(device='cpu', model_kwargs=dict(TINY_KWARGS), train_model='overlock_xt', train_img_size=32,
                         train_batch=4)
    result = gc.train_step_check(cfg, torch.device('cpu'), 'bfloat16')
    assert result.status == gc.PASS and 'loss 0.0e+00' in result.detail and 'grad 0.0e+00' in result.detail
