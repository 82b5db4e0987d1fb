"""Exactness against the original implementation: state_dict layout of every variant and golden outputs.

The golden data (tests/data, copied from the reference) was computed by the original release with natten
0.17 in float64. The intermediate feature statistics are stored as float64; the logits were stored as
float32, so for them float64 agreement is checked to the float32 rounding of the stored values.
"""
import json

import pytest
import timm
import torch

import models
from tests.helpers import DATA
from tests.reference import rel_err

VARIANTS = ['overlock_xt', 'overlock_t', 'overlock_s', 'overlock_b']
ALL_VARIANTS = VARIANTS + [v + '_reparam' for v in VARIANTS]


@pytest.fixture(scope='module')
def manifest():
    with open(DATA / 'state_dict_manifest.json') as f:
        return json.load(f)


@pytest.fixture(scope='module')
def golden():
    return torch.load(DATA / 'golden_overlock_xt.pt', weights_only=True)


def test_registered_names():
    assert sorted(timm.list_models('overlock*')) == sorted(ALL_VARIANTS)


@pytest.mark.parametrize('name', ALL_VARIANTS)
def test_state_dict_matches_original(name, manifest):
    with torch.device('meta'):
        model = timm.create_model(name, use_ds=True)  # the release's layout: with the auxiliary head
    expected = manifest[name]
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == expected['state_dict']  # same keys, same order, same shapes
    assert sum(p.numel() for p in model.parameters()) == expected['params_total']
    no_aux = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('aux_head.'))
    assert no_aux == expected['params_without_aux_head']


def fill_reference(model: torch.nn.Module) -> None:
    """The deterministic weight fill of tests/data/README (reference/README.md), in float64."""
    gen = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    for key in sorted(sd):
        v = sd[key]
        shape, f64 = v.shape, dict(generator=gen, dtype=torch.float64)
        if key.endswith('num_batches_tracked'):
            continue
        if key.endswith('running_var'):
            new = torch.rand(shape, **f64) + 0.5
        elif key.endswith('running_mean'):
            new = (torch.rand(shape, **f64) - 0.5) * 0.2
        elif v.ndim == 1 and key.endswith('weight'):
            new = 1 + 0.1 * torch.randn(shape, **f64)
        elif v.ndim == 1:
            new = 0.05 * torch.randn(shape, **f64)
        elif v.ndim == 4:
            new = torch.randn(shape, **f64) / (shape[1] * shape[2] * shape[3]) ** 0.5
        else:
            new = 0.5 * torch.randn(shape, **f64)
        v.copy_(new)


def assert_matches_float32_golden(out64: torch.Tensor, ref32: torch.Tensor) -> None:
    """float64 logits must round to the stored float32 values (within one ulp)."""
    assert out64.dtype == torch.float64
    ulp = torch.finfo(torch.float32).eps * ref32.abs().clamp_min(1e-30)
    assert ((out64 - ref32.double()).abs() <= ulp).all()
    assert rel_err(out64, ref32) < 1e-7


@pytest.fixture(scope='module')
def model64():
    model = timm.create_model('overlock_xt', use_gemm=False, use_ds=True).double()
    fill_reference(model)
    return model


@pytest.mark.parametrize('inp', ['x224', 'x160x192'])
def test_golden_eval_float64(model64, golden, inp):
    x = golden['inputs'][inp].double()
    model64.eval()
    with torch.no_grad():
        base, ctx = model64.forward_base(x)
        focus = model64.forward_focus(base, ctx)
        logits = model64.forward_head(focus)
        pre = model64._stage(model64._stage(x, 0), 1)  # Base-Net stages 1-2
    stats = golden[f'{inp}/stats']
    for name, t in (('pre_features', pre), ('base_x', base), ('base_ctx', ctx), ('focus_x', focus)):
        ref = stats[name]
        assert list(t.shape) == ref['shape']
        assert abs(t.abs().sum().item() - ref['abs_sum']) <= 1e-9 * ref['abs_sum'], name
        assert abs(t.std().item() - ref['std']) <= 1e-9 * ref['std'], name
        assert abs(t.mean().item() - ref['mean']) <= 1e-9 * ref['std'], name
    assert_matches_float32_golden(logits, golden[f'{inp}/eval'])


def test_golden_train_and_reparam_float64(golden):
    """Training mode (batch-stat BN, both heads), then the fill again and reparam (reference procedure)."""
    model = timm.create_model('overlock_xt', use_gemm=False, use_ds=True).double()  # the auxiliary head: opt-in
    fill_reference(model)
    x = golden['inputs']['x160x192'].double()
    model.train()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {'main', 'aux'}
    assert_matches_float32_golden(out['main'], golden['x160x192/train_main'])
    assert_matches_float32_golden(out['aux'], golden['x160x192/train_aux'])
    fill_reference(model)  # the training pass moved the BN statistics
    model.eval().reparameterize()
    with torch.no_grad():
        assert_matches_float32_golden(model(x), golden['x160x192/eval_reparam'])


def test_golden_float32(golden):
    model = timm.create_model('overlock_xt', use_gemm=False, use_ds=True).double()
    fill_reference(model)
    model = model.float().eval()
    with torch.no_grad():
        for inp in ('x224', 'x160x192'):
            assert rel_err(model(golden['inputs'][inp]), golden[f'{inp}/eval']) < 1e-5
        model.reparameterize()
        for inp in ('x224', 'x160x192'):
            assert rel_err(model(golden['inputs'][inp]), golden[f'{inp}/eval_reparam']) < 1e-5


def test_deploy_state_dict_loads_into_reparam_variant(manifest):
    model = timm.create_model('overlock_xt', use_gemm=False, use_ds=True).eval()
    model.reparameterize()
    deploy = timm.create_model('overlock_xt_reparam', use_gemm=False, use_ds=True)
    deploy.load_state_dict(model.state_dict(), strict=True)
    assert [k for k in model.state_dict()] == [k for k, _ in manifest['overlock_xt_reparam']['state_dict']]
