"""The shipped recipe: written once in configs/base.yaml, each variant stating what differs."""
from pathlib import Path

import pytest
import yaml

from utils.cli import UsageError, load_config_file, parse_args_with_config
from utils.config import build_train_parser

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'

# What configs/overlock_*.yaml held when each file spelled out the whole recipe: the split into a shared
# base and per-variant files must resolve to exactly these values.
RECIPE = {
    'img_size': 224, 'batch_size': 256, 'grad_accum_steps': 1, 'workers': 8, 'pin_mem': True, 'opt': 'adamw',
    'weight_decay': 0.05, 'auto_lr': True, 'lr_base': 0.001, 'lr_base_size': 1024, 'clip_grad': 5.0,
    'clip_mode': 'norm', 'sched': 'cosine', 'epochs': 300, 'warmup_epochs': 5, 'warmup_lr': 1e-06,
    'min_lr': 1e-05, 'cooldown_epochs': 10, 'scale': [0.08, 1.0], 'hflip': 0.5, 'color_jitter': 0.4,
    'aa': 'rand-m9-mstd0.5-inc1', 'train_interpolation': 'random', 'reprob': 0.25, 'remode': 'pixel',
    'mixup': 0.8, 'cutmix': 1.0, 'mixup_switch_prob': 0.5, 'smoothing': 0.1, 'aux_loss_ratio': 0.4,
    'model_ema': True, 'model_ema_decay': 0.9999, 'amp': True, 'amp_dtype': 'float16', 'sync_bn': True,
    'seed': 42, 'grad_checkpoint': False,
}
DROP_PATH = {'overlock_xt': 0.1, 'overlock_t': 0.15, 'overlock_s': 0.4, 'overlock_b': 0.5}


@pytest.mark.parametrize('name', sorted(DROP_PATH))
def test_variant_config_resolves_to_the_full_recipe(name):
    path = CONFIGS / f'{name}.yaml'
    assert load_config_file(str(path)) == {**RECIPE, 'model': name, 'drop_path': DROP_PATH[name]}
    own = yaml.safe_load(path.read_text())
    assert set(own) == {'_base_', 'model', 'drop_path'}  # only what differs
    args = parse_args_with_config(build_train_parser(), ['-c', str(path), '--data-dir', 'x', '--epochs', '3'])
    assert (args.model, args.drop_path, args.epochs, args.mixup) == (name, DROP_PATH[name], 3, 0.8)


def test_base_chain_overrides_and_errors(tmp_path):
    (tmp_path / 'a.yaml').write_text('epochs: 1\nlr: 0.1\n')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'b.yaml').write_text('_base_: ../a.yaml\nepochs: 2\n')
    (tmp_path / 'c.yaml').write_text('_base_: sub/b.yaml\nseed: 3\n')
    assert load_config_file(str(tmp_path / 'c.yaml')) == {'epochs': 2, 'lr': 0.1, 'seed': 3}
    (tmp_path / 'loop.yaml').write_text('_base_: loop.yaml\n')
    with pytest.raises(UsageError, match='includes itself'):
        load_config_file(str(tmp_path / 'loop.yaml'))
    (tmp_path / 'gone.yaml').write_text('_base_: nothing.yaml\n')
    with pytest.raises(UsageError, match=r'gone\.yaml: _base_ nothing\.yaml does not exist'):
        load_config_file(str(tmp_path / 'gone.yaml'))
