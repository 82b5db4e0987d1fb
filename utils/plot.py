"""``curves.png``: loss, accuracy and learning rate per epoch from the rows of ``summary.csv``."""
import logging
import math
import os
from typing import Dict, List, Optional

__all__ = ['plot_curves']

_logger = logging.getLogger(__name__)


def _series(rows: List[Dict[str, Optional[float]]], key: str):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r['epoch'])
            ys.append(v)
    return xs, ys


def plot_curves(rows: List[Dict[str, Optional[float]]], path: str) -> None:
    """Draw the training curves of ``rows`` (one dict per epoch) to ``path`` (written atomically).

    Args:
        rows: dicts with 'epoch' and any of train_loss, train_loss_aux, eval_loss, eval_top1, eval_top5,
            eval_ema_top1, lr.
        path: PNG file.
    """
    import matplotlib
    matplotlib.use('Agg')  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        ('loss', ('train_loss', 'train_loss_aux', 'eval_loss'), False),
        ('accuracy (%)', ('eval_top1', 'eval_top5', 'eval_ema_top1'), False),
        ('learning rate', ('lr',), True),
    )
    for ax, (title, keys, log_y) in zip(axes, panels):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker='o' if len(xs) < 20 else None, markersize=3, label=key)
        if log_y and any(_series(rows, k)[1] for k in keys) and all(v > 0 for k in keys for v in _series(rows, k)[1]):
            ax.set_yscale('log')
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp.png')
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
