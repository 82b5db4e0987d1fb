"""Resuming with changed options: the schedule and the auto learning rate follow the command line."""
import math
import subprocess
import sys

import pytest
import yaml

from tests.helpers import FAST, REPO, TINY, free_port, load, read_summary, run_inprocess, subprocess_env
from utils.cli import parse_args_with_config
from utils.config import build_train_parser


def _fresh_schedule_lrs(argv, epochs: int):
    """The lr of each epoch of a fresh run with ``argv`` (timm's scheduler built as train.py builds it)."""
    import torch
    from utils.train_setup import build_optimizer, build_scheduler
    args = parse_args_with_config(build_train_parser(), argv)
    args.lr = args.lr if args.lr is not None else args.lr_base
    opt = build_optimizer(args, torch.nn.Linear(2, 2))
    sched, num_epochs = build_scheduler(args, opt, updates_per_epoch=6)
    assert num_epochs == epochs
    lrs = []
    for e in range(epochs):
        sched.step(e)
        lrs.append(opt.param_groups[0]['lr'])
    return lrs


@pytest.mark.slow
def test_extending_a_finished_run_follows_the_new_schedule(data_dir, tmp_path):
    out = tmp_path / 'run'
    base = TINY + FAST + ['--data-dir', str(data_dir), '--sched', 'cosine', '--lr', '2e-3', '--no-aug']
    code, err = run_inprocess(base + ['--epochs', '1', '--output', str(out)])
    assert code == 0, err
    code, err = run_inprocess(base + ['--epochs', '3', '--resume', str(out / 'last.pth')])
    assert code == 0, err
    assert 'epochs 1 \u2192 3: schedule rebuilt from the command line, resuming at epoch 2' in err
    lrs = [float(r['lr']) for r in read_summary(out / 'summary.csv')]
    expected = _fresh_schedule_lrs(base + ['--epochs', '3'], 3)
    assert len(lrs) == 3
    assert lrs[1:] == pytest.approx(expected[1:], rel=1e-5)  # not the 1-epoch schedule's floor
    assert lrs[1] > 10 * 1e-5


def test_unchanged_options_load_the_saved_schedule(data_dir, tmp_path):
    out = tmp_path / 'run'
    base = TINY + FAST + ['--data-dir', str(data_dir), '--no-aug', '--epochs', '1']
    assert run_inprocess(base + ['--output', str(out)])[0] == 0
    code, err = run_inprocess(base + ['--resume', str(out / 'last.pth')])
    assert code == 0, err
    assert 'Nothing to do' in err and 'Options changed' not in err


def test_model_change_is_refused_in_one_line(data_dir, tmp_path):
    out = tmp_path / 'run'
    base = TINY + FAST + ['--data-dir', str(data_dir), '--no-aug', '--epochs', '1']
    assert run_inprocess(base + ['--output', str(out)])[0] == 0
    code, err = run_inprocess(base + ['--epochs', '2', '--num-classes', '5', '--resume', str(out / 'last.pth')])
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and '--num-classes 3, not 5: resume cannot change it' in lines[0], err


@pytest.mark.slow
def test_shipped_script_on_two_processes_then_resume_on_one(data_dir, tmp_path):
    """scripts/train_xt_model.sh (the XT config: float16 AMP, EMA, drop path) with the tiny model on 2 CPU
    processes for one epoch (global batch 2 x 4 x 2 = 16), then one process resumes it for a second: the auto lr
    follows the new global batch (8) and the schedule continues."""
    out = tmp_path / 'run'
    config = str(REPO / 'configs' / 'overlock_xt.yaml')
    env = subprocess_env()
    env.update(GPUS='2', MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    common = TINY + FAST + ['--grad-accum-steps', '2']
    proc = subprocess.run(['bash', str(REPO / 'scripts' / 'train_xt_model.sh'), str(data_dir), *common,
                           '--epochs', '1', '--output', str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '2 process(es) x batch 4 x 2 accumulation = global batch 16' in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith('[rank 1] Train')]  # rank 0 logs
    saved = yaml.safe_load((out / 'args.yaml').read_text())
    assert saved['lr'] == pytest.approx(1e-3 * 16 / 1024) and saved['drop_path'] == 0.1 and saved['amp']
    rows = read_summary(out / 'summary.csv')
    assert len(rows) == 1 and math.isfinite(float(rows[0]['eval_ema_top1']))
    ckpt = load(out / 'last.pth')
    assert ckpt['global_step'] == 2 and len(ckpt['rng']) == 2  # 3 batches / process -> 2 updates
    assert 'scaler' in ckpt  # float16 AMP from the config

    code, err = run_inprocess(['-c', config, *common, '--data-dir', str(data_dir), '--epochs', '2',
                               '--resume', str(out / 'last.pth')])
    assert code == 0, err
    assert 'checkpoint from 2 processes, now 1' in err
    assert 'lr 1.5625e-05 \u2192 7.8125e-06' in err and 'epochs 1 \u2192 2' in err
    assert yaml.safe_load((out / 'args.yaml').read_text())['lr'] == pytest.approx(1e-3 * 8 / 1024)
    lr2 = float(read_summary(out / 'summary.csv')[1]['lr'])
    fresh = _fresh_schedule_lrs(['-c', config, *common, '--data-dir', 'x', '--epochs', '2',
                                 '--lr', str(1e-3 * 8 / 1024)], 2)
    assert lr2 == pytest.approx(fresh[1], rel=1e-5)
    assert math.isfinite(float(read_summary(out / 'summary.csv')[1]['train_loss']))
    assert load(out / 'last.pth')['world_size'] == 1


def test_validation_speed_is_measured_when_the_data_fits_one_batch():
    import torch
    from utils.evaluate import evaluate
    data = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # one batch
    metrics = evaluate(torch.nn.Linear(4, 3), loader, torch.device('cpu'), progress=False)
    assert metrics['images'] == 6 and math.isfinite(metrics['images_per_sec']) and metrics['images_per_sec'] > 0
