"""Measurement: one timer, op shapes read off the models, one dtype parser, model / op / loader benchmarks
and the GPU report. The command lines over it are ``python -m scripts.benchmark`` and
``python -m scripts.gpu_report``.

Modules: ``timing`` (the timer), ``dtypes``, ``shapes`` (ContMix and depthwise-conv calls of a variant),
``ops`` (op-level timing), ``macs`` (multiply-accumulate counter), ``model`` (images/s, memory, profiler),
``loader`` (input-pipeline throughput), ``report`` (the GPU report, which includes the static cost model of
``static_gpu`` where that module exists), ``gpu_check`` (the check of a new GPU node, ``python -m scripts.gpu_check``).
"""
from .dtypes import DTYPES, dtype_name, parse_dtype
from .shapes import DWConv, Na2dCall, depthwise_convs, na2d_calls
from .timing import Timing, synchronize, time_ms

__all__ = ['DTYPES', 'dtype_name', 'parse_dtype', 'DWConv', 'Na2dCall', 'depthwise_convs', 'na2d_calls',
           'Timing', 'synchronize', 'time_ms']
