"""Brute-force references of the neighbourhood-aggregation ops (natten <= 0.17 semantics, dilation 1).

Written from the definition only, independent of ``models.ops``; every backend is tested against these. They
are differentiable through autograd, run on any device and compute in the promoted dtype of their inputs
(pass float64 tensors for a reference).

    out[b, g, i, j] = sum_{ki, kj} attn[b, g, i, j, ki*K + kj] * value[b, g, si(i) + ki, sj(j) + kj]
    si(i) = clamp(i - K//2, 0, H - K)        (windows shift inwards at the borders)
    bias[g, i, j, ki*K + kj] = rpb[g, si(i) + ki - i + K - 1, sj(j) + kj - j + K - 1]
"""
from typing import List

import torch

__all__ = ['window_starts', 'reference_na2d_av', 'reference_rpb', 'reference_softmax_av', 'rel_err']


def window_starts(length: int, k: int) -> List[int]:
    """First row (or column) of each query's K-wide window along an axis of ``length``."""
    return [min(max(i - k // 2, 0), length - k) for i in range(length)]


def reference_na2d_av(attn: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """[B, G, H, W, K*K] weights x [B, G, H, W, C] values -> [B, G, H, W, C]: one gather per window offset."""
    h, w = value.shape[2:4]
    rows = torch.tensor(window_starts(h, k), device=value.device)
    cols = torch.tensor(window_starts(w, k), device=value.device)
    out = torch.zeros(value.shape, dtype=torch.promote_types(attn.dtype, value.dtype), device=value.device)
    for ki in range(k):
        for kj in range(k):
            neighbour = value.index_select(2, rows + ki).index_select(3, cols + kj)
            out = out + attn[..., ki * k + kj, None] * neighbour
    return out


def reference_rpb(rpb: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """[G, 2K-1, 2K-1] table -> [G, H, W, K*K] per-query bias of each neighbour."""
    si, sj = window_starts(h, k), window_starts(w, k)
    rows = torch.tensor([[si[i] + ki - i + k - 1 for ki in range(k)] for i in range(h)], device=rpb.device)
    cols = torch.tensor([[sj[j] + kj - j + k - 1 for kj in range(k)] for j in range(w)], device=rpb.device)
    bias = rpb[:, rows[:, None, :, None], cols[None, :, None, :]]  # [G, H, W, K, K]
    return bias.reshape(rpb.shape[0], h, w, k * k)


def reference_softmax_av(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """``na2d_av(softmax(logits + bias(rpb)), value)``, the fused op's definition."""
    h, w = value.shape[2:4]
    return reference_na2d_av(torch.softmax(logits + reference_rpb(rpb, h, w, k), dim=-1), value, k)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (on the CPU, gradients detached)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))
