"""Every registered variant, training and deploy form, at a small input: timm's model contract.

Forward (finite logits, both heads in training), backward reaching every parameter, ``reset_classifier`` and
``features_only``. Each variant keeps its own widths, heads, kernel sizes and MLP ratios; its depth is cut to
one block per stage (more blocks repeat blocks built the same way, and full depth costs minutes on a CPU; the
full-depth layouts are checked against the original in test_model_golden.py). 64 x 64 is the smallest input a
training-mode forward with batch 1 takes: BatchNorm needs more than one value per channel at the 2 x 2 /32 maps.
"""
import pytest
import timm
import torch
from torch import nn

import models

VARIANTS = timm.list_models('overlock_*')
ONE_BLOCK = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1])
SIZE = 64


def test_every_variant_is_swept():
    assert sorted(VARIANTS) == sorted(models.list_variants()) and len(VARIANTS) == 8


@pytest.mark.parametrize('name', VARIANTS)
def test_variant_contract(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, use_gemm=False, use_ds=True, **ONE_BLOCK)
    args = models.variant_args(name)
    assert model.embed_dim == args['embed_dim'] and model.blocks1[0].proj[1].kernel_size == args['kernel_size'][0]
    assert all(b.deploy == name.endswith('_reparam')
               for b in model.modules() if isinstance(b, models.DilatedReparamBlock))
    x = torch.randn(1, 3, SIZE, SIZE)

    out = model.train()(x)
    assert set(out) == {'main', 'aux'} and out['main'].shape == out['aux'].shape == (1, 5)
    (out['main'].square().mean() + 0.4 * out['aux'].square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f'{name}: no finite gradient for {no_grad[:5]}'

    model.eval()
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        logits = model.forward_head(final)
        assert logits.shape == (1, 5) and torch.isfinite(logits).all()
        model.reset_classifier(3)
        assert model.forward_head(final).shape == (1, 3) and model.aux_head[2].out_channels == 3
        model.reset_classifier(0)
        assert model.forward_head(final).shape == (1, model.head_hidden_size)
    assert isinstance(model.get_classifier(), nn.Identity)

    # features_only: timm's feature extractor of the same variant, given this model's trunk weights
    with torch.device('meta'):
        extractor = timm.create_model(name, features_only=True, use_gemm=False, **ONE_BLOCK)
    extractor.to_empty(device='cpu')
    extractor.load_state_dict({f'model.{k}': v for k, v in model.state_dict().items()
                               if not k.startswith(('head.', 'aux_head.'))})
    with torch.no_grad():
        maps = extractor.eval()(x)
    assert extractor.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[1] for f in maps] == extractor.feature_info.channels()
    assert [tuple(f.shape[2:]) for f in maps] == [(SIZE // r, SIZE // r) for r in (4, 8, 16, 32)]
    assert all(torch.equal(a, b) for a, b in zip(maps, feats))
