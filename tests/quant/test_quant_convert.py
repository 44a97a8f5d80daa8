import pytest
import torch
import torch.nn as nn

from quant_testutils import IMG, calib_batches, calibrated, images, tiny_cfg, tiny_fused
from yolo_q.io import load_checkpoint, save_checkpoint
from yolo_q.models import build_model
from yolo_q.quant import (CalibrationError, QuantConv2d, QuantConvTranspose2d, QuantMaxPool2d,
                          QuantStateError, TensorQuantizer, all_quantizers, calibrate,
                          calibrate_weights, capture_layer_outputs, convert, disable_layers, enable_range_ema,
                          layer_output_errors, quant_state,
                          quantize_only, quantized_layers, resolve_settings, restore,
                          set_quant_enabled, weight_quantizers)

PREDS = [f"detect.{k}_preds.{i}" for k in ("cls", "reg") for i in range(3)]


def _float_layers(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d))}


def test_tensorrt_structure_and_float_equivalence():
    fused = tiny_fused()
    q = convert(fused, flavour="tensorrt")
    assert not any(isinstance(m, TensorQuantizer) for m in fused.modules())  # input untouched
    names = quantized_layers(q)
    assert set(names) == set(_float_layers(fused)) - {"detect.proj_conv"}  # DFL off: unused
    for n in names:
        m = q.get_submodule(n)
        assert m._input_quantizer is not None and m._input_quantizer.name == f"{n}._input_quantizer"
        if isinstance(m, QuantMaxPool2d):
            continue
        wq = m._weight_quantizer
        if isinstance(m, QuantConvTranspose2d):  # weights (in, out, kh, kw): per out = axis 1
            assert wq.axis == 1 and wq.amax.shape == (m.out_channels,)
        else:
            assert isinstance(m, QuantConv2d) and wq.axis == 0
            assert wq.amax.shape == (m.out_channels,)
        assert m._output_quantizer is None  # TensorRT flavour: inputs only; HP outputs
    # the activation after each conv is absorbed: the parent's module became an Identity
    spec = {s["name"]: s for s in quant_state(q)["layers"]}
    stem = spec["backbone.stem.rbr_reparam"]
    assert stem["act"] == "backbone.stem.nonlinearity" and stem["act_type"] == "relu"
    assert isinstance(q.backbone.stem.nonlinearity, nn.Identity)
    assert isinstance(q.backbone.stem.rbr_reparam.act, nn.ReLU)
    assert spec["detect.stems.0.block.conv"]["act_type"] == "silu"
    # with every quantizer off the converted model is the float model
    set_quant_enabled(q, False)
    x = images(2).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(q(x), fused(x), rtol=0, atol=0)


def test_keys_follow_pytorch_quantization_naming():
    keys = convert(tiny_fused()).state_dict().keys()
    assert "backbone.stem.rbr_reparam._input_quantizer._amax" in keys
    assert "backbone.stem.rbr_reparam._weight_quantizer._amax" in keys
    assert "backbone.stem.rbr_reparam.weight" in keys  # float parameter names unchanged


def test_high_precision_outputs_option():
    on = convert(tiny_fused(), flavour="tensorrt")
    off = convert(tiny_fused(), flavour="tensorrt", high_precision_outputs=False)
    for n in PREDS:
        assert on.get_submodule(n)._output_quantizer is None
        oq = off.get_submodule(n)._output_quantizer
        assert oq is not None and not oq.unsigned
    with_out = [n for n in quantized_layers(off)
                if off.get_submodule(n)._output_quantizer is not None]
    assert sorted(with_out) == sorted(PREDS)


def test_onnxruntime_structure():
    q = convert(tiny_fused(), flavour="onnxruntime")
    spec = {s["name"]: s for s in quant_state(q)["layers"]}
    stem = q.get_submodule("backbone.stem.rbr_reparam")
    assert stem._input_quantizer.unsigned  # image in [0, 1]: uint8
    assert stem._output_quantizer.unsigned  # conv + ReLU output: uint8, zero point 0
    nxt = q.get_submodule("backbone.ERBlock_2.0.rbr_reparam")
    assert nxt._input_quantizer is None  # its producer already quantized the tensor
    assert spec["backbone.ERBlock_2.0.rbr_reparam"]["input_from"] == \
        "backbone.stem.rbr_reparam._output_quantizer"
    up = q.get_submodule("neck.Bifusion0.upsample.upsample_transpose")
    assert up._output_quantizer.uint8_storage and not up._output_quantizer.unsigned
    pool = q.get_submodule("backbone.ERBlock_5.2.cspsppf.m")
    assert pool._input_quantizer is None and pool._output_quantizer.unsigned
    # the concat after the pools feeds a conv that re-quantizes the Concat output
    assert q.get_submodule("backbone.ERBlock_5.2.cspsppf.cv5.block.conv")._input_quantizer.unsigned
    for n in PREDS:
        assert q.get_submodule(n)._output_quantizer is None


@pytest.mark.parametrize("preact", [True, False])
def test_onnxruntime_silu_placement(preact):
    """quant.preact_output: a conv + SiLU quantizes its pre-activation output (so ONNX Runtime
    runs the conv as QLinearConv) and each reader of the SiLU output quantizes it itself;
    off: the output after the SiLU is quantized once, and readers share that grid."""
    q = convert(tiny_fused(), flavour="onnxruntime", preact_output=preact)
    specs = {s["name"]: s for s in quant_state(q)["layers"]}
    silu = [n for n, s in specs.items() if s["act_type"] == "silu"]
    assert silu and all(n.startswith("detect.") for n in silu)  # the head's stems/cls/reg convs
    assert {specs[n]["output_at"] for n in silu} == {"pre" if preact else "post"}
    assert all(specs[n]["output_at"] == "post" for n in specs if n not in silu)
    stem = "detect.stems.0.block.conv"
    assert stem in silu
    readers = [n for n in ("detect.cls_convs.0.block.conv", "detect.reg_convs.0.block.conv")]
    for r in readers:
        assert (specs[r]["input_from"] == f"{r}._input_quantizer") == preact
    # torch computes what the runtime is given: act(fake_quant(conv)) vs fake_quant(act(conv))
    calibrate(q, calib_batches(), method="max", progress=False)
    layer = q.get_submodule(stem)
    assert layer.quant_before_act == preact
    x = torch.randn(1, layer.in_channels, 8, 8)
    with torch.no_grad():
        y = layer._conv_forward(layer._quant_in(x), layer._quant_w(), layer.bias)
        fq = layer._output_quantizer
        want = torch.nn.functional.silu(fq(y)) if preact else fq(torch.nn.functional.silu(y))
        assert torch.equal(layer(x), want)
    # the tensorrt flavour has no output quantizers: nothing to place
    t = convert(tiny_fused(), flavour="tensorrt", preact_output=True)
    assert not quant_state(t)["preact_output"]
    assert all(s["output_at"] == "post" for s in quant_state(t)["layers"])


def test_skip_rules_and_partial_quantization():
    cfg = tiny_cfg("model.head.use_dfl=true")
    dfl = build_model(cfg).fuse().eval()
    q = convert(dfl, cfg)
    assert type(q.detect.proj_conv) is nn.Conv2d  # the DFL projection stays float
    assert "detect.proj_conv" in quant_state(q)["skip"]
    q2 = convert(dfl, cfg, skip_dfl=False)
    assert isinstance(q2.detect.proj_conv, QuantConv2d)
    skip = ["neck.Rep_n4", "detect.cls_preds.*", "backbone.ERBlock_5.2.cspsppf.m"]
    q3 = convert(tiny_fused(), skip_layers=skip)
    plain = ["neck.Rep_n4.conv1.rbr_reparam", "neck.Rep_n4.block.2.rbr_reparam",
             "detect.cls_preds.1", "backbone.ERBlock_5.2.cspsppf.m"]
    for n in plain:
        m = q3.get_submodule(n)
        assert type(m) in (nn.Conv2d, nn.MaxPool2d) and not list(m.children())
        assert n not in quantized_layers(q3)
    assert isinstance(q3.neck.Rep_n4.conv1.nonlinearity, nn.ReLU)  # activation not absorbed
    assert isinstance(q3.get_submodule("detect.reg_preds.1"), QuantConv2d)
    with pytest.raises(ValueError, match="quant.skip_layers.*'neck.Rep_n9'.*did you mean"):
        convert(tiny_fused(), skip_layers=["neck.Rep_n9"])


def test_convert_rejects_bad_input():
    with pytest.raises(ValueError, match="fuse"):
        convert(build_model(tiny_cfg()))
    q = convert(tiny_fused())
    with pytest.raises(QuantStateError, match="already quantized"):
        convert(q)
    with pytest.raises(ValueError, match="quant.flavour"):
        convert(tiny_fused(), flavour="openvino")
    with pytest.raises(TypeError, match="unknown option"):
        convert(tiny_fused(), per_channel=False)
    with pytest.raises(QuantStateError, match="not quantized"):
        quant_state(tiny_fused())


def test_config_flavour_resolution():
    assert resolve_settings(tiny_cfg("export.flavour=tensorrt"))["flavour"] == "tensorrt"
    assert resolve_settings(tiny_cfg("export.flavour=float"))["flavour"] == "tensorrt"
    cfg = tiny_cfg("export.flavour=tensorrt", "quant.flavour=onnxruntime",
                   "quant.skip_layers=[neck]")
    s = resolve_settings(cfg)
    assert s["flavour"] == "onnxruntime" and s["skip_layers"] == ["neck"]
    assert resolve_settings(cfg, flavour="tensorrt")["flavour"] == "tensorrt"


def test_uncalibrated_forward_names_the_quantizer():
    q = convert(tiny_fused())
    with pytest.raises(RuntimeError, match="backbone.stem.rbr_reparam._input_quantizer"):
        q(images(1).float() / 255)


def test_calibrate_names_quantizers_that_saw_no_data():
    q = convert(tiny_fused())
    layer = q.get_submodule("neck.Rep_n4.block.1.rbr_reparam")
    layer.forward = lambda x: nn.Conv2d.forward(layer, x)  # bypasses its quantizers
    with pytest.raises(CalibrationError, match="neck.Rep_n4.block.1.rbr_reparam._input_quantizer"):
        calibrate(q, calib_batches(1), progress=False)
    with pytest.warns(UserWarning, match="saw no data"):
        calibrate(q, calib_batches(1), progress=False, strict=False)
    assert not layer._input_quantizer.enabled
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(q, [], progress=False)


def test_calibrate_sets_ranges_and_modes():
    q = calibrated("tensorrt")
    for n in quantized_layers(q):
        for _, tq in q.get_submodule(n).quantizers():
            assert tq.is_calibrated and tq.enabled and tq._if_quant and not tq._if_calib
    w = q.get_submodule("backbone.stem.rbr_reparam")
    torch.testing.assert_close(w._weight_quantizer.amax, w.weight.abs().amax(dim=(1, 2, 3)))
    # the stem sees images in [0, 1]: a 99.99 % range close to 1
    assert 0.8 < w._input_quantizer.amax.item() <= 1.0
    x = images(2, seed=5).float() / 255
    fused = tiny_fused()
    with torch.no_grad():
        yq, yf = q(x), fused(x)
    err = (yq - yf).abs()[..., 5:]  # class scores
    assert 0 < err.mean() < 0.05  # quantized, and close to float


def _weight_sq_error(model):
    out = {}
    for n, wq in weight_quantizers(model).items():
        w = model.get_submodule(n.rsplit(".", 1)[0]).weight.detach()
        out[n] = float((wq.fake_quant(w) - w).pow(2).sum())
    return out


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_calib_mse_clips_only_where_it_lowers_the_error(per_channel):
    q = convert(tiny_fused(), flavour="tensorrt", per_channel_weights=per_channel,
                weight_calib="mse")
    assert quant_state(q)["weight_calib"] == "mse"
    calibrate(q, calib_batches(), method="max", progress=False)  # weights: the state's mse
    mse_amax = {n: t.amax.clone() for n, t in weight_quantizers(q).items()}
    mse_err = _weight_sq_error(q)
    calibrate_weights(q, "max")
    max_err = _weight_sq_error(q)
    clipped = 0
    for n, t in weight_quantizers(q).items():
        assert (mse_amax[n] <= t.amax + 1e-6).all()  # never above max |w| (nor the bias floor)
        clipped += int((mse_amax[n] < t.amax - 1e-6).sum())
    assert clipped > 0
    for n in mse_err:  # per layer: the search includes the full range, so never worse
        assert mse_err[n] <= max_err[n] * (1 + 1e-6)
    assert sum(mse_err.values()) < sum(max_err.values())
    with pytest.raises(ValueError, match="weight_calib"):
        convert(tiny_fused(), weight_calib="minmax")


def test_checkpoint_round_trip_weights_only(tmp_path):
    skip = ("neck.Rep_p3", "detect.reg_convs.1")
    q = calibrated("tensorrt", hp=False, skip=skip)
    path = save_checkpoint({"model": q.state_dict(), "quant_state": quant_state(q)},
                           tmp_path / "q.pt")
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["quant_state"]["flavour"] == "tensorrt"
    assert "neck.Rep_p3.conv1.rbr_reparam" in raw["quant_state"]["skip"]
    ckpt = load_checkpoint(path)
    fresh = build_model(tiny_cfg()).fuse()
    rebuilt = convert(fresh, state=ckpt["quant_state"])
    missing, unexpected = rebuilt.load_state_dict(ckpt["model"], strict=True)
    assert not missing and not unexpected
    assert quantized_layers(rebuilt) == quantized_layers(q)
    x = images(2, seed=7).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), q.eval()(x), rtol=0, atol=0)
    # the onnxruntime structure (output quantizers, inputs without quantizer) round-trips too
    qo = calibrated("onnxruntime", hp=False)
    again = restore(build_model(tiny_cfg()).fuse(), quant_state(qo), qo.state_dict())
    assert all(tq.is_calibrated for n in quantized_layers(again)
               for _, tq in again.get_submodule(n).quantizers())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), qo.eval()(x), rtol=0, atol=0)
    bad = dict(ckpt["quant_state"], layers=ckpt["quant_state"]["layers"] + [dict(
        name="neck.nope", kind="conv", act="", act_type="", input="signed", output="",
        input_from="neck.nope._input_quantizer")])
    with pytest.raises(QuantStateError, match="neck.nope"):
        convert(build_model(tiny_cfg()).fuse(), state=bad)


def test_quantize_only_and_disable_layers():
    q = calibrated("tensorrt")
    fused = tiny_fused()
    x = images(2, seed=3).float() / 255
    names = quantized_layers(q)
    first, last = names[0], "detect.reg_preds.2"
    with torch.no_grad():
        quantize_only(q, [])
        torch.testing.assert_close(q(x), fused(x), rtol=0, atol=0)
        quantize_only(q, [last])  # only the last layer quantized: earlier layers stay float
        with capture_layer_outputs(q, [first, last]) as got, \
                capture_layer_outputs(fused_ref := convert(fused), [first, last]) as ref:
            set_quant_enabled(fused_ref, False)
            q(x)
            fused_ref(x)
    torch.testing.assert_close(got[first][0], ref[first][0], rtol=0, atol=0)
    assert not torch.equal(got[last][0], ref[last][0])
    set_quant_enabled(q, True)
    disable_layers(q, [first])
    assert not q.get_submodule(first)._input_quantizer.enabled
    assert q.get_submodule(names[1])._input_quantizer.enabled
    with pytest.raises(KeyError, match="did you mean"):
        quantize_only(q, ["backbone.stem.rbr_reparm"])


def test_qat_step_straight_through_and_range_ema():
    q = calibrated("tensorrt").train()
    amax = {n: t.amax.clone() for n, t in all_quantizers(q).items()}
    _, cls, reg = q(images(2, seed=4).float() / 255)  # train mode: raw head outputs
    (cls.square().mean() + reg.square().mean()).backward()
    for n in ("backbone.stem.rbr_reparam", "neck.Bifusion0.upsample.upsample_transpose",
              "detect.cls_preds.0"):
        g = q.get_submodule(n).weight.grad
        assert g is not None and g.abs().sum() > 0, n  # gradients reach the float weights
    assert all(t.amax.equal(amax[n]) for n, t in all_quantizers(q).items())  # frozen ranges
    enable_range_ema(q, 0.5)
    with torch.no_grad():
        q(images(2, seed=5).float() / 255)
    stem_in = q.backbone.stem.rbr_reparam._input_quantizer
    assert not stem_in.amax.equal(amax["backbone.stem.rbr_reparam._input_quantizer"])
    assert q.backbone.stem.rbr_reparam._weight_quantizer.amax.equal(
        amax["backbone.stem.rbr_reparam._weight_quantizer"])  # weights: not EMA-tracked


def test_layer_output_errors():
    q = calibrated("tensorrt")
    errs = layer_output_errors(q, images(2, seed=9))
    assert list(errs) == quantized_layers(q)
    snr = [e["snr_db"] for e in errs.values()]
    assert all(10 < s < 80 for s in snr)  # 8-bit: tens of dB, degrading with depth
    first, deep = errs["backbone.stem.rbr_reparam"], errs["neck.Rep_n4.block.2.rbr_reparam"]
    assert first["snr_db"] > deep["snr_db"]
    assert IMG == 64
