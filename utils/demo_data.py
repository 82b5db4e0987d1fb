"""A small real-image dataset with no download: scikit-learn's 8x8 handwritten digits as an ImageFolder."""
import os
from typing import Tuple

import numpy as np


def build_digits_imagefolder(root: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                             limit: int = 0) -> Tuple[int, int]:
    """Write ``root/{train,val}/<digit>/<n>.png`` (RGB, upscaled to ``size``); returns (train, val) counts.

    The split is stratified and deterministic. ``limit`` > 0 keeps that many images per class (fast tests).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).clip(0, 255).astype(np.uint8)  # values are 0..16
    rng = np.random.default_rng(seed)
    counts = [0, 0]
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        if limit:
            idx = idx[:limit]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        for split_i, (split, part) in enumerate((('val', idx[:n_val]), ('train', idx[n_val:]))):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                img = Image.fromarray(images[i], mode='L').resize((size, size), Image.BICUBIC).convert('RGB')
                img.save(os.path.join(folder, f'{i:04d}.png'))
            counts[1 - split_i] += len(part)
    return counts[0], counts[1]
