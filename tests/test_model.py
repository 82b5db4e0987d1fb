"""Model API: shapes at odd sizes, gradients, reparam equivalence, checkpointing, compile, bad input."""
import sys
import types

import pytest
import timm
import torch
from torch import nn

import models
from models import layers as layers_mod
from tests.helpers import TINY_KWARGS, randomize_bn_stats, tiny_model as tiny
from tests.reference import rel_err


@pytest.mark.parametrize('size', [(32, 32), (64, 96), (97, 45), (160, 192)])
def test_odd_sizes_and_batch_one(size):
    """Any size >= 32, square or not; the small ones take ContMix's resize path in both Focus-Net stages."""
    model = tiny().eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    assert feats.shape == (1, 48 + 12, -(-size[0] // 32), -(-size[1] // 32))


def test_real_variant_non_square():
    model = timm.create_model('overlock_xt', num_classes=5, use_gemm=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_train_mode_returns_both_heads_and_grads_reach_every_parameter():
    model = tiny(drop_path_rate=0.1, use_ds=True).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {'main', 'aux'} and out['main'].shape == out['aux'].shape == (2, 7)
    (out['main'].sum() + 0.4 * out['aux'].sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad


def test_use_ds_false_has_no_aux_head(tmp_path):
    model = tiny(use_ds=False).train()
    assert model.aux_head is None and not any(k.startswith('aux_head.') for k in model.state_dict())
    assert isinstance(model(torch.randn(2, 3, 32, 32)), torch.Tensor)
    model.reset_classifier(3)
    assert model.aux_head is None and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    path = tmp_path / 'full.pth'
    torch.save(tiny(use_ds=True).state_dict(), path)  # a checkpoint with the auxiliary head loads without it
    models.load_checkpoint(tiny(use_ds=False), path, strict=True)


def test_prune_intermediate_layers_drops_both_heads():
    model = tiny(use_ds=True).train()
    assert model.prune_intermediate_layers(indices=2) == [2, 3]
    assert model.aux_head is None and not any(k.startswith(('aux_head.', 'head.0')) for k in model.state_dict())
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, model.feature_info[-1]['num_chs'])


def test_drop_path_rates_follow_block_order():
    model = tiny(depth=[1, 2, 1, 1], sub_depth=[2, 1], drop_path_rate=0.7)
    rates = []
    for name in ('blocks1', 'blocks2', 'blocks3', 'blocks4'):
        rates += [blk.proj[-1].drop_prob if hasattr(blk.proj[-1], 'drop_prob') else 0. for blk in getattr(model, name)]
    for name in ('sub_blocks3', 'sub_blocks4'):
        rates += [getattr(blk.drop_path, 'drop_prob', 0.) for blk in getattr(model, name)]
    assert rates == pytest.approx(torch.linspace(0, 0.7, 8).tolist())


def test_forward_head_and_reset_classifier():
    model = tiny(use_ds=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        assert torch.equal(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.train()
    assert model(x)['aux'].shape == (2, 3)
    model.reset_classifier(0)
    model.eval()
    assert model(x).shape == (2, 64)
    assert isinstance(model.get_classifier(), nn.Identity)


def test_reparam_equivalence_and_idempotence():
    model = tiny()
    randomize_bn_stats(model)
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        models.reparameterize(model)
        out = model(x)
        models.reparameterize(model)  # second call is a no-op
        again = model(x)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out, again)
    assert not any('origin_bn' in k or 'dil_' in k for k in model.state_dict())
    deploy = timm.create_model('overlock_xt_reparam', **dict(TINY_KWARGS, num_classes=7, use_gemm=False))
    deploy.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(deploy.eval()(x), out)


def test_reparam_float64_exact():
    model = tiny().double()
    randomize_bn_stats(model)
    model.eval()
    x = torch.randn(1, 3, 48, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        out = model.reparameterize()(x)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize('how', ['method', 'reparam_alias', 'timm'])
def test_reparameterize_keeps_outputs_with_random_bn_statistics(how):
    """Merging folds every branch BatchNorm; with non-trivial statistics a wrong fold changes the outputs."""
    from timm.utils.model import reparameterize_model
    model = tiny()
    randomize_bn_stats(model, seed=2)
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        if how == 'timm':
            merged = reparameterize_model(model)  # a merged copy; the model itself stays as it was
            assert torch.equal(model(x), ref) and any('origin_bn' in k for k in model.state_dict())
        else:
            merged = getattr(model, 'reparameterize' if how == 'method' else 'reparam')()
            assert merged is model
        out = merged(x)
    blocks = [m for m in merged.modules() if isinstance(m, models.DilatedReparamBlock)]
    assert blocks and all(b.deploy and not hasattr(b, 'origin_bn') for b in blocks)
    assert not any('dil_' in k or 'origin_bn' in k for k in merged.state_dict())
    assert rel_err(out, ref) < 1e-5


def test_reparameterized_block_matches_training_form_in_float64():
    """One DilatedReparamBlock per branch table: the merged conv computes exactly what the branches did."""
    for k in sorted(models.layers.DILATED_REPARAM_BRANCHES):
        block = models.DilatedReparamBlock(4, k, use_gemm=False).double()
        randomize_bn_stats(block, seed=k)
        block.eval()
        x = torch.randn(1, 4, k + 4, k + 2, dtype=torch.float64)
        with torch.no_grad():
            ref = block(x)
            block.reparameterize()
            assert rel_err(block(x), ref) < 1e-12, f'kernel_size {k}'


def test_training_after_inference_mode():
    """Index tensors cached during a torch.inference_mode() forward must not break a later training step."""
    model = tiny(use_ds=True)
    x = torch.randn(2, 3, 64, 96)  # a size no other test has cached yet
    with torch.inference_mode():
        model.eval()(x)
    out = model.train()(x)
    (out['main'].sum() + out['aux'].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_input():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(out, ref) < 1e-5


STAGE_BLOCKS = (('blocks1',), ('blocks2',), ('blocks3', 'sub_blocks3'), ('blocks4', 'sub_blocks4'))


@pytest.mark.parametrize('how, stages', [
    ('set_grad_checkpointing', [1, 1, 1, 1]),
    ('set_grad_checkpointing_stages', [1, 0, 0, 0]),
    ('use_checkpoint', [1, 0, 1, 0]),  # the constructor argument (the original's --ckpt-stg)
])
def test_gradient_checkpointing_recomputes_and_keeps_outputs_and_gradients(how, stages):
    """Checkpointed blocks run twice (forward, then again in the backward), the others once, and outputs and
    gradients equal those of the plain model."""
    ref_model = tiny(use_ds=True).train()
    if how == 'use_checkpoint':
        model = tiny(use_checkpoint=stages, use_ds=True).train()
    else:
        model = tiny(use_ds=True).train()
        getattr(model, how)(*(() if how == 'set_grad_checkpointing' else (stages,)))
    model.load_state_dict(ref_model.state_dict())
    calls = {}

    def counted(name, forward):
        def wrapper(*args):  # forward hooks do not see the recomputation; the forward method does
            calls[name] = calls.get(name, 0) + 1
            return forward(*args)
        return wrapper

    for stage in STAGE_BLOCKS:
        for name in stage:
            block = getattr(model, name)[0]
            block.forward = counted(name, block.forward)
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    for m in (ref_model, model):
        out = m(x)
        (out['main'].square().mean() + 0.4 * out['aux'].square().mean()).backward()
        outputs.append(out)
    assert calls == {name: 2 if n else 1 for stage, n in zip(STAGE_BLOCKS, stages) for name in stage}
    for key in ('main', 'aux'):
        torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=1e-5, atol=1e-6)
    for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """Dynamo + AOTAutograd capture of the whole model, without inductor's C++ build (minutes for the whole
    model on 2 CPU cores); the next test compiles one ContMix block with inductor."""
    torch._dynamo.reset()
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=False, backend='aot_eager')
    with torch.no_grad():
        ref = model(x)
        out = compiled(x)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.slow
def test_contmix_block_compiles_with_inductor_without_graph_breaks():
    """Inductor lowers a ContMix block (its custom op and the layers around it) and matches eager. Its C++ is
    built without SIMD: the lowering is what is checked, and the vectorised build takes twice as long."""
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    block = models.DynamicConvBlock(32, 48, kernel_size=7, num_heads=2, ls_init_value=1., res_scale=True).eval()
    x, ctx = torch.randn(1, 32, 9, 11), torch.randn(1, 12, 9, 11)
    explanation = torch._dynamo.explain(block)(x, ctx, ctx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    with torch.no_grad(), inductor_config.patch({'cpp.vec_isa_ok': False}):
        ref = block(x, ctx, ctx)[0]
        out = torch.compile(block)(x, ctx, ctx)[0]
    assert rel_err(out, ref) < 1e-5


def test_bfloat16_forward():
    model = tiny().eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_create_model_overrides_any_constructor_argument():
    model = timm.create_model('overlock_t', depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[8, 16, 32, 64],
                              sub_num_heads=[2, 4], projection=32, num_classes=3, drop_path_rate=0.2, use_ds=True)
    assert len(model.blocks1) == 1 and model.embed_dim == [8, 16, 32, 64]
    assert model.head[4].out_channels == 3 and model.aux_head[2].out_channels == 3
    assert model.pretrained_cfg['crop_pct'] == 0.95


@pytest.mark.parametrize('name, crop', [('overlock_xt', 0.925), ('overlock_t', 0.95), ('overlock_s', 0.95),
                                        ('overlock_b', 0.975), ('overlock_b_reparam', 0.975)])
def test_pretrained_cfg(name, crop):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.crop_pct == crop and cfg.interpolation == 'bicubic' and cfg.num_classes == 1000
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    short = name.split('_')[1]
    assert cfg.url == f'https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_{short}_in1k_224.pth'
    # the classifier and first conv entries name real layers of the default model (timm adapts and drops them)
    with torch.device('meta'):
        model = timm.create_model(name)
    assert isinstance(model.get_submodule(cfg.classifier), nn.Conv2d) and cfg.classifier == 'head.4'
    assert model.get_submodule(cfg.first_conv).in_channels == 3
    assert cfg.min_input_size == (3, models.MIN_INPUT_SIZE, models.MIN_INPUT_SIZE)


# --- bad input ----------------------------------------------------------------------------------------------

def test_unknown_model_name_lists_overlock_models():
    with pytest.raises(ValueError, match='overlock_xt.*overlock_b_reparam'):
        models.create_overlock('overlock_xxl')


def test_kernel_size_without_table():
    with pytest.raises(ValueError, match='kernel_size=21'):
        tiny(kernel_size=[21, 15, 13, 7])


@pytest.mark.parametrize('shape', [(1, 1, 64, 64), (1, 3, 31, 64), (3, 64, 64)])
def test_bad_input_shape(shape):
    model = tiny().eval()
    with pytest.raises(ValueError, match=r'\[' + ', '.join(map(str, shape)) + r'\]'):
        model(torch.randn(*shape))


def test_in_chans_argument():
    model = tiny(in_chans=1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)


# --- optional iGEMM large-kernel conv -----------------------------------------------------------------------

class _FakeIGEMM(nn.Conv2d):
    def __init__(self, channels, kernel_size, bias=False):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)


@pytest.fixture
def fake_igemm(monkeypatch):
    module = types.ModuleType('depthwise_conv2d_implicit_gemm')
    module.DepthWiseConv2dImplicitGEMM = _FakeIGEMM
    module.__spec__ = types.SimpleNamespace(name='depthwise_conv2d_implicit_gemm')
    monkeypatch.setitem(sys.modules, 'depthwise_conv2d_implicit_gemm', module)
    monkeypatch.setattr(layers_mod, '_IGEMM_PROBED', False)
    monkeypatch.setattr(layers_mod, '_IGEMM_CLS', None)
    monkeypatch.setattr(layers_mod.importlib.util, 'find_spec', lambda name: module.__spec__)
    yield
    layers_mod._IGEMM_PROBED = False


def test_igemm_used_when_installed_and_plain_conv_when_disabled(fake_igemm):
    block = models.DilatedReparamBlock(8, 13, use_gemm=True)
    assert isinstance(block.lk_origin, _FakeIGEMM)
    assert models.DilatedReparamBlock(8, 5, use_gemm=True).lk_origin.__class__ is nn.Conv2d  # K <= 5
    assert models.DilatedReparamBlock(8, 13, use_gemm=False).lk_origin.__class__ is nn.Conv2d
    block.eval()
    x = torch.randn(1, 8, 20, 20)
    ref = block(x)
    block.reparameterize()
    assert isinstance(block.lk_origin, _FakeIGEMM)
    assert rel_err(block(x), ref) < 1e-5


def test_forward_intermediates_and_features_only():
    """timm's feature API: the original's dense-prediction taps (stage 1, stage 2, Focus-Net /16, output)."""
    torch.manual_seed(0)
    model = tiny().eval()
    randomize_bn_stats(model)
    x = torch.randn(2, 3, 97, 45)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x)) and torch.equal(feats[3], final)
        assert [f.shape[1] for f in feats] == [info['num_chs'] for info in model.feature_info]
        assert [f.shape[2:] for f in feats] == [(25, 12), (13, 6), (7, 3), (4, 2)]  # /4 /8 /16 /32, ceil
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert len(early) == 2 and all(torch.equal(a, b) for a, b in zip(early, feats))
        assert torch.equal(model.forward_intermediates(x, indices=1, intermediates_only=True)[0], feats[3])

        extractor = timm.create_model('overlock_xt', **TINY_KWARGS, features_only=True, out_indices=(1, 2, 3))
        extractor.load_state_dict({'model.' + k: v for k, v in model.state_dict().items()
                                   if not k.startswith(('head.', 'aux_head.'))})
        out = extractor.eval()(x)
    assert extractor.feature_info.channels() == [model.feature_info[i]['num_chs'] for i in (1, 2, 3)]
    assert extractor.feature_info.reduction() == [8, 16, 32]
    assert all(torch.equal(a, b) for a, b in zip(out, feats[1:]))
    assert not [k for k in extractor.state_dict() if 'head' in k]  # classifiers pruned


@pytest.mark.slow
def test_torch_export_of_deploy_form():
    """The deploy model exports with torch.export (the ContMix ops are custom ops with fake kernels) and the
    exported program, dynamic batch included, computes what the eager model does."""
    model = timm.create_model('overlock_xt_reparam', **TINY_KWARGS, num_classes=7).eval()
    randomize_bn_stats(model)
    x = torch.randn(2, 3, 64, 96)
    batch = torch.export.Dim('batch', min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert any('overlock' in str(n.target) for n in program.graph.nodes if n.op == 'call_function')
    x3 = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x3), model(x3), rtol=1e-5, atol=1e-6)


def test_model_package_has_no_import_cycle():
    """Imports inside models/ (module level or in functions) form no cycle: each module can be read alone."""
    import ast
    from tests.helpers import REPO
    root = REPO / 'models'
    graph = {}
    for path in root.rglob('*.py'):
        name = '.'.join(path.relative_to(REPO).with_suffix('').parts).removesuffix('.__init__')
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
                module = f'{base}.{node.module}' if node.module else base
                targets |= {f'{module}.{a.name}' for a in node.names} | {module}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                for a in node.names:
                    targets.add(module or a.name)
        graph[name] = targets
    graph = {m: {t for t in ts if t in graph and t != m and not m.startswith(t + '.')} for m, ts in graph.items()}

    def reaches(start, goal, seen):
        return any(t == goal or (t not in seen and reaches(t, goal, seen | {t})) for t in graph[start])
    cycles = [m for m in graph if reaches(m, m, {m})]
    assert not cycles, f'import cycles through {sorted(cycles)}'
