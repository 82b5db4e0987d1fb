"""Every option of the original release's train.py and validate.py: each is accepted; each that has an effect
there has it here, checked on tiny data so that ignoring the option fails a test; the ones the original never
reads log that they have no effect.

The option names are those the original's argument parsers define, written out here (not read from its code).
Most acting options are probed on a built run (``Trainer.setup``: the real builders, no training): an
observable of the run with the option must differ from the run without it, and, where it says more, equal
what the option asks for. Options that act while training are probed on one short epoch, or in the end-to-end
tests further down.
"""
import copy
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import timm
import torch
from torch import nn

import validate
from tests.helpers import (
    FAST, TINY, TINY_KWARGS, load, make_image_folder, read_summary, run_inprocess, tiny_cli_kwargs,
)
from utils import train_setup as setup
from utils.cli import UsageError, parse_args_with_config
from utils.config import NO_EFFECT_OPTIONS, build_train_parser, check_train_args
from utils.distributed import DistInfo
from utils.train_loop import Trainer

# --- the original's option names, with a sample value for those that take one -------------------------------

ORIGINAL_TRAIN_OPTIONS: Dict[str, List[str]] = {
    '--data-dir': ['d'], '--dataset': [''], '-d': [''], '--train-split': ['train'], '--val-split': ['validation'],
    '--dataset-download': [], '--class-map': [''], '--model': ['overlock_xt'], '--pretrained': [],
    '--initial-checkpoint': ['x.pth'], '--resume': [''], '--finetune': [''], '--no-resume-opt': [],
    '--num-classes': ['10'], '--gp': ['avg'], '--img-size': ['64'], '--input-size': ['3', '64', '64'],
    '--crop-pct': ['0.9'], '--mean': ['0.5', '0.5', '0.5'], '--std': ['0.2', '0.2', '0.2'],
    '--interpolation': ['bilinear'], '-b': ['4'], '--batch-size': ['4'], '-vb': ['4'],
    '--validation-batch-size': ['4'], '--grad-checkpoint': [], '--ckpt-stg': ['1', '0', '0', '0'],
    '--val-freq': ['2'], '--val-start-epoch': ['3'], '--opt': ['sgd'], '--opt-eps': ['1e-6'],
    '--opt-betas': ['0.8', '0.9'], '--momentum': ['0.8'], '--weight-decay': ['0.01'], '--clip-grad': ['5'],
    '--clip-mode': ['value'], '--aux-loss-ratio': ['0.5'], '--sched': ['step'], '--lr': ['1e-3'], '--auto-lr': [],
    '--lr-noise': ['0.4', '0.9'], '--lr-noise-pct': ['0.5'], '--lr-noise-std': ['2'], '--lr-cycle-mul': ['2'],
    '--lr-cycle-decay': ['0.3'], '--lr-cycle-limit': ['2'], '--lr-k-decay': ['2'], '--warmup-lr': ['1e-5'],
    '--min-lr': ['1e-4'], '--epochs': ['3'], '--epoch-repeats': ['2'], '--start-epoch': ['1'],
    '--decay-epochs': ['1'], '--warmup-epochs': ['1'], '--cooldown-epochs': ['1'], '--patience-epochs': ['2'],
    '--decay-rate': ['0.5'], '--dr': ['0.5'], '--no-aug': [], '--scale': ['0.5', '1.0'], '--ratio': ['0.8', '1.2'],
    '--hflip': ['0.1'], '--vflip': ['0.2'], '--color-jitter': ['0.3'], '--aa': ['rand-m7-mstd0.5'],
    '--aug-repeats': ['3'], '--aug-splits': ['3'], '--jsd-loss': [], '--bce-loss': [], '--bce-target-thresh': ['0.2'],
    '--reprob': ['0.5'], '--remode': ['const'], '--recount': ['2'], '--resplit': [], '--mixup': ['0.5'],
    '--cutmix': ['0.5'], '--cutmix-minmax': ['0.2', '0.5'], '--mixup-prob': ['0.5'], '--mixup-switch-prob': ['0.3'],
    '--mixup-mode': ['elem'], '--mixup-off-epoch': ['2'], '--smoothing': ['0.2'], '--train-interpolation': ['bilinear'],
    '--drop': ['0.1'], '--drop-connect': ['0.1'], '--drop-path': ['0.1'], '--drop-block': ['0.1'], '--bn-tf': [],
    '--bn-momentum': ['0.01'], '--bn-eps': ['1e-3'], '--no-sync-bn': [], '--dist-bn': ['broadcast'],
    '--split-bn': [], '--model-ema': [], '--model-ema-force-cpu': [], '--model-ema-decay': ['0.99'],
    '--seed': ['1'], '--worker-seeding': ['part'], '--log-interval': ['10'], '--recovery-interval': ['5'],
    '--checkpoint-hist': ['2'], '--checkpoint-freq': ['10'], '-j': ['2'], '--workers': ['2'], '--save-images': [],
    '--amp': [], '--apex-amp': [], '--native-amp': [], '--compile': [], '--debug-loss': [], '--no-ddp-bb': [],
    '--channels-last': [], '--no-pin-mem': [], '--no-prefetcher': [], '--output': ['o'], '--experiment': ['e'],
    '--eval-metric': ['top5'], '--tta': ['2'], '--use-multi-epochs-loader': [], '--torchscript': [],
    '--log-wandb': [], '--gpu-limit': ['0.5'], '--local-rank': ['0'], '--dist_url': ['env://'],
}
ORIGINAL_VALIDATE_OPTIONS: Dict[str, List[str]] = {
    '--dataset': [''], '-d': [''], '--split': ['validation'], '--dataset-download': [], '--model': ['overlock_xt'],
    '-m': ['overlock_xt'], '-j': ['2'], '--workers': ['2'], '-b': ['8'], '--batch-size': ['8'], '--img-size': ['64'],
    '--input-size': ['3', '64', '64'], '--crop-pct': ['0.9'], '--mean': ['0.5', '0.5', '0.5'],
    '--std': ['0.2', '0.2', '0.2'], '--interpolation': ['bilinear'], '--num-classes': ['10'], '--class-map': [''],
    '--gp': ['avg'], '--log-freq': ['5'], '--checkpoint': ['c.pth'], '--pretrained': [], '--num-gpu': ['2'],
    '--test-pool': [], '--no-prefetcher': [], '--pin-mem': [], '--channels-last': [], '--amp': [],
    '--apex-amp': [], '--native-amp': [], '--tf-preprocessing': [], '--use-ema': [], '--torchscript': [],
    '--legacy-jit': [], '--results-file': ['r.csv'], '--real-labels': ['real.json'], '--valid-labels': ['v.txt'],
}

# Options the original defines but never reads: they log one line each (utils/config.py, validate.py).
TRAIN_NO_EFFECT = ('--initial-checkpoint', '--gp', '--bn-tf', '--bn-momentum', '--bn-eps', '--drop-block',
                   '--drop-connect', '--checkpoint-freq')
VALIDATE_NO_EFFECT = ('--no-prefetcher', '--pin-mem', '--legacy-jit')


def test_the_counts_are_the_originals():
    longs = [f for f in ORIGINAL_TRAIN_OPTIONS if f.startswith('--')]
    assert len(ORIGINAL_TRAIN_OPTIONS) == 124 and len(longs) == 120
    assert len(ORIGINAL_VALIDATE_OPTIONS) == 37
    assert len([f for f in ORIGINAL_VALIDATE_OPTIONS if f.startswith('--')]) == 33


@pytest.mark.parametrize('flag', sorted(ORIGINAL_TRAIN_OPTIONS))
def test_train_accepts_every_original_option(flag):
    args = build_train_parser().parse_args(['--data-dir', 'd', flag, *ORIGINAL_TRAIN_OPTIONS[flag]])
    assert args is not None


def test_validate_accepts_every_original_option():
    for flag, values in ORIGINAL_VALIDATE_OPTIONS.items():
        args = validate.parse_args(['DATA', flag, *values])
        assert args.data == 'DATA', flag


def test_options_without_effect_log_one_line_each(caplog):
    assert sorted(NO_EFFECT_OPTIONS) == sorted(TRAIN_NO_EFFECT)
    for flag in TRAIN_NO_EFFECT:
        args = build_train_parser().parse_args(['--data-dir', 'd', flag, *ORIGINAL_TRAIN_OPTIONS[flag]])
        notes = check_train_args(args)
        assert len(notes) == 1 and notes[0].startswith(f'{flag}') and 'has no effect' in notes[0], (flag, notes)
    assert check_train_args(build_train_parser().parse_args(['--data-dir', 'd'])) == []
    for flag in VALIDATE_NO_EFFECT:
        notes = validate._notes(validate.parse_args(['DATA', flag]))
        assert len(notes) == 1 and notes[0].startswith(flag), notes


# --- building a run ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def small(tmp_path_factory) -> Path:
    """2 classes x 4 training / 2 validation images: 2 updates of batch 4 per epoch."""
    return make_image_folder(tmp_path_factory.mktemp('small'), n_train=4, n_val=2, classes=('red', 'green'))


_RUNS = [0]


def _argv(data: Path, out: Path, flags: Sequence[str]) -> List[str]:
    _RUNS[0] += 1
    return [*TINY, *FAST, '--data-dir', str(data), '--output', str(out / f'run{_RUNS[0]}'), '--epochs', '2', *flags]


def built(data: Path, out: Path, *flags: str) -> Trainer:
    """A run of train.py with ``flags`` built as train.py builds it (options checked, seeded, ``setup()``),
    without training."""
    args = parse_args_with_config(build_train_parser(), _argv(data, out, flags))
    notes = check_train_args(args)
    setup.seed_all(args.seed)
    trainer = Trainer(args, DistInfo(), notes)
    try:
        trainer.setup()
    finally:
        setup.remove_log_handlers()
    return trainer


def _lrs(t: Trainer) -> List[float]:
    """The schedule of a run: num_epochs and the lr of each epoch (stepped with a constant metric)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=t.args.lr)
    sched, n = setup.build_scheduler(t.args, opt, t.loaders.updates_per_epoch)
    out = [float(n)]
    for e in range(n + 1):
        sched.step(e, 1.0)
        out.append(round(opt.param_groups[0]['lr'], 12))
    return out


def _opt(t: Trainer):
    """The optimizer's type and hyper-parameters (weight decay: of the group that decays)."""
    groups = [{k: v for k, v in g.items() if k != 'params'} for g in t.optimizer.param_groups]
    return type(t.optimizer).__name__, max(groups, key=lambda g: g['weight_decay'])


def _loss(t: Trainer) -> float:
    """The training loss of fixed logits (both heads) and labels, after the run's mixing of a fixed batch."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4 * max(1, t.args.aug_splits), 2, generator=gen)
    target = torch.tensor([0, 1, 1, 0] * max(1, t.args.aug_splits))
    if t.mixup is not None:
        np.random.seed(0)
        _, target = t.mixup(torch.zeros(4, 3, 8, 8), target[:4])
    return float(t._loss({'main': logits, 'aux': logits.flip(0)}, target)[0])


def _mixed(t: Trainer):
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    y = torch.tensor([0, 1, 1, 0])
    mx, my = t.mixup(x, y)
    return mx[0].sum().item(), my.tolist(), t.mixup.mode, t.mixup.mix_prob, t.mixup.switch_prob


def _transforms(t: Trainer) -> str:
    ds = t.loaders.train.dataset.dataset  # inside the per-sample seeding wrapper
    return repr(getattr(ds, 'dataset', ds).transform) + repr(getattr(ds, 'augmentation', '')) + \
        repr(getattr(ds, 'normalize', ''))


def _val_transform(t: Trainer) -> str:
    return repr(t.loaders.val.dataset.transform)


def _device_aug(t: Trainer):
    a = t.prepare_train
    e = a.erase
    return (a.mean.flatten().tolist(), a.std.flatten().tolist(), a.normalize,
            None if e is None else (e.probability, e.mode, e.max_count, e.num_splits))


def _model(t: Trainer):
    m = t.model
    drop_paths = [round(mod.drop_prob, 6) for mod in m.modules() if type(mod).__name__ == 'DropPath']
    split_bn = sum(type(mod).__name__ == 'SplitBatchNorm2d' for mod in m.modules())
    first = m.patch_embed1[0].weight
    return (m.pretrained_cfg['architecture'], m.num_classes, m.head_drop.p, drop_paths, list(m.grad_checkpointing),
            split_bn, first.shape[1], first.is_contiguous(memory_format=torch.channels_last),
            float(first.detach().sum()))


def _loader(t: Trainer):
    tr, va = t.loaders.train, t.loaders.val
    sampler = t.loaders.sampler
    sampler.set_epoch(0)
    data = tr.dataset.dataset  # inside the per-sample seeding wrapper
    return (tr.batch_size, va.batch_size, tr.num_workers, tr.persistent_workers, tr.collate_fn.__name__,
            type(data).__name__, getattr(data, 'num_splits', 0), t.loaders.batches_per_epoch,
            [i for i, _ in sampler], tr.dataset.seed_numpy)


def _data(t: Trainer):
    return (t.data_config['input_size'], t.data_config['crop_pct'], t.data_config['interpolation'],
            t.train_set.root, len(t.train_set), t.args.num_classes, len(t.val_set))


def _ema(t: Trainer):
    return None if t.ema is None else (t.ema.decay, t.ema.use_warmup, str(t.ema.device))


def _amp(t: Trainer):
    return t.args.amp, t.amp_dtype if t.args.amp else None, type(t.scaler).__name__


def _wrapped(t: Trainer):
    return type(t.train_model).__name__, type(t.eval_model).__name__


def _output(t: Trainer) -> str:
    return os.path.relpath(t.args.output, os.path.dirname(os.path.dirname(t.args.output)))


def _eval(t: Trainer):
    return t.score(t.eval_model)['loss']


def _saver(t: Trainer):
    return t.saver.ranking.sign, t.saver.ranking.max_history


# (flags, observable, expectation on the observable with the flags, extra flags for both runs)
PROBES: Dict[str, tuple] = {
    # schedule
    '--sched': (['--sched', 'step', '--decay-epochs', '1'], _lrs, None, []),
    '--lr': (['--lr', '0.5'], _lrs, lambda v: 0.5 in v, []),
    '--auto-lr': (['--auto-lr'], _lrs, lambda v: v[1] == pytest.approx(0.512 * 4 / 1024), ['--lr-base', '0.512']),
    '--lr-noise': (['--lr-noise', '0.3'], _lrs, None, ['--epochs', '6']),
    '--lr-noise-pct': (['--lr-noise-pct', '0.1'], _lrs, None, ['--epochs', '6', '--lr-noise', '0.3']),
    '--lr-noise-std': (['--lr-noise-std', '0.1'], _lrs, None, ['--epochs', '6', '--lr-noise', '0.3']),
    '--seed': (['--seed', '7'], _lrs, None, ['--epochs', '6', '--lr-noise', '0.3']),
    '--lr-cycle-mul': (['--lr-cycle-mul', '2'], _lrs, None, ['--lr-cycle-limit', '2']),
    '--lr-cycle-decay': (['--lr-cycle-decay', '0.2'], _lrs, None, ['--lr-cycle-limit', '2']),
    '--lr-cycle-limit': (['--lr-cycle-limit', '2'], _lrs, lambda v: v[0] == 4, []),
    '--lr-k-decay': (['--lr-k-decay', '3'], _lrs, None, ['--epochs', '6']),
    '--warmup-lr': (['--warmup-lr', '1e-4'], _lrs, lambda v: v[1] == 1e-4, ['--warmup-epochs', '1']),
    '--warmup-epochs': (['--warmup-epochs', '1'], _lrs, None, []),
    '--min-lr': (['--min-lr', '1e-4'], _lrs, lambda v: v[-1] == 1e-4, ['--cooldown-epochs', '1']),
    '--epochs': (['--epochs', '5'], _lrs, lambda v: v[0] == 5, []),
    '--cooldown-epochs': (['--cooldown-epochs', '2'], _lrs, lambda v: v[0] == 4, []),
    '--decay-epochs': (['--decay-epochs', '2'], _lrs, None, ['--sched', 'step', '--epochs', '4']),
    '--decay-rate': (['--decay-rate', '0.5'], _lrs, lambda v: v[2] == v[1] * 0.5, ['--sched', 'step',
                                                                                   '--decay-epochs', '1']),
    '--dr': (['--dr', '0.5'], _lrs, lambda v: v[2] == v[1] * 0.5, ['--sched', 'step', '--decay-epochs', '1']),
    '--patience-epochs': (['--patience-epochs', '0'], _lrs, None, ['--sched', 'plateau', '--epochs', '4',
                                                                  '--warmup-epochs', '1']),
    '--eval-metric': (['--eval-metric', 'loss'], _saver, lambda v: v[0] == 1.0, []),  # lower is better
    # optimizer
    '--opt': (['--opt', 'sgd'], _opt, lambda v: v[0] == 'SGD', []),
    '--opt-eps': (['--opt-eps', '1e-3'], _opt, lambda v: v[1]['eps'] == 1e-3, []),
    '--opt-betas': (['--opt-betas', '0.8', '0.9'], _opt, lambda v: v[1]['betas'] == (0.8, 0.9), []),
    '--momentum': (['--momentum', '0.5'], _opt, lambda v: v[1]['momentum'] == 0.5, ['--opt', 'sgd']),
    '--weight-decay': (['--weight-decay', '0.01'], _opt, lambda v: v[1]['weight_decay'] == 0.01, []),
    # loss
    '--smoothing': (['--smoothing', '0.3'], _loss, None, []),
    '--aux-loss-ratio': (['--aux-loss-ratio', '2'], _loss, None, []),
    '--bce-loss': (['--bce-loss'], _loss, None, []),
    '--bce-target-thresh': (['--bce-target-thresh', '0.3'], _loss, None, ['--bce-loss', '--mixup', '0.8']),
    '--jsd-loss': (['--jsd-loss'], _loss, None, ['--aug-splits', '2']),
    '--mixup': (['--mixup', '0.8'], _loss, None, []),
    '--cutmix': (['--cutmix', '1.0'], _mixed, None, ['--mixup', '0.8', '--mixup-switch-prob', '1.0']),
    '--cutmix-minmax': (['--cutmix-minmax', '0.2', '0.3'], _mixed, None, ['--cutmix', '1.0']),
    '--mixup-prob': (['--mixup-prob', '0.3'], _mixed, lambda v: v[3] == 0.3, ['--mixup', '0.8']),
    '--mixup-switch-prob': (['--mixup-switch-prob', '0.9'], _mixed, lambda v: v[4] == 0.9,
                            ['--mixup', '0.8', '--cutmix', '1.0']),
    '--mixup-mode': (['--mixup-mode', 'elem'], _mixed, lambda v: v[2] == 'elem', ['--mixup', '0.8']),
    # per-image augmentation and data
    # as the original: no erasing, the model's interpolation
    '--no-aug': (['--no-aug'], lambda t: (_transforms(t), _device_aug(t)),
                 lambda v: 'RandomResized' not in v[0] and 'bicubic' in v[0] and v[1][3] is None, ['--reprob', '0.5']),
    '--scale': (['--scale', '0.5', '0.6'], _transforms, lambda v: '(0.5, 0.6)' in v, []),
    '--ratio': (['--ratio', '0.9', '1.1'], _transforms, lambda v: '(0.9, 1.1)' in v, []),
    '--hflip': (['--hflip', '0.1'], _transforms, lambda v: 'RandomHorizontalFlip(p=0.1)' in v, []),
    '--vflip': (['--vflip', '0.2'], _transforms, lambda v: 'RandomVerticalFlip(p=0.2)' in v, []),
    '--color-jitter': (['--color-jitter', '0.1'], _transforms, lambda v: 'brightness=(0.9, 1.1)' in v, []),
    '--aa': (['--aa', 'rand-m9-mstd0.5-inc1'], _transforms, lambda v: 'RandAugment' in v, []),
    '--train-interpolation': (['--train-interpolation', 'bilinear'], _transforms, lambda v: 'bilinear' in v, []),
    '--aug-splits': (['--aug-splits', '3'], _loader, lambda v: v[5:7] == ('AugMixDataset', 3), []),
    '--interpolation': (['--interpolation', 'bilinear'], _val_transform, lambda v: 'bilinear' in v, []),
    '--crop-pct': (['--crop-pct', '0.5'], _data, lambda v: v[1] == 0.5, []),
    '--img-size': (['--img-size', '48'], _data, lambda v: v[0] == (3, 48, 48), []),
    '--input-size': (['--input-size', '3', '48', '40'], _data, lambda v: v[0] == (3, 48, 40), []),
    '--mean': (['--mean', '0.1', '0.2', '0.3'], _device_aug, lambda v: v[0] == pytest.approx([25.5, 51, 76.5]), []),
    '--std': (['--std', '0.1', '0.2', '0.3'], _device_aug, lambda v: v[1] == pytest.approx([25.5, 51, 76.5]), []),
    '--reprob': (['--reprob', '0.5'], _device_aug, lambda v: v[3][0] == 0.5, []),
    '--remode': (['--remode', 'const'], _device_aug, lambda v: v[3][1] == 'const', ['--reprob', '0.5']),
    '--recount': (['--recount', '3'], _device_aug, lambda v: v[3][2] == 3, ['--reprob', '0.5']),
    '--resplit': (['--resplit'], _device_aug, lambda v: v[3][3] == 2, ['--reprob', '0.5', '--aug-splits', '2']),
    '--no-prefetcher': (['--no-prefetcher'], _device_aug, lambda v: v[2] is False, []),
    '--data-dir': (['--data-dir', '{other}'], _data, lambda v: v[4] == 3 * 8, []),
    '--train-split': (['--train-split', 'val'], _data, lambda v: v[3].endswith('val'), []),
    '--val-split': (['--val-split', 'train'], _data, lambda v: v[6] == 8, []),
    '--num-classes': (['--num-classes', '5'], _model, lambda v: v[1] == 5, []),
    # loaders and sampling
    '-b': (['-b', '2'], _loader, lambda v: v[0] == 2, []),
    '--batch-size': (['--batch-size', '2'], _loader, lambda v: v[0] == 2, []),
    '-vb': (['-vb', '3'], _loader, lambda v: v[1] == 3, []),
    '--validation-batch-size': (['--validation-batch-size', '3'], _loader, lambda v: v[1] == 3, []),
    '-j': (['-j', '1'], _loader, lambda v: v[2] == 1, []),
    '--workers': (['--workers', '1'], _loader, lambda v: v[2] == 1, []),
    '--use-multi-epochs-loader': (['--use-multi-epochs-loader'], _loader, lambda v: v[3] is True,
                                  ['-j', '1', '--no-persistent-workers']),
    '--worker-seeding': (['--worker-seeding', 'part'], _loader, lambda v: v[9] is False, []),
    '--aug-repeats': (['--aug-repeats', '2'], _loader, lambda v: len(set(v[8])) < len(v[8]), []),
    '--epoch-repeats': (['--epoch-repeats', '2'], _loader, lambda v: v[7] == 4, []),
    # model
    '--model': (['--model', 'overlock_t'], _model, None, []),
    '--drop': (['--drop', '0.3'], _model, lambda v: v[2] == 0.3, []),
    '--drop-path': (['--drop-path', '0.2'], _model, lambda v: max(v[3]) == pytest.approx(0.2), []),
    '--grad-checkpoint': (['--grad-checkpoint'], _model, lambda v: min(v[4]) > 0, []),
    '--ckpt-stg': (['--ckpt-stg', '1', '0', '0', '0'], _model, lambda v: v[4] == [1, 0, 0, 0], []),
    '--split-bn': (['--split-bn'], _model, lambda v: v[5] > 0, ['--aug-splits', '2']),
    '--channels-last': (['--channels-last'], _model, lambda v: v[7] is True, []),
    '--model-ema': (['--model-ema'], _ema, lambda v: v is not None, []),
    '--model-ema-decay': (['--model-ema-decay', '0.5'], _ema, lambda v: v[0] == 0.5, ['--model-ema']),
    '--model-ema-force-cpu': (['--model-ema-force-cpu'], _ema, lambda v: v[2] == 'cpu', ['--model-ema']),
    '--amp': (['--amp'], _amp, lambda v: v[1] == torch.float16 and v[2] == 'GradScaler', []),
    '--native-amp': (['--native-amp'], _amp, lambda v: v[1] == torch.float16 and v[2] == 'GradScaler', []),
    '--apex-amp': (['--apex-amp'], _amp, lambda v: v[1] == torch.float16 and v[2] == 'GradScaler', []),
    '--compile': (['--compile'], _wrapped, lambda v: v[0] == 'OptimizedModule', []),
    '--torchscript': (['--torchscript'], _wrapped, lambda v: v[0] == 'RecursiveScriptModule', []),
    '--output': (['--output', '{tmp}/elsewhere'], _output, lambda v: v.endswith('elsewhere'), []),
    '--experiment': (['--experiment', 'ft384'], _output, lambda v: v.endswith(os.path.join('', 'ft384')), []),
    '--tta': (['--tta', '2'], _eval, None, []),
}

# Acting options probed elsewhere: by a test of this file (below) or of another file.
PROBED_BY_TESTS = {
    '--dataset': 'test_torchvision_dataset_and_its_download', '-d': 'test_torchvision_dataset_and_its_download',
    '--dataset-download': 'test_torchvision_dataset_and_its_download',
    '--class-map': 'test_train_scale.py::test_class_map_fixes_the_class_indices',
    '--pretrained': 'test_pretrained_starts_from_the_published_weights',
    '--resume': 'test_train.py::test_resume_equals_uninterrupted_run',
    '--finetune': 'test_finetune_and_no_resume_opt',
    '--no-resume-opt': 'test_finetune_and_no_resume_opt',
    '--val-freq': 'test_val_freq_and_start_epoch_evaluate_as_the_original',
    '--val-start-epoch': 'test_val_freq_and_start_epoch_evaluate_as_the_original',
    '--start-epoch': 'test_start_epoch_positions_the_schedule',
    '--clip-grad': 'test_gradient_clipping_changes_the_update',
    '--clip-mode': 'test_gradient_clipping_changes_the_update',
    '--mixup-off-epoch': 'test_one_epoch_effects',
    '--save-images': 'test_one_epoch_effects', '--debug-loss': 'test_one_epoch_effects',
    '--log-interval': 'test_one_epoch_effects',
    '--no-sync-bn': 'test_sync_bn_and_ddp_options_reach_the_wrappers',
    '--no-ddp-bb': 'test_sync_bn_and_ddp_options_reach_the_wrappers',
    '--dist-bn': 'test_train_scale.py::test_dist_bn_makes_statistics_equal_over_two_processes',
    '--recovery-interval': 'test_restarts.py::test_hard_kill_then_the_same_command_resumes_exactly',
    '--checkpoint-hist': 'test_checkpoint_hist_and_eval_metric_loss',
    '--local-rank': 'test_train_original.py::test_local_rank_reaches_the_device_choice',
    '--dist_url': 'test_dist_url_forms_the_process_group',
    '--no-pin-mem': 'test_pin_memory_follows_the_option',
    '--gpu-limit': 'test_gpu_limit_caps_the_process_on_a_gpu_only',
    '--log-wandb': 'test_log_wandb_logs_each_epoch_or_says_it_cannot',
    '--model-ema-force-cpu': 'test_ema_kept_on_the_cpu_is_saved_but_not_evaluated',
}


def test_every_original_train_option_is_probed_or_has_no_effect():
    here = {name for name in globals() if name.startswith('test_')}
    for flag in ORIGINAL_TRAIN_OPTIONS:
        assert flag in PROBES or flag in PROBED_BY_TESTS or flag in TRAIN_NO_EFFECT, flag
    for flag, test in PROBED_BY_TESTS.items():
        if '::' in test:
            path, name = test.split('::')
            assert f'def {name}(' in (Path(__file__).parent / path).read_text(), test
        else:
            assert test in here, test


@pytest.mark.parametrize('flag', sorted(PROBES))
def test_option_changes_the_run(flag, small, tmp_path):
    flags, observe, expect, both = PROBES[flag]
    other = small.parent / 'three'
    if not other.exists():
        make_image_folder(other, n_train=8, n_val=2)
    flags = [f.replace('{other}', str(other)).replace('{tmp}', str(tmp_path)) for f in flags]
    base = observe(built(small, tmp_path, *both))
    changed = observe(built(small, tmp_path, *both, *flags))
    assert changed != base, f'{flag} changed nothing: {base}'
    if expect is not None:
        assert expect(changed), f'{flag}: {changed}'


# --- options probed on a run ------------------------------------------------------------------------------------

def _run(data: Path, out: Path, *flags: str):
    """train.py in this process on ``data`` (TINY + FAST, 2 epochs unless ``flags`` say otherwise):
    (exit code, log)."""
    code, err = run_inprocess([*TINY, *FAST, '--data-dir', str(data), '--output', str(out), '--epochs', '2', *flags])
    return code, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def test_torchvision_dataset_and_its_download(small, tmp_path, monkeypatch):
    # -d torch/folder: torchvision's ImageFolder through timm's dataset factory, on the same images
    t = built(small, tmp_path, '-d', 'torch/folder', '--train-split', 'train', '--val-split', 'val')
    assert type(t.train_set).__name__ == 'ImageFolder' and len(t.train_set) == 8 and t.args.num_classes == 2
    # --dataset-download reaches the torchvision dataset (a stand-in class records it; no network here)
    import timm.data.dataset_factory as factory
    calls = []

    class FakeCifar(torch.utils.data.Dataset):
        classes = ['a', 'b']
        class_to_idx = {'a': 0, 'b': 1}

        def __init__(self, root, train=True, download=False, **_):
            calls.append(download)
            if not download:
                raise RuntimeError('Dataset not found or corrupted. You can use download=True to download it')
            self.transform = None

        def __len__(self):
            return 8

        def __getitem__(self, i):
            from PIL import Image
            return Image.new('RGB', (32, 32), (i * 30, 0, 0)), i % 2

    monkeypatch.setitem(factory._TORCH_BASIC_DS, 'cifar10', FakeCifar)
    t = built(small, tmp_path, '-d', 'torch/cifar10', '--dataset-download')
    assert calls == [True, True] and len(t.train_set) == 8
    code, err = _run(small, tmp_path / 'nodl', '-d', 'torch/cifar10')
    assert code == 2 and '--dataset-download' in _one_line_error(err)


def test_pretrained_starts_from_the_published_weights(small, tmp_path):
    torch.manual_seed(3)
    published = timm.create_model('overlock_xt', **TINY_KWARGS, use_ds=True)  # 1000 classes, as released
    path = tmp_path / 'overlock_xt_in1k_224.pth'
    torch.save({'state_dict': published.state_dict()}, path)
    t = built(small, tmp_path, '--pretrained', '--pretrained-path', str(path))
    ours, theirs = t.model.state_dict(), published.state_dict()
    trunk = [k for k in theirs if not k.startswith(('head.4', 'aux_head.2'))]
    assert all(torch.equal(ours[k], theirs[k]) for k in trunk)
    assert ours['head.4.weight'].shape[0] == 2  # --num-classes from the data: both heads re-initialised
    assert ours['aux_head.2.weight'].shape[0] == 2
    code, err = _run(small, tmp_path / 'both', '--pretrained', '--finetune', str(path))
    assert code == 2 and '--pretrained and --finetune' in _one_line_error(err)


def test_finetune_and_no_resume_opt(small, tmp_path):
    code, err = _run(small, tmp_path / 'a', '--epochs', '1')
    assert code == 0, err
    last = tmp_path / 'a' / 'last.pth'
    saved = load(last)['state_dict']
    t = built(small, tmp_path, '--finetune', str(last))
    assert all(torch.equal(v, saved[k]) for k, v in t.model.state_dict().items())
    assert not t.optimizer.state and t.resume.epoch == 0  # weights only: a new run
    resumed = built(small, tmp_path, '--resume', str(last), '--epochs', '2')
    fresh_opt = built(small, tmp_path, '--resume', str(last), '--epochs', '2', '--no-resume-opt')
    assert resumed.optimizer.state and not fresh_opt.optimizer.state  # Adam's moments restored / not
    assert fresh_opt.resume.epoch == 1 and all(
        torch.equal(v, saved[k]) for k, v in fresh_opt.model.state_dict().items())


def test_val_freq_and_start_epoch_evaluate_as_the_original(small, tmp_path):
    # the original: evaluate after epoch e (0-based) when e % val_freq == 0 or e > val_start_epoch
    code, err = _run(small, tmp_path / 'v', '--epochs', '5', '--val-freq', '2', '--val-start-epoch', '3')
    assert code == 0, err
    rows = read_summary(tmp_path / 'v' / 'summary.csv')
    assert [bool(r['eval_top1']) for r in rows] == [True, False, True, False, True]
    assert 'not evaluated (--val-freq)' in err
    assert sorted(p.name for p in (tmp_path / 'v').glob('checkpoint-*.pth')) == [
        'checkpoint-1.pth', 'checkpoint-3.pth', 'checkpoint-5.pth']  # only evaluated epochs rank


def test_start_epoch_positions_the_schedule(small, tmp_path):
    code, err = _run(small, tmp_path / 'ref', '--epochs', '4', '--sched', 'step', '--decay-epochs', '1',
                     '--decay-rate', '0.5', '--lr', '0.1')
    assert code == 0, err
    code, err = _run(small, tmp_path / 's', '--epochs', '4', '--sched', 'step', '--decay-epochs', '1',
                     '--decay-rate', '0.5', '--lr', '0.1', '--start-epoch', '2')
    assert code == 0, err
    rows = read_summary(tmp_path / 's' / 'summary.csv')
    ref = read_summary(tmp_path / 'ref' / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['3', '4'] and [r['lr'] for r in rows] == [r['lr'] for r in ref[2:]]
    assert int(load(tmp_path / 's' / 'last.pth')['global_step']) == 4 * 2


def _weights_after_one_update(data: Path, out: Path, *flags: str) -> Dict[str, torch.Tensor]:
    t = built(data, out, '--opt', 'momentum', '--lr', '1.0', '--momentum', '0', '--weight-decay', '0', *flags)
    if t.scaler is not None:  # float16: a scale that does not overflow at the first step (which it would skip)
        t.scaler = torch.amp.GradScaler('cpu', init_scale=1.0)
    x, y = next(iter(t.loaders.train))
    x, y = t.prepare_train(x, y)
    from utils.train_step import forward_backward
    forward_backward(t.train_model, x, y, t._loss, 1, t.scaler, t._amp)
    t._update(skip=False)
    return {k: v.detach().clone() for k, v in t.model.named_parameters()}


@pytest.mark.parametrize('amp', [[], ['--amp', '--amp-dtype', 'float16']], ids=['float32', 'float16-scaler'])
def test_gradient_clipping_changes_the_update(amp, small, tmp_path):
    start = {k: v.detach().clone() for k, v in built(small, tmp_path).model.named_parameters()}
    free = _weights_after_one_update(small, tmp_path, *amp)
    norm = _weights_after_one_update(small, tmp_path, *amp, '--clip-grad', '1e-3')
    value = _weights_after_one_update(small, tmp_path, *amp, '--clip-grad', '1e-5', '--clip-mode', 'value')

    def step(w):
        return torch.cat([(w[k] - start[k]).flatten() for k in start])

    assert step(norm).norm() == pytest.approx(1e-3, rel=1e-2)  # SGD, lr 1: the update is the clipped gradient
    assert step(free).norm() > 1e-2
    assert step(value).abs().max() == pytest.approx(1e-5, rel=1e-2)  # weights ~0.1: float32 resolution


def test_one_epoch_effects(small, tmp_path, monkeypatch):
    """--mixup-off-epoch, --save-images, --debug-loss and --log-interval on a short real run."""
    seen = []
    real = nn.Module.__call__

    def spy(self, *a, **k):
        if type(self).__name__ == 'OverLoCK':
            seen.append(torch.is_anomaly_enabled())
        return real(self, *a, **k)

    monkeypatch.setattr(nn.Module, '__call__', spy)
    out = tmp_path / 'r'
    code, err = _run(small, out, '--mixup', '0.8', '--mixup-off-epoch', '1', '--save-images', '--debug-loss',
                     '--log-interval', '2')
    assert code == 0, err
    assert seen and all(seen[:2])  # the training forwards ran in anomaly mode
    assert sorted(p.name for p in out.glob('train-batch-*.jpg')) == ['train-batch-2.jpg']
    assert err.count('Train: ') == 2  # one line per 2 updates, 2 updates per epoch
    code, err = _run(small, tmp_path / 'q', '--log-interval', '1')
    assert err.count('Train: ') == 4 and not list((tmp_path / 'q').glob('train-batch-*'))
    t = built(small, tmp_path, '--mixup', '0.8', '--mixup-off-epoch', '1')
    t.train_one_epoch(0)
    assert t.mixup.mixup_enabled
    t.train_one_epoch(1)
    assert not t.mixup.mixup_enabled


def test_sync_bn_and_ddp_options_reach_the_wrappers(small, tmp_path, monkeypatch):
    import torch.distributed as dist
    from tests.helpers import free_port
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port()))
    dist.init_process_group('gloo', rank=0, world_size=1)
    try:
        info = DistInfo(rank=0, world_size=2, device=torch.device('cpu'))  # as the wrappers see a 2-process run
        for flags, buffers in (([], True), (['--no-ddp-bb'], False)):
            t = built(small, tmp_path, *flags)
            _, _, ddp = setup.wrap_model(t.args, info, t.model)
            assert ddp.broadcast_buffers is buffers
        # SyncBatchNorm needs CUDA: on a CUDA 2-process run --sync-bn converts and --no-sync-bn does not
        args = built(small, tmp_path).args
        monkeypatch.setattr(torch.nn.Module, 'to', lambda self, *a, **k: self)  # no CUDA here
        cuda = DistInfo(rank=0, world_size=2, device=torch.device('cuda', 0))
        model, _ = setup.build_model(args, cuda)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        args.sync_bn = False
        model, _ = setup.build_model(args, cuda)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        args.sync_bn, args.split_bn, args.aug_splits = True, True, 2
        with pytest.raises(UsageError, match='--split-bn and --sync-bn'):
            setup.build_model(args, cuda)
    finally:
        dist.destroy_process_group()


def test_checkpoint_hist_and_eval_metric_loss(small, tmp_path):
    code, err = _run(small, tmp_path / 'h', '--epochs', '3', '--checkpoint-hist', '1', '--eval-metric', 'loss',
                     '--lr', '0.05')
    assert code == 0, err
    rows = read_summary(tmp_path / 'h' / 'summary.csv')
    losses = [float(r['eval_loss']) for r in rows]
    best = 1 + losses.index(min(losses))
    assert [p.name for p in (tmp_path / 'h').glob('checkpoint-*.pth')] == [f'checkpoint-{best}.pth']
    assert int(load(tmp_path / 'h' / 'model_best.pth')['epoch']) == best
    assert f'Done. Best loss {min(losses):.4g} at epoch {best}' in err


@pytest.mark.slow
def test_dist_url_forms_the_process_group(tmp_path):
    """Two processes meet through --dist_url alone (no MASTER_ADDR / MASTER_PORT): tcp:// and file://."""
    from tests.helpers import free_port
    script = ('import os, sys, torch, torch.distributed as dist\n'
              'from utils.distributed import init_distributed\n'
              'info = init_distributed("cpu", init_method=sys.argv[1])\n'
              't = torch.tensor([float(info.rank + 1)]); dist.all_reduce(t); print("sum", int(t.item()))\n'
              'dist.destroy_process_group()\n')
    import subprocess
    from tests.helpers import REPO, subprocess_env
    for url in (f'tcp://127.0.0.1:{free_port()}', f'file://{tmp_path}/rendezvous'):
        procs = []
        for rank in (0, 1):
            env = {k: v for k, v in subprocess_env().items() if k not in ('MASTER_ADDR', 'MASTER_PORT')}
            env.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank))
            procs.append(subprocess.Popen([sys.executable, '-c', script, url], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert all('sum 3' in o for o, _ in outs), outs


def test_pin_memory_follows_the_option(small, tmp_path):
    """Pinned batches only help a GPU: the loaders pin them there, unless --no-pin-mem."""
    cuda = DistInfo(device=torch.device('cuda', 0))
    for flags, pinned in (([], True), (['--no-pin-mem'], False)):
        t = built(small, tmp_path, *flags)
        loaders = setup.build_loaders(t.args, cuda, t.train_set, t.val_set, t.data_config)
        assert loaders.train.pin_memory is pinned and loaders.val.pin_memory is pinned
    assert built(small, tmp_path).loaders.train.pin_memory is False  # on the CPU


def test_gpu_limit_caps_the_process_on_a_gpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, 'set_per_process_memory_fraction', lambda f, d: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d: 'GPU')
    gpu = torch.device('cuda', 1)
    assert setup.apply_gpu_limit(1.0, gpu) is None and not calls
    assert '50%' in setup.apply_gpu_limit(0.5, gpu) and calls == [(0.5, gpu)]
    assert 'no effect on the CPU' in setup.apply_gpu_limit(0.5, torch.device('cpu'))
    with pytest.raises(UsageError, match=r'--gpu-limit is a fraction'):
        check_train_args(build_train_parser().parse_args(['--data-dir', 'd', '--gpu-limit', '1.5']))


def test_log_wandb_logs_each_epoch_or_says_it_cannot(small, tmp_path, monkeypatch):
    logged, inits = [], []
    fake = types.SimpleNamespace(init=lambda **k: inits.append(k), log=lambda row, step: logged.append((step, row)),
                                 finish=lambda: logged.append('finish'))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    code, err = _run(small, tmp_path / 'w', '--log-wandb', '--experiment', 'proj')
    assert code == 0, err
    assert inits[0]['project'] == 'proj' and inits[0]['config']['model'] == 'overlock_xt'
    assert [s for s, _ in logged[:2]] == [1, 2] and 'eval_top1' in logged[0][1] and logged[-1] == 'finish'
    monkeypatch.setitem(sys.modules, 'wandb', None)  # not installed: import fails
    code, err = _run(small, tmp_path / 'x', '--log-wandb')
    assert code == 0 and '--log-wandb: the wandb package is not installed' in err


def test_ema_kept_on_the_cpu_is_saved_but_not_evaluated(small, tmp_path):
    code, err = _run(small, tmp_path / 'c', '--model-ema', '--model-ema-force-cpu')
    assert code == 0, err
    rows = read_summary(tmp_path / 'c' / 'summary.csv')
    assert rows[0]['eval_top1'] and not rows[0]['eval_ema_top1']
    assert 'state_dict_ema' in load(tmp_path / 'c' / 'last.pth')
    code, err = _run(small, tmp_path / 'd', '--model-ema', '--model-ema-force-cpu', '--eval-metric', 'ema_top1')
    assert code == 2 and '--model-ema-force-cpu' in _one_line_error(err)


# --- the EMA ---------------------------------------------------------------------------------------------------

def test_ema_equals_timms_model_ema_v2_from_the_first_update():
    """The original's ModelEmaV2: the set decay from the first update, on every state_dict entry, to the bit."""
    from timm.utils import ModelEmaV2
    torch.manual_seed(0)
    model = timm.create_model('overlock_xt', **TINY_KWARGS, num_classes=3, use_ds=True)
    ours, theirs = setup.ModelEma(model, decay=0.9), ModelEmaV2(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.train()(torch.randn(2, 3, 32, 32))  # BatchNorm statistics move too
        ours.update(model)
        theirs.update(model)
    for (k, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(a, b), k
    # timm's V3 with a step starts from decay 0 (the EMA becomes the model): not the original's
    v3 = timm.utils.ModelEmaV3(model, decay=0.9)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    ours_first = setup.ModelEma(copy.deepcopy(model), decay=0.9)
    ours_first.module.load_state_dict(start)
    ours_first.update(model)
    v3.module.load_state_dict(start)
    v3.update(model, step=1)
    k = next(iter(start))
    assert torch.equal(v3.module.state_dict()[k], model.state_dict()[k])
    torch.testing.assert_close(ours_first.module.state_dict()[k], 0.9 * start[k] + 0.1 * model.state_dict()[k])


def test_training_ema_is_the_original_average_of_the_weights(small, tmp_path, monkeypatch):
    """In a real run: EMA_n = d * EMA_{n-1} + (1 - d) * W_n from EMA_0 = the initial weights (--model-ema-decay)."""
    snapshots = []
    real_update = Trainer._update

    def record(self, skip):
        real_update(self, skip)
        snapshots.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(Trainer, '_update', record)
    t = built(small, tmp_path, '--model-ema', '--model-ema-decay', '0.7')
    expected = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_one_epoch(0)
    assert len(snapshots) == 2
    for w in snapshots:
        for k, v in w.items():
            expected[k].copy_(0.7 * expected[k] + 0.3 * v)
    for k, v in t.ema.module.state_dict().items():
        assert torch.equal(v, expected[k]), k
    warm = built(small, tmp_path, '--model-ema', '--model-ema-decay', '0.7', '--model-ema-warmup')
    before = copy.deepcopy(warm.model.state_dict())
    snapshots.clear()
    warm.train_one_epoch(0)
    k = 'patch_embed1.0.weight'
    assert not torch.equal(warm.ema.module.state_dict()[k], before[k])  # V3's warm-up: decay 0 at the first update


# --- combinations that cannot work ------------------------------------------------------------------------------

@pytest.mark.parametrize('flags, expect', [
    (['--aug-splits', '2', '--mixup', '0.8'], '--aug-splits 2 and --mixup/--cutmix'),
    (['--aug-splits', '1'], '--aug-splits 1 makes no sense'),
    (['--jsd-loss'], '--jsd-loss compares the augmentation splits'),
    (['--split-bn'], '--split-bn needs --aug-splits'),
    (['--torchscript', '--compile'], '--torchscript and --compile'),
    (['--torchscript', '--grad-checkpoint'], '--torchscript and --grad-checkpoint'),
    (['--aug-repeats', '2', '--epoch-repeats', '2'], '--aug-repeats 2 and --epoch-repeats 2'),
    (['--aug-splits', '2', '--mixup', '0', '--cutmix', '0', '--dataset', 'wds/x'],
     '--aug-splits 2 and --dataset wds/x'),
    (['--no-resume-opt'], '--no-resume-opt only applies with --resume'),
    (['--pretrained-path', 'x.pth'], '--pretrained-path is the file of --pretrained'),
    (['--tta', '3'], '--tta 3 is not defined here'),
    (['--bce-target-thresh', '0.2'], '--bce-target-thresh applies to --bce-loss'),
    (['--model-ema-force-cpu'], '--model-ema-force-cpu needs --model-ema'),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(flags, expect):
    args = build_train_parser().parse_args(['--data-dir', 'd', *flags])
    with pytest.raises(UsageError, match=expect.replace('/', '.').replace('--', '--')):
        check_train_args(args)


@pytest.mark.slow
def test_augmix_splits_jsd_and_split_bn_train_and_resume_exactly(small, tmp_path):
    """AugMix as the original ran it (timm's AugMixDataset, JSD loss, split BatchNorm, erasing of the augmented
    splits only, repeated augmentation): a run resumed after epoch 1 ends with the same weights; the float path
    (--no-prefetcher, splits collated in the same order) trains too."""
    from tests.helpers import state_dicts_equal
    flags = ['--aug-splits', '3', '--jsd-loss', '--split-bn', '--aa', 'augmix-m3-w2-d1', '--reprob', '0.5',
             '--resplit', '--epochs', '2', '--model-ema', '--aug-repeats', '2']
    ref, part = tmp_path / 'ref', tmp_path / 'part'
    code, err = _run(small, ref, *flags)
    assert code == 0, err
    code, err = _run(small, part, *flags, '--epochs', '1')
    assert code == 0, err
    code, err = _run(small, part, *flags, '--resume', str(part / 'last.pth'))
    assert code == 0, err
    assert state_dicts_equal(load(ref / 'last.pth'), load(part / 'last.pth')) is None
    assert any('aux_bn' in k for k in load(ref / 'last.pth')['state_dict'])
    code, err = _run(small, tmp_path / 'float', *flags, '--epochs', '1', '--no-prefetcher')
    assert code == 0 and '(aux ' in err, err
    # a split-BatchNorm checkpoint evaluates as the plain model with the main statistics
    split = timm.create_model('overlock_xt', **TINY_KWARGS, num_classes=2)
    import models
    models.load_checkpoint(split, str(ref / 'model_best.pth'), strict=True)
    saved = load(ref / 'model_best.pth')['state_dict']
    assert all(torch.equal(v, saved[k]) for k, v in split.state_dict().items())


@pytest.mark.slow
def test_torchscript_training_updates_the_eager_weights_with_both_heads(small, tmp_path):
    code, err = _run(small, tmp_path / 's', '--torchscript', '--epochs', '1')
    assert code == 0, err
    assert '(aux ' in err  # the auxiliary head's loss is part of the scripted training forward
    start = built(small, tmp_path).model.state_dict()
    saved = load(tmp_path / 's' / 'last.pth')['state_dict']
    assert not torch.equal(saved['head.4.weight'], start['head.4.weight'])


# --- validate.py ---------------------------------------------------------------------------------------------

VAL = ['--model-kwargs', *tiny_cli_kwargs(), '--img-size', '32', '--crop-pct', '1.0', '-b', '2', '-j', '0',
       '--no-progress']


@pytest.fixture(scope='module')
def imagenet_like(tmp_path_factory):
    """A 3-class validation folder whose 6 images carry ImageNet's file names, and checkpoints with a fixed,
    non-trivial classifier (the EMA's negated): of 3 classes, and of 5 classes of which the folders hold 1, 3
    and 4."""
    root = tmp_path_factory.mktemp('imnet')
    make_image_folder(root, n_train=1, n_val=2)
    n = 0
    for cls in sorted(os.listdir(root / 'val')):
        for f in sorted(os.listdir(root / 'val' / cls)):
            n += 1
            os.rename(root / 'val' / cls / f, root / 'val' / cls / f'ILSVRC2012_val_{n:08d}.JPEG')
    for classes in (3, 5):
        torch.manual_seed(classes)
        model = timm.create_model('overlock_xt', **TINY_KWARGS, num_classes=classes)
        with torch.no_grad():
            model.head[4].weight.normal_(0, 1.0)
        ema = {k: -v if k == 'head.4.weight' else v for k, v in model.state_dict().items()}
        torch.save({'state_dict': model.state_dict(), 'state_dict_ema': ema}, root / f'c{classes}.pth')
    return root


def _predictions(root: Path, classes: int) -> torch.Tensor:
    """The logits of checkpoint ``c<classes>.pth`` on the validation images, in file order."""
    model = timm.create_model('overlock_xt', **TINY_KWARGS, num_classes=classes).eval()
    model.load_state_dict(torch.load(root / f'c{classes}.pth', weights_only=True)['state_dict'])
    cfg = timm.data.resolve_data_config({'input_size': (3, 32, 32), 'crop_pct': 1.0}, model=model)
    tf = timm.data.create_transform(**cfg)
    from PIL import Image
    files = sorted((root / 'val').glob('*/*.JPEG'))
    with torch.no_grad():
        return model(torch.stack([tf(Image.open(f).convert('RGB')) for f in files]))


def _validate(cli, root: Path, classes: int, *flags: str):
    return cli(validate, [str(root), '-m', 'overlock_xt', '--checkpoint', str(root / f'c{classes}.pth'), *VAL,
                          *flags])


def test_valid_labels_score_a_class_subset(imagenet_like, tmp_path, cli):
    root = imagenet_like
    (tmp_path / 'subset.txt').write_text('4\n1\n\n3\n')
    results = tmp_path / 'r.json'
    code, out, err = _validate(cli, root, 5, '--valid-labels', str(tmp_path / 'subset.txt'),
                               '--results-file', str(results))
    assert code == 0, err
    logits = _predictions(root, 5)[:, [1, 3, 4]]  # folders blue, green, red are classes 1, 3, 4
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    row = json.loads(results.read_text())[0]
    assert row['top1'] == pytest.approx(100 * (logits.argmax(1) == target).float().mean().item(), abs=1e-3)
    assert row['loss'] == pytest.approx(nn.functional.cross_entropy(logits, target).item(), abs=1e-5)
    code, out, err = _validate(cli, root, 5)
    assert code == 2 and '--valid-labels for a class subset' in err  # 3 folders, 5 outputs
    (tmp_path / 'bad.txt').write_text('1\nseven\n')
    code, out, err = _validate(cli, root, 5, '--valid-labels', str(tmp_path / 'bad.txt'))
    assert code == 2 and 'line 2 is not a class index' in err


def test_real_labels_score_against_the_reassessed_labels(imagenet_like, tmp_path, cli, caplog):
    root = imagenet_like
    top1 = _predictions(root, 3).argmax(1).tolist()
    # hand-written ReaL labels: image 1 has its prediction among two labels, image 2 not, image 3 has none
    # (ReaL leaves it out), images 4-6 exactly their prediction: top-1 4 of 5
    real = [[top1[0], (top1[0] + 1) % 3], [(top1[1] + 1) % 3], [], [top1[3]], [top1[4]], [top1[5]]]
    (tmp_path / 'real.json').write_text(json.dumps(real))
    results = tmp_path / 'r.json'
    with caplog.at_level(logging.INFO):
        code, out, err = _validate(cli, root, 3, '--real-labels', str(tmp_path / 'real.json'),
                                   '--results-file', str(results))
    assert code == 0, err
    row = json.loads(results.read_text())[0]
    assert row['top1'] == pytest.approx(100 * 4 / 5) and 'ImageNet-ReaL top-1 80.000' in caplog.text
    (tmp_path / 'short.json').write_text(json.dumps(real[:3]))
    code, out, err = _validate(cli, root, 3, '--real-labels', str(tmp_path / 'short.json'))
    assert code == 2 and 'lists 3 images but the dataset has 6' in err


def _validate_probe(cli, root: Path, tmp_path: Path, monkeypatch, *flags: str):
    """validate.py with ``flags`` on the 3-class folder: (results row, what reached the evaluation loop)."""
    seen = {}
    real = validate.evaluate

    def spy(model, loader, device, **kw):
        seen.update(model=type(model).__name__, amp=kw.get('amp'), batch=loader.batch_size,
                    workers=loader.num_workers, transform=repr(loader.dataset.transform),
                    log_every=kw.get('log_every'), progress=kw.get('progress'))
        return real(model, loader, device, **kw)

    monkeypatch.setattr(validate, 'evaluate', spy)
    results = tmp_path / f'r{len(list(tmp_path.glob("r*.json")))}.json'
    flags = [f.replace('{root}', str(root)) for f in flags]
    code, out, err = cli(validate, [str(root), '-m', 'overlock_xt', '--checkpoint', str(root / 'c3.pth'),
                                    '--model-kwargs', *tiny_cli_kwargs(), '-b', '2', '-j', '0', '--no-progress',
                                    '--results-file', str(results), *flags])
    assert code == 0, err
    return json.loads(results.read_text())[0], seen


VALIDATE_PROBES = {
    '--img-size': (['--img-size', '40'], lambda r, s: r['img_size'] == 40),
    '--input-size': (['--input-size', '3', '40', '48'], lambda r, s: r['img_size'] == 48),
    '--crop-pct': (['--crop-pct', '0.5'], lambda r, s: r['crop_pct'] == 0.5),
    '--interpolation': (['--interpolation', 'bilinear'], lambda r, s: 'bilinear' in s['transform']),
    '--mean': (['--mean', '0.1', '0.2', '0.3'], lambda r, s: 'mean=tensor([0.1000, 0.2000, 0.3000])' in s['transform']),
    '--std': (['--std', '0.1', '0.2', '0.3'], lambda r, s: 'std=tensor([0.1000, 0.2000, 0.3000])' in s['transform']),
    '-b': (['-b', '3'], lambda r, s: s['batch'] == 3),
    '--batch-size': (['--batch-size', '3'], lambda r, s: s['batch'] == 3),
    '-j': (['-j', '1'], lambda r, s: s['workers'] == 1),
    '--workers': (['--workers', '1'], lambda r, s: s['workers'] == 1),
    '--amp': (['--amp'], lambda r, s: s['amp'] == torch.bfloat16),
    '--native-amp': (['--native-amp'], lambda r, s: s['amp'] == torch.float16),
    '--apex-amp': (['--apex-amp'], lambda r, s: s['amp'] == torch.float16),
    '--torchscript': (['--torchscript'], lambda r, s: s['model'] == 'RecursiveScriptModule'),
    '--channels-last': (['--channels-last'], None),
    '--log-freq': (['--log-freq', '2'], lambda r, s: s['log_every'] == 2 and not s['progress']),
    '--test-pool': (['--test-pool', '--img-size', '256'], lambda r, s: s['model'] == 'PooledLogits' and
                    r['crop_pct'] == 1.0),
    '--split': (['--split', 'train'], lambda r, s: r['loss'] != 0),
    '--checkpoint': (['--checkpoint', '{root}/c3.pth'], None),
    '--use-ema': (['--use-ema'], lambda r, s: True),  # the EMA's classifier differs
}


@pytest.mark.parametrize('flag', sorted(VALIDATE_PROBES))
def test_validate_option_changes_the_evaluation(flag, imagenet_like, tmp_path, monkeypatch, cli):
    flags, expect = VALIDATE_PROBES[flag]
    base_flags = ['--img-size', '256'] if flag == '--test-pool' else ['--img-size', '32']
    base = _validate_probe(cli, imagenet_like, tmp_path, monkeypatch, *base_flags)
    changed = _validate_probe(cli, imagenet_like, tmp_path, monkeypatch, *base_flags, *flags)
    if expect is None:  # same numbers by design (memory layout, the same file, weights without EMA)
        assert changed[0]['top1'] == base[0]['top1']
        return
    assert changed != base and expect(*changed), (flag, changed)


def test_validate_other_original_options(imagenet_like, tmp_path, monkeypatch, cli, caplog):
    root = imagenet_like
    # -d torch/folder: torchvision's ImageFolder; --checkpoint FOLDER; --model FILE listing names
    row, _ = _validate_probe(cli, root, tmp_path, monkeypatch, '-d', 'torch/folder', '--img-size', '32')
    plain, _ = _validate_probe(cli, root, tmp_path, monkeypatch, '--img-size', '32')
    assert row['loss'] == pytest.approx(plain['loss'], abs=1e-6)
    folder = tmp_path / 'ckpts'
    folder.mkdir()
    for name in ('b.pth', 'a.pth.tar'):
        (folder / name).write_bytes((root / 'c3.pth').read_bytes())
    (tmp_path / 'names.txt').write_text('overlock_xt\n')
    code, out, err = cli(validate, [str(root), '-m', str(tmp_path / 'names.txt'), '--checkpoint', str(folder),
                                    '--model-kwargs', *tiny_cli_kwargs(), '--img-size', '32', '-j', '0',
                                    '--no-progress'])
    assert code == 0, err
    assert out.index('a.pth.tar') < out.index('b.pth')  # every checkpoint of the folder, in natural order
    # --gp reaches the model (OverLoCK pools by average only); --num-gpu on a machine without GPUs
    code, out, err = cli(validate, [str(root), '--checkpoint', str(root / 'c3.pth'), '--gp', 'max',
                                    '--model-kwargs', *tiny_cli_kwargs(), '--img-size', '32', '--no-progress'])
    assert code == 2 and "got global_pool='max'" in err
    assert '--num-gpu 2:' in ' '.join(validate._notes(validate.parse_args(['d', '--num-gpu', '2', '--device', 'cpu'])))
    # --tf-preprocessing without TensorFlow; --dataset-download for a torch/ dataset
    monkeypatch.setitem(sys.modules, 'tensorflow', None)
    import importlib.util
    real_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: None if n == 'tensorflow' else real_spec(n, *a))
    code, out, err = cli(validate, [str(root), '--checkpoint', str(root / 'c3.pth'), '--tf-preprocessing',
                                    '--model-kwargs', *tiny_cli_kwargs(), '--no-progress'])
    assert code == 2 and err.count('\n') == 1 and 'needs TensorFlow' in err
    code, out, err = cli(validate, [str(tmp_path / 'nowhere'), '-d', 'torch/cifar10', '--checkpoint',
                                    str(root / 'c3.pth'), '--model-kwargs', *tiny_cli_kwargs(), '--no-progress'])
    assert code == 2 and 'pass --dataset-download' in err


def test_worker_seeding_part_leaves_numpy_to_torchs_worker_seeding():
    from utils.data import SeededSamples

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return float(np.random.rand())

    def draws(seed_numpy: bool) -> List[float]:
        loader = torch.utils.data.DataLoader(SeededSamples(Draws(), seed_numpy), batch_size=None, num_workers=1,
                                             sampler=[(0, 11), (1, 12)], generator=torch.Generator().manual_seed(5))
        return [float(v) for v in loader]

    expected = []
    for seed in (11, 12):
        np.random.seed(seed)
        expected.append(float(np.random.rand()))
    assert draws(True) == expected  # all: numpy seeded with each sample's seed
    assert draws(False) != expected and draws(False) == draws(False)  # part: torch's seeding, still reproducible


def test_validate_without_a_checkpoint_evaluates_the_published_weights(data_dir, monkeypatch, cli):
    """As the original validate.py: no --checkpoint means the published weights (here: offline, so the one-line
    error says how to pass the file)."""
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(timm.models._builder, 'download_cached_file', offline)
    code, out, err = cli(validate, [str(data_dir), '--model', 'overlock_xt', '--img-size', '32', '--no-progress'])
    assert code == 2 and 'could not fetch the pretrained weights of overlock_xt' in err
