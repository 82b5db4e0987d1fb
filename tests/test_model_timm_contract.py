"""timm's model contract: plain training loops, attributes, in_chans, torch.fx, TorchScript.

What timm's own tests/test_models.py and train.py expect of a classifier. The fast tier checks it on tiny
widths (tests.helpers.TINY_KWARGS), training and deploy form; the slow tier takes the smallest and the largest
variant at their own widths (fx and TorchScript: the largest), one block per stage, 64 x 64 inputs (see
test_model_variants.py for why that is representative).
"""
import logging

import pytest
import timm
import torch
import torch.fx
from timm.models import get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import models  # noqa: F401  (registers the overlock_* models with timm)
from tests.helpers import TINY_KWARGS

TINY = [('overlock_xt', True), ('overlock_xt_reparam', True)]
# The variants share one code path and differ in numbers (widths, depths, heads): the slow tier takes the
# smallest and the largest, training and deploy form, at their own widths.
ENDS = [pytest.param(v, False, marks=pytest.mark.slow) for v in timm.list_models('overlock_*')
        if v.startswith(('overlock_xt', 'overlock_b'))]
# torch.fx and TorchScript read the code, not the numbers: the tiny widths and the largest variant.
LARGEST = [p for p in ENDS if p.values[0].startswith('overlock_b')]
ONE_BLOCK = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], use_gemm=False)
SIZE = 64


def small(name: str, tiny: bool = True, **kwargs) -> nn.Module:
    """Tiny widths, or the variant's own widths at one block per stage; 5 classes, plain convs."""
    torch.manual_seed(0)
    return timm.create_model(name, **{**ONE_BLOCK, **(TINY_KWARGS if tiny else {}), 'num_classes': 5, **kwargs})


@pytest.mark.parametrize('name, tiny', TINY + ENDS)
def test_plain_cross_entropy_training_step(name, tiny):
    """The ten lines of any training loop: the training-mode output is the logits tensor."""
    model = small(name, tiny).train()
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([1, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss()(model(x), y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]  # no parameter left out of the default training output
    optimizer.step()
    assert torch.isfinite(loss)


def test_auxiliary_head_is_opt_in():
    x = torch.randn(2, 3, SIZE, SIZE)
    plain = small('overlock_xt')
    assert plain.aux_head is None and not any(k.startswith('aux_head.') for k in plain.state_dict())
    deep = small('overlock_xt', use_ds=True)
    out = deep.train()(x)
    assert set(out) == {'main', 'aux'} and out['main'].shape == out['aux'].shape == (2, 5)
    assert deep.eval()(x).shape == (2, 5)  # inference: the logits
    with pytest.raises(RuntimeError, match='use_ds=True'):
        plain.forward_aux(torch.randn(2, 48, 2, 2))


@pytest.mark.parametrize('name, tiny', TINY + [pytest.param('overlock_b', False, marks=pytest.mark.slow)])
def test_attribute_contract(name, tiny):
    """num_features: channels of forward_features; head_hidden_size: the pre-logits width (timm's definitions)."""
    model = small(name, tiny, use_ds=True).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[1] == model.num_features == model.embed_dim[3] * 5 // 4
        assert pre.shape == (1, model.head_hidden_size) and model.head_hidden_size == (64 if tiny else 1024)
        model.reset_classifier(7)
        assert model(x).shape == (1, 7) and model.aux_head[2].out_channels == 7  # both heads
        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.equal(model(x), pre)
        assert model.aux_head[2].__class__ is nn.Identity
        model.reset_classifier(0, '')
        assert model(x).shape == (1, model.head_hidden_size, 2, 2)
        model.reset_classifier(3, 'avg')
        assert model(x).shape == (1, 3)
        unpooled = small(name, tiny, num_classes=0, global_pool='').eval()
        assert unpooled(x).shape == (1, model.head_hidden_size, 2, 2)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, 'max')


@pytest.mark.parametrize('name', ['overlock_xt', 'overlock_xt_reparam'])
@pytest.mark.parametrize('in_chans', [1, 4])
def test_pretrained_file_into_other_in_chans(tmp_path, name, in_chans):
    """timm's adaptation of the first conv (adapt_input_conv) for pretrained weights with in_chans != 3."""
    rgb = small('overlock_xt', use_ds=True, num_classes=1000)
    path = tmp_path / 'release.pth'
    torch.save(rgb.state_dict(), path)
    model = small(name, num_classes=1000, in_chans=in_chans, pretrained=True,
                  pretrained_cfg_overlay=dict(file=str(path)))
    w, w_rgb = model.patch_embed1[0].weight, rgb.patch_embed1[0].weight
    assert w.shape[1] == in_chans
    if in_chans == 1:
        torch.testing.assert_close(w, w_rgb.sum(dim=1, keepdim=True))
    else:  # timm repeats the RGB filters and rescales by 3 / in_chans
        torch.testing.assert_close(w[:, :3], w_rgb * 3 / in_chans)
    torch.testing.assert_close(model.patch_embed2[0].weight, rgb.patch_embed2[0].weight)
    assert model.eval()(torch.randn(1, in_chans, SIZE, SIZE)).shape == (1, 1000)


def test_reinitialised_classifiers_are_logged_once_each(tmp_path, caplog):
    path = tmp_path / 'release.pth'
    torch.save(small('overlock_xt', use_ds=True).state_dict(), path)
    with caplog.at_level(logging.INFO, logger='models.weights'):
        small('overlock_xt', use_ds=True, num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    lines = [r.getMessage() for r in caplog.records if 'Re-initialising' in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith('Re-initialising head.4:') and 'aux_head.2:' in lines[1]


def _timm_tracer_kwargs():
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


@pytest.mark.parametrize('name, tiny', TINY[:1] + [pytest.param(*TINY[1], marks=pytest.mark.slow)] + LARGEST)
def test_fx_trace_forward_backward_and_feature_extraction(name, tiny):
    """torch.fx: plain symbolic_trace (forward and backward), torchvision's create_feature_extractor with and
    without timm's leaf registry, and timm's fx feature extractor; the same numbers as eager."""
    model = small(name, tiny).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        _, ref_feats = model.forward_intermediates(x)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), ref)
        for kwargs in ({}, dict(tracer_kwargs=_timm_tracer_kwargs())):
            extractor = create_feature_extractor(model, return_nodes={'head.4': 'out'}, **kwargs)
            assert torch.equal(extractor(x)['out'].flatten(1), ref)
        # a map from inside a ContMix block: the dynamic pieces are leaves, the layers around them nodes
        inner = create_feature_extractor(model, return_nodes={'sub_blocks3.0.gate.2': 'gate'})(x)['gate']
        assert inner.shape == (2, model.embed_dim[2], 4, 4)
    torch.manual_seed(0)
    fx_feats = timm.create_model(name, features_only=True, feature_cfg=dict(feature_cls='fx'),
                                 **{**ONE_BLOCK, **(TINY_KWARGS if tiny else {})})
    wanted = fx_feats.graph_module.state_dict()
    fx_feats.graph_module.load_state_dict({k: v for k, v in model.state_dict().items() if k in wanted})
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fx_feats.eval()(x), ref_feats))

    train = small(name, tiny).train()
    traced = torch.fx.symbolic_trace(train)
    loss = nn.CrossEntropyLoss()(traced(x), torch.tensor([0, 4]))
    loss.backward()
    assert all(p.grad is not None for p in traced.parameters())


@pytest.mark.slow  # compiling takes seconds per model on a CPU
@pytest.mark.parametrize('name, tiny', TINY + LARGEST)
def test_torchscript(name, tiny):
    """torch.jit.script compiles the training and deploy forms and gives the eager logits."""
    model = small(name, tiny).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.jit.script(torch.fx.symbolic_trace(model))(x), model(x))
