import math

import pytest
import torch

from quant_testutils import calibrated, images
from yolo_q.quant import integer_check, quantize_multiplier, quantized_layers, requantize


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
