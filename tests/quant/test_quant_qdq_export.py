import numpy as np
import pytest
import torch

from quant_testutils import IMG, calibrated, exported, images, tiny_fused
from yolo_q.export.qdq import (QDQExportError, _consts, _RawOutputs, conv_quantization, export_qdq,
                               layer_parity, ort_optimized_op_counts, qdq_stats)
from yolo_q.quant import convert, quant_state, quantized_layers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SKIP = ("neck.Rep_p3", "detect.reg_convs.1")
# (flavour, high-precision outputs, skipped layers) of the cached calibrated models/exports
TRT = dict(flavour="tensorrt", hp=False, skip=SKIP)
ORT = dict(flavour="onnxruntime", hp=False)


def _ort(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"images": x.numpy()})


def _end_to_end_steps(q, path, x):
    """|ORT - torch| of the raw prediction maps in steps of the prediction output quantizers."""
    got = _ort(path, x)
    with torch.no_grad():
        ref = _RawOutputs(q.eval())(x)
    steps = []
    for kind, o, r in zip(("cls", "reg"), got, ref):
        n = [IMG // s * IMG // s for s in (8, 16, 32)]
        scale = np.concatenate([np.full(k, q.get_submodule(f"detect.{kind}_preds.{i}")
                                        ._output_quantizer.scale.item()) for i, k in enumerate(n)])
        steps.append(np.abs(o - r.numpy()) / scale[None, :, None])
    return np.concatenate([s.ravel() for s in steps])


@pytest.mark.parametrize("kw", [ORT, TRT], ids=["onnxruntime", "tensorrt"])
def test_ort_runs_each_layer_like_torch_fake_quant(kw):
    flavour = kw["flavour"]
    q = calibrated(**kw)
    path = exported(**kw, raw=True)
    x = images(2, seed=21)
    par = layer_parity(q, path, x)
    convs = [n for n in quantized_layers(q) if not n.endswith(".m")]
    assert sorted(par) == sorted(convs)  # every conv layer was matched and compared
    on_grid = {n for n in par if q.get_submodule(n)._output_quantizer is not None}
    # quantized outputs: at most one step, at rare rounding ties (fused integer kernels in the
    # onnxruntime flavour); float outputs (TensorRT flavour): float rounding only
    assert max(par[n]["max_steps"] for n in on_grid) <= 1.0 + 1e-3
    # (rare: < 1 % of a layer's outputs, measured up to 0.4 %; the 3-class prediction convs have
    # only 384 outputs on these 2 images, where 4 ties are 1.04 %)
    assert max(par[n]["frac_diff"] for n in on_grid) < 0.015
    assert all(par[n]["max_steps"] < 0.1 for n in set(par) - on_grid)
    assert len(on_grid) == (len(par) if flavour == "onnxruntime" else 6)
    # end to end, rare rounding ties compound through ~70 requantizations (measured: median
    # 1 step, 75-85 % within 2 steps); a wrong scale or zero point would be far off
    steps = _end_to_end_steps(q, path, x.float() / 255)
    assert np.median(steps) <= 2.0 + 1e-3
    assert np.mean(steps <= 2.0 + 1e-3) > 0.6


def test_onnxruntime_flavour_fuses_into_qlinearconv():
    q = calibrated(**ORT)
    ops = ort_optimized_op_counts(exported(**ORT, raw=True))
    convs = [s for s in quant_state(q)["layers"] if s["kind"] == "conv"]
    # every conv runs as an integer kernel: conv+ReLU, conv+SiLU (output quantized before the
    # SiLU) and, without high-precision outputs, the prediction convs
    assert ops["QLinearConv"] == len(convs) and ops.get("Conv", 0) == 0
    assert any(s["act_type"] == "silu" and s["output_at"] == "pre"
               for s in quant_state(q)["layers"])
    assert ops["QLinearConcat"] >= 4
    trt_ops = ort_optimized_op_counts(exported("tensorrt"))
    assert trt_ops.get("QLinearConv", 0) == 0  # TensorRT-style placement is not fused by ORT


def test_decoded_export_through_export_onnx():
    q = calibrated("tensorrt")
    path = exported("tensorrt")
    m = onnx.load(str(path))
    assert [o.name for o in m.graph.output] == ["outputs"]
    assert {p.key: p.value for p in m.metadata_props}["quant_flavour"] == "tensorrt"
    x = images(2, seed=22).float() / 255
    out = _ort(path, x)[0]
    with torch.no_grad():
        ref = q.eval()(x).numpy()
    assert out.shape == ref.shape
    # class scores (sigmoid) agree closely; boxes within a few pixels at 64 px
    assert np.median(np.abs(out[..., 5:] - ref[..., 5:])) < 0.01
    assert np.median(np.abs(out[..., :4] - ref[..., :4])) < 1.0


def test_partial_quantization_has_no_qdq_on_skipped_layers():
    q = calibrated(**TRT)
    path = exported(**TRT, raw=True)
    info = conv_quantization(path)
    skipped = set(quant_state(q)["skip"])
    assert {"neck.Rep_p3.block.1.rbr_reparam", "detect.reg_convs.1.block.conv"} <= skipped
    for name in skipped:
        assert info[name] == dict(input=False, weight=False, op="Conv"), name
    for name in quantized_layers(q):
        assert info[name]["input"] and (info[name]["weight"] or info[name]["op"] == "MaxPool"), name
    nodes = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert not any("/Rep_p3/" in n or "/reg_convs.1/" in n for n in nodes)
    st = qdq_stats(path)
    assert st["QuantizeLinear"] == st["DequantizeLinear"]


def test_export_errors(tmp_path):
    q = calibrated("tensorrt")
    with pytest.raises(QDQExportError, match="converted for 'tensorrt'"):
        export_qdq(q, tmp_path / "x.onnx", flavour="onnxruntime", img_size=IMG)
    with pytest.raises(QDQExportError, match="opset"):
        export_qdq(q, tmp_path / "x.onnx", img_size=IMG, opset=11)
    with pytest.raises(QDQExportError, match="not calibrated"):
        export_qdq(convert(tiny_fused()), tmp_path / "x.onnx", img_size=IMG)
    with pytest.raises(QDQExportError, match="quantized model"):
        export_qdq(tiny_fused(), tmp_path / "x.onnx", img_size=IMG)


@pytest.mark.parametrize("storage", ["uint8", "auto"])
def test_onnxruntime_flavour_int8_conv_is_exact_at_the_largest_codes(tmp_path, storage):
    """On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels add pairs of products in int16
    (vpmaddubsw), which saturates once codes are large (255 * 127 * 2 > 32767): a CI machine
    once saw 65 output steps of error. uint8 weights (zero point 128, the same grid) take ORT's
    u8 x u8 kernels, exact on every CPU; ``auto`` must pick a storage that is exact on the CPU
    running this test. Worst case: every input code 255 and every weight code +127."""
    import copy
    import warnings

    from yolo_q.export.qdq import resolve_ort_weights, weight_storage
    from yolo_q.quant.modules import QuantConv2d
    q = calibrated(**ORT)
    name, layer = next((n, m) for n, m in q.named_modules() if isinstance(m, QuantConv2d)
                       and m._input_quantizer is not None and m._output_quantizer is not None
                       and m.groups == 1)
    layer = copy.deepcopy(layer).eval()
    fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    with torch.no_grad():
        layer.weight.fill_(1.0)
        if layer.bias is not None:
            layer.bias.zero_()
        layer._weight_quantizer._amax.fill_(1.0)
        layer._input_quantizer._amax.fill_(1.0)
        layer._output_quantizer._amax.fill_(float(fan_in))
        x = torch.ones(1, layer.in_channels, 8, 8)
        ref = layer(x).numpy()
    path = tmp_path / "conv.onnx"
    dtype = resolve_ort_weights(storage)
    with weight_storage(layer, dtype), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert layer._weight_quantizer.zero_point == (128 if dtype == "uint8" else 0)
        torch.onnx.export(layer, x, str(path), opset_version=13, input_names=["x"], dynamo=False)
    assert layer._weight_quantizer.zero_point == 0  # restored
    assert ort_optimized_op_counts(path)["QLinearConv"] == 1  # ORT's integer kernel runs it
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    steps = np.abs(got - ref) / layer._output_quantizer.scale.item()
    assert ref.max() > 0.9 * fan_in and steps.max() <= 1.0 + 1e-3, (name, dtype, steps.max())


def test_ort_weights_choice_is_validated_and_recorded(tmp_path):
    from yolo_q.export.qdq import resolve_ort_weights
    with pytest.raises(ValueError, match="export.ort_weights must be one of"):
        resolve_ort_weights("int4")
    assert resolve_ort_weights("uint8") == "uint8" and resolve_ort_weights("int8") == "int8"
    q = calibrated(**ORT)
    path = export_qdq(q, tmp_path / "u8.onnx", img_size=IMG, ort_weights="uint8")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ort_weights"] == "uint8" and meta["quant_flavour"] == "onnxruntime"
    consts = _consts(proto)
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and consts[n.input[1]].size > 1]
    assert len(per_channel) >= len(quantized_layers(q)) // 2  # the weights' Q/DQ
    assert all(consts[n.input[2]].dtype == np.uint8 for n in per_channel)
    assert all(qz.uint8_storage is False for n, qz in q.named_modules()
               if n.endswith("_weight_quantizer"))


def test_ort_backend_warns_about_int8_weights_on_a_cpu_without_vnni(tmp_path, monkeypatch):
    import warnings

    import yolo_q.export.qdq as qdq
    from yolo_q.eval.backends import OrtBackend
    q = calibrated(**ORT)
    paths = {w: export_qdq(q, tmp_path / f"{w}.onnx", img_size=IMG, ort_weights=w)
             for w in ("int8", "uint8")}
    monkeypatch.setattr(qdq.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(qdq, "_cpu_flags", lambda: {"avx2", "avx512f"})  # no VNNI
    assert qdq.resolve_ort_weights("auto") == "uint8"
    with pytest.warns(RuntimeWarning, match="export.ort_weights=uint8"):
        OrtBackend(paths["int8"], threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OrtBackend(paths["uint8"], threads=1).metadata["ort_weights"] == "uint8"
        monkeypatch.setattr(qdq, "_cpu_flags", lambda: {"avx2", "avx512_vnni"})
        assert qdq.resolve_ort_weights("auto") == "int8"
        OrtBackend(paths["int8"], threads=1)


def test_dead_channel_bias_runs_in_onnxruntime_like_torch(tmp_path):
    """A dead channel (weights ~1e-4, bias 100): ONNX Runtime's optimizer fuses the conv into
    QLinearConv and converts the float bias to int32 with the exported scales; without the
    int32 bias floor of the weight scales the code overflowed to INT32_MIN and the channel
    gave 0 instead of ~100. With it, ORT computes the layer as torch fake-quant does."""
    from quant_testutils import DEAD_LAYER, dead_channel_model
    from yolo_q.quant import capture_layer_outputs
    q = dead_channel_model()
    path = export_qdq(q, tmp_path / "dead.onnx", img_size=IMG, batch=2, raw_outputs=True)
    convs = [s for s in quant_state(q)["layers"] if s["kind"] == "conv"]
    assert ort_optimized_op_counts(path)["QLinearConv"] == len(convs)  # ORT quantizes the bias
    x = images(2, seed=36)
    with torch.no_grad(), capture_layer_outputs(q, [DEAD_LAYER]) as out:
        q.eval()(x.float() / 255)
    assert out[DEAD_LAYER][0][:, 0].min() > 99  # the channel carries its bias in torch
    par = layer_parity(q, path, x)  # ORT with all optimizations (QLinearConv kernels)
    assert par[DEAD_LAYER]["max_steps"] <= 1.0 + 1e-3
    assert max(v["max_steps"] for v in par.values()) <= 1.0 + 1e-3
    steps = _end_to_end_steps(q, path, x.float() / 255)  # a plain default session, end to end
    assert np.median(steps) <= 2.0 + 1e-3


def test_export_refuses_a_bias_beyond_int32(tmp_path):
    from quant_testutils import DEAD_LAYER, dead_channel_model, unfloored_
    q = unfloored_(dead_channel_model())  # weight scales without the floor (old checkpoint)
    with pytest.raises(QDQExportError, match=f"1 channel.* of {DEAD_LAYER} is beyond int32"):
        export_qdq(q, tmp_path / "x.onnx", img_size=IMG)
    assert not (tmp_path / "x.onnx").exists()
