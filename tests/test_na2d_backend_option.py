"""``--na2d-backend`` on every command line: it changes the backend the ContMix op runs on, a bad value is one
line naming the option (exit 2), train.py records it in args.yaml, and the non-finite-loss message names the
backend and the torch cross-check."""
import importlib

import pytest
import torch

from models import ops
from models.ops import dispatch
from utils.cli import UsageError, run_cli
from utils.config import args_to_yaml, build_train_parser
from utils.distributed import DistInfo
from utils.train_step import NonFiniteGuard, NonFiniteLoss

pytest.importorskip('triton')


class _Reached(Exception):
    """Raised by a stub once the command has gone past its option handling."""


@pytest.fixture(autouse=True)
def _backend_state(monkeypatch):
    """The Triton interpreter makes 'triton' available for CPU tensors (the automatic choice there stays
    'torch'), so a CPU run can tell the backends apart; the process-wide choice is restored afterwards."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(dispatch, '_override', None)
    yield
    dispatch.set_backend(None)


def _stub_validate(mp, seen, tmp_path):
    mod = importlib.import_module('validate')
    mp.setattr(mod, 'build_eval_model', lambda *a, **k: seen.append(ops.get_backend('cpu')) or _raise())
    return mod.main, [str(tmp_path), '--model', 'overlock_xt', '--device', 'cpu']


def _stub_reparam(mp, seen, tmp_path):
    mod = importlib.import_module('reparam')
    mp.setattr(mod, 'build_eval_model', lambda *a, **k: seen.append(ops.get_backend('cpu')) or _raise())
    return mod.main, ['--model', 'overlock_xt', '--checkpoint', str(tmp_path / 'in.pth'), '--output',
                      str(tmp_path / 'out.pth'), '--device', 'cpu']


def _stub_export(mp, seen, tmp_path):
    pytest.importorskip('onnx')
    mod = importlib.import_module('scripts.export_onnx')
    mp.setattr(mod, 'build_eval_model', lambda *a, **k: seen.append(ops.get_backend('cpu')) or _raise())
    return mod.main, ['--model', 'overlock_xt', '--output', str(tmp_path / 'x.onnx')]


def _stub_benchmark(mp, seen, tmp_path):
    mod = importlib.import_module('scripts.benchmark')
    mp.setattr(mod, 'run', lambda args: seen.append(ops.get_backend('cpu')) or _raise())
    return mod.main, ['--models', 'overlock_xt', '--device', 'cpu']


def _stub_train(mp, seen, tmp_path):
    from utils import train_loop
    mp.setattr(train_loop.Trainer, 'run', lambda self: seen.append(ops.get_backend('cpu')) or _raise())
    return train_loop.main, ['--data-dir', str(tmp_path), '--device', 'cpu']


def _raise():
    raise _Reached()


COMMANDS = {'train': _stub_train, 'validate': _stub_validate, 'reparam': _stub_reparam,
            'benchmark': _stub_benchmark, 'export_onnx': _stub_export}


@pytest.mark.parametrize('command', list(COMMANDS))
def test_option_sets_the_backend_the_op_runs_on(command, monkeypatch, tmp_path):
    seen = []
    main, argv = COMMANDS[command](monkeypatch, seen, tmp_path)
    for flag, expected in ((['--na2d-backend', 'triton'], 'triton'), (['--na2d-backend', 'torch'], 'torch'),
                           ([], 'torch')):  # the default 'auto': torch for CPU tensors
        with pytest.raises(_Reached):
            main(argv + flag)
        assert seen[-1] == expected, (command, flag)
    monkeypatch.setenv(dispatch.ENV_VAR, 'triton')  # 'auto' keeps the environment variable's choice
    with pytest.raises(_Reached):
        main(argv)
    assert seen[-1] == 'triton'
    with pytest.raises(_Reached):
        main(argv + ['--na2d-backend', 'torch'])  # the option wins over the variable
    assert seen[-1] == 'torch'


@pytest.mark.parametrize('command', list(COMMANDS))
@pytest.mark.parametrize('value, words', [('cuda', 'is not a na2d_av backend'), ('natten', 'is not available')])
def test_bad_backend_is_one_line_naming_the_option(command, value, words, monkeypatch, tmp_path, capsys):
    if value == 'natten' and 'natten' in ops.available_backends():
        pytest.skip('natten is installed here')
    seen = []
    main, argv = COMMANDS[command](monkeypatch, seen, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv + ['--na2d-backend', value]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and not seen
    assert len(err.splitlines()) == 1 and err.startswith('error: --na2d-backend ') and words in err, err
    assert 'auto|triton' in err or 'available backends' in err


def test_backend_that_cannot_take_the_device_is_a_usage_error():
    from utils.cli import apply_na2d_backend
    with pytest.raises(UsageError, match=r'^--na2d-backend .*triton runs on CUDA tensors \(got meta\)'):
        apply_na2d_backend('triton', torch.device('meta'))


def test_train_records_the_backend_in_args_yaml(tmp_path):
    parser = build_train_parser()
    args = parser.parse_args(['--data-dir', 'x', '--na2d-backend', 'torch'])
    assert build_train_parser().parse_args(['--data-dir', 'x']).na2d_backend == 'auto'  # the original's lines
    text = args_to_yaml({k: v for k, v in vars(args).items() if k != 'config'})
    assert 'na2d_backend: torch' in text.splitlines()
    path = tmp_path / 'args.yaml'
    path.write_text(text)
    from utils.cli import parse_args_with_config
    assert parse_args_with_config(build_train_parser(), ['-c', str(path)]).na2d_backend == 'torch'


@pytest.mark.parametrize('backend', ['triton', 'torch'])
def test_nonfinite_message_names_the_backend(backend, tmp_path):
    ops.set_backend(backend)
    guard = NonFiniteGuard(DistInfo(), batches_per_epoch=10, output=str(tmp_path))
    guard.add(0, 0, torch.tensor(float('nan')))
    with pytest.raises(NonFiniteLoss) as err:
        guard.check()
    msg = str(err.value)
    assert f'ContMix ran on the {backend} na2d backend' in msg and '\n' not in msg
    assert ('--na2d-backend torch' in msg) == (backend != 'torch')
