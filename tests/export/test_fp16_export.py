"""FP16 ONNX for strongly typed TensorRT builds: valid ONNX (full check), every non-INT8 float
tensor FP16 with float32 I/O, weights folded exactly to int8, and ONNX Runtime (CPU) outputs
close to the FP32 graph - for a float model, a QDQ model with float layers (partial
quantization, high-precision head outputs, DFL), and an end-to-end NMS graph."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from yolo_q.eval.postprocess import e2e_to_detections  # noqa: E402
from yolo_q.export import export_onnx  # noqa: E402
from yolo_q.export.fp16 import FP16_MIN_SCALE, convert_fp16, is_fp16_graph, write_fp16  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "quant_testutils", Path(__file__).resolve().parents[1] / "quant" / "quant_testutils.py")
qt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qt)
F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def run(path, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"images": x.numpy()})


@pytest.fixture(scope="module")
def x():
    return qt.images(3, qt.IMG, 7).float() / 255


def _float_inits(m):
    """float32 initializers read anywhere but at inputs ONNX allows only float32 for (Range)."""
    from yolo_q.export.fp16 import fp32_slots
    f32 = {i.name for i in m.graph.initializer if i.data_type == F32}
    return sorted({name for n in m.graph.node for k, name in enumerate(n.input)
                   if name in f32 and k not in fp32_slots(n)[0]})


def test_float_model_becomes_pure_fp16(tmp_path, x):
    model = qt.tiny_fused(use_dfl=True)
    src = export_onnx(model, tmp_path / "f.onnx", img_size=qt.IMG, dynamic_batch=True)
    before = src.read_bytes()
    dst = write_fp16(src)
    assert src.read_bytes() == before and dst.name == "f_fp16.onnx"  # input never overwritten
    m = onnx.load(str(dst))
    assert is_fp16_graph(m) and not is_fp16_graph(src)
    assert _float_inits(m) == []  # every weight / bias / constant is FP16
    assert sum(i.data_type == F16 for i in m.graph.initializer) > 30
    assert m.graph.input[0].type.tensor_type.elem_type == F32  # I/O stay float32
    assert m.graph.output[0].type.tensor_type.elem_type == F32
    a, b = run(src, x)[0], run(dst, x)[0]
    assert b.dtype == np.float32 and a.shape == b.shape
    box = np.abs(a[..., :4] - b[..., :4]).max() / np.abs(a[..., :4]).max()
    assert box < 5e-3, box
    assert np.abs(a[..., 4:] - b[..., 4:]).max() < 5e-3
    assert a[..., 5:].std() > 0.01  # non-degenerate scores were compared


def test_qdq_partial_model_fp16_everywhere_but_int8(tmp_path, x):
    skip = ("backbone.ERBlock_2.0.rbr_reparam",)
    q = qt.calibrated("tensorrt", hp=True, skip=skip)
    from yolo_q.export.qdq import export_qdq
    src = export_qdq(q, tmp_path / "q.onnx", img_size=qt.IMG, batch=3)
    dst = write_fp16(src)
    m = onnx.load(str(dst))
    assert _float_inits(m) == []
    kinds = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    inits = {i.name: i for i in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    convs = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    int8_w = [c for c in convs if c.input[1] in producers
              and producers[c.input[1]].op_type == "DequantizeLinear"
              and inits[producers[c.input[1]].input[0]].data_type == onnx.TensorProto.INT8]
    float_w = [c for c in convs if c.input[1] in inits]
    assert int8_w and float_w  # quantized convs read folded int8 weights; kept layers FP16
    assert all(inits[c.input[1]].data_type == F16 for c in float_w)
    # folded weights are the exact codes ONNX Runtime computes from the FP32 QDQ graph
    src_m = onnx.load(str(src))
    meta = {p.key: p.value for p in m.metadata_props}
    assert int(meta["fp16_folded_weight_q"]) == len(int8_w) and meta["fp16_raised_scales"] == "0"
    assert sum(n.op_type == "QuantizeLinear" for n in src_m.graph.node) - len(int8_w) == \
        sum(n.op_type == "QuantizeLinear" for n in m.graph.node)
    a, b = run(src, x)[0], run(dst, x)[0]
    d = np.abs(a - b)
    # FP16 arithmetic moves some activations across INT8 rounding boundaries: small spread
    assert np.median(d[..., 4:]) < 0.01 and np.percentile(d[..., 4:], 99) < 0.06
    assert np.median(d[..., :4]) / np.abs(a[..., :4]).max() < 0.01


def test_tiny_scales_are_raised_and_weights_requantized():
    from onnx import helper, numpy_helper
    w = np.array([[[[1e-5]]], [[[0.5]]]], np.float32)  # channel 0 below the FP16 range
    scale = np.array([1e-5 / 127, 0.5 / 127], np.float32)
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
         helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0),
         helper.make_node("Conv", ["images", "wd"], ["outputs"])],
        "g", [helper.make_tensor_value_info("images", F32, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("outputs", F32, [1, 2, 2, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(np.zeros(2, np.int8), "z")])
    m = convert_fp16(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    s16 = inits[dq.input[1]]
    assert s16.dtype == np.float16 and s16[0] >= np.float16(FP16_MIN_SCALE)
    assert inits[dq.input[0]].tolist() == [[[[0]]], [[[127]]]]  # re-rounded on the raised grid
    assert {p.key: p.value for p in m.metadata_props}["fp16_raised_scales"] == "1"
    out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": np.ones((1, 1, 2, 2), np.float32)})[0]
    assert np.allclose(out[0, 1], 0.5, atol=1e-3) and np.allclose(out[0, 0], 0, atol=1e-4)


def test_end2end_nms_graph_in_fp16_gives_the_same_detections(tmp_path, x):
    model = qt.tiny_fused()
    src = export_onnx(model, tmp_path / "e2e.onnx", img_size=qt.IMG, dynamic_batch=True,
                      end2end=True, conf_thres=0.2, iou_thres=0.45, max_det=30)
    dst = write_fp16(src)
    m = onnx.load(str(dst))
    nms = next(n for n in m.graph.node if n.op_type == "NonMaxSuppression")
    producers = {o: n for n in m.graph.node for o in n.output}
    assert producers[nms.input[0]].op_type == "Cast"  # float32-only inputs get a Cast back
    a, b = e2e_to_detections(*run(src, x)), e2e_to_detections(*run(dst, x))
    assert sum(len(d) for d in a) > 5
    for da, db in zip(a, b):
        assert abs(len(da) - len(db)) <= 2
        dist = (da[:, None, :4] - db[None, :, :4]).abs().amax(2)  # (random model: raw corners)
        dist[da[:, None, 5] != db[None, :, 5]] = float("inf")
        matched = (dist.min(1).values < 1.0).float().mean()  # same box (< 1 px), same class
        assert matched >= 0.9, matched


def test_export_model_fp16_option(tmp_path):
    from yolo_q.export.api import default_output, export_model
    cfg = qt.tiny_cfg()
    model = qt.calibrated("tensorrt")
    data = tmp_path / "data" / "classes.yaml"  # the model's classes (export checks nc against it)
    data.parent.mkdir()
    data.write_text("train: images\nval: images\nnames: [%s]\n"
                    % ", ".join(f"c{i}" for i in range(int(cfg.model.nc))))
    cfg.data.dataset = str(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = export_model(cfg, model, out=out_dir / "m.onnx", img_size=qt.IMG, dynamic=True,
                       fp16=True)
    assert res["fp16"] and res["quantized"] and is_fp16_graph(res["path"])
    assert res["info"]["has_qdq"] and res["info"]["opset"] == 19
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx"]  # no leftovers
    assert default_output("w/best.pt", "tensorrt", 640, fp16=True).name == \
        "best_int8_tensorrt_640_fp16.onnx"
