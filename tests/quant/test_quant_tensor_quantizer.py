import pytest
import torch

from yolo_q.quant import AMAX_EPS, QuantizerError, TensorQuantizer


def test_per_tensor_signed_grid_by_hand():
    q = TensorQuantizer(num_bits=8)
    q.amax = 1.27  # scale 0.01, codes -128..127
    x = torch.tensor([0.004, 0.006, 0.0149, -0.0151, 1.3, -1.3, 0.5])
    y = q(x)
    expected = torch.tensor([0.0, 0.01, 0.01, -0.02, 1.27, -1.28, 0.5])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    assert (q.quant_min, q.quant_max, q.zero_point) == (-128, 127, 0)
    assert q.quantize_int(x).tolist() == [0, 1, 1, -2, 127, -128, 50]


def test_unsigned_and_uint8_storage_grids():
    u = TensorQuantizer(unsigned=True)
    u.amax = 2.55  # scale 0.01, codes 0..255
    x = torch.tensor([-0.3, 0.0, 0.013, 2.0, 3.0])
    torch.testing.assert_close(u(x), torch.tensor([0.0, 0.0, 0.01, 2.0, 2.55]), atol=1e-6, rtol=0)
    assert (u.quant_min, u.quant_max, u.zero_point) == (0, 255, 0)
    s8, s8u = TensorQuantizer(), TensorQuantizer(uint8_storage=True)
    s8.amax = s8u.amax = 3.0
    x = torch.linspace(-4, 4, 1001)
    torch.testing.assert_close(s8u(x), s8(x), atol=0, rtol=0)  # same grid, other storage
    assert (s8u.quant_min, s8u.quant_max, s8u.zero_point) == (0, 255, 128)
    assert s8u.quantize_int(torch.tensor([0.0, -3.0])).tolist() == [128, 1]
    with pytest.raises(ValueError):
        TensorQuantizer(unsigned=True, uint8_storage=True)


def test_straight_through_gradient_inside_range_only():
    q = TensorQuantizer()
    q.amax = 1.27
    x = torch.tensor([-2.0, -1.0, 0.333, 1.0, 1.26, 1.3], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert q._amax.grad is None and not q._amax.requires_grad


def test_per_channel_axis0_and_axis1():
    w = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    q0 = TensorQuantizer(axis=0, num_channels=4)
    q0.amax = w.abs().amax(dim=(1, 2, 3))
    s = (w.abs().amax(dim=(1, 2, 3)) / 127).view(-1, 1, 1, 1)
    torch.testing.assert_close(q0(w), torch.round(w / s).clamp(-128, 127) * s)
    assert (q0(w) - w).abs().max() <= s.max() / 2 + 1e-7
    q1 = TensorQuantizer(axis=1, num_channels=3)  # ConvTranspose2d weights (in, out, kh, kw)
    q1.amax = w.abs().amax(dim=(0, 2, 3))
    s1 = (w.abs().amax(dim=(0, 2, 3)) / 127).view(1, -1, 1, 1)
    torch.testing.assert_close(q1(w), torch.round(w / s1).clamp(-128, 127) * s1)
    with pytest.raises(QuantizerError, match="shape"):
        q1.amax = torch.ones(4)


def test_modes_calibration_and_errors():
    q = TensorQuantizer(calibrator="max", name="neck.x.conv._input_quantizer")
    x = torch.tensor([0.5, -2.0, 1.0])
    with pytest.raises(QuantizerError, match="neck.x.conv._input_quantizer.*not calibrated"):
        q(x)
    q.enable_calib()
    q.disable_quant()
    assert q(x) is x  # calibrate mode passes through
    q(torch.tensor([3.0]))
    assert q.load_calib_amax() and q.amax.item() == 3.0
    q.disable_calib()
    q.enable_quant()
    assert not torch.equal(q(torch.tensor([0.01])), torch.tensor([0.01]))
    q.disable()
    x2 = torch.tensor([0.01])
    assert q(x2) is x2
    empty = TensorQuantizer(calibrator="percentile", name="a.b")
    with pytest.raises(QuantizerError, match="a.b.*no data"):
        empty.load_calib_amax()
    assert empty.load_calib_amax(strict=False) is False


def test_zero_amax_is_floored():
    q = TensorQuantizer(axis=0, num_channels=2)
    q.amax = torch.tensor([0.0, 1.0])
    assert q.amax[0].item() == pytest.approx(AMAX_EPS)
    w = torch.tensor([[0.0, 0.0], [0.5, -1.0]])
    y = q(w)
    assert torch.isfinite(y).all() and y[0].abs().sum() == 0


def test_state_dict_round_trip_and_uncalibrated_flag():
    q = TensorQuantizer(axis=0, num_channels=3)
    assert list(q.state_dict()) == ["_amax"]
    fresh = TensorQuantizer(axis=0, num_channels=3)
    fresh.load_state_dict(q.state_dict())
    assert not fresh.is_calibrated  # -1 = uncalibrated survives a save/load
    q.amax = torch.tensor([1.0, 2.0, 3.0])
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_calibrated and fresh.amax.tolist() == [1.0, 2.0, 3.0]
    fresh.reset_amax()
    assert not fresh.is_calibrated


def test_range_ema_updates_only_in_training():
    q = TensorQuantizer()
    q.amax = 1.0
    q.enable_range_ema(0.9)
    q.eval()
    q(torch.tensor([5.0]))
    assert q.amax.item() == 1.0
    q.train()
    q(torch.tensor([-5.0, 2.0]))
    assert q.amax.item() == pytest.approx(0.9 * 1.0 + 0.1 * 5.0)
    q.disable_range_ema()
    q(torch.tensor([50.0]))
    assert q.amax.item() == pytest.approx(1.4)


def test_learned_amax_is_lsq_and_exports_like_a_buffer():
    """learn_amax: the same values as the buffer quantizer in every mode; in training with
    gradients the step size gets LSQ's gradient (straight-through rounding; without LSQ's
    1/sqrt(numel * qmax) factor), computed here by hand; the state dict loads into a buffer model."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5) * 2
    ref, q = TensorQuantizer(), TensorQuantizer()
    ref.amax = q.amax = 3.0
    p = q.learn_amax()
    assert q.learns_amax and isinstance(p, torch.nn.Parameter)
    assert [n for n, _ in q.named_parameters()] == ["_amax"] and not list(q.named_buffers())
    q.train()
    y = q(x)
    assert torch.equal(y, ref(x))
    (y * x).sum().backward()
    s = torch.tensor(3.0 / 127, requires_grad=True)  # by hand: y = s * clamp(round(x / s))
    v = torch.clamp(x / s, -128, 127)
    y_hand = (v + (v.round() - v).detach()) * s
    (y_hand * x).sum().backward()
    assert p.grad is not None and float(p.grad) == pytest.approx(float(s.grad) / 127, rel=1e-4)
    with torch.no_grad():  # eval / export path: plain fake quantization of the parameter
        p.mul_(0.5)
        assert torch.equal(q(x), torch.fake_quantize_per_tensor_affine(x, 1.5 / 127, 0, -128, 127))
    fresh = TensorQuantizer()
    fresh.load_state_dict(q.state_dict())
    assert fresh.amax.item() == pytest.approx(1.5) and not fresh.learns_amax
    with pytest.raises(QuantizerError, match="not calibrated"):
        TensorQuantizer().learn_amax()
    with pytest.raises(QuantizerError, match="per tensor only"):
        per_channel = TensorQuantizer(axis=0, num_channels=3)
        per_channel.amax = 1.0
        per_channel.learn_amax()


def test_half_precision_input_keeps_dtype():
    q = TensorQuantizer()
    q.amax = 1.27
    y = q(torch.tensor([0.004, 0.5], dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y[0].item() == 0.0
