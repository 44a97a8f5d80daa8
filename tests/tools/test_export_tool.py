"""tools/export.py end to end: float checkpoint -> fused float ONNX, quantized checkpoint -> QDQ
ONNX of its flavour (partial quantization honoured), quick PTQ with --calib-images, and the
one-line errors. The ONNX files pass onnx.checker and ONNX Runtime reproduces torch."""
import importlib.util
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from yolo_q import load_config, load_model
from yolo_q.io import save_checkpoint
from yolo_q.engine.trainer import config_dict
from yolo_q.export.qdq import conv_quantization

OVR = ["model.width_multiple=0.125", "model.depth_multiple=0.1", "model.nc=3", "data.img_size=64"]
SKIP = ["detect.reg_preds", "neck.Rep_n4"]  # partial quantization: these stay float


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_checkpoint(repo_root, path):
    """The eval tests' tiny detector (random weights, sensible boxes and scores) as a float
    checkpoint with its config; returns (cfg, model)."""
    tiny = _load(repo_root / "tests/eval/eval_testutils.py", "eval_testutils").tiny_detector
    data = path.parent / "data3.yaml"  # the model's 3 classes (export checks nc against it)
    data.write_text("train: images\nval: images\nnames: [a, b, c]\n")
    cfg = load_config("configs/yolov6n.yaml", OVR + [f"data.dataset={data}"])
    model = tiny(nc=3).eval()
    save_checkpoint({"model": model.state_dict(), "config": config_dict(cfg)}, path)
    return cfg, model


def _tool(repo_root):
    spec = importlib.util.spec_from_file_location("export_tool", repo_root / "tools/export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, repo_root):
    """A float checkpoint, a quantized (onnxruntime flavour, partial) checkpoint, and images."""
    from yolo_q.quant import calibrate, convert, quant_state
    d = tmp_path_factory.mktemp("export")
    cfg, model = tiny_checkpoint(repo_root, d / "float.pt")
    q = convert(model.fuse(), cfg, flavour="onnxruntime", skip_layers=SKIP)
    calibrate(q, [_images(2, 64, s) for s in range(2)], method="max", progress=False)
    save_checkpoint({"model": q.state_dict(), "config": config_dict(cfg), "quant": quant_state(q),
                     "skip_layers": SKIP}, d / "ptq.pt")
    import cv2
    (d / "imgs").mkdir()
    for i, x in enumerate(_images(3, 64, 10)):
        cv2.imwrite(str(d / "imgs" / f"{i}.png"), (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return d


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy()})[0]


def test_float_export_subprocess_matches_torch(repo_root, ckpts, tmp_path):
    out = tmp_path / "m.onnx"
    r = subprocess.run([sys.executable, repo_root / "tools/export.py", "--weights", ckpts / "float.pt",
                        "--dynamic", "--out", out], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "float:" in r.stdout and str(out) in r.stdout
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert "QuantizeLinear" not in ops and "BatchNormalization" not in ops  # fused, float
    x = _images(2, 64, 5)  # dynamic batch: 2 images through a batch-1 example export
    with torch.no_grad():
        ref = load_model(ckpts / "float.pt")(x).numpy()
    np.testing.assert_allclose(_ort(out, x), ref, rtol=1e-3, atol=1e-3)


def test_quantized_checkpoint_to_qdq_honours_partial(repo_root, ckpts, tmp_path):
    tool = _tool(repo_root)
    out = tmp_path / "q.onnx"
    assert tool.main(["--weights", str(ckpts / "ptq.pt"), "--out", str(out)]) == 0
    onnx.checker.check_model(onnx.load(str(out)))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["quant_flavour"] == "onnxruntime"
    convs = conv_quantization(out)
    skipped = [k for k in convs if k.startswith(tuple(SKIP))]
    assert len(skipped) >= 4  # 3 reg_preds + the Rep_n4 block convs
    for k in skipped:  # float layers: neither weight nor (own) input quantized
        assert not convs[k]["weight"], k
    quantized = [k for k, v in convs.items() if v["weight"]]
    assert len(quantized) > 20
    assert not any(k.startswith(tuple(SKIP)) for k in quantized)
    x = _images(1, 64, 7)
    qmodel = load_model(ckpts / "ptq.pt")
    with torch.no_grad():
        ref = qmodel(x).numpy()
    got = _ort(out, x)
    # fake-quant torch vs ORT integer kernels: rounding differences only (measured: box mean
    # 0.2 px / max 2.7 px, score mean 0.003 / max 0.02; scores average 0.2)
    box_err = np.abs(got[..., :4] - ref[..., :4])
    assert box_err.mean() < 0.5 and box_err.max() < 8.0
    score_err = np.abs(got[..., 5:] - ref[..., 5:])
    assert score_err.mean() < 0.01 and score_err.max() < 0.1
    # the same weights without quantization
    out_f = tmp_path / "f.onnx"
    assert tool.main(["--weights", str(ckpts / "ptq.pt"), "--flavour", "float", "--out",
                      str(out_f)]) == 0
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out_f)).graph.node)


def test_quick_ptq_and_errors(repo_root, ckpts, tmp_path, capsys):
    tool = _tool(repo_root)
    from yolo_q.cli import run_tool
    # QDQ flavour of a float checkpoint without calibration images: one clear line, exit 2
    assert run_tool(tool.main, ["--weights", str(ckpts / "float.pt"), "--flavour", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tools/ptq.py" in err[0] and "--calib-images" in err[0]
    # wrong flavour for a quantized checkpoint
    assert run_tool(tool.main, ["--weights", str(ckpts / "ptq.pt"), "--flavour", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "'onnxruntime' flavour" in err
    # quick PTQ: tensorrt flavour, end-to-end ONNX NMS, runs in ORT
    out = tmp_path / "t.onnx"
    assert tool.main(["--weights", str(ckpts / "float.pt"), "--flavour", "tensorrt",
                      "--calib-images", str(ckpts / "imgs"), "--end2end", "--nms", "onnxruntime",
                      "--out", str(out), "export.conf_thres=0.05"]) == 0
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    convs = conv_quantization(proto)
    assert sum(v["input"] and v["weight"] for v in convs.values()) > 20  # TensorRT: Q/DQ at inputs
    assert not convs["detect.proj_conv"]["weight"] if "detect.proj_conv" in convs else True
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    num, boxes, scores, cls = sess.run(None, {"images": _images(1, 64, 3).numpy()})
    assert num.shape == (1, 1) and boxes.shape[-1] == 4
    assert (scores[0, :int(num[0, 0])] > 0.05).all()
    r = subprocess.run([sys.executable, repo_root / "tools/export.py", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--flavour" in r.stdout
