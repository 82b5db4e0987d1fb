"""Loading weights: the original release's layout, ours, deploy conversion, fine-tuning heads, bad files."""
import urllib.error

import pytest
import timm
import torch

import models
from tests.helpers import TINY_KWARGS, randomize_bn_stats, tiny_model as tiny


@pytest.fixture(scope='module')
def trained():
    """A tiny model with non-trivial weights and BN statistics, as a trained checkpoint would have."""
    torch.manual_seed(1)
    model = tiny(use_ds=True)  # the release's files hold the auxiliary head
    randomize_bn_stats(model, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize('layout', ['plain', 'state_dict', 'model', 'module_prefix', 'ema'])
def test_layouts_load_through_timm_file_overlay(tmp_path, trained, x, layout):
    sd = trained.state_dict()
    noise = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    obj = {
        'plain': sd,  # the original release saves a plain state_dict
        'state_dict': {'state_dict': sd, 'epoch': 3},
        'model': {'model': sd, 'optimizer': {'state': {}, 'param_groups': []}},
        'module_prefix': {'state_dict': {'module.' + k: v for k, v in sd.items()}},
        'ema': {'state_dict': noise, 'state_dict_ema': sd},  # pretrained loading prefers EMA weights
    }[layout]
    path = tmp_path / 'ckpt.pth'
    torch.save(obj, path)
    model = tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(logits(model, x), logits(trained, x))


def test_load_checkpoint_use_ema_switch(tmp_path, trained):
    sd = trained.state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / 'train.pth'
    torch.save({'state_dict': other, 'state_dict_ema': sd}, path)
    model = models.load_checkpoint(tiny(), path, use_ema=True)
    assert torch.equal(model.state_dict()['head.4.weight'], sd['head.4.weight'])
    model = models.load_checkpoint(tiny(), path, use_ema=False)
    assert torch.equal(model.state_dict()['head.4.weight'], other['head.4.weight'])
    torch.save(sd, path)
    with pytest.raises(models.CheckpointError, match='no EMA weights'):
        models.load_checkpoint(tiny(), path, use_ema=True)


def test_training_weights_load_into_deploy_variant(tmp_path, trained, x):
    path = tmp_path / 'train.pth'
    torch.save(trained.state_dict(), path)
    deploy = tiny('overlock_xt_reparam', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ref = logits(trained, x)
    assert float((logits(deploy, x) - ref).norm() / ref.norm()) < 1e-5
    assert models.is_deploy_state_dict(deploy.state_dict())


def test_deploy_weights_into_training_form_is_a_clear_error(tmp_path, trained):
    deploy = tiny(use_ds=True)
    deploy.load_state_dict(trained.state_dict())
    deploy.reparameterize()
    path = tmp_path / 'deploy.pth'
    torch.save({'state_dict': deploy.state_dict()}, path)
    with pytest.raises(models.CheckpointError, match='deploy form.*_reparam'):
        models.load_checkpoint(tiny(), path)
    models.load_checkpoint(tiny('overlock_xt_reparam'), path)  # the right target loads


def test_other_num_classes_reinitialises_both_heads(tmp_path, trained):
    path = tmp_path / 'in1k.pth'
    torch.save(trained.state_dict(), path)
    model = tiny(num_classes=3, use_ds=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head[4].out_channels == 3 and model.aux_head[2].out_channels == 3
    sd = model.state_dict()
    assert torch.equal(sd['head.0.weight'], trained.state_dict()['head.0.weight'])
    assert torch.equal(sd['sub_blocks3.0.rpb2'], trained.state_dict()['sub_blocks3.0.rpb2'])
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out['main'].shape == out['aux'].shape == (2, 3)


@pytest.mark.slow
def test_wrong_variant_lists_keys_and_names_the_fitting_variant(tmp_path):
    with torch.device('meta'):
        xt = timm.create_model('overlock_xt', use_gemm=False)
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in xt.state_dict().items()}
    path = tmp_path / 'xt.pth'
    torch.save(sd, path)
    with pytest.raises(models.CheckpointError) as err:
        models.load_checkpoint(tiny(), path)
    msg = str(err.value)
    assert 'does not fit' in msg and 'its keys fit overlock_xt' in msg
    assert 'unexpected keys' in msg and 'shape mismatches' in msg
    assert len(msg) < 800  # brief, not thousands of keys
    assert models.guess_variant(sd) == 'overlock_xt'
    assert models.guess_variant(tiny().state_dict()) is None


def test_other_architecture_hints_at_constructor_arguments(tmp_path, trained, caplog):
    """Same class count but other widths: an architecture mismatch, not a fine-tuning head swap."""
    path = tmp_path / 'tiny.pth'
    torch.save(trained.state_dict(), path)
    with pytest.raises(models.CheckpointError) as err:
        models.load_checkpoint(tiny(embed_dim=[16, 24, 32, 64]), path)
    assert 'shape mismatches' in str(err.value) and '--model-kwargs' in str(err.value)
    assert 'Re-initialising' not in caplog.text


@pytest.mark.parametrize('case', ['missing', 'truncated', 'not_torch', 'unsafe', 'directory', 'no_weights'])
def test_unreadable_checkpoints(tmp_path, trained, case):
    path = tmp_path / 'ckpt.pth'
    if case == 'truncated':
        torch.save(trained.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == 'not_torch':
        path.write_text('hello')
    elif case == 'unsafe':
        torch.save({'state_dict': trained.state_dict(), 'args': _Args()}, path)
    elif case == 'directory':
        path.mkdir()
    elif case == 'no_weights':
        torch.save({'epoch': 3, 'optimizer': {}}, path)
    expected = {'missing': 'does not exist', 'truncated': 'truncated', 'not_torch': 'truncated or not a PyTorch',
                'unsafe': 'weights_only', 'directory': 'is a directory', 'no_weights': 'holds no model weights'}[case]
    with pytest.raises(models.CheckpointError, match=expected) as err:
        models.load_checkpoint(tiny(), path)
    assert str(path) in str(err.value)


class _Args:  # a pickled custom object: refused by weights_only=True
    pass


@pytest.mark.parametrize('name', ['overlock_xt', 'overlock_xt_reparam'])
def test_pretrained_download_path_loads_release_file(monkeypatch, tmp_path, trained, x, name):
    """pretrained=True through timm's download: the release file (a plain training-form state_dict) loads,
    into the deploy form too (the original S/B _reparam constructors silently skipped this)."""
    path = tmp_path / 'overlock_xt_in1k_224.pth'
    torch.save(trained.state_dict(), path)
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return str(path)
    monkeypatch.setattr(timm.models._builder, 'download_cached_file', fake_download)
    model = tiny(name, pretrained=True)
    assert urls == ['https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_xt_in1k_224.pth']
    torch.testing.assert_close(logits(model, x), logits(trained, x), rtol=1e-5, atol=1e-5)


def test_pretrained_offline_says_how_to_load_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(timm.models._builder, 'download_cached_file', offline)
    with pytest.raises(models.CheckpointError, match=r'pretrained_cfg_overlay=dict\(file=.*--checkpoint'):
        timm.create_model('overlock_xt', pretrained=True)


def test_features_only_loads_a_local_file(tmp_path, trained, x):
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': trained.state_dict()}, path)
    extractor = tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True)
    with torch.no_grad():
        feats = extractor.eval()(x)
        _, expected = trained.forward_intermediates(x)
    assert len(feats) == 4 and all(torch.equal(a, b) for a, b in zip(feats, expected))
