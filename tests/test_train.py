"""train.py on the CPU: outputs, learning, exact resume, preemption, bad input, configuration.

Runs use a tiny OverLoCK on a synthetic 3-class ImageFolder of 32x32 images. Most runs go through
``run_cli(main)`` in this process (no interpreter start-up); the preemption test and one bad-input case start
real processes (torchrun runs: test_train_resume.py, test_train_scale.py).
"""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import (
    FAST, REPO, TINY, TINY_KWARGS, load, read_summary, run_inprocess, run_train, state_dicts_equal,
    subprocess_env,
)
from utils.checkpoint import CheckpointSaver, atomic_save
from utils.cli import UsageError, parse_args_with_config, parse_kwargs
from utils.config import build_train_parser
from utils.data import DataError, ResumableSampler, build_image_folder, resolve_split

# The resume / preemption runs: step schedule (lr independent of --epochs, so --epochs 1 then --resume
# --epochs 2 follows the same lr as --epochs 2), EMA, mixup + cutmix (numpy RNG), RandAugment and random
# erasing (python / torch RNG), drop path, clipping: every piece of state that resume must restore.
RESUME_ARGS = TINY + FAST + [
    '--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.5', '--lr', '2e-3', '--model-ema',
    '--mixup', '0.8', '--cutmix', '1.0', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--drop-path', '0.1',
    '--clip-grad', '5', '--log-interval', '1']


@pytest.fixture(scope='module')
def reference_run(data_dir, tmp_path_factory) -> Path:
    """Two uninterrupted epochs with RESUME_ARGS: what every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp('reference') / 'run'
    code, err = run_inprocess(RESUME_ARGS + ['--data-dir', str(data_dir), '--epochs', '2', '--output', str(out)])
    assert code == 0, err
    return out


# --- pieces --------------------------------------------------------------------------------------------------

def test_parse_kwargs():
    assert parse_kwargs(['depth=[1, 2]', 'ratio=0.5', 'act=gelu', 'flag=True', 'name="a=b"']) == {
        'depth': [1, 2], 'ratio': 0.5, 'act': 'gelu', 'flag': True, 'name': 'a=b'}
    assert parse_kwargs(None) == {} and parse_kwargs({'a': 1}) == {'a': 1}
    with pytest.raises(UsageError, match="'depth'"):
        parse_kwargs(['depth'])


def test_config_file_sets_defaults_command_line_wins(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 7\nbatch-size: 32\nlr: 0.5\nmodel_kwargs: {depth: [1, 1, 1, 1]}\n')
    args = parse_args_with_config(build_train_parser(), ['-c', str(cfg), '--epochs', '3', '--data-dir', 'x'])
    assert (args.epochs, args.batch_size, args.lr) == (3, 32, 0.5)  # command line > file > built-in default
    assert parse_kwargs(args.model_kwargs) == {'depth': [1, 1, 1, 1]}
    assert args.weight_decay == 0.05  # untouched default

    cfg.write_text('epochs: 7\nbatch_sise: 32\nlearning_rate: 1\n')
    with pytest.raises(UsageError, match=r'c\.yaml: unknown keys batch_sise, learning_rate'):
        parse_args_with_config(build_train_parser(), ['-c', str(cfg)])
    with pytest.raises(UsageError, match='does not exist'):
        parse_args_with_config(build_train_parser(), ['-c', str(tmp_path / 'missing.yaml')])
    cfg.write_text('epochs: [1\n')
    with pytest.raises(UsageError, match='not valid YAML'):
        parse_args_with_config(build_train_parser(), ['-c', str(cfg)])


@pytest.mark.parametrize('config', ['overlock_xt', 'overlock_t', 'overlock_s', 'overlock_b'])
def test_shipped_configs_hold_the_recipe(config):
    path = REPO / 'configs' / f'{config}.yaml'
    args = parse_args_with_config(build_train_parser(), ['-c', str(path), '--data-dir', 'x'])
    drop_path = {'overlock_xt': 0.1, 'overlock_t': 0.15, 'overlock_s': 0.4, 'overlock_b': 0.5}[config]
    assert (args.model, args.drop_path, args.batch_size, args.epochs, args.cooldown_epochs) == (
        config, drop_path, 256, 300, 10)
    assert args.auto_lr and args.lr is None and args.lr_base * 8 * 256 / args.lr_base_size == pytest.approx(2e-3)
    assert (args.opt, args.weight_decay, args.clip_grad, args.warmup_epochs, args.min_lr) == ('adamw', 0.05, 5, 5, 1e-5)
    assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (0.8, 1.0, 0.1, 0.25,
                                                                              'rand-m9-mstd0.5-inc1')
    assert args.model_ema and args.model_ema_decay == 0.9999 and args.aux_loss_ratio == 0.4 and args.seed == 42


def test_sampler_shards_cover_the_epoch_and_resume_mid_epoch():
    shards = [ResumableSampler(10, num_replicas=3, rank=r, seed=5) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    drawn = [list(s) for s in shards]
    assert all(len(d) == 4 for d in drawn)  # padded to equal length
    assert set(sum(drawn, [])) == set(range(10))
    shards[0].set_epoch(3)
    assert list(shards[0]) != drawn[0]  # a new permutation each epoch
    shards[0].set_epoch(2)
    shards[0].set_start(2)
    assert len(shards[0]) == 2 and list(shards[0]) == drawn[0][2:]
    assert list(shards[0]) == drawn[0]  # only the first pass after a resume is partial


def test_image_folder_names_unreadable_file_and_skips_it_on_request(data_dir, tmp_path):
    import pickle
    root = tmp_path / 'train'
    for c in ('a', 'b'):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f'{i}.png').write_bytes((data_dir / 'train' / 'red' / '000.png').read_bytes())
    (root / 'b' / '9_bad.jpg').write_bytes(b'not an image')
    ds = build_image_folder(str(root))
    assert ds.classes == ['a', 'b'] and len(ds) == 5
    with pytest.raises(DataError, match=r'9_bad\.jpg.*--skip-corrupt'):
        ds[4]
    ds = pickle.loads(pickle.dumps(build_image_folder(str(root), skip_corrupt=True)))  # DataLoader workers
    img, target = ds[4]
    assert target == 0 and ds.num_skipped == 1  # deterministic replacement: the next sample (wraps around)
    with pytest.raises(DataError, match='has no val/ or validation/ folder'):
        resolve_split(str(tmp_path), 'val')


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path):
    path = tmp_path / 'last.pth'
    atomic_save({'w': torch.ones(2)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('disk full')  # fails half-way through torch.save

    with pytest.raises(RuntimeError, match='disk full'):
        atomic_save({'w': torch.zeros(2), 'x': Unpicklable()}, str(path))
    assert torch.equal(load(path)['w'], torch.ones(2)) and os.listdir(tmp_path) == ['last.pth']


def test_checkpoint_saver_keeps_the_k_best(tmp_path):
    saver = CheckpointSaver(str(tmp_path), max_history=2)
    for epoch, metric in enumerate([50.0, 70.0, 60.0, 40.0, 80.0, float('nan')], start=1):
        saver.save_epoch({'epoch': torch.tensor(epoch)}, epoch, metric)
        assert int(load(tmp_path / 'last.pth')['epoch']) == epoch
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2.pth', 'checkpoint-5.pth', 'last.pth', 'model_best.pth']
    assert int(load(tmp_path / 'model_best.pth')['epoch']) == 5
    assert load(tmp_path / 'last.pth')['best_k'] == [[80.0, 5], [70.0, 2]]
    resumed = CheckpointSaver(str(tmp_path), max_history=2, best_k=[[80.0, 5], [70.0, 2], [65.0, 9]])
    assert resumed.best_k == [(80.0, 5), (70.0, 2)]  # entries whose file is gone are dropped


# --- runs ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_epoch_run_writes_every_output(data_dir, tmp_path):
    """Through the real CLI, with a config file that the command line overrides."""
    import models
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 5\nweight_decay: 0.01\nmodel_ema: true\nsmoothing: 0.2\n')
    out = tmp_path / 'run'
    proc = run_train(['-c', str(cfg), *TINY, *FAST, '--data-dir', str(data_dir), '--output', str(out),
                      '--epochs', '1', '--log-interval', '2'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ('args.yaml', 'summary.csv', 'last.pth', 'checkpoint-1.pth', 'model_best.pth', 'curves.png', 'log.txt'):
        assert (out / name).is_file(), name
    assert not [p for p in os.listdir(out) if p.endswith('.tmp')]
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    saved = yaml.safe_load((out / 'args.yaml').read_text())
    assert saved['epochs'] == 1 and saved['weight_decay'] == 0.01 and saved['smoothing'] == 0.2  # cli > file
    assert saved['num_classes'] == 3 and saved['lr'] == pytest.approx(1e-3)
    again = parse_args_with_config(build_train_parser(), ['-c', str(out / 'args.yaml')])  # args.yaml is a config
    assert {k: v for k, v in vars(again).items() if k != 'config'} == saved

    rows = read_summary(out / 'summary.csv')
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_loss_aux', 'eval_loss', 'eval_top1', 'eval_top5',
                             'eval_ema_loss', 'eval_ema_top1', 'eval_ema_top5', 'lr', 'epoch_time']
    assert len(rows) == 1 and rows[0]['epoch'] == '1'
    assert all(math.isfinite(float(rows[0][k])) for k in rows[0])
    # total loss = main + 0.4 aux, both ~ln 3 at the start
    assert float(rows[0]['train_loss']) > float(rows[0]['train_loss_aux']) > 0.5

    train_lines = [line for line in proc.stderr.splitlines() if line.startswith('Train: 1/1')]
    assert len(train_lines) == 3 and all(s in train_lines[0] for s in ('loss', 'lr', 'img/s', 'data', 'ETA'))

    ckpt = load(out / 'last.pth')  # weights_only=True
    assert ckpt['version'] == 1 and ckpt['arch'] == 'overlock_xt' and ckpt['epoch'] == 1
    assert isinstance(ckpt['args'], dict) and ckpt['metric'] == pytest.approx(float(rows[0]['eval_top1']), abs=1e-3)
    assert {'state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'rng', 'global_step'} <= set(ckpt)
    model = models.create_overlock('overlock_xt', **TINY_KWARGS, num_classes=3)
    models.load_checkpoint(model, str(out / 'model_best.pth'), use_ema=True)  # what validate.py does
    assert torch.equal(model.state_dict()['head.4.weight'], ckpt['state_dict_ema']['head.4.weight'])


@pytest.mark.slow
def test_loss_decreases_on_a_learnable_task(data_dir, tmp_path):
    out = tmp_path / 'run'
    code, err = run_inprocess(TINY + FAST + [
        '--data-dir', str(data_dir), '--output', str(out), '--epochs', '4', '--no-aug', '--smoothing', '0',
        '-b', '8', '--lr', '1e-2', '--log-interval', '10', '--checkpoint-hist', '1'])
    assert code == 0, err
    rows = read_summary(out / 'summary.csv')
    train = [float(r['train_loss']) for r in rows]
    evals = [float(r['eval_loss']) for r in rows]
    assert train[-1] < 0.5 * train[0], train  # from ~1.4 (ln 3 x 1.4, main + 0.4 aux)
    assert evals[-1] < 0.5 * evals[0], evals
    assert float(rows[-1]['eval_top1']) > 60  # chance is 33.3
    best = [p for p in os.listdir(out) if p.startswith('checkpoint-')]
    assert len(best) == 1  # --checkpoint-hist 1 keeps the single best
    assert (out / 'model_best.pth').read_bytes() == (out / best[0]).read_bytes()


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(data_dir, reference_run, tmp_path):
    out = tmp_path / 'run'
    base = RESUME_ARGS + ['--data-dir', str(data_dir)]
    code, err = run_inprocess(base + ['--epochs', '1', '--output', str(out)])
    assert code == 0, err
    code, err = run_inprocess(base + ['--epochs', '2', '--resume', str(out / 'last.pth')])  # output: its folder
    assert code == 0, err
    assert 'Resumed' in err
    a, b = load(reference_run / 'last.pth'), load(out / 'last.pth')
    assert state_dicts_equal(a, b) is None, state_dicts_equal(a, b)
    assert a['global_step'] == b['global_step'] == 12
    assert [r['epoch'] for r in read_summary(out / 'summary.csv')] == ['1', '2']
    losses = [[r['train_loss'] for r in read_summary(d / 'summary.csv')] for d in (out, reference_run)]
    assert losses[0] == losses[1]  # epoch means too


@pytest.mark.slow
def test_sigterm_saves_recovery_checkpoint_and_resume_matches(data_dir, reference_run, tmp_path):
    out = tmp_path / 'run'
    log = tmp_path / 'stderr.txt'
    argv = RESUME_ARGS + ['--data-dir', str(data_dir), '--epochs', '2', '--output', str(out)]
    with open(log, 'w') as f:
        proc = subprocess.Popen([sys.executable, 'train.py', *argv], cwd=REPO, env=subprocess_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while 'Train: 1/2 [2/6' not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert 'Preempted (SIGTERM)' in text and '--resume' in text
    ckpt = load(out / 'last.pth')
    assert ckpt['epoch'] * 6 + ckpt['step_in_epoch'] < 12  # stopped early, not at the end
    code, err = run_inprocess(RESUME_ARGS + ['--data-dir', str(data_dir), '--epochs', '2', '--resume', 'auto',
                                             '--output', str(out)])
    assert code == 0, err
    a, b = load(reference_run / 'last.pth'), load(out / 'last.pth')
    assert state_dicts_equal(a, b) is None, state_dicts_equal(a, b)
    losses = [[r['train_loss'] for r in read_summary(d / 'summary.csv')] for d in (out, reference_run)]
    assert losses[0] == losses[1]  # the interrupted epoch's mean includes the batches before the signal


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_checkpoint(data_dir, tmp_path):
    # A step schedule that multiplies the lr by 1e33 after epoch 1: epoch 1 trains, epoch 2 diverges.
    diverge = TINY + FAST + ['--data-dir', str(data_dir), '--epochs', '2', '--lr', '1e-3', '--sched', 'step',
                             '--decay-epochs', '1', '--decay-rate', '1e33', '--log-interval', '3']
    out = tmp_path / 'stop'
    code, err = run_inprocess(diverge + ['--output', str(out)])
    assert code == 3, err
    msg = [line for line in err.splitlines() if 'non-finite loss' in line]
    assert len(msg) == 1 and 'epoch 2, step 2 of 6' in msg[0], err
    assert f'last good checkpoint: {out / "last.pth"}' in msg[0] and '--skip-nonfinite' in msg[0]
    assert load(out / 'last.pth')['epoch'] == 1  # the diverged weights were never saved
    assert len(read_summary(out / 'summary.csv')) == 1

    out = tmp_path / 'skip'
    code, err = run_inprocess(diverge + ['--output', str(out), '--skip-nonfinite'])
    assert code == 0, err
    rows = read_summary(out / 'summary.csv')
    assert [r['nonfinite_skipped'] for r in rows] == ['0', '5']  # the first huge step is finite, then NaN
    assert all(math.isfinite(float(r['train_loss'])) for r in rows)  # skipped steps stay out of the mean
    assert not (out / 'checkpoint-2.pth').exists()  # diverged weights never rank as best
    assert load(out / 'model_best.pth')['epoch'] == 1


# --- bad input -----------------------------------------------------------------------------------------------

def _corrupt(data: Path) -> None:
    (data / 'train' / 'red' / 'zz_broken.png').write_bytes(b'\x89PNG truncated')


@pytest.mark.parametrize('case', [
    'missing_data', 'empty_data', 'no_val', 'no_classes', 'class_mismatch', 'corrupt_image', 'resume_missing',
    'resume_truncated', 'global_batch', 'unknown_key', 'output_taken', 'odd_mixup_batch', 'unknown_model',
])
def test_bad_input_gives_one_line_error(case, data_dir, reference_run, tmp_path):
    data = tmp_path / 'data'
    extra = []
    expect = {
        'missing_data': 'data directory .*nowhere does not exist',
        'empty_data': 'has no train/ folder',
        'no_val': 'has no val/ or validation/ folder',
        'no_classes': 'train holds no class folders',
        'class_mismatch': 'train and val class folders differ: 1 only in train \\(red\\); 1 only in val \\(rouge\\)',
        'corrupt_image': 'cannot read image .*zz_broken.png.*--skip-corrupt',
        'resume_missing': '--resume .*nothing.pth does not exist',
        'resume_truncated': 'checkpoint .*last.pth is truncated',
        'global_batch': '--global-batch-size 8 is not divisible by 1 processes x 3 accumulation steps',
        'unknown_key': 'cfg.yaml: unknown keys lrate',
        'output_taken': '--output .*out holds another run .*last.pth.*--overwrite',
        'odd_mixup_batch': 'batch per process must be even',
        'unknown_model': '--model overlock_xxl is not a registered model .*overlock_xt',
    }[case]
    if case not in ('missing_data', 'empty_data'):
        shutil.copytree(data_dir, data)
    if case == 'missing_data':
        data = tmp_path / 'nowhere'
    elif case == 'empty_data':
        data.mkdir()
    elif case == 'no_val':
        shutil.rmtree(data / 'val')
    elif case == 'no_classes':
        shutil.rmtree(data / 'train')
        (data / 'train').mkdir()
    elif case == 'class_mismatch':
        (data / 'val' / 'red').rename(data / 'val' / 'rouge')
    elif case == 'corrupt_image':
        _corrupt(data)
    elif case == 'resume_missing':
        extra = ['--resume', str(tmp_path / 'nothing.pth')]
    elif case in ('resume_truncated', 'output_taken'):
        (tmp_path / 'out').mkdir()
        blob = (reference_run / 'last.pth').read_bytes()
        if case == 'resume_truncated':
            blob = blob[:len(blob) // 2]
            extra = ['--resume', str(tmp_path / 'out' / 'last.pth')]
        (tmp_path / 'out' / 'last.pth').write_bytes(blob)
    elif case == 'global_batch':
        extra = ['--global-batch-size', '8', '--grad-accum-steps', '3']
    elif case == 'unknown_key':
        (tmp_path / 'cfg.yaml').write_text('epochs: 1\nlrate: 0.1\n')
        extra = ['-c', str(tmp_path / 'cfg.yaml')]
    elif case == 'odd_mixup_batch':
        extra = ['--mixup', '0.8', '-b', '3']
    elif case == 'unknown_model':
        extra = ['--model', 'overlock_xxl']
    code, err = run_inprocess(TINY + FAST + ['--data-dir', str(data), '--output', str(tmp_path / 'out'),
                                             '--epochs', '1'] + extra)
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert code == 2, err
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert re.search(expect, lines[0]), lines[0]


def test_skip_corrupt_runs_and_names_the_file(data_dir, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(data_dir, data)
    _corrupt(data)
    code, err = run_inprocess(TINY + FAST + ['--data-dir', str(data), '--output', str(tmp_path / 'out'),
                                             '--epochs', '1', '--skip-corrupt', '--no-aug'])
    assert code == 0, err
    assert 'skipping unreadable image' in err and 'zz_broken.png' in err


@pytest.mark.slow
def test_worker_error_is_one_line_and_the_process_exits(data_dir, tmp_path):
    """An unreadable image met in a DataLoader worker process: the real CLI prints the worker's message as one
    line and exits (workers ignore SIGTERM, so they must be stopped before interpreter exit, or it hangs)."""
    data = tmp_path / 'data'
    shutil.copytree(data_dir, data)
    _corrupt(data)
    proc = run_train(TINY + FAST + ['--data-dir', str(data), '--output', str(tmp_path / 'o'), '--epochs', '1',
                                    '-j', '1', '--no-aug'], timeout=150)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    pattern = r'error: cannot read image \S+zz_broken\.png \(not a recognised image format\); .*--skip-corrupt.*'
    assert re.fullmatch(pattern, errors[0]), errors[0]


def test_missing_data_dir_writes_nothing(tmp_path):
    code, err = run_inprocess(['--data-dir', str(tmp_path / 'nowhere'), '--output', str(tmp_path / 'o')])
    assert code == 2 and err.strip().splitlines() == [f'error: data directory {tmp_path / "nowhere"} does not exist']
    assert not (tmp_path / 'o').exists()  # nothing written for a run that could not start
