"""The fused inference form (models.fused): the same logits as the model it is built from, in every form and
configuration, against the original's golden outputs, and through the exporters."""
import copy

import pytest
import timm
import torch
from torch import nn

import models
from models.fused import FusedOverLoCK, fuse
from tests.helpers import DATA, TINY_KWARGS, randomize_bn_stats, tiny_model
from tests.reference import rel_err
from tests.test_model_golden import assert_matches_float32_golden, fill_reference


@torch.no_grad()
def _random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter away from its initialisation (GRN and LayerScale start at zero or one, which would hide
    a wrong fold), and BatchNorm statistics that are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    randomize_bn_stats(model, seed)
    return model.eval()


def _tiny64(**kwargs) -> nn.Module:
    return _random_weights(tiny_model(**kwargs).double())


@pytest.mark.parametrize('size', [(64, 64), (37, 45), (96, 70)])
@pytest.mark.parametrize('res_scale', [True, False])
def test_fused_equals_the_model_in_float64(size, res_scale):
    """Both LayerScale placements; 37x45 runs ContMix on upsampled maps (smaller than its windows)."""
    model = _tiny64(res_scale=res_scale)
    x = torch.randn(3, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), fuse(model)(x)
    assert out.shape == ref.shape == (3, 7)
    assert rel_err(out, ref) < 1e-12


def test_fused_from_training_and_deploy_forms_and_the_model_is_left_alone():
    model = _tiny64()
    keys = list(model.state_dict())
    deploy = timm.create_model('overlock_xt_reparam', **TINY_KWARGS, num_classes=7, use_gemm=False).double()
    deploy.load_state_dict(models.reparameterize(copy.deepcopy(model)).state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        a, b, ref = fuse(model)(x), fuse(deploy)(x), model(x)
    assert rel_err(a, ref) < 1e-12 and rel_err(b, ref) < 1e-12
    assert list(model.state_dict()) == keys  # the model keeps its layout
    assert any('dil_conv' in k for k in model.state_dict())  # still the training form


def test_fused_features_and_head_are_the_models():
    """timm's split of the forward: the Focus-Net map, the logits from it, and the pre-logits."""
    model = _tiny64()
    fused = fuse(model)
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model.forward_features(x), fused.forward_features(x)
        assert out.shape == ref.shape and rel_err(out, ref) < 1e-12
        for pre_logits in (False, True):
            ref_head = model.forward_head(ref, pre_logits=pre_logits)
            assert rel_err(fused.forward_head(ref.contiguous(), pre_logits=pre_logits), ref_head) < 1e-12


@pytest.mark.parametrize('case', ['pre_logits', 'map'])
def test_fused_without_classifier_or_pooling(case):
    kwargs = dict(num_classes=0) if case == 'pre_logits' else dict(global_pool='')
    model = _tiny64(**kwargs)
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), fuse(model)(x)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-12


def test_fused_xt_matches_the_originals_golden_logits():
    """OverLoCK-XT with the reference fill: float64 logits round to the original's float32 values; in float32
    within 1e-5 (as the model itself)."""
    golden = torch.load(DATA / 'golden_overlock_xt.pt', weights_only=True)
    model = timm.create_model('overlock_xt', use_gemm=False, use_ds=True).double()  # the fill's key order
    fill_reference(model)
    fused64 = fuse(model.eval())
    fused32 = fuse(model.float())
    with torch.no_grad():
        for inp in ('x160x192',):  # non-square; x224 is the model's own golden test
            x = golden['inputs'][inp]
            assert_matches_float32_golden(fused64(x.double()), golden[f'{inp}/eval'])
            assert rel_err(fused32(x), golden[f'{inp}/eval']) < 1e-5


def test_fused_runs_channels_last_from_stem_to_head():
    """No activation goes back to NCHW: every depthwise convolution sees a channels-last view."""
    model = fuse(_tiny64())
    seen = []
    conv2d = torch.nn.functional.conv2d

    def spy(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return conv2d(x, *args, **kwargs)

    torch.nn.functional.conv2d = spy
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    finally:
        torch.nn.functional.conv2d = conv2d
    assert seen and all(seen)


def test_fuse_refuses_other_models_and_headless_ones():
    from models.dense import create_backbone
    with pytest.raises(TypeError, match='expects an OverLoCK model'):
        fuse(timm.create_model('resnet10t'))
    with pytest.raises(TypeError, match='needs an OverLoCK classifier with its head'):
        fuse(create_backbone('overlock_xt', **TINY_KWARGS))


def test_runtimes_take_a_headless_overlock_in_deploy_form():
    """A model pruned to its features cannot be fused; the runtimes run (and export) its deploy form."""
    from utils.runtime import inference_form
    model = _random_weights(tiny_model())
    model.prune_intermediate_layers(prune_head=True)
    x = torch.randn(2, 3, 64, 64)
    for runtime in ('eager', 'onnxruntime'):
        form = inference_form(model, runtime)
        assert not isinstance(form, FusedOverLoCK) and not any('dil_conv' in k for k in form.state_dict())
        with torch.no_grad():
            assert rel_err(form(x), model(x)) < 1e-5
    assert isinstance(inference_form(_random_weights(tiny_model()), 'onnxruntime'), FusedOverLoCK)


def test_half_precision_grn_sums_its_squares_in_float32():
    """A 56x56 map of values around 5 overflows a float16 sum of squares (65504); the model's vector_norm does
    not, and neither does the fused form."""
    from models.fused import _grn_scale
    x = torch.full((1, 56, 56, 4), 5.0)
    gamma = torch.ones(4)
    for dtype in (torch.float16, torch.bfloat16):
        out = _grn_scale(x.to(dtype), gamma.to(dtype))
        assert torch.isfinite(out).all() and torch.allclose(out.float(), _grn_scale(x, gamma), rtol=1e-2)
    model = _random_weights(tiny_model()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), fuse(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert torch.isfinite(out).all() and rel_err(out, ref) < 5e-2


def test_fused_module_is_built_for_inference():
    fused = fuse(_tiny64())
    assert isinstance(fused, FusedOverLoCK) and not fused.training
    assert not any(p.requires_grad for p in fused.parameters())  # folded: nothing to train
    assert fused.num_classes == 7 and fused.pretrained_cfg['architecture'] == 'overlock_xt'


def test_fused_compiles_without_graph_breaks():
    """Dynamo captures the whole fused model in one graph (fullgraph), through AOTAutograd; inductor's C++
    build of the full model is left to the benchmark (minutes on 2 cores; its lowering of the ContMix op is
    tested in test_model.py)."""
    model = _random_weights(tiny_model()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(fuse(model), fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


# --- the runtimes ------------------------------------------------------------------------------------------------

def _installed(*names: str) -> bool:
    import importlib.util
    return all(importlib.util.find_spec(n) is not None for n in names)


@pytest.mark.parametrize('runtime', [
    'eager',
    pytest.param('onnxruntime', marks=[  # the fast tier: test_onnx.py's export for each runtime
        pytest.mark.slow, pytest.mark.skipif(not _installed('onnxruntime', 'onnxscript'),
                                             reason='onnxruntime not installed')]),
    pytest.param('openvino', marks=[
        pytest.mark.slow, pytest.mark.skipif(not _installed('openvino', 'onnxscript'),
                                             reason='openvino (optional) not installed')]),
])  # compile: test_fused_compiles_without_graph_breaks
def test_every_runtime_gives_the_models_logits(runtime):
    from utils.runtime import prepare
    model = _random_weights(tiny_model()).eval()
    x = torch.randn(3, 3, 64, 64)
    module, seconds = prepare(model, runtime, (3, 64, 64), threads=1)
    with torch.no_grad():
        ref, out = model(x), module(x)
    assert seconds >= 0 and out.shape == ref.shape and rel_err(out, ref) < 1e-5, runtime


def test_unknown_runtime_is_one_line():
    from utils.cli import UsageError
    from utils.runtime import prepare
    with pytest.raises(UsageError, match='choose one of eager, compile, onnxruntime, openvino'):
        prepare(tiny_model(), 'tensorrt', (3, 64, 64))


def test_validate_on_a_runtime_scores_as_the_model(data_dir, tiny_checkpoint, tmp_path, cli):
    import csv

    import validate
    from tests.test_validate_reparam import COMMON
    results = tmp_path / 'r.csv'
    runs = [[], ['--runtime', 'eager']]  # the exported runtimes' logits: test_every_runtime_gives_the_models_logits
    for extra in runs:
        code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', '--checkpoint', str(tiny_checkpoint),
                                        '--results-file', str(results), *COMMON, *extra])
        assert code == 0, err
    with open(results) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) and len({(r['top1'], r['top5']) for r in rows}) == 1
    assert len({round(float(r['loss']), 4) for r in rows}) == 1


def test_validate_runtime_refuses_what_it_cannot_run(data_dir, tiny_checkpoint, cli):
    import validate
    from tests.test_validate_reparam import COMMON
    code, out, err = cli(validate, [str(data_dir), '--checkpoint', str(tiny_checkpoint), *COMMON,
                                    '--runtime', 'eager', '--amp'])
    assert code != 0 and 'does not combine with --amp' in err and 'Traceback' not in err
    code, out, err = cli(validate, [str(data_dir), '--checkpoint', str(tiny_checkpoint), *COMMON,
                                    '--runtime', 'eager', '--test-pool'])
    assert code != 0 and 'does not combine with --test-pool' in err and 'Traceback' not in err
    code, out, err = cli(validate, [str(data_dir), '--onnx', 'x.onnx', '--runtime', 'compile'])
    assert code != 0 and 'runs on onnxruntime or openvino' in err and 'Traceback' not in err


def test_benchmark_deploy_mode_prints_runtimes_side_by_side(capsys):
    from scripts import benchmark
    from tests.helpers import tiny_cli_kwargs
    runtimes = ['eager']  # the others are prepared by utils.runtime.prepare, tested above
    benchmark.main(['--mode', 'deploy', '--models', 'overlock_xt', 'resnet10t', '--reference', 'resnet10t',
                    '--model-kwargs', *tiny_cli_kwargs(), '--img-size', '64', '--batch-sizes', '1', '2',
                    '--runtimes', *runtimes, '--rounds', '1', '--iters', '1', '--profile'])
    out = capsys.readouterr().out
    assert 'mode=deploy' in out and 'eager profile of overlock_xt' in out and 'GMACs per image' in out
    lines = [line for line in out.splitlines() if line.startswith('| overlock_xt |') and 'x |' in line]
    assert len(lines) == 2 * len(runtimes)
    assert all(line.split('|')[5].strip().endswith('x') for line in lines)  # vs_reference
    with pytest.raises(SystemExit, match='--runtimes tensorrt: choose from'):
        benchmark.main(['--mode', 'deploy', '--models', 'overlock_xt', '--runtimes', 'tensorrt'])
    with pytest.raises(SystemExit, match='needs --img-size >= 32'):
        benchmark.main(['--mode', 'deploy', '--models', 'overlock_xt', '--img-size', '16'])
    with pytest.raises(SystemExit, match='leave out --model-kwargs'):
        benchmark.main(['--mode', 'deploy', '--models', 'overlock_xt', '--original', '.', '--model-kwargs',
                        *tiny_cli_kwargs()])


@pytest.mark.slow
@pytest.mark.skipif(not _installed('openvino', 'onnxscript'), reason='openvino (optional) not installed')
def test_openvino_profile_lists_the_layers_of_a_call():
    from tests.helpers import TINY_KWARGS
    from utils.measure.deploy import openvino_profile
    table = openvino_profile('overlock_xt', batch=2, img_size=64, threads=1, model_kwargs=TINY_KWARGS, calls=2)
    lines = table.splitlines()
    assert lines[0].startswith('total ') and 'fastest of 2 calls' in lines[0]
    assert lines[2] == '| layer type | kernel | layers | ms | share |' and len(lines) > 5
    assert any('Convolution' in line for line in lines[4:])


def test_macs_by_kind_add_up_to_the_counted_macs():
    """The split the deploy benchmark prints: ResNet's convolutions and classifier, as FlopCounterMode counts
    them, and a depthwise layer of OverLoCK counted as such."""
    from utils.measure.macs import count_macs, macs_by_kind
    resnet = timm.create_model('resnet10t')
    size = (1, 3, 64, 64)
    macs = macs_by_kind(resnet, size)
    assert macs['depthwise'] == 0 and macs['pointwise'] > 0 and sum(macs.values()) == count_macs(resnet, size)
    model = tiny_model()
    macs = macs_by_kind(model, size)
    dw = model.blocks1[0].dwconv  # 3x3 depthwise at a quarter of 64: 16x16 positions
    assert macs['depthwise'] >= dw.out_channels * 16 * 16 * 9 and 0 < sum(macs.values()) < count_macs(model, size)


def test_original_release_code_is_built_beside_ours(tmp_path, monkeypatch):
    """A stand-in for a checkout of the release: its imports (natten, mmengine, timm's register_model) are
    served, and timm's registry keeps our models."""
    from utils.cli import UsageError
    from utils.measure.original import gather_na2d_av as original_gather, load_original
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / 'overlock.py').write_text(
        'import torch\n'
        'from natten.functional import na2d_av\n'
        'from mmengine.runner import load_checkpoint\n'
        'from timm.models.registry import register_model\n'
        'class Net(torch.nn.Module):\n'
        '    def reparam(self):\n'
        '        print("merging"); self.merged = True\n'
        '    def forward(self, attn, value):\n'
        '        return na2d_av(attn, value, kernel_size=3)\n'
        '@register_model\n'
        'def overlock_xt(pretrained=False):\n'
        '    return Net()\n')
    attn = torch.softmax(torch.randn(2, 3, 5, 6, 9), -1)
    value = torch.randn(2, 3, 5, 6, 4)
    from utils.measure import original
    gathers = []
    monkeypatch.setattr(original, 'gather_na2d_av', lambda *a: gathers.append(1) or original_gather(*a))
    for na2d in ('gather', 'op'):  # natten's na2d_av as a gather-einsum, and as our op
        model = load_original(str(tmp_path), 'xt', na2d=na2d)
        assert model.merged and not model.training
        torch.testing.assert_close(model(attn, value), models.ops.na2d_av(attn, value, 3))
        assert len(gathers) == 1  # the gather-einsum served the first, not the second
    assert type(timm.create_model('overlock_xt', **TINY_KWARGS)).__module__ == 'models.overlock'
    (tmp_path / 'models' / 'overlock.py').write_text('import a_package_not_installed_here\n')
    with pytest.raises(UsageError, match='imports a_package_not_installed_here, which is not installed'):
        load_original(str(tmp_path), 'xt')
    with pytest.raises(UsageError, match='no models/overlock.py there'):
        load_original(str(tmp_path / 'models'), 'xt')
