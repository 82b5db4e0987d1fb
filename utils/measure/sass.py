"""Compile Triton launch plans ahead of time on the CPU, as a real launch would, and read what ptxas made of them.

A :class:`~models.ops.triton_plans.Launch` is specialised by Triton's own launcher code (:func:`specialise`:
integers equal to 1 become compile-time constants, integers divisible by 16 and 16-byte aligned pointers are
marked so), then either put through Triton's front end only (:func:`front_end`: the Triton IR, where code
that only the interpreter accepts fails) or compiled to a cubin for an architecture (:func:`kernel_code`),
whose resources (registers, spills, shared memory) and SASS loops are read with the ``cuobjdump`` and
``nvdisasm`` shipped with Triton. No GPU is needed.
"""
import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ['KernelCode', 'SassLoop', 'Specialisation', 'tool', 'has_toolchain', 'specialise', 'front_end',
           'kernel_code', 'sass_loops', 'SHARED_BYTES_PER_BLOCK']

# Shared memory one block may use (opt-in maximum), by compute capability: data-sheet values.
SHARED_BYTES_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                          120: 99 * 1024}


def tool(name: str) -> Path:
    """A CUDA tool shipped in the triton wheel (ptxas, cuobjdump, nvdisasm)."""
    import triton
    path = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / name
    if not path.exists():
        raise RuntimeError(f'{path} is missing; this triton wheel does not ship the CUDA tools')
    return path


def has_toolchain() -> bool:
    """Whether launches can be compiled to cubins and read here (triton with its CUDA tools)."""
    try:
        for name in ('ptxas', 'cuobjdump', 'nvdisasm'):
            tool(name)
        from triton.backends.compiler import GPUTarget  # noqa: F401  (the ahead-of-time API used here)
        from triton.compiler import ASTSource  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Specialisation: what Triton's launcher makes of a launch's arguments.


class _Pointer:
    """What the launcher reads off a tensor argument: its dtype and address. Allocations are aligned, so a
    view's address is aligned as far as its storage offset in bytes is (meta tensors work)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass(frozen=True)
class Specialisation:
    """One compiled kernel: the kernel, its signature, constants and attributes as the launcher specialises
    them, and the compile options that matter here. Launches with equal ones run the same code."""
    kernel: str
    signature: Tuple[Tuple[str, str], ...]
    constants: Tuple[Tuple[tuple, Any], ...]
    attrs: Tuple[Tuple[tuple, tuple], ...]
    num_warps: int
    max_registers: Optional[int]
    arch: int
    constant_args: Tuple[str, ...] = ()  # runtime arguments the launcher made constants (those equal to 1)


@functools.lru_cache(maxsize=None)
def _launcher(kernel: str, arch: int):
    """Triton's own argument binder of ``kernel`` for a CUDA target of ``arch`` (what a launch calls)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from models.ops import triton_plans
    fn = triton_plans.compiled_kernels()[kernel]
    backend = make_backend(GPUTarget('cuda', arch, 32))
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def _freeze(d: Dict) -> tuple:
    return tuple(sorted(((k, tuple(map(tuple, v)) if isinstance(v, list) else v) for k, v in d.items()),
                        key=lambda kv: str(kv[0])))


def specialise(launch, arch: int = 90) -> Specialisation:
    """The specialisation a real launch of ``launch`` gets, computed by Triton's launcher code itself."""
    fn, backend, binder = _launcher(launch.kernel, arch)
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps)
    if launch.max_registers is not None:
        kwargs['maxnreg'] = launch.max_registers
    bound, specialisation, options = binder(*args, **kwargs)
    _, signature, constants, attrs = fn._pack_args(backend, kwargs, bound, specialisation, options)
    made_constant = tuple(p.name for p in fn.params if not p.is_constexpr and signature[p.name] == 'constexpr')
    return Specialisation(launch.kernel, tuple(signature.items()), _freeze(constants), _freeze(attrs),
                          launch.num_warps, launch.max_registers, arch, made_constant)


def _source(spec: Specialisation):
    from triton.compiler import ASTSource

    from models.ops import triton_plans
    fn = triton_plans.compiled_kernels()[spec.kernel]
    attrs = {k: [list(a) for a in v] for k, v in spec.attrs}
    return ASTSource(fn, dict(spec.signature), constexprs=dict(spec.constants), attrs=attrs)


def _options(spec: Specialisation) -> Dict[str, Any]:
    return {'num_warps': spec.num_warps, 'maxnreg': spec.max_registers}


@functools.lru_cache(maxsize=None)
def _front_end(spec: Specialisation) -> str:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget('cuda', spec.arch, 32)
    backend = make_backend(target)
    options = backend.parse_options(_options(spec))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = _source(spec).make_ir(target, options, backend.get_codegen_implementation(options),
                                   backend.get_module_map(), context)
    return str(module)


def front_end(launch, arch: int = 90) -> str:
    """The launch's kernel through Triton's front end (Python AST to Triton IR) with a real launch's
    specialisation; raises what the front end raises (e.g. a method called on what became a constant)."""
    return _front_end(specialise(launch, arch))


# ---------------------------------------------------------------------------------------------------------
# Compile to a cubin and read the SASS.


@dataclass(frozen=True)
class SassLoop:
    """One SASS loop: its own instructions (inner loops excluded) and, when the exit test compares the counter
    with a constant, the passes per program (the source trip count over ptxas' unroll factor)."""
    body: int
    passes: Optional[float]
    unroll: int


@dataclass(frozen=True)
class KernelCode:
    """What the compiled kernel says: registers, spills, shared memory and its SASS loop structure."""
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    outside_loops: int  # SASS instructions executed once per program (NOPs and the trap loop not counted)
    loops: Tuple[SassLoop, ...]  # outermost first


_BRANCH = re.compile(r'^(@!?P\d)?\s*BRA\s+`?\(?(\.L_x_\d+)\)?')


def _loop_bound(body: Sequence[str]) -> Tuple[Optional[float], int]:
    """(passes, unroll) of a loop from its exit test ``ISETP .. P, PT, Rc, imm`` and counter step ``Rc += u``."""
    branch = _BRANCH.match(body[-1])
    if not branch or not branch.group(1):
        return None, 1
    pred = branch.group(1).lstrip('@!')
    for text in body:  # a test on uniform registers, moved into the branch's predicate
        moved = re.match(rf'^PLOP3\.LUT\s+{pred},\s*PT,\s*PT,\s*PT,\s*(UP\d+),\s*0x80,', text)
        if moved:
            pred = moved.group(1)
    counter = bound = None
    for text in body:
        test = re.match(rf'^U?ISETP\.\S+\s+{pred},\s*U?PT,\s*(U?R\d+),\s*(0x[0-9a-f]+|R\d+|c\[.*?\]|UR\d+)',
                        text)
        if test and not text.split()[0].endswith('.EX'):
            counter, bound = test.group(1), test.group(2)
    if counter is None:
        return None, 1
    unroll = 1
    for text in body:
        step = re.match(rf'^(?:U?IADD3|VIADD|IADD|IMAD\.IADD)\S*\s+{counter},\s*(?:!?U?P\d+,\s*)*{counter},\s*'
                        rf'(0x[0-9a-f]+)', text)
        if step:
            unroll = int(step.group(1), 16)
    passes = int(bound, 16) / unroll if bound.startswith('0x') else None
    return passes, max(unroll, 1)


def sass_loops(sass: str) -> Tuple[int, Tuple[SassLoop, ...]]:
    """Instructions outside loops and the loops, outermost first, from nvdisasm output (loop = backward branch).
    NOPs and the trap loop after EXIT are not counted."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r'^\s*(\.L_x_\d+):', line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        op = re.match(r'^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;', line)
        if op:
            instructions.append(op.group(1))
    spans, trap = [], 0
    for pos, text in enumerate(instructions):
        branch = _BRANCH.match(text)
        if branch and labels.get(branch.group(2), pos + 1) <= pos:
            if labels[branch.group(2)] == pos:
                trap += 1  # a branch to itself is the trap after EXIT
            else:
                spans.append((labels[branch.group(2)], pos))
    spans.sort(key=lambda s: (s[0], -s[1]))

    def count(lo, hi):
        return sum(1 for t in instructions[lo:hi + 1] if not t.startswith('NOP'))

    def inside(inner, outer):
        return outer[0] <= inner[0] and inner[1] <= outer[1] and inner != outer

    loops = []
    for span in spans:
        inner = [s for s in spans if inside(s, span)]
        direct = [s for s in inner if not any(inside(s, o) for o in inner)]
        passes, unroll = _loop_bound(instructions[span[0]:span[1] + 1])
        loops.append(SassLoop(count(*span) - sum(count(*s) for s in direct), passes, unroll))
    total = sum(1 for t in instructions if not t.startswith('NOP')) - trap
    in_loops = sum(count(*s) for s in spans if not any(inside(s, o) for o in spans))
    return total - in_loops, tuple(loops)


@functools.lru_cache(maxsize=None)
def _compile(spec: Specialisation) -> KernelCode:
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(_source(spec), target=GPUTarget('cuda', spec.arch, 32), options=_options(spec))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / 'kernel.cubin'
        cubin.write_bytes(compiled.asm['cubin'])
        usage = subprocess.run([str(tool('cuobjdump')), '--dump-resource-usage', str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool('nvdisasm')), '-c', str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r'REG:(\d+)', usage).group(1))
    # ptxas puts spilled registers in the thread's stack frame (STACK); LOCAL stays 0 for them. These kernels
    # call no functions and keep no local arrays, so the frame is all spills ("N bytes spill stores" of -v).
    spills = int(re.search(r'STACK:(\d+)', usage).group(1))
    outside, loops = sass_loops(sass)
    return KernelCode(registers, spills, compiled.metadata.shared, spec.num_warps, outside, loops)


def kernel_code(launch, arch: int = 90) -> KernelCode:
    """The launch compiled to a cubin for ``arch`` (e.g. 90 for sm_90) as a real launch compiles it."""
    return _compile(specialise(launch, arch))
