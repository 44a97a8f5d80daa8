import math

import pytest
import torch

from quant_testutils import (DEAD_LAYER, calibrated, dead_channel_model, images, tiny_fused,
                             unfloored_)
from yolo_q.quant import (floor_weight_scales, int32_bias_overflow, integer_check, layer_modules,
                          quant_state, quantize_multiplier, quantized_layers, requantize,
                          set_quant_enabled)


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


def test_int32_bias_overflow_is_saturated_counted_and_shown():
    """A model whose weight scales lack the int32 bias floor (e.g. an old checkpoint)."""
    name = DEAD_LAYER
    q = unfloored_(dead_channel_model(name))
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


def _codes_and_bound(q, name):
    """|b| / (s_x s_w[c]) per channel of layer ``name`` (float64), and the bound it must stay
    under: INT32_MAX minus the largest product sum (taps x input span x weight span)."""
    layer = q.get_submodule(name)
    spec = next(s for s in quant_state(q)["layers"] if s["name"] == name)
    x_q = q.get_submodule(spec["input_from"])
    s_w = layer._weight_quantizer.scale.double()
    codes = layer.bias.detach().abs().double() / (x_q.scale.double() * s_w)
    span = 255 if x_q.unsigned else 128
    return codes, 2 ** 31 - 1 - layer.weight[0].numel() * span * 128


def test_weight_scale_floor_keeps_a_dead_channels_bias_in_int32():
    q = dead_channel_model()
    codes, bound = _codes_and_bound(q, DEAD_LAYER)
    # the bias code plus any product sum fits int32, and the floor raised no more than needed
    assert codes.max() <= bound and codes[0] > 0.99 * bound
    assert int32_bias_overflow(q) == {}
    # only that channel's weight scale differs from the per-channel max |w|
    for name, layer in layer_modules(q).items():
        if getattr(layer, "_weight_quantizer", None) is None:
            continue
        amax, axis = layer._weight_quantizer.amax, layer._weight_quantizer.axis
        dims = [d for d in range(4) if d != axis]  # axis 1 for transposed convs
        wmax = layer.weight.detach().abs().amax(dim=dims).clamp(min=1e-4)
        same = amax == wmax
        if name == DEAD_LAYER:
            assert amax[0] > 2 * wmax[0] and same[1:].all()
        else:
            assert same.all(), name
    # the integer path now computes the bias too: every layer within one step
    dev = integer_check(q, images(2, seed=33))
    assert max(dev.values()) <= 1.0 + 1e-6
    # and the fake-quant channel still carries it: within one output step of float
    layer = q.get_submodule(DEAD_LAYER)
    x = torch.rand(2, layer.in_channels, 8, 8)
    with torch.no_grad():
        y_q = layer(x)[:, 0]
        set_quant_enabled(q, False)
        y_f = layer(x)[:, 0]
    assert y_f.min() > 99 and (y_q - y_f).abs().max() <= layer._output_quantizer.scale * 1.01
    assert floor_weight_scales(q) == {}  # idempotent
    for flavour in ("onnxruntime", "tensorrt"):  # a model without dead channels: no change
        assert floor_weight_scales(calibrated(flavour)) == {}


def test_weight_scale_floor_per_tensor():
    """One weight scale per layer: the floor uses the largest bias of the layer."""
    layer_channels = tiny_fused().get_submodule(DEAD_LAYER).out_channels
    q = dead_channel_model(per_channel=False, dead=layer_channels)  # the whole layer is dead
    codes, bound = _codes_and_bound(q, DEAD_LAYER)
    assert q.get_submodule(DEAD_LAYER)._weight_quantizer.amax.dim() == 0
    assert codes.max() <= bound and codes.max() > 0.99 * bound
    assert int32_bias_overflow(q) == {}
    assert max(integer_check(q, images(2, seed=35)).values()) <= 1.0 + 1e-6


def test_floor_is_applied_to_old_checkpoints_on_load(caplog):
    from quant_testutils import tiny_cfg
    from yolo_q.quant import load_quantized
    q = unfloored_(dead_channel_model())
    assert int32_bias_overflow(q) == {DEAD_LAYER: 1}
    with caplog.at_level("WARNING"):
        loaded = load_quantized(tiny_cfg(), q.state_dict(), quant_state(q), "old.pt")
    assert int32_bias_overflow(loaded) == {}
    assert "old.pt: weight scales of 1 channel(s) raised" in caplog.text
    assert DEAD_LAYER in caplog.text
    # the floored weight scale is the one calibration gives
    assert loaded.get_submodule(DEAD_LAYER)._weight_quantizer.amax.equal(
        dead_channel_model().get_submodule(DEAD_LAYER)._weight_quantizer.amax)


@pytest.mark.parametrize("freeze", [True, False])
def test_qat_hook_keeps_the_floor_for_trained_biases(freeze):
    """QAT trains biases: a dead channel's bias may outgrow its weight scale; after each epoch
    the hook raises the scale again, on the model and on the EMA (what checkpoints hold)."""
    import copy
    from types import SimpleNamespace
    from yolo_q.quant.qat import QATHook
    q = unfloored_(dead_channel_model())
    ema = copy.deepcopy(q)
    trainer = SimpleNamespace(model=q, ema=SimpleNamespace(ema=ema), checkpoint_extras={})
    hook = QATHook(freeze_scales=freeze)
    hook.register(trainer)  # an old checkpoint: floored at the start
    assert int32_bias_overflow(q) == {}
    with torch.no_grad():
        ema.get_submodule(DEAD_LAYER).bias[0] = 1e4  # the EMA's bias has grown
    assert int32_bias_overflow(ema) == {DEAD_LAYER: 1}
    before = q.get_submodule(DEAD_LAYER)._weight_quantizer.amax.clone()
    hook.after_epoch()
    assert int32_bias_overflow(ema) == {} and int32_bias_overflow(q) == {}
    assert q.get_submodule(DEAD_LAYER)._weight_quantizer.amax.equal(before)  # model unchanged
