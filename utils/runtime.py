"""Inference runtimes, chosen by one name wherever a model is run for inference (``validate.py --runtime``,
``python -m scripts.benchmark --mode deploy --runtimes``; ``python -m scripts.export_onnx --runtime`` for the two
that run a file): PyTorch eager, ``torch.compile``, ONNX Runtime and OpenVINO.

PyTorch (eager, compile) and ONNX Runtime run the model's inference form: an OverLoCK model in its fused form
(``models.fused``; the same logits as the model to float32 rounding), any other timm model as it is, in eval
mode. OpenVINO runs the ONNX export of the deploy form instead (NCHW, BatchNorms unfolded): its CPU plugin
chooses blocked layouts for NCHW convolutions and folds the per-channel layers itself, while the
transposes of the channels-last graph around every depthwise convolution become reorders there (measured:
docs/benchmarks.md). The ONNX files (``utils.export``) are written to a temporary file unless a path is given;
OpenVINO computes in float32 unless asked otherwise (its default on CPUs with bf16 units is bf16, which moves
the logits by about 1e-2). ``onnxruntime`` and ``openvino`` are imported on use.
"""
import copy
import os
import tempfile
import time
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .cli import UsageError

__all__ = ['RUNTIMES', 'inference_form', 'prepare']

RUNTIMES = ('eager', 'compile', 'onnxruntime', 'openvino')


def inference_form(model: nn.Module, runtime: str = 'eager') -> nn.Module:
    """The module ``runtime`` runs: an OverLoCK classifier fused (OpenVINO, and an OverLoCK without its head: in
    deploy form; the model itself is left unchanged), any other model as it is, in eval mode."""
    from models.fused import fusable, fuse
    from models.overlock import OverLoCK

    from .export import deploy_copy

    if not isinstance(model, OverLoCK):
        return model.eval()
    return fuse(model) if runtime != 'openvino' and fusable(model) else deploy_copy(model)


def prepare(model: nn.Module, runtime: str, input_size: Sequence[int], threads: int = 0,
            onnx_path: Optional[str] = None, precision: str = 'f32') -> Tuple[nn.Module, float]:
    """``model`` ready to run on ``runtime``; returns (a module mapping NCHW float32 images to logits, the
    seconds its preparation took: fusing, exporting, compiling the graph).

    Args:
        input_size: (C, H, W) the exported graph is fixed to (ONNX Runtime, OpenVINO).
        threads: intra-op threads of ONNX Runtime and OpenVINO (0: their default); PyTorch's are
            ``torch.set_num_threads``'.
        onnx_path: where to write the ONNX file (default: a temporary file, removed once loaded).
        precision: OpenVINO's inference precision ('f32', or 'bf16' / 'f16' where the CPU has them).
    ``torch.compile`` compiles on the first call, not here: its warm-up is that call.
    """
    if runtime not in RUNTIMES:
        raise UsageError(f'runtime {runtime!r}: choose one of {", ".join(RUNTIMES)}')
    start = time.perf_counter()
    form = inference_form(model, runtime)
    if runtime == 'eager':
        return form, time.perf_counter() - start
    if runtime == 'compile':
        return torch.compile(form), time.perf_counter() - start
    from .export import export_onnx, load_exported

    form = (copy.deepcopy(form) if form is model else form).cpu().float()  # the caller's model stays put
    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_path or os.path.join(tmp, 'model.onnx')
        export_onnx(form, path, input_size=input_size)
        module = load_exported(path, runtime, threads, precision)
    return module, time.perf_counter() - start
