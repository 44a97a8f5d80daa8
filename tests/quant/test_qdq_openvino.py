"""What OpenVINO makes of our exports: the runtime graph's precisions
(yolo_q.eval.backends.ov_precision_summary) and the signed-activation storage
(export_qdq(act_storage=...))."""
import numpy as np
import pytest

from quant_testutils import IMG, calibrated, images, tiny_fused
from yolo_q.export import export_onnx
from yolo_q.export.qdq import QDQExportError, _consts, export_qdq
from yolo_q.quant import all_quantizers, quant_state

onnx = pytest.importorskip("onnx")
pytest.importorskip("openvino")

from yolo_q.eval.backends import (format_ov_summary, ov_compile,  # noqa: E402
                                  ov_precision_summary, ov_runtime_layers)

ORT = dict(flavour="onnxruntime", hp=True)  # the default placement: SiLU convs quantize pre-act


def _act_zero_points(path):
    """dtype and value of the zero points of the per-tensor (activation) QuantizeLinear nodes."""
    proto = onnx.load(str(path))
    consts = _consts(proto)
    zps = [consts[n.input[2]] for n in proto.graph.node
           if n.op_type == "QuantizeLinear" and consts[n.input[1]].size == 1]
    return [(z.dtype, int(z.reshape(-1)[0])) for z in zps]


def _run(compiled, x):
    req = compiled.create_infer_request()
    req.infer({0: x})
    return np.array(req.get_output_tensor(0).data)


def test_precision_summary_float_vs_qdq_and_signed_storage(tmp_path):
    q = calibrated(**ORT)
    layers = quant_state(q)["layers"]
    n_conv = sum(s["kind"] == "conv" for s in layers)
    n_deconv = sum(s["kind"] == "conv_transpose" for s in layers)
    assert n_deconv == 2 and any(s["output_at"] == "pre" for s in layers)
    flags = {n: qz.uint8_storage for n, qz in all_quantizers(q).items()}

    paths = {st: export_qdq(q, tmp_path / f"{st}.onnx", img_size=IMG, batch=2, act_storage=st)
             for st in ("uint8", "int8")}
    assert {n: qz.uint8_storage for n, qz in all_quantizers(q).items()} == flags  # restored
    for st, path in paths.items():
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["act_storage"] == st
    zp_u8, zp_s8 = _act_zero_points(paths["uint8"]), _act_zero_points(paths["int8"])
    # the signed grids: uint8 with zero point 128, or int8 with zero point 0; unsigned unchanged
    signed_u8 = [z for z in zp_u8 if z == (np.uint8, 128)]
    assert signed_u8 and len(signed_u8) == sum(z == (np.int8, 0) for z in zp_s8)
    assert sorted(z for z in zp_u8 if z[1] == 0) == sorted(z for z in zp_s8 if z[0] == np.uint8)

    float_path = export_onnx(tiny_fused(), tmp_path / "fp32.onnx", img_size=IMG, batch=2,
                             simplify=False)
    compiled = {k: ov_compile(p, threads=1) for k, p in
                [("fp32", float_path), *paths.items()]}
    s = {k: ov_precision_summary(c) for k, c in compiled.items()}

    # float model: every convolution runs in f32
    assert s["fp32"]["counts"]["Convolution"] == {"int8": 0, "float": n_conv}
    assert len(s["fp32"]["float"]["Convolution"]) == n_conv
    for st in ("uint8", "int8"):
        c = s[st]["counts"]
        # every quantized convolution and both upsampling deconvolutions run in integer
        assert c["Convolution"] == {"int8": n_conv, "float": 0}
        assert c["Deconvolution"] == {"int8": n_deconv, "float": 0}
        assert "Convolution" not in s[st]["float"] and "Deconvolution" not in s[st]["float"]
        assert s[st]["conv_out"].get("f32") == 6  # high-precision outputs: the prediction convs
        assert f"Convolution {n_conv}/{n_conv} int8" in format_ov_summary(s[st])
    # zero point 128 cannot be folded through the SiLUs and the upsample Concats: OpenVINO
    # runs u8 -> u8 requantize passes there; with int8 storage every Q/DQ folds into a conv
    assert len(s["uint8"]["requantize"]) >= 2 + 3
    assert s["int8"]["requantize"] == []
    assert s["int8"]["conv_out"].get("i8", 0) > 0 and "i8" not in s["uint8"]["conv_out"]

    # the same grid values: both files compute (almost) the same detections
    x = images(2, seed=33).numpy().astype(np.float32) / 255
    a, b = _run(compiled["uint8"], x), _run(compiled["int8"], x)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    scale = np.abs(a).max(axis=(0, 1))  # per output column (boxes in pixels, scores)
    assert np.median(diff / scale) == 0 and np.mean(diff / scale < 1e-3) > 0.99


def test_runtime_layers_and_bad_storage(tmp_path):
    q = calibrated(**ORT)
    with pytest.raises(QDQExportError, match="export.act_storage must be one of"):
        export_qdq(q, tmp_path / "x.onnx", img_size=IMG, act_storage="int4")
    assert not (tmp_path / "x.onnx").exists()
    path = export_qdq(q, tmp_path / "s8.onnx", img_size=IMG, batch=1, act_storage="int8")
    rows = ov_runtime_layers(ov_compile(path, threads=1))
    assert {"name", "type", "precision", "out", "inputs", "primitive", "fused"} <= set(rows[0])
    convs = [r for r in rows if r["type"] == "Convolution"]
    # the fused-in original layers name the conv and its quantizers
    assert all(any("/Conv" in f for f in r["fused"]) for r in convs)
    assert any(any("_output_quantizer" in f for f in r["fused"]) for r in convs)
    assert ov_precision_summary(rows) == ov_precision_summary(ov_compile(path, threads=1))
