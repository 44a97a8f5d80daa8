import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval_testutils import tiny_detector
from yolo_q.eval import (Backend, COCOEvaluator, OrtBackend, TorchBackend, build_backend,
                         evaluate, postprocess)
from yolo_q.eval.backends import PAD_VALUE
from yolo_q.export import export_onnx

pytest.importorskip("onnxruntime")
HW = (64, 96)


@pytest.fixture(scope="module")
def fused():
    return copy.deepcopy(tiny_detector()).fuse().eval()


@pytest.fixture(scope="module")
def onnx_fixed(tmp_path_factory, fused):
    return export_onnx(fused, tmp_path_factory.mktemp("ort") / "m.onnx", img_size=HW, batch=2)


def imgs(b, hw=HW, seed=0):
    return torch.rand(b, 3, *hw, generator=torch.Generator().manual_seed(seed))


def test_torch_and_ort_backends_agree(fused, onnx_fixed):
    tb, ob = TorchBackend(fused), OrtBackend(onnx_fixed, threads=1)
    assert ob.fixed_batch == 2 and ob.input_hw == HW and not ob.end2end
    for b in (1, 2, 3, 5):  # fixed batch 2: split and pad
        x = imgs(b, seed=b)
        ref, out = tb(x), ob(x)
        assert out.shape == ref.shape == (b, 126, 8) and out.dtype == torch.float32
        assert torch.allclose(out, ref, atol=1e-3 * float(ref.abs().max()), rtol=0)


def test_smaller_images_are_padded_larger_rejected(fused, onnx_fixed):
    ob = OrtBackend(onnx_fixed)
    x = imgs(2, (64, 64))
    with torch.no_grad():
        ref = fused(F.pad(x, (0, 32, 0, 0), value=PAD_VALUE))
    out = ob(x)
    assert torch.allclose(out, ref, atol=1e-3 * float(ref.abs().max()), rtol=0)
    with pytest.raises(ValueError, match=r"m\.onnx: input images are 96x96 but the model takes "
                                         r"64x96"):
        ob(imgs(2, (96, 96)))


def test_torch_backend_copies_for_fuse_and_keeps_model():
    model = tiny_detector().train()
    tb = TorchBackend(model, fuse=True)
    assert tb.model is not model and tb.model.is_fused and not model.is_fused
    assert model.training  # the caller's model is untouched
    x = imgs(1)
    with torch.no_grad():
        assert torch.allclose(tb(x), model.eval()(x), atol=1e-3 * 300)
    with pytest.raises(ValueError, match="half=True needs a CUDA device"):
        TorchBackend(model, half=True, device="cpu")


def test_build_backend(fused, onnx_fixed):
    assert isinstance(build_backend("ort", onnx_fixed), OrtBackend)
    assert isinstance(build_backend("torch", fused), TorchBackend)
    with pytest.raises(ValueError, match="torch, onnxruntime, openvino, tensorrt"):
        build_backend("tflite", onnx_fixed)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_backend("onnxruntime", "/nope/missing.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_backend("ov", "/nope/missing.onnx")


def test_openvino_backend_matches_ort(onnx_fixed):
    """OpenVINO (FP32 precision hint) on the same fixed-shape ONNX: same outputs as ONNX
    Runtime; a batch larger than the graph's fixed batch is split; explicit thread setting."""
    pytest.importorskip("openvino")
    from yolo_q.eval import OvBackend
    ov = build_backend("openvino", onnx_fixed, threads=1)
    assert isinstance(ov, OvBackend) and ov.kind == "openvino"
    assert ov.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(ov.compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    ort = OrtBackend(onnx_fixed, threads=1)
    assert (ov.fixed_batch, ov.input_hw, ov.nc) == (ort.fixed_batch, ort.input_hw, ort.nc)
    x = imgs(3)
    y_ov, y_ort = ov(x), ort(x)
    assert y_ov.shape == y_ort.shape
    assert torch.allclose(y_ov, y_ort, rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError, match="hint must be one of"):
        OvBackend(onnx_fixed, hint="FAST")


def letterbox_info(h0, w0, s):
    r = s / max(h0, w0)
    h, w = round(h0 * r), round(w0 * r)
    return ((h0, w0), ((h / h0, w / w0), ((s - w) // 2, (s - h) // 2)))


class FakeLoader:
    """Batches (imgs uint8, targets [bi, cls, x1, y1, x2, y2] letterboxed, paths, shapes)."""

    def __init__(self, ds, size, bs):
        self.ds, self.size, self.bs = ds, size, bs

    def __len__(self):
        return -(-len(self.ds.im_files) // self.bs)

    def __iter__(self):
        ds, s = self.ds, self.size
        for start in range(0, len(ds.im_files), self.bs):
            idx = range(start, min(start + self.bs, len(ds.im_files)))
            targets, shapes = [], []
            for bi, i in enumerate(idx):
                (h0, w0) = ds.shapes0[i]
                info = letterbox_info(h0, w0, s)
                (rh, rw), (pw, ph) = info[1]
                for c, cx, cy, w, h in ds.labels[i]:
                    targets.append([bi, c, (cx - w / 2) * w0 * rw + pw, (cy - h / 2) * h0 * rh + ph,
                                    (cx + w / 2) * w0 * rw + pw, (cy + h / 2) * h0 * rh + ph])
                shapes.append(info)
            yield (torch.full((len(idx), 3, s, s), 114, dtype=torch.uint8),
                   torch.tensor(targets, dtype=torch.float32).reshape(-1, 6),
                   [ds.im_files[i] for i in idx], shapes)


class OracleBackend(Backend):
    """Returns raw predictions that encode the loader's targets exactly (score 0.9)."""

    kind = "oracle"

    def __init__(self, loader, nc):
        self.batches = [t for _, t, _, _ in loader]
        self.nc, self.calls = nc, 0

    def __call__(self, x):
        assert x.dtype == torch.float32 and float(x.max()) == pytest.approx(114 / 255)
        t = self.batches[self.calls]
        self.calls += 1
        out = torch.zeros(x.shape[0], 50, 5 + self.nc)
        for bi in range(x.shape[0]):
            rows = t[t[:, 0] == bi]
            xyxy = rows[:, 2:]
            out[bi, :len(rows), :2] = (xyxy[:, :2] + xyxy[:, 2:]) / 2
            out[bi, :len(rows), 2:4] = xyxy[:, 2:] - xyxy[:, :2]
            out[bi, :len(rows), 4] = 1
            out[bi, torch.arange(len(rows)), 5 + rows[:, 1].long()] = 0.9
        return out


def synthetic_ds(n=5, nc=3):
    from types import SimpleNamespace
    rng = np.random.default_rng(0)
    shapes0, labels = [], []
    for i in range(n):
        shapes0.append((int(rng.integers(80, 200)), int(rng.integers(80, 200))))
        k = np.arange(3)
        labels.append(np.stack([k % nc, (k + 0.5) / 3, (k + 0.5) / 3, np.full(3, 0.2),
                                np.full(3, 0.25)], 1).astype(np.float32))
    return SimpleNamespace(im_files=[f"/d/{i:03d}.jpg" for i in range(n)],
                           image_ids=list(range(1, n + 1)), shapes0=shapes0, labels=labels,
                           names=["a", "b", "c"])


def test_evaluate_oracle_reaches_map_1():
    ds = synthetic_ds()
    loader = FakeLoader(ds, 128, bs=2)
    backend = OracleBackend(loader, nc=3)
    res = evaluate(backend, loader, COCOEvaluator(ds), progress=False)
    assert backend.calls == 3
    assert res["map50_95"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0)
    assert res["images"] == 5 and res["num_images"] == 5
    assert res["seconds"] > 0 and res["infer_seconds"] >= 0 and res["ms_per_image"] >= 0
    assert res["backend"] == "oracle" and res["coco_backend"] in ("pycocotools",
                                                                  "faster_coco_eval")
    # max_batches limits the images evaluated (the others are not scored)
    res = evaluate(OracleBackend(loader, 3), loader, COCOEvaluator(ds), progress=False,
                   max_batches=1)
    assert res["images"] == 2 and res["num_images"] == 2 and res["map50"] == pytest.approx(1.0)


def test_evaluate_torch_vs_onnxruntime_same_metrics(fused, onnx_fixed, tmp_path):
    """Pseudo ground truth = the model's own confident detections on 4 images; torch, ONNX
    Runtime and ONNX Runtime with in-graph NMS must score (nearly) the same through the whole
    pipeline."""
    from types import SimpleNamespace
    x = (imgs(4, seed=7) * 255).to(torch.uint8)
    with torch.no_grad():
        dets = postprocess(fused(x.float() / 255), 0.3, 0.45, 100)
    h0, w0 = HW
    labels = []
    for d in dets:
        xyxy = d[:, :4].clamp(min=0)
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clamp(max=w0)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clamp(max=h0)
        wh = xyxy[:, 2:] - xyxy[:, :2]
        keep = (wh > 2).all(1)
        c = (xyxy[keep, :2] + xyxy[keep, 2:]) / 2
        labels.append(torch.cat((d[keep, 5:6], c[:, :1] / w0, c[:, 1:] / h0,
                                 wh[keep, :1] / w0, wh[keep, 1:] / h0), 1).numpy())
    assert sum(len(lab) for lab in labels) >= 4
    ds = SimpleNamespace(im_files=[f"{i}.jpg" for i in range(4)], image_ids=[1, 2, 3, 4],
                         shapes0=[HW] * 4, labels=labels, names=["a", "b", "c"])
    ident = ((h0, w0), ((1.0, 1.0), (0.0, 0.0)))
    loader = [(x[:2], None, ds.im_files[:2], [ident] * 2),
              (x[2:], None, ds.im_files[2:], [ident] * 2)]
    r_t = evaluate(TorchBackend(fused), loader, COCOEvaluator(ds), progress=False)
    r_o = evaluate(OrtBackend(onnx_fixed), loader, COCOEvaluator(ds), progress=False)
    e2e = OrtBackend(export_onnx(fused, tmp_path / "e2e.onnx", img_size=HW, batch=2,
                                 end2end=True, conf_thres=0.001, iou_thres=0.65, max_det=300))
    assert e2e.end2end
    r_e = evaluate(e2e, loader, COCOEvaluator(ds), progress=False)
    assert r_t["map50"] > 0.7
    assert r_o["backend"] == "onnxruntime" and r_t["backend"] == "torch"
    assert np.allclose(r_t["stats"], r_o["stats"], atol=2e-3)
    assert np.allclose(r_o["stats"], r_e["stats"], atol=2e-3)
    assert r_o["num_detections"] == r_e["num_detections"]
