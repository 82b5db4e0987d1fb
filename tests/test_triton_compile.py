"""The Triton kernels compiled as a GPU compiles them, on the CPU (no device needed).

Under ``TRITON_INTERPRET=1`` integer arguments arrive as tensors; a real launch specialises them (an integer
equal to 1 becomes a compile-time constant, 16-divisible integers and 16-byte aligned pointers are marked), so
code that the interpreter runs can fail to compile for a GPU. Here every launch plan goes through Triton's own
launcher specialisation (``utils.measure.sass.specialise``) and its real front end, over value layouts
(channels-last and channel-first views of a [B, C, H, W] map, contiguous), C = 1 and wide C, float32 /
float16 / bfloat16 and AMP's mixes (half logits with float32 value and bias), the group shapes of every
registered variant (read off the models), fused and plain, both grad-value key orders, SPLIT on and off,
forward and backward. Launches with the same specialisation are one kernel, compiled once.

The launches the models run (channels-last; training at float32 / bfloat16 / float16 logits, inference) are
also compiled to cubins for sm_80 and sm_90: no spills, shared memory within each architecture's limit.

The exhaustive sweeps take tens of minutes on 2 cores and are marked ``sweep`` (``python -m pytest tests -m
sweep``; run them after changing a kernel or its launch plans); the fast tier puts a representative subset
through the front end and the slow tier compiles a sample of the model's launches to cubins.
"""
import dataclasses
import functools
import itertools
from typing import Dict, Iterator, List, Sequence, Tuple

import pytest
import torch

pytest.importorskip('triton')

from models.ops import triton_plans as plans  # noqa: E402
from utils.measure import sass  # noqa: E402

pytestmark = pytest.mark.skipif(not sass.has_toolchain(), reason='no CUDA toolchain (ptxas/nvdisasm) in triton')

# (logits or attn dtype, value and rpb dtype): uniform precisions and AMP's mixes
DTYPES = {
    'fp32': (torch.float32, torch.float32), 'fp16': (torch.float16, torch.float16),
    'bf16': (torch.bfloat16, torch.bfloat16), 'fp16 logits': (torch.float16, torch.float32),
    'bf16 logits': (torch.bfloat16, torch.float32),
}
LAYOUTS = ('channels_last', 'channel_first', 'contiguous')


@functools.lru_cache(maxsize=None)
def variant_calls(names: Tuple[str, ...] = (), img_size: int = 224
                  ) -> Dict[str, Tuple[Tuple[int, int, int, int, int, int], ...]]:
    """Per OverLoCK variant (default: every registered one), (G, H, W, c, s, K) of its ContMix calls, read off
    the model."""
    import timm

    from utils.measure.shapes import contmix_block_calls
    calls = {}
    for name in names or timm.list_models('overlock_*'):
        shapes = {(c.groups, c.height, c.width, c.channels // (2 * c.groups), c.small, c.large)
                  for c in contmix_block_calls([name], img_size)}
        calls[name] = tuple(sorted(shapes))
    return calls


def variant_shapes() -> Tuple[Tuple[int, int, int, int, int, int], ...]:
    """The distinct ContMix call shapes of all variants."""
    return tuple(sorted({shape for shapes in variant_calls().values() for shape in shapes}))


def _map(b: int, g: int, h: int, w: int, c: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    x = torch.empty(b, 2 * g * c, h, w, dtype=dtype, device='meta')
    return x.to(memory_format=torch.channels_last) if layout == 'channels_last' else x


def _value(x: torch.Tensor, g: int, half: int, layout: str) -> torch.Tensor:
    """Window ``half``'s value [B, G, H, W, c]: a view of the map as ContMix takes it, or contiguous."""
    b, ch, h, w = x.shape
    value = x.reshape(b, 2, g, ch // (2 * g), h, w).permute(1, 0, 2, 4, 5, 3)[half]
    return value.contiguous() if layout == 'contiguous' else value


def launches(shape: Tuple[int, int, int, int, int, int], layout: str, dtypes: str, batch: int = 2,
             ) -> Iterator[Tuple[str, plans.Launch]]:
    """Every launch of one ContMix call shape (G, H, W, c, s, K): the model's two-window op (view layouts),
    and per window the fused op and the plain one (softmax weights), forward and backward."""
    g, h, w, c, s, k = shape
    weights_dtype, value_dtype = DTYPES[dtypes]
    x = _map(batch, g, h, w, c, value_dtype, layout)
    logits = torch.empty(batch, g, h, w, s * s + k * k, dtype=weights_dtype, device='meta')
    rpbs = [torch.empty(g, 2 * n - 1, 2 * n - 1, dtype=value_dtype, device='meta') for n in (s, k)]
    if layout != 'contiguous':
        yield from plans.plan_contmix(x, logits, *rpbs, s, k, gpu=True)
    for half, (n, cols) in enumerate(((s, slice(0, s * s)), (k, slice(s * s, None)))):
        value = _value(x, g, half, layout)
        yield from plans.plan_softmax_av(logits[..., cols], rpbs[half], value, n, gpu=True)
        attn = torch.empty(batch, g, h, w, n * n, dtype=weights_dtype, device='meta')
        fwd, out, _ = plans.plan_forward(attn, None, value, n, gpu=True)
        grad = torch.empty_like(out)
        yield 'fwd plain', fwd
        yield 'grad_attn plain', plans.plan_grad_attn(grad, value, n, gpu=True)[0]
        yield 'grad_value plain', plans.plan_grad_value(grad, attn, n, value, gpu=True)[0]


def sweep(shapes: Sequence[Tuple[int, ...]], layouts: Sequence[str] = LAYOUTS, dtypes: Sequence[str] = tuple(DTYPES),
          knobs: Sequence[Tuple[bool, bool]] = tuple(itertools.product((False, True), (False, True))),
          ) -> Tuple[int, Dict[sass.Specialisation, List[str]]]:
    """Every plan over ``shapes`` x layouts x dtypes x ``knobs`` (SPLIT_ROWS, GRAD_VALUE_BY_PIXEL: by default
    SPLIT on/off x both grad-value key orders), as specialised by Triton's launcher: (number of plans, plan
    labels per distinct kernel)."""
    kernels: Dict[sass.Specialisation, List[str]] = {}
    count = 0
    with pytest.MonkeyPatch.context() as mp:
        for split, by_pixel in knobs:
            mp.setattr(plans, 'SPLIT_ROWS', split)
            mp.setattr(plans, 'GRAD_VALUE_BY_PIXEL', by_pixel)
            for shape, layout, dtype in itertools.product(shapes, layouts, dtypes):
                for label, launch in launches(shape, layout, dtype):
                    count += 1
                    kernels.setdefault(sass.specialise(launch), []).append(
                        f'{label} {shape} {layout} {dtype} split={split} by_pixel={by_pixel}')
    return count, kernels


def front_end_failures(kernels: Dict[sass.Specialisation, List[str]]) -> Tuple[int, List[str]]:
    """(kernels put through the front end, one line per plan whose kernel it rejects).

    Kernels that differ only in their divisibility attributes share one front-end run: those attributes
    annotate the arguments of the IR, the code generator does not read them (the cubin tests compile them).
    """
    runs: Dict[tuple, List[str]] = {}
    made_constant = {}
    for spec, labels in kernels.items():
        key = (spec.kernel, spec.signature, spec.constants, spec.num_warps, spec.max_registers, spec.arch)
        runs.setdefault(key, []).extend(labels)
        made_constant[key] = spec
    failed = []
    for key, labels in runs.items():
        spec = made_constant[key]
        try:
            sass._front_end(dataclasses.replace(spec, attrs=()))
        except Exception as e:  # any compile error is the finding; say which plans and what
            lines = str(e).strip().splitlines()
            message = lines[-1] if lines else type(e).__name__
            failed += [f'{label}: {message} (made constant: {", ".join(spec.constant_args)})' for label in labels]
    return len(runs), failed


def _assert_compiles(shapes: Sequence[Tuple[int, ...]], **kwargs) -> None:
    count, kernels = sweep(shapes, **kwargs)
    runs, failed = front_end_failures(kernels)
    assert not failed, (f'{len(failed)} of {count} launch plans ({len(kernels)} distinct kernels, {runs} front-end '
                        f"runs) fail in Triton's front end:\n" + '\n'.join(failed[:20]))


def test_front_end_representative():
    """Fast: C = 1 and K = 3 (so a value's W-stride is 1 in both views: what a launch makes a constant),
    channel-first and channels-last views, AMP's bfloat16 logits with float32 value, pixel key blocks; every
    plan (two-window, fused, plain; forward and backward)."""
    _assert_compiles([(2, 4, 5, 1, 3, 3)], layouts=('channel_first', 'channels_last'), dtypes=('bf16 logits',),
                     knobs=((False, True),))


@pytest.mark.slow
def test_variant_shapes_read_from_models():
    """The variants' group shapes come from the models: OverLoCK-T's stage 3 and 4 calls are among them."""
    calls = variant_calls(('overlock_t', 'overlock_t_reparam', 'overlock_xt'))
    assert (8, 14, 14, 16, 5, 13) in calls['overlock_t'] and (16, 7, 7, 16, 5, 7) in calls['overlock_t']
    assert calls['overlock_t_reparam'] == calls['overlock_t']
    assert any(c == 14 for _, _, _, c, _, _ in calls['overlock_xt'])  # XT's last stage: rows not 16-byte aligned


@pytest.mark.sweep
def test_front_end_every_plan():
    """Exhaustive: the variants' group shapes, and C = 1 and a wide C (chunks of 32 channels) at one group
    count per map and window pair; every layout and dtype mix, SPLIT on/off, both grad-value key orders, fused
    and plain."""
    shapes = set(variant_shapes())
    first_per_window = {(h, w, s, k): (g, h, w, s, k) for g, h, w, _, s, k in sorted(shapes, reverse=True)}
    extra = {(g, h, w, c, s, k) for g, h, w, s, k in first_per_window.values() for c in (1, 96)}
    _assert_compiles(sorted(shapes | extra))


# ---------------------------------------------------------------------------------------------------------
# The launches the models run, compiled to cubins.


def model_launches(arch: int, batch: int = 128, names: Tuple[str, ...] = ()) -> Dict[sass.Specialisation, str]:
    """The distinct launches of every variant's (or those of ``names``) training step (float32 value and rpb;
    float32, bfloat16 or float16 logits) and inference (deploy form, uniform float32 / bfloat16 / float16),
    channels-last."""
    found = {}
    for name, shapes in variant_calls(names).items():
        train = not name.endswith('_reparam')
        for (g, h, w, c, s, k), dtype in itertools.product(shapes, (torch.float32, torch.bfloat16, torch.float16)):
            value_dtype = torch.float32 if train else dtype
            x = _map(batch, g, h, w, c, value_dtype, 'channels_last')
            logits = torch.empty(batch, g, h, w, s * s + k * k, dtype=dtype, device='meta')
            rpbs = [torch.empty(g, 2 * n - 1, 2 * n - 1, dtype=value_dtype, device='meta') for n in (s, k)]
            for label, launch in plans.plan_contmix(x, logits, *rpbs, s, k, backward=train, gpu=True):
                found.setdefault(sass.specialise(launch, arch),
                                 f'{name} {h}x{w} G{g} c{c} {label} {str(dtype)[6:]} logits')
    return found


def _assert_fit(arch: int, launches: Dict[sass.Specialisation, str]) -> None:
    problems = []
    for spec, label in launches.items():
        code = sass._compile(spec)
        if code.spill_bytes or code.shared_bytes > sass.SHARED_BYTES_PER_BLOCK[arch]:
            problems.append(f'{label}: {code.spill_bytes} B spilled, {code.shared_bytes} B shared')
    assert not problems, f'sm_{arch}: ' + '\n'.join(problems)


@pytest.mark.sweep
@pytest.mark.parametrize('arch', [80, 90])
def test_model_launches_compile(arch):
    """Every distinct launch of the variants compiles for ``arch`` without spills, its shared memory within
    one block's limit there."""
    _assert_fit(arch, model_launches(arch))


@pytest.mark.slow
@pytest.mark.parametrize('arch', [80, 90])
def test_model_launches_compile_sample(arch):
    """The slow tier's share of the sweep above: training launches at bfloat16 logits (the recipe's AMP)
    through ptxas for ``arch``: each kernel at the largest window, and the forward at the smallest."""
    import timm
    training_forms = tuple(n for n in timm.list_models('overlock_*') if not n.endswith('_reparam'))
    sample = {spec: label for spec, label in model_launches(arch, names=training_forms).items()
              if label.endswith('bfloat16 logits')}
    windows = sorted({int(label.split(' K')[1].split()[0]) for label in sample.values()})
    wanted = {f'fwd K{windows[0]}', f'fwd K{windows[-1]}', f'grad_logits K{windows[-1]}',
              f'grad_value K{windows[-1]}'}
    picked = {}
    for spec, label in sample.items():
        kernel_window = ' '.join(label.split()[-4:-2])  # e.g. 'fwd K13'
        if kernel_window in wanted:
            picked.setdefault(kernel_window, (spec, label))
    assert set(picked) == wanted, sorted(sample.values())
    _assert_fit(arch, dict(picked.values()))
