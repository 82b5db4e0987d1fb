"""PLACEHOLDER (to be replaced by the ops helper): naive na2d_av, natten<=0.17 semantics."""
import torch


def _starts(n, k, device):
    i = torch.arange(n, device=device)
    return (i - k // 2).clamp(0, n - k)


def na2d_av(attn, value, kernel_size, backend=None):
    B, G, H, W, C = value.shape
    k = kernel_size
    sh = _starts(H, k, value.device)
    sw = _starts(W, k, value.device)
    out = torch.zeros_like(value)
    for ki in range(k):
        rows = value.index_select(2, sh + ki)
        for kj in range(k):
            nb = rows.index_select(3, sw + kj)
            out = out + attn[..., ki * k + kj].unsqueeze(-1) * nb
    return out
