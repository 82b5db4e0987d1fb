"""train.py's options (timm-style names), their checks, and the effective config written to ``args.yaml``.

Defaults are the original OverLoCK train.py's (AdamW, cosine 300 + 10 epochs, RandAugment m9, random erasing 0.25,
mixup 0.8 / cutmix 1.0, smoothing 0.1, SyncBN), so its command lines train as they did; ``configs/`` hold the
whole recipe per variant.
"""
import argparse
import math
import os
from typing import Any, Dict, List, Optional

import yaml

from .checkpoint import BEST_EMA_FILE, BEST_FILE, EMA_FOLDER, LAST_FILE, RECOVERY_FILE, is_epoch_file
from .cli import UsageError, add_model_args, add_na2d_backend_arg

__all__ = ['build_train_parser', 'check_train_args', 'args_to_yaml', 'RUN_FILES', 'STALE_FILES', 'run_files_in']

# Files that mark a directory as holding a run that made progress (refused as --output unless --resume or
# --overwrite). A run that stopped before its first checkpoint leaves only STALE_FILES, which a new run replaces.
RUN_FILES = (LAST_FILE, RECOVERY_FILE, BEST_FILE, BEST_EMA_FILE, 'summary.csv', EMA_FOLDER)
STALE_FILES = ('args.yaml', 'log.txt', 'curves.png')


def _float_or_none(value: str) -> Optional[float]:
    return None if value.lower() in ('none', 'null', '') else float(value)


def _str_or_none(value: str) -> Optional[str]:
    return None if value.lower() in ('none', 'null', '') else value


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Train OverLoCK (or any timm model) on an ImageFolder dataset. A -c/--config YAML file '
                    'sets the defaults; the command line wins.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    group = parser.add_argument_group('Data')
    group.add_argument('--data-dir', default='', metavar='DIR',
                       help='dataset root holding train/ and val/ (or validation/) class folders (or '
                            'train.tar / val.tar); with wds/: the shards\' folder; with hfds/: the cache folder')
    group.add_argument('--dataset', default='', metavar='NAME',
                       help='empty: image folders (or tar files) in --data-dir; wds/NAME: webdataset shards, '
                            'hfds/NAME: a Hugging Face dataset, through timm\'s dataset factory (docs/training.md)')
    group.add_argument('--train-split', default='train', metavar='NAME',
                       help='training split (folder inside --data-dir, or the wds/hfds split name)')
    group.add_argument('--val-split', default='val', metavar='NAME',
                       help='validation split (val also finds validation/)')
    group.add_argument('--class-map', default='', metavar='FILE',
                       help='class name -> index file (one name per line, or name index) for tar, wds and hfds')
    group.add_argument('-b', '--batch-size', default=128, type=int, metavar='N', help='batch size per process')
    group.add_argument('--global-batch-size', default=None, type=int, metavar='N',
                       help='total batch over processes and accumulation steps; sets -b (must divide evenly)')
    group.add_argument('-vb', '--validation-batch-size', default=None, type=int, metavar='N',
                       help='validation batch size per process; None: -b')
    group.add_argument('-j', '--workers', default=8, type=int, metavar='N', help='data loading processes per GPU')
    group.add_argument('--persistent-workers', action=argparse.BooleanOptionalAction, default=True,
                       help='keep loader workers across epochs (as the original) instead of starting them anew')
    group.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=False,
                       help='pin CPU memory of batches')
    group.add_argument('--skip-corrupt', action=argparse.BooleanOptionalAction, default=False,
                       help='log and skip unreadable images instead of stopping')

    add_model_args(parser)
    group = parser.add_argument_group('Model extras')
    group.add_argument('--finetune', default='', metavar='PATH',
                       help='start from these weights only (heads re-initialised when --num-classes differs)')
    group.add_argument('--finetune-ema', action=argparse.BooleanOptionalAction, default=False,
                       help='with --finetune: take the EMA weights of the file')
    group.add_argument('--drop', default=None, type=float, metavar='P', help='dropout before the classifier')
    group.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=True,
                       help='SyncBatchNorm when training on several GPUs (the original\'s default)')
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False,
                       help='channels-last memory layout')
    group.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                       help='torch.compile the model')
    add_na2d_backend_arg(group)
    group.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False,
                       help='keep an EMA of the weights and validate it every epoch')
    group.add_argument('--model-ema-decay', default=0.9999, type=float, metavar='D', help='EMA decay')
    group.add_argument('--model-ema-warmup', action=argparse.BooleanOptionalAction, default=False,
                       help='EMA decay warm-up')

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='adamw', metavar='NAME', help='timm optimizer name')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPS', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', default=0.9, type=float, metavar='M', help='SGD momentum')
    group.add_argument('--weight-decay', default=0.05, type=float, metavar='WD', help='weight decay')
    group.add_argument('--layer-decay', default=None, type=float, metavar='R', help='layer-wise lr decay')
    group.add_argument('--clip-grad', default=None, type=_float_or_none, metavar='NORM',
                       help='clip gradients (norm by default); none to disable')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'), help='gradient clipping mode')
    group.add_argument('--grad-accum-steps', default=1, type=int, metavar='N',
                       help='accumulate gradients over N batches per optimizer step')

    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', default='cosine', metavar='NAME', help='timm scheduler')
    group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=False,
                       help='step the schedule every optimizer update instead of every epoch')
    group.add_argument('--lr', default=None, type=_float_or_none, metavar='LR',
                       help='learning rate; None: --lr-base, scaled by the global batch with --auto-lr')
    group.add_argument('--auto-lr', action=argparse.BooleanOptionalAction, default=False,
                       help='lr = --lr-base x global batch / --lr-base-size; as in the original, --lr is then '
                            'not used')
    group.add_argument('--lr-base', default=1e-3, type=float, metavar='LR', help='base lr for --auto-lr')
    group.add_argument('--lr-base-size', default=1024, type=int, metavar='N', help='batch of --lr-base')
    group.add_argument('--epochs', default=300, type=int, metavar='N', help='epochs (cool-down comes on top)')
    group.add_argument('--warmup-epochs', default=5, type=int, metavar='N', help='linear warm-up epochs')
    group.add_argument('--warmup-lr', default=1e-6, type=float, metavar='LR', help='lr at the start of warm-up')
    group.add_argument('--warmup-prefix', action=argparse.BooleanOptionalAction, default=False,
                       help='warm-up epochs come before the decay instead of overlapping it')
    group.add_argument('--min-lr', default=1e-5, type=float, metavar='LR', help='lower bound of the schedule')
    group.add_argument('--cooldown-epochs', default=10, type=int, metavar='N', help='epochs at --min-lr at the end')
    group.add_argument('--decay-epochs', default=90, type=float, metavar='N', help='step schedule period')
    group.add_argument('--decay-rate', default=0.1, type=float, metavar='R', help='step schedule factor')

    group = parser.add_argument_group('Augmentation and regularisation')
    group.add_argument('--no-aug', action='store_true', default=False, help='no training augmentation')
    group.add_argument('--scale', default=[0.08, 1.0], type=float, nargs=2, metavar='S',
                       help='random-resized-crop scale')
    group.add_argument('--ratio', default=[3. / 4., 4. / 3.], type=float, nargs=2, metavar='R',
                       help='random-resized-crop aspect ratio')
    group.add_argument('--hflip', default=0.5, type=float, metavar='P', help='horizontal flip probability')
    group.add_argument('--vflip', default=0., type=float, metavar='P', help='vertical flip probability')
    group.add_argument('--color-jitter', default=0.4, type=float, metavar='S',
                       help='colour jitter (timm leaves it out when --aa is set)')
    group.add_argument('--aa', default='rand-m9-mstd0.5-inc1', type=_str_or_none, metavar='POLICY',
                       help='auto-augment policy (none: off)')
    group.add_argument('--reprob', default=0.25, type=float, metavar='P', help='random erasing probability')
    group.add_argument('--remode', default='pixel', metavar='MODE', help='random erasing mode')
    group.add_argument('--recount', default=1, type=int, metavar='N', help='random erasing count')
    group.add_argument('--mixup', default=0.8, type=float, metavar='A', help='mixup alpha (0: off)')
    group.add_argument('--cutmix', default=1.0, type=float, metavar='A', help='cutmix alpha (0: off)')
    group.add_argument('--cutmix-minmax', default=None, type=float, nargs=2, metavar='R', help='cutmix ratio range')
    group.add_argument('--mixup-prob', default=1.0, type=float, metavar='P', help='probability of mixup/cutmix')
    group.add_argument('--mixup-switch-prob', default=0.5, type=float, metavar='P',
                       help='probability of cutmix instead of mixup when both are on')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='mixup mode')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='turn mixup off from this epoch')
    group.add_argument('--smoothing', default=0.1, type=float, metavar='S', help='label smoothing')
    group.add_argument('--train-interpolation', default='random', metavar='NAME', help='training resize interpolation')
    group.add_argument('--interpolation', default=None, metavar='NAME', help='validation resize interpolation')
    group.add_argument('--crop-pct', default=None, type=float, metavar='P', help='validation centre-crop fraction')
    group.add_argument('--mean', default=None, type=float, nargs='+', metavar='M', help='normalisation mean')
    group.add_argument('--std', default=None, type=float, nargs='+', metavar='S', help='normalisation std')
    group.add_argument('--aux-loss-ratio', default=0.4, type=float, metavar='R',
                       help='loss = main + R x aux when the model returns both')

    group = parser.add_argument_group('Run')
    group.add_argument('--output', default='', metavar='DIR',
                       help='run directory; empty: the --resume file\'s folder, or output/train/<model>-<time>')
    group.add_argument('--overwrite', action='store_true', default=False,
                       help='replace a previous run in --output')
    group.add_argument('--resume', default='', metavar='PATH',
                       help='continue a run from its checkpoint (last.pth, recovery.pth, or the original '
                            'release\'s last.pth.tar); "auto": the newer of OUTPUT/last.pth and OUTPUT/recovery.pth '
                            'when one exists')
    group.add_argument('--recovery-interval', default=0, type=int, metavar='N',
                       help='also write recovery.pth every N optimizer updates (0: only at epoch ends and on '
                            'preemption); --resume auto takes the newer of last.pth and recovery.pth')
    group.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''),
                       help='after each epoch, make BatchNorm statistics equal on all processes: reduce averages '
                            'them, broadcast copies rank 0\'s, "" leaves them (as the original; no-op with SyncBN)')
    group.add_argument('--checkpoint-hist', default=3, type=int, metavar='K',
                       help='best checkpoints to keep (and as many by EMA top-1 with --model-ema)')
    group.add_argument('--eval-metric', default='top1', choices=('top1', 'ema_top1'),
                       help='metric that ranks the best checkpoints')
    group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False, help='mixed precision')
    group.add_argument('--native-amp', dest='amp', action='store_true',
                       help='the original train.py\'s spelling of --amp (torch AMP, float16 with a loss scaler)')
    group.add_argument('--apex-amp', action='store_true', default=False, help=argparse.SUPPRESS)
    group.add_argument('--amp-dtype', default='float16', choices=('bfloat16', 'float16'),
                       help='mixed precision type (float16 uses a loss scaler, as the original; bfloat16 needs none)')
    group.add_argument('--local-rank', '--local_rank', dest='local_rank', default=None, type=int,
                       help=argparse.SUPPRESS)  # passed by python -m torch.distributed.launch; LOCAL_RANK wins
    group.add_argument('--device', default=None, metavar='DEV', help='cuda or cpu; None: cuda when available')
    group.add_argument('--seed', default=42, type=int, metavar='S', help='random seed')
    group.add_argument('--log-interval', default=50, type=int, metavar='N', help='optimizer updates between log lines')
    group.add_argument('--skip-nonfinite', action=argparse.BooleanOptionalAction, default=False,
                       help='skip optimizer steps with a non-finite loss (counted) instead of stopping, also '
                            'without a loss scaler')
    group.add_argument('--nonfinite-limit', default=25, type=int, metavar='N',
                       help='while steps with a non-finite loss are skipped (float16 loss scaler, or '
                            '--skip-nonfinite), stop after N consecutive ones; 0: never stop')
    group.add_argument('--deterministic', action=argparse.BooleanOptionalAction, default=False,
                       help='deterministic algorithms (slower on GPU)')
    return parser


def _fail(flag: str, msg: str) -> None:
    raise UsageError(f'{flag} {msg}')


def check_train_args(args: argparse.Namespace) -> None:
    """Reject values that cannot work, before anything heavy runs."""
    if args.batch_size is None or args.batch_size < 1:
        _fail('-b/--batch-size', f'must be >= 1, got {args.batch_size}')
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        _fail('--validation-batch-size', f'must be >= 1, got {args.validation_batch_size}')
    if args.grad_accum_steps < 1:
        _fail('--grad-accum-steps', f'must be >= 1, got {args.grad_accum_steps}')
    if args.workers < 0:
        _fail('-j/--workers', f'must be >= 0, got {args.workers}')
    if args.epochs < 1:
        _fail('--epochs', f'must be >= 1, got {args.epochs}')
    for flag, value in (('--warmup-epochs', args.warmup_epochs), ('--cooldown-epochs', args.cooldown_epochs),
                        ('--aux-loss-ratio', args.aux_loss_ratio), ('--weight-decay', args.weight_decay),
                        ('--checkpoint-hist', args.checkpoint_hist), ('--mixup', args.mixup),
                        ('--cutmix', args.cutmix), ('--smoothing', args.smoothing), ('--reprob', args.reprob)):
        if value < 0:
            _fail(flag, f'must be >= 0, got {value}')
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        _fail('--lr', f'must be a positive number, got {args.lr}')
    if args.log_interval < 1:
        _fail('--log-interval', f'must be >= 1, got {args.log_interval}')
    if args.img_size is not None and args.img_size < 1:
        _fail('--img-size', f'must be >= 1, got {args.img_size}')
    if args.resume and args.finetune:
        raise UsageError('--resume continues a run, --finetune starts a new one from weights; pass only one')
    if args.eval_metric == 'ema_top1' and not args.model_ema:
        _fail('--eval-metric ema_top1', 'needs --model-ema')
    if args.apex_amp:
        raise UsageError('--apex-amp: NVIDIA Apex is not supported; --native-amp (or --amp) gives the same float16 '
                         'mixed precision with torch\'s loss scaler')
    if args.recovery_interval < 0:
        _fail('--recovery-interval', f'must be >= 0, got {args.recovery_interval}')
    if args.nonfinite_limit < 0:
        _fail('--nonfinite-limit', f'must be >= 0, got {args.nonfinite_limit}')
    if args.ckpt_stg is not None:
        if len(args.ckpt_stg) != 4 or any(n < 0 for n in args.ckpt_stg):
            _fail('--ckpt-stg', f'needs 4 numbers >= 0 (blocks per stage), got {" ".join(map(str, args.ckpt_stg))}')
        if any(args.ckpt_stg) and not args.grad_checkpoint:
            args.grad_checkpoint = True  # the stage counts only mean something under checkpointing
    if not args.data_dir and not args.dataset.lower().startswith('hfds/'):
        raise UsageError('--data-dir is required (a folder holding train/ and val/ class folders)')
    if args.dataset and args.dataset.split('/')[0].lower() not in ('wds', 'hfds'):
        raise UsageError(f'--dataset {args.dataset}: use wds/NAME (webdataset shards) or hfds/NAME (a Hugging Face '
                         f'dataset); image folders and tar files need no --dataset')


def run_files_in(folder: str) -> List[str]:
    """The run files and folders already in ``folder`` (see RUN_FILES, plus checkpoint-*.pth)."""
    if not os.path.isdir(folder):
        return []
    names = set(os.listdir(folder))
    found = [n for n in RUN_FILES if n in names]  # EMA_FOLDER is a folder
    found += sorted(n for n in names if is_epoch_file(n))
    return found


def args_to_yaml(args: Dict[str, Any]) -> str:
    """The effective configuration as YAML (loadable again with -c)."""
    return yaml.safe_dump(args, default_flow_style=None, sort_keys=False)
