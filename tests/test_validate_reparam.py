"""validate.py / reparam.py on tiny data: round trip, checkpoint layouts, bad input (one line, non-zero exit)."""
import csv
import os
import urllib.error

import pytest
import timm
import torch
from PIL import Image

import models
import reparam
import validate
from tests.helpers import TINY_KWARGS, run_program, tiny_cli_kwargs

KW = tiny_cli_kwargs()
COMMON = ['--model-kwargs', *KW, '--img-size', '32', '--crop-pct', '1.0', '-b', '4', '-j', '0', '--no-progress']


def top1(results):
    with open(results) as f:
        return [float(r['top1']) for r in csv.DictReader(f)]


def test_validate_reparam_round_trip(data_dir, tiny_checkpoint, tmp_path, cli, caplog):
    results = str(tmp_path / 'r.csv')
    code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', '--checkpoint', str(tiny_checkpoint),
                                    '--use-ema', '--results-file', results, *COMMON])
    assert code == 0, err
    assert '| overlock_xt |' in out
    deploy = str(tmp_path / 'deploy.pth')
    code, out, err = cli(reparam, ['--model', 'overlock_xt', '--checkpoint', str(tiny_checkpoint), '--output', deploy,
                                   '--img-size', '32', '--bench-iters', '1', '--model-kwargs', *KW])
    assert code == 0, err
    assert 'max relative error' in out and 'params:' in out and 'saved overlock_xt_reparam' in out
    saved = torch.load(deploy, weights_only=True)
    assert saved['arch'] == 'overlock_xt_reparam' and models.is_deploy_state_dict(saved['state_dict'])
    strict = timm.create_model('overlock_xt_reparam', **{**TINY_KWARGS, 'num_classes': 3})
    strict.load_state_dict(saved['state_dict'], strict=True)
    # the deploy file, given with the training-form name, is evaluated as overlock_xt_reparam
    with caplog.at_level('INFO'):
        code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', '--checkpoint', deploy,
                                        '--results-file', results, *COMMON])
    assert code == 0, err
    assert 'overlock_xt_reparam' in out and 'deploy-form' in caplog.text
    # and --reparam on the training checkpoint scores the same
    code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', '--checkpoint', str(tiny_checkpoint),
                                    '--reparam', '--results-file', results, *COMMON])
    assert code == 0, err
    scores = top1(results)
    assert len(scores) == 3 and scores[0] == scores[1] == scores[2]


def test_original_release_layout_and_reparam_noop(data_dir, tiny_checkpoint, tmp_path, cli, caplog):
    sd = torch.load(tiny_checkpoint, weights_only=True)['state_dict']
    original = tmp_path / 'overlock_xt_in1k_224.pth'
    torch.save({'module.' + k: v for k, v in sd.items()}, original)  # a DDP-saved plain state_dict
    code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', '--checkpoint', str(original), *COMMON])
    assert code == 0, err
    deploy = timm.create_model('overlock_xt', **{**TINY_KWARGS, 'num_classes': 3})
    deploy.load_state_dict(sd)
    path = tmp_path / 'deploy.pth'
    torch.save({'state_dict': deploy.reparameterize().state_dict()}, path)
    with caplog.at_level('INFO'):
        code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt_reparam', '--checkpoint', str(path),
                                        '--reparam', *COMMON])
    assert code == 0, err
    assert 'already in deploy form' in caplog.text


def test_model_pattern_evaluates_several(data_dir, cli):
    code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', 'overlock_xt_reparam', '--num-classes',
                                    '3', *COMMON])
    assert code == 0, err
    assert out.count('| overlock_xt') == 2


def _bad(tmp_path, data, ckpt, case):
    if case == 'missing_data':
        return [str(tmp_path / 'nope'), '--checkpoint', str(ckpt)], 'does not exist'
    if case == 'no_class_folders':
        (tmp_path / 'empty').mkdir()
        return [str(tmp_path / 'empty'), '--checkpoint', str(ckpt)], 'no class folders'
    if case == 'class_mismatch':
        return [str(data), '--checkpoint', str(ckpt), '--num-classes', '5'], '3-class classifier'
    if case == 'missing_ckpt':
        return [str(data), '--checkpoint', str(tmp_path / 'x.pth')], 'does not exist'
    if case == 'truncated':
        raw = ckpt.read_bytes()
        (tmp_path / 't.pth').write_bytes(raw[: len(raw) // 3])
        return [str(data), '--checkpoint', str(tmp_path / 't.pth')], 'truncated'
    if case == 'other_variant':
        with torch.device('meta'):
            xt = timm.create_model('overlock_xt')
        torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in xt.state_dict().items()},
                   tmp_path / 'xt.pth')
        return [str(data), '--model', 'overlock_t', '--checkpoint', str(tmp_path / 'xt.pth')], 'its keys fit overlock_xt'
    if case == 'unreadable_image':
        bad = tmp_path / 'd'
        import shutil
        shutil.copytree(data, bad)
        (bad / 'val' / 'green' / 'broken.png').write_bytes(b'not an image')
        return [str(bad), '--checkpoint', str(ckpt)], 'broken.png'
    if case == 'data_classes_differ':
        (tmp_path / 'two' / 'a').mkdir(parents=True)
        (tmp_path / 'two' / 'b').mkdir()
        for c in 'ab':
            Image.new('RGB', (32, 32)).save(tmp_path / 'two' / c / '0.png')
        return [str(tmp_path / 'two'), '--checkpoint', str(ckpt)], '2 class folders'
    if case == 'unknown_model':
        return [str(data), '--model', 'overlock_xxl', '--checkpoint', str(ckpt)], 'overlock_xt'
    raise AssertionError(case)


@pytest.mark.parametrize('case', ['missing_data', 'no_class_folders', 'class_mismatch', 'data_classes_differ',
                                  'missing_ckpt', 'truncated', 'other_variant', 'unreadable_image', 'unknown_model'])
def test_validate_bad_input(data_dir, tiny_checkpoint, tmp_path, cli, case):
    argv, expected = _bad(tmp_path, data_dir, tiny_checkpoint, case)
    if '--model' not in argv:
        argv += ['--model', 'overlock_xt']
    if case == 'other_variant':  # the real XT keys: no --model-kwargs
        argv += ['--img-size', '32', '-j', '0', '--no-progress']
    else:
        argv += COMMON
    code, out, err = cli(validate, argv)
    assert code == 2
    assert err.startswith('error: ') and err.count('\n') == 1 and expected in err, err


def test_skip_corrupt_goes_on(data_dir, tiny_checkpoint, tmp_path, cli):
    argv, _ = _bad(tmp_path, data_dir, tiny_checkpoint, 'unreadable_image')
    code, out, err = cli(validate, argv + ['--model', 'overlock_xt', '--skip-corrupt', *COMMON])
    assert code == 0, err


def test_pretrained_offline(data_dir, monkeypatch, cli):
    def offline(*a, **k):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(timm.models._builder, 'download_cached_file', offline)
    code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', '--pretrained', *COMMON])
    assert code == 2 and 'pretrained_cfg_overlay' in err and '--checkpoint' in err


def test_reparam_bad_input(tiny_checkpoint, tmp_path, cli):
    code, _, err = cli(reparam, ['--model', 'overlock_xt', '--checkpoint', str(tiny_checkpoint), '--output',
                                 str(tiny_checkpoint), '--model-kwargs', *KW])
    assert code == 2 and 'must differ' in err
    deploy = tmp_path / 'deploy.pth'
    code, _, err = cli(reparam, ['--model', 'overlock_xt', '--checkpoint', str(tiny_checkpoint), '--output',
                                 str(deploy), '--img-size', '32', '--bench-iters', '0', '--model-kwargs', *KW])
    assert code == 0, err
    code, _, err = cli(reparam, ['--model', 'overlock_xt', '--checkpoint', str(deploy), '--output',
                                 str(tmp_path / 'again.pth'), '--model-kwargs', *KW])
    assert code == 2 and 'already in deploy form' in err
    code, _, err = cli(reparam, ['--model', 'overlock_xt', '--checkpoint', str(tmp_path / 'none.pth'), '--output',
                                 str(tmp_path / 'o.pth'), '--model-kwargs', *KW])
    assert code == 2 and 'does not exist' in err


@pytest.mark.slow
def test_validate_cli_exits_cleanly_in_a_subprocess(tmp_path):
    """The real entry point: one line on stderr, exit 2, no traceback."""
    proc = run_program(['validate.py', str(tmp_path / 'missing'), '--model', 'overlock_xt', '--num-classes', '3'])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and errors[0].startswith('error: data directory') and 'Traceback' not in proc.stderr


def test_evaluation_loop_scores_the_main_head_after_the_prepare_step():
    """The one evaluation loop (validate.py and the Trainer): a training-form output's 'main' head is scored,
    ``prepare`` moves (and may transform) each batch, and top-1 / top-5 / loss are exact."""
    from utils.evaluate import evaluate

    class TwoHeads(torch.nn.Module):
        def forward(self, x):
            return {'main': x, 'aux': -x}

    logits = torch.tensor([[3., 1., 0., 2., 0., 0.], [0., 1., 2., 3., 4., 5.], [5., 4., 3., 2., 1., 0.]])
    targets = torch.tensor([0, 0, 1])  # top-1 hit, top-5 miss (rank 6), top-5 hit only
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits / 2, targets), batch_size=2)
    seen = []

    def prepare(x, y):
        seen.append(x.shape[0])
        return x * 2, y

    metrics = evaluate(TwoHeads(), loader, torch.device('cpu'), prepare=prepare)
    assert seen == [2, 1] and metrics['images'] == 3
    assert metrics['top1'] == pytest.approx(100 / 3) and metrics['top5'] == pytest.approx(200 / 3)
    assert metrics['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
