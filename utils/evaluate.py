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
from timm.layers import adaptive_avgmax_pool2d
from torch import nn

from .cli import UsageError, one_line, parse_kwargs
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
        global_pool: Optional[str] = None,
) -> nn.Module:
    """A model for evaluation: from a checkpoint file (any of our layouts or the original release's), from
    the published weights, or randomly initialised. A deploy-form checkpoint given with a training-form name
    builds the ``_reparam`` model instead (logged). ``global_pool``: the model's pooling (``--gp``)."""
    import timm
    import models

    kwargs = parse_kwargs(model_kwargs)
    if global_pool is not None:
        kwargs['global_pool'] = global_pool
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
    except ValueError as e:  # the model's own checks, e.g. a pooling it does not have (--gp)
        if isinstance(e, models.CheckpointError):
            raise
        raise UsageError(f'--model {name}: {e}') from None
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
        classes: Optional[List[int]] = None,
        on_logits: Optional[Callable[[torch.Tensor], None]] = None,
        log_every: Optional[int] = None,
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
        classes: score only these logits (a class subset, ``--valid-labels``); targets index into the subset.
        on_logits: called with each batch's (selected) logits, in loader order (ImageNet-ReaL scoring).
        log_every: a log line every this many batches.
    """
    from tqdm import tqdm

    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    subset = torch.tensor(classes, dtype=torch.long, device=device) if classes is not None else None
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    start, timed, count, batches_done = None, 0, 0, 0
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
            if subset is not None:
                out = out.index_select(1, subset)
            if on_logits is not None:
                on_logits(out)
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
            batches_done += 1
            if log_every and batches_done % log_every == 0:
                done = sums.tolist()
                _logger.info('%s [%d/%s]  loss %.4f  top-1 %.3f  top-5 %.3f', desc or 'Test', batches_done,
                             bar.total if bar.total is not None else '?', done[0] / done[3], 100 * done[1] / done[3],
                             100 * done[2] / done[3])
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


def read_valid_labels(path: str) -> List[int]:
    """``--valid-labels``: the class indices of a file with one integer per line (blank lines skipped), sorted
    as the classifier orders them."""
    if not os.path.isfile(path):
        raise UsageError(f'--valid-labels {path} does not exist')
    out = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(int(line.strip()))
                except ValueError:
                    raise UsageError(f'--valid-labels {path}: line {n} is not a class index ({line.strip()!r})') \
                        from None
    if not out or min(out) < 0:
        raise UsageError(f'--valid-labels {path} holds no class indices >= 0')
    return sorted(set(out))


def real_labels_scorer(dataset, path: str, num_classes: int = 1000):
    """``--real-labels``: timm's ``RealLabelsImagenet`` over ``dataset``'s files (in loader order) and the
    ImageNet-ReaL ``real.json`` at ``path``, checked to fit them (one-line errors); top-1 and top-5 (top-k for
    fewer than 5 classes)."""
    from timm.data import RealLabelsImagenet
    if not os.path.isfile(path):
        raise UsageError(f'--real-labels {path} does not exist')
    if not hasattr(dataset, 'filenames'):
        raise UsageError('--real-labels needs file names, which this dataset does not give (use an image folder)')
    names = [os.path.basename(n) for n in dataset.filenames(basename=True)]
    try:
        with open(path, encoding='utf-8') as f:
            labels = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f'--real-labels {path} is not a JSON file ({one_line(e)})') from None
    if not isinstance(labels, list) or len(labels) != len(names):
        raise UsageError(f'--real-labels {path} lists {len(labels) if isinstance(labels, list) else "no"} images '
                         f'but the dataset has {len(names)} (ImageNet-ReaL: one list of labels per validation image)')
    expected = {f'ILSVRC2012_val_{i + 1:08d}.JPEG' for i in range(len(labels))}
    strange = [n for n in names if n not in expected]
    if strange:
        raise UsageError(f'--real-labels: images must be named ILSVRC2012_val_<8 digits>.JPEG as in ImageNet '
                         f'(e.g. {strange[0]})')
    return RealLabelsImagenet(names, real_json=path, topk=(1, min(5, num_classes)))


class PooledLogits(nn.Module):
    """Test-time pooling for a model whose logits keep their spatial map (built with ``global_pool=''``): the
    classifier's answer for every window of the training feature size (``pool_size``, stride 1), then the mean
    of the average and the maximum over the windows. For OverLoCK the head (1x1 convolutions) is pointwise up
    to the pooling, so this equals pooling the projected features first, as timm's ``TestTimePoolHead``
    pools features before a linear classifier."""

    def __init__(self, model: nn.Module, pool_size):
        super().__init__()
        self.model = model
        self.pool_size = tuple(pool_size)
        self.num_classes = getattr(model, 'num_classes', None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.avg_pool2d(self.model(x), kernel_size=self.pool_size, stride=1)
        return adaptive_avgmax_pool2d(logits, 1).flatten(1)


def apply_test_pool(model: nn.Module, cfg: Dict[str, Any]):
    """``--test-pool``: ``(model, pooled)``. As timm's ``apply_test_time_pool``, only for an input larger than
    the model's training size; OverLoCK models through :class:`PooledLogits` (timm's head wrapper assumes a
    linear classifier right after the features), other timm models through timm's."""
    default = model.pretrained_cfg.get('test_input_size') or model.pretrained_cfg['input_size']
    if not (cfg['input_size'][-1] > default[-1] and cfg['input_size'][-2] > default[-2]):
        _logger.info('--test-pool: the input %s is not larger than the training size %s: no test-time pooling',
                     tuple(cfg['input_size'][1:]), tuple(default[1:]))
        return model, False
    from models import OverLoCK
    if isinstance(model, OverLoCK):
        if model.global_pool != '':
            model.head[3] = nn.Identity()  # keep the classifier's map (the pooling has no weights)
            model.global_pool = ''
        wrapped = PooledLogits(model, model.pretrained_cfg['pool_size'])
    else:
        from timm.layers import apply_test_time_pool
        wrapped, pooled = apply_test_time_pool(model, cfg)
        if not pooled:
            return model, False
    _logger.info('--test-pool: input %s > training size %s: classifier over %s windows, average+max pooled',
                 tuple(cfg['input_size'][1:]), tuple(default[1:]), tuple(model.pretrained_cfg.get('pool_size', ())))
    return wrapped, True


class TfPreprocessing:
    """``--tf-preprocessing``: timm's ``TfPreprocessTransform`` (TensorFlow's decode, central crop and resize,
    run as a TF1 graph) on the file's bytes, then the model's normalisation."""

    def __init__(self, cfg: Dict[str, Any]):
        import tensorflow as tf
        tf.compat.v1.disable_eager_execution()  # timm's transform is a TF1 graph with placeholders
        from timm.data.tf_preprocessing import TfPreprocessTransform
        self.tf = TfPreprocessTransform(is_training=False, size=cfg['input_size'][-1],
                                        interpolation=cfg['interpolation'])
        self.mean = torch.tensor(cfg['mean']).view(-1, 1, 1)
        self.std = torch.tensor(cfg['std']).view(-1, 1, 1)

    def __call__(self, image_bytes: bytes) -> torch.Tensor:
        if not image_bytes.startswith(b'\xff\xd8'):
            raise DataError('--tf-preprocessing decodes JPEG files only (TensorFlow\'s JPEG decoder, as for '
                            'ImageNet); drop the option for other image files')
        img = torch.from_numpy(self.tf(image_bytes)).float().div_(255)
        return img.sub_(self.mean).div_(self.std)


class MirrorTTA(nn.Module):
    """Test-time augmentation: the mean of the logits of each image and of its mirror image (``--tta 2``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(-1))) / 2


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
