"""Integer-arithmetic check: run each quantized layer the way an INT8 engine does and compare
with the fake-quant output.

Per conv layer (codes ``q``, zero points ``z``, scales ``s``)::

    acc  = sum (q_x - z_x) * q_w  +  q_b            int32, q_b = round(b / (s_x * s_w[c]))
    q_y  = clamp(z_y + rshift_round(acc * M0[c], 31 + n[c]), lo, hi)     M = s_x s_w[c] / s_y
                                                    = M0 * 2^-31 * 2^-n,  M0 in [2^30, 2^31)

Integer semantics are ONNX Runtime's QLinearConv (ONNX Runtime 1.32, x86 CPU, measured): the
bias is an int32 tensor, so a code beyond the int32 range (a channel whose weight scale is near
zero, e.g. a dead channel with a large bias) is *saturated*, as ONNX Runtime's quantizer writes
it (``np.clip``); :func:`int32_bias_overflow` counts such channels (the PTQ and QAT reports list
them). The int32 accumulator ``sum + q_b`` *wraps* on overflow (two's complement), as
QLinearConv's does. Both show up as deviations of the layer, never as a crash. (ONNX Runtime's
own graph optimizer, which quantizes the float biases of our QDQ exports, casts such a code to
INT32_MIN instead on x86.) Calibration, QAT and loading give every weight scale a floor that
keeps ``|q_b|`` plus the largest product sum within int32
(:func:`~yolo_q.quant.floor_weight_scales`), so neither happens to the models they make.

ReLU (and no activation) stay in integers: ReLU is the clamp at ``z_y``. Other activations
(SiLU) dequantize the int32 accumulator, apply the function in float and quantize (what engines
do with a lookup table or an fp32 epilogue). Convolution sums are computed exactly: every term
is an integer and every partial sum stays below 2**53, so a float64 convolution of the codes is
integer arithmetic (checked against the int32 range).

The *output grid* of a layer is its output quantizer when it has one; otherwise (TensorRT
flavour, high-precision outputs) a signed (unsigned after ReLU) 8-bit grid with
``amax = max |fake-quant output|`` on the batch. Deviation = ``max |dequant(q_y) - y_ref| / s_y``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import _to_input, input_grid_quantizer, layer_modules, quant_state
from .modules import QuantConvTranspose2d, QuantMaxPool2d
from .tensor_quantizer import TensorQuantizer

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1


def quantize_multiplier(m: float) -> Tuple[int, int]:
    """``m > 0`` -> ``(M0, n)`` with ``m ~= M0 * 2**-31 * 2**-n`` and ``2**30 <= M0 < 2**31``."""
    if not m > 0 or not math.isfinite(m):
        raise ValueError(f"multiplier must be positive and finite, got {m}")
    mant, exp = math.frexp(m)  # m = mant * 2**exp, mant in [0.5, 1)
    m0 = int(round(mant * (1 << 31)))
    if m0 == 1 << 31:
        m0 //= 2
        exp += 1
    return m0, -exp


def requantize(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``round(acc * M0 * 2**-(31 + shift))`` in int64 arithmetic, rounding half up.

    ``acc`` (int64, any shape with channels on dim 1); ``m0``/``shift`` int64 per channel."""
    view = [1, -1] + [1] * (acc.dim() - 2)
    m0, total = m0.view(view), (shift + 31).view(view)
    prod = acc * m0  # |acc| < 2**31, M0 < 2**31: fits in int64
    right = total.clamp(min=1)
    rounded = (prod + (torch.ones_like(right) << (right - 1))) >> right
    left = (-total).clamp(min=0)
    return torch.where(total > 0, rounded, prod << left)


class _Grid:
    """scale (per channel or scalar, float64), zero point, code range."""

    def __init__(self, scale: torch.Tensor, zp: int, lo: int, hi: int):
        self.scale, self.zp, self.lo, self.hi = scale.double(), zp, lo, hi

    @classmethod
    def of(cls, q: TensorQuantizer) -> "_Grid":
        return cls(q.scale.detach(), q.zero_point, q.quant_min, q.quant_max)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of an on-grid tensor (exact: x = (code - zp) * scale up to float rounding)."""
        s = self.scale if self.scale.dim() == 0 else self.scale.view(1, -1, 1, 1)
        return (torch.round(x.double() / s) + self.zp).clamp(self.lo, self.hi).long()

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        s = self.scale if self.scale.dim() == 0 else self.scale.view(1, -1, 1, 1)
        return (q - self.zp).double() * s


def _input_grid(model: nn.Module, spec: dict) -> TensorQuantizer:
    q = input_grid_quantizer(model, spec)
    if q is None or not q.enabled or not q.is_calibrated:
        raise RuntimeError(f"integer_check: input grid '{spec['input_from']}' of layer "
                           f"'{spec['name']}' is not an enabled, calibrated quantizer")
    return q


def _output_grid(layer, spec: dict, y_ref: torch.Tensor) -> _Grid:
    q = getattr(layer, "_output_quantizer", None)
    if q is not None and q.enabled:
        return _Grid.of(q)
    unsigned = spec["act_type"] in ("relu", "relu6")
    amax = max(float(y_ref.abs().max()), 1e-8)
    hi = 255 if unsigned else 127
    return _Grid(torch.tensor(amax / hi, device=y_ref.device), 0, 0 if unsigned else -128, hi)


def _weight_codes(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer weight codes (int64) and the weight scale per output channel (float64)."""
    wq = layer._weight_quantizer
    w_grid = _Grid.of(wq)
    w_fq = wq.fake_quant(layer.weight.detach())
    axis = wq.axis if wq.axis is not None else 0
    shape = [1] * w_fq.dim()
    shape[axis] = -1
    s_w = w_grid.scale if w_grid.scale.dim() else w_grid.scale.expand(w_fq.shape[axis])
    return torch.round(w_fq.double() / s_w.view(shape)).long(), s_w


def _bias_codes(bias: torch.Tensor, acc_scale: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """int32 bias codes ``round(b / (s_x s_w[c]))`` saturated to the int32 range (float64), and
    how many channels were saturated."""
    codes = torch.round(bias.detach().double() / acc_scale)
    over = int(((codes > INT32_MAX) | (codes < INT32_MIN)).sum())
    return codes.clamp(INT32_MIN, INT32_MAX), over


def _wrap_int32(acc: torch.Tensor) -> torch.Tensor:
    """int64 values as an int32 register holds them (two's complement wrap-around)."""
    return (acc + 2 ** 31) % 2 ** 32 - 2 ** 31


def _int_conv(layer, x_codes: torch.Tensor, x_grid: _Grid) -> Tuple[torch.Tensor, torch.Tensor]:
    """int32 accumulator (as int64) incl. the saturated bias, and the accumulator scale per
    channel."""
    w_codes, s_w = _weight_codes(layer)
    xc = (x_codes - x_grid.zp).double()
    if isinstance(layer, QuantConvTranspose2d):
        acc = F.conv_transpose2d(xc, w_codes.double(), None, layer.stride, layer.padding,
                                 layer.output_padding, layer.groups, layer.dilation)
    else:
        acc = F.conv2d(xc, w_codes.double(), None, layer.stride, layer.padding, layer.dilation,
                       layer.groups)
    acc_scale = x_grid.scale * s_w  # (C_out,)
    if acc.abs().max() > INT32_MAX:  # the products alone: impossible below ~65k terms
        raise OverflowError(f"integer_check: the convolution sums of '{layer}' overflow int32")
    if layer.bias is not None:
        acc = acc + _bias_codes(layer.bias, acc_scale)[0].view(1, -1, 1, 1)
    return _wrap_int32(acc.long()), acc_scale


def int32_bias_overflow(model: nn.Module) -> Dict[str, int]:
    """Per quantized conv layer of a calibrated model: how many output channels have an int32
    bias code ``round(b / (s_x s_w[c]))`` beyond the int32 range (their weight scale is near
    zero). An integer engine cannot hold such a bias: :func:`integer_check` saturates it."""
    layers, out = layer_modules(model), {}
    for spec in quant_state(model)["layers"]:
        layer = layers[spec["name"]]
        if isinstance(layer, QuantMaxPool2d) or getattr(layer, "bias", None) is None or \
                not all(q.enabled for _, q in layer.quantizers()):
            continue
        s_x = _Grid.of(_input_grid(model, spec)).scale
        n = _bias_codes(layer.bias, s_x * _weight_codes(layer)[1])[1]
        if n:
            out[spec["name"]] = n
    return out


def bias_overflow_lines(counts: Dict[str, int]) -> List[str]:
    """Report lines for :func:`int32_bias_overflow`'s counts (none when there are none)."""
    return [f"  {name}: bias of {n} channel(s) beyond int32 (weight scale near zero), saturated"
            for name, n in counts.items()]


def _multipliers(acc_scale: torch.Tensor, out: "_Grid", acc: torch.Tensor):
    """Fixed-point (m0, shift) per channel for requantizing the accumulator to ``out``."""
    pairs = [quantize_multiplier(m) for m in (acc_scale / out.scale).tolist()]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=acc.device)
    sh = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=acc.device)
    return m0, sh


def _check_conv(layer, spec, x: torch.Tensor, y_ref: torch.Tensor, x_q: TensorQuantizer) -> float:
    x_grid = _Grid.of(x_q)
    x_codes = x_grid.codes(x_q.fake_quant(x) if layer._input_quantizer is not None else x)
    acc, acc_scale = _int_conv(layer, x_codes, x_grid)
    out = _output_grid(layer, spec, y_ref)
    act = spec["act_type"]
    if spec.get("output_at") == "pre":  # requantize the accumulator; the activation follows
        # in float. Compared in codes of the output grid, before the activation: SiLU's slope
        # (up to 1.1) would stretch a one-step difference after it.
        q = (requantize(acc, *_multipliers(acc_scale, out, acc)) + out.zp).clamp(out.lo, out.hi)
        with torch.no_grad():
            pre_ref = layer._quant_out(layer._conv_forward(layer._quant_in(x), layer._quant_w(),
                                                           layer.bias))
        return float((q - out.codes(pre_ref)).abs().max())
    if act in ("", "relu"):
        q = requantize(acc, *_multipliers(acc_scale, out, acc)) + out.zp
        lo = max(out.lo, out.zp) if act == "relu" else out.lo
        q = q.clamp(lo, out.hi)
    else:  # float epilogue for non-piecewise-linear activations
        y = acc.double() * acc_scale.view(1, -1, 1, 1)
        y = layer.act(y.float()).double()
        s = out.scale if out.scale.dim() == 0 else out.scale.view(1, -1, 1, 1)
        q = (torch.round(y / s) + out.zp).clamp(out.lo, out.hi)
    return _deviation(q.long(), out, y_ref, on_grid=layer._output_quantizer is not None
                      and layer._output_quantizer.enabled)


def _deviation(q: torch.Tensor, grid: _Grid, y_ref: torch.Tensor, on_grid: bool) -> float:
    """Max deviation in steps: exact code difference when ``y_ref`` is on ``grid``."""
    if on_grid:
        return float((q - grid.codes(y_ref)).abs().max())
    return float(((grid.dequant(q) - y_ref.double()).abs() / grid.scale).max())


def _check_pool(layer, x: torch.Tensor, y_ref: torch.Tensor, x_q: TensorQuantizer) -> float:
    g = _Grid.of(x_q)
    codes = g.codes(x_q.fake_quant(x) if layer._input_quantizer is not None else x)
    pooled = F.max_pool2d(codes.double(), layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.ceil_mode)
    return _deviation(pooled.long(), g, y_ref, on_grid=True)


@torch.no_grad()
def integer_check(model: nn.Module, batch) -> Dict[str, float]:
    """Per quantized layer: max deviation (in steps of the layer's output grid) between the
    integer-only computation and the fake-quant output, on one batch of images."""
    state = quant_state(model)
    layers = layer_modules(model)
    x = _to_input(batch, next(model.parameters()).device)
    records: Dict[str, list] = {n: [] for n in layers}
    handles = [m.register_forward_hook(
        lambda _m, inp, out, n=n: records[n].append((inp[0].detach(), out.detach())))
        for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    result = {}
    for spec in state["layers"]:
        name = spec["name"]
        layer = layers[name]
        if not records[name]:
            continue
        if not all(q.enabled for _, q in layer.quantizers()):
            continue  # a (partly) float layer has no integer form
        x_q = _input_grid(model, spec)
        dev = 0.0
        for inp, out in records[name]:
            if isinstance(layer, QuantMaxPool2d):
                # the pool's grid: its input quantizer, else its output quantizer
                q = layer._input_quantizer if layer._input_quantizer is not None \
                    else layer._output_quantizer
                dev = max(dev, _check_pool(layer, inp, out, q))
            else:
                dev = max(dev, _check_conv(layer, spec, inp, out, x_q))
        result[name] = dev
    return result


__all__ = ["bias_overflow_lines", "int32_bias_overflow", "integer_check", "quantize_multiplier",
           "requantize"]
