"""The GPU report: every GPU measurement of the project in one call, with a summary against its targets.

Parts (each can be left out):
  ``tests``   the CUDA-marked correctness tests (``tests/test_gpu.py``), run by pytest, their errors tabulated;
  ``op``      ContMix aggregation op timing at a model's real shapes, triton beside the torch backend,
              achieved bandwidth against a measured device-to-device copy;
  ``model``   inference (deploy form) and training images/s and peak memory beside a reference model;
  ``dwconv``  every depthwise convolution of the model timed alone in both layouts, against the step time;
  ``profile`` torch.profiler's top kernels of one training step;
  ``static``  the static cost model's table (``utils.measure.static_gpu``).
"""
import contextlib
import datetime
import io
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import static_gpu
from .dtypes import dtype_name, parse_dtype, short_name
from .model import ModelBench, bench_models, create, make_step, profile_table
from .ops import copy_bandwidth, default_backends, gbs, time_depthwise_convs, time_na2d
from .shapes import depthwise_convs, meta_model, na2d_calls

__all__ = ['ReportConfig', 'PARTS', 'TARGETS', 'environment', 'run_report']

PARTS = ('tests', 'op', 'model', 'dwconv', 'profile', 'static')
TARGETS = {'op_fwd_roofline': 0.7, 'infer': 0.8, 'train': 0.6, 'train_peak_mem': 1.3}
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ReportConfig:
    """What the report measures; the defaults are the settings the targets refer to (one CUDA GPU)."""
    models: Sequence[str] = ('overlock_xt', 'overlock_t', 'convnext_tiny')
    target: str = 'overlock_t'
    reference: str = 'convnext_tiny'
    dtype: str = 'bfloat16'
    infer_batch: int = 256
    train_batch: int = 128
    op_batch: int = 128
    op_dtypes: Sequence[str] = ('bfloat16', 'float32')
    img_size: int = 224
    warmup: int = 5
    iters: int = 20
    skip: Sequence[str] = ()
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    smoke: bool = False  # CPU run of the code itself: tests not run, timings meaningless

    def bench(self, mode: str) -> ModelBench:
        return ModelBench(mode=mode, batch_size=self.infer_batch if mode == 'infer' else self.train_batch,
                          img_size=self.img_size, dtype=self.dtype, channels_last=True, reparam=mode == 'infer',
                          warmup=self.warmup, iters=self.iters, flops=False, model_kwargs=dict(self.model_kwargs))


def environment(device: torch.device) -> str:
    """One line: device, library versions, Triton mode, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'not installed'
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({platform.processor() or "?"})'
    mode = ('Triton interpreter (TRITON_INTERPRET=1), timings meaningless'
            if os.environ.get('TRITON_INTERPRET') == '1' else 'compiled')
    return (f'device: {name}; torch {torch.__version__}; triton {triton_version}; CUDA {torch.version.cuda}; '
            f'{mode}; {datetime.datetime.now().astimezone().isoformat(timespec="minutes")}')


def _table(rows: Sequence[Dict[str, object]], cols: Sequence[str]) -> str:
    from utils.evaluate import markdown_table
    return markdown_table(list(rows), list(cols))


def _result(ok: bool) -> str:
    return 'PASS' if ok else 'MISS'


class _Report:
    def __init__(self, cfg: ReportConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.sections: List[str] = []
        self.summary: List[Dict[str, str]] = []
        self.step_ms: Dict[str, Dict[str, float]] = {}

    def add(self, title: str, text: str) -> None:
        print(f'\n{title}\n{text}', flush=True)
        self.sections.append(f'## {title}\n\n{text}')

    def summarise(self, what: str, measured: str, target: str, result: str) -> None:
        self.summary.append(dict(what=what, measured=measured, target=target, result=result))

    # -- parts ------------------------------------------------------------------------------------------

    def tests(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / 'gpu.xml'
            cmd = [sys.executable, '-m', 'pytest', 'tests/test_gpu.py', '-m', 'cuda', '-q', '-p', 'no:cacheprovider',
                   f'--junitxml={xml}']
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            rows = _junit_rows(xml) if xml.exists() else []
        if not rows:
            self.add('Correctness tests (tests/test_gpu.py)', f'pytest ran no test (exit {proc.returncode}):\n\n'
                     f'```\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n```')
            self.summarise('GPU correctness tests', 'not run', 'all pass', 'MISS')
            return
        counts = {s: sum(r['result'] == s for r in rows) for s in ('PASS', 'FAIL', 'skipped')}
        self.add('Correctness tests (tests/test_gpu.py)',
                 f'{counts["PASS"]} passed, {counts["FAIL"]} failed, {counts["skipped"]} skipped '
                 f'(relative error against the float64 torch backend, output and every gradient)\n\n'
                 + _table(rows, ['test', 'shape', 'worst_rel_err', 'bound', 'result']))
        ran = counts['PASS'] + counts['FAIL']
        self.summarise(f'GPU correctness tests ({ran} run)',
                       f'{counts["FAIL"]} failed' if ran else 'all skipped (no CUDA)', 'all pass',
                       _result(ran > 0 and counts['FAIL'] == 0) if ran else '-')

    def op(self) -> None:
        cfg, device = self.cfg, self.device
        timing = dict(warmup=0, repeat=1) if cfg.smoke else dict(warmup=10, repeat=50, flush_l2=True)
        copy_gbs = copy_bandwidth(device, (1 << 22) if cfg.smoke else (1 << 30), **timing)
        backends = [b for b in ('triton', 'torch') if b in default_backends()]
        calls = na2d_calls(cfg.target, cfg.img_size, **cfg.model_kwargs)
        if cfg.smoke:
            calls = calls[-1:]  # the smallest: this only keeps the code exercised
        out = []
        for dname in cfg.op_dtypes:
            for call in calls:
                for fused in (False, True):
                    rows = {r['backend']: r for r in time_na2d(call, cfg.op_batch, parse_dtype(dname), device,
                                                               backends, fused=fused, **timing)}
                    first = rows[backends[0]]
                    for direction in ('fwd', 'bwd'):
                        moved = first[f'{direction}_bytes']
                        line = dict(shape=call.label, calls=call.calls, op=first['op'], dtype=short_name(dname),
                                    dir=direction, mb=f'{moved / 1e6:.3g}')
                        for b in backends:
                            ms = rows[b][f'{direction}_ms']
                            line[f'{b}_ms'] = f'{ms:.3f}'
                            line[f'{b}_gbs'] = f'{gbs(moved, ms):.0f}'
                        tri = rows.get('triton')
                        if tri is not None:
                            share = gbs(moved, tri[f'{direction}_ms']) / copy_gbs
                            line['triton_share_of_copy'] = f'{100 * share:.0f}%'
                            if 'torch' in rows:
                                line['speedup'] = f'{rows["torch"][f"{direction}_ms"] / tri[f"{direction}_ms"]:.2f}x'
                            if direction == 'fwd' and dname == cfg.op_dtypes[0]:
                                self.summarise(f'{first["op"]} forward {call.label} {short_name(dname)}, share of '
                                               f'copy bandwidth', f'{100 * share:.0f}%',
                                               f'>= {100 * TARGETS["op_fwd_roofline"]:.0f}%',
                                               _result(share >= TARGETS['op_fwd_roofline']))
                        out.append(line)
        cols = ['shape', 'calls', 'op', 'dtype', 'dir', 'mb'] + [f'{b}_{k}' for b in backends for k in ('ms', 'gbs')]
        if 'triton' in backends:
            cols += ['triton_share_of_copy'] + (['speedup'] if 'torch' in backends else [])
        self.add(f'ContMix aggregation op, {cfg.target}\'s shapes, batch {cfg.op_batch}',
                 f'best of the timed runs, L2 cleared before each; bytes that must move in MB; device-to-device '
                 f'copy: {copy_gbs:.0f} GB/s\n\n' + _table(out, cols))

    def model(self) -> None:
        cfg = self.cfg
        for mode in ('infer', 'train'):
            bench = cfg.bench(mode)
            rows = bench_models(cfg.models, bench, self.device)
            header = (f'{mode}: {bench.dtype}, channels_last, batch {bench.batch_size}, {bench.img_size} px'
                      f'{", deploy form" if mode == "infer" else ", AMP step with AdamW"}')
            self.add(f'Model {mode}', f'_{header}_\n\n' + _table(
                rows, ['model', 'params_train_m', 'params_deploy_m', 'images_per_s', 'peak_mem_mb']))
            ips = {r['model']: r['images_per_s'] for r in rows}
            self.step_ms[mode] = {n: 1e3 * bench.batch_size / v for n, v in ips.items()}
            if cfg.target in ips and cfg.reference in ips:
                ratio = ips[cfg.target] / ips[cfg.reference]
                self.summarise(f'{cfg.target} / {cfg.reference} {mode} images/s (batch {bench.batch_size})',
                               f'{ratio:.2f}x', f'>= {TARGETS[mode]}x', _result(ratio >= TARGETS[mode]))
            mem = {r['model']: r.get('peak_mem_mb') for r in rows}
            if mode == 'train' and mem.get(cfg.target) and mem.get(cfg.reference):
                ratio = mem[cfg.target] / mem[cfg.reference]
                limit = TARGETS['train_peak_mem']
                self.summarise(f'{cfg.target} / {cfg.reference} peak training memory (batch {bench.batch_size})',
                               f'{ratio:.2f}x', f'<= {limit}x', _result(ratio <= limit))

    def dwconv(self) -> None:
        cfg = self.cfg
        timing = dict(warmup=1, repeat=2) if cfg.smoke else dict(warmup=10, repeat=30)
        for mode in ('infer', 'train'):
            bench = cfg.bench(mode)
            dtype = parse_dtype(bench.dtype)
            name = cfg.target + ('_reparam' if mode == 'infer' and not cfg.target.endswith('_reparam') else '')
            model = meta_model(name, **bench.kwargs_for(name)).train(mode == 'train')
            calls = depthwise_convs(model, torch.empty(bench.batch_size, 3, bench.img_size, bench.img_size,
                                                       device='meta'))
            rows = time_depthwise_convs(calls, self.device, dtype, backward=mode == 'train', **timing)
            total = {fmt: sum(r['calls'] * r[f'{fmt}_ms'] for r in rows) for fmt in ('nchw', 'nhwc')}
            total_large = sum(r['calls'] * r['nhwc_ms'] for r in rows if r['kernel'] >= 7)
            step = self.step_ms.get(mode, {}).get(cfg.target)
            share = f'{100 * total["nhwc"] / step:.0f}% of the {step:.1f} ms step' if step else 'step not timed'
            text = (f'{cfg.target} {mode} ({"forward + backward" if mode == "train" else "forward"}, batch '
                    f'{bench.batch_size}, {bench.dtype}): all depthwise convolutions {total["nhwc"]:.1f} ms '
                    f'channels_last / {total["nchw"]:.1f} ms contiguous per step, K >= 7 {total_large:.1f} ms; '
                    f'{share}')
            table = _table([dict(conv=r['conv'], calls=r['calls'], nchw_ms=f'{r["nchw_ms"]:.3f}',
                                 nhwc_ms=f'{r["nhwc_ms"]:.3f}', gbs=f'{r["gbs"]:.0f}') for r in rows],
                           ['conv', 'calls', 'nchw_ms', 'nhwc_ms', 'gbs'])
            self.add(f'Depthwise convolutions, {mode}', f'{text}\n\n{table}')
            if step:
                self.summarise(f'{cfg.target} {mode}: depthwise convs (channels_last) share of step',
                               f'{100 * total["nhwc"] / step:.0f}% (K >= 7: {100 * total_large / step:.0f}%)',
                               'report', '-')

    def profile(self) -> None:
        bench = self.cfg.bench('train')
        bench.batch_size = min(bench.batch_size, 64)  # the trace, not the throughput, is wanted here
        step = make_step(create(self.cfg.target, bench), bench, self.device)
        table = profile_table(step, self.device, steps=2, row_limit=25)
        self.add(f'Profiler: {self.cfg.target} training step (batch {bench.batch_size}, {bench.dtype})',
                 f'```\n{table}\n```')

    def static(self) -> None:
        if self.cfg.smoke:
            return  # it models the full-size variants only
        cfg = self.cfg
        for mode, batch in (('train', cfg.train_batch), ('infer', cfg.infer_batch)):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # it prints what it returns
                    text = static_gpu.main(['--model', cfg.target, '--batch', str(batch), '--mode', mode]
                                           + (['--measure'] if self.device.type == 'cuda' else []))
            except Exception as e:  # an estimate must not sink the measurements around it
                text = f'not available: {type(e).__name__}: {e}'
            self.add(f'Static cost model of the Triton kernels, {mode} (estimates; measured beside them on CUDA)', text)


def _junit_rows(path: Path) -> List[Dict[str, object]]:
    rows = []
    for case in ET.parse(path).getroot().iter('testcase'):
        props = {p.get('name'): p.get('value') for p in case.iter('property')}
        if case.find('skipped') is not None:
            result = 'skipped'
        elif case.find('failure') is not None or case.find('error') is not None:
            result = 'FAIL'
        else:
            result = 'PASS'
        err = props.get('worst_rel_err')
        rows.append(dict(test=case.get('name'), shape=props.get('shape', ''),
                         worst_rel_err=f'{float(err):.2e}' if err else '', bound=props.get('bound', ''),
                         result=result))
    return rows


def run_report(cfg: ReportConfig, device: torch.device, out: Optional[Path] = None) -> Tuple[str, int]:
    """Run the parts not in ``cfg.skip``, print every table, write them with the summary to ``out``
    (atomically) if given. Returns the markdown text and the number of missed targets."""
    for part in cfg.skip:
        if part not in PARTS:
            raise ValueError(f'unknown part {part!r}; parts: {", ".join(PARTS)}')
    cfg.dtype = dtype_name(cfg.dtype)
    env = environment(device)
    print(env, flush=True)
    report = _Report(cfg, device)
    step_order = ('tests', 'op', 'model', 'dwconv', 'profile', 'static')
    for part in step_order:
        if part not in cfg.skip:
            getattr(report, part)()
    summary = _table(report.summary, ['what', 'measured', 'target', 'result'])
    print(f'\nSummary\n{summary}')
    text = f'# GPU report\n\n_{env}_\n\n## Summary\n\n{summary}\n\n' + '\n\n'.join(report.sections) + '\n'
    if out is not None:
        tmp = out.with_name(out.name + '.tmp')
        tmp.write_text(text)
        os.replace(tmp, out)
        print(f'wrote {out}')
    return text, sum(r['result'] in ('MISS', 'FAIL') for r in report.summary)
