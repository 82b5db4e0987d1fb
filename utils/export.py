"""ONNX export of an inference form, reading an exported file back on ONNX Runtime or OpenVINO, and timing it
beside PyTorch.

The graph holds standard ONNX operators only: ContMix's aggregation is written with Gather / MatMul /
Softmax while exporting (``models.ops.composite``). The batch axis is dynamic; the input resolution is fixed at
export time (the neighbour tables of the aggregation are constants of the graph). The model's preprocessing
is stored in the file's metadata so that ``validate.py --onnx`` can evaluate the file alone. Which form is
written depends on the runtime meant to run it (``utils.runtime.inference_form``): ONNX Runtime gets the fused
channels-last graph, OpenVINO the deploy form; either runs on either runtime.

``onnx`` and ``onnxruntime`` (and ``onnxscript``, which torch's exporter uses) are imported only when needed;
missing packages are a one-line :class:`~utils.cli.UsageError`.
"""
import contextlib
import copy
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cli import UsageError
from .measure.timing import time_ms

__all__ = [
    'MIN_OPSET', 'DEFAULT_OPSET', 'PARITY_TOLERANCE', 'supported_opsets', 'check_opset', 'require', 'deploy_copy',
    'onnx_metadata', 'export_onnx', 'read_metadata', 'load_session', 'OnnxRuntimeModel', 'OpenVinoModel',
    'EXPORT_RUNTIMES', 'check_export_runtime', 'load_exported', 'max_relative_error',
    'export_and_check', 'benchmark_onnx', 'input_size_arg',
]

_logger = logging.getLogger(__name__)

# torch's exporter writes opset 18 natively and converts upwards; it cannot go below 18 for these graphs
MIN_OPSET = 18
DEFAULT_OPSET = 18
METADATA_KEY = 'overlock'  # metadata_props key of the JSON preprocessing record
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'
PARITY_TOLERANCE = 1e-4  # max relative error of an exported file's logits against PyTorch's
EXPORT_RUNTIMES = ('onnxruntime', 'openvino')  # what runs an exported file
_RUNTIME_NAMES = {'onnxruntime': 'ONNX Runtime', 'openvino': 'OpenVINO'}
_INSTALL = 'pip install onnx onnxruntime onnxscript (see requirements.txt)'


def require(name: str):
    """Import an optional package (``onnx``, ``onnxruntime``, ``onnxscript``, ``onnxslim``, ``openvino``) or fail in
    one line."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        install = 'pip install openvino (optional: not in requirements.txt)' if name == 'openvino' else _INSTALL
        raise UsageError(f'{name} is needed for ONNX export / evaluation but cannot be imported ({e}); '
                         f'{install}') from None


def supported_opsets() -> range:
    return range(MIN_OPSET, require('onnx').defs.onnx_opset_version() + 1)


def check_opset(opset: int) -> None:
    """A one-line error for an opset the exporter cannot write."""
    opsets = supported_opsets()
    if opset not in opsets:
        raise UsageError(f'--opset {opset} is not supported: choose {opsets.start}..{opsets.stop - 1} '
                         f'(default {DEFAULT_OPSET})')


def deploy_copy(model: nn.Module) -> nn.Module:
    """The model in eval mode and deploy form: a re-parameterised copy when it is in training form."""
    from .evaluate import is_deploy

    if hasattr(model, 'reparameterize') and not is_deploy(model):
        _logger.info('the model is in training form: exporting a re-parameterised copy (the model is unchanged)')
        model = copy.deepcopy(model).reparameterize()
    return model.eval()


def onnx_metadata(model: nn.Module, input_size: Sequence[int]) -> Dict[str, Any]:
    """What an evaluator needs besides the graph: the model's name and preprocessing at ``input_size``."""
    import timm.data

    cfg = timm.data.resolve_data_config({'input_size': tuple(input_size)}, model=model)
    return {
        'architecture': model.pretrained_cfg.get('architecture', type(model).__name__),
        'input_size': list(cfg['input_size']), 'interpolation': cfg['interpolation'],
        'mean': list(cfg['mean']), 'std': list(cfg['std']), 'crop_pct': cfg['crop_pct'],
        'crop_mode': cfg.get('crop_mode', 'center'), 'num_classes': getattr(model, 'num_classes', None),
        'params': sum(p.numel() for p in model.parameters()),
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO; keep only their warnings."""
    loggers = [logging.getLogger(name) for name in ('onnx_ir', 'onnxscript', 'onnxslim', 'torch.onnx')]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
        model: nn.Module,
        path: str,
        input_size: Sequence[int] = (3, 224, 224),
        opset: int = DEFAULT_OPSET,
        metadata: Optional[Dict[str, Any]] = None,
        simplify: bool = True,
) -> Dict[str, Any]:
    """Write ``model`` (its deploy form where it has a training form) to ``path`` as ONNX (checked with
    ``onnx.checker``), atomically.

    Args:
        model: an OverLoCK model in either form (training form: a re-parameterised copy is exported) or any
            module whose forward maps [B, C, H, W] images to logits.
        path: the .onnx file to write (weights inside the file).
        input_size: (C, H, W) of the exported graph; the batch axis is dynamic.
        opset: ONNX opset, MIN_OPSET or newer.
        metadata: extra entries for the stored record (default: :func:`onnx_metadata`'s).
        simplify: fold constants and fuse with onnxslim when it is installed (skipped, with a log line, if
            it fails or is missing).
    Returns:
        The metadata record stored in the file.
    """
    from models.ops.composite import export_mode

    onnx = require('onnx')
    require('onnxscript')  # torch's ONNX exporter needs it
    check_opset(opset)
    if len(input_size) != 3 or min(input_size[1:]) < 32:
        raise UsageError(f'input size {tuple(input_size)}: give (C, H, W) with H, W >= 32')
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise UsageError(f'ONNX output {path}: folder {out_dir} does not exist')
    model = deploy_copy(model)
    record = {**onnx_metadata(model, input_size), **(metadata or {}), 'opset': opset}

    param = next(model.parameters(), None)
    x = torch.randn(2, *input_size, device=param.device if param is not None else 'cpu')
    batch = torch.export.Dim('batch', min=1, max=4096)
    # onnxslim folds and fuses the graph itself: the exporter's own optimiser pass then only adds time (about a
    # third of the export of OverLoCK-XT on a CPU, for the same ONNX Runtime speed)
    slim = simplify and importlib.util.find_spec('onnxslim') is not None
    with torch.no_grad(), export_mode(), _quiet_exporter():
        program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), external_data=False, verbose=False, optimize=not slim)
        proto = program.model_proto
        written = {op.domain: op.version for op in proto.opset_import}.get('', None)
        if written != opset:
            raise UsageError(f'--opset {opset}: the exporter could not write it (got opset {written}); '
                             f'try {DEFAULT_OPSET}')
        if simplify:
            proto = _simplify(proto)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(record)
    onnx.checker.check_model(proto, full_check=True)
    if any(op.domain not in ('', 'ai.onnx') for op in proto.opset_import):
        raise RuntimeError(f'exported graph uses non-standard operator domains: {list(proto.opset_import)}')
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix='.tmp-', suffix='.onnx')
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return record


def _simplify(proto):
    try:
        import onnxslim
    except ImportError:
        _logger.info('onnxslim is not installed: the graph is saved as exported')
        return proto
    try:
        return onnxslim.slim(proto)
    except Exception as e:  # simplification is an optimisation only: keep the exported graph
        _logger.warning('onnxslim failed (%s): the graph is saved as exported', e)
        return proto


def _read_model(path: str):
    onnx = require('onnx')
    if not os.path.isfile(path):
        raise UsageError(f'ONNX file {path} does not exist')
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common public base class
        raise UsageError(f'{path} is not a readable ONNX file ({type(e).__name__}: {e}); export one with '
                         f'python -m scripts.export_onnx') from None


def read_metadata(path: str) -> Dict[str, Any]:
    """The preprocessing record stored by :func:`export_onnx` (an error naming the file when absent)."""
    proto = _read_model(path)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                break
    raise UsageError(f'{path} has no OverLoCK preprocessing record (metadata "{METADATA_KEY}"); export it with '
                     f'python -m scripts.export_onnx or reparam.py --onnx')


def load_session(path: str, threads: int = 0):
    """An ONNX Runtime CPU session for ``path`` (``threads`` > 0 sets the intra-op thread count)."""
    ort = require('onnxruntime')
    _read_model(path)  # a readable file, or a one-line error
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime raises its own (non-exported) exception types
        raise UsageError(f'ONNX Runtime cannot load {path} ({e})') from None


class _ExportedModel(nn.Module):
    """An exported file behind the ``nn.Module`` call interface (CPU, float32), so evaluation code runs it as it
    runs a PyTorch model; subclasses run a float32 numpy batch (:meth:`_run`)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.metadata = read_metadata(path)
        self.num_classes = self.metadata.get('num_classes')

    def _run(self, x):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(x.detach().cpu().float().contiguous().numpy())).to(x.device)


class OnnxRuntimeModel(_ExportedModel):
    """An exported file in ONNX Runtime (CPU execution provider)."""

    def __init__(self, path: str, threads: int = 0):
        session = load_session(path, threads)  # a missing onnxruntime or an unreadable file: one line, first
        super().__init__(path)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def _run(self, x):
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoModel(_ExportedModel):
    """An exported file compiled by OpenVINO for the CPU. ``precision`` is OpenVINO's inference precision hint:
    'f32' (the default here; OpenVINO's own default computes in bf16 on CPUs that have it) or 'bf16' / 'f16';
    ``config``: further OpenVINO properties (e.g. ``{'PERF_COUNT': 'YES'}``)."""

    def __init__(self, path: str, threads: int = 0, precision: str = 'f32', config: Optional[Dict[str, Any]] = None):
        ov = require('openvino')
        super().__init__(path)  # a readable file with its record, or a one-line error
        config = {'INFERENCE_PRECISION_HINT': precision, **(config or {})}
        if threads > 0:
            config['INFERENCE_NUM_THREADS'] = threads
        try:
            self.compiled = ov.Core().compile_model(path, 'CPU', config)
        except Exception as e:  # OpenVINO raises its own exception types, with multi-line messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f'OpenVINO cannot compile {path} ({first})') from None

    def _run(self, x):
        return self.compiled(x)[0]


def check_export_runtime(runtime: str) -> None:
    """A one-line error for a runtime that does not run exported files, or whose package is missing."""
    if runtime not in EXPORT_RUNTIMES:
        raise UsageError(f'runtime {runtime!r}: an exported file runs on {" or ".join(EXPORT_RUNTIMES)}')
    require(runtime)


def load_exported(path: str, runtime: str = 'onnxruntime', threads: int = 0, precision: str = 'f32') -> nn.Module:
    """The exported ``path`` on ``runtime`` ('onnxruntime' or 'openvino'; ``precision``: OpenVINO's)."""
    check_export_runtime(runtime)
    if runtime == 'onnxruntime':
        return OnnxRuntimeModel(path, threads=threads)
    return OpenVinoModel(path, threads=threads, precision=precision)


def max_relative_error(model: nn.Module, path: str, batch: int = 2, seed: int = 0, threads: int = 0,
                       runtime: str = 'onnxruntime') -> float:
    """``max|file - torch| / max|torch|`` of the logits of ``model`` (deploy form, float32) and the exported
    ``path`` on ``runtime`` (float32), on a random batch at the file's input size."""
    model = deploy_copy(model)
    exported = load_exported(path, runtime, threads)
    x = torch.randn(batch, *exported.metadata['input_size'], generator=torch.Generator().manual_seed(seed))
    param = next(model.parameters(), None)
    with torch.no_grad():
        ref = model(x.to(param.device if param is not None else 'cpu')).float().cpu()
        out = exported(x)
    if out.shape != ref.shape:
        return float('inf')
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def export_and_check(model: nn.Module, path: str, input_size: Sequence[int], opset: int = DEFAULT_OPSET,
                     simplify: bool = True, metadata: Optional[Dict[str, Any]] = None,
                     runtime: str = 'onnxruntime') -> int:
    """:func:`export_onnx` of the form ``runtime`` runs best (``utils.runtime.inference_form``), then compare
    the file on ``runtime`` with the PyTorch model (deploy form) on a random batch and print both steps. The
    stored record (parameter count included) is the model's, whichever form the graph holds.

    Returns an exit code: 0, or 1 (and the file removed) when the logits differ by more than PARITY_TOLERANCE
    or the runtime cannot load the file.
    """
    from models.fused import FusedOverLoCK

    from .runtime import inference_form

    check_export_runtime(runtime)  # before the export, not after it
    model = deploy_copy(model)
    form = inference_form(model, runtime)
    metadata = {**onnx_metadata(model, input_size), **(metadata or {})}
    record = export_onnx(form, path, input_size=input_size, opset=opset, simplify=simplify, metadata=metadata)
    name = _RUNTIME_NAMES[runtime]
    try:
        err = max_relative_error(model, path, runtime=runtime)
    except UsageError as e:
        os.remove(path)
        print(f'error: {e}; {path} removed')
        return 1
    size_mb = os.path.getsize(path) / 2 ** 20
    kind = 'fused form' if isinstance(form, FusedOverLoCK) else 'deploy form' if hasattr(model, 'reparameterize') \
        else 'as built'
    print(f'wrote {path} ({size_mb:.1f} MB, opset {opset}, input [batch, {", ".join(map(str, input_size))}], '
          f'{record["architecture"]}, {kind} for {name})')
    print(f'max relative error of {name} vs PyTorch logits: {err:.3e} (limit {PARITY_TOLERANCE:g})')
    if not err <= PARITY_TOLERANCE:
        os.remove(path)
        print(f'error: {name} output differs from PyTorch (max relative error {err:.3e}); {path} removed')
        return 1
    return 0


def benchmark_onnx(
        model: nn.Module,
        path: str,
        batch_sizes: Sequence[int] = (1, 8),
        threads: int = 2,
        iters: int = 10,
        warmup: int = 2,
        seed: int = 0,
        runtime: str = 'onnxruntime',
) -> List[Dict[str, Any]]:
    """Images/s of ``model`` in PyTorch eager (its inference form: fused for OverLoCK; float32, CPU) and of the
    exported ``path`` on ``runtime``, both with ``threads`` intra-op threads, at the file's input size, in one
    process.

    Returns one row per batch size: model, batch, img_size, threads, runtime, eager and file images/s, their
    ratio and the file size in MB. Speed is the median of ``iters`` timed calls after ``warmup`` calls (the
    measurement package's timer, :func:`utils.measure.timing.time_ms`).
    """
    from .runtime import inference_form

    eager_form = inference_form(deploy_copy(model), 'eager').cpu()
    exported = load_exported(path, runtime, threads)
    meta = exported.metadata
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        gen = torch.Generator().manual_seed(seed)
        for batch in batch_sizes:
            x = torch.randn(batch, *meta['input_size'], generator=gen)
            with torch.inference_mode():
                eager = batch * 1e3 / time_ms(lambda: eager_form(x), warmup=warmup, repeat=iters).median
                on_file = batch * 1e3 / time_ms(lambda: exported(x), warmup=warmup, repeat=iters).median
            rows.append({
                'model': meta.get('architecture', ''), 'batch': batch,
                'img_size': 'x'.join(str(s) for s in meta['input_size'][1:]), 'threads': threads,
                'runtime': runtime, 'eager_img_s': round(eager, 2), 'runtime_img_s': round(on_file, 2),
                'vs_eager': round(on_file / eager, 2), 'onnx_mb': round(os.path.getsize(path) / 2 ** 20, 1),
            })
    finally:
        torch.set_num_threads(old_threads)
    return rows


def input_size_arg(img_size: Optional[Sequence[int]], model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) from ``--img-size`` (one value: square, two: H W) or the model's pretrained_cfg."""
    default = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    chans = getattr(model, 'in_chans', default[0])
    if not img_size:
        return (chans, *default[1:])
    if len(img_size) not in (1, 2) or min(img_size) < 32:
        raise UsageError(f'--img-size {" ".join(map(str, img_size))}: give one size or H W, each >= 32')
    h, w = (img_size[0], img_size[0]) if len(img_size) == 1 else img_size
    return chans, h, w
