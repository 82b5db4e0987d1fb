"""Static GPU model of the ContMix Triton kernels: what their launches in one OverLoCK training step (or one
inference batch) should cost on an H100, estimated on the CPU from the code Triton compiles. No GPU needed.

For every kernel launch the model takes the plan the op itself would launch (``triton_plans.plan_*``: grid,
arguments, tile constants), compiles the kernel ahead of time for sm_90 with the specialisation a real launch
gets and reads the SASS (``utils/measure/sass.py``), and counts:

- warp-instructions: SASS instructions outside loops once per program, each loop body once per iteration
  (trip counts from the plan, summed over programs), times the warps of a program;
- registers per thread and spilled bytes (local memory), and the occupancy those registers allow;
- the minimum bytes the launch must move (each input read once, each output written once) and its FLOPs.

Estimated time = max(issue-bound, memory-bound); "share of roofline" = memory-bound / estimate. Both bounds are
optimistic (full issue rate, no latency stalls, no L2 effects), so the estimate is a floor and the share a
ceiling. Every device number is in :data:`H100_SXM`; they are estimates, not measurements.

    python -m utils.measure.static_gpu --model overlock_t --batch 128            # training step (AMP dtypes)
    python -m utils.measure.static_gpu --model overlock_t --batch 256 --mode infer
    python -m utils.measure.static_gpu --model overlock_t --batch 128 --measure  # CUDA: each launch timed too
"""
import argparse
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .dtypes import parse_dtype, short_name
from .sass import KernelCode, kernel_code
from .shapes import contmix_block_calls

__all__ = ['Device', 'H100_SXM', 'KernelCode', 'Row', 'analyse_launch', 'LaunchInputs', 'launch_inputs',
           'measure_call', 'step_rows', 'format_table', 'main']


@dataclass(frozen=True)
class Device:
    """The device numbers the model uses; all are estimates (data-sheet peaks, not measurements)."""
    name: str
    arch: int  # compute capability as an int (sm_90 -> 90)
    sms: int
    warp_instructions_per_clock: int  # per SM: 4 schedulers, one warp-instruction each per clock
    clock_hz: float  # sustained boost clock under load
    dram_bytes_per_s: float  # peak HBM bandwidth
    registers_per_sm: int
    max_warps_per_sm: int
    max_ctas_per_sm: int
    shared_bytes_per_sm: int

    @property
    def issue_rate(self) -> float:
        """Warp-instructions per second, whole device."""
        return self.sms * self.warp_instructions_per_clock * self.clock_hz


H100_SXM = Device(name='H100 SXM (estimates)', arch=90, sms=132, warp_instructions_per_clock=4, clock_hz=1.75e9,
                  dram_bytes_per_s=3.35e12, registers_per_sm=65536, max_warps_per_sm=64, max_ctas_per_sm=32,
                  shared_bytes_per_sm=228 * 1024)

# ---------------------------------------------------------------------------------------------------------
# One row per launch.


@dataclass
class Row:
    label: str
    kernel: str
    config: str
    programs: int
    registers: Optional[int]
    spill_bytes: Optional[int]
    occupancy: Optional[float]
    min_bytes: int
    flops: int
    warp_instructions: Optional[float]
    issue_s: Optional[float]
    memory_s: float
    note: str = ''
    measured_s: Optional[float] = None  # the launch timed on a GPU (``--measure``), median

    @property
    def measured_share(self) -> Optional[float]:
        """memory-bound time / measured time: the share of the DRAM roofline the launch achieved."""
        return None if not self.measured_s else self.memory_s / self.measured_s

    @property
    def estimate_s(self) -> float:
        return max(self.issue_s or 0., self.memory_s)

    @property
    def roofline_share(self) -> float:
        return self.memory_s / self.estimate_s if self.estimate_s else 1.


def occupancy(code: KernelCode, device: Device = H100_SXM) -> float:
    """Resident warps / maximum, limited by registers (allocated per warp in units of 256), warps, CTAs and
    shared memory."""
    regs_per_warp = math.ceil(code.registers * 32 / 256) * 256
    ctas = min(device.max_ctas_per_sm, device.max_warps_per_sm // code.num_warps,
               device.registers_per_sm // (regs_per_warp * code.num_warps))
    if code.shared_bytes:
        ctas = min(ctas, device.shared_bytes_per_sm // code.shared_bytes)
    return ctas * code.num_warps / device.max_warps_per_sm


def analyse_launch(label: str, launch, device: Device = H100_SXM) -> Row:
    code = kernel_code(launch, device.arch)
    # Loops with a constant trip count carry it in their exit test; the others take the plan's trip counts
    # (summed over programs), in order, divided by ptxas' unroll factor.
    runtime = list(launch.loop_trips())
    per_warp = launch.programs * code.outside_loops
    note = ''
    for loop in code.loops:
        if loop.passes is not None:
            per_warp += loop.body * loop.passes * launch.programs
        elif runtime:
            per_warp += loop.body * runtime.pop(0) / loop.unroll
        else:
            note = 'a SASS loop without a known trip count (counted once)'
            per_warp += loop.body * launch.programs
    if runtime:
        note = f'{len(runtime)} runtime loop(s) of the plan not found in the SASS'
    instructions = per_warp * code.num_warps
    config = ' '.join(f'{k}={v}' for k, v in launch.constexprs.items() if k.startswith(('BLOCK', 'C_PAD', 'VEC', 'NCH')))
    if launch.constexprs.get('BY_PIXEL'):
        config += ' by pixel'
    if launch.constexprs.get('SPLIT'):
        config += ' split'
    return Row(label, launch.kernel, f'{config} w={code.num_warps}', launch.programs, code.registers,
               code.spill_bytes, occupancy(code, device), launch.min_bytes(), launch.flops, instructions,
               instructions / device.issue_rate, launch.min_bytes() / device.dram_bytes_per_s, note)


# ---------------------------------------------------------------------------------------------------------
# The launches of a model: the ContMix calls read off a forward pass on the meta device (utils.measure.shapes).


@dataclass
class LaunchInputs:
    """The (meta) tensors one ContMix block passes to ``contmix_softmax_av``, laid out as on the GPU: what the
    launch plans read."""
    name: str
    x: torch.Tensor  # [B, C, H, W]: value, both halves
    logits: torch.Tensor  # [B, G, H, W, s^2 + K^2]
    rpb_small: torch.Tensor
    rpb_large: torch.Tensor
    small: int
    large: int


def launch_inputs(model_name: str, batch: int, img_size: int = 224, dtype: torch.dtype = torch.float32,
                  value_dtype: Optional[torch.dtype] = None, channels_last: bool = True,
                  **model_kwargs) -> List[LaunchInputs]:
    """The inputs of every ContMix aggregation of one forward of ``model_name`` (timm name), one entry per
    block (:func:`utils.measure.shapes.contmix_block_calls`, expanded by its call counts), as meta tensors:
    the logits the ``[B, G, H, W, s^2 + K^2]`` projection, value the ``[B, C, H, W]`` map (channels_last:
    channels innermost).

    Args:
        dtype: dtype of the logits (bf16 under bf16 autocast: ContMix adds the bias in the product's dtype).
        value_dtype: dtype of value and rpb (default ``dtype``; value is float32 under AMP after GRN's
            float32 gamma, rpb a float32 parameter).
    """
    try:
        blocks = contmix_block_calls([model_name], img_size, **model_kwargs)
    except RuntimeError as e:
        raise ValueError(f'static_gpu: cannot build model {model_name!r}: {e}') from None
    value_dtype = value_dtype or dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = []
    for call in blocks:
        b, c, g, h, w, s, k = batch, call.channels, call.groups, call.height, call.width, call.small, call.large
        entry = LaunchInputs(
            f'{h}x{w} G{g} c{c // (2 * g)}',
            torch.empty(b, c, h, w, dtype=value_dtype, device='meta').to(memory_format=fmt),
            torch.empty(b, g, h, w, s * s + k * k, dtype=dtype, device='meta'),
            torch.empty(g, 2 * s - 1, 2 * s - 1, dtype=value_dtype, device='meta'),
            torch.empty(g, 2 * k - 1, 2 * k - 1, dtype=value_dtype, device='meta'), s, k)
        inputs.extend([entry] * call.calls)
    return inputs


def _around_rows(call: LaunchInputs, backward: bool, device: Device) -> List[Row]:
    """Tensor traffic of the torch code around the op (memory-bound): the rpb gradients' ``index_add``
    reads the logits gradient once more."""
    if not backward:
        return []
    nbytes = call.logits.numel() * call.logits.element_size()
    return [Row(call.name, 'torch: rpb grad index_add', '', 0, None, None, None, nbytes, 0, None, None,
                nbytes / device.dram_bytes_per_s)]


def _materialise(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A random tensor on ``device`` with the shape, dtype and memory layout of the (dense) meta tensor ``t``."""
    return torch.empty_like(t, device=device).normal_()


def measure_call(call: LaunchInputs, backward: bool, device: torch.device, warmup: int = 2,
                 repeat: int = 10) -> List[float]:
    """Seconds per launch (median, L2 flushed before each sample) of the call's launches on ``device``, in
    the order of ``plan_contmix``: the launches the static rows describe, run on random data laid out as
    the model lays it out (on a CPU only under Triton's interpreter: a check of this code, not a timing)."""
    from models.ops import triton_plans

    from .timing import time_ms
    x, logits = _materialise(call.x, device), _materialise(call.logits, device)
    rpb_small, rpb_large = _materialise(call.rpb_small, device), _materialise(call.rpb_large, device)
    # the output's gradient has the output's dtype (promoted over logits, rpb and x), laid out like x
    dtype = torch.promote_types(torch.promote_types(logits.dtype, rpb_small.dtype), x.dtype)
    grad = torch.randn_like(x, dtype=dtype)
    launches = triton_plans.plan_contmix(x, logits, rpb_small, rpb_large, call.small, call.large,
                                           backward=backward, gpu=True, grad=grad)
    for label, launch in launches:
        if label.startswith('fwd'):
            launch.run()  # the backward launches read the forward's output and log-sum-exp
    return [time_ms(launch.run, device, warmup=warmup, repeat=repeat, flush_l2=True).median / 1e3
            for _, launch in launches]


def step_rows(inputs: Sequence[LaunchInputs], backward: bool, device: Device = H100_SXM,
              around: bool = True, measure_on: Optional[torch.device] = None, repeat: int = 10) -> List[Row]:
    """One row per kernel launch of each block's inputs (forward, and backward when ``backward``), plus the torch
    code around the op. ``measure_on``: also time every launch there, ``repeat`` samples after as many warm-up
    calls, at most 2 (calls of the same shapes are timed once)."""
    from models.ops import triton_plans
    rows = []
    timed: Dict[tuple, List[float]] = {}
    for call in inputs:
        launches = triton_plans.plan_contmix(call.x, call.logits, call.rpb_small, call.rpb_large,
                                               call.small, call.large, backward=backward, gpu=True)
        measured: List[Optional[float]] = [None] * len(launches)
        if measure_on is not None:
            key = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (call.x, call.logits, call.rpb_small,
                                                                                call.rpb_large))
            if key not in timed:
                timed[key] = measure_call(call, backward, measure_on, warmup=min(2, repeat - 1), repeat=repeat)
            measured = timed[key]
        for (label, launch), seconds in zip(launches, measured):
            row = analyse_launch(f'{call.name} {label}', launch, device)
            row.measured_s = seconds
            rows.append(row)
        if around:
            rows.extend(_around_rows(call, backward, device))
    return rows


def _merge(rows: Sequence[Row]) -> List[Tuple[int, Row]]:
    """Identical launches counted once with their multiplicity, in order of first appearance."""
    merged: Dict[tuple, List] = {}
    for row in rows:
        key = (row.label, row.kernel, row.config, row.programs, row.min_bytes)
        if key in merged:
            merged[key][0] += 1
        else:
            merged[key] = [1, row]
    return [(n, row) for n, row in merged.values()]


def _us(seconds: Optional[float]) -> str:
    return '' if seconds is None else f'{seconds * 1e6:.1f}'


def format_table(rows: Sequence[Row], device: Device = H100_SXM) -> str:
    """Markdown: one line per distinct launch (× how many per step), then the per-step totals."""
    measured = any(r.measured_s for r in rows)
    extra = ' measured µs | measured % roofline |' if measured else ''
    lines = ['| launch | × | kernel | tile / warps | programs | regs | spill B | occ. | min MB | GFLOP '
             '| warp-instr (M) | issue µs | memory µs | estimate µs | % roofline |' + extra,
             '|' + '---|' * (17 if measured else 15)]
    for n, r in _merge(rows):
        share = r.measured_share
        lines.append(
            f'| {r.label} | {n} | {r.kernel} | {r.config} | {r.programs or ""} | {r.registers or ""} | '
            f'{"" if r.spill_bytes is None else r.spill_bytes} | '
            f'{"" if r.occupancy is None else f"{r.occupancy:.0%}"} | {r.min_bytes / 1e6:.1f} | '
            f'{r.flops / 1e9:.2f} | {"" if r.warp_instructions is None else f"{r.warp_instructions / 1e6:.1f}"} | '
            f'{_us(r.issue_s)} | {_us(r.memory_s)} | {_us(r.estimate_s)} | {r.roofline_share:.0%} |'
            + (f' {_us(r.measured_s)} | {"" if share is None else f"{share:.0%}"} |' if measured else '')
            + (f' {r.note}' if r.note else ''))
    kernels = [r for r in rows if not r.kernel.startswith('torch')]
    minimum = sum(r.memory_s for r in kernels)
    total_kernels = sum(r.estimate_s for r in kernels)
    total = sum(r.estimate_s for r in rows)
    worst = min((r.roofline_share for r in kernels), default=1.)
    lines += [
        '',
        f'Per step: Triton kernels {total_kernels * 1e3:.2f} ms estimated against {minimum * 1e3:.2f} ms for their '
        f'minimum traffic ({sum(r.min_bytes for r in kernels) / 1e9:.2f} GB) = {total_kernels / minimum:.2f}×; '
        f'with the torch code around the op {total * 1e3:.2f} ms = {total / minimum:.2f}×. Lowest kernel share '
        f'of roofline {worst:.0%}; spills: {sum(bool(r.spill_bytes) for r in kernels)} launches.',
    ]
    if measured:
        timed = [r for r in kernels if r.measured_s]
        spent = sum(r.measured_s for r in timed)
        lowest = min(timed, key=lambda r: r.measured_share)
        lines += [
            f'Measured: Triton kernels {spent * 1e3:.2f} ms = {spent / sum(r.memory_s for r in timed):.2f}× their '
            f'minimum traffic at the device model\'s bandwidth ({len(timed)} launches, medians, L2 flushed before '
            f'each); lowest share of roofline {lowest.measured_share:.0%} ({lowest.label}).',
        ]
    lines += [
        f'Device model: {device.name}: {device.sms} SMs × {device.warp_instructions_per_clock} warp-instructions/'
        f'clock at {device.clock_hz / 1e9:.2f} GHz, {device.dram_bytes_per_s / 1e12:.2f} TB/s.',
    ]
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m utils.measure.static_gpu',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='overlock_t', help='timm model name (default overlock_t)')
    parser.add_argument('--batch', type=int, default=128, help='batch size (default 128)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--mode', choices=('train', 'infer'), default='train',
                        help='train: forward + backward at bf16-autocast dtypes (bf16 logits, fp32 value and rpb); '
                             'infer: forward of the deploy form in bf16')
    parser.add_argument('--dtype', type=parse_dtype, default=torch.bfloat16, help='logits dtype (default bf16)')
    parser.add_argument('--value-dtype', type=parse_dtype, default=None,
                        help='value and rpb dtype (default: fp32 for train, --dtype for infer)')
    parser.add_argument('--no-channels-last', action='store_true', help='value as a view of an NCHW map')
    parser.add_argument('--no-around', action='store_true', help='leave out the torch code around the op')
    parser.add_argument('--out', type=Path, default=None, help='also write the table to this markdown file')
    parser.add_argument('--measure', action='store_true',
                        help='also time every launch on the GPU (random data in the model\'s layout), beside '
                             'its estimate; needs CUDA')
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f'--batch must be >= 1, got {args.batch}')
    if args.measure and _measure_device() is None:
        parser.error('--measure needs a CUDA device (the kernels are timed there); leave it out for estimates only')
    return args


def _measure_device() -> Optional[torch.device]:
    """CUDA when there is one; the CPU when the Triton kernels run under the interpreter (tests)."""
    if torch.cuda.is_available():
        return torch.device('cuda')
    from models.ops import triton_plans
    return torch.device('cpu') if triton_plans.INTERPRET else None


def _short(dtype: torch.dtype) -> str:
    return short_name(str(dtype).replace('torch.', ''))


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    dtype = args.dtype
    value_dtype = args.value_dtype or (torch.float32 if args.mode == 'train' else dtype)
    name = args.model + ('_reparam' if args.mode == 'infer' and not args.model.endswith('_reparam') else '')
    inputs = launch_inputs(name, args.batch, args.img_size, dtype, value_dtype, not args.no_channels_last)
    rows = step_rows(inputs, backward=args.mode == 'train', around=not args.no_around,
                     measure_on=_measure_device() if args.measure else None)
    title = (f'{name}, batch {args.batch}, {args.img_size}², {args.mode}, logits {_short(dtype)}, '
             f'value {_short(value_dtype)}, '
             f'{"NCHW" if args.no_channels_last else "channels_last"}')
    text = f'{title}\n\n{format_table(rows)}'
    print(text)
    if args.out is not None:
        args.out.write_text(text + '\n')
    return text


if __name__ == '__main__':
    with contextlib.suppress(BrokenPipeError):
        main()
