"""Measurement: one timer, op shapes read off the models, one dtype parser, model / op / loader benchmarks,
the GPU report, the static GPU model and the GPU node and training checks.

Modules, one job each:
  ``timing``       the timer;
  ``dtypes``       the dtype parser of the command lines;
  ``shapes``       the ContMix and depthwise-conv calls of a variant, read off the model;
  ``macs``         the multiply-accumulate counter;
  ``ops``          op-level timing (the aggregation op, depthwise convs);
  ``model``        images/s, peak CUDA memory, the profiler's table of a whole model;
  ``loader``       input-pipeline throughput;
  ``report``       the GPU report: the CUDA tests, ``ops``, ``model`` and ``static_gpu`` in one call;
  ``sass``         ahead-of-time compilation of the Triton launch plans and what ptxas made of them;
  ``static_gpu``   the static cost model of the Triton kernels, read from their SASS;
  ``gpu_check``    the check of a new GPU node;
  ``train_check``  the GPU training check (train.py through torchrun with a shipped recipe).

Command lines: ``python -m scripts.benchmark`` (model, op, loader), ``python -m scripts.gpu_report``,
``python -m utils.measure.static_gpu``, ``python -m scripts.gpu_check``, ``python -m scripts.gpu_train_check``.
"""
from .dtypes import DTYPES, dtype_name, parse_dtype
from .shapes import DWConv, Na2dCall, depthwise_convs, na2d_calls
from .timing import Timing, synchronize, time_ms

__all__ = ['DTYPES', 'dtype_name', 'parse_dtype', 'DWConv', 'Na2dCall', 'depthwise_convs', 'na2d_calls',
           'Timing', 'synchronize', 'time_ms']
