"""Helpers of tests/test_train.py: a tiny synthetic ImageFolder and ways to run train.py."""
import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tests.helpers import REPO, tiny_cli_kwargs

# The tests' tiny OverLoCK (tests.helpers.TINY_KWARGS) on train.py's command line, 32 px inputs.
TINY = ['--model', 'overlock_xt', '--model-kwargs', *tiny_cli_kwargs(), '--img-size', '32']
# Quick CPU runs: batch 4, no worker processes, short schedule, a log line per update, and the recipe's
# augmentation (train.py's defaults) off unless a test turns it on.
FAST = ['-b', '4', '-j', '0', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--log-interval', '1',
        '--device', 'cpu', '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0']
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def make_image_folder(root: Path, n_train: int = 8, n_val: int = 4, size: int = 32,
                      classes: Sequence[str] = ('red', 'green', 'blue'), seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: noisy solid colours, one per class."""
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


def run_inprocess(argv: List[str]) -> Tuple[int, str]:
    """Run train.py's main through ``run_cli`` in this process, single-threaded (like the subprocess runs, so
    weights can be compared bit for bit). Returns (exit code, stderr text)."""
    from utils.cli import run_cli
    from utils.train_loop import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            try:
                run_cli(lambda: main(argv))
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        torch.set_num_threads(threads)
        logging.getLogger().setLevel(logging.WARNING)
    return code, err.getvalue()


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


def run_train(argv: List[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``python train.py argv`` from the repository root."""
    return subprocess.run([sys.executable, 'train.py', *argv], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


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
