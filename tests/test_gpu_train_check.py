"""The GPU training check (python -m scripts.gpu_train_check): its CPU smoke path end to end through torchrun,
how it reads a run's outputs and judges them, and its refusals of bad input."""
import math
import os
import subprocess
import sys

import pytest
import torch

from scripts import gpu_train_check
from tests.helpers import REPO
from utils.measure.train_check import RunPlan, RunResult, plan_epochs, read_run, report_markdown


@pytest.mark.slow
def test_smoke_two_processes_end_to_end(tmp_path, monkeypatch, cli):
    """bfloat16 AMP through torchrun with 2 CPU processes (gloo, DDP): the run passes with every planned step
    done and a finite loss, and the markdown file holds what was printed (each dtype is a run of the same code;
    the next test shows float16's command)."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'report.md'
    code, stdout, err = cli(gpu_train_check, ['--smoke', '--gpus', '2', '--work', str(tmp_path / 'work'),
                                              '--out', str(out), '--quiet', '--dtypes', 'bfloat16'])
    assert code == 0, stdout[-3000:] + err[-2000:]
    text = out.read_text()
    assert text in stdout
    table = [line for line in text.splitlines() if line.startswith('| ')]
    assert table[0].startswith('| AMP | result | exit | steps |')
    rows = {line.split(' | ')[0][2:]: line.split(' | ') for line in table[1:]}
    assert set(rows) == {'bfloat16'}
    for row in rows.values():
        assert row[1:4] == ['PASS', '0', '3 / 3']  # 30 images per process, batch 16: 1 update x 3 epochs
        first, last = (float(v) for v in row[7].split(' → '))
        assert math.isfinite(first) and math.isfinite(last)
    assert '2 processes: DDP over gloo' in text and text.startswith('# GPU training check (--smoke')
    assert 'torch.distributed.run --standalone --nproc_per_node=2 train.py -c configs/overlock_t.yaml' in text
    assert '--amp-dtype bfloat16 --channels-last --model-ema' in text and '--compile' not in text
    for dtype in ('bfloat16',):
        run = tmp_path / 'work' / dtype
        assert (run / 'summary.csv').is_file() and (tmp_path / 'work' / f'{dtype}.log').is_file()
        args = (run / 'args.yaml').read_text()
        assert f'amp_dtype: {dtype}' in args and 'model: overlock_t' in args and 'channels_last: true' in args


def test_failed_run_shows_its_log_and_fails_the_check(tmp_path, cli, monkeypatch):
    """A run that exits 1 after an error line (the launch is real; the program a stand-in for train.py refusing
    its options, which tests/test_train.py covers): the row says FAIL with the exit code, the log's last lines
    follow, exit 1."""
    from utils.measure import train_check
    launch = train_check.launch
    refuse = "import sys; print('error: --model overlock_nonexistent: not a registered model'); sys.exit(1)"
    monkeypatch.setattr(train_check, 'launch', lambda cmd, log, **kw: launch([sys.executable, '-c', refuse], log, **kw))
    code, stdout, err = cli(gpu_train_check, ['--smoke', '--dtypes', 'float16', '--work', str(tmp_path), '--quiet'])
    assert code == 1, stdout[-3000:] + err[-2000:]
    assert '| float16 | FAIL (exit 1) | 1 | 0 / 3 |' in stdout
    assert f'## float16: last lines of {tmp_path / "float16.log"}' in stdout
    assert '--amp-dtype float16' in stdout  # the command of the float16 run
    assert 'overlock_nonexistent' in stdout.split('last lines of')[1]


def test_read_run_judges_loss_and_steps(tmp_path):
    """Non-finite final loss or missing steps fail a run that exited 0; images/s leaves the first epoch out."""
    run = tmp_path / 'run'
    run.mkdir()
    log = tmp_path / 'run.log'
    log.write_text('Output x | 1 process(es) x batch 8 x 1 accumulation = global batch 8 | lr 1e-05 | 3 epochs '
                   '(3 + 0 cool-down), 4 updates per epoch\nEpoch 3/3: ... 1.0s  peak mem 1.50 GiB\n')

    def result(losses, times, expected=12):
        lines = ['epoch,train_loss,eval_top1,eval_ema_top1,epoch_time,nonfinite_skipped']
        lines += [f'{i + 1},{loss},50,20,{t},2' for i, (loss, t) in enumerate(zip(losses, times))]
        (run / 'summary.csv').write_text('\n'.join(lines) + '\n')
        return read_run(RunResult('float16', str(run), str(log), 0, 5.0, expected))

    good = result(['2.5', '2.0', '1.5'], ['30', '2', '4'])
    assert good.problem == '' and good.steps == 12 and good.loss_last == 1.5
    assert good.images_per_s == pytest.approx(4 * 8 / 3)  # median of 2 s and 4 s, the 30 s epoch left out
    assert good.peak_mem_gib == 1.5 and good.skipped == 2 and (good.top1, good.ema_top1) == (50, 20)
    assert result(['2.5', '2.0', 'nan'], ['3', '2', '4']).problem == 'loss not finite'
    assert result(['2.5', '2.0'], ['3', '2']).problem == '8 of 12 steps'
    timed_out = read_run(RunResult('float16', str(run), str(log), None, 5.0, 12))  # the 2 epochs above
    assert timed_out.problem == 'timed out'
    plan = RunPlan('configs/overlock_t.yaml', 'd', 1, 8, 0, 3, 0, 4, 12)
    text = report_markdown([good, timed_out], 'env', plan, {'float16': ['python', 'train.py']})
    assert '| float16 | PASS |' in text and '| float16 | FAIL (timed out) | – | 8 / 12 |' in text
    assert 'without a process group' in text and text.count('last lines of') == 1


def test_plan_keeps_the_recipe_cooldown_when_it_can():
    # 1438 digits at batch 128: 11 updates per epoch; 300 steps -> 27 epochs = 17 + the recipe's 10 cool-down
    assert plan_epochs(1438, 128, 1, 300, 10) == (17, None, 11)
    assert plan_epochs(1438, 128, 2, 300, 10) == (50, None, 5)  # 719 images per process
    assert plan_epochs(60, 16, 1, 3, 10) == (1, 0, 3)  # too few steps for the cool-down: --cooldown-epochs 0
    with pytest.raises(ValueError, match='fewer than one batch'):
        plan_epochs(60, 64, 1, 3, 10)


@pytest.mark.parametrize('argv, message', [
    (['--gpus', '0'], 'error: --gpus 0: must be at least 1 (one process per GPU)'),
    (['--batch', '7'], 'error: --batch 7: must be even and at least 2 (the recipe mixes pairs of images)'),
    (['--out', 'no_such_folder/report.md'],
     'error: --out no_such_folder/report.md: folder no_such_folder does not exist'),
])
def test_bad_input_is_one_line(argv, message, tmp_path, cli):
    code, out, err = cli(gpu_train_check, ['--smoke', '--work', str(tmp_path), *argv])
    assert code == 2 and err.strip() == message and not out


def test_unwritable_out_folder(tmp_path, cli):
    folder = tmp_path / 'ro'
    folder.mkdir(mode=0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip('running as a user who can write anywhere (root)')
        code, out, err = cli(gpu_train_check, ['--smoke', '--work', str(tmp_path), '--out', str(folder / 'r.md')])
        assert code == 2 and err.strip() == f'error: --out {folder / "r.md"}: folder {folder} is not writable'
    finally:
        folder.chmod(0o700)


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA device present')
def test_without_cuda_points_to_smoke(tmp_path, cli):
    code, out, err = cli(gpu_train_check, ['--work', str(tmp_path)])
    assert code == 2 and err.strip() == 'error: no CUDA device; use --smoke for a CPU run of the check itself'


def test_run_as_a_file_says_the_module_form():
    proc = subprocess.run([sys.executable, 'scripts/gpu_train_check.py'], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == 'run from the repository root as: python -m scripts.gpu_train_check [--help]'
