"""The pieces of train.py alone: builders, step parts, training state round trip."""
import argparse
import math

import pytest
import torch
from torch import nn

from utils.checkpoint import get_rng_state, read_training_checkpoint, restore_training_state, training_state
from utils.config import build_train_parser
from utils.distributed import DistInfo
from utils.train_setup import build_loss, build_optimizer, build_scheduler, resolve_lr
from utils.train_step import (
    NonFiniteGuard, NonFiniteLoss, ProgressLog, accumulation_group, compute_loss, forward_backward, optimizer_step,
)


def _args(*argv: str) -> argparse.Namespace:
    return build_train_parser().parse_args(['--data-dir', 'x', *argv])


def test_accumulation_groups_cover_the_epoch_and_end_short():
    n, accum = 7, 3
    plan = [accumulation_group(i, n, accum) for i in range(n)]
    assert [u for _, u in plan] == [False, False, True, False, False, True, True]
    assert [s for s, _ in plan] == [3, 3, 3, 3, 3, 3, 1]  # the last group holds one batch
    assert all(accumulation_group(i, 5, 1) == (1, True) for i in range(5))


def test_accumulated_gradient_equals_the_full_batch_gradient():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss_fn = lambda out, t: compute_loss(nn.CrossEntropyLoss(), out, t, 0.4)  # noqa: E731
    forward_backward(model, x, y, loss_fn, 1, None, torch.enable_grad)
    full = model.weight.grad.clone()
    model.zero_grad()
    for part in (slice(0, 3), slice(3, 6)):
        forward_backward(model, x[part], y[part], loss_fn, 2, None, torch.enable_grad)
    torch.testing.assert_close(model.weight.grad, full)


def test_aux_head_loss_is_added_with_its_ratio():
    crit = nn.CrossEntropyLoss()
    t = torch.tensor([0, 1])
    main, aux = torch.randn(2, 3), torch.randn(2, 3)
    loss, aux_loss = compute_loss(crit, {'main': main, 'aux': aux}, t, 0.4)
    torch.testing.assert_close(loss, crit(main, t) + 0.4 * crit(aux, t))
    assert not aux_loss.requires_grad
    assert compute_loss(crit, main, t, 0.4)[1] is None


def test_optimizer_step_clips_and_the_scaler_skips_an_overflow():
    model = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.weight.grad = torch.tensor([[30.0, 40.0]])  # norm 50
    optimizer_step(opt, model.parameters, None, clip_grad=5.0)
    w = model.weight.detach().clone()
    assert model.weight.grad is None
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0)
    scaler.scale(model(torch.tensor([[3e38, 3e38]])).sum()).backward()  # overflows to inf
    optimizer_step(opt, model.parameters, scaler, clip_grad=5.0)
    assert torch.equal(model.weight.detach(), w)  # the overflowing step was skipped
    assert scaler.get_scale() == 1.0  # and the scale halved


def test_nonfinite_guard_names_the_first_bad_step(tmp_path):
    guard = NonFiniteGuard(DistInfo(), batches_per_epoch=10, output=str(tmp_path))
    guard.add(0, 3, torch.tensor(1.0))
    guard.check()
    assert guard.pending == []
    guard.add(1, 4, torch.tensor(2.0))
    guard.add(1, 5, torch.tensor(float('nan')))
    with pytest.raises(NonFiniteLoss, match=r'\(nan\) at epoch 2, step 6 of 10; no checkpoint written yet'):
        guard.check()


def test_progress_line_reports_window_and_epoch_means():
    log = ProgressLog(interval=2, images_per_update=8, device=torch.device('cpu'))
    for v in (1.0, 3.0):
        log.add_loss(torch.tensor(v))
        log.add_data_time(0.5)
    log.updates = 2
    assert log.due(2, False) and not log.due(3, False) and log.due(3, True)
    line = log.line(epoch=0, num_epochs=3, update_idx=2, updates_per_epoch=10, epoch_mean=1.5, lr=1e-3)
    assert line.startswith('Train: 1/3 [ 2/10 ( 20%)] loss 2.0000 (1.5000)  lr 1.000e-03')
    assert 'data 0.500s' in line
    log.reset()
    assert log.window.tolist() == [0.0, 0.0] and log.updates == 0


def test_lr_and_schedule_builders():
    args = _args('--auto-lr', '--lr-base', '1e-3')
    assert resolve_lr(args, 2048) == pytest.approx(2e-3)
    assert resolve_lr(_args(), 2048) == pytest.approx(1e-3)  # no scaling without --auto-lr
    args = _args('--epochs', '4', '--warmup-epochs', '1', '--cooldown-epochs', '2', '--lr', '0.1')
    opt = build_optimizer(args, nn.Linear(3, 2))
    sched, epochs = build_scheduler(args, opt, updates_per_epoch=5)
    assert epochs == 6 and opt.param_groups[0]['lr'] == pytest.approx(args.warmup_lr)
    sched.step(1)
    cosine = 1e-5 + 0.5 * (0.1 - 1e-5) * (1 + math.cos(math.pi / 4))  # warm-up done, 1 of 4 epochs
    assert opt.param_groups[0]['lr'] == pytest.approx(cosine)


def test_loss_builder_matches_the_options():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup, crit = build_loss(_args('--num-classes', '5'))  # the defaults: mixup 0.8, cutmix 1.0
    assert mixup is not None and isinstance(crit, SoftTargetCrossEntropy)
    no_mix = ('--mixup', '0', '--cutmix', '0')
    mixup, crit = build_loss(_args(*no_mix, '--smoothing', '0.1'))
    assert mixup is None and isinstance(crit, LabelSmoothingCrossEntropy)
    assert isinstance(build_loss(_args(*no_mix, '--smoothing', '0'))[1], nn.CrossEntropyLoss)


def test_training_state_round_trip(tmp_path):
    from utils.checkpoint import atomic_save
    torch.manual_seed(0)
    args = _args('--model', 'overlock_xt', '--lr', '0.1', '--epochs', '3', '--warmup-epochs', '0',
                 '--cooldown-epochs', '0', '-b', '2')
    model = nn.Linear(3, 2)
    opt = build_optimizer(args, model)
    sched, _ = build_scheduler(args, opt, updates_per_epoch=4)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step(1)
    state = training_state(args, epoch=1, step_in_epoch=2, global_step=6, model=model, optimizer=opt,
                           scheduler=sched, rng=[get_rng_state()], epoch_stats=[1.0, 0.0, 2.0], summary=[])
    atomic_save(state, str(tmp_path / 'last.pth'))
    assert read_training_checkpoint(str(tmp_path / 'last.pth'))['global_step'] == 6

    model2 = nn.Linear(3, 2)
    opt2 = build_optimizer(args, model2)
    sched2, _ = build_scheduler(args, opt2, updates_per_epoch=4)
    point = restore_training_state(str(tmp_path / 'last.pth'), args, model=model2, optimizer=opt2, scheduler=sched2,
                                   batches_per_epoch=4, updates_per_epoch=4)
    assert (point.epoch, point.step, point.global_step, point.epoch_stats) == (1, 2, 6, [1.0, 0.0, 2.0])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert opt2.state_dict()['state'].keys() == opt.state_dict()['state'].keys()
    assert len(point.rng) == 1 and math.isfinite(point.checkpoint_args['lr'])
