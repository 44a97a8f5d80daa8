"""``TensorQuantizer``: the small state object that fake-quantizes one tensor.

Built on ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
(straight-through gradients inside the clipping range; the legacy ONNX exporter turns them into
QuantizeLinear/DequantizeLinear). Grids (``b`` = num_bits, symmetric, amax from calibration):

==========================  ==================  ==========  ============
kind                        codes               zero point  scale
==========================  ==================  ==========  ============
signed (default)            -2^(b-1)..2^(b-1)-1   0           amax/(2^(b-1)-1)
signed, ``uint8_storage``   0..2^b-1              2^(b-1)     amax/(2^(b-1)-1)
unsigned                    0..2^b-1              0           amax/(2^b-1)
==========================  ==================  ==========  ============

``uint8_storage`` is the same signed grid stored as uint8 (ONNX Runtime flavour: every
activation uint8, so its QLinear kernels fuse). Modes, pytorch-quantization style: *calibrate*
(``enable_calib(); disable_quant()``: collect statistics, pass through), *quantize* (default),
*disabled* (``disable()``: pass through). ``_amax`` is a buffer (``-1`` = not calibrated); QAT
with learned scales makes it a parameter (:meth:`TensorQuantizer.learn_amax`, per tensor only):
in training mode with gradients on, the forward then gives the step size LSQ's gradient (Esser et
al., 2019: straight-through rounding; ``sum(dL/dy * (round(x/s) - x/s))`` inside the range,
``dL/dy * qmin/qmax`` outside) without LSQ's ``1/sqrt(numel * qmax)`` factor: on the reference
model that factor left the ranges' relative gradient ~1e-8 against the weights' ~0.1, so the
ranges get their own LR instead (``quant.qat.scale_lr_ratio``); everywhere else (eval,
export, ``no_grad``) it is the same fake quantization as with a buffer, and the state dict key is
the same ``_amax``, so a checkpoint loads into a model with the buffer.

``error_gain`` (sensitivity analysis only, never saved or exported): the output becomes
``c + error_gain * (fake_quant(x) - c)`` with ``c = x`` clipped to the grid's range, i.e. this
quantizer's own rounding error, the same realization, scaled (like dropping log2(gain) bits at the
same amax), while clipping stays as in INT8 (1 = plain fake quantization). Scaling the clipping
error too would turn the rare outliers beyond amax into gain-times-larger spikes that dominate
the result and have no INT8 counterpart.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .calibrators import HistogramCalibrator, MaxCalibrator, make_calibrator

AMAX_EPS = 1e-4  # floor for amax (an all-zero tensor/channel would otherwise give scale 0)


class QuantizerError(RuntimeError):
    """A quantizer is used in a state it cannot handle; the message names the quantizer."""


class TensorQuantizer(nn.Module):
    """Fake-quantize a tensor per tensor (``axis=None``) or per channel along ``axis``.

    Args:
        num_bits: 2..8.
        axis: channel axis for per-channel ranges (weights: 0 for Conv2d, 1 for ConvTranspose2d).
        num_channels: size of ``axis`` (needed to size the ``_amax`` buffer when ``axis`` is set).
        unsigned: grid 0..2^b-1 (tensors known to be >= 0, e.g. after ReLU).
        uint8_storage: store a signed grid as uint8 with zero point 2^(b-1).
        calibrator: a calibrator object or a method name (``max``, ``percentile``, ...).
        name: module path used in error messages (set by :func:`yolo_q.quant.convert`).
    """

    def __init__(self, num_bits: int = 8, axis: Optional[int] = None,
                 num_channels: Optional[int] = None, unsigned: bool = False,
                 uint8_storage: bool = False, calibrator=None, num_bins: int = 2048,
                 name: str = ""):
        super().__init__()
        if not 2 <= num_bits <= 8:
            raise ValueError(f"num_bits must be in 2..8, got {num_bits}")
        if axis is not None and not num_channels:
            raise ValueError("per-channel TensorQuantizer needs num_channels")
        if unsigned and uint8_storage:
            raise ValueError("uint8_storage applies to signed quantizers only")
        self.num_bits, self.axis, self.unsigned = num_bits, axis, unsigned
        self.uint8_storage, self.name, self.num_bins = uint8_storage, name, num_bins
        shape = () if axis is None else (int(num_channels),)
        self.register_buffer("_amax", torch.full(shape, -1.0))
        self._has_amax = False
        self._disabled = False
        self._if_quant = True
        self._if_calib = False
        self._range_ema: Optional[float] = None
        self.error_gain = 1.0
        self._calibrator = None
        self.set_calibrator(calibrator if calibrator is not None else "max")

    # ----------------------------------------------------------------------------- grid
    @property
    def qmax_abs(self) -> int:
        """Largest positive code distance from zero: 127 (signed 8 bit) or 255 (unsigned)."""
        return (1 << (self.num_bits - 1 + int(self.unsigned))) - 1

    @property
    def quant_min(self) -> int:
        if self.unsigned or self.uint8_storage:
            return 0
        return -(1 << (self.num_bits - 1))

    @property
    def quant_max(self) -> int:
        if self.unsigned or self.uint8_storage:
            return (1 << self.num_bits) - 1
        return (1 << (self.num_bits - 1)) - 1

    @property
    def zero_point(self) -> int:
        return (1 << (self.num_bits - 1)) if self.uint8_storage else 0

    @property
    def amax(self) -> torch.Tensor:
        return self._amax

    @amax.setter
    @torch.no_grad()
    def amax(self, value) -> None:
        value = torch.as_tensor(value, dtype=torch.float32, device=self._amax.device)
        if value.numel() == 1 and self._amax.dim() == 1:
            value = value.reshape(()).expand_as(self._amax)
        if value.shape != self._amax.shape:
            raise QuantizerError(f"{self._label}: amax shape {tuple(value.shape)} does not match "
                                 f"{tuple(self._amax.shape)}")
        self._amax.copy_(value.detach().clamp(min=AMAX_EPS))
        self._has_amax = True

    @torch.no_grad()
    def reset_amax(self) -> None:
        """Back to the uncalibrated state."""
        self._amax.fill_(-1.0)
        self._has_amax = False

    @property
    def is_calibrated(self) -> bool:
        return self._has_amax

    @property
    def scale(self) -> torch.Tensor:
        """Quantization step(s): ``amax / qmax_abs`` (amax is floored at ``AMAX_EPS`` when set)."""
        return self._amax / self.qmax_abs

    def learn_amax(self, shared: Optional[nn.Parameter] = None) -> nn.Parameter:
        """QAT: ``amax`` becomes a trained parameter (LSQ; see the module doc), starting from the
        calibrated value, or ``shared`` (one parameter for a group of tied quantizers).
        Returns the parameter."""
        if self.axis is not None:
            raise QuantizerError(f"{self._label}: learned amax is per tensor only")
        if not self._has_amax:
            raise QuantizerError(f"{self._label}: not calibrated (amax unset)")
        p = shared if shared is not None else nn.Parameter(self._amax.detach().clone())
        if p.shape != self._amax.shape:
            raise QuantizerError(f"{self._label}: shared amax shape {tuple(p.shape)} does not "
                                 f"match {tuple(self._amax.shape)}")
        self._buffers.pop("_amax", None)
        self._parameters.pop("_amax", None)
        self._amax = p  # registered as a parameter (nn.Module.__setattr__)
        return p

    @property
    def learns_amax(self) -> bool:
        return isinstance(self._amax, nn.Parameter)

    @property
    def _label(self) -> str:
        return f"quantizer '{self.name}'" if self.name else "TensorQuantizer"

    # ----------------------------------------------------------------------------- modes
    def enable(self):
        self._disabled = False

    def disable(self):
        self._disabled = True

    @property
    def enabled(self) -> bool:
        return not self._disabled

    def enable_quant(self):
        self._if_quant = True

    def disable_quant(self):
        self._if_quant = False

    def enable_calib(self):
        if self._calibrator is None:
            raise QuantizerError(f"{self._label}: no calibrator set")
        self._if_calib = True

    def disable_calib(self):
        self._if_calib = False

    def enable_range_ema(self, ema: float = 0.99):
        """QAT: in training mode, ``amax <- ema * amax + (1 - ema) * max|x|`` every forward."""
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"range ema must be in [0, 1), got {ema}")
        self._range_ema = float(ema)

    def disable_range_ema(self):
        self._range_ema = None

    def set_calibrator(self, calibrator) -> None:
        """A calibrator object or a method name; a name makes a fresh calibrator."""
        if isinstance(calibrator, str):
            calibrator = make_calibrator(calibrator, self.num_bits, self.axis, self.unsigned,
                                         self.num_bins)
        self._calibrator = calibrator

    @property
    def calibrator(self):
        return self._calibrator

    def reset_calib(self):
        if self._calibrator is not None:
            self._calibrator.reset()

    @property
    def has_calib_data(self) -> bool:
        return self._calibrator is not None and self._calibrator.has_data

    def load_calib_amax(self, method: Optional[str] = None, strict: bool = True, **kwargs) -> bool:
        """Set amax from the calibrator (``method``: max | percentile | mse | entropy; default
        ``max`` for a MaxCalibrator, ``percentile`` for a histogram). Returns False when the
        calibrator saw no data and ``strict=False``."""
        cal = self._calibrator
        if cal is None:
            raise QuantizerError(f"{self._label}: no calibrator set")
        if method is None:
            method = "percentile" if isinstance(cal, HistogramCalibrator) else "max"
        if isinstance(cal, MaxCalibrator) and method != "max":
            raise QuantizerError(f"{self._label}: method '{method}' needs a histogram calibrator")
        amax = cal.compute_amax(method, **kwargs) if isinstance(cal, HistogramCalibrator) \
            else cal.compute_amax(method)
        if amax is None:
            if strict:
                raise QuantizerError(f"{self._label}: calibrator saw no data")
            return False
        self.amax = amax
        return True

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return x
        if self._if_calib:
            if not torch.isfinite(x).all():
                raise QuantizerError(f"{self._label}: non-finite values during calibration")
            self._calibrator.collect(x.detach())
        if not self._if_quant:
            return x
        if self._range_ema is not None and self.training:
            self._update_range(x)
        y = self.fake_quant(x)
        if self.error_gain == 1.0:
            return y
        c = self.clip(x)
        return c + self.error_gain * (y - c)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clamped to the float range of the grid (what quantization keeps of it)."""
        scale = self.scale.to(x.device, x.dtype)
        if self.axis is not None:
            scale = scale.reshape([-1 if d == self.axis else 1 for d in range(x.dim())])
        lo = (self.quant_min - self.zero_point) * scale
        hi = (self.quant_max - self.zero_point) * scale
        return torch.maximum(torch.minimum(x, hi), lo)

    @torch.no_grad()
    def _update_range(self, x: torch.Tensor):
        dims = [d for d in range(x.dim()) if d != self.axis] if self.axis is not None else None
        batch = x.detach().abs().float().amax(dim=dims) if dims is not None else \
            x.detach().abs().float().max()
        if not self._has_amax:
            self._amax.copy_(batch)
            self._has_amax = True
        else:
            self._amax.mul_(self._range_ema).add_((1.0 - self._range_ema) * batch)
        self._amax.clamp_(min=AMAX_EPS)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` with the current amax (raises when not calibrated)."""
        if not self._has_amax:
            raise QuantizerError(f"{self._label}: not calibrated (amax unset); run "
                                 "yolo_q.quant.calibrate() or load a calibrated checkpoint")
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        scale = self.scale  # buffer-derived: constant-folded into an initializer on export
        if self.learns_amax and self._amax.requires_grad and torch.is_grad_enabled():
            y = self._lsq(xf)
        elif self.axis is None:
            zp = torch.full((), self.zero_point, dtype=torch.int32, device=xf.device)
            y = torch.fake_quantize_per_tensor_affine(xf, scale, zp, self.quant_min, self.quant_max)
        else:
            zp = torch.full(scale.shape, self.zero_point, dtype=torch.int32, device=xf.device)
            y = torch.fake_quantize_per_channel_affine(xf, scale, zp, self.axis, self.quant_min,
                                                       self.quant_max)
        return y if y.dtype == dtype else y.to(dtype)

    def _lsq(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization with the step size's LSQ gradient (per tensor, unscaled)."""
        scale = (self._amax.clamp(min=AMAX_EPS) / self.qmax_abs).reshape(1)
        zp = torch.full((1,), float(self.zero_point), device=x.device)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zp, self.quant_min, self.quant_max, 1.0)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of ``x`` on this grid, zero point included."""
        scale = self.scale.to(x.device).double()
        if self.axis is not None:
            scale = scale.reshape([-1 if d == self.axis else 1 for d in range(x.dim())])
        q = torch.round(x.double() / scale) + self.zero_point
        return q.clamp(self.quant_min, self.quant_max).long()

    # ----------------------------------------------------------------------------- state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._has_amax = bool((self._amax > 0).all())

    def extra_repr(self) -> str:
        kind = "unsigned" if self.unsigned else ("signed-u8" if self.uint8_storage else "signed")
        gran = "per-tensor" if self.axis is None else f"axis={self.axis}"
        mode = "disabled" if self._disabled else "+".join(
            [m for m, on in (("calib", self._if_calib), ("quant", self._if_quant)) if on]) or "pass"
        if self._has_amax:
            a = self._amax
            amax = f"{a.item():.4g}" if a.dim() == 0 else \
                f"[{a.min().item():.4g}, {a.max().item():.4g}]"
        else:
            amax = "unset"
        return f"{self.num_bits}bit {kind} {gran} amax={amax} {mode}"
