"""Training at scale: sharded and tar datasets, recovery checkpoints and hard kills, persistent loader workers,
the original release's training checkpoints, BatchNorm statistics over processes."""
import argparse
import importlib.util
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    FAST, TINY, free_port, load, make_image_folder, read_summary, run_inprocess, state_dicts_equal,
)

HAS_WDS = importlib.util.find_spec('webdataset') is not None
needs_wds = pytest.mark.skipif(not HAS_WDS, reason='webdataset is not installed (pip install webdataset)')
needs_hfds = pytest.mark.skipif(importlib.util.find_spec('datasets') is None,
                                reason='datasets is not installed (pip install datasets)')


# --- data builders ---------------------------------------------------------------------------------------------

def _digits(limit: int):
    """``[(png bytes, label)]``: scikit-learn's handwritten digits, ``limit`` per class, 32 px RGB."""
    import io
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    out = []
    for label in range(10):
        for i in np.flatnonzero(d.target == label)[:limit]:
            img = Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8), mode='L').resize((32, 32))
            buf = io.BytesIO()
            img.convert('RGB').save(buf, format='PNG')
            out.append((buf.getvalue(), label))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_wds(root: Path, per_class: int = 8, shards: int = 4, val_shards: int = 2, label_is_index: bool = False):
    """Webdataset shards of the digits (4/5 for training, 1/5 for validation) in ``root`` (``train-00000.tar``
    ..., ``val-...``) and the ``_info.json`` timm's reader sizes the splits from. ``label_is_index``: each sample's label is its own index (to check
    which samples a process saw)."""
    root.mkdir(parents=True, exist_ok=True)
    samples = _digits(per_class)
    val = samples[::5]
    train = [s for i, s in enumerate(samples) if i % 5]
    info = {'name': 'digits', 'splits': {}}
    for split, items, n_shards in (('train', train, shards), ('val', val, val_shards)):
        names, lengths = [], []
        for k in range(n_shards):
            part = items[k::n_shards]
            name = f'{split}-{k:05d}.tar'
            with tarfile.open(root / name, 'w') as tar:
                for j, (png, label) in enumerate(part):
                    key = f'{split}{k}_{j:04d}'
                    target = j * n_shards + k if label_is_index else label
                    _add(tar, f'{key}.png', png)
                    _add(tar, f'{key}.cls', str(target).encode())
            names.append(name)
            lengths.append(len(part))
        info['splits'][split] = {'name': split, 'num_samples': sum(lengths), 'filenames': names,
                                 'shard_lengths': lengths}
    (root / '_info.json').write_text(json.dumps(info))
    return root


def make_tars(root: Path, per_class: int = 4) -> Path:
    """``root/train.tar`` and ``root/val.tar`` holding ``<class>/<image>.png`` (image tars, as timm reads)."""
    root.mkdir(parents=True, exist_ok=True)
    samples = _digits(per_class)
    for split, items in (('train', [s for i, s in enumerate(samples) if i % 4]), ('val', samples[::4])):
        with tarfile.open(root / f'{split}.tar', 'w') as tar:
            for j, (png, label) in enumerate(items):
                _add(tar, f'{label}/{j:04d}.png', png)
    return root


def make_hf_parquet(root: Path, per_class: int = 4) -> Path:
    """A local Hugging Face dataset: ``root/data/{train,validation}-00000-of-00001.parquet`` with an image column
    and class labels (what ``datasets.load_dataset(root)`` reads without a network)."""
    import datasets
    samples = _digits(per_class)
    features = datasets.Features({'image': datasets.Image(),
                                  'label': datasets.ClassLabel(names=[str(i) for i in range(10)])})
    (root / 'data').mkdir(parents=True, exist_ok=True)
    for split, items in (('train', [x for i, x in enumerate(samples) if i % 5]), ('validation', samples[::5])):
        ds = datasets.Dataset.from_dict({'image': [{'bytes': b, 'path': None} for b, _ in items],
                                         'label': [label for _, label in items]}, features=features)
        ds.to_parquet(str(root / 'data' / f'{split}-00000-of-00001.parquet'))
    return root


# --- fast: the pieces ------------------------------------------------------------------------------------------

def _draw(_img):
    return torch.rand(()).item()


class _Numbers(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.transform(i)


def _epochs(persistent: bool, epochs: int = 2):
    from utils.data import EpochSeed
    seed = EpochSeed(_draw, seed=3, rank=0)
    loader = torch.utils.data.DataLoader(_Numbers(seed), batch_size=2, num_workers=1, persistent_workers=persistent)
    out = []
    for e in range(epochs):
        seed.set_epoch(e)
        out.append(torch.cat(list(loader)).tolist())
    return out


def test_persistent_workers_draw_the_augmentation_of_fresh_workers():
    """The epoch reaches workers started in an earlier epoch: each epoch's random draws are those of workers
    started afresh for it (what makes an epoch-boundary resume exact with workers)."""
    fresh, kept = _epochs(False), _epochs(True)
    assert kept == fresh
    assert kept[0] != kept[1]


def test_resume_auto_takes_the_newest_of_last_and_recovery(tmp_path):
    from utils.checkpoint import newest_checkpoint
    assert newest_checkpoint(str(tmp_path)) == ''
    torch.save({'epoch': 2, 'step_in_epoch': 0, 'global_step': 12}, tmp_path / 'last.pth')
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / 'last.pth')
    torch.save({'epoch': 2, 'step_in_epoch': 3, 'global_step': 15}, tmp_path / 'recovery.pth')
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / 'recovery.pth')
    torch.save({'epoch': 3, 'step_in_epoch': 0, 'global_step': 18}, tmp_path / 'last.pth')
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / 'last.pth')


class _NotAllowed:
    pass


def _original_layout(ckpt: dict, epoch: int) -> dict:
    """Our checkpoint rewritten as timm 0.6.12's CheckpointSaver wrote it for the original release."""
    args = argparse.Namespace(model=ckpt['arch'], num_classes=3, lr=1e-3, auto_lr=True, epochs=300,
                              data_dir='/data/imagenet', output='output/train', dist_bn='reduce')
    out = {'epoch': epoch, 'arch': ckpt['arch'], 'state_dict': ckpt['state_dict'], 'optimizer': ckpt['optimizer'],
           'version': 2, 'args': args, 'metric': 12.5}
    if 'state_dict_ema' in ckpt:
        out['state_dict_ema'] = ckpt['state_dict_ema']
    if 'scaler' in ckpt:
        out['amp_scaler'] = ckpt['scaler']
    return out


def test_original_checkpoint_layout_is_read_weights_only(tmp_path):
    from models import CheckpointError
    from utils.checkpoint import read_training_checkpoint
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    scaler = {'scale': 1024.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
              '_growth_tracker': 7}
    ours = {'arch': 'overlock_xt', 'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
            'optimizer': opt.state_dict(), 'state_dict_ema': model.state_dict(), 'scaler': scaler}
    path = tmp_path / 'last.pth.tar'
    torch.save(_original_layout(ours, epoch=4), path)
    ckpt = read_training_checkpoint(str(path))
    assert ckpt['epoch'] == 5 and ckpt['step_in_epoch'] == 0  # timm's epoch 4 (0-based) done: resume at 5
    assert ckpt['scaler'] == scaler and ckpt['original']
    assert ckpt['args'] == {'model': 'overlock_xt', 'num_classes': 3}
    assert torch.equal(ckpt['state_dict']['weight'], model.weight)  # DDP prefix gone
    assert ckpt['optimizer']['state'][0]['exp_avg'].equal(opt.state_dict()['state'][0]['exp_avg'])

    bad = _original_layout(ours, epoch=4)
    bad['args'] = _NotAllowed()  # anything beyond the layout's Namespace stays refused by weights_only loading
    torch.save(bad, tmp_path / 'bad.pth.tar')
    with pytest.raises(CheckpointError, match='cannot be loaded safely'):
        read_training_checkpoint(str(tmp_path / 'bad.pth.tar'))
    bad = _original_layout(ours, epoch=4)
    bad['epoch'] = 'x'
    torch.save(bad, tmp_path / 'bad2.pth.tar')
    with pytest.raises(CheckpointError, match='no valid epoch'):
        read_training_checkpoint(str(tmp_path / 'bad2.pth.tar'))


def test_dataset_options_are_checked_in_one_line(tmp_path, monkeypatch):
    from utils.cli import UsageError, parse_args_with_config
    from utils.config import build_train_parser, check_train_args
    from utils.data import DataError, build_timm_dataset, split_tar
    args = parse_args_with_config(build_train_parser(), ['--data-dir', 'x', '--dataset', 'tfrecords/imagenet'])
    with pytest.raises(UsageError, match='--dataset tfrecords/imagenet: use wds/NAME'):
        check_train_args(args)
    args = parse_args_with_config(build_train_parser(), ['--dataset', 'hfds/x', '--recovery-interval', '-1'])
    with pytest.raises(UsageError, match='--recovery-interval must be >= 0'):
        check_train_args(args)  # hfds/ needs no --data-dir, a negative interval is refused
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: None if n == 'webdataset' else real(n, *a))
    with pytest.raises(DataError, match='--dataset wds/x needs the webdataset package: pip install webdataset'):
        build_timm_dataset('wds/x', str(tmp_path), 'train', is_training=True)
    (tmp_path / 'train.tar').write_bytes(b'')
    assert split_tar(str(tmp_path), 'train') == str(tmp_path / 'train.tar')
    assert split_tar(str(tmp_path), 'val') is None
    (tmp_path / 'train').mkdir()
    assert split_tar(str(tmp_path), 'train') is None  # a folder wins: the image folder path is unchanged


def test_class_map_fixes_the_class_indices(tmp_path):
    from utils.data import build_timm_dataset, dataset_classes
    make_image_folder(tmp_path / 'data', n_train=1, n_val=1)
    (tmp_path / 'map.txt').write_text('red\nblue\ngreen\n')
    ds = build_timm_dataset('', str(tmp_path / 'data'), 'train', is_training=True, class_map=str(tmp_path / 'map.txt'))
    assert dataset_classes(ds) == {'red': 0, 'blue': 1, 'green': 2}  # not the sorted folder order
    assert sorted(ds[i][1] for i in range(len(ds))) == [0, 1, 2]


# --- slow: through train.py and validate.py ---------------------------------------------------------------------

@pytest.mark.slow
@needs_wds
def test_webdataset_shards_train_and_validate(tmp_path):
    shards = make_wds(tmp_path / 'wds')
    out = tmp_path / 'run'
    data_args = TINY + FAST + ['--dataset', 'wds/digits', '--data-dir', str(shards), '--no-aug', '--lr', '2e-3',
                               '--epochs', '2']
    argv = data_args + ['--output', str(out)]
    code, err = run_inprocess(argv)
    assert code == 2 and 'wds/digits: the data does not list its classes; pass --num-classes' in err
    code, err = run_inprocess(argv + ['--num-classes', '10'])
    assert code == 0, err
    assert 'streamed' in err
    rows = read_summary(out / 'summary.csv')
    assert len(rows) == 2 and all(0 <= float(r['eval_top1']) <= 100 for r in rows)
    ckpt = load(out / 'last.pth')
    assert ckpt['global_step'] == 2 * (64 // 4) and ckpt['args']['num_classes'] == 10  # 80 digits, 64 to train
    from validate import main as validate_main
    cmd = [str(shards), '--dataset', 'wds/digits', '--split', 'val', '--model', 'overlock_xt', '--checkpoint',
           str(out / 'last.pth'), '--model-kwargs', *TINY[3:TINY.index('--img-size')], '--img-size', '32', '-j', '0',
           '--device', 'cpu', '--no-progress', '--results-file', str(tmp_path / 'res.json')]
    assert validate_main(cmd) == 0
    res = json.loads((tmp_path / 'res.json').read_text())
    assert res[0]['images'] == 16 and res[0]['top1'] == pytest.approx(float(rows[-1]['eval_top1']))

    # A mid-epoch checkpoint of a streamed dataset (3 batches into epoch 2): the step count is exact, the data
    # restarts the epoch's shard stream, and one line says so.
    ckpt.update(epoch=1, step_in_epoch=3, global_step=16 + 3, epoch_stats=None)
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    torch.save(ckpt, resumed / 'recovery.pth')
    code, err = run_inprocess(data_args + ['--num-classes', '10', '--output', str(resumed), '--resume', 'auto'])
    assert code == 0, err
    assert 'Streamed dataset: epoch 2 restarts its shard stream' in err and 'remaining 13 of 16 batches' in err
    assert load(resumed / 'last.pth')['global_step'] == 32


@pytest.mark.slow
def test_tar_files_train_and_validate_and_recovery_does_not_perturb(tmp_path):
    """train.tar / val.tar in --data-dir (no --dataset; map-style, so the resumable sampler and exact resume
    apply); writing recovery checkpoints leaves the run bit-identical to one without them."""
    data = make_tars(tmp_path / 'tars')
    base = TINY + FAST + ['--data-dir', str(data), '--no-aug', '--lr', '2e-3', '--epochs', '1']
    ref = tmp_path / 'ref'
    code, err = run_inprocess(base + ['--output', str(ref)])
    assert code == 0, err
    out = tmp_path / 'run'
    code, err = run_inprocess(base + ['--output', str(out), '--recovery-interval', '4'])
    assert code == 0, err
    assert 'Recovery checkpoint: epoch 1, batch 4 of 7' in err  # 40 digits, 30 to train, batch 4
    assert not (out / 'recovery.pth').exists()  # removed once last.pth is newer
    assert state_dicts_equal(load(ref / 'last.pth'), load(out / 'last.pth')) is None
    from validate import main as validate_main
    assert validate_main([str(data), '--model', 'overlock_xt', '--checkpoint', str(out / 'last.pth'),
                          '--model-kwargs', *TINY[3:TINY.index('--img-size')], '--img-size', '32', '-j', '0',
                          '--device', 'cpu', '--no-progress', '--results-file', str(tmp_path / 'r.json')]) == 0
    assert json.loads((tmp_path / 'r.json').read_text())[0]['images'] == 10


@pytest.mark.slow
@needs_hfds
def test_hugging_face_dataset_trains_and_validates(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    name = 'hfds/' + str(make_hf_parquet(tmp_path / 'digits'))
    out = tmp_path / 'run'
    code, err = run_inprocess(TINY + FAST + ['--dataset', name, '--data-dir', str(tmp_path / 'cache'), '--val-split',
                                             'validation', '--epochs', '1', '--output', str(out), '--no-aug'])
    assert code == 0, err
    ckpt = load(out / 'last.pth')
    assert ckpt['args']['num_classes'] == 10 and ckpt['global_step'] == 32 // 4  # classes from the labels
    from validate import main as validate_main
    assert validate_main([str(tmp_path / 'cache'), '--dataset', name, '--split', 'validation', '--model', 'overlock_xt',
                          '--checkpoint', str(out / 'last.pth'), '--model-kwargs', *TINY[3:TINY.index('--img-size')],
                          '--img-size', '32', '-j', '0', '--device', 'cpu', '--no-progress', '--results-file',
                          str(tmp_path / 'r.json')]) == 0
    assert json.loads((tmp_path / 'r.json').read_text())[0]['images'] == 8


@pytest.mark.slow
def test_original_release_checkpoint_resumes_at_the_next_epoch(data_dir, tmp_path):
    base = TINY + FAST + ['--data-dir', str(data_dir), '--no-aug', '--model-ema', '--amp', '--sched', 'step',
                          '--decay-epochs', '1', '--decay-rate', '0.5', '--lr', '2e-3']
    ours = tmp_path / 'ours'
    assert run_inprocess(base + ['--epochs', '1', '--output', str(ours)])[0] == 0
    first = load(ours / 'last.pth')
    original = tmp_path / 'original'
    original.mkdir()
    torch.save(_original_layout(first, epoch=0), original / 'last.pth.tar')
    code, err = run_inprocess(base + ['--epochs', '2', '--resume', str(original / 'last.pth.tar')])
    assert code == 0, err
    assert "written by the original release's train.py: weights, optimizer, EMA, loss scaler restored" in err
    assert 'Resumed' in err and '1 epochs done' in err
    rows = read_summary(original / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['2']
    assert float(rows[0]['lr']) == pytest.approx(2e-3 * 0.5)  # the step schedule continued at epoch 2
    assert load(original / 'last.pth')['global_step'] == 2 * first['global_step']


# --- slow: several processes -------------------------------------------------------------------------------------

def _two_ranks(fn, tmp_path: Path, *args) -> list:
    """Run ``fn(rank, out_dir, *args)`` in 2 gloo processes; returns what each saved to ``out_dir/<rank>.pt``."""
    import torch.multiprocessing as mp
    port = free_port()
    mp.spawn(_init_and_run, args=(port, fn, str(tmp_path), args), nprocs=2, join=True)
    return [torch.load(tmp_path / f'{r}.pt', weights_only=True) for r in range(2)]


def _init_and_run(rank: int, port: int, fn, out: str, args) -> None:
    import multiprocessing

    import torch.distributed as dist
    # mp.spawn makes 'spawn' this process's default too; a torchrun process (what users run) forks its loader
    # workers
    multiprocessing.set_start_method('fork', force=True)
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        torch.save(fn(rank, *args), os.path.join(out, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _bn_stats(rank: int):
    """Each --dist-bn mode on BatchNorm statistics that differ per process (1 / 10 on rank 0, 2 / 20 on rank 1)."""
    from utils.distributed import DistInfo, distribute_bn_stats
    out = {}
    for mode in ('reduce', 'broadcast', ''):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        ema = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        for m in (model, ema):
            m[1].running_mean.fill_(rank + 1.0)
            m[1].running_var.fill_(10.0 * (rank + 1))
        done = distribute_bn_stats([model, ema], DistInfo(rank=rank, world_size=2), mode)
        out[mode or 'off'] = {'done': done, 'mean': model[1].running_mean, 'var': model[1].running_var,
                              'ema_mean': ema[1].running_mean}
    return out


@pytest.mark.slow
def test_dist_bn_makes_statistics_equal_over_two_processes(tmp_path):
    r0, r1 = _two_ranks(_bn_stats, tmp_path)
    for mode, mean, var in (('reduce', 1.5, 15.0), ('broadcast', 1.0, 10.0)):
        for r in (r0[mode], r1[mode]):
            assert r['done']
            assert torch.allclose(r['mean'], torch.full((2,), mean)) and torch.allclose(r['var'], torch.full((2,), var))
            assert torch.allclose(r['ema_mean'], torch.full((2,), mean))
    assert not r0['off']['done'] and r0['off']['mean'][0] == 1.0 and r1['off']['mean'][0] == 2.0  # each its own


def _wds_epoch_targets(rank: int, shards: str, epochs: int):
    """The sample ids (labels) one process's training loader yields per epoch, with 0 and with 2 loader
    workers."""
    from utils.cli import parse_args_with_config
    from utils.config import build_train_parser
    from utils.distributed import DistInfo
    from utils.train_setup import build_datasets, build_loaders
    cfg = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'crop_pct': 1.0,
           'interpolation': 'bilinear'}
    found = {}
    for workers in (0, 2):
        args = parse_args_with_config(build_train_parser(), TINY + FAST + [
            '--dataset', 'wds/ids', '--data-dir', shards, '-j', str(workers), '--num-classes', '1000', '--no-aug'])
        train_set, val_set = build_datasets(args)
        loaders = build_loaders(args, DistInfo(rank=rank, world_size=2), train_set, val_set, cfg)
        out = []
        for e in range(epochs):
            loaders.set_epoch(e)
            out.append(torch.cat([y for _, y in loaders.train]))
        loaders.close()
        found[workers] = {'targets': torch.stack(out), 'batches': loaders.batches_per_epoch}
    return found


@pytest.mark.slow
@needs_wds
def test_two_ranks_see_each_shard_sample_once_per_epoch(tmp_path):
    """4 equal shards over 2 processes (x 0 or 2 loader workers): every training sample once per epoch over the
    processes, in a new order each epoch, with persistent workers too."""
    shards = make_wds(tmp_path / 'wds', per_class=8, shards=4, label_is_index=True)
    ranks = _two_ranks(_wds_epoch_targets, tmp_path, str(shards), 2)
    for workers in (0, 2):
        r0, r1 = (r[workers] for r in ranks)
        for e in range(2):  # 4 shards of 16 samples
            seen = torch.cat([r0['targets'][e], r1['targets'][e]]).sort().values
            assert seen.tolist() == list(range(64)), f'{workers} workers, epoch {e}'
        assert r0['batches'] == r1['batches'] == 8
        assert not torch.equal(r0['targets'][0], r0['targets'][1]), f'{workers} workers'
