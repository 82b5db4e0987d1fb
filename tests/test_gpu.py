"""Correctness of the compiled Triton kernels on a CUDA device, at the variants' real ContMix shapes.

``test_node_check_case``: the cases of the GPU node check (``utils.measure.gpu_check.kernel_cases``, one list
for both): ``contmix_softmax_av`` (the op the model calls), ``na2d_softmax_av`` and ``na2d_av`` at every distinct
ContMix shape of the eight variants, batch 8, float32/float16/bfloat16 and AMP's mixes (low-precision logits,
float32 value and bias), value channels-last and channel-first: output and every input gradient.
``test_triton_matches_float64_reference``: OverLoCK-T's windows at the benchmarks' two batches: the output at both,
every input gradient at the training batch only (memory). Both against the torch backend run in float64 on the
same (rounded) inputs. Bound on the relative Frobenius error: float32 <= 1e-5, float16/bfloat16
(and their AMP mixes) <= 1e-2. Skipped without CUDA; the CPU path of the same kernels is tested through the
Triton interpreter elsewhere. ``python -m scripts.gpu_report`` runs these and tabulates the recorded errors.
"""
import math

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
]

BOUNDS = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
BATCHES = (128, 256)  # the training and inference batches of the GPU benchmarks


def _calls():
    """OverLoCK-T's distinct ContMix calls at 224 px, read off the model (only where the tests can run)."""
    if not torch.cuda.is_available():
        return []
    from utils.measure.shapes import na2d_calls
    return na2d_calls('overlock_t')


def _norm_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the whole tensor (Frobenius norm, float64)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.fixture(scope='module', autouse=True)
def _exact_fp32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _node_cases():
    """The GPU node check's kernel cases (only where the tests can run: reading the shapes builds 8 models)."""
    if not torch.cuda.is_available():
        return []
    import models
    from utils.measure.gpu_check import kernel_cases
    from utils.measure.shapes import contmix_block_calls
    return kernel_cases(contmix_block_calls(models.list_variants()), batch=8)


@pytest.mark.parametrize('case', _node_cases(), ids=lambda c: c.label.replace(' ', '-'))
def test_node_check_case(case, record_property):
    from utils.measure.gpu_check import BOUNDS, run_case
    errors = run_case(case, torch.device('cuda'))
    bound = BOUNDS[case.mix]
    record_property('shape', case.shape.label)
    record_property('worst_rel_err', max(errors.values()))
    record_property('bound', bound)
    bad = {k: v for k, v in errors.items() if not (math.isfinite(v) and v <= bound)}
    assert not bad, f'{case.label}: relative errors above {bound:g}: {bad}'


@pytest.mark.parametrize('batch', BATCHES)
@pytest.mark.parametrize('dtype', list(BOUNDS), ids=lambda d: str(d).replace('torch.', ''))
@pytest.mark.parametrize('fused', [False, True], ids=['na2d_av', 'fused'])
@pytest.mark.parametrize('call', _calls(), ids=lambda c: c.label.replace(' ', '-'))
def test_triton_matches_float64_reference(call, fused, dtype, batch, record_property):
    from utils.measure.ops import na2d_inputs, na2d_op
    backward = batch == BATCHES[0]  # gradients at the first batch size (memory), outputs at both
    device = torch.device('cuda')
    inputs = na2d_inputs(call, batch, dtype, device, fused)
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    ref_inputs = [t.double().requires_grad_(backward) for t in inputs]  # the same rounded numbers
    op, ref_op = na2d_op('triton', fused, call.kernel_size), na2d_op('torch', fused, call.kernel_size)
    with torch.set_grad_enabled(backward):
        out, ref = op(*leaves), ref_op(*ref_inputs)
    results = [('out', out, ref)]
    if backward:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
        names = ('logits', 'rpb', 'value') if fused else ('attn', 'value')
        results += [(f'grad {n}', g, r) for n, g, r in zip(names, grads, ref_grads)]
    bound = BOUNDS[dtype]
    errors = {what: _norm_rel_err(x, r) for what, x, r in results}
    record_property('shape', call.label)
    record_property('worst_rel_err', max(errors.values()))
    record_property('bound', bound)
    for what, x, _ in results:
        assert x.dtype == dtype, what
    bad = {k: v for k, v in errors.items() if not (math.isfinite(v) and v <= bound)}
    assert not bad, f'{call.label}: relative errors above {bound:g}: {bad}'
