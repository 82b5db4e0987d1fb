"""The measurement package and its command lines (scripts.benchmark, scripts.gpu_report), the MAC counter,
and the demo pipeline in a reduced setting."""
from collections import Counter

import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the overlock models)
from models.ops import na2d_av
from scripts import benchmark
from tests.helpers import TINY_KWARGS, run_program, tiny_cli_kwargs
from utils.measure import depthwise_convs, dtype_name, na2d_calls, parse_dtype, time_ms
from utils.measure.macs import count_macs
from utils.measure.ops import time_depthwise_convs, time_na2d


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


@pytest.mark.slow
def test_count_macs_overlock_xt_near_paper():
    with torch.no_grad():
        macs = count_macs(timm.create_model('overlock_xt_reparam', use_gemm=False), (1, 3, 224, 224))
    assert abs(macs / 1e9 - 2.6) < 0.1  # paper: 2.6 GFLOPs (MACs)


# ---------------------------------------------------------------------------------------------------------
# The measurement package.

def test_dtype_parser_accepts_long_and_short_names():
    assert dtype_name('bf16') == dtype_name('BFloat16') == 'bfloat16'
    assert parse_dtype('fp16') is parse_dtype('half') is torch.float16
    assert parse_dtype('float32') is torch.float32
    with pytest.raises(Exception, match="unknown dtype 'int7'"):
        parse_dtype('int7')


def test_timer_reports_per_call_time():
    calls = []
    t = time_ms(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5 and len(t.samples) == 3 and 0 <= t.best <= t.median
    calls.clear()
    t = time_ms(lambda: calls.append(1), warmup=0, repeat=2, min_time=1e-3)
    assert len(calls) > 3  # a sample repeats a fast call until it lasts min_time; the time is per call


@pytest.mark.parametrize('name', ['overlock_xt', 'overlock_t', pytest.param('overlock_s', marks=pytest.mark.slow),
                                  pytest.param('overlock_b', marks=pytest.mark.slow)])
def test_na2d_calls_follow_the_variant(name):
    """Read off the model: two calls per ContMix block (windows s and K), value [G, H, W, dim / (2 G)],
    the Focus-Net's stage 3 at 224 / 16 and stage 4 at 224 / 32."""
    from models.contmix import DynamicConvBlock
    calls = na2d_calls(name)
    with torch.device('meta'):
        model = timm.create_model(name)
    expected = Counter()
    for module_name, block in model.named_modules():
        if isinstance(block, DynamicConvBlock):
            side = 224 // (16 if module_name.startswith('sub_blocks3') else 32)
            for k in (block.smk_size, block.kernel_size):
                expected[(block.num_groups, side, side, block.dim // (2 * block.num_groups), k)] += 1
    assert sum(expected.values()) >= 8
    assert Counter({(c.groups, c.height, c.width, c.channels, c.kernel_size): c.calls for c in calls}) == expected


def test_na2d_calls_of_a_tiny_variant_at_small_input():
    calls = na2d_calls('overlock_xt', 32, **TINY_KWARGS)
    # 32 px: maps of 2x2 and 1x1 are upsampled to the window size before the aggregation
    assert {(c.height, c.kernel_size) for c in calls} == {(13, 13), (13, 5), (7, 7), (7, 5)}
    assert all(c.calls == 1 for c in calls)


def test_depthwise_conv_census_and_timing():
    net = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Conv2d(8, 16, 1),
                        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),
                        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False))
    calls = depthwise_convs(net, torch.randn(2, 8, 12, 10))
    assert sorted((c.kernel, c.dilation, c.channels, n) for c, n in calls.items()) == [(3, 2, 16, 2), (7, 1, 8, 1)]
    with torch.device('meta'):
        meta_net = nn.Sequential(*[nn.Conv2d(8, 8, 7, padding=3, groups=8)] * 2)
    assert list(depthwise_convs(meta_net, torch.empty(1, 8, 5, 5, device='meta')).values()) == [2]
    rows = time_depthwise_convs(calls, torch.device('cpu'), torch.float32, backward=True, warmup=0, repeat=1)
    assert [r['conv'] for r in rows] == ['k7 C8 12x10', 'k3 d2 C16 12x10']
    assert all(r['nchw_ms'] > 0 and r['nhwc_ms'] > 0 and r['gbs'] > 0 for r in rows)


def test_time_na2d_rows_and_bytes():
    call = na2d_calls('overlock_xt', 32, **TINY_KWARGS)[-1]
    rows = time_na2d(call, 2, torch.float32, torch.device('cpu'), ['torch', 'loop'], warmup=0, repeat=1)
    assert [r['backend'] for r in rows] == ['torch', 'loop']
    b, g, h, w, c = call.value_shape(2)
    kk = call.kernel_size ** 2
    assert rows[0]['fwd_bytes'] == 4 * (b * g * h * w * kk + 2 * b * g * h * w * c)  # attn + value + out
    assert rows[0]['bwd_bytes'] == 4 * (b * g * h * w * c + 2 * (b * g * h * w * kk + b * g * h * w * c))
    assert all(r['fwd_ms'] > 0 and r['bwd_ms'] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------------------
# The command lines.

def _table_rows(out):
    """The printed markdown table's rows by their first cell, each a dict keyed by the header."""
    lines = [line for line in out.splitlines() if line.startswith('| ')]
    cols = [c.strip() for c in lines[0].strip('|').split('|')]
    rows = [dict(zip(cols, (c.strip() for c in line.strip('|').split('|')))) for line in lines[1:]]
    return {row[cols[0]]: row for row in rows}


@pytest.mark.parametrize('mode', ['infer', pytest.param('train', marks=pytest.mark.slow)])
def test_benchmark_prints_table(mode, capsys, tmp_path):
    out_md = tmp_path / 'bench.md'
    benchmark.main(['--mode', mode, '--models', 'overlock_xt', 'resnet18', '--model-kwargs', *tiny_cli_kwargs(),
                    '--img-size', '32', '-b', '2', '--warmup', '0', '--iters', '1', '--reparam', '--out', str(out_md)])
    out = capsys.readouterr().out
    assert f'mode={mode}' in out and '| overlock_xt |' in out and '| resnet18 |' in out
    row = _table_rows(out)['overlock_xt']
    assert float(row['images_per_s']) > 0
    assert row['paper_gflops'] == ''  # a variant changed by --model-kwargs is not the paper's
    # a per-model peak exists on CUDA only (a process's peak resident set only grows from model to model)
    assert 'peak_mem_mb: CUDA only' in out
    assert (row['peak_mem_mb'] != '') == torch.cuda.is_available()
    assert out_md.read_text().count('| resnet18 |') == 1


def test_benchmark_paper_gflops_beside_a_variant_as_published(capsys):
    """Without --model-kwargs, at 224², the paper's GFLOPs stand beside our count (the auxiliary head the
    benchmark builds every OverLoCK model with is no change to the variant); at another size they do not."""
    for size, paper in (('224', '2.6'), ('64', '')):
        benchmark.main(['--models', 'overlock_xt', '--img-size', size, '-b', '1', '--warmup', '0', '--iters', '1'])
        assert _table_rows(capsys.readouterr().out)['overlock_xt']['paper_gflops'] == paper


def test_benchmark_na2d_mode(capsys):
    benchmark.main(['--mode', 'na2d', '--models', 'overlock_xt', '--model-kwargs', *tiny_cli_kwargs(), '--img-size', '32',
                    '-b', '1', '--warmup', '0', '--iters', '1', '--min-time', '0', '--backends', 'torch',
                    '--baseline'])
    out = capsys.readouterr().out
    assert 'mode=na2d' in out and '| overlock_xt | 13x13 G4 C4 K13 | 1 | torch |' in out
    assert '| overlock_xt | loop |' in out  # the per-network sums


def test_benchmark_bad_input():
    with pytest.raises(SystemExit, match='unknown model.*overlock_q.*overlock_xt_reparam'):
        benchmark.main(['--models', 'overlock_q', 'resnet18'])
    assert benchmark.parse_args(['--dtype', 'bf16']).dtype == 'bfloat16'  # the short spellings the docs use
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--dtype', 'int7'])


@pytest.mark.slow
@pytest.mark.parametrize('script', ['benchmark', 'gpu_report', 'demo'])
def test_scripts_run_as_files_say_the_module_form(script):
    proc = run_program([f'scripts/{script}.py'], timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f'run from the repository root as: python -m scripts.{script}' + \
        (' [OUTDIR] (or bash scripts/demo.sh)' if script == 'demo' else ' [--help]')


@pytest.mark.slow
def test_demo_reduced(tmp_path):
    """The whole demo path (data, train, validate, reparam, validate) with 1 epoch on a few images; the
    training's epochs are shown as they run and kept in the log."""
    proc = run_program(['-m', 'scripts.demo', str(tmp_path / 'demo'), '--epochs', '1', '--per-class', '6'])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'top-1 on the digits validation set' in proc.stdout
    log = (tmp_path / 'demo' / 'train.log').read_text()
    shown = [line for line in proc.stdout.splitlines() if line.startswith('  ')]
    assert shown and all(line[2:] in log for line in shown)  # streamed lines are the log's lines
    assert (tmp_path / 'demo' / 'run' / 'curves.png').exists()
    assert (tmp_path / 'demo' / 'overlock_digits_deploy.pth').exists()


@pytest.mark.slow
def test_gpu_report_smoke(tmp_path):
    """The one-call GPU report runs end to end on the CPU (tiny models, Triton interpreter)."""
    out = tmp_path / 'report.md'
    proc = run_program(['-m', 'scripts.gpu_report', '--smoke', '--out', str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    for section in ('## Summary', '## Correctness tests (tests/test_gpu.py)', '## ContMix aggregation op',
                    '## Model infer', '## Model train', '## Depthwise convolutions, train', '## Profiler'):
        assert section in text, section
    assert 'GPU correctness tests' in text and '| triton |' not in text
    assert 'overlock_xt / convnext_tiny train images/s' in text
    assert '| 7x7 G4 C6 K5 | 1 | fused | fp32 | fwd |' in text  # the op row, triton beside torch


# ---------------------------------------------------------------------------------------------------------
# The loader benchmark.

def test_photo_folder_is_real_jpegs(tmp_path):
    from PIL import Image

    from utils.measure.loader import build_photo_folder
    assert build_photo_folder(str(tmp_path), 6, num_classes=2) == 6
    files = sorted(tmp_path.glob('class*/*.jpg'))
    assert len(files) == 6 and {f.parent.name for f in files} == {'class0', 'class1'}
    sizes = {Image.open(f).size for f in files}
    assert sizes <= {(500, 375), (375, 500)}
    assert len({f.read_bytes() for f in files}) == 6  # distinct images


def test_loader_benchmark_reads_the_recipe_from_the_config(tmp_path):
    from utils.measure.loader import BASE_CONFIG, recipe_augmentation
    shipped = recipe_augmentation()
    assert shipped['auto_augment'] == 'rand-m9-mstd0.5-inc1' and shipped['re_prob'] == 0.25
    assert shipped['scale'] == (0.08, 1.0) and shipped['interpolation'] == 'random'
    cfg = tmp_path / 'changed.yaml'
    cfg.write_text(f'_base_: {BASE_CONFIG}\naa: rand-m5\nreprob: 0.1\n')
    assert recipe_augmentation(str(cfg)) == dict(shipped, auto_augment='rand-m5', re_prob=0.1)


def test_loader_benchmark_on_a_tiny_folder(tmp_path, capsys):
    from utils.measure.loader import build_photo_folder
    build_photo_folder(str(tmp_path), 8, size=(160, 120))
    benchmark.main(['--mode', 'loader', '--data-dir', str(tmp_path), '--img-size', '64', '-b', '4', '--workers', '0',
                    '--batches', '1', '--rounds', '1', '--device', 'cpu'])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('| ')]
    cols = [c.strip() for c in lines[0].strip('|').split('|')]
    rows = {r['pipeline']: r for r in (dict(zip(cols, (c.strip() for c in line.strip('|').split('|'))))
                                       for line in lines[1:])}
    assert set(rows) == {'ours_float32', 'ours_uint8', 'ours_uint8_draft', 'timm'}
    assert rows['ours_uint8']['batch_dtype'] == 'uint8' and int(rows['ours_uint8']['bytes_per_image']) == 3 * 64 * 64
    assert rows['ours_float32']['batch_dtype'] == 'float32'
    assert int(rows['ours_float32']['bytes_per_image']) == 4 * 3 * 64 * 64
    assert int(rows['timm']['bytes_per_image']) == 3 * 64 * 64 and rows['timm']['vs_timm'] == '1.00x'
    assert all(float(r['cpu_ms_per_image']) > 0 and float(r['per_worker']) > 0 for r in rows.values())
    assert 'reduced-size decoding' in out


def test_reduced_size_decoding_keeps_the_random_draws(tmp_path):
    """Same seeds: crops that cannot be decoded reduced are bit-identical to the full path; reduced ones
    differ by little (the resampling), and the share of reduced crops is counted."""
    from utils.measure.loader import build_photo_folder, draft_difference
    build_photo_folder(str(tmp_path / 'small'), 4, size=(160, 120))
    same = draft_difference(str(tmp_path / 'small'), img_size=96, samples=8)
    assert same['reduced_share'] == 0 and same['full_mean'] == same['draft_mean']
    build_photo_folder(str(tmp_path / 'large'), 4, size=(640, 480))
    diff = draft_difference(str(tmp_path / 'large'), img_size=64, samples=16)
    assert diff['reduced_share'] > 0.3
    assert 0 < diff['mean_abs_diff'] < 8
    assert abs(diff['full_mean'] - diff['draft_mean']) < 2
