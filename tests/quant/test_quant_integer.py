import math

import pytest
import torch

from quant_testutils import calibrated, images
from yolo_q.quant import (int32_bias_overflow, integer_check, quant_state, quantize_multiplier,
                          quantized_layers, requantize)


@pytest.mark.parametrize("m", [0.3, 1.0, 3.1e-5, 0.999999999, 7.5])
def test_quantize_multiplier(m):
    m0, n = quantize_multiplier(m)
    assert 2 ** 30 <= m0 < 2 ** 31 and isinstance(n, int)
    assert m0 * 2.0 ** (-31 - n) == pytest.approx(m, rel=2 ** -30)
    with pytest.raises(ValueError):
        quantize_multiplier(0.0)


def test_requantize_rounds_half_up_in_integers():
    m0, n = quantize_multiplier(0.5)
    acc = torch.tensor([[5, -5, 7, -7, 6, 2 ** 31 - 1]], dtype=torch.long).view(1, 1, -1)
    out = requantize(acc, torch.tensor([m0]), torch.tensor([n]))
    assert out.flatten().tolist() == [3, -2, 4, -3, 3, 2 ** 30]
    m0, n = quantize_multiplier(0.1)  # 7 * 0.1 = 0.7 -> 1, 1234 * 0.1 = 123.4 -> 123
    out = requantize(torch.tensor([7, 1234, -1234]).view(1, 1, -1), torch.tensor([m0]),
                     torch.tensor([n]))
    assert out.flatten().tolist() == [1, 123, -123]


@pytest.mark.parametrize("flavour,hp", [("tensorrt", True), ("onnxruntime", False)])
def test_integer_arithmetic_matches_fake_quant_within_one_step(flavour, hp):
    q = calibrated(flavour, hp=hp)
    dev = integer_check(q, images(2, seed=31))
    assert sorted(dev) == sorted(quantized_layers(q))  # every layer, pools included
    assert max(dev.values()) <= 1.0 + 1e-6
    assert all(math.isfinite(v) for v in dev.values())


def test_integer_check_detects_a_wrong_layer():
    q = calibrated("onnxruntime", hp=False)
    name = "neck.Rep_p4.block.0.rbr_reparam"
    layer = q.get_submodule(name)
    bias = layer.bias.detach().clone()
    with torch.no_grad():  # fake-quant forward now differs from the integer path by 3 steps
        step = layer._output_quantizer.scale.item()
        layer.forward = (lambda f: (lambda x: f(x) + 3 * step))(layer.forward)
    dev = integer_check(q, images(2, seed=32))
    assert dev[name] >= 2.5
    assert layer.bias.equal(bias)


def _dead_channel_model(name):
    """The tiny model with output channel 0 of ``name`` dead (weights 1e-4 of their size) and a
    large bias, calibrated: that channel's weight scale is so small that its int32 bias code
    round(b / (s_x s_w)) is far beyond the int32 range."""
    from quant_testutils import calib_batches, tiny_fused
    from yolo_q.quant import calibrate, convert
    model = tiny_fused()
    conv = model.get_submodule(name)
    with torch.no_grad():
        conv.weight[0] *= 1e-4 / conv.weight[0].abs().max()  # amax 1e-4: the calibration floor
        conv.bias[0] = 100.0
    q = convert(model, flavour="onnxruntime", high_precision_outputs=False)
    calibrate(q, calib_batches(), method="max", progress=False)
    return q


def test_int32_bias_overflow_is_saturated_counted_and_shown():
    name = "neck.Rep_p4.block.0.rbr_reparam"
    q = _dead_channel_model(name)
    layer = q.get_submodule(name)
    spec = next(s for s in quant_state(q)["layers"] if s["name"] == name)
    s_x = q.get_submodule(spec["input_from"]).scale.double()
    s_w = layer._weight_quantizer.scale.double()[0]
    assert 100.0 / (s_x * s_w) > 2 * 2 ** 31  # the channel the check used to crash on
    assert int32_bias_overflow(q) == {name: 1}
    dev = integer_check(q, images(2, seed=33))  # raised OverflowError before
    assert sorted(dev) == sorted(quantized_layers(q))
    # the saturated bias (INT32_MAX * s_x * s_w, far below 100) is what an engine computes: the
    # layer deviates by many steps; every other layer stays within one step
    assert dev[name] > 10
    assert max(v for k, v in dev.items() if k != name) <= 1.0 + 1e-6
    assert int32_bias_overflow(calibrated("onnxruntime", hp=False)) == {}
    # the PTQ and QAT reports list the saturated channels
    from yolo_q.quant.ptq import _integer_report
    from yolo_q.quant.qat import format_report
    lines = []
    rep = _integer_report(q, images(2, seed=33), lines.append)
    assert rep["bias_saturated"] == {name: 1} and rep["layers"] == dev
    qat = format_report({"integer_check": dev, "integer_bias_saturated": {name: 1}})
    for text in ("\n".join(lines), qat):
        assert f"{name}: bias of 1 channel(s) beyond int32" in text


def test_int32_accumulator_wraps_like_onnxruntime():
    """bias at INT32_MAX plus a positive product sum wraps to a negative accumulator
    (ONNX Runtime's QLinearConv does: INT32_MAX + 10000 -> round(acc * 1e-9) = -2, not +2)."""
    from yolo_q.quant.integer import _wrap_int32
    acc = torch.tensor([2 ** 31 - 1 + 10000, -2 ** 31 - 10000, 5, -2 ** 31], dtype=torch.long)
    assert _wrap_int32(acc).tolist() == [-2 ** 31 + 9999, 2 ** 31 - 10000, 5, -2 ** 31]
