"""The shipped training recipe as users run it: its augmentation on many images, and train.py with a
config file as shipped.

Rare paths matter here: the recipe's RandAugment samples magnitude 10 for about one image in a thousand, and
before ``utils.augment.install_posterize`` that image stopped training on Pillow >= 11; every op is therefore
applied at the edge magnitudes on purpose, and the random policies run on a few hundred images besides.
"""
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from tests.helpers import REPO, TINY, make_image_folder, read_summary, run_inprocess
from utils.augment import build_train_transform, install_posterize, posterize

CONFIGS = sorted((REPO / 'configs').glob('overlock_*.yaml'))


def _recipe_value(key: str, config: str = 'overlock_xt'):
    from utils.cli import load_config_file
    return load_config_file(str(REPO / 'configs' / f'{config}.yaml'))[key]


def _config_args(config: str, *extra: str):
    from utils.cli import parse_args_with_config
    from utils.config import build_train_parser
    return parse_args_with_config(build_train_parser(), ['-c', str(REPO / 'configs' / f'{config}.yaml'), *extra])


def _random_images(n: int, seed: int = 0, modes=('RGB',)):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(1, 24, size=2)
        mode = modes[i % len(modes)]
        shape = (h, w, 3) if mode == 'RGB' else (h, w)
        yield Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _rand_augment(config: str):
    from timm.data.auto_augment import rand_augment_transform
    install_posterize()
    return rand_augment_transform(config, dict(translate_const=10, img_mean=(124, 116, 104)))


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_posterize_zero_bits_is_black_and_otherwise_pillows(mode):
    img = next(_random_images(1, seed=3, modes=(mode,)))
    black = posterize(img, 0)
    assert black.mode == mode and black.size == img.size
    assert np.array(black).max() == 0
    for bits in range(1, 8):
        assert np.array_equal(np.array(posterize(img, bits)), np.array(ImageOps.posterize(img, bits)))
    assert posterize(img, 8) is img


@pytest.mark.parametrize('inc', [0, 1])
@pytest.mark.parametrize('magnitude', [0, 5, 9, 10])
def test_every_rand_augment_op_at_edge_magnitudes(inc, magnitude):
    """Each op of both op sets, applied for sure (prob 1, no magnitude noise), on sizes from 1x1 up."""
    ra = _rand_augment(f'rand-m{magnitude}-mstd0-inc{inc}')
    assert len(ra.ops) >= 14
    sizes = [(1, 1), (1, 7), (5, 3), (32, 32), (224, 224)]
    rng = np.random.default_rng(magnitude)
    for op in ra.ops:
        op.prob = 1.0
        for w, h in sizes:
            out = op(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
            assert out.size == (w, h), op.name
    # The 0-bit cases: PosterizeIncreasing at 10 and Posterize at 0 give black, as old Pillow did.
    zero_bit = {('PosterizeIncreasing', 10), ('Posterize', 0)}
    for op in ra.ops:
        if (op.name, magnitude) in zero_bit:
            out = op(Image.fromarray(rng.integers(1, 256, (9, 9, 3), dtype=np.uint8)))
            assert np.array(out).max() == 0, op.name


@pytest.mark.parametrize('config', [
    'recipe', 'rand-m10-mstd0.5-inc1', 'rand-m10-mstd0.5-inc0', 'rand-m0-mstd0.5-inc1', 'rand-m0-mstd0.5-inc0'])
def test_rand_augment_policies_on_random_images(config):
    config = _recipe_value('aa') if config == 'recipe' else config
    ra = _rand_augment(config)
    for img in _random_images(250, seed=len(config)):  # the dataset hands RGB images over
        ra(img)


@pytest.mark.parametrize('config', [c.stem for c in CONFIGS])
def test_config_pipeline_loss_optimizer_schedule(config: str, tmp_path: Path):
    """What each config selects, built by train.py's own builders with the config's values: the worker
    transform on many images, the device-side normalise / mix / erase, the loss, the optimizer step with
    clipping, and the whole schedule (warm-up, cosine, cool-down)."""
    import math
    import timm
    import torch
    from utils.distributed import DistInfo
    from utils.train_setup import (build_datasets, build_device_augment, build_loaders, build_loss, build_optimizer,
                                   build_scheduler, resolve_lr)
    assert len(CONFIGS) == 4
    data = make_image_folder(tmp_path / 'data', n_train=2, n_val=1, size=8)
    args = _config_args(config, '--data-dir', str(data), '--img-size', '16', '-j', '0', '-b', '4')
    args.num_classes = 3
    assert args.aa == _recipe_value('aa', config) and args.model == config
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'))
    train_set, val_set = build_datasets(args)
    cfg = dict(input_size=(3, 16, 16), interpolation='bicubic', mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225), crop_pct=0.9)
    build_loaders(args, info, train_set, val_set, cfg)
    batch = torch.stack([train_set.transform(img) for img in _random_images(250, seed=7)])
    assert batch.dtype == torch.uint8 and batch.shape == (250, 3, 16, 16)
    mixup, criterion = build_loss(args)
    device_train, device_eval = build_device_augment(args, cfg, torch.device('cpu'), mixup)
    x, y = device_train(batch[:64], torch.arange(64) % 3)
    assert torch.isfinite(x).all() and y.shape == (64, 3)
    model = timm.create_model('resnet10t', num_classes=3, drop_path_rate=args.drop_path)
    loss = criterion(model(x[:8]), y[:8])
    loss.backward()
    args.lr = resolve_lr(args, global_batch=2048)  # the release's 8 x 256
    assert args.lr == pytest.approx(2e-3)
    optimizer = build_optimizer(args, model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    optimizer.step()
    scheduler, num_epochs = build_scheduler(args, optimizer, updates_per_epoch=10)
    assert num_epochs == args.epochs + args.cooldown_epochs
    lrs = []
    for epoch in range(num_epochs):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert all(math.isfinite(v) and v > 0 for v in lrs)
    assert lrs[0] == pytest.approx(args.warmup_lr)
    assert max(lrs) == pytest.approx(args.lr, rel=1e-2)
    assert lrs[-1] == pytest.approx(args.min_lr)


@pytest.mark.slow
@pytest.mark.parametrize('config,n_train', [('overlock_xt', 100)])
def test_shipped_config_trains_on_the_cpu(tmp_path: Path, config: str, n_train: int):
    """``train.py -c configs/overlock_xt.yaml`` as shipped (float16 AMP, EMA, SyncBN, the full augmentation,
    the config's loss, optimizer and schedule) with only data, model size, batch, image size, epochs and
    workers made small: 300 augmented images. The other configs differ only in the model and drop path
    (tests/test_train_config.py checks what each resolves to)."""
    data = make_image_folder(tmp_path / 'data', n_train=n_train, n_val=4, size=40)
    out = tmp_path / 'out'
    argv = ['-c', str(REPO / 'configs' / f'{config}.yaml'), '--data-dir', str(data), '--output', str(out),
            *TINY[2:], '-b', '30', '--epochs', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0', '-j', '0',
            '--device', 'cpu']
    code, err = run_inprocess(argv)
    assert code == 0, err
    saved = yaml.safe_load((out / 'args.yaml').read_text())
    assert saved['model'] == config
    for key in ('aa', 'amp', 'amp_dtype', 'model_ema', 'mixup', 'cutmix', 'reprob', 'smoothing'):
        assert saved[key] == _recipe_value(key), key
    assert len(read_summary(out / 'summary.csv')) == 1
