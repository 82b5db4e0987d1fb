"""Building models from checkpoints and scoring them on an ImageFolder: the logic behind validate.py / reparam.py."""
import csv
import json
import logging
import os
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError, parse_kwargs
from .data import DataError, build_image_folder
from .distributed import DistInfo, all_reduce_sum
from .train_step import close_loader

_logger = logging.getLogger(__name__)

def expand_model_names(names: List[str]) -> List[str]:
    """Model names with shell-style patterns (``'overlock*'``) expanded over the registered models."""
    import timm
    import models  # noqa: F401  (registers the overlock models)
    out = []
    for name in names:
        if any(c in name for c in '*?['):
            found = timm.list_models(name)
            if not found:
                raise UsageError(f'--model {name} matches no registered model')
            out.extend(found)
        elif not timm.is_model(name):
            raise UsageError(f'--model {name} is not a registered model '
                             f'(OverLoCK models: {", ".join(timm.list_models("overlock*"))})')
        else:
            out.append(name)
    return out


def build_eval_model(
        name: str,
        checkpoint: Optional[str] = None,
        pretrained: bool = False,
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[List[str]] = None,
) -> nn.Module:
    """A model for evaluation: from a checkpoint file (any of our layouts or the original release's), from
    the published weights, or randomly initialised. A deploy-form checkpoint given with a training-form name
    builds the ``_reparam`` model instead (logged)."""
    import timm
    import models

    kwargs = parse_kwargs(model_kwargs)
    if checkpoint:
        sd = models.extract_state_dict(models.read_checkpoint_file(checkpoint), use_ema=use_ema,
                                       source=f'checkpoint {checkpoint}')
        if name.startswith('overlock') and models.is_deploy_state_dict(sd) and not name.endswith('_reparam'):
            _logger.info('%s holds deploy-form (re-parameterised) weights: using %s_reparam', checkpoint, name)
            name += '_reparam'
        classifier = models.CLASSIFIER_KEYS[0] + '.weight'
        if classifier in sd:
            ckpt_classes = sd[classifier].shape[0]
            if num_classes is not None and num_classes != ckpt_classes:
                raise UsageError(f'checkpoint {checkpoint} has a {ckpt_classes}-class classifier but '
                                 f'--num-classes is {num_classes}; evaluation needs the trained classifier')
            num_classes = ckpt_classes
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise UsageError(f'--model-kwargs: {e}') from None
    if checkpoint:
        models.load_checkpoint(model, checkpoint, use_ema=use_ema)
    return model


def is_deploy(model: nn.Module) -> bool:
    from models import DilatedReparamBlock
    blocks = [m for m in model.modules() if isinstance(m, DilatedReparamBlock)]
    return bool(blocks) and all(m.deploy for m in blocks)


def eval_dataset(data: str, transform, skip_corrupt: bool = False):
    """``DATA/val`` (or ``DATA/validation``) when present, else DATA itself as the class-folder root."""
    if not os.path.isdir(data):
        raise DataError(f'data directory {data} does not exist')
    for split in ('val', 'validation'):
        if os.path.isdir(os.path.join(data, split)):
            data = os.path.join(data, split)
            break
    return build_image_folder(data, transform=transform, skip_corrupt=skip_corrupt)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        device: torch.device,
        amp: Optional[torch.dtype] = None,
        channels_last: bool = False,
        prepare: Optional[Callable] = None,
        info: Optional[DistInfo] = None,
        progress: bool = False,
        desc: str = '',
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%), mean cross-entropy, image count and images/s of ``model`` over ``loader``:
    the one evaluation loop (validate.py scores files with it, train.py its model and EMA after each epoch).

    Sums stay on the device (no per-batch sync unless ``progress``); images/s leaves out the first batch
    (worker start-up, warm-up) unless there is only one.

    Args:
        amp: autocast dtype (None: no autocast).
        channels_last: move images to channels-last (ignored when ``prepare`` is given).
        prepare: ``prepare(x, y)`` moves a batch to the device (and normalises it); default ``.to(device)``.
        info: in a distributed run, the sums are reduced over its processes (each image counted once).
        progress: show a progress bar labelled ``desc``.
    """
    from tqdm import tqdm

    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    start, timed, count = None, 0, 0
    first_start = time.perf_counter()
    batches = iter(loader)
    bar = tqdm(batches, total=len(loader) if hasattr(loader, '__len__') else None, desc=desc,
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for x, y in bar:
            if prepare is not None:
                x, y = prepare(x, y)
            else:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(x)
            if isinstance(out, dict):  # a training-form model in training mode: the main head
                out = out['main']
            out = out.float()
            sums[0] += F.cross_entropy(out, y, reduction='sum').double()
            hit = out.topk(min(5, out.shape[1]), dim=1).indices.eq(y[:, None])
            sums[1] += hit[:, :1].sum()
            sums[2] += hit.sum()
            sums[3] += y.numel()
            count += y.numel()
            if start is None:
                start = time.perf_counter()
            else:
                timed += y.numel()
            if progress:
                bar.set_postfix(top1=f'{100 * sums[1].item() / max(1.0, sums[3].item()):.2f}')
    except BaseException:
        close_loader(batches)  # an exhausted iterator stops its own workers (unless they persist)
        raise
    end = time.perf_counter()
    if info is not None:
        all_reduce_sum(sums, info)
    loss, top1, top5, images = sums.tolist()
    if not images:
        raise DataError('the validation set is empty')
    elapsed = end - start if start is not None else 0.
    if not timed:  # a single batch: time it whole, worker start-up included
        timed, elapsed = count, end - first_start
    return {
        'top1': 100.0 * top1 / images, 'top5': 100.0 * top5 / images, 'loss': loss / images, 'images': int(images),
        'images_per_sec': timed / elapsed if elapsed > 0 and timed else float('nan'),
    }


def rounded(metrics: Dict[str, float]) -> Dict[str, float]:
    """:func:`evaluate`'s metrics rounded for tables and results files."""
    digits = {'top1': 4, 'top5': 4, 'loss': 6, 'images_per_sec': 2}
    return {k: round(v, digits[k]) if k in digits else v for k, v in metrics.items()}


def append_results(path: str, rows: List[Dict[str, Any]]) -> None:
    """Append result rows to a .csv (header written once) or .json (a list) file."""
    if path.endswith('.json'):
        old = []
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (json.JSONDecodeError, OSError) as e:
                raise UsageError(f'--results-file {path} exists but is not a JSON list ({e})') from None
            if not isinstance(old, list):
                raise UsageError(f'--results-file {path} exists but is not a JSON list')
        with open(path, 'w') as f:
            json.dump(old + rows, f, indent=2)
    elif path.endswith('.csv'):
        fields = list(rows[0])
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        with open(path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
            if new:
                writer.writeheader()
            writer.writerows(rows)
    else:
        raise UsageError(f'--results-file {path} must end in .csv or .json')


def markdown_table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
    for row in rows:
        lines.append('| ' + ' | '.join(str(row.get(c, '')) for c in columns) + ' |')
    return '\n'.join(lines)
