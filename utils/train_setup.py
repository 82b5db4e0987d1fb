"""The builders of a training run: output folder, data, batch and learning rate, model and EMA, optimizer,
loaders, loss and schedule. Each takes the parsed options (and what earlier builders made) and returns
what it built, so each can be called and tested alone; :class:`utils.train_loop.Trainer` calls them in order.
"""
import argparse
import copy
import datetime
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from .checkpoint import LAST_FILE
from .cli import UsageError, create_model_from_args, parse_kwargs
from .config import STALE_FILES, run_files_in
from .data import (
    DataError, EpochSeed, EvalShardSampler, ImageFolderDataset, ResumableSampler, SeededSamples, build_image_folder,
    build_timm_dataset, check_same_classes, dataset_classes, is_streamed, resolve_split, samples_per_rank, split_tar,
)
from .distributed import DistInfo, all_gather_objects, barrier
from .train_step import worker_init

__all__ = [
    'setup_logging', 'remove_log_handlers', 'seed_all',
    'resolve_output', 'build_datasets', 'resolve_batch', 'resolve_lr', 'build_model', 'ModelEma', 'build_ema',
    'build_scaler', 'apply_gpu_limit',
    'build_optimizer', 'wrap_model', 'triton_cache_dir', 'triton_cache_problem', 'compile_model_kernels',
    'prepare_kernel_cache', 'Loaders', 'build_loaders', 'build_device_augment', 'build_loss', 'build_scheduler',
]

_logger = logging.getLogger('train')


_LOG_TAG = '_overlock_train_handler'


def remove_log_handlers() -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _LOG_TAG, False)]:
        root.removeHandler(h)
        h.close()


def setup_logging(info: DistInfo, log_file: Optional[str]) -> None:
    """Rank 0 logs INFO to the console and ``log_file``; other ranks only warnings and errors."""
    remove_log_handlers()  # set up twice per run (console first, the file once the output folder exists)
    root = logging.getLogger()
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter('%(message)s' if info.is_main else f'[rank {info.rank}] %(message)s'))
    setattr(console, _LOG_TAG, True)
    root.addHandler(console)
    if log_file and info.is_main:
        fh = logging.FileHandler(log_file, mode='a', encoding='utf-8')
        fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        setattr(fh, _LOG_TAG, True)
        root.addHandler(fh)
    root.setLevel(logging.INFO if info.is_main else logging.WARNING)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_output(args: argparse.Namespace, info: DistInfo) -> None:
    """Settle ``args.resume`` and ``args.output`` and prepare the folder (rank 0 creates it; a new run clears
    the stale files of one that never saved a checkpoint). Refuses a folder holding another run.
    ``--experiment NAME`` puts the run in ``OUTPUT/NAME`` (OUTPUT: ``--output``, else ``output/train``)."""
    if args.experiment:
        args.output = os.path.join(args.output or os.path.join('output', 'train'), args.experiment)
        args.experiment = ''  # settled: args.yaml and a resumed run read the run directory from --output
    if args.resume == 'auto':
        if not args.output:
            raise UsageError('--resume auto needs --output (the run directory to continue)')
        from .checkpoint import newest_checkpoint
        args.resume = newest_checkpoint(args.output)  # last.pth or a newer recovery.pth
    if args.resume:
        if not os.path.exists(args.resume):
            raise UsageError(f'--resume {args.resume} does not exist')
        if not args.output:
            args.output = os.path.dirname(os.path.abspath(args.resume))
    if not args.output:
        stamp = all_gather_objects(datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), info)[0]
        args.output = os.path.join('output', 'train', f'{args.model}-{stamp}')
    existing = run_files_in(args.output)
    if existing and not args.resume and not args.overwrite:
        last = os.path.join(args.output, LAST_FILE)
        raise UsageError(f'--output {args.output} holds another run ({", ".join(existing[:4])}); pass --resume '
                         f'{last} to continue it, --overwrite to replace it, or another --output')
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f'--output {args.output} is a file, not a directory')
    barrier(info)  # every rank has checked before rank 0 writes anything
    if info.is_main:
        os.makedirs(args.output, exist_ok=True)
        if not args.resume:  # a new run: nothing of an earlier one may mix into its outputs
            for name in existing + [n for n in STALE_FILES if os.path.isfile(os.path.join(args.output, n))]:
                path = os.path.join(args.output, name)
                if os.path.isdir(path):
                    import shutil
                    shutil.rmtree(path)
                else:
                    os.remove(path)
    barrier(info)


def _build_timm_datasets(args: argparse.Namespace):
    """Training and validation sets of ``--dataset`` wds/hfds, or of tar files (timm's dataset factory)."""
    common = dict(class_map=args.class_map, batch_size=args.batch_size, seed=args.seed, num_workers=args.workers,
                  download=args.dataset_download)
    sources = [split_tar(args.data_dir, s) or args.data_dir for s in (args.train_split, args.val_split)]
    train_set = build_timm_dataset(args.dataset, sources[0], args.train_split, is_training=True,
                                   repeats=args.epoch_repeats, **common)
    val_set = build_timm_dataset(args.dataset, sources[1], args.val_split, is_training=False, **common)
    where = args.dataset or sources[0]
    classes = dataset_classes(train_set)
    if classes and dataset_classes(val_set) and set(dataset_classes(val_set)) != set(classes):
        check_same_classes(list(classes), list(dataset_classes(val_set)), where)
    if args.num_classes is None:
        if not classes:
            raise DataError(f'{where}: the data does not list its classes; pass --num-classes (or --class-map)')
        args.num_classes = len(classes)
    elif classes and args.num_classes < len(classes):
        raise DataError(f'--num-classes {args.num_classes} but {where} has {len(classes)} classes')
    train_set.root = val_set.root = where  # named in messages
    if is_streamed(train_set):
        _logger.info('%s: streamed (%d training samples); shards are split over processes and loader workers, and '
                     'a resume restores the data at epoch granularity (a mid-epoch resume restarts that epoch\'s '
                     'shard stream)', where, getattr(train_set.reader, 'num_samples', 0))
    return train_set, val_set


def build_datasets(args: argparse.Namespace) -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    """The training and validation folders (same classes); sets ``args.num_classes`` from the data when unset.
    ``--dataset`` wds/hfds, tar files and ``--class-map`` go through timm's dataset factory."""
    if args.dataset or args.class_map or (args.data_dir and split_tar(args.data_dir, args.train_split)):
        return _build_timm_datasets(args)
    train_dir = resolve_split(args.data_dir, args.train_split)
    val_dir = resolve_split(args.data_dir, args.val_split)
    train_set = build_image_folder(train_dir, skip_corrupt=args.skip_corrupt)
    val_classes = sorted(e.name for e in os.scandir(val_dir) if e.is_dir() and not e.name.startswith('.'))
    check_same_classes(train_set.classes, val_classes, args.data_dir)
    val_set = build_image_folder(val_dir, skip_corrupt=args.skip_corrupt, class_to_idx=train_set.class_to_idx)
    n_classes = len(train_set.classes)
    if args.num_classes is None:
        args.num_classes = n_classes
    elif args.num_classes < n_classes:
        raise DataError(f'--num-classes {args.num_classes} but {train_dir} has {n_classes} class folders')
    elif args.num_classes > n_classes:
        _logger.warning('--num-classes %d but %s has only %d class folders', args.num_classes, train_dir, n_classes)
    return train_set, val_set


def resolve_lr(args: argparse.Namespace, global_batch: int) -> float:
    """The learning rate the run uses. With ``--auto-lr``: ``--lr-base`` (1e-3) x global batch /
    ``--lr-base-size`` (1024), whatever ``--lr`` says, as the original's ``--auto-lr`` did; without it:
    ``--lr``, or ``--lr-base`` when ``--lr`` is unset."""
    if args.auto_lr:
        return args.lr_base * global_batch / args.lr_base_size
    return args.lr if args.lr is not None else args.lr_base


def resolve_batch(args: argparse.Namespace, info: DistInfo, train_set: ImageFolderDataset) -> int:
    """Settle ``args.batch_size`` (from ``--global-batch-size``) and ``args.lr``; return the global batch."""
    if args.global_batch_size is not None:
        per = info.world_size * args.grad_accum_steps
        if args.global_batch_size < 1 or args.global_batch_size % per:
            raise UsageError(
                f'--global-batch-size {args.global_batch_size} is not divisible by {info.world_size} '
                f'processes x {args.grad_accum_steps} accumulation steps; pick a multiple of {per}')
        args.batch_size = args.global_batch_size // per
    global_batch = args.batch_size * info.world_size * args.grad_accum_steps
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax) and args.mixup_mode != 'elem' \
            and args.batch_size % 2:
        raise UsageError(f'-b {args.batch_size}: mixup/cutmix mix pairs of images, the batch per process '
                         f'must be even')
    lr = resolve_lr(args, global_batch)
    if args.auto_lr and args.lr is not None and not math.isclose(lr, args.lr) and info.is_main:
        _logger.info('--auto-lr: lr = %g x global batch %d / %d = %g; --lr %g is not used (as in the original)',
                     args.lr_base, global_batch, args.lr_base_size, lr, args.lr)
    args.lr = lr
    per_rank = samples_per_rank(train_set, info.world_size)
    if per_rank < args.batch_size:
        raise DataError(f'{train_set.root} has {per_rank * info.world_size} images, fewer than one batch of '
                        f'{args.batch_size} per process x {info.world_size} processes; lower -b')
    return global_batch


def build_model(args: argparse.Namespace, info: DistInfo) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model on ``info.device`` (published or fine-tuning weights loaded, split or synchronised BatchNorm)
    and timm's data config."""
    import models
    from timm.data import resolve_data_config
    extra: Dict[str, Any] = {}
    if args.drop is not None:
        extra['drop_rate'] = args.drop
    if args.model.startswith('overlock') and 'use_ds' not in parse_kwargs(args.model_kwargs):
        # the recipe's deep supervision: the auxiliary head's logits in training mode, loss main + R x aux
        extra['use_ds'] = True
    if args.input_size is not None and args.in_chans is None:
        extra['in_chans'] = args.input_size[0]
    if args.pretrained:
        extra['pretrained'] = True
        if args.pretrained_path:
            if not os.path.isfile(args.pretrained_path):
                raise UsageError(f'--pretrained-path {args.pretrained_path} does not exist')
            extra['pretrained_cfg_overlay'] = dict(file=args.pretrained_path)
    model = create_model_from_args(args, **extra)
    if args.pretrained:
        _logger.info('Starting from the published weights of %s%s', args.model,
                     f' ({args.pretrained_path})' if args.pretrained_path else '')
    if args.finetune:
        models.load_checkpoint(model, args.finetune, use_ema=args.finetune_ema, strict=True)
        _logger.info('Fine-tuning from %s', args.finetune)
    data_config = resolve_data_config(
        dict(img_size=args.img_size, input_size=args.input_size, crop_pct=args.crop_pct,
             interpolation=args.interpolation, mean=args.mean, std=args.std), model=model)
    min_size = models.MIN_INPUT_SIZE if args.model.startswith('overlock') else 1
    if min(data_config['input_size'][1:]) < min_size:
        flag = (f'--input-size {" ".join(map(str, args.input_size))}' if args.input_size else
                f'--img-size {args.img_size}')
        raise UsageError(f'{flag}: {args.model} needs at least {min_size} pixels')
    if args.split_bn:
        from timm.layers import convert_splitbn_model
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn:
        if info.distributed and info.device.type == 'cuda':
            if args.split_bn:
                raise UsageError('--split-bn and --sync-bn: SyncBatchNorm would replace the split BatchNorm layers; '
                                 'add --no-sync-bn')
            if args.torchscript:
                raise UsageError('--torchscript and --sync-bn: SyncBatchNorm does not script; add --no-sync-bn')
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.distributed and info.is_main:
            _logger.warning('--sync-bn ignored: SyncBatchNorm needs CUDA (add --no-sync-bn to silence this)')
    n_params = sum(p.numel() for p in model.parameters())
    _logger.info('Model %s: %.2fM parameters, %d classes, input %s', args.model, n_params / 1e6,
                 args.num_classes, tuple(data_config['input_size']))
    return model, data_config


class ModelEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` whose update is, to the last bit, that of ``ModelEmaV2`` (the original's EMA):
    ``ema = decay * ema + (1 - decay) * model`` on every state_dict entry, applied with the set decay from the
    first update (``update(model)``; timm's V3 ``update(model, step=1)`` would use decay 0 there), integer
    buffers included (rounded as V2 rounds them). With ``step`` and ``use_warmup`` it follows V3's decay
    warm-up. Float tensors on the EMA's device go through foreach kernels; the arithmetic is V2's, not a lerp
    (whose rounding differs), so that EMA weights match the original's within float rounding of the model's.
    """

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        ema_values, model_values = [], []
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point() and model_v.device == ema_v.device and model_v.dtype == ema_v.dtype:
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:  # integer buffers, or an EMA kept elsewhere (--model-ema-force-cpu): one tensor at a time
                model_v = model_v.to(device=ema_v.device)
                ema_v.copy_(decay * ema_v + (1. - decay) * model_v)
        if ema_values:
            scaled = torch._foreach_mul(model_values, 1. - decay)
            torch._foreach_mul_(ema_values, decay)
            torch._foreach_add_(ema_values, scaled)


def build_ema(args: argparse.Namespace, model: nn.Module) -> Optional[ModelEma]:
    """The EMA of ``model`` with ``--model-ema`` (on the CPU with ``--model-ema-force-cpu``), else None."""
    if not args.model_ema:
        return None
    return ModelEma(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                    device=torch.device('cpu') if args.model_ema_force_cpu else None)


def build_scaler(args: argparse.Namespace, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for float16 AMP (bfloat16 and float32 need none)."""
    if args.amp and args.amp_dtype == 'float16':
        return torch.amp.GradScaler(device.type)
    return None


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` (parameter groups without weight decay for norms and biases)."""
    from timm.optim import create_optimizer_v2
    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(
            model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            layer_decay=args.layer_decay, **opt_kwargs)
    except (AssertionError, ValueError, KeyError) as e:  # timm's factory rejects unknown names this way
        raise UsageError(f'--opt {args.opt}: {e}') from None


def triton_cache_dir() -> str:
    """The folder Triton keeps compiled kernels in (TRITON_CACHE_DIR, default ~/.triton/cache)."""
    try:
        import triton
        return str(triton.knobs.cache.dir)
    except (ImportError, AttributeError):  # no triton, or one without knobs: its documented default
        return os.environ.get('TRITON_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.triton', 'cache')


def triton_cache_problem() -> Optional[str]:
    """None when Triton's kernel cache is writable, else one line saying which folder, why, and what to set."""
    path = triton_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix='.write_check'):
            pass
    except OSError as e:
        return (f'Triton kernel cache {path} is not writable ({e.strerror or e}): every process compiles the '
                f'kernels again at every start; set TRITON_CACHE_DIR to a writable folder, e.g. '
                f'export TRITON_CACHE_DIR=/tmp/$USER/triton')
    return None


def compile_model_kernels(model: nn.Module, input_size: Tuple[int, ...], batch_size: int, device: torch.device,
                          amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> float:
    """Run one forward and backward of a copy of ``model`` as training runs it (batch, resolution, layout,
    autocast) so that Triton compiles its kernels into the cache; returns the seconds it took.

    The copy runs in eval mode: BatchNorm (SyncBN too) neither updates its statistics nor talks to the other
    processes, and no random numbers are drawn, so the run itself is left exactly as it was.
    """
    start = time.perf_counter()
    clone = copy.deepcopy(model).eval()
    gen = torch.Generator(device='cpu').manual_seed(0)
    x = torch.randn(batch_size, *input_size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = clone(x)
    out = out['main'] if isinstance(out, dict) else out
    out.float().square().mean().backward()
    del clone, out
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def prepare_kernel_cache(args: argparse.Namespace, info: DistInfo, model: nn.Module, data_config: Dict[str, Any],
                         amp_dtype: Optional[torch.dtype] = None) -> None:
    """On CUDA with the Triton backend: say in one line when the kernel cache is not writable; with several
    processes, local rank 0 of each node compiles the model's kernels while the others wait, so that they read
    the compiled kernels from the cache instead of all compiling the same ones at the first step."""
    if info.device.type != 'cuda':
        return
    from models import ops
    if ops.get_backend('cuda') != 'triton':
        return
    problem = triton_cache_problem()
    if problem and info.local_rank == 0:
        _logger.warning(problem)
    if not info.distributed:
        return  # one process compiles at its first step anyway
    if info.local_rank == 0 and not problem:  # without a cache each process compiles its own
        seconds = compile_model_kernels(model, tuple(data_config['input_size']), args.batch_size, info.device,
                                        amp_dtype, args.channels_last)
        _logger.info('Compiled the Triton kernels into %s in %.1fs (local rank 0; the others waited)',
                     triton_cache_dir(), seconds)
    barrier(info)  # every process, whatever its node found, so that none waits alone


def wrap_model(args: argparse.Namespace, info: DistInfo, model: nn.Module):
    """``(train_model, eval_model, ddp_model)``: the TorchScript form with ``--torchscript``,
    DistributedDataParallel with several processes (else None; ``--no-ddp-bb``: buffers not broadcast),
    ``torch.compile`` with ``--compile``. The scripted module shares the eager model's parameters and buffers,
    so the optimizer, the EMA and the checkpoints keep working on ``model``."""
    import warnings
    train_model = eval_model = model
    ddp_model = None
    if args.torchscript:
        try:
            eval_model = torch.jit.script(model)
            # OverLoCK's forward returns one type when scripted (the logits): the recipe's auxiliary loss
            # needs both heads, which a dict-returning training forward gives.
            train_model = torch.jit.script(BothHeads(model)) if getattr(model, 'aux_head', None) is not None \
                else eval_model
        except Exception as e:  # noqa: BLE001 -- TorchScript raises many types; one line is what helps
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f'--torchscript: {args.model} does not script with these options ({first[:200]}); '
                             f'drop --torchscript') from None
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel
        ids = [info.device.index] if info.device.type == 'cuda' else None
        # Depthwise conv grads come back with other strides on size-1 dims only (same memory layout);
        # DDP's warning about it says nothing actionable.
        warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
        extra = {}
        if args.no_ddp_bb:
            # Not even at start-up, as the original's DDP did (torch's newer forward_sync_buffers=False still
            # syncs them there); torch marks the argument deprecated, which says nothing to act on here.
            warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
            extra['broadcast_buffers'] = False
        ddp_model = DistributedDataParallel(train_model, device_ids=ids, **extra)
        train_model = ddp_model
    if args.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model)
    return train_model, eval_model, ddp_model


class BothHeads(nn.Module):
    """The training forward of an OverLoCK built with ``use_ds=True`` in a form TorchScript types: always
    ``{'main': logits, 'aux': aux_logits}`` (the model's own forward returns only the logits when scripted)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        base, ctx = self.model.forward_base(x)
        return {'main': self.model.forward_head(self.model.forward_focus(base, ctx)),
                'aux': self.model.forward_aux(ctx)}


def apply_gpu_limit(limit: float, device: torch.device) -> Optional[str]:
    """``--gpu-limit``: cap this process's share of the GPU's memory; returns a line for the log."""
    if limit >= 1:
        return None
    if device.type != 'cuda':
        return f'--gpu-limit {limit:g} has no effect on the {device.type.upper()}'
    torch.cuda.set_per_process_memory_fraction(limit, device)
    return f'--gpu-limit: this process may use {limit:.0%} of {torch.cuda.get_device_name(device)}\'s memory'


@dataclass
class Loaders:
    """The run's loaders and what the loop needs to drive them."""
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    sampler: Optional[ResumableSampler]  # None for a streamed dataset (it splits its shards itself)
    generator: torch.Generator  # re-seeded every epoch: worker seeds follow (seed, epoch, rank)
    batches_per_epoch: int
    updates_per_epoch: int
    epoch_seed: Optional[EpochSeed] = None  # a streamed dataset: re-seeds the workers' augmentation every epoch
    persistent: bool = False  # workers kept across epochs

    @property
    def streamed(self) -> bool:
        return self.sampler is None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Point the sampler (or the shard stream) and the workers' seeds at ``epoch``; ``start``: samples of
        this process to skip (a mid-epoch resume; map-style datasets only)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(start)
        elif hasattr(self.train.dataset, 'set_epoch'):
            self.train.dataset.set_epoch(epoch)  # shared with the workers: the shard order of this epoch
        if self.epoch_seed is not None:
            self.epoch_seed.set_epoch(epoch)

    def close(self) -> None:
        """Stop persistent workers (they ignore SIGTERM, so interpreter exit must not be left to do it)."""
        from .train_step import close_loader
        for loader in (self.train, self.val):
            close_loader(getattr(loader, '_iterator', None))  # the iterator a persistent loader keeps


def build_loaders(args: argparse.Namespace, info: DistInfo, train_set: ImageFolderDataset,
                  val_set: ImageFolderDataset, data_config: Dict[str, Any]) -> Loaders:
    """Set the datasets' transforms and build the loaders (resumable sharded sampler for training).

    As the original's prefetcher pipeline, workers hand over uint8 batches (timm's ``fast_collate``);
    normalisation, mixing and random erasing happen on the device (:func:`build_device_augment`). With
    ``--no-prefetcher`` the workers normalise and erase each image and the device only mixes. With
    ``--aug-splits N`` each image comes as a clean copy and N-1 augmented ones (timm's ``AugMixDataset``), the
    batch ordered split by split."""
    from timm.data import AugMixDataset
    from timm.data.loader import fast_collate
    from .augment import build_eval_transform, build_train_transform, split_collate, train_transform_kwargs
    cfg = data_config
    prefetch = not args.no_prefetcher
    in_workers = {} if prefetch else dict(re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                                          re_num_splits=erase_splits(args))
    transform = build_train_transform(cfg['input_size'], mean=cfg['mean'], std=cfg['std'], use_prefetcher=prefetch,
                                      separate=args.aug_splits > 0, **train_transform_kwargs(args, cfg), **in_workers)
    val_set.transform = build_eval_transform(
        cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'],
        crop_pct=cfg['crop_pct'], use_prefetcher=prefetch)
    seed_numpy = args.worker_seeding == 'all'
    epoch_seed = None
    if is_streamed(train_set):  # no sampler: every epoch re-seeds each worker before its first image
        first = transform[0] if args.aug_splits else transform
        epoch_seed = EpochSeed(first, args.seed, info.rank, seed_numpy=seed_numpy)
        transform = (epoch_seed, *transform[1:]) if args.aug_splits else epoch_seed
    train_data = train_set
    train_set.transform = transform
    if args.aug_splits:
        train_data = AugMixDataset(train_set, num_splits=args.aug_splits)
    generator = torch.Generator()
    persistent = args.workers > 0 and args.persistent_workers
    collate = fast_collate if prefetch else split_collate
    common = dict(num_workers=args.workers, pin_memory=args.pin_mem and info.device.type == 'cuda',
                  worker_init_fn=worker_init, generator=generator, persistent_workers=persistent)
    val_batch = args.validation_batch_size or args.batch_size
    if is_streamed(train_set):
        # The shard reader splits shards over processes and workers and sizes the epoch in whole batches.
        for ds, batch in ((train_set, args.batch_size), (val_set, val_batch)):
            ds.reader.batch_size = batch
            ds.set_loader_cfg(num_workers=args.workers)
        sampler = None
        train = torch.utils.data.DataLoader(train_data, batch_size=args.batch_size, drop_last=True,
                                            collate_fn=collate, **common)
        batches = len(train_set) // args.batch_size
    else:
        # Each sample's augmentation is seeded by its place in the epoch (exact mid-epoch resume with workers).
        sampler = ResumableSampler(len(train_set), info.world_size, info.rank, True, args.seed,
                                   repeats=args.epoch_repeats, aug_repeats=args.aug_repeats, sample_seeds=True)
        train = torch.utils.data.DataLoader(SeededSamples(train_data, seed_numpy), batch_size=args.batch_size,
                                            sampler=sampler, drop_last=True, collate_fn=collate, **common)
        batches = sampler.per_replica // args.batch_size
        if batches < 1:
            raise DataError(f'{train_set.root}: {sampler.per_replica} images per process and epoch, fewer than one '
                            f'batch of {args.batch_size}; lower -b')
    val_sampler = None if is_streamed(val_set) else EvalShardSampler(len(val_set), info.world_size, info.rank)
    val = torch.utils.data.DataLoader(val_set, batch_size=val_batch, sampler=val_sampler,
                                      collate_fn=fast_collate if prefetch else None, **common)
    return Loaders(train, val, sampler, generator, batches, math.ceil(batches / args.grad_accum_steps),
                   epoch_seed=epoch_seed, persistent=persistent)


def erase_splits(args: argparse.Namespace) -> int:
    """timm's ``re_num_splits``: with ``--resplit`` random erasing leaves the first (clean) split alone."""
    return (args.aug_splits or 2) if args.resplit else 0


def build_device_augment(args: argparse.Namespace, data_config: Dict[str, Any], device: torch.device,
                         mixup=None):
    """``(train, eval)`` batch steps on the device: normalise; for training also Mixup/CutMix and then random
    erasing of the mixed batch (``--reprob``), as timm's prefetcher did in the original runs. With
    ``--no-prefetcher`` the workers did both normalisation and erasing: only the mixing is left. ``--no-aug``
    turns erasing off, as in the original."""
    from .augment import DeviceAugment
    mean, std = data_config['mean'], data_config['std']
    prefetch = not args.no_prefetcher
    train = DeviceAugment(mean, std, device, mixup=mixup, re_prob=args.reprob if prefetch and not args.no_aug else 0.,
                          re_mode=args.remode, re_count=args.recount, re_num_splits=erase_splits(args),
                          channels_last=args.channels_last, normalize=prefetch)
    return train, DeviceAugment(mean, std, device, channels_last=args.channels_last, normalize=prefetch)


def build_loss(args: argparse.Namespace):
    """``(mixup, criterion)``: timm's Mixup/CutMix (None when off) and the training loss, chosen as the original
    chooses it: JSD + cross-entropy over the ``--aug-splits``; with mixing, soft-target cross-entropy (or BCE);
    else label-smoothed cross-entropy (or BCE), or plain cross-entropy."""
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
    if args.jsd_loss:
        return mixup, JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    if mixup is not None:  # mixup's targets are soft (and smoothed)
        if args.bce_loss:
            return mixup, BinaryCrossEntropy(smoothing=0., target_threshold=args.bce_target_thresh)
        return mixup, SoftTargetCrossEntropy()
    if args.bce_loss:
        return None, BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh)
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """``(scheduler, num_epochs)`` from timm's ``create_scheduler_v2``; num_epochs includes the cool-down. The
    original's noise, cycle, k-decay and plateau options as its timm passed them (the noise seeded by --seed)."""
    from timm.scheduler import create_scheduler_v2
    noise = args.lr_noise
    if noise is not None and len(noise) == 1:
        noise = noise[0]
    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
            patience_epochs=args.patience_epochs, noise=noise, noise_pct=args.lr_noise_pct,
            noise_std=args.lr_noise_std, noise_seed=args.seed, cycle_mul=args.lr_cycle_mul,
            cycle_decay=args.lr_cycle_decay, cycle_limit=args.lr_cycle_limit, k_decay=args.lr_k_decay,
            plateau_mode='min' if args.eval_metric == 'loss' else 'max',
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    except (AssertionError, ValueError) as e:
        raise UsageError(f'--sched {args.sched}: {e}') from None
    if scheduler is None:
        raise UsageError(f'--sched {args.sched} is not a timm scheduler (e.g. cosine, step, tanh, poly)')
    return scheduler, num_epochs
