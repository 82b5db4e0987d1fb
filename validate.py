#!/usr/bin/env python3
"""Evaluate OverLoCK (or any timm) models on an ImageFolder: top-1, top-5, loss, images/s.

    python validate.py /data/imagenet --model overlock_t --pretrained
    python validate.py /data/imagenet --model overlock_t --checkpoint overlock_t_in1k_224.pth --reparam
    python validate.py /data/imagenet --model 'overlock*' --pretrained --results-file results.csv
    python validate.py /data/imagenet --model overlock_xt overlock_t --checkpoint xt.pth t.pth
    python validate.py /data/imagenet --onnx overlock_t.onnx     # an exported file, in ONNX Runtime (CPU)
    python validate.py /data/imagenet --onnx t_ov.onnx --runtime openvino   # ... or in OpenVINO
    python validate.py /data/imagenet --model overlock_t --pretrained --real-labels real.json   # ImageNet-ReaL
    python validate.py /data/imagenet-a --model overlock_t --pretrained --valid-labels imagenet_a_classes.txt

DATA is the dataset root (its val/ or validation/ folder is used) or the class-folder root itself.
Checkpoints may be the original release's files, our training checkpoints (--use-ema: the EMA weights)
or deploy checkpoints from reparam.py (detected from the keys); a folder evaluates each of its checkpoints.
Every option of the original release's validate.py is accepted. See docs/evaluation.md.
"""
import argparse
import glob
import logging
import os
from typing import List, Optional

import torch

from utils.cli import UsageError, add_model_kwargs_arg, add_na2d_backend_arg, apply_na2d_backend, one_line, run_cli
from utils.evaluate import (
    append_results, build_eval_model, eval_dataset, evaluate, expand_model_names, is_deploy, markdown_table,
    apply_test_pool, read_valid_labels, real_labels_scorer, rounded,
)
from utils.measure.dtypes import dtype_name, parse_dtype
from utils.export import EXPORT_RUNTIMES
from utils.runtime import RUNTIMES, prepare

_logger = logging.getLogger('validate')
TABLE_COLUMNS = ['model', 'checkpoint', 'top1', 'top5', 'loss', 'images_per_sec', 'img_size', 'crop_pct', 'reparam',
                 'params_m']

# Options of the original validate.py that change nothing here, and why (one log line each when set).
NO_EFFECT = {
    'no_prefetcher': '--no-prefetcher: images are normalised in the loader workers either way (the same numbers)',
    'legacy_jit': '--legacy-jit: the legacy JIT executor of PyTorch 1.5-1.6 no longer exists; TorchScript runs '
                  'with the current one',
    'pin_mem': '--pin-mem: batches are pinned whenever they go to a GPU',
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DATA', help='dataset root (with val/) or a class-folder root')
    p.add_argument('--dataset', '-d', default='', metavar='NAME',
                   help='empty: image folders or DATA/val.tar; wds/NAME: webdataset shards in DATA; hfds/NAME: a '
                        'Hugging Face dataset (DATA: its cache folder); torch/NAME: a torchvision dataset')
    p.add_argument('--split', default='val', metavar='NAME', help='the split to evaluate (val also finds validation)')
    p.add_argument('--dataset-download', action='store_true',
                   help='let a torch/ or tfds/ dataset download itself into DATA')
    p.add_argument('--class-map', default='', metavar='FILE', help='class name -> index file (tar, wds, hfds)')
    p.add_argument('--model', '-m', nargs='+', default=['overlock_xt'], metavar='NAME',
                   help='model name(s), patterns such as "overlock*", or a text file listing names')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help='the published weights')
    src.add_argument('--checkpoint', nargs='+', default=None, metavar='PATH',
                     help='checkpoint file(s), one per --model (or one for all); a folder: each *.pth / *.pth.tar '
                          'in it')
    src.add_argument('--onnx', nargs='+', default=None, metavar='FILE',
                     help='exported ONNX file(s) (scripts/export_onnx.py), run on the CPU in ONNX Runtime (or '
                          'OpenVINO: --runtime) with the preprocessing stored in the file')
    p.add_argument('--use-ema', action='store_true', help='the EMA weights of a training checkpoint')
    p.add_argument('--reparam', action='store_true', help='re-parameterise (merge branches) after loading')
    p.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint')
    p.add_argument('--gp', default=None, metavar='POOL',
                   help="global pooling of the model (OverLoCK: 'avg', its default; other timm models: theirs)")
    p.add_argument('--img-size', type=int, default=None, help="default: the model's pretrained_cfg")
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N',
                   help='channels, height and width of the input (e.g. 3 288 288); wins over --img-size')
    p.add_argument('--crop-pct', type=float, default=None, help="default: the model's (0.925-0.975)")
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='M', help="default: the model's")
    p.add_argument('--std', type=float, nargs='+', default=None, metavar='S', help="default: the model's")
    p.add_argument('--interpolation', default=None, help="default: the model's (bicubic)")
    p.add_argument('--test-pool', action='store_true',
                   help='test-time pooling when the input is larger than the training size: the classifier over '
                        'every window of the training size, its logits average- and max-pooled (crop_pct 1.0)')
    p.add_argument('--real-labels', default='', metavar='FILE',
                   help='ImageNet-ReaL labels (its real.json): top-1/top-5 against them (images named '
                        'ILSVRC2012_val_*.JPEG)')
    p.add_argument('--valid-labels', default='', metavar='FILE',
                   help='class indices (one per line) the data covers, e.g. the 200 of ImageNet-A/-R: only those '
                        'logits compete')
    p.add_argument('--tf-preprocessing', action='store_true',
                   help='TensorFlow\'s inference preprocessing (decode, central crop, resize), for ported weights; '
                        'needs TensorFlow')
    add_model_kwargs_arg(p)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--num-gpu', type=int, default=1, metavar='N', help='split each batch over N GPUs (DataParallel)')
    p.add_argument('--amp', action='store_true', help='mixed precision (--amp-dtype)')
    p.add_argument('--native-amp', action='store_true', help='the original\'s spelling: float16 mixed precision')
    p.add_argument('--apex-amp', action='store_true',
                   help='the original\'s NVIDIA Apex AMP: float16 mixed precision with torch\'s autocast here')
    p.add_argument('--amp-dtype', default='bfloat16', type=dtype_name, help='bfloat16 (bf16) or float16 (fp16)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--torchscript', action='store_true', help='evaluate the TorchScript (torch.jit.script) form')
    add_na2d_backend_arg(p)
    p.add_argument('--skip-corrupt', action='store_true', help='skip unreadable images (logged)')
    p.add_argument('--results-file', default='', metavar='F', help='append results to F.csv or F.json')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--log-freq', type=int, default=None, metavar='N',
                   help='a log line every N batches instead of the progress bar')
    p.add_argument('--runtime', default=None, choices=RUNTIMES,
                   help='run the inference form (float32; OverLoCK fused, on openvino its deploy form) on this '
                        'runtime instead of the model as built; with --onnx: onnxruntime (the default) or openvino')
    p.add_argument('--threads', type=int, default=0,
                   help='ONNX Runtime / OpenVINO intra-op threads (0: their default)')
    p.add_argument('--no-prefetcher', action='store_true', help='accepted for the original\'s command lines; no '
                                                                'effect')
    p.add_argument('--pin-mem', action='store_true', help='accepted for the original\'s command lines; no effect')
    p.add_argument('--legacy-jit', action='store_true', help='accepted for the original\'s command lines; no effect')
    args = p.parse_args(argv)
    if args.native_amp or args.apex_amp:
        args.amp, args.amp_dtype = True, 'float16'  # the original's native AMP: torch.cuda.amp.autocast (float16)
    if args.log_freq is not None and args.log_freq < 1:
        raise UsageError(f'--log-freq must be >= 1, got {args.log_freq}')
    if args.num_gpu < 1:
        raise UsageError(f'--num-gpu must be >= 1, got {args.num_gpu}')
    if args.runtime:
        clash = [flag for flag, on in (('--amp', args.amp), ('--torchscript', args.torchscript),
                                       ('--num-gpu', args.num_gpu > 1), ('--test-pool', args.test_pool)) if on]
        if clash:
            raise UsageError(f'--runtime {args.runtime} runs the float32 inference form; it does not combine with '
                             f'{" ".join(clash)} (leave --runtime out to evaluate the model as built)')
        if args.onnx and args.runtime not in EXPORT_RUNTIMES:
            raise UsageError(f'--runtime {args.runtime} with --onnx: an exported file runs on '
                             f'{" or ".join(EXPORT_RUNTIMES)}')
    if args.input_size is not None and min(args.input_size) < 1:
        raise UsageError(f'--input-size needs 3 numbers >= 1 (channels height width), got '
                         f'{" ".join(map(str, args.input_size))}')
    return args


def _notes(args: argparse.Namespace) -> List[str]:
    """Log lines for options that are taken otherwise here or have no effect."""
    notes = [line for dest, line in NO_EFFECT.items() if getattr(args, dest)]
    if args.apex_amp:
        notes.append('--apex-amp: NVIDIA Apex is not used; float16 autocast (the same mixed precision) stands in')
    if args.num_gpu > 1 and (not args.device.startswith('cuda') or torch.cuda.device_count() < args.num_gpu):
        notes.append(f'--num-gpu {args.num_gpu}: {torch.cuda.device_count()} GPU(s) visible on --device '
                     f'{args.device}; evaluating on one device')
    return notes


def _checkpoints(args: argparse.Namespace) -> Optional[List[str]]:
    """``--checkpoint`` with each folder replaced by the checkpoints in it (natural order, as the original)."""
    if args.checkpoint is None:
        return None
    from timm.utils import natural_key
    out = []
    for path in args.checkpoint:
        if os.path.isdir(path):
            found = glob.glob(os.path.join(path, '*.pth.tar')) + glob.glob(os.path.join(path, '*.pth'))
            if not found:
                raise UsageError(f'--checkpoint {path} is a folder without *.pth or *.pth.tar files')
            out.extend(sorted(found, key=natural_key))
        else:
            out.append(path)
    return out


def _model_names(names: List[str]) -> List[str]:
    """``--model`` values, a text file of names (one per line) read as the original does."""
    out = []
    for name in names:
        if os.path.isfile(name):
            with open(name, encoding='utf-8') as f:
                out.extend(line.strip() for line in f if line.strip() and not line.startswith('#'))
        else:
            out.append(name)
    return expand_model_names(out)


def _data_config(args: argparse.Namespace, model) -> dict:
    """timm's data config of ``model`` with the command line's overrides."""
    import timm.data
    overrides = {k: v for k, v in (('crop_pct', args.crop_pct), ('interpolation', args.interpolation),
                                   ('mean', args.mean), ('std', args.std)) if v}
    if args.img_size:
        overrides['input_size'] = (3, args.img_size, args.img_size)
    if args.input_size:
        overrides['input_size'] = tuple(args.input_size)
    return timm.data.resolve_data_config(overrides, model=model)


def _eval_transform(args: argparse.Namespace, cfg: dict):
    """The evaluation transform: timm's (resize, centre crop, normalise), or TensorFlow's with
    ``--tf-preprocessing``."""
    import timm.data
    if not args.tf_preprocessing:
        return timm.data.create_transform(**cfg, is_training=False)
    import importlib.util
    if importlib.util.find_spec('tensorflow') is None:
        raise UsageError('--tf-preprocessing needs TensorFlow, which is not installed (pip install tensorflow-cpu); '
                         'without the option timm\'s own preprocessing is used')
    from utils.evaluate import TfPreprocessing
    return TfPreprocessing(cfg)


def _dataset(args: argparse.Namespace, transform):
    """The evaluation set: an image folder, or tar / ``--dataset`` wds, hfds through timm's dataset factory."""
    from utils.data import build_timm_dataset, dataset_classes, split_tar
    tar = split_tar(args.data, args.split) if os.path.exists(args.data) else None
    if not args.dataset and tar is None and not args.class_map:
        dataset = eval_dataset(args.data, transform, skip_corrupt=args.skip_corrupt)
        if args.tf_preprocessing:
            dataset.decode = _raw_bytes  # TensorFlow decodes the file itself
        return dataset, len(dataset.classes)
    if args.tf_preprocessing:
        raise UsageError('--tf-preprocessing reads image folders (not tar files or --dataset)')
    dataset = build_timm_dataset(args.dataset, tar or args.data, args.split, is_training=False,
                                 class_map=args.class_map, batch_size=args.batch_size, num_workers=args.workers,
                                 download=args.dataset_download)
    dataset.transform = transform
    dataset.root = args.dataset or tar
    return dataset, len(dataset_classes(dataset))


def _raw_bytes(img) -> bytes:
    """The file's bytes, for TensorFlow's decoder (``--tf-preprocessing``)."""
    img.fp.seek(0)
    return img.fp.read()


def _validate_onnx(args: argparse.Namespace) -> int:
    """Evaluate exported files in ONNX Runtime or OpenVINO (CPU, float32) with the preprocessing stored at
    export."""
    import timm.data
    from utils.export import load_exported

    if args.batch_size < 1:
        raise UsageError('--batch-size must be >= 1')
    ignored = [flag for flag, on in (('--amp', args.amp), ('--channels-last', args.channels_last),
                                     ('--reparam', args.reparam), ('--use-ema', args.use_ema),
                                     ('--torchscript', args.torchscript), ('--test-pool', args.test_pool),
                                     ('--gp', args.gp), ('--tf-preprocessing', args.tf_preprocessing),
                                     ('--real-labels', args.real_labels), ('--valid-labels', args.valid_labels))
               if on]
    if ignored:
        _logger.info('--onnx: %s do not apply to an exported file (float32, its graph as exported)',
                     ' '.join(ignored))
    device = torch.device('cpu')
    results = []
    for path in args.onnx:
        model = load_exported(path, args.runtime or 'onnxruntime', threads=args.threads)
        meta = model.metadata
        arch = meta.get('architecture', path)
        if args.img_size and tuple(meta['input_size'][1:]) != (args.img_size, args.img_size):
            raise UsageError(f'--img-size {args.img_size}: {path} was exported for input '
                             f'{"x".join(map(str, meta["input_size"][1:]))}; export again at that size')
        overrides = {k: v for k, v in (('crop_pct', args.crop_pct), ('interpolation', args.interpolation)) if v}
        cfg = timm.data.resolve_data_config(overrides, pretrained_cfg=meta)
        transform = timm.data.create_transform(**cfg, is_training=False)
        dataset, n_classes = _dataset(args, transform)
        if model.num_classes and n_classes and model.num_classes != n_classes:
            raise UsageError(f'{dataset.root} has {n_classes} class folders but {path} has '
                             f'{model.num_classes} outputs')
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.workers, persistent_workers=False)
        _logger.info('%s (%s, %s): %d images, input %s, crop_pct %s, %s', arch, path, args.runtime or 'onnxruntime',
                     len(dataset),
                     cfg['input_size'][1:], cfg['crop_pct'], cfg['interpolation'])
        metrics = rounded(evaluate(model, loader, device, progress=not args.no_progress, desc=arch))
        if getattr(dataset, 'num_skipped', 0):
            _logger.warning('%d unreadable images were skipped', dataset.num_skipped)
        row = {'model': arch, 'checkpoint': path, **metrics, 'img_size': cfg['input_size'][-1],
               'crop_pct': cfg['crop_pct'], 'interpolation': cfg['interpolation'], 'reparam': True,
               'params_m': round(meta['params'] / 1e6, 3) if meta.get('params') else ''}
        _logger.info('%s: top-1 %.3f  top-5 %.3f  loss %.4f  %.1f images/s', arch, row['top1'], row['top5'],
                     row['loss'], row['images_per_sec'])
        results.append(row)
    print(markdown_table(results, TABLE_COLUMNS))
    if args.results_file:
        append_results(args.results_file, results)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    for line in _notes(args):
        _logger.info(line)
    apply_na2d_backend(args.na2d_backend, 'cpu' if args.onnx else args.device)
    if args.onnx:
        return _validate_onnx(args)
    if args.data and not os.path.exists(args.data) and not args.dataset.lower().startswith(('hfds/', 'torch/',
                                                                                              'tfds/')):
        raise UsageError(f'data directory {args.data} does not exist')
    names = _model_names(args.model)
    if not args.checkpoint and not args.pretrained and not args.model_kwargs:
        # As the original validate.py: with no weights named, the published ones ("might as well validate
        # something"); a model with other constructor arguments has none and starts from random weights.
        _logger.info('No --checkpoint: evaluating the published weights (--pretrained)')
        args.pretrained = True
    checkpoints = _checkpoints(args) or [None]
    if len(checkpoints) == 1:
        checkpoints = checkpoints * len(names)
    elif len(names) == 1:
        names = names * len(checkpoints)
    if len(checkpoints) != len(names):
        raise UsageError(f'{len(names)} models but {len(checkpoints)} checkpoints: give one checkpoint per model')
    if args.batch_size < 1:
        raise UsageError('--batch-size must be >= 1')
    device = torch.device(args.device)
    amp = parse_dtype(args.amp_dtype) if args.amp else None
    valid = read_valid_labels(args.valid_labels) if args.valid_labels else None

    results = []
    for name, ckpt in zip(names, checkpoints):
        model = build_eval_model(name, checkpoint=ckpt, pretrained=args.pretrained, use_ema=args.use_ema,
                                 num_classes=args.num_classes, model_kwargs=args.model_kwargs, global_pool=args.gp)
        arch = model.pretrained_cfg.get('architecture', name)
        if args.reparam:
            if is_deploy(model):
                _logger.info('%s is already in deploy form: --reparam changes nothing', arch)
            else:
                model.reparameterize()
        n_params = sum(p.numel() for p in model.parameters())
        deploy = is_deploy(model)
        cfg = _data_config(args, model)
        in_chans = getattr(model, 'in_chans', None) or model.pretrained_cfg.get('input_size', (3,))[0]
        if cfg['input_size'][0] != in_chans:
            raise UsageError(f'--input-size {" ".join(map(str, cfg["input_size"]))}: {arch} takes {in_chans} '
                             f'input channels')
        if args.test_pool:
            model, pooled = apply_test_pool(model, cfg)
            if pooled:
                cfg['crop_pct'] = 1.0
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.torchscript:
            try:
                model = torch.jit.script(model)
            except Exception as e:  # noqa: BLE001 -- TorchScript raises many types; one line is what helps
                raise UsageError(f'--torchscript: {arch} does not script ({one_line(e)[:200]})') from None
        if args.runtime:
            model, seconds = prepare(model, args.runtime, cfg['input_size'], threads=args.threads)
            _logger.info('%s: inference form on %s (prepared in %.1f s)', arch, args.runtime, seconds)
        if args.num_gpu > 1 and device.type == 'cuda' and torch.cuda.device_count() >= args.num_gpu:
            model = torch.nn.DataParallel(model, device_ids=list(range(args.num_gpu)))

        transform = _eval_transform(args, cfg)
        dataset, n_classes = _dataset(args, transform)
        num_out = getattr(model, 'num_classes', None) or getattr(getattr(model, 'module', None), 'num_classes', None)
        if valid is not None:
            if num_out and max(valid) >= num_out:
                raise UsageError(f'--valid-labels {args.valid_labels} names class {max(valid)} but {arch} has '
                                 f'{num_out} outputs')
            if n_classes and n_classes != len(valid):
                raise UsageError(f'--valid-labels {args.valid_labels} lists {len(valid)} classes but {dataset.root} '
                                 f'has {n_classes} class folders')
        elif num_out and n_classes and num_out != n_classes:
            raise UsageError(
                f'{dataset.root} has {n_classes} class folders but the classifier of {arch} has '
                f'{num_out} outputs; use a checkpoint trained on these classes (or --num-classes to fine-tune; '
                f'--valid-labels for a class subset)')
        real = real_labels_scorer(dataset, args.real_labels, num_out or 1000) if args.real_labels else None
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
            pin_memory=device.type == 'cuda', persistent_workers=False)
        _logger.info('%s: %d images, input %s, crop_pct %s, %s%s', arch, len(dataset), cfg['input_size'][1:],
                     cfg['crop_pct'], cfg['interpolation'],
                     f', {len(valid)} of {num_out} classes (--valid-labels)' if valid is not None else '')
        metrics = rounded(evaluate(model, loader, device, amp=amp, channels_last=args.channels_last,
                                   progress=not args.no_progress and args.log_freq is None, desc=arch,
                                   classes=valid, on_logits=real.add_result if real is not None else None,
                                   log_every=args.log_freq))
        if real is not None:
            metrics.update(rounded({'top1': real.get_accuracy(k=1), 'top5': real.get_accuracy(k=real.topk[-1])}))
            _logger.info('%s: ImageNet-ReaL top-1 %.3f top-5 %.3f (%s)', arch, metrics['top1'], metrics['top5'],
                         args.real_labels)
        if getattr(dataset, 'num_skipped', 0):
            _logger.warning('%d unreadable images were skipped', dataset.num_skipped)
        row = {'model': arch, 'checkpoint': ckpt or ('pretrained' if args.pretrained else 'random init'),
               **metrics, 'img_size': cfg['input_size'][-1], 'crop_pct': cfg['crop_pct'],
               'interpolation': cfg['interpolation'], 'reparam': deploy, 'params_m': round(n_params / 1e6, 3)}
        speed = row['images_per_sec']
        _logger.info('%s: top-1 %.3f  top-5 %.3f  loss %.4f%s', arch, row['top1'], row['top5'], row['loss'],
                     f'  {speed:.1f} images/s' if speed == speed else '')  # nan: not measurable
        results.append(row)
    print(markdown_table(results, TABLE_COLUMNS))
    if args.results_file:
        append_results(args.results_file, results)
    return 0


if __name__ == '__main__':
    run_cli(main)
