"""The original release's command lines, its non-finite loss handling and its EMA best checkpoints."""
import math
import os
import re

import pytest
import torch
import yaml

from tests.helpers import FAST, TINY, load, read_summary, run_inprocess
from utils.checkpoint import CheckpointSaver
from utils.distributed import DistInfo
from utils.train_step import NonFiniteGuard, NonFiniteLoss

TINY_MODEL = TINY[2:]  # --model-kwargs ... --img-size 32 (the model name comes from the original flags)


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def test_original_xt_script_flags_train_with_the_original_lr(data_dir, tmp_path):
    """scripts/train_xt_model.sh of the original release, as torch.distributed.launch runs it, with only the
    batch, epochs, workers and the model size made small."""
    out = tmp_path / 'run'
    original = ['--data-dir', str(data_dir), '--batch-size', '4', '--model', 'overlock_xt', '--lr', '1e-3',
                '--auto-lr', '--drop-path', '0.1', '--epochs', '1', '--warmup-epochs', '5', '--workers', '0',
                '--model-ema', '--model-ema-decay', '0.9999', '--output', str(out), '--native-amp', '--clip-grad',
                '5', '--local-rank=0', '--grad-checkpoint', '--ckpt-stg', '1', '0', '0', '0']
    code, err = run_inprocess(original + TINY_MODEL + ['--device', 'cpu', '--cooldown-epochs', '0'])
    assert code == 0, err
    saved = yaml.safe_load((out / 'args.yaml').read_text())
    global_batch = 4  # one process
    assert saved['lr'] == pytest.approx(1e-3 * global_batch / 1024)  # --lr 1e-3 is not what --auto-lr uses
    assert saved['amp'] and saved['amp_dtype'] == 'float16' and saved['ckpt_stg'] == [1, 0, 0, 0]
    assert '--lr 0.001 is not used' in err
    # The original's defaults are the recipe's augmentation, so its command lines need no config file.
    assert (saved['aa'], saved['reprob'], saved['mixup'], saved['cutmix'], saved['smoothing']) == (
        'rand-m9-mstd0.5-inc1', 0.25, 0.8, 1.0, 0.1)
    assert (saved['sched'], saved['opt'], saved['weight_decay'], saved['min_lr'], saved['warmup_lr']) == (
        'cosine', 'adamw', 0.05, 1e-5, 1e-6)
    assert saved['sync_bn'] and saved['train_interpolation'] == 'random'
    ckpt = load(out / 'last.pth')
    assert 'scaler' in ckpt and ckpt['best_k_ema'] and ckpt['best_k_ema'][0][1] == 1
    assert (out / 'model_best_ema.pth').is_file() and (out / 'checkpoints_ema' / 'checkpoint-1.pth').is_file()
    assert 'nonfinite_skipped' in read_summary(out / 'summary.csv')[0]  # float16: skipped steps are counted


def test_a_ckpt_stg_that_is_not_four_numbers_is_refused(data_dir, tmp_path):
    code, err = run_inprocess(TINY + FAST + ['--data-dir', str(data_dir), '--output', str(tmp_path / 'o'),
                                             '--grad-checkpoint', '--ckpt-stg', '4', '0'])
    assert code == 2 and re.search('--ckpt-stg needs 4 numbers >= 0 .*got 4 0', _one_error(err)), err


def test_apex_amp_trains_with_native_float16_amp(data_dir, tmp_path):
    out = tmp_path / 'apex'
    code, err = run_inprocess(TINY + FAST + ['--data-dir', str(data_dir), '--output', str(out), '--epochs', '1',
                                             '--apex-amp'])
    assert code == 0, err
    assert "--apex-amp: NVIDIA Apex is not used; torch's native float16 AMP" in err
    saved = yaml.safe_load((out / 'args.yaml').read_text())
    assert saved['amp'] and saved['amp_dtype'] == 'float16' and 'scaler' in load(out / 'last.pth')


def test_local_rank_reaches_the_device_choice(monkeypatch):
    from utils.distributed import init_distributed
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert init_distributed('cpu', local_rank=3).local_rank == 3
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert init_distributed('cpu', local_rank=3).local_rank == 1  # the environment wins


# --- non-finite losses ---------------------------------------------------------------------------------------

def test_guard_tolerates_skipped_steps_until_they_persist(tmp_path):
    guard = NonFiniteGuard(DistInfo(), batches_per_epoch=10, output=str(tmp_path), tolerate=True, limit=3)
    nan, one = float('nan'), 1.0
    for b, v in enumerate([one, nan, nan, one, nan, nan]):  # never 3 in a row
        guard.add(0, b, torch.tensor([v]))
    guard.check()
    assert (guard.skipped, guard.streak) == (4, 2)
    guard.add(0, 6, torch.tensor([1.0, nan]))  # one bad batch of an accumulation group: the update counts
    with pytest.raises(NonFiniteLoss, match=r'in 3 consecutive updates \(the last at epoch 1, step 8 of 10\)'):
        guard.check()
    unlimited = NonFiniteGuard(DistInfo(), 10, str(tmp_path), tolerate=True, limit=0)
    for b in range(50):
        unlimited.add(0, b, torch.tensor([nan]))
    unlimited.check()
    assert unlimited.skipped == 50


# lr x 1e33 after epoch 1: epoch 1 trains, epoch 2 diverges.
DIVERGE = TINY + FAST + ['--epochs', '2', '--lr', '1e-3', '--sched', 'step', '--decay-epochs', '1',
                         '--decay-rate', '1e33', '--log-interval', '1']


@pytest.mark.slow
def test_float16_keeps_training_while_steps_are_skipped_and_stops_when_it_persists(data_dir, tmp_path):
    out = tmp_path / 'copes'
    code, err = run_inprocess(DIVERGE + ['--data-dir', str(data_dir), '--output', str(out), '--amp',
                                         '--amp-dtype', 'float16', '--nonfinite-limit', '0'])
    assert code == 0, err  # the scaler skips every overflowing step; no limit: the run goes on
    rows = read_summary(out / 'summary.csv')
    assert rows[0]['nonfinite_skipped'] == '0' and int(rows[1]['nonfinite_skipped']) >= 3, rows
    assert math.isfinite(float(rows[0]['train_loss']))

    out = tmp_path / 'stops'
    code, err = run_inprocess(DIVERGE + ['--data-dir', str(data_dir), '--output', str(out), '--amp',
                                         '--amp-dtype', 'float16', '--nonfinite-limit', '3'])
    assert code == 3, err
    msg = [line for line in err.splitlines() if 'consecutive updates' in line]
    assert len(msg) == 1 and 'epoch 2' in msg[0] and f'last good checkpoint: {out / "last.pth"}' in msg[0], err
    assert load(out / 'last.pth')['epoch'] == 1  # nothing diverged was saved
    assert '--skip-nonfinite' not in msg[0]  # steps were already being skipped


def test_float32_stops_at_the_first_nonfinite_loss(data_dir, tmp_path):
    out = tmp_path / 'f32'
    code, err = run_inprocess(DIVERGE + ['--data-dir', str(data_dir), '--output', str(out)])
    assert code == 3, err
    assert re.search(r'non-finite loss \((nan|inf)\) at epoch 2, step \d+ of 6;.*--skip-nonfinite', err), err
    assert load(out / 'last.pth')['epoch'] == 1


# --- best checkpoints by EMA ---------------------------------------------------------------------------------

def test_saver_keeps_best_k_by_top1_and_by_ema_top1(tmp_path):
    saver = CheckpointSaver(str(tmp_path), max_history=2, ema=True)
    metrics = [(50.0, 10.0), (70.0, 20.0), (60.0, 40.0), (40.0, 30.0)]
    for epoch, (top1, ema_top1) in enumerate(metrics, start=1):
        saver.save_epoch({'epoch': torch.tensor(epoch)}, epoch, top1, ema_top1)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('checkpoint-')) == ['checkpoint-2.pth',
                                                                                    'checkpoint-3.pth']
    assert sorted(os.listdir(tmp_path / 'checkpoints_ema')) == ['checkpoint-3.pth', 'checkpoint-4.pth']
    assert int(load(tmp_path / 'model_best.pth')['epoch']) == 2
    assert int(load(tmp_path / 'model_best_ema.pth')['epoch']) == 3
    last = load(tmp_path / 'last.pth')
    assert last['best_k'] == [[70.0, 2], [60.0, 3]] and last['best_k_ema'] == [[40.0, 3], [30.0, 4]]
    resumed = CheckpointSaver(str(tmp_path), 2, last['best_k'], ema=True, best_k_ema=last['best_k_ema'])
    assert resumed.best_ema == (40.0, 3) and resumed.best == (70.0, 2)
