"""The input pipeline as the original's: uint8 batches from the workers, normalisation, Mixup/CutMix and then
random erasing on the device."""
import numpy as np
import pytest
import torch

from utils.augment import DeviceAugment
from utils.config import build_train_parser
from utils.distributed import DistInfo
from utils.train_setup import build_datasets, build_device_augment, build_loaders, build_loss

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _args(data_dir, *argv):
    return build_train_parser().parse_args(['--data-dir', str(data_dir), '-b', '4', '-j', '0', '--img-size', '32',
                                            *argv])


def _loaders(args):
    train_set, val_set = build_datasets(args)
    cfg = {'input_size': (3, 32, 32), 'mean': MEAN, 'std': STD, 'interpolation': 'bicubic', 'crop_pct': 0.875}
    return build_loaders(args, DistInfo(), train_set, val_set, cfg), cfg


def test_workers_hand_over_uint8_batches_without_normalising_or_erasing(data_dir):
    args = _args(data_dir, '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25')
    loaders, _ = _loaders(args)
    x, y = next(iter(loaders.train))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    transform = loaders.train.dataset.dataset.transform  # timm's, inside the per-sample seeding wrapper
    names = [type(t).__name__ for t in transform.transforms]
    assert 'Normalize' not in names and 'RandomErasing' not in names, names
    xv, _ = next(iter(loaders.val))
    assert xv.dtype == torch.uint8


def test_device_normalisation_equals_the_per_image_transform(data_dir):
    """Evaluation sees the same numbers as with timm's float transform (ToTensor + Normalize on the CPU)."""
    from timm.data import create_transform
    from PIL import Image
    loaders, cfg = _loaders(_args(data_dir))
    path = loaders.val.dataset.samples[0][0]
    img = Image.open(path).convert('RGB')
    reference = create_transform(cfg['input_size'], is_training=False, mean=MEAN, std=STD,
                                 interpolation='bicubic', crop_pct=0.875)(img)
    uint8 = loaders.val.dataset.transform(img)
    x, _ = DeviceAugment(MEAN, STD, torch.device('cpu'))(uint8[None], torch.tensor([0]))
    torch.testing.assert_close(x[0], reference, atol=1e-5, rtol=0)


def test_random_erasing_comes_after_mixing():
    """An erased patch holds the erasing value in the mixed image; erased before mixing it would be blended
    with the other image (and a CutMix box could cut it away)."""
    from timm.data import Mixup
    np.random.seed(0)
    torch.manual_seed(0)
    colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [120, 120, 20]], dtype=torch.uint8)
    x = colours[:, :, None, None].expand(4, 3, 16, 16).contiguous()
    y = torch.arange(4)
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, num_classes=4)
    prep = DeviceAugment(MEAN, STD, torch.device('cpu'), mixup=mixup, re_prob=1.0, re_mode='const')
    out, target = prep(x, y)
    assert target.shape == (4, 4) and torch.allclose(target.sum(1), torch.ones(4))
    for img in out:
        erased = (img == 0).all(0)  # const mode writes 0 (the mean) on every channel
        assert 0 < int(erased.sum()) < 16 * 16
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        assert int(erased.sum()) == len(rows) * len(cols)  # one rectangle
        assert (img[:, ~erased] != 0).all()  # the rest is the mixed image


def test_training_batch_steps_follow_the_options(data_dir):
    args = _args(data_dir, '--mixup', '0.8', '--cutmix', '1.0', '--reprob', '0.25', '--remode', 'pixel',
                 '--channels-last')
    args.num_classes = 3
    mixup, _ = build_loss(args)
    train, evaluate = build_device_augment(args, {'mean': MEAN, 'std': STD}, torch.device('cpu'), mixup)
    assert train.mixup is mixup and train.erase is not None and train.erase.probability == 0.25
    assert evaluate.mixup is None and evaluate.erase is None
    x, y = train(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) and y.shape == (4, 3)
