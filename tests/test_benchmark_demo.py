"""scripts/benchmark.py, the MAC counter, and the demo pipeline in a reduced setting."""
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import models
from models.ops import na2d_av
from scripts import benchmark
from tests.helpers import REPO, tiny_cli_kwargs
from utils.flops import count_macs


def test_count_macs_conv_matches_analytic():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, (2, 3, 10, 12)) == 2 * 8 * 10 * 12 * 3 * 3 * 3


class _Aggregate(nn.Module):
    def forward(self, x):
        b, _, h, w = x.shape
        attn = torch.rand(b, 2, h, w, 25)
        value = torch.rand(b, 2, h, w, 4)
        return na2d_av(attn, value, 5)


def test_count_macs_includes_neighbourhood_aggregation():
    assert count_macs(_Aggregate(), (1, 1, 9, 11)) == 1 * 2 * 9 * 11 * 25 * 4


def test_count_macs_overlock_xt_near_paper():
    with torch.no_grad():
        macs = count_macs(timm.create_model('overlock_xt_reparam', use_gemm=False), (1, 3, 224, 224))
    assert abs(macs / 1e9 - 2.6) < 0.1  # paper: 2.6 GFLOPs (MACs)


@pytest.mark.parametrize('mode', ['infer', 'train'])
def test_benchmark_prints_table(mode, capsys, tmp_path):
    kwargs = tiny_cli_kwargs()
    out_md = tmp_path / 'bench.md'
    benchmark.main(['--mode', mode, '--models', 'overlock_xt', 'resnet18', '--model-kwargs', *kwargs,
                    '--img-size', '32', '-b', '2', '--warmup', '0', '--iters', '1', '--reparam', '--out', str(out_md)])
    out = capsys.readouterr().out
    assert f'mode={mode}' in out and '| overlock_xt |' in out and '| resnet18 |' in out
    row = [line for line in out.splitlines() if line.startswith('| overlock_xt |')][0].split('|')
    assert float(row[-3]) > 0  # images/s
    assert out_md.read_text().count('| resnet18 |') == 1


def test_benchmark_bad_input():
    with pytest.raises(SystemExit, match='unknown model.*overlock_q.*overlock_xt_reparam'):
        benchmark.main(['--models', 'overlock_q', 'resnet18'])
    assert benchmark.parse_args(['--dtype', 'bf16']).dtype == 'bfloat16'  # the short spellings the docs use


def test_demo_reduced(tmp_path):
    """The whole demo path (data, train, validate, reparam, validate) with 1 epoch on a few images."""
    proc = subprocess.run([sys.executable, 'scripts/demo.py', str(tmp_path / 'demo'), '--epochs', '1',
                           '--per-class', '6'], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'top-1 on the digits validation set' in proc.stdout
    assert (tmp_path / 'demo' / 'run' / 'curves.png').exists()
    assert (tmp_path / 'demo' / 'overlock_digits_deploy.pth').exists()


def test_depthwise_conv_census_and_timing():
    from utils.profiling import depthwise_convs, time_depthwise_convs, wall_timer
    net = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Conv2d(8, 16, 1),
                        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),
                        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False))
    calls = depthwise_convs(net, torch.randn(2, 8, 12, 10))
    assert sorted((c.kernel, c.dilation, c.channels, n) for c, n in calls.items()) == [(3, 2, 16, 2), (7, 1, 8, 1)]
    rows = time_depthwise_convs(calls, torch.device('cpu'), torch.float32, backward=True, timer=wall_timer(1))
    assert [r['conv'] for r in rows] == ['k7 C8 12x10', 'k3 d2 C16 12x10']
    assert all(r['nchw_ms'] > 0 and r['nhwc_ms'] > 0 and r['gbs'] > 0 for r in rows)


def test_gpu_report_smoke(tmp_path):
    """The one-call GPU report runs end to end on the CPU (tiny models, Triton interpreter)."""
    out = tmp_path / 'report.md'
    proc = subprocess.run([sys.executable, 'scripts/gpu_report.py', '--smoke', '--out', str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    for section in ('## Summary', '### Correctness', '### Timing', '## Model infer', '## Model train',
                    '## Depthwise convolutions, train', '## Profiler'):
        assert section in text, section
    assert '| op correctness (all shapes, dtypes, gradients) |' in text and '| PASS |' in text
    assert 'overlock_xt / convnext_tiny train images/s' in text
