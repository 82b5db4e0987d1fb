"""The ContMix aggregation from standard tensor ops only, for export to ONNX.

PyTorch itself runs the ``torch`` / ``triton`` / ``natten`` backends (custom ops that an ONNX exporter cannot
translate). While :func:`export_mode` is entered, or while ``torch.onnx.export`` runs, ``models.ops`` routes
``na2d_av`` and ``na2d_softmax_av`` here instead: the same result written with Gather, Concat, Reshape,
MatMul, Softmax and Add, which every ONNX runtime has. The neighbour indices depend only on the map size and
the kernel size, so they become constants of the graph (the exported model has a fixed input resolution and
a dynamic batch).

Two layouts, chosen per call from the map size (measured in ONNX Runtime on the CPU):

- dense: each query's K*K weights are gathered into a zero-padded row over all H*W positions and the
  aggregation is one batched [H*W, H*W] x [H*W, C] MatMul. Cheapest when H*W is close to K*K, which is
  OverLoCK's large kernel at 224 px (14 x 14 maps with K = 13, 7 x 7 maps with K = 7).
- neighbourhood (im2col): the K*K neighbours of every query are gathered from value ([H*W, K*K, C]) and
  multiplied with the weights ([1, K*K] x [K*K, C] per query). Its cost grows with H*W*K*K instead of
  (H*W)^2, so it wins for small kernels on larger maps.
"""
import contextlib
import functools
from typing import Iterator

import numpy as np
import torch

__all__ = ['export_mode', 'is_active', 'na2d_av', 'na2d_softmax_av', 'uses_dense']

# Dense when H*W <= _DENSE_RATIO * K*K (at 14 x 14: dense for K = 13, neighbourhood for K = 5).
_DENSE_RATIO = 2.0

_depth = 0


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """Route the ContMix ops through the standard-op formulation (nests; eager results are unchanged up to
    float rounding, only slower)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def is_active() -> bool:
    """Inside :func:`export_mode` or a ``torch.onnx.export`` call."""
    return _depth > 0 or torch.onnx.is_in_onnx_export()


def uses_dense(height: int, width: int, kernel_size: int) -> bool:
    return height * width <= _DENSE_RATIO * kernel_size * kernel_size


# The index tables are built with numpy so that a tracing exporter records them as constants, not as the
# ops that computed them; hence the window starts here repeat ``torch_backend.window_starts`` in numpy (the
# exporter traces a torch tensor's ``.numpy()`` and the numpy ops after it into the graph).

@functools.lru_cache(maxsize=64)
def neighbours(height: int, width: int, kernel_size: int) -> np.ndarray:
    """[H*W, K*K] flat position of neighbour (ki, kj) of each query (windows shift inwards at the borders)."""
    k = kernel_size
    rows = np.clip(np.arange(height) - k // 2, 0, height - k)[:, None] + np.arange(k)  # [H, K]
    cols = np.clip(np.arange(width) - k // 2, 0, width - k)[:, None] + np.arange(k)  # [W, K]
    return (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height * width, k * k)


@functools.lru_cache(maxsize=64)
def _dense_index(height: int, width: int, kernel_size: int) -> np.ndarray:
    """[H*W*H*W] index into the flat weights [H*W*K*K + 1]: entry (p, q) of the dense matrix is weight
    ``p*K*K + n`` when q is neighbour n of p, else the appended zero (index H*W*K*K)."""
    hw, k2 = height * width, kernel_size * kernel_size
    index = np.full((hw, hw), hw * k2, dtype=np.int64)
    np.put_along_axis(index, neighbours(height, width, kernel_size), np.arange(hw * k2).reshape(hw, k2), axis=1)
    return index.reshape(-1)


def _constant(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``models.ops.na2d_av`` from standard ops (inputs already validated).

    Args:
        attn: [B, G, H, W, K*K] weights.
        value: [B, G, H, W, C].
        kernel_size: odd K with K <= H, W.
    Returns:
        [B, G, H, W, C].
    """
    # int(): sizes are fixed in the exported graph (a tracing exporter would otherwise see tensors)
    g, h, w, c = (int(n) for n in value.shape[1:])
    k2 = kernel_size * kernel_size
    hw = h * w
    # -1 keeps the batch dimension symbolic in the exported graph
    v = value.reshape(-1, g, hw, c)
    if uses_dense(h, w, kernel_size):
        a = attn.reshape(-1, g, hw * k2)
        a = torch.cat([a, torch.zeros_like(a[..., :1])], dim=-1)
        index = _constant(_dense_index(h, w, kernel_size), attn.device)
        dense = a.index_select(2, index).reshape(-1, g, hw, hw)
        out = torch.matmul(dense, v)  # [B, G, HW, C]
    else:
        index = _constant(neighbours(h, w, kernel_size).reshape(-1), value.device)
        nbrs = v.index_select(2, index).reshape(-1, g, hw, k2, c)
        out = torch.matmul(attn.reshape(-1, g, hw, 1, k2), nbrs)  # [B, G, HW, 1, C]
    return out.reshape(-1, g, h, w, c)


def relative_position_bias(rpb: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """``models.ops.relative_position_bias`` with a constant index: [G, 2K-1, 2K-1] -> [G, H, W, K*K]."""
    k = kernel_size
    index = _constant(_rpb_index(height, width, k), rpb.device)
    return rpb.flatten(1).index_select(1, index).reshape(rpb.shape[0], height, width, k * k)


@functools.lru_cache(maxsize=64)
def _rpb_index(height: int, width: int, kernel_size: int) -> np.ndarray:
    k = kernel_size

    def rel(length: int) -> np.ndarray:  # [length, K] in [0, 2K-2]: neighbour - query + K - 1
        pos = np.arange(length)
        return np.clip(pos - k // 2, 0, length - k)[:, None] + np.arange(k) - pos[:, None] + (k - 1)

    return (rel(height)[:, None, :, None] * (2 * k - 1) + rel(width)[None, :, None, :]).reshape(-1)


def na2d_softmax_av(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``na2d_av(softmax(logits + relative_position_bias(rpb), -1), value)`` (inputs already validated).

    Args:
        logits: [B, G, H, W, K*K].
        rpb: [G, 2K-1, 2K-1] relative position bias table.
        value: [B, G, H, W, C].
        kernel_size: odd K with K <= H, W.
    """
    h, w = int(value.shape[2]), int(value.shape[3])
    bias = relative_position_bias(rpb, h, w, kernel_size)
    return na2d_av(torch.softmax(logits + bias, dim=-1), value, kernel_size)
