"""Triton's kernel cache at the start of training: one line when it is not writable, and with several processes
one per node compiles the kernels while the others wait (mocks where only a GPU could tell)."""
import argparse
import logging

import pytest
import torch

from utils import train_setup
from utils.distributed import DistInfo


def test_cache_problem_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path / 'cache'))
    assert train_setup.triton_cache_dir() == str(tmp_path / 'cache')
    assert train_setup.triton_cache_problem() is None and (tmp_path / 'cache').is_dir()
    assert list((tmp_path / 'cache').iterdir()) == []  # the probe leaves nothing behind
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    monkeypatch.setenv('TRITON_CACHE_DIR', str(blocker / 'cache'))  # under a file: not creatable, even as root
    msg = train_setup.triton_cache_problem()
    assert msg and '\n' not in msg and str(blocker / 'cache') in msg and 'TRITON_CACHE_DIR' in msg


def _args():
    return argparse.Namespace(batch_size=4, channels_last=True)


@pytest.fixture
def spies(monkeypatch):
    calls = {'compile': [], 'barrier': 0}
    from models import ops
    monkeypatch.setattr(ops, 'get_backend', lambda device_type='cpu': 'triton')
    monkeypatch.setattr(train_setup, 'triton_cache_problem', lambda: None)
    monkeypatch.setattr(train_setup, 'compile_model_kernels', lambda *a, **k: calls['compile'].append(a) or 1.0)

    def barrier(info):
        calls['barrier'] += 1
    monkeypatch.setattr(train_setup, 'barrier', barrier)
    return calls


@pytest.mark.parametrize('local_rank, compiles', [(0, 1), (1, 0), (7, 0)])
def test_one_rank_per_node_compiles_the_others_wait(spies, local_rank, compiles):
    info = DistInfo(rank=8 + local_rank, world_size=16, local_rank=local_rank, device=torch.device('cuda', local_rank))
    train_setup.prepare_kernel_cache(_args(), info, torch.nn.Identity(), {'input_size': (3, 224, 224)},
                                     torch.bfloat16)
    assert len(spies['compile']) == compiles and spies['barrier'] == 1
    if compiles:  # the training batch, resolution, device, autocast dtype and layout
        assert spies['compile'][0][1:] == ((3, 224, 224), 4, info.device, torch.bfloat16, True)


def test_nothing_to_do_off_cuda_alone_or_on_another_backend(spies, monkeypatch):
    cfg = {'input_size': (3, 32, 32)}
    train_setup.prepare_kernel_cache(_args(), DistInfo(world_size=2), torch.nn.Identity(), cfg)  # CPU
    train_setup.prepare_kernel_cache(_args(), DistInfo(device=torch.device('cuda', 0)), torch.nn.Identity(), cfg)
    from models import ops
    monkeypatch.setattr(ops, 'get_backend', lambda device_type='cpu': 'torch')
    train_setup.prepare_kernel_cache(_args(), DistInfo(world_size=2, device=torch.device('cuda', 0)),
                                     torch.nn.Identity(), cfg)
    assert spies['compile'] == [] and spies['barrier'] == 0


def test_unwritable_cache_is_said_once_per_node_and_nobody_waits_for_nothing(spies, monkeypatch, caplog):
    monkeypatch.setattr(train_setup, 'triton_cache_problem', lambda: 'Triton kernel cache /x is not writable')
    with caplog.at_level(logging.WARNING, logger='train'):
        for local_rank in (0, 1):
            info = DistInfo(rank=local_rank, world_size=2, local_rank=local_rank, device=torch.device('cuda', 0))
            train_setup.prepare_kernel_cache(_args(), info, torch.nn.Identity(), {'input_size': (3, 32, 32)})
    assert [r.getMessage() for r in caplog.records] == ['Triton kernel cache /x is not writable']
    assert spies['compile'] == [] and spies['barrier'] == 2  # every process still meets the others


def test_compiling_the_kernels_leaves_the_run_untouched():
    """The warm-up step changes no weight, BatchNorm statistic, gradient or random state of the real run."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 5)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = train_setup.compile_model_kernels(model, (3, 32, 32), 2, torch.device("cpu"), torch.bfloat16,
                                                channels_last=True)
    assert seconds > 0 and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
