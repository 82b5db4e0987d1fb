"""What the dense-prediction commands (``scripts.segment``, ``scripts.detect``) share: the model options, building
and loading a model, the training options and the training entry (torchrun, logging, starting weights, resume).
"""
import argparse
import logging
import os
from typing import Callable

import torch

from .cli import UsageError, add_na2d_backend_arg, apply_na2d_backend, parse_kwargs

__all__ = ['add_model_args', 'add_train_args', 'check_positive', 'build_model', 'train_main']


def add_model_args(p: argparse.ArgumentParser, names, default: str, weights_required: bool, checkpoint_help: str,
                   num_classes: int, classes_help: str, kwargs_help: str) -> None:
    p.add_argument('--model', default=default, choices=sorted(names), help='the model')
    p.add_argument('--checkpoint', required=weights_required, default=None, metavar='FILE', help=checkpoint_help)
    p.add_argument('--num-classes', type=int, default=num_classes, metavar='N', help=classes_help)
    p.add_argument('--reparam', action='store_true', help='evaluate the deploy form (merged branches)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help=kwargs_help)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='mixed precision (bfloat16)')
    add_na2d_backend_arg(p)


def add_train_args(p: argparse.ArgumentParser, train_split: str, val_split: str, batch_size: int, lr: float,
                   weight_decay: float, eval_help: str, eval_default: int, ckpt_help: str, ckpt_default: int,
                   layout: str) -> None:
    """The options every dense training command has (the recipe's values as defaults)."""
    p.add_argument('--data-dir', required=True, metavar='DIR', help=f'{layout} folder')
    p.add_argument('--train-split', default=train_split, metavar='NAME')
    p.add_argument('--val-split', default=val_split, metavar='NAME')
    p.add_argument('--output', required=True, metavar='DIR', help='run directory')
    p.add_argument('--pretrained-path', default='', metavar='FILE',
                   help='ImageNet weights of the backbone (overlock_*_in1k_224.pth), as the released models began')
    p.add_argument('--finetune', default='', metavar='FILE', help='start from a whole model\'s weights instead')
    p.add_argument('--resume', default='', metavar='FILE',
                   help='continue a run (its last.pth; "auto": OUTPUT/last.pth)')
    p.add_argument('-b', '--batch-size', type=int, default=batch_size, metavar='N',
                   help=f'images per process (recipe: {batch_size} x 8)')
    p.add_argument('--lr', type=float, default=lr)
    p.add_argument('--weight-decay', type=float, default=weight_decay)
    p.add_argument('--drop-path', type=float, default=None, metavar='P', help='default: the recipe\'s per variant')
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--eval-interval', type=int, default=eval_default, metavar='N', help=eval_help)
    p.add_argument('--ckpt-interval', type=int, default=ckpt_default, metavar='N', help=ckpt_help)
    p.add_argument('--log-interval', type=int, default=50, metavar='N')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    p.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=None, help=argparse.SUPPRESS)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be >= 1')


def build_model(args: argparse.Namespace, create: Callable, task: str, load: bool = True) -> torch.nn.Module:
    """The model of ``--model`` / ``--model-kwargs`` / ``--drop-path`` (``create(name, num_classes=, **kwargs)``),
    its ``--checkpoint`` loaded (the file must hold a ``task`` model), in deploy form with ``--reparam``."""
    from models.dense import load_dense_checkpoint
    kwargs = parse_kwargs(args.model_kwargs)
    if getattr(args, 'drop_path', None) is not None:
        kwargs['drop_path_rate'] = args.drop_path
    try:
        model = create(args.model, num_classes=args.num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f'--model {args.model} with {kwargs}: {e}') from None
    if load and args.checkpoint:
        meta = load_dense_checkpoint(model, args.checkpoint, task)
        logging.getLogger(task).info('Loaded %s%s', args.checkpoint,
                                     f' (iteration {meta["iter"]})' if 'iter' in meta else '')
    if args.reparam:
        model.reparameterize()
    return model


def train_main(args: argparse.Namespace, create: Callable, task: str, trainer: Callable,
               describe: Callable[[object], str]) -> int:
    """The training command: the run directory and ``--resume`` checked, the processes joined (torchrun), the
    model built and started from ``--pretrained-path`` (its backbone) or ``--finetune`` (all of it), then
    ``trainer(args, info, model)`` resumed and run. ``describe(run)`` says how long the run is."""
    from models.dense import load_backbone_weights, load_dense_checkpoint
    from .dense_train import LAST
    from .distributed import cleanup, init_distributed
    from .train_setup import remove_log_handlers, seed_all, setup_logging
    logger = logging.getLogger(task)
    if args.finetune and args.pretrained_path:
        raise UsageError('--finetune and --pretrained-path both give the starting weights; pass only one')
    if args.resume == 'auto':
        last = os.path.join(args.output, LAST)
        args.resume = last if os.path.isfile(last) else ''
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError(f'--resume {args.resume} does not exist')
    if not args.resume and os.path.isfile(os.path.join(args.output, LAST)):
        raise UsageError(f'--output {args.output} holds another run; pass --resume auto to continue it, or another '
                         f'--output')
    info = init_distributed(args.device, args.local_rank)
    try:
        seed_all(args.seed + info.rank)
        if info.is_main:
            os.makedirs(args.output, exist_ok=True)
        setup_logging(info, os.path.join(args.output, 'log.txt') if info.is_main else None)
        apply_na2d_backend(args.na2d_backend, info.device)
        model = build_model(args, create, task, load=False)
        body = getattr(model.backbone, 'body', model.backbone)
        if args.pretrained_path:
            load_backbone_weights(body, args.pretrained_path)
        elif args.finetune:
            load_dense_checkpoint(model, args.finetune, task)
        elif not args.resume:
            logger.warning('No --pretrained-path: the backbone starts from random weights (the recipe starts '
                           'from the ImageNet weights)')
        run = trainer(args, info, model)
        if args.resume:
            run.restore(args.resume)
        logger.info('Output %s | %d process(es) x batch %d | %s', args.output, info.world_size, args.batch_size,
                    describe(run))
        return run.run()
    finally:
        cleanup()
        remove_log_handlers()

