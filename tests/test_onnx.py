"""ONNX export of the deploy form: the standard-op aggregation, parity in ONNX Runtime, validate.py --onnx,
and bad input (one line, exit code 2)."""
import copy
import csv
import importlib.util
import logging

import numpy as np
import pytest
import timm
import torch

from tests.helpers import TINY_KWARGS, randomize_bn_stats, tiny_cli_kwargs, tiny_model
from models.ops import composite, torch_backend
from models.ops.dispatch import na2d_av, na2d_softmax_av, relative_position_bias

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

import reparam  # noqa: E402  (the repository root is on sys.path: pytest.ini)
import validate  # noqa: E402
from scripts import demo, export_onnx  # noqa: E402
from utils import export  # noqa: E402
from utils.cli import parse_kwargs  # noqa: E402

TOL = 1e-4  # max relative error of the logits


def _ort_logits(path, x):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _max_rel_err(out, ref):
    """max |out - ref| / max |ref| (utils.export's parity measure)."""
    ref = ref.numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _standard_ops_only(path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {op.domain for op in model.opset_import} <= {'', 'ai.onnx'}
    assert all(node.domain in ('', 'ai.onnx') for node in model.graph.node)
    return model


# --- the standard-op aggregation --------------------------------------------------------------------------

@pytest.mark.parametrize('h,w,k', [(7, 7, 7), (14, 14, 13), (14, 14, 5), (9, 13, 5), (13, 9, 7), (24, 20, 13),
                                   (5, 8, 3)])
def test_composite_equals_torch_backend(h, w, k):
    """Both layouts (dense and neighbourhood), square and not, against the torch backend in float64."""
    g, c = 3, 4
    attn = torch.softmax(torch.randn(2, g, h, w, k * k, dtype=torch.float64), -1)
    value = torch.randn(2, g, h, w, c, dtype=torch.float64)
    ref = torch_backend.na2d_av(attn, value, k)
    torch.testing.assert_close(composite.na2d_av(attn, value, k), ref, rtol=1e-12, atol=1e-12)
    logits = torch.randn(2, g, h, w, k * k, dtype=torch.float64)
    rpb = torch.randn(g, 2 * k - 1, 2 * k - 1, dtype=torch.float64)
    fused_ref = torch_backend.na2d_av(torch.softmax(logits + relative_position_bias(rpb, h, w, k), -1), value, k)
    torch.testing.assert_close(composite.na2d_softmax_av(logits, rpb, value, k), fused_ref, rtol=1e-12, atol=1e-12)


def test_deploy_copy_leaves_the_model_unchanged(caplog):
    """What export, parity and the ONNX benchmark convert: a re-parameterised copy, said once in the log."""
    model = timm.create_model('overlock_xt', **TINY_KWARGS, num_classes=11).eval()
    randomize_bn_stats(model)
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger='utils.export'):
        deploy = export.deploy_copy(model)
    assert 're-parameterised copy' in caplog.text
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-4, atol=1e-5)
    assert export.deploy_copy(deploy) is deploy  # a deploy-form model is used as it is


def test_both_layouts_are_exercised():
    assert composite.uses_dense(14, 14, 13) and composite.uses_dense(7, 7, 7)
    assert not composite.uses_dense(14, 14, 5) and not composite.uses_dense(24, 20, 13)


def test_export_mode_is_scoped():
    """Outside export_mode (and outside torch.onnx.export) PyTorch runs its own backend; inside, the composite."""
    attn = torch.softmax(torch.randn(1, 2, 9, 9, 25), -1)
    value = torch.randn(1, 2, 9, 9, 4)
    calls = []
    original = composite.na2d_av

    def spy(*args):
        calls.append(1)
        return original(*args)

    composite.na2d_av = spy
    try:
        na2d_av(attn, value, 5)
        assert not calls and not composite.is_active()
        with composite.export_mode():
            with composite.export_mode():
                out = na2d_av(attn, value, 5)
            assert composite.is_active()
            na2d_softmax_av(torch.randn(1, 2, 9, 9, 25), torch.randn(2, 9, 9), value, 5)
        assert len(calls) == 2 and not composite.is_active()
    finally:
        composite.na2d_av = original
    torch.testing.assert_close(out, na2d_av(attn, value, 5))


@pytest.mark.slow
def test_plain_torch_onnx_export_uses_standard_ops(tmp_path):
    """A user's own torch.onnx.export call (no context manager) also gets the standard-op aggregation."""
    class Block(torch.nn.Module):
        def forward(self, logits, rpb, value):
            return na2d_softmax_av(logits, rpb, value, 5)

    logits, rpb, value = torch.randn(2, 2, 9, 11, 25), torch.randn(2, 9, 9), torch.randn(2, 2, 9, 11, 4)
    path = tmp_path / 'block.onnx'
    torch.onnx.export(Block().eval(), (logits, rpb, value), str(path), dynamo=True, verbose=False)
    _standard_ops_only(path)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (t.numpy() for t in (logits, rpb, value))))
    out = session.run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(out), na2d_softmax_av(logits, rpb, value, 5), rtol=1e-5, atol=1e-6)


# --- export and parity in ONNX Runtime --------------------------------------------------------------------

@pytest.mark.slow
def test_parity_real_size_xt(tmp_path, cli):
    """OverLoCK-XT's widths, heads, kernel sizes and feature maps (random BN statistics), one block per stage
    (the exporter's time grows with the graph; more blocks repeat the same ops), through the command line at a
    non-square input (224 x 160): ONNX Runtime equals PyTorch's deploy form at several batch sizes (dynamic
    batch axis)."""
    one_block = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1])
    model = timm.create_model('overlock_xt', **one_block).eval()
    randomize_bn_stats(model)
    ckpt = tmp_path / 'xt.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    path = tmp_path / 'xt.onnx'
    code, _, err = cli(export_onnx, ['--model', 'overlock_xt', '--checkpoint', str(ckpt), '--output', str(path),
                                     '--img-size', '224', '160', '--model-kwargs', 'depth=[1,1,1,1]',
                                     'sub_depth=[1,1]'])
    assert code == 0, err
    proto = _standard_ops_only(path)
    assert {o.domain: o.version for o in proto.opset_import}[''] >= 17
    deploy = model.reparameterize()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 160)
        with torch.no_grad():
            ref = deploy(x)
        out = _ort_logits(path, x)
        assert out.shape == (batch, 1000) and _max_rel_err(out, ref) <= TOL
    meta = export.read_metadata(str(path))
    assert meta['architecture'] == 'overlock_xt' and meta['crop_pct'] == 0.925 and meta['num_classes'] == 1000
    assert meta['input_size'] == [3, 224, 160]


@pytest.mark.parametrize('runtime', [
    'onnxruntime',
    pytest.param('openvino', marks=pytest.mark.skipif(importlib.util.find_spec('openvino') is None,
                                                      reason='openvino (optional) not installed')),
])
def test_export_for_each_runtime(tmp_path, cli, runtime):
    """--runtime picks the graph (ONNX Runtime: the fused channels-last form, no 1x1 convolutions left;
    OpenVINO: the deploy form), the runtime of the parity check and the benchmark's column; the file gives the
    model's logits on both runtimes."""
    model = tiny_model().eval()
    randomize_bn_stats(model)
    ckpt, path = tmp_path / 'm.pth', tmp_path / 'm.onnx'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    code, out, err = cli(export_onnx, ['--checkpoint', str(ckpt), '--output', str(path), '--img-size', '64',
                                       '--num-classes', '7', '--model-kwargs', *tiny_cli_kwargs(),
                                       '--runtime', runtime, '--benchmark', '--batch-sizes', '2', '--iters', '1',
                                       '--warmup', '0'])
    assert code == 0, err
    fused = runtime == 'onnxruntime'
    assert f'{"fused" if fused else "deploy"} form for' in out and f'| {runtime} |' in out
    pointwise = [n for n in _standard_ops_only(path).graph.node if n.op_type == 'Conv'
                 and any(a.name == 'kernel_shape' and list(a.ints) == [1, 1] for a in n.attribute)]
    assert bool(pointwise) != fused
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    for other in ('onnxruntime', 'openvino'):
        if importlib.util.find_spec(other) is not None:
            with torch.no_grad():
                assert export.max_relative_error(model, str(path), runtime=other) <= TOL
                assert _max_rel_err(export.load_exported(str(path), other)(x).numpy(), ref) <= TOL


# --- validate.py --onnx on the digits ---------------------------------------------------------------------

DEMO_KWARGS = parse_kwargs(demo.MODEL_KWARGS)  # the demo's small OverLoCK


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """A small OverLoCK (the demo's) trained briefly on the digits, its checkpoint and data folder."""
    pytest.importorskip('sklearn')
    import timm.data
    from utils.data import build_image_folder
    from utils.demo_data import build_digits_imagefolder

    root = tmp_path_factory.mktemp('digits')
    build_digits_imagefolder(str(root / 'data'), size=32, limit=12)
    torch.manual_seed(0)
    model = timm.create_model('overlock_xt', **DEMO_KWARGS, num_classes=10)
    cfg = timm.data.resolve_data_config({'input_size': (3, 32, 32), 'crop_pct': 1.0}, model=model)
    train = build_image_folder(str(root / 'data' / 'train'), transform=timm.data.create_transform(**cfg))
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and much faster on a busy machine
    try:
        for _ in range(6):  # 18 steps: top-1 about 50 % (chance: 10 %)
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    ckpt = root / 'digits.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    return root / 'data', ckpt


@pytest.mark.slow
def test_reparam_onnx_scores_like_pytorch(digits, tmp_path, cli):
    """reparam.py --onnx writes the deploy checkpoint and the ONNX file: their logits agree, and validate.py
    --onnx gives the PyTorch table of the training checkpoint."""
    data, ckpt = digits
    kw = ['--model-kwargs', *demo.MODEL_KWARGS]
    path, deploy_ckpt = tmp_path / 'd.onnx', tmp_path / 'd.pth'
    code, out, err = cli(reparam, ['--model', 'overlock_xt', '--checkpoint', str(ckpt), '--output', str(deploy_ckpt),
                                   '--onnx', str(path), '--img-size', '32', '--bench-iters', '0', *kw])
    assert code == 0, err
    assert 'max relative error of ONNX Runtime' in out
    meta = export.read_metadata(str(path))
    assert meta['architecture'] == 'overlock_xt_reparam' and meta['input_size'] == [3, 32, 32]
    model = timm.create_model('overlock_xt_reparam', **DEMO_KWARGS, num_classes=10,
                              pretrained=True, pretrained_cfg_overlay=dict(file=str(deploy_ckpt))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_rel_err(_ort_logits(path, x), model(x)) <= TOL

    results = tmp_path / 'results.csv'
    common = ['--crop-pct', '1.0', '-b', '16', '-j', '0', '--no-progress', '--results-file', str(results)]
    code, out_torch, err = cli(validate, [str(data), '--model', 'overlock_xt', '--checkpoint', str(ckpt),
                                          '--img-size', '32', *kw, *common])
    assert code == 0, err
    code, out_onnx, err = cli(validate, [str(data), '--onnx', str(path), *common])
    assert code == 0, err
    assert out_onnx.splitlines()[0] == out_torch.splitlines()[0]  # the same table
    with open(results) as f:
        rows = list(csv.DictReader(f))
    assert rows[1]['checkpoint'] == str(path) and rows[1]['img_size'] == '32'
    assert float(rows[0]['top1']) > 20  # trained: better than chance (10 %), so equal top-1 says something
    assert rows[0]['top1'] == rows[1]['top1'] and rows[0]['top5'] == rows[1]['top5']
    assert abs(float(rows[0]['loss']) - float(rows[1]['loss'])) < 1e-4


# --- bad input --------------------------------------------------------------------------------------------

def test_bad_input_is_one_line(tmp_path, cli, monkeypatch):
    kw = ['--model-kwargs', *[f'{k}={v}'.replace(' ', '') for k, v in TINY_KWARGS.items()]]
    out = str(tmp_path / 'm.onnx')
    for opset in ('12', '99'):
        code, _, err = cli(export_onnx, ['--output', out, '--opset', opset, *kw])
        assert code == 2 and err.startswith(f'error: --opset {opset} is not supported') and err.count('\n') == 1
    code, _, err = cli(export_onnx, ['--output', str(tmp_path / 'no' / 'm.onnx'), '--img-size', '64', *kw])
    assert code == 2 and 'does not exist' in err and err.count('\n') == 1

    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'\x00not an onnx file' * 10)
    code, _, err = cli(validate, [str(tmp_path), '--onnx', str(garbage)])
    assert code == 2 and err.startswith('error:') and 'not a readable ONNX file' in err and err.count('\n') == 1
    code, _, err = cli(validate, [str(tmp_path), '--onnx', str(tmp_path / 'missing.onnx')])
    assert code == 2 and 'does not exist' in err and err.count('\n') == 1
    foreign = tmp_path / 'foreign.onnx'  # a valid ONNX file without our preprocessing record
    x = onnx.helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node('Identity', ['x'], ['y'])], 'g', [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    code, _, err = cli(validate, [str(tmp_path), '--onnx', str(foreign)])
    assert code == 2 and 'no OverLoCK preprocessing record' in err and err.count('\n') == 1

    # onnx / onnxruntime missing: a one-line install hint
    for missing in ('onnx', 'onnxruntime'):
        monkeypatch.setitem(__import__('sys').modules, missing, None)
        code, _, err = cli(validate, [str(tmp_path), '--onnx', str(foreign)])
        assert code == 2 and f'{missing} is needed' in err and 'pip install' in err and err.count('\n') == 1
        monkeypatch.undo()
    def written(model, path, **kwargs):  # an export the runtime then cannot load: the file does not stay
        open(path, 'wb').close()
        return {'architecture': 'm'}

    def unloadable(*args, **kwargs):
        raise export.UsageError('ONNX Runtime cannot load it (bad graph)')
    with monkeypatch.context() as m:
        m.setattr(export, 'export_onnx', written)
        m.setattr(export, 'max_relative_error', unloadable)
        code, printed, _ = cli(export_onnx, ['--output', out, *kw])
    assert code == 1 and 'cannot load it' in printed and 'removed' in printed and not (tmp_path / 'm.onnx').exists()
    monkeypatch.setitem(__import__('sys').modules, 'openvino', None)  # optional: named with its install line
    code, _, err = cli(export_onnx, ['--output', out, '--runtime', 'openvino', *kw])
    assert code == 2 and 'openvino is needed' in err and 'pip install openvino' in err and err.count('\n') == 1
    monkeypatch.setitem(__import__('sys').modules, 'onnx', None)
    code, _, err = cli(export_onnx, ['--output', out, *kw])
    assert code == 2 and 'onnx is needed' in err and err.count('\n') == 1
    code, _, err = cli(reparam, ['--model', 'overlock_xt', '--checkpoint', str(garbage), '--onnx', out, *kw])
    assert code == 2 and 'onnx is needed' in err and err.count('\n') == 1
