"""Command-line plumbing shared by train.py, validate.py and reparam.py.

User errors (bad flags, bad files, bad data) become one line ``error: <msg>`` and exit code 2; real bugs keep
their traceback. A YAML config file (``-c/--config``) sets the parser's defaults and the command line wins.
"""
import argparse
import ast
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Sequence

if TYPE_CHECKING:
    import torch

__all__ = [
    'UsageError', 'run_cli', 'parse_kwargs', 'add_model_kwargs_arg', 'add_model_args', 'parse_args_with_config',
    'load_config_file', 'BASE_KEY', 'create_model_from_args', 'model_kwargs_from_args', 'user_error_types', 'one_line',
    'NA2D_BACKENDS', 'add_na2d_backend_arg', 'apply_na2d_backend', 'na2d_backend_advice', 'FALLBACK_HINT',
]

_logger = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A user error (bad flag, file or value); the CLI prints it as one line and exits with code 2."""


def user_error_types() -> tuple:
    """The exception types shown to the user as one line instead of a traceback."""
    from .data import DataError
    types = [UsageError, DataError]
    try:
        from models import CheckpointError  # lazy: models imports timm, slow for `--help`
        types.append(CheckpointError)
    except ImportError:  # models/ not importable (broken checkout): other errors still print nicely
        pass
    return tuple(types)


def one_line(err: BaseException) -> str:
    """A one-line message for ``err``, unwrapping errors re-raised from DataLoader worker processes."""
    msg = str(err).strip()
    if 'Original Traceback' in msg:
        # DataLoader workers re-raise as "Caught X in DataLoader worker ... Traceback ...\nmod.X: <message>"
        last = [line for line in msg.splitlines() if line.strip()][-1].strip()
        head, sep, tail = last.partition(': ')
        msg = tail if sep and '.' in head and ' ' not in head else last
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return ' '.join(lines) if lines else type(err).__name__


def run_cli(main: Callable[[], Optional[int]]) -> NoReturn:
    """Run ``main()`` and exit with its return code; user errors print ``error: <msg>`` and exit 2.

    Args:
        main: the script's entry point; returns an exit code or None (0).
    """
    try:
        code = main()
    except user_error_types() as e:
        print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0 if code is None else int(code))


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value  # a bare word such as `gelu` stays a string, as in timm's --model-kwargs


def parse_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``['a=1', 'b=[2, 3]', 'c=gelu']`` -> ``{'a': 1, 'b': [2, 3], 'c': 'gelu'}`` (values as Python literals).

    Args:
        items: ``key=value`` strings (or a dict from a config file); ``None`` or empty gives ``{}``.
    """
    if isinstance(items, dict):  # from a YAML config (model_kwargs: {depth: [2, 2, 3, 2]}): already parsed
        return dict(items)
    if isinstance(items, str):
        items = [items]
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition('=')
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f'--model-kwargs item {item!r} is not key=value (e.g. depth=[2,2,3,2])')
        out[key] = _literal(value.strip())
    return out


def add_model_kwargs_arg(parser, help: str = 'extra model constructor arguments, values read as Python literals'):
    """Add ``--model-kwargs KEY=VALUE ...`` (read by :func:`parse_kwargs`) to a parser or argument group, so that
    every script spells it alike; ``help`` where a script gives it another reach (some models only)."""
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help=help)


def add_model_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the model flags shared by the scripts: --model, --num-classes, --img-size, --in-chans,
    --model-kwargs, --drop-path, --grad-checkpoint, --ckpt-stg."""
    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='overlock_xt', type=str, metavar='NAME',
                       help='registered model name (see timm.list_models("overlock*"))')
    group.add_argument('--num-classes', default=None, type=int, metavar='N',
                       help='classifier classes; None: from the data, or the model\'s default')
    group.add_argument('--img-size', default=None, type=int, metavar='N',
                       help='input image size; None: the model\'s pretrained_cfg (224)')
    group.add_argument('--in-chans', default=None, type=int, metavar='N',
                       help='input channels; None: the model\'s default (3)')
    add_model_kwargs_arg(group)
    group.add_argument('--drop-path', default=None, type=float, metavar='P', help='drop path (stochastic depth) rate')
    group.add_argument('--grad-checkpoint', action=argparse.BooleanOptionalAction, default=False,
                       help='activation checkpointing (all blocks, or the first --ckpt-stg blocks per stage)')
    group.add_argument('--ckpt-stg', default=None, type=int, nargs='+', metavar='N',
                       help='with --grad-checkpoint: checkpoint the first N blocks of each of the 4 stages '
                            '(4 numbers)')
    return group


NA2D_BACKENDS = ('auto', 'triton', 'torch', 'natten')
FALLBACK_HINT = '--na2d-backend torch (or OVERLOCK_NA2D_BACKEND=torch)'


def add_na2d_backend_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--na2d-backend``, the scripts' spelling of the environment variable OVERLOCK_NA2D_BACKEND."""
    parser.add_argument('--na2d-backend', default='auto', metavar='|'.join(NA2D_BACKENDS),
                        help='backend of the ContMix aggregation op; auto: OVERLOCK_NA2D_BACKEND when set, else '
                             'the fastest one available for the device (triton on CUDA); torch is the plain PyTorch '
                             'reference, the fallback when another backend misbehaves')


def apply_na2d_backend(name: Optional[str], device: Any = None) -> str:
    """Use backend ``name`` for the rest of the process (``models.ops.set_backend``) and return the one the
    ContMix op will run on ``device`` (default: the CPU).

    'auto' keeps OVERLOCK_NA2D_BACKEND's choice, or the automatic one. An unknown or unavailable backend, or
    one that cannot take tensors of ``device``, raises :class:`UsageError` naming the option.
    """
    from models import ops  # lazy: models imports timm, slow for `--help`
    device_type = getattr(device, 'type', None) or str(device or 'cpu').split(':')[0]

    def usage(e: ValueError) -> UsageError:
        msg = one_line(e)
        return UsageError(f'--na2d-backend {msg.split(": ", 1)[1] if msg.startswith("set_backend: ") else msg}')

    try:
        ops.set_backend(name or 'auto')
    except ValueError as e:
        raise usage(e) from None
    try:
        return ops.get_backend(device_type)
    except ValueError as e:  # the chosen backend cannot take this device's tensors (or a bad environment value)
        raise usage(e) from None


def na2d_backend_advice(device_type: str) -> str:
    """One sentence for an error about non-finite numbers: which backend ran ContMix, how to rule it out."""
    from models import ops
    try:
        name = ops.get_backend(device_type)
    except ValueError:
        return ''
    if name == 'torch':
        return 'ContMix ran on the torch na2d backend (the reference)'
    return f'ContMix ran on the {name} na2d backend; to rule it out, cross-check with {FALLBACK_HINT}'


BASE_KEY = '_base_'


def _read_yaml_mapping(path: str) -> Dict[str, Any]:
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f'config file {path} does not exist')
    try:
        with open(path, 'r', encoding='utf-8') as f:
            cfg = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f'config file {path} is not valid YAML ({first})') from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UsageError(f'config file {path} must hold a mapping of option: value, got {type(cfg).__name__}')
    return cfg


def load_config_file(path: str, _seen: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read a YAML mapping from ``path`` with one-line errors.

    A ``_base_: FILE`` key (a path relative to this file's folder, or a list of them) reads those files
    first; this file's keys win over theirs, later bases over earlier ones.
    """
    seen = list(_seen or [])
    real = os.path.realpath(path)
    if real in seen:
        raise UsageError(f'config file {path}: {BASE_KEY} includes itself ({" -> ".join(seen + [real])})')
    cfg = _read_yaml_mapping(path)
    bases = cfg.pop(BASE_KEY, None)
    if bases is None:
        return cfg
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise UsageError(f'config file {path}: {BASE_KEY} must be a file name or a list of them, got {bases!r}')
    merged: Dict[str, Any] = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(os.path.abspath(path)), base)
        if not os.path.isfile(base_path):
            raise UsageError(f'config file {path}: {BASE_KEY} {base} does not exist (looked for {base_path})')
        merged.update(load_config_file(base_path, seen + [real]))
    merged.update(cfg)
    return merged


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with ``parser``; a ``-c/--config`` YAML file sets the defaults, the command line wins.

    Config keys are argparse dest names (``batch_size``); dashes are accepted too (``batch-size``).
    Unknown keys raise :class:`UsageError` naming them and the file.
    """
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')
    known, remaining = config_parser.parse_known_args(argv)
    if not any(a.dest == 'config' for a in parser._actions):
        parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                            help='YAML file whose keys set the defaults of these options')
    if known.config:
        cfg = load_config_file(known.config)
        dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
        mapped = {}
        unknown = []
        for key, value in cfg.items():
            dest = str(key).replace('-', '_')
            if dest not in dests or dest in ('config', 'help'):
                unknown.append(str(key))
            mapped[dest] = value
        if unknown:
            raise UsageError(f'config file {known.config}: unknown keys {", ".join(map(str, unknown))} '
                             f'(keys are option names such as batch_size or batch-size)')
        parser.set_defaults(**mapped)
    args = parser.parse_args(remaining)
    args.config = known.config
    return args


def model_kwargs_from_args(args: argparse.Namespace, **extra) -> Dict[str, Any]:
    """The keyword arguments ``create_model_from_args`` passes to ``timm.create_model``."""
    kwargs: Dict[str, Any] = {}
    if getattr(args, 'num_classes', None) is not None:
        kwargs['num_classes'] = args.num_classes
    if getattr(args, 'in_chans', None) is not None:
        kwargs['in_chans'] = args.in_chans
    if getattr(args, 'drop_path', None) is not None:
        kwargs['drop_path_rate'] = args.drop_path
    kwargs.update(parse_kwargs(getattr(args, 'model_kwargs', None)))
    kwargs.update(extra)
    return kwargs


def create_model_from_args(args: argparse.Namespace, **extra) -> 'torch.nn.Module':
    """``timm.create_model(args.model, ...)`` from the flags of :func:`add_model_args`.

    Args:
        args: parsed flags.
        extra: further keyword arguments for the model (they win over the flags).
    """
    import timm
    import models  # registers the overlock models with timm

    if not timm.is_model(args.model):
        known = ', '.join(timm.list_models('overlock*'))
        raise UsageError(f'--model {args.model} is not a registered model (OverLoCK models: {known})')
    kwargs = model_kwargs_from_args(args, **extra)
    try:
        model = timm.create_model(args.model, **kwargs)
    except TypeError as e:  # an unknown constructor argument from --model-kwargs
        raise UsageError(f'--model {args.model} with {kwargs}: {one_line(e)}') from None
    except ValueError as e:  # the model's own validation (e.g. wrong list lengths)
        if isinstance(e, models.CheckpointError):
            raise
        raise UsageError(f'--model {args.model}: {one_line(e)}') from None
    if getattr(args, 'grad_checkpoint', False):
        stages = getattr(args, 'ckpt_stg', None)
        if stages is not None and hasattr(model, 'set_grad_checkpointing_stages'):
            model.set_grad_checkpointing_stages(stages)
        else:
            model.set_grad_checkpointing(True)
    return model
