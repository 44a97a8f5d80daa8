"""tools/infer.py end to end: images / video in, drawn images / video + detections JSON out,
through torch and ONNX Runtime; boxes are in original pixels (the eval letterbox mapping)."""
import importlib.util
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from test_export_tool import tiny_checkpoint
from yolo_q.data import letterbox
from yolo_q.eval import postprocess

SIZES = [(48, 80), (64, 64), (90, 50)]  # (h, w): landscape, square, portrait


def _smooth(h, w, seed):
    rng = np.random.default_rng(seed)
    low = rng.random((max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
    return (cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, repo_root):
    d = tmp_path_factory.mktemp("infer")
    cfg, model = tiny_checkpoint(repo_root, d / "float.pt")
    (d / "imgs").mkdir()
    for i, (h, w) in enumerate(SIZES):
        cv2.imwrite(str(d / "imgs" / f"im{i}.png"), _smooth(h, w, i))
    vw = cv2.VideoWriter(str(d / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 48))
    for i in range(4):
        vw.write(_smooth(48, 80, 10 + i))
    vw.release()
    return d, cfg, model


def _tool(repo_root):
    spec = importlib.util.spec_from_file_location("infer_tool", repo_root / "tools/infer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_infer_images_torch_subprocess(repo_root, setup, tmp_path):
    d, cfg, model = setup
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, repo_root / "tools/infer.py", "--weights", d / "float.pt",
                        "--source", d / "imgs", "--out", out, "--conf", "0.3", "--imgsz", "64"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "detections.json").read_text())
    assert [e["file"].rsplit("/", 1)[-1] for e in res] == ["im0.png", "im1.png", "im2.png"]
    assert sum(len(e["detections"]) for e in res) > 0
    for e, (h, w) in zip(res, SIZES):
        assert (e["height"], e["width"]) == (h, w)
        drawn = cv2.imread(str(out / e["file"].rsplit("/", 1)[-1]))
        assert drawn.shape[:2] == (h, w)
        for det in e["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert det["score"] > 0.3 and det["name"] == "abc"[det["class"]]  # the data YAML's names
    # independent check of the mapping: the raw output on the letterboxed image, mapped by hand
    e = res[0]
    img = cv2.imread(e["file"])
    lb, (rh, rw), (pw, ph) = letterbox(img, 64)
    x = torch.from_numpy(np.ascontiguousarray(lb[:, :, ::-1].transpose(2, 0, 1))).float()[None] / 255
    with torch.no_grad():
        ref = postprocess(model.eval()(x), 0.3, 0.45, 300)[0]
    ref[:, [0, 2]] = ((ref[:, [0, 2]] - pw) / rw).clamp(0, img.shape[1])
    ref[:, [1, 3]] = ((ref[:, [1, 3]] - ph) / rh).clamp(0, img.shape[0])
    got = np.array([det["box"] + [det["score"], det["class"]] for det in e["detections"]])
    assert got.shape == tuple(ref.shape)
    np.testing.assert_allclose(got, ref.numpy(), atol=0.02)


def test_infer_onnx_images_and_video(repo_root, setup, tmp_path):
    from yolo_q.export.onnx import export_onnx
    d, cfg, model = setup
    onnx_path = export_onnx(model, tmp_path / "m.onnx", img_size=64, fuse=True)
    tool = _tool(repo_root)
    assert tool.main(["--weights", str(d / "float.pt"), "--source", str(d / "imgs"), "--out",
                      str(tmp_path / "pt"), "--imgsz", "64"]) == 0
    assert tool.main(["--onnx", str(onnx_path), "--source", str(d / "imgs"), "--out",
                      str(tmp_path / "ort"), "--config", "configs/yolov6n.yaml",
                      "model.nc=3"]) == 0  # imgsz from the ONNX input
    pt = json.loads((tmp_path / "pt" / "detections.json").read_text())
    ox = json.loads((tmp_path / "ort" / "detections.json").read_text())
    for a, b in zip(pt, ox):  # same detections through both runtimes
        assert len(a["detections"]) == len(b["detections"])
        for da, db in zip(a["detections"], b["detections"]):
            assert da["class"] == db["class"]
            np.testing.assert_allclose(da["box"], db["box"], atol=0.1)
    if importlib.util.find_spec("openvino") is not None:  # the same file through OpenVINO
        assert tool.main(["--openvino", str(onnx_path), "--source", str(d / "imgs"), "--out",
                          str(tmp_path / "ov"), "--config", "configs/yolov6n.yaml",
                          "model.nc=3", "--threads", "1"]) == 0
        ov = json.loads((tmp_path / "ov" / "detections.json").read_text())
        for a, b in zip(ox, ov):
            assert [x["class"] for x in a["detections"]] == [x["class"] for x in b["detections"]]
            for da, db in zip(a["detections"], b["detections"]):
                np.testing.assert_allclose(da["box"], db["box"], atol=0.1)
    assert tool.main(["--onnx", str(onnx_path), "--source", str(d / "clip.avi"), "--out",
                      str(tmp_path / "vid"), "--conf", "0.3"]) == 0
    frames = json.loads((tmp_path / "vid" / "detections.json").read_text())
    assert [f["frame"] for f in frames] == [0, 1, 2, 3]
    assert all((f["width"], f["height"]) == (80, 48) for f in frames)
    cap = cv2.VideoCapture(str(tmp_path / "vid" / "clip.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 4


def test_infer_errors_and_help(repo_root, setup, tmp_path, capsys):
    from yolo_q.cli import run_tool
    d, _, _ = setup
    tool = _tool(repo_root)
    assert run_tool(tool.main, ["--weights", str(d / "float.pt"), "--source",
                                str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    r = subprocess.run([sys.executable, repo_root / "tools/infer.py", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--source" in r.stdout
