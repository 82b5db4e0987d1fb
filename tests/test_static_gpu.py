"""The static GPU model (utils/measure/static_gpu.py) on small shapes: compiles for sm_90 on the CPU."""
import pytest
import torch

pytest.importorskip('triton')
from utils.measure import sass, static_gpu  # noqa: E402

pytestmark = pytest.mark.skipif(not sass.has_toolchain(), reason='no sm_90 toolchain (ptxas/nvdisasm) in triton')


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0020*/                   FFMA R3, R3, R4, R5 ;
        /*0030*/                   IADD3 R7, R7, 0x4, RZ ;
        /*0040*/                   ISETP.NE.U32.AND P1, PT, R7, 0xa8, PT ;
        /*0050*/               @P1 BRA `(.L_x_1) ;
        /*0060*/                   ISETP.GE.AND P0, PT, R2, R9, PT ;
        /*0070*/              @!P0 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
        /*00a0*/                   NOP;
"""


def test_sass_loops():
    """Nested loops: each body counts its own instructions; a constant exit test gives the passes (bound over
    the counter's step, the unroll factor); a runtime one gives none; the trap loop and NOPs are ignored."""
    outside, loops = sass.sass_loops(SASS)
    assert outside == 2  # MOV, EXIT
    outer, inner = loops
    assert (outer.body, outer.passes, outer.unroll) == (3, None, 1)  # IADD3, ISETP, BRA
    assert (inner.body, inner.passes, inner.unroll) == (4, 0xa8 / 4, 4)


UNIFORM_SASS = """
.L_x_0:
        /*0000*/                   FFMA R3, R3, R4, R5 ;
        /*0010*/                   UIADD3 UR5, UP0, UR5, 0x1a, URZ ;
        /*0020*/                   UIADD3.X UR6, URZ, UR6, URZ, UP0, !UPT ;
        /*0030*/                   UISETP.NE.U32.AND UP0, UPT, UR5, 0x152, UPT ;
        /*0040*/                   UISETP.NE.U32.AND.EX UP0, UPT, UR6, URZ, UPT, UP0 ;
        /*0050*/                   PLOP3.LUT P0, PT, PT, PT, UP0, 0x80, 0x0 ;
        /*0060*/               @P0 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
"""


def test_sass_loop_uniform_counter():
    """A loop whose counter and exit test live in uniform registers (the test moved into the branch's
    predicate by PLOP3) still gets its passes: bound over step, 0x152 / 0x1a = 13."""
    _, (loop,) = sass.sass_loops(UNIFORM_SASS)
    assert (loop.body, loop.passes, loop.unroll) == (7, 13, 0x1a)


@pytest.mark.slow
def test_small_model_rows(tiny_kwargs):
    """A tiny OverLoCK, training step: every launch compiles, counts add up, the estimate is a max of bounds."""
    calls = static_gpu.launch_inputs('overlock_xt', 2, 64, torch.float32, **tiny_kwargs)
    assert calls and all(c.logits.device.type == 'meta' for c in calls)
    call = calls[0]
    assert call.x.is_contiguous(memory_format=torch.channels_last)  # value channel-last, as under AMP
    assert call.logits.shape[-1] == call.small ** 2 + call.large ** 2
    rows = static_gpu.step_rows(calls[:1], backward=True)
    kernels = [r for r in rows if not r.kernel.startswith('torch')]
    k, s = call.large, call.small
    assert [r.label.split(' ', 3)[-1] for r in kernels] == [
        f'fwd K{s}', f'fwd K{k}', f'grad_logits K{s}', f'grad_value K{s}', f'grad_logits K{k}', f'grad_value K{k}']
    for r in kernels:
        assert r.registers > 0 and r.spill_bytes == 0 and 0 < r.occupancy <= 1
        assert r.warp_instructions > r.programs  # at least one instruction per program
        assert r.estimate_s == max(r.issue_s, r.memory_s) and 0 < r.roofline_share <= 1
    # the small window's forward moves its logits, rpb, value half in, out half and lse out, nothing more
    b, c, h, w = call.x.shape
    g = call.logits.shape[1]
    expected = (b * g * h * w * s * s + call.rpb_small.numel() + 2 * b * c // 2 * h * w + b * g * h * w) * 4
    assert kernels[0].min_bytes == expected
    table = static_gpu.format_table(rows)
    assert 'Per step' in table and table.count('\n| ') >= len(kernels)


@pytest.mark.slow
def test_cli(capsys, tmp_path):
    out = tmp_path / 'table.md'
    static_gpu.main(['--model', 'overlock_xt', '--batch', '1', '--img-size', '64', '--mode', 'infer',
                     '--out', str(out)])
    text = capsys.readouterr().out
    assert 'overlock_xt_reparam' in text and 'bf16' in text.replace('torch.bfloat16', 'bf16')
    assert out.read_text().strip() == text.strip()


@pytest.mark.slow
def test_measured_beside_estimates(tiny_kwargs):
    """``--measure`` times every launch of the rows on random data in the model's layout (here under Triton's
    interpreter, so only the plumbing is checked): one time per launch, in the table beside the estimate."""
    from models.ops import triton_plans as tb
    small_windows = dict(tiny_kwargs, kernel_size=[5, 5, 5, 5], smk_size=3)  # interpreter time grows with K^2
    calls = static_gpu.launch_inputs('overlock_xt', 1, 32, torch.float32, **small_windows)[:1]
    was = tb.INTERPRET
    tb.use_interpreter(True)
    try:
        rows = static_gpu.step_rows(calls, backward=True, measure_on=torch.device('cpu'), repeat=1)
    finally:
        tb.use_interpreter(was)
    kernels = [r for r in rows if not r.kernel.startswith('torch')]
    assert len(kernels) == 6 and all(r.measured_s > 0 for r in kernels)
    assert all(r.measured_share == r.memory_s / r.measured_s for r in kernels)
    table = static_gpu.format_table(rows)
    assert 'measured µs' in table and 'Measured: Triton kernels' in table
    assert table.splitlines()[1].count('---') == 17


def test_spills_are_read():
    """A register cap too tight for the forward makes ptxas spill, and the model reports those bytes (ptxas
    counts them in the stack frame, not as LOCAL)."""
    import dataclasses

    from models.ops import triton_plans as tb
    k, (b, g, h, w, c) = 5, (1, 2, 14, 14, 16)
    logits = torch.empty(b, g, h, w, k * k, device='meta')
    value = torch.empty(b, g, h, w, c, device='meta')
    rpb = torch.empty(g, 2 * k - 1, 2 * k - 1, device='meta')
    launch = tb.plan_forward(logits, rpb, value, k, gpu=True)[0]
    tight = sass.kernel_code(dataclasses.replace(launch, max_registers=40))
    assert tight.registers <= 40 and tight.spill_bytes > 0


def test_measure_needs_cuda(monkeypatch):
    from models.ops import triton_plans as tb
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(tb, 'INTERPRET', False)
    with pytest.raises(SystemExit):
        static_gpu.parse_args(['--measure'])


def test_bad_batch():
    with pytest.raises(SystemExit):
        static_gpu.parse_args(['--batch', '0'])
