"""The one test-helper module: the tiny model configuration (defined here only), paths, BatchNorm
randomisation, a synthetic image folder, the in-process command-line runner and ways to run train.py."""
import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the overlock models with timm)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'

# Small enough for fast CPU tests, large enough to exercise every code path: one block per stage, and at 32-64 px
# inputs the Focus-Net maps are smaller than its kernels (ContMix's resize path).
TINY_KWARGS: Dict[str, object] = dict(
    depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 24, 32, 48], sub_num_heads=[2, 2], projection=64,
)


def tiny_cli_kwargs() -> List[str]:
    """TINY_KWARGS as ``--model-kwargs`` values of the command-line tools (``depth=[1,1,1,1]`` ...)."""
    return [f'{k}={v}'.replace(' ', '') for k, v in TINY_KWARGS.items()]


def tiny_model(name: str = 'overlock_xt', **kwargs) -> nn.Module:
    """A tiny OverLoCK of the variant ``name`` (its form: training or ``_reparam``), 7 classes, plain convs."""
    return timm.create_model(name, **{**TINY_KWARGS, 'num_classes': 7, 'use_gemm': False, **kwargs})


def na2d_golden() -> List[Dict[str, object]]:
    """natten 0.17's float64 na2d_av outputs and gradients (tests/data/golden_na2d_av.pt): a list of cases with
    'attn', 'value', 'kernel_size', 'grad_out', 'out', 'grad_attn', 'grad_value'."""
    return torch.load(DATA / 'golden_na2d_av.pt', weights_only=True)


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine params, so that fusing BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_((torch.rand(n, generator=gen) - 0.5) * 0.4)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            m.bias.copy_(0.1 * torch.randn(n, generator=gen))


# --- data and command lines --------------------------------------------------------------------------------
# The tests' tiny OverLoCK (TINY_KWARGS) on train.py's command line, 32 px inputs.
TINY = ['--model', 'overlock_xt', '--model-kwargs', *tiny_cli_kwargs(), '--img-size', '32']
# Quick CPU runs: batch 4, no worker processes, short schedule, a log line per update, and the recipe's
# augmentation (train.py's defaults) off unless a test turns it on.
FAST = ['-b', '4', '-j', '0', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--log-interval', '1',
        '--device', 'cpu', '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0']
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def make_image_folder(root: Path, n_train: int = 8, n_val: int = 4, size: int = 32,
                      classes: Sequence[str] = ('red', 'green', 'blue'), seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: noisy solid colours, one per class
    (learnable in a few steps). The shared ``data_dir`` fixture (conftest.py) is one of these."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array(COLOURS[c % len(COLOURS)], dtype=np.int64)[None, None]
                img = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f'{i:03d}.png')
    return root


def run_main(main: Union[ModuleType, Callable[[List[str]], Optional[int]]], argv: List[str],
             threads: Optional[int] = None) -> Tuple[int, str, str]:
    """Run a command line's ``main(argv)`` (a module with ``main``, or the function) through
    ``utils.cli.run_cli`` in this process, as a shell would run it: (exit code, stdout, stderr).
    ``threads``: torch threads meanwhile. The ``cli`` fixture (conftest.py) is this function."""
    from utils.cli import run_cli
    main = getattr(main, 'main', main)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(lambda: main(argv))
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        torch.set_num_threads(previous)
        logging.getLogger().setLevel(logging.WARNING)
    return code, out.getvalue(), err.getvalue()


def run_inprocess(argv: List[str]) -> Tuple[int, str]:
    """train.py in this process, single-threaded (like the subprocess runs, so weights can be compared bit for
    bit): (exit code, stderr)."""
    from utils.train_loop import main
    code, _, err = run_main(main, argv, threads=1)
    return code, err


def free_port() -> int:
    """A free TCP port for a torchrun rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg',
               PYTHON=sys.executable)  # the interpreter scripts/dist_train.sh launches
    return env


def run_program(args: List[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python *args`` (a script or ``-m module`` and its options) from the repository root, as a user
    starts it; output captured."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_train(argv: List[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``python train.py argv`` from the repository root."""
    return run_program(['train.py', *argv], timeout=timeout)


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def read_summary(path: Path) -> List[Dict[str, str]]:
    import csv
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def state_dicts_equal(a: dict, b: dict, keys=('state_dict', 'state_dict_ema')) -> Optional[str]:
    """None when the checkpoints' weights are bit-identical, else the first differing tensor."""
    for key in keys:
        if (key in a) != (key in b):
            return f'{key} present in only one checkpoint'
        for name, tensor in a.get(key, {}).items():
            if not torch.equal(tensor, b[key][name]):
                return f'{key}.{name} differs (max abs diff {(tensor.float() - b[key][name].float()).abs().max()})'
    return None


def make_ade20k_folder(root: Path, n_train: int = 4, n_val: int = 2, classes: int = 150, size=(96, 72)) -> Path:
    """An ADE20K-layout folder (``images/{training,validation}/*.jpg``, ``annotations/.../*.png``) of crops of
    real photographs (scikit-learn's samples) with blocky annotations of raw ids 0..``classes`` (0: 'other')."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    w, h = size
    k = 0
    for split, n in (('training', n_train), ('validation', n_val)):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            photo = photos[k % len(photos)]
            y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            Image.fromarray(photo[y:y + h, x:x + w]).save(root / 'images' / split / f'ADE_{split}_{i:08d}.jpg',
                                                          quality=92)
            blocks = rng.integers(0, classes + 1, (h // 12 + 1, w // 12 + 1))
            label = np.kron(blocks, np.ones((12, 12), dtype=blocks.dtype))[:h, :w].astype(np.uint8)
            Image.fromarray(label).save(root / 'annotations' / split / f'ADE_{split}_{i:08d}.png')
            k += 1
    return root


def make_coco_folder(root: Path, n_train: int = 4, n_val: int = 2, size=(128, 96)) -> Path:
    """A COCO-layout folder (``annotations/instances_{train,val}.json``, ``{train,val}/*.jpg``) of crops of real
    photographs (scikit-learn's samples), every other one upright, with 1-3 objects each of 3 categories (ids 1, 3,
    7): polygons, an uncompressed RLE, and a crowd region that training leaves out."""
    import json
    from PIL import Image
    from pycocotools import mask as mask_utils
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    cats = [{'id': 1, 'name': 'roof'}, {'id': 3, 'name': 'petal'}, {'id': 7, 'name': 'sky'}]
    k, ann_id = 0, 1
    for split, n in (('train', n_train), ('val', n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            w, h = size if i % 2 == 0 else size[::-1]
            photo = photos[k % len(photos)]
            y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            name = f'{split}_{i:06d}.jpg'
            Image.fromarray(photo[y:y + h, x:x + w]).save(root / split / name, quality=92)
            images.append({'id': 100 + k, 'file_name': name, 'width': w, 'height': h})
            for j in range(int(rng.integers(1, 4))):
                x0, y0 = float(rng.uniform(0, w * 0.6)), float(rng.uniform(0, h * 0.6))
                x1, y1 = float(rng.uniform(x0 + 12, w)), float(rng.uniform(y0 + 12, h))
                poly = [x0, y0, x1, y0 + 0.3 * (y1 - y0), 0.6 * (x0 + x1), y1, x0, 0.8 * (y1 - y0) + y0]
                ann = {'id': ann_id, 'image_id': 100 + k, 'category_id': cats[(i + j) % 3]['id'], 'iscrowd': 0}
                if j == 1:  # an uncompressed RLE
                    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w)))
                    ys, xs = np.nonzero(m)
                    rle = mask_utils.encode(np.asfortranarray(m))
                    counts, run, value = [], 0, 0
                    for v in m.ravel(order='F'):
                        if v != value:
                            counts.append(run)
                            run, value = 0, v
                        run += 1
                    counts.append(run)
                    ann['segmentation'] = {'size': [h, w], 'counts': counts}
                    ann['area'] = float(mask_utils.area(rle))
                    ann['bbox'] = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                   float(ys.max() - ys.min() + 1)]
                else:
                    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
                    ann['segmentation'] = [poly]
                    ann['area'] = float(mask_utils.area(rle))
                    ann['bbox'] = [float(v) for v in mask_utils.toBbox(rle)]
                if j == 2:
                    ann['iscrowd'] = 1
                anns.append(ann)
                ann_id += 1
            k += 1
        (root / 'annotations').mkdir(exist_ok=True)
        (root / 'annotations' / f'instances_{split}.json').write_text(
            json.dumps({'images': images, 'annotations': anns, 'categories': cats}))
    return root


def reference_fill(shapes: Dict[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
    """The deterministic float64 weights the dense reference data was computed with (tests/data's
    golden_dense_t.pt; the rules of its README): keys in sorted order, one generator seeded 0."""
    import math
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith('num_batches_tracked'):
            continue
        if key.endswith('running_var'):
            value = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        elif key.endswith('running_mean'):
            value = (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * 0.2
        elif len(shape) == 1 and key.endswith('weight'):
            value = 1 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif len(shape) == 1:
            value = 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif len(shape) in (2, 4) and key.endswith('weight'):
            value = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
        out[key] = value
    return out
