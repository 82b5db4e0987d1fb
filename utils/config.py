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
from .distributed import DEFAULT_DIST_TIMEOUT

__all__ = ['build_train_parser', 'check_train_args', 'args_to_yaml', 'RUN_FILES', 'STALE_FILES', 'run_files_in',
           'NO_EFFECT_OPTIONS', 'no_effect_options_set']

# Files that mark a directory as holding a run that made progress (refused as --output unless --resume or
# --overwrite). A run that stopped before its first checkpoint leaves only STALE_FILES, which a new run replaces.
# The --dataset prefixes that go through timm's dataset factory.
DATASET_PREFIXES = ('wds', 'hfds', 'torch', 'tfds')

RUN_FILES = (LAST_FILE, RECOVERY_FILE, BEST_FILE, BEST_EMA_FILE, 'summary.csv', EMA_FOLDER)
STALE_FILES = ('args.yaml', 'log.txt', 'curves.png')


# Options the original train.py defines but never reads (it passes none of them to the model or the loop):
# accepted so that its command lines run, and one log line each says that it has no effect when it is set.
NO_EFFECT_OPTIONS = {
    '--initial-checkpoint': (str, 'never loaded by the original; --finetune FILE, or --pretrained --pretrained-path '
                                  'FILE, starts from a file\'s weights'),
    '--gp': (str, 'the pooling is not passed to the model (OverLoCK pools by average)'),
    '--bn-tf': (bool, 'BatchNorm overrides are not passed to the model'),
    '--bn-momentum': (float, 'BatchNorm overrides are not passed to the model'),
    '--bn-eps': (float, 'BatchNorm overrides are not passed to the model'),
    '--drop-block': (float, 'not passed to the model (OverLoCK has no DropBlock layers)'),
    '--drop-connect': (float, 'not passed to the model; --drop-path sets the stochastic depth'),
    '--checkpoint-freq': (int, 'never read; the --checkpoint-hist best epochs are kept'),
}


def no_effect_options_set(args: argparse.Namespace) -> List[str]:
    """One line for each option of :data:`NO_EFFECT_OPTIONS` that ``args`` sets."""
    lines = []
    for flag, (_, why) in NO_EFFECT_OPTIONS.items():
        value = getattr(args, flag.lstrip('-').replace('-', '_'))
        if value not in (None, False):
            lines.append(f'{flag} {value if value is not True else ""}'.rstrip() + f' has no effect: {why}')
    return lines


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
    group.add_argument('--dataset', '-d', default='', metavar='NAME',
                       help='empty: image folders (or tar files) in --data-dir; wds/NAME: webdataset shards, '
                            'hfds/NAME: a Hugging Face dataset, torch/NAME: a torchvision dataset, tfds/NAME: a '
                            'TensorFlow dataset, through timm\'s dataset factory (docs/training.md)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='let torch/ and tfds/ datasets download themselves into --data-dir')
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
    group.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=True,
                       help='pin the CPU memory of batches bound for a GPU (as the original; --no-pin-mem: off)')
    group.add_argument('--skip-corrupt', action=argparse.BooleanOptionalAction, default=False,
                       help='log and skip unreadable images instead of stopping')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='normalise and randomly erase each image in the loader workers (float batches), mix on '
                            'the device; default: uint8 batches, normalised, mixed and erased on the device')
    group.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                       help='keep the loader workers across epochs (what --persistent-workers does; on by default)')
    group.add_argument('--worker-seeding', default='all', choices=('all', 'part'),
                       help='all: seed python, numpy and torch in each loader worker every epoch; part: leave numpy '
                            'to torch\'s own worker seeding (as timm\'s "part")')
    group.add_argument('--epoch-repeats', default=0., type=float, metavar='R',
                       help='one epoch passes over the training set R times (0: once)')
    group.add_argument('--aug-repeats', default=0, type=int, metavar='N',
                       help='repeated augmentation: each image N times per epoch, the copies spread over processes '
                            '(timm\'s RepeatAugSampler); 0: off')
    group.add_argument('--aug-splits', default=0, type=int, metavar='N',
                       help='AugMix-style splits: each image as a clean copy and N-1 augmented ones (N >= 2; 0: off)')
    group.add_argument('--resplit', action='store_true', default=False,
                       help='with --aug-splits: leave the first (clean) split unerased by --reprob')

    add_model_args(parser)
    group = parser.add_argument_group('Model extras')
    group.add_argument('--input-size', default=None, type=int, nargs=3, metavar='N',
                       help='input channels, height and width (e.g. 3 384 384); wins over --img-size')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from the published weights (heads re-initialised for another --num-classes)')
    group.add_argument('--pretrained-path', default='', metavar='FILE',
                       help='with --pretrained: a local file of those weights instead of the download')
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
    group.add_argument('--torchscript', action='store_true', default=False,
                       help='train the TorchScript (torch.jit.script) form of the model')
    group.add_argument('--split-bn', action='store_true', default=False,
                       help='separate BatchNorm statistics per augmentation split (needs --aug-splits or --resplit)')
    add_na2d_backend_arg(group)
    group.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False,
                       help='keep an EMA of the weights and validate it every epoch')
    group.add_argument('--model-ema-decay', default=0.99984, type=float, metavar='D',
                       help='EMA decay (the recipe: 0.9999)')
    group.add_argument('--model-ema-warmup', action=argparse.BooleanOptionalAction, default=False,
                       help='EMA decay warm-up (timm\'s ModelEmaV3); off: the set decay from the first update, as '
                            'the original')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on the CPU (no GPU memory); it is then saved but not evaluated')

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
    group.add_argument('--decay-rate', '--dr', default=0.1, type=float, metavar='R',
                       help='step / plateau factor (poly: the power)')
    group.add_argument('--patience-epochs', default=10, type=int, metavar='N',
                       help='plateau schedule: epochs without improvement before the lr decays')
    group.add_argument('--lr-noise', default=None, type=float, nargs='+', metavar='PCT',
                       help='lr noise from (and until) these fractions of --epochs')
    group.add_argument('--lr-noise-pct', default=0.67, type=float, metavar='P', help='lr noise limit (fraction)')
    group.add_argument('--lr-noise-std', default=1.0, type=float, metavar='S', help='lr noise standard deviation')
    group.add_argument('--lr-cycle-mul', default=1.0, type=float, metavar='M', help='cycle length multiplier')
    group.add_argument('--lr-cycle-decay', default=0.5, type=float, metavar='D', help='lr factor of each new cycle')
    group.add_argument('--lr-cycle-limit', default=1, type=int, metavar='N', help='cycles (restarts when > 1)')
    group.add_argument('--lr-k-decay', default=1.0, type=float, metavar='K', help='k-decay of cosine / poly')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='start (or resume) at epoch N (0-based), the schedule stepped to it')

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
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help='binary cross-entropy (timm\'s BinaryCrossEntropy) instead of softmax cross-entropy')
    group.add_argument('--bce-target-thresh', default=None, type=float, metavar='T',
                       help='with --bce-loss: binarise the (smoothed or mixed) targets at T')
    group.add_argument('--jsd-loss', action='store_true', default=False,
                       help='Jensen-Shannon divergence + cross-entropy over the --aug-splits (AugMix)')

    group = parser.add_argument_group('Run')
    group.add_argument('--output', default='', metavar='DIR',
                       help='run directory; empty: the --resume file\'s folder, or output/train/<model>-<time>')
    group.add_argument('--experiment', default='', metavar='NAME',
                       help='the run directory is OUTPUT/NAME (OUTPUT: --output, or output/train)')
    group.add_argument('--overwrite', action='store_true', default=False,
                       help='replace a previous run in --output')
    group.add_argument('--resume', default='', metavar='PATH',
                       help='continue a run from its checkpoint (last.pth, recovery.pth, or the original '
                            'release\'s last.pth.tar); "auto": the newer of OUTPUT/last.pth and OUTPUT/recovery.pth '
                            'when one exists')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='with --resume: the weights (and EMA) only; the optimizer and loss scaler start afresh')
    group.add_argument('--recovery-interval', default=0, type=int, metavar='N',
                       help='also write recovery.pth every N optimizer updates (0: only at epoch ends and on '
                            'preemption); --resume auto takes the newer of last.pth and recovery.pth')
    group.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''),
                       help='after each epoch, make BatchNorm statistics equal on all processes: reduce averages '
                            'them, broadcast copies rank 0\'s, "" leaves them (as the original; no-op with SyncBN)')
    group.add_argument('--checkpoint-hist', default=3, type=int, metavar='K',
                       help='best checkpoints to keep (and as many of the EMA by its metric with --model-ema)')
    group.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss', 'ema_top1'),
                       help='metric that ranks the best checkpoints (loss: lower is better; the EMA\'s are ranked '
                            'by its own value of the same metric; ema_top1: the EMA\'s top-1 ranks both)')
    group.add_argument('--val-freq', default=1, type=int, metavar='N',
                       help='evaluate after epochs whose 0-based index is a multiple of N, ...')
    group.add_argument('--val-start-epoch', default=0, type=int, metavar='N',
                       help='... and after every epoch past N (0-based; as the original: with 0, every epoch); '
                            'the first epoch of a resumed run is always evaluated')
    group.add_argument('--tta', default=0, type=int, metavar='N',
                       help='test-time augmentation of the per-epoch evaluation: 2 averages each image\'s logits '
                            'with those of its mirror image; 0 or 1: off')
    group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False, help='mixed precision')
    group.add_argument('--native-amp', dest='amp', action='store_true',
                       help='the original train.py\'s spelling of --amp (torch AMP, float16 with a loss scaler)')
    group.add_argument('--apex-amp', action='store_true', default=False,
                       help='the original\'s NVIDIA Apex AMP: torch\'s native float16 AMP with a loss scaler here')
    group.add_argument('--amp-dtype', default='float16', choices=('bfloat16', 'float16'),
                       help='mixed precision type (float16 uses a loss scaler, as the original; bfloat16 needs none)')
    group.add_argument('--local-rank', '--local_rank', dest='local_rank', default=None, type=int,
                       help=argparse.SUPPRESS)  # passed by python -m torch.distributed.launch; LOCAL_RANK wins
    group.add_argument('--dist_url', '--dist-url', dest='dist_url', default='env://', metavar='URL',
                       help='process group init method (env:// reads MASTER_ADDR/PORT as torchrun sets them; '
                            'tcp://HOST:PORT or file:///PATH)')
    group.add_argument('--dist-timeout', default=DEFAULT_DIST_TIMEOUT, type=float, metavar='S',
                       help='seconds a collective (or forming the process group) may wait for a peer before failing')
    group.add_argument('--stop-timeout', default=20.0, type=float, metavar='S',
                       help='after SIGTERM, the seconds the save-and-exit may take; past them the stacks are dumped '
                            'and the process exits (a dead peer blocks the save; below torchrun\'s 30 s grace)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='DistributedDataParallel without broadcasting buffers from rank 0 every forward')
    group.add_argument('--gpu-limit', default=1.0, type=float, metavar='F',
                       help='cap this process at fraction F of the GPU\'s memory (1: no cap)')
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
    group.add_argument('--debug-loss', action='store_true', default=False,
                       help='autograd anomaly detection in forward and backward (slow; names the op that made a NaN)')
    group.add_argument('--save-images', action='store_true', default=False,
                       help='write each logged training batch (as the model sees it) to OUTPUT/train-batch-N.jpg')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='log the per-epoch metrics to Weights & Biases (project: --experiment)')

    group = parser.add_argument_group(
        'Accepted for the original\'s command lines, without effect (as there: its train.py never reads them)')
    for flag, (kind, why) in NO_EFFECT_OPTIONS.items():
        if kind is bool:
            group.add_argument(flag, action='store_true', default=False, help=why)
        else:
            group.add_argument(flag, default=None, type=kind, metavar='V', help=why)
    return parser


def _fail(flag: str, msg: str) -> None:
    raise UsageError(f'{flag} {msg}')


def check_train_args(args: argparse.Namespace) -> List[str]:
    """Reject values and combinations that cannot work, before anything heavy runs (one line naming the
    options). Returns lines for the log: options taken in another spelling, options without effect."""
    notes = no_effect_options_set(args)
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
                        ('--cutmix', args.cutmix), ('--smoothing', args.smoothing), ('--reprob', args.reprob),
                        ('--epoch-repeats', args.epoch_repeats), ('--aug-repeats', args.aug_repeats),
                        ('--aug-splits', args.aug_splits), ('--val-start-epoch', args.val_start_epoch),
                        ('--tta', args.tta), ('--patience-epochs', args.patience_epochs)):
        if value < 0:
            _fail(flag, f'must be >= 0, got {value}')
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        _fail('--lr', f'must be a positive number, got {args.lr}')
    if args.log_interval < 1:
        _fail('--log-interval', f'must be >= 1, got {args.log_interval}')
    if args.img_size is not None and args.img_size < 1:
        _fail('--img-size', f'must be >= 1, got {args.img_size}')
    if args.input_size is not None and min(args.input_size) < 1:
        _fail('--input-size', f'needs 3 numbers >= 1 (channels height width), got '
                              f'{" ".join(map(str, args.input_size))}')
    if args.resume and args.finetune:
        raise UsageError('--resume continues a run, --finetune starts a new one from weights; pass only one')
    if args.pretrained and (args.resume or args.finetune):
        raise UsageError(f'--pretrained and {"--resume" if args.resume else "--finetune"}: both give the starting '
                         f'weights; pass only one')
    if args.pretrained_path and not args.pretrained:
        _fail('--pretrained-path', 'is the file of --pretrained; add --pretrained')
    if args.no_resume_opt and not args.resume:
        _fail('--no-resume-opt', 'only applies with --resume')
    if args.start_epoch is not None and args.start_epoch < 0:
        _fail('--start-epoch', f'must be >= 0, got {args.start_epoch}')
    if args.eval_metric == 'ema_top1' and not args.model_ema:
        _fail('--eval-metric ema_top1', 'needs --model-ema')
    if args.eval_metric == 'ema_top1' and args.model_ema_force_cpu:
        raise UsageError('--eval-metric ema_top1 and --model-ema-force-cpu: an EMA kept on the CPU is not evaluated; '
                         'pass only one')
    if args.model_ema_force_cpu and not args.model_ema:
        _fail('--model-ema-force-cpu', 'needs --model-ema')
    if args.apex_amp:
        args.amp, args.amp_dtype = True, 'float16'
        notes.append('--apex-amp: NVIDIA Apex is not used; torch\'s native float16 AMP with a loss scaler stands in '
                     'for it (the same mixed precision)')
    if args.use_multi_epochs_loader:
        args.persistent_workers = True
        notes.append('--use-multi-epochs-loader: the loader workers are kept across epochs (--persistent-workers)')
    if args.recovery_interval < 0:
        _fail('--recovery-interval', f'must be >= 0, got {args.recovery_interval}')
    if args.nonfinite_limit < 0:
        _fail('--nonfinite-limit', f'must be >= 0, got {args.nonfinite_limit}')
    if args.dist_timeout <= 0 or args.stop_timeout <= 0:
        _fail('--dist-timeout/--stop-timeout', 'must be > 0 seconds')
    if args.val_freq < 1:
        _fail('--val-freq', f'must be >= 1, got {args.val_freq}')
    if args.tta > 2:
        _fail(f'--tta {args.tta}', 'is not defined here: --tta 2 averages the logits of each image and its mirror '
                                   'image (0 or 1: off)')
    if not 0 < args.gpu_limit <= 1:
        _fail('--gpu-limit', f'is a fraction of the GPU memory in (0, 1], got {args.gpu_limit}')
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if args.aug_splits == 1:
        _fail('--aug-splits 1', 'makes no sense: one split is the clean image alone; use 2 or more (0: off)')
    if args.aug_splits and mixing:
        raise UsageError(f'--aug-splits {args.aug_splits} and --mixup/--cutmix: mixing would blend the clean and '
                         f'augmented copies of the splits; pass --mixup 0 --cutmix 0 (as the original requires)')
    if args.aug_splits and args.no_aug:
        raise UsageError(f'--aug-splits {args.aug_splits} and --no-aug: the augmented splits need augmentation; '
                         f'pass only one')
    if args.jsd_loss and args.aug_splits < 2:
        _fail('--jsd-loss', 'compares the augmentation splits: it needs --aug-splits 2 or more')
    if args.jsd_loss and args.bce_loss:
        raise UsageError('--jsd-loss and --bce-loss are two different losses; pass only one')
    if args.split_bn and not (args.aug_splits > 1 or args.resplit):
        _fail('--split-bn', 'needs --aug-splits 2 or more (or --resplit)')
    if args.bce_target_thresh is not None and not args.bce_loss:
        _fail('--bce-target-thresh', 'applies to --bce-loss; add it')
    if args.aug_repeats and args.epoch_repeats:
        raise UsageError(f'--aug-repeats {args.aug_repeats} and --epoch-repeats {args.epoch_repeats:g}: pass only '
                         f'one (each sets how often an image comes per epoch)')
    if args.torchscript and args.compile:
        raise UsageError('--torchscript and --compile are two ways of compiling the model; pass only one')
    if args.ckpt_stg is not None:
        if len(args.ckpt_stg) != 4 or any(n < 0 for n in args.ckpt_stg):
            _fail('--ckpt-stg', f'needs 4 numbers >= 0 (blocks per stage), got {" ".join(map(str, args.ckpt_stg))}')
        if any(args.ckpt_stg) and not args.grad_checkpoint:
            args.grad_checkpoint = True  # the stage counts only mean something under checkpointing
    if args.torchscript and args.grad_checkpoint:
        raise UsageError('--torchscript and --grad-checkpoint/--ckpt-stg: activation checkpointing does not run '
                         'in TorchScript; pass only one')
    if not args.data_dir and not args.dataset.lower().startswith('hfds/'):
        raise UsageError('--data-dir is required (a folder holding train/ and val/ class folders)')
    prefix = args.dataset.split('/')[0].lower() if args.dataset else ''
    if args.dataset and prefix not in DATASET_PREFIXES:
        raise UsageError(f'--dataset {args.dataset}: use wds/NAME (webdataset shards), hfds/NAME (a Hugging Face '
                         f'dataset), torch/NAME (torchvision) or tfds/NAME (TensorFlow datasets); image folders and '
                         f'tar files need no --dataset')
    streamed = prefix in ('wds', 'tfds')
    for flag, value in (('--aug-repeats', args.aug_repeats), ('--aug-splits', args.aug_splits)):
        if value and streamed:
            raise UsageError(f'{flag} {value} and --dataset {args.dataset}: a streamed dataset has no random access '
                             f'for it; use image folders, tar files or hfds/')
    if args.dataset_download and prefix not in ('torch', 'tfds'):
        notes.append(f'--dataset-download has no effect here: only torch/ and tfds/ datasets download '
                     f'(--dataset {args.dataset or "(image folders)"})')
    return notes


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
