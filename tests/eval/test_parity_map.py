"""Parity of COCO mAP across runtimes through the shared evaluate(): ONNX Runtime FP32 vs torch
float (within 0.05 mAP points), and ONNX Runtime QDQ INT8 vs torch fake-quant, both flavours,
with and without ORT's graph optimizations (within 0.5 points on this small set: see INT8_TOL).

The dataset is made so that mAP is informative: the ground truth is the tiny random detector's
own confident detections, jittered, partly dropped and mixed with a few spurious boxes, on
images of several aspect ratios (so letterbox padding and the box mapping are exercised). mAP
then sits well inside (0, 1) and a runtime that shifts boxes or scores would move it.
"""
import copy

import cv2
import numpy as np
import pytest
import torch

from eval_testutils import tiny_detector
from yolo_q.benchmark import normalize_activations_
from yolo_q.config import load_config
from yolo_q.eval import COCOEvaluator, OrtBackend, TorchBackend, evaluate
from yolo_q.eval.api import val_loader_for
from yolo_q.eval.infer import detect

pytest.importorskip("onnxruntime")
IMG = 96
SIZES = [(96, 96), (72, 96), (96, 64), (80, 80), (60, 96), (96, 72)] * 2  # 12 images (h, w)
FLOAT_TOL = 0.05 / 100  # mAP points (percent) -> fraction
# INT8: the brief's 0.2 points needs a larger set. A QDQ graph run by ONNX Runtime is not
# bit-identical to torch's fake-quant: float convolutions accumulate in another order (and its
# optimized integer kernels requantize in their own arithmetic), so values at a rounding tie land
# one step apart (0.1-0.3 % of a layer's outputs, each at most one step; see
# yolo_q.export.qdq.layer_parity), and a network amplifies those flips. On this 12-image set that
# moves mAP50-95 by 0.0-0.3 points (measured over seeds and both flavours); 0.5 keeps a margin for
# other CPUs (the kernels differ between AVX2 and AVX-512 VNNI machines).
INT8_TOL = 0.5 / 100
CLS_STD = 2.0  # class logits std: confident, well separated scores as after training


@torch.no_grad()
def _well_scaled(model, x, seed=0):
    """Rescale a random fused detector like a trained one: every conv output to unit std (one
    forward pass, in execution order), then the prediction convs to logits of std ``CLS_STD``
    (classes) / 0.5 (boxes). Random weights otherwise grow activations ~2,000x through the
    network, which amplifies the one-step rounding differences of INT8 runtimes (see
    ``INT8_TOL``) into large box changes."""
    preds = list(model.detect.cls_preds) + list(model.detect.reg_preds)
    std = {id(c): CLS_STD for c in model.detect.cls_preds}  # reg: 0.5
    g = torch.Generator().manual_seed(seed)

    def prediction(mod, inp):
        if not any(mod is p for p in preds):
            return False
        fan_in = mod.weight[0].numel()
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std.get(id(mod), 0.5)
                         / (inp.std().clamp(min=1e-6) * fan_in ** 0.5))
        return True
    return normalize_activations_(model, x, special=prediction)


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    low = rng.random((max(2, h // 12), max(2, w // 12), 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    return (np.clip(img + 0.1 * rng.random((h, w, 3)), 0, 1) * 255).astype(np.uint8)


def build_set(d, sizes=SIZES, seed=0, jitter=0.03, drop=0.2):
    """Write the pseudo-labelled dataset into ``d``; returns (cfg, fused model, loader,
    evaluator)."""
    (d / "images").mkdir()
    (d / "labels").mkdir()
    fused = copy.deepcopy(tiny_detector(nc=3)).fuse().eval()
    _well_scaled(fused, torch.stack([torch.from_numpy(_image(IMG, IMG, 100 + k)).permute(2, 0, 1)
                                     for k in range(2)]).float() / 255)
    rng = np.random.default_rng(seed)
    n_gt = 0
    for i, (h, w) in enumerate(sizes):
        img = _image(h, w, 1000 * seed + i)
        cv2.imwrite(str(d / "images" / f"{i:02d}.png"), img)
        det = detect(TorchBackend(fused), [img], IMG, conf_thres=0.3, iou_thres=0.45)[0].numpy()
        det = det[rng.random(len(det)) > drop]  # some objects the model will "miss"
        boxes = det[:, :4].copy()
        size = np.repeat(boxes[:, 2:4] - boxes[:, :2], 2, 0).reshape(-1, 4)
        boxes += rng.normal(0, jitter, boxes.shape) * size  # localisation error
        spurious = rng.random((1, 4)) * [w, h, w, h]  # an object the model does not see
        boxes = np.concatenate((boxes, np.sort(spurious.reshape(2, 2), 0).reshape(1, 4)))
        cls = np.concatenate((det[:, 5], rng.integers(0, 3, 1)))
        boxes = boxes.clip(0, [w, h, w, h])
        ok = ((boxes[:, 2] - boxes[:, 0]) > 2) & ((boxes[:, 3] - boxes[:, 1]) > 2)
        boxes, cls = boxes[ok], cls[ok]
        n_gt += len(cls)
        xywh = np.stack(((boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                         (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h), 1)
        (d / "labels" / f"{i:02d}.txt").write_text(
            "".join(f"{int(c)} {' '.join(f'{v:.6f}' for v in b)}\n" for c, b in zip(cls, xywh)))
    assert n_gt >= 2 * len(sizes), n_gt  # enough objects for a meaningful mAP
    (d / "data.yaml").write_text(f"path: {d}\ntrain: images\nval: images\nnc: 3\n"
                                 f"names: [a, b, c]\n")
    cfg = load_config("configs/yolov6n.yaml", [
        "model.width_multiple=0.125", "model.depth_multiple=0.1", "model.nc=3",
        f"data.dataset={d / 'data.yaml'}", f"data.img_size={IMG}", "data.workers=0",
        "data.cache_labels=false"])
    val_ds, loader, _ = val_loader_for(cfg, batch_size=8)
    return cfg, fused, loader, COCOEvaluator.from_dataset(val_ds)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    return (d, *build_set(d))


def _map(backend, loader, evaluator):
    return evaluate(backend, loader, evaluator, conf_thres=0.001, iou_thres=0.65,
                    progress=False)["map50_95"]


def test_ort_fp32_map_equals_torch(setup, tmp_path):
    from yolo_q.export import export_onnx
    d, cfg, fused, loader, ev = setup
    m_torch = _map(TorchBackend(fused), loader, ev)
    assert 0.2 < m_torch < 0.95, m_torch  # informative: neither trivial nor perfect
    onnx_path = export_onnx(fused, tmp_path / "fp32.onnx", img_size=IMG, batch=1)
    m_ort = _map(OrtBackend(onnx_path, threads=1), loader, ev)
    print(f"mAP50-95 torch {m_torch:.4f}  ORT FP32 {m_ort:.4f}")
    assert abs(m_ort - m_torch) <= FLOAT_TOL
    # sensitivity: the same boxes shifted by 1.5 px move mAP well beyond the tolerance
    shifted = TorchBackend(_Shift(fused, 1.5))
    m_shift = _map(shifted, loader, ev)  # measured: -1.1 points
    assert abs(m_shift - m_torch) > 20 * FLOAT_TOL


class _Shift(torch.nn.Module):
    def __init__(self, model, px):
        super().__init__()
        self.model, self.px = model, px

    def forward(self, x):
        y = self.model(x).clone()
        y[..., 0] += self.px
        return y


@pytest.mark.parametrize("flavour", ["onnxruntime", "tensorrt"])
def test_ort_int8_map_equals_fake_quant(setup, tmp_path, flavour):
    import onnxruntime as ort

    from yolo_q.export.qdq import export_qdq
    from yolo_q.quant import calibrate, convert
    d, cfg, fused, loader, ev = setup
    q = convert(fused, cfg, flavour=flavour)
    calibrate(q, [b[0] for b in loader], method="max", progress=False)
    m_fq = _map(TorchBackend(q), loader, ev)
    onnx_path = export_qdq(q, tmp_path / f"{flavour}.onnx", img_size=IMG, batch=1)
    m_ort = _map(OrtBackend(onnx_path, threads=1), loader, ev)  # integer kernels
    plain = OrtBackend(onnx_path, threads=1)  # Q/DQ executed as written: the export itself
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    m_plain = _map(plain, loader, ev)
    m_float = _map(TorchBackend(fused), loader, ev)
    print(f"[{flavour}] mAP50-95 torch float {m_float:.4f}  fake-quant {m_fq:.4f}  "
          f"ORT QDQ (no graph optimization) {m_plain:.4f}  ORT INT8 kernels {m_ort:.4f}")
    assert m_fq > 0.9 * m_float  # the quantized model still detects
    assert abs(m_plain - m_fq) <= INT8_TOL
    assert abs(m_ort - m_fq) <= INT8_TOL


# OpenVINO (optional dependency): the same shared evaluate() on the same set. Its CPU plugin
# computes float layers in FP32 (precision="f32"; otherwise bf16 on AMX CPUs) and the QDQ graph
# with integer convolutions, which requantize in their own arithmetic like ORT's: measured on a
# Xeon with AMX-INT8, 0.21 (onnxruntime flavour) and 0.26 (tensorrt flavour) points from torch
# fake-quant on these 12 images (ORT: 0.09 / 0.12), the rounding-tie noise INT8_TOL describes;
# the 0.2-point goal is checked on the benchmark's val set (benchmarks/cpu_int8.md).


def test_openvino_fp32_map_equals_torch(setup, tmp_path):
    pytest.importorskip("openvino")
    from yolo_q.eval import OvBackend
    from yolo_q.export import export_onnx
    d, cfg, fused, loader, ev = setup
    m_torch = _map(TorchBackend(fused), loader, ev)
    onnx_path = export_onnx(fused, tmp_path / "fp32.onnx", img_size=IMG, dynamic_batch=True)
    ov = OvBackend(onnx_path, threads=1)
    assert ov.nc == 3 and ov.fixed_batch is None
    m_ov = _map(ov, loader, ev)
    print(f"mAP50-95 torch {m_torch:.4f}  OpenVINO FP32 {m_ov:.4f}")
    assert abs(m_ov - m_torch) <= FLOAT_TOL


@pytest.mark.parametrize("flavour", ["onnxruntime", "tensorrt"])
def test_openvino_int8_map_equals_fake_quant(setup, tmp_path, flavour):
    pytest.importorskip("openvino")
    from yolo_q.eval import OvBackend
    from yolo_q.export.qdq import export_qdq
    from yolo_q.quant import calibrate, convert
    d, cfg, fused, loader, ev = setup
    q = convert(fused, cfg, flavour=flavour)
    calibrate(q, [b[0] for b in loader], method="max", progress=False)
    m_fq = _map(TorchBackend(q), loader, ev)
    m_float = _map(TorchBackend(fused), loader, ev)
    onnx_path = export_qdq(q, tmp_path / f"{flavour}.onnx", img_size=IMG, batch=1)
    m_ov = _map(OvBackend(onnx_path, threads=1), loader, ev)
    print(f"[{flavour}] mAP50-95 torch float {m_float:.4f}  fake-quant {m_fq:.4f}  "
          f"OpenVINO INT8 {m_ov:.4f}")
    assert m_fq > 0.9 * m_float
    assert abs(m_ov - m_fq) <= INT8_TOL
