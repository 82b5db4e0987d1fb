"""Semantic segmentation: the original's dense backbones and UPerNet against reference outputs of the original
code, the released checkpoints' layouts, mmseg 0.30's ADE20K pipelines and metric, and the command lines.

Reference data (tests/data): ``dense_manifest.json`` and ``golden_dense_t.pt`` (OverLoCK-T) and
``dense_tiny_reference.pt`` (tiny widths) were computed with the original's segmentation/ and detection/ code
through mmseg 0.30.0 / mmdet 2.28.2 (float64; the weight fill of ``tests.helpers.reference_fill``). ``ade20k_mmseg030_reference.pt`` was computed with mmsegmentation 0.30.0 and
mmcv 1.7.2 (OpenCV 4.10): for five JPEG photographs (stored in it), the test pipeline's output; for seeded runs
of the training pipeline, every random draw, the image and label after each transform and the numpy state
after it; and mmseg's ``eval_metrics`` on generated prediction / label pairs.
"""
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scripts.segment as segment
from models import CheckpointError
from models.dense import (
    ADE20K_CLASSES, UPerNet, checkpoint_task, create_backbone, create_segmenter, load_backbone_weights,
    load_dense_checkpoint,
)
from tests.helpers import DATA, TINY_KWARGS, make_ade20k_folder, reference_fill
from utils.seg_train import param_groups, poly_lr, seg_loss
from utils.segmentation import IoUAccumulator, TrainTransform, inference_transform, reduce_zero_label

MANIFEST = json.loads((DATA / 'dense_manifest.json').read_text())
TINY_SEG = {**{k: v for k, v in TINY_KWARGS.items() if k != 'projection'}, 'channels': 16, 'aux_channels': 8}
TINY_CLI = [f'{k}={v}'.replace(' ', '') for k, v in TINY_SEG.items()]


def _crc(a) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


def _shapes(name: str, prefix: str = ''):
    return {k: tuple(s) for k, s in MANIFEST[name]['state_dict'] if k.startswith(prefix)}


# --- models and released layouts -----------------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['t', 's', 'b'])
def test_segmenters_and_detection_backbones_have_the_released_keys(variant):
    with torch.device('meta'):
        seg = create_segmenter(f'upernet_overlock_{variant}')
        det = create_backbone(f'overlock_{variant}', detection=True)
    sd = seg.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, tuple(s)) for k, s in MANIFEST[f'seg_{variant}'][
        'state_dict']]  # the same keys, shapes and order
    assert sum(p.numel() for p in seg.parameters()) == MANIFEST[f'seg_{variant}']['params_total']
    det_sd = {f'backbone.{k}': tuple(v.shape) for k, v in det.state_dict().items()}
    assert det_sd == _shapes(f'det_{variant}', 'backbone.')


def _reference_t():
    return torch.load(DATA / 'golden_dense_t.pt', weights_only=True)


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-6) -> float:
    err = float((ours.float() - ref).abs().max() / ref.abs().max())
    assert err < tol, err
    return err


def test_tiny_segmenter_and_detection_backbone_equal_the_original():
    """The same check at tiny widths (reference of the original's code through mmseg 0.30's EncoderDecoder, 5
    classes, heads of 16 / 8 channels); at 96x128 the /16 and /32 maps are smaller than their kernels, so
    ContMix's resize path runs too."""
    ref = torch.load(DATA / 'dense_tiny_reference.pt', weights_only=True)
    tiny = {k: v for k, v in ref['config']['backbone'].items() if k in TINY_KWARGS}
    seg = create_segmenter('upernet_overlock_t', num_classes=5, channels=16, aux_channels=8, drop_path_rate=0.0,
                           **tiny).double().eval()
    assert [[k, list(v.shape)] for k, v in seg.state_dict().items()] == ref['seg/state_dict_keys']
    seg.load_state_dict(reference_fill(dict(ref['seg/state_dict_keys'])), strict=False)
    det = create_backbone('overlock_t', detection=True, drop_path_rate=0.0, **tiny).double().eval()
    det_shapes = dict(ref['det/state_dict_keys'])
    assert {f'backbone.{k}': list(v.shape) for k, v in det.state_dict().items()} == det_shapes
    det.load_state_dict({k[len('backbone.'):]: v for k, v in reference_fill(det_shapes).items()}, strict=False)
    x = ref['input']
    with torch.no_grad():
        maps = seg.backbone(x)
        for ours, theirs in zip(maps, ref['seg/backbone']):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(seg.decode_head(maps), ref['seg/decode_head'], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(seg.auxiliary_head(maps[2]), ref['seg/auxiliary_head'], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(seg(x), ref['seg/logits'], rtol=1e-10, atol=1e-12)
        for ours, theirs in zip(det(x), ref['det/backbone']):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_overlock_t_segmenter_equals_the_original():
    """float64, the reference's weights and input: every map and head within float32 rounding of the stored
    float32 values (the reference was computed in float64). The detection backbone's maps are checked in
    tests/test_detection.py."""
    ref = _reference_t()
    x = ref['input'].double()
    seg = create_segmenter('upernet_overlock_t').double().eval()
    seg.load_state_dict(reference_fill(_shapes('seg_t')), strict=False)  # num_batches_tracked not filled
    with torch.no_grad():
        maps = seg.backbone(x)
        for ours, theirs in zip(maps, ref['seg/backbone']):
            _close(ours, theirs)
        _close(seg.decode_head(maps), ref['seg/decode_head'])
        _close(seg.auxiliary_head(maps[2]), ref['seg/auxiliary_head'])
        _close(seg(x)[:, :, ::8, ::8], ref['seg/logits_every_8th_pixel'])


def test_the_backbone_feeds_the_normalised_stage_2_map_on():
    """What sets the release's backbones apart from the classifier's trunk (without it the last two maps
    differ entirely): stage 3 takes the LayerNorm2d output of stage 2."""
    torch.manual_seed(0)
    backbone = create_backbone('overlock_t', **TINY_KWARGS).eval()
    with torch.no_grad():
        for norm in backbone.extra_norm:
            norm.weight.normal_(1, 0.3)
        x = torch.randn(1, 3, 64, 64)
        maps = backbone(x)
        plain = backbone._stage3(backbone._stage2(backbone._stage1(x)))
        fed = backbone._stage3(maps[1])
        assert torch.allclose(backbone._stage4(fed), backbone._stage4(fed))
        assert not torch.allclose(plain, fed, atol=1e-3)
        x16, h, prior = backbone._focus3(fed, backbone._stage4(fed))
        torch.testing.assert_close(maps[2], backbone.extra_norm[2](torch.cat([x16, h], 1)))


def _mmcv_file(path: Path, state_dict, **extra) -> Path:
    """A file in the released layout: mmcv's checkpoint with meta (numpy scalars included), optimizer."""
    meta = {'mmcv_version': '1.7.2', 'time': 'Thu Jan 16 2025', 'iter': 160000, 'epoch': 1,
            'CLASSES': ADE20K_CLASSES, 'PALETTE': [[120, 120, 120]] * 150, 'config': 'model = dict(...)',
            'hook_msgs': {'last_ckpt': 'work_dirs/iter_160000.pth', 'best_score': np.float64(50.3),
                          'best_ckpt': 'work_dirs/best_mIoU_iter_152000.pth'}}
    opt = {'state': {0: {'step': torch.tensor(160000.), 'exp_avg': torch.zeros(3), 'exp_avg_sq': torch.zeros(3)}},
           'param_groups': [{'lr': 0.0, 'betas': (0.9, 0.999), 'weight_decay': 0.01, 'params': [0]}]}
    torch.save({'meta': meta, 'state_dict': state_dict, 'optimizer': opt, **extra}, path)
    return path


def _tiny_segmenter(**kw) -> UPerNet:
    torch.manual_seed(0)
    return create_segmenter('upernet_overlock_t', **{**TINY_SEG, **kw})


def test_released_file_layout_loads_strictly_weights_only_also_in_deploy_form(tmp_path):
    model = _tiny_segmenter().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the deploy merge is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = _mmcv_file(tmp_path / 'upernet_overlock_tiny_ade20k.pth', model.state_dict())
    fresh = _tiny_segmenter(drop_path_rate=0.0)
    meta = load_dense_checkpoint(fresh, str(path), 'segmentation')
    assert meta['iter'] == 160000 and float(meta['hook_msgs']['best_score']) == 50.3
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fresh.eval()(x), expected)
        deploy = create_segmenter('upernet_overlock_t', reparam=True, **TINY_SEG).eval()
        load_dense_checkpoint(deploy, str(path), 'segmentation')
        torch.testing.assert_close(deploy(x), expected, rtol=1e-4, atol=1e-5)


def test_files_of_another_task_or_unsafe_files_are_refused_in_one_line(tmp_path):
    model = _tiny_segmenter()
    det = {f'backbone.{k}': v for k, v in create_backbone('overlock_t', detection=True, **TINY_KWARGS)
           .state_dict().items()}
    det['rpn_head.rpn_conv.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match='holds a detection model, not a segmentation one'):
        load_dense_checkpoint(model, str(_mmcv_file(tmp_path / 'det.pth', det)), 'segmentation')
    import timm
    cls = timm.create_model('overlock_t', **TINY_KWARGS).state_dict()
    torch.save(cls, tmp_path / 'cls.pth')
    with pytest.raises(CheckpointError, match='classification model.*--pretrained-path'):
        load_dense_checkpoint(model, str(tmp_path / 'cls.pth'), 'segmentation')
    other = create_segmenter('upernet_overlock_t', **{**TINY_SEG, 'channels': 8}).state_dict()
    with pytest.raises(CheckpointError, match='does not fit this segmentation model: .*shape mismatches'):
        load_dense_checkpoint(model, str(_mmcv_file(tmp_path / 'other.pth', other)), 'segmentation')
    _mmcv_file(tmp_path / 'unsafe.pth', model.state_dict(), extra=Path('x'))
    with pytest.raises(CheckpointError, match='cannot be loaded safely.*PosixPath'):
        load_dense_checkpoint(model, str(tmp_path / 'unsafe.pth'), 'segmentation')
    assert checkpoint_task(cls) == 'classification' and checkpoint_task(det) == 'detection'


def test_backbone_starts_from_imagenet_weights(tmp_path):
    import timm
    torch.manual_seed(1)
    cls = timm.create_model('overlock_t', **TINY_KWARGS, use_ds=True)
    torch.save({'state_dict': cls.state_dict()}, tmp_path / 'overlock_t_in1k_224.pth')
    backbone = create_backbone('overlock_t', detection=True, **TINY_KWARGS)
    load_backbone_weights(backbone, str(tmp_path / 'overlock_t_in1k_224.pth'))
    ours = backbone.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in cls.state_dict().items() if not k.startswith(('head', 'aux')))


# --- mmseg 0.30's pipelines and metric -----------------------------------------------------------------------

@pytest.fixture(scope='module')
def mmseg_reference():
    return torch.load(DATA / 'ade20k_mmseg030_reference.pt', weights_only=True)


def _decode(ref, name):
    import cv2
    return cv2.imdecode(ref['inputs'][name].numpy(), cv2.IMREAD_COLOR)


def test_test_pipeline_gives_mmsegs_pixels_bit_for_bit(mmseg_reference):
    for name, expected in mmseg_reference['test'].items():
        x, size = inference_transform(_decode(mmseg_reference, name))
        assert list(x.shape) == expected['img_shape_chw'] and list(size) == expected['ori_shape'][:2], name
        assert _crc(x.numpy()) == expected['img_crc32'], name


def test_training_pipeline_draws_and_augments_as_mmseg(mmseg_reference):
    for record in mmseg_reference['train'] + mmseg_reference['train_extra']:
        img = _decode(mmseg_reference, record['input'])
        raw = np.array(Image.open(io.BytesIO(mmseg_reference['annotations'][record['annotation']].numpy().tobytes())))
        np.random.seed(record['seed'])
        x, y = TrainTransform()(img, reduce_zero_label(raw))
        key = (record['input'], record['annotation'], record['seed'])
        assert _crc(x.numpy()) == record['img_crc32'], key
        assert y.dtype == torch.int64 and _crc(y.numpy()) == record['gt_crc32_int64'], key
        assert np.random.random() == record['next_random'], key  # the same random numbers were consumed


def _metric_pairs(case):
    if case == 'A_random':
        for i in range(3):
            rng = np.random.default_rng(100 + i)
            yield rng.integers(0, 150, (37, 53)), rng.integers(0, 151, (37, 53)).astype(np.uint8)
    elif case == 'B_absent_classes':
        for i in range(2):
            rng = np.random.default_rng(200 + i)
            yield rng.integers(0, 5, (37, 53)), rng.integers(0, 4, (37, 53)).astype(np.uint8)
    else:
        for i in range(2):
            gt = np.random.default_rng(300 + i).integers(0, 151, (37, 53)).astype(np.uint8)
            yield np.where(gt > 0, gt.astype(np.int64) - 1, 0), gt


def test_miou_equals_mmsegs(mmseg_reference):
    for case, expected in mmseg_reference['metrics'].items():
        acc = IoUAccumulator(150)
        for pred, gt in _metric_pairs(case):
            acc.add(pred, reduce_zero_label(gt))
        per, summary = acc.per_class(), acc.summary()
        np.testing.assert_array_equal(per['IoU'], np.asarray(expected['IoU']))
        np.testing.assert_array_equal(per['Acc'], np.asarray(expected['Acc']))
        assert summary['mIoU'] == pytest.approx(100 * expected['mIoU'], abs=1e-12)
        assert summary['aAcc'] == pytest.approx(100 * expected['aAcc'], abs=1e-12)


def test_miou_on_a_hand_computed_case():
    """2 classes; raw labels 0 (ignored), 1, 2 -> 255, 0, 1."""
    acc = IoUAccumulator(2)
    acc.add(np.array([[0, 0, 1], [1, 1, 0]]), reduce_zero_label(np.array([[1, 2, 2], [2, 0, 1]], dtype=np.uint8)))
    # kept pixels: (pred, label) = (0,0) (0,1) (1,1) (1,1) (0,0): class 0: I 2, U 3; class 1: I 2, U 3
    np.testing.assert_allclose(acc.per_class()['IoU'], [2 / 3, 2 / 3])
    assert acc.summary()['aAcc'] == pytest.approx(80.0)
    acc.add(np.array([[1]]), np.array([[1]], dtype=np.uint8))  # intersections and unions add up over images
    np.testing.assert_allclose(acc.per_class()['IoU'], [2 / 3, 3 / 4])


# --- the recipe's pieces -------------------------------------------------------------------------------------

def test_poly_schedule_with_linear_warmup_as_mmcv():
    assert poly_lr(6e-5, 0, 160000) == pytest.approx(6e-5 * 1e-6)
    assert poly_lr(6e-5, 750, 160000) == pytest.approx(6e-5 * (1 - 750 / 160000) * (1 - 0.5 * (1 - 1e-6)))
    assert poly_lr(6e-5, 1500, 160000) == pytest.approx(6e-5 * (1 - 1500 / 160000))
    assert poly_lr(6e-5, 160000, 160000) == 0.0


def test_weight_decay_spares_parameters_named_norm():
    model = _tiny_segmenter()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay['weight_decay'] == 0 and decay['weight_decay'] == 0.01
    assert all('norm' in names[id(p)] for p in no_decay['params'])
    assert any(names[id(p)].startswith('backbone.extra_norm') for p in no_decay['params'])
    assert any(names[id(p)].startswith('decode_head') and '.bn.' in names[id(p)] for p in decay['params'])


def test_loss_counts_ignored_pixels_as_zero_in_the_mean():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [255, 255]]])
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction='sum')
    assert seg_loss(logits, target) == pytest.approx(float(ce) / 4)  # 4 pixels, 2 ignored
    both = seg_loss({'main': logits, 'aux': logits}, target)
    assert both == pytest.approx(1.4 * float(ce) / 4)


# --- command lines ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    root = make_ade20k_folder(tmp_path_factory.mktemp('ade'))
    ckpt = root / 'seg.pth'
    model = _tiny_segmenter()
    torch.save({'meta': {'iter': 1}, 'state_dict': model.state_dict()}, ckpt)
    return root, ckpt


def test_predict_writes_pictures_and_labels(ade, tmp_path, cli):
    root, ckpt = ade
    code, out, err = cli(segment, ['predict', str(root / 'images' / 'validation'), '--checkpoint', str(ckpt),
                                   '--model-kwargs', *TINY_CLI, '--output', str(tmp_path / 'p'), '--save-labels'])
    assert code == 0, err
    pictures = sorted(p.name for p in (tmp_path / 'p').iterdir())
    assert pictures == ['ADE_validation_00000000.png', 'ADE_validation_00000000_labels.png',
                        'ADE_validation_00000001.png', 'ADE_validation_00000001_labels.png']
    labels = np.array(Image.open(tmp_path / 'p' / 'ADE_validation_00000000_labels.png'))
    picture = Image.open(tmp_path / 'p' / 'ADE_validation_00000000.png')
    assert labels.shape == (72, 96) and labels.max() < 150 and picture.width > 96  # the legend beside it


def test_evaluate_prints_the_table_and_agrees_with_the_metric(ade, tmp_path, cli):
    root, ckpt = ade
    code, out, err = cli(segment, ['evaluate', str(root), '--checkpoint', str(ckpt), '--model-kwargs', *TINY_CLI,
                                   '-j', '0', '--no-progress', '--results-file', str(tmp_path / 'r.csv')])
    assert code == 0, err
    assert '| wall |' in out and '| aAcc | mIoU | mAcc |' in out
    # the same numbers by hand: test pipeline, whole inference, argmax, IoU over the two images
    from utils.segmentation import ADE20KFolder, whole_inference
    model = _tiny_segmenter()
    model.load_state_dict(torch.load(ckpt, weights_only=True)['state_dict'])
    model.eval()
    acc = IoUAccumulator(150)
    for x, label, size, _ in ADE20KFolder(str(root), 'validation'):
        acc.add(whole_inference(model, x[None], size).argmax(1)[0].numpy(), label.numpy())
    mean = [line for line in (tmp_path / 'r.csv').read_text().splitlines() if line.startswith('mean,')][0]
    assert float(mean.split(',')[1]) == round(acc.summary()['mIoU'], 2)


@pytest.mark.parametrize('case', ['missing', 'layout', 'no_annotation', 'other_task', 'no_checkpoint'])
def test_segment_bad_input_is_one_line(case, ade, tmp_path, cli):
    root, ckpt = ade
    argv = ['evaluate', str(root), '--checkpoint', str(ckpt), '--model-kwargs', *TINY_CLI, '-j', '0']
    if case == 'missing':
        argv[1], expect = str(tmp_path / 'nope'), 'does not exist'
    elif case == 'layout':
        (tmp_path / 'flat').mkdir()
        argv[1], expect = str(tmp_path / 'flat'), 'is not an ADE20K-layout folder'
    elif case == 'no_annotation':
        import shutil
        shutil.copytree(root, tmp_path / 'a')
        (tmp_path / 'a' / 'annotations' / 'validation' / 'ADE_validation_00000001.png').unlink()
        argv[1], expect = str(tmp_path / 'a'), 'have no annotation'
    elif case == 'other_task':
        import timm
        torch.save(timm.create_model('overlock_t', **TINY_KWARGS).state_dict(), tmp_path / 'cls.pth')
        argv[3], expect = str(tmp_path / 'cls.pth'), 'holds a classification model'
    else:
        argv[3], expect = str(tmp_path / 'none.pth'), 'does not exist'
    code, out, err = cli(segment, argv)
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1 and expect in err, err


def _train(root: Path, out: Path, *flags: str):
    from tests.helpers import run_main
    return run_main(segment, ['train', '--data-dir', str(root), '--output', str(out), '--model-kwargs', *TINY_CLI,
                              '-j', '0', '--crop-size', '64', '--log-interval', '1', '--device', 'cpu',
                              '--eval-interval', '0', *flags], threads=1)


@pytest.mark.slow
def test_fine_tuning_resumes_exactly_after_a_preemption(ade, tmp_path, monkeypatch):
    """4 updates straight, and a run preempted after update 2 (SIGTERM: it saves last.pth and stops) then
    resumed with --resume auto: the same weights, bit for bit (data order, the augmentation's random draws,
    AdamW's state, the schedule), and an evaluation of the final model."""
    import signal
    from tests.helpers import load, state_dicts_equal
    from utils.seg_train import SegFineTune
    root, _ = ade
    code, out, err = _train(root, tmp_path / 'full', '--max-iters', '4', '--ckpt-interval', '4')
    assert code == 0, err
    real = SegFineTune._after_update

    def preempt_at_2(self, *a):
        if self.iter == 2:
            self.preemption.signum = signal.SIGTERM
        return real(self, *a)

    monkeypatch.setattr(SegFineTune, '_after_update', preempt_at_2)
    code, out, err = _train(root, tmp_path / 'part', '--max-iters', '4', '--ckpt-interval', '4')
    assert code == 0 and 'Preempted (SIGTERM) at iteration 2' in err, err
    assert load(tmp_path / 'part' / 'last.pth')['iter'] == 2
    monkeypatch.setattr(SegFineTune, '_after_update', real)
    code, out, err = _train(root, tmp_path / 'part', '--max-iters', '4', '--ckpt-interval', '4', '--resume', 'auto',
                            '--eval-interval', '4')
    assert code == 0 and 'Resumed' in err, err
    full, part = load(tmp_path / 'full' / 'last.pth'), load(tmp_path / 'part' / 'last.pth')
    assert part['iter'] == 4 and state_dicts_equal(full, part, keys=('state_dict',)) is None
    assert (tmp_path / 'part' / 'eval.csv').read_text().startswith('iter,mIoU')
    code, out, err = _train(root, tmp_path / 'part', '--max-iters', '4')
    assert code == 2 and 'holds another run' in err


@pytest.mark.slow
def test_fine_tuning_on_two_processes_with_torchrun(ade, tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP): the run trains, evaluates each process's shard of the
    validation images and sums the counts; the sharded evaluation equals a single-process one."""
    import subprocess
    import sys
    from tests.helpers import REPO, free_port, load, subprocess_env
    root, _ = ade
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           '-m', 'scripts.segment', 'train', '--data-dir', str(root), '--output', str(out), '--model-kwargs',
           *TINY_CLI, '-j', '0', '--crop-size', '64', '--device', 'cpu', '-b', '2', '--max-iters', '2',
           '--eval-interval', '2', '--ckpt-interval', '2', '--log-interval', '1']
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '2 process(es) x batch 2' in proc.stderr and 'Iter 2: mIoU' in proc.stderr
    state = load(out / 'last.pth')
    assert state['iter'] == 2 and len(state['rng']) == 2
    sharded = float(proc.stderr.split('Iter 2: mIoU ')[1].split()[0])
    model = _tiny_segmenter()
    model.load_state_dict(state['state_dict'])
    from utils.seg_train import evaluate_segmentation
    from utils.segmentation import ADE20KFolder
    single = evaluate_segmentation(model, ADE20KFolder(str(root), 'validation'), torch.device('cpu'), 150,
                                   workers=0).summary()['mIoU']
    assert sharded == pytest.approx(single, abs=0.006)  # the log prints 2 decimals


def test_training_refuses_what_cannot_work_in_one_line(ade, tmp_path):
    root, ckpt = ade
    for flags, expect in ((['-b', '1'], 'needs at least 2 images per batch'),
                          (['--resume', str(tmp_path / 'none.pth')], 'does not exist'),
                          (['--finetune', str(ckpt), '--pretrained-path', str(ckpt)], 'pass only one'),
                          (['--pretrained-path', str(ckpt)], 'holds a segmentation model, not ImageNet')):
        code, out, err = _train(root, tmp_path / 'r', '--max-iters', '1', *flags)
        assert code == 2 and err.strip().splitlines()[-1].startswith('error: ') and expect in err, (flags, err)
