"""Fixtures shared by every test module. Tests run from the repository root on the CPU (see pytest.ini); the
shared helpers are plain modules: tests/helpers.py (the tiny model, paths, image folder, command-line runner)
and tests/reference.py (brute-force ops)."""
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_KWARGS, make_image_folder, randomize_bn_stats, run_main


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) each worker, and each process it starts, takes its share of the cores for
    torch's own threads, so N workers do not oversubscribe the machine."""
    workers = os.environ.get('PYTEST_XDIST_WORKER_COUNT')
    if workers:
        share = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ.setdefault('OMP_NUM_THREADS', str(share))  # inherited by spawned and started processes
        torch.set_num_threads(share)


@pytest.fixture
def tiny_kwargs():
    """A fresh copy of the tiny model's constructor arguments."""
    return dict(TINY_KWARGS)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cli():
    """The in-process command-line runner: ``cli(module, argv) -> (exit code, stdout, stderr)``
    (:func:`tests.helpers.run_main`)."""
    return run_main


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> Path:
    """A 3-class ImageFolder (``train/`` 8 and ``val/`` 4 images per class, 32x32 noisy colours). Shared by
    every test: copy it before changing it."""
    return make_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint of ours (raw and EMA weights, non-trivial BatchNorm statistics) of the tiny
    OverLoCK-XT with 3 classes, as train.py writes it."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('overlock_xt', **{**TINY_KWARGS, 'num_classes': 3})
    randomize_bn_stats(model)
    path = tmp_path_factory.mktemp('ckpt') / 'last.pth'
    sd = model.state_dict()
    torch.save({'version': 1, 'arch': 'overlock_xt', 'epoch': 3, 'state_dict': sd, 'state_dict_ema': sd,
                'args': {'model': 'overlock_xt'}, 'metric': 50.0}, path)
    return path
