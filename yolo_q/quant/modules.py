"""Quantized layers: drop-in subclasses of the torch modules they replace.

A quantized conv layer computes ``out_q(act(conv(in_q(x), w_q(W)) + b))`` (or
``act(out_q(conv(...)))`` with ``quant_before_act``: the output quantized before an activation
the runtime cannot fuse into its integer conv): the activation that
followed the conv in the float model is absorbed into the layer (its old module becomes an
``nn.Identity``), so one layer = conv + activation + optional output quantizer, the unit that
TensorRT / ONNX Runtime fuse. Quantizers that a layer does not need are ``None`` (no buffers).
Parameter names are unchanged (``weight``, ``bias``), so float state dicts still load.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
import torch.nn.functional as F

from .tensor_quantizer import TensorQuantizer

QUANTIZER_ATTRS = ("_input_quantizer", "_weight_quantizer", "_output_quantizer")


class QuantLayerMixin:
    """Shared helpers; every quant module has the three quantizer slots (possibly ``None``)."""

    def quantizers(self):
        """(attribute name, quantizer) for the quantizers this layer owns."""
        return [(a, getattr(self, a)) for a in QUANTIZER_ATTRS
                if getattr(self, a, None) is not None]

    def _set_quantizers(self, input_q, weight_q, output_q):
        self._input_quantizer: Optional[TensorQuantizer] = input_q
        self._weight_quantizer: Optional[TensorQuantizer] = weight_q
        self._output_quantizer: Optional[TensorQuantizer] = output_q

    def _quant_in(self, x):
        return self._input_quantizer(x) if self._input_quantizer is not None else x

    def _quant_out(self, y):
        return self._output_quantizer(y) if self._output_quantizer is not None else y

    quant_before_act = False  # set by convert (layer spec output_at == "pre")

    def _act_out(self, y):
        """Activation and output quantizer, in the layer's order."""
        if self.quant_before_act:
            return self.act(self._quant_out(y))
        return self._quant_out(self.act(y))

    def _quant_w(self):
        return self._weight_quantizer(self.weight) if self._weight_quantizer is not None \
            else self.weight


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with input / per-channel weight (axis 0) / optional output quantizers and
    an absorbed activation ``act``."""

    def __init__(self, *args, act: Optional[nn.Module] = None, input_quantizer=None,
                 weight_quantizer=None, output_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act if act is not None else nn.Identity()
        self._set_quantizers(input_quantizer, weight_quantizer, output_quantizer)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, act: Optional[nn.Module], input_q, weight_q,
                   output_q) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"QuantConv2d: padding_mode '{conv.padding_mode}'")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, act=act, input_quantizer=input_q,
                weight_quantizer=weight_q, output_quantizer=output_q, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        return q

    def forward(self, x):
        y = self._conv_forward(self._quant_in(x), self._quant_w(), self.bias)
        return self._act_out(y)


class QuantConvTranspose2d(QuantLayerMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d``; weights (in, out, kh, kw) are quantized per output channel,
    i.e. along axis 1."""

    def __init__(self, *args, act: Optional[nn.Module] = None, input_quantizer=None,
                 weight_quantizer=None, output_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act if act is not None else nn.Identity()
        self._set_quantizers(input_quantizer, weight_quantizer, output_quantizer)

    @classmethod
    def from_float(cls, conv: nn.ConvTranspose2d, act: Optional[nn.Module], input_q, weight_q,
                   output_q) -> "QuantConvTranspose2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.output_padding, conv.groups, conv.bias is not None, conv.dilation,
                act=act, input_quantizer=input_q, weight_quantizer=weight_q,
                output_quantizer=output_q, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        return q

    def forward(self, x, output_size=None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        y = F.conv_transpose2d(self._quant_in(x), self._quant_w(), self.bias, self.stride,
                               self.padding, output_padding, self.groups, self.dilation)
        return self._act_out(y)


class QuantMaxPool2d(QuantLayerMixin, nn.MaxPool2d):
    """``nn.MaxPool2d`` with an input quantizer (TensorRT flavour) or an output quantizer on
    the same grid (ONNX Runtime flavour). Max-pooling commutes with quantization."""

    def __init__(self, *args, input_quantizer=None, output_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_quantizers(input_quantizer, None, output_quantizer)

    @classmethod
    def from_float(cls, pool: nn.MaxPool2d, input_q, output_q) -> "QuantMaxPool2d":
        if pool.return_indices:
            raise NotImplementedError("QuantMaxPool2d: return_indices=True")
        q = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                pool.ceil_mode, input_quantizer=input_q, output_quantizer=output_q)
        q.train(pool.training)
        return q

    def forward(self, x):
        return self._quant_out(super().forward(self._quant_in(x)))


QUANT_MODULES = (QuantConv2d, QuantConvTranspose2d, QuantMaxPool2d)


def weight_axis(module: nn.Module) -> int:
    """Output-channel axis of a conv weight: 1 for transposed convs (in, out, kh, kw), else 0."""
    return 1 if isinstance(module, nn.ConvTranspose2d) else 0


def iter_quantizers(model: nn.Module):
    """(module path, TensorQuantizer) for every quantizer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m
