"""Building blocks of the YOLOv6 v3.0 family.

Module and attribute names follow the official YOLOv6 code so that state-dict keys map one to
one (``block.conv``, ``rbr_dense``, ``rbr_1x1``, ``rbr_identity``, ``rbr_reparam``, ...).
Every block that can be re-parameterized has an in-place ``fuse()``; the generic walk in
:meth:`yolo_q.models.yolo.Model.fuse` calls it (children first).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import BLOCKS

_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, None: nn.Identity, "none": nn.Identity}


def make_act(name: Optional[str]) -> nn.Module:
    try:
        cls = _ACTS[name]
    except KeyError:
        raise ValueError(f"unknown activation '{name}', expected one of relu, silu, none") from None
    return cls(inplace=True) if cls in (nn.ReLU, nn.SiLU) else cls()


def fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d):
    """Return (weight, bias) of a conv with ``bn`` folded in (per output channel)."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    shape = (-1,) + (1,) * (weight.dim() - 1)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * t.reshape(shape), bn.bias + (b - bn.running_mean) * t


def fuse_modules(module: nn.Module) -> nn.Module:
    """Generic re-parameterization walk: call ``fuse()`` on every sub-module that has one.

    Parents come first (pre-order), so a multi-branch block fuses from its unfused children.
    """
    for m in list(module.modules()):
        if callable(getattr(m, "fuse", None)) and not getattr(m, "_is_fuse_walker", False):
            m.fuse()
    return module


def _conv_from(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      device=weight.device, dtype=weight.dtype)
    fused.weight.data.copy_(weight.detach())
    fused.bias.data.copy_(bias.detach())
    return fused


class ConvModule(nn.Module):
    """Conv2d + BatchNorm2d + activation; ``fuse()`` folds the BN into the conv."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act: Optional[str] = "relu", bias=False):
        super().__init__()
        p = k // 2 if p is None else p
        self.conv = nn.Conv2d(c1, c2, k, s, p, groups=g, bias=bias)
        self.bn = nn.BatchNorm2d(c2)
        self.act = make_act(act)

    def forward(self, x):
        if self.bn is not None:
            x = self.bn(self.conv(x))
        else:
            x = self.conv(x)
        return self.act(x)

    @torch.no_grad()
    def fuse(self):
        if self.bn is None:
            return
        w, b = fold_bn(self.conv.weight, self.conv.bias, self.bn)
        self.conv = _conv_from(self.conv, w, b)
        self.bn = None


class ConvBNAct(nn.Module):
    """The official ``ConvBNReLU``/``ConvBNSiLU``: a ConvModule held as ``self.block``."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act="relu"):
        super().__init__()
        self.block = ConvModule(c1, c2, k, s, p, g, act=act)

    def forward(self, x):
        return self.block(x)


@BLOCKS.register("conv_relu")
def ConvBNReLU(c1, c2, k=3, s=1, p=None, g=1):
    return ConvBNAct(c1, c2, k, s, p, g, act="relu")


@BLOCKS.register("conv_silu")
def ConvBNSiLU(c1, c2, k=3, s=1, p=None, g=1):
    return ConvBNAct(c1, c2, k, s, p, g, act="silu")


def _pad_1x1_to_3x3(w: torch.Tensor) -> torch.Tensor:
    return F.pad(w, [1, 1, 1, 1])


def _identity_kernel(channels: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    in_per_group = channels // groups
    k = torch.zeros(channels, in_per_group, 3, 3, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    k[idx, idx % in_per_group, 1, 1] = 1.0
    return k


@BLOCKS.register("repvgg")
class RepVGGBlock(nn.Module):
    """RepVGG block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN) summed, then activation.

    ``fuse()`` turns the branches into one 3x3 conv ``rbr_reparam`` (exact in eval mode).
    """

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, act="relu"):
        super().__init__()
        assert k == 3 and p == 1, "RepVGGBlock supports 3x3 kernels with padding 1"
        self.in_channels, self.out_channels, self.groups = c1, c2, g
        self.nonlinearity = make_act(act)
        self.rbr_identity = nn.BatchNorm2d(c1) if c1 == c2 and s == 1 else None
        self.rbr_dense = ConvModule(c1, c2, 3, s, 1, g, act=None)
        self.rbr_1x1 = ConvModule(c1, c2, 1, s, 0, g, act=None)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    @torch.no_grad()
    def equivalent_kernel_bias(self):
        w3, b3 = fold_bn(self.rbr_dense.conv.weight, None, self.rbr_dense.bn)
        w1, b1 = fold_bn(self.rbr_1x1.conv.weight, None, self.rbr_1x1.bn)
        w, b = w3 + _pad_1x1_to_3x3(w1), b3 + b1
        if self.rbr_identity is not None:
            wi, bi = fold_bn(_identity_kernel(self.in_channels, self.groups, w), None,
                             self.rbr_identity)
            w, b = w + wi, b + bi
        return w, b

    @torch.no_grad()
    def fuse(self):
        if hasattr(self, "rbr_reparam"):
            return
        w, b = self.equivalent_kernel_bias()
        self.rbr_reparam = _conv_from(self.rbr_dense.conv, w, b)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity


@BLOCKS.register("realvgg")
class RealVGGBlock(nn.Module):
    """Plain 3x3 conv + BN + activation, trained with RepOptimizer (gradient masks)."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, act="relu"):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.relu = make_act(act)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) if self.bn is not None else self.conv(x))

    @torch.no_grad()
    def fuse(self):
        if self.bn is None:
            return
        w, b = fold_bn(self.conv.weight, self.conv.bias, self.bn)
        self.conv = _conv_from(self.conv, w, b)
        self.bn = None


class ScaleLayer(nn.Module):
    """Learnable per-channel scale (no bias), as used by the hyper-search LinearAddBlock."""

    def __init__(self, channels: int, init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


@BLOCKS.register("linearadd")
class LinearAddBlock(nn.Module):
    """Hyper-search block: (s3 * conv3x3 + s1 * conv1x1 + s_id * x) -> BN -> act.

    The learned scales ``scale_conv``/``scale_1x1``/``scale_identity`` become the RepOptimizer
    gradient masks (see :mod:`yolo_q.optim.repopt`).
    """

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, act="relu", conv_scale_init=1.0):
        super().__init__()
        assert g == 1
        self.in_channels, self.out_channels = c1, c2
        self.relu = make_act(act)
        self.conv = nn.Conv2d(c1, c2, 3, s, 1, bias=False)
        self.scale_conv = ScaleLayer(c2, conv_scale_init)
        self.conv_1x1 = nn.Conv2d(c1, c2, 1, s, 0, bias=False)
        self.scale_1x1 = ScaleLayer(c2, conv_scale_init)
        self.scale_identity = ScaleLayer(c2, 1.0) if c1 == c2 and s == 1 else None
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.relu(self.rbr_reparam(x))
        out = self.scale_conv(self.conv(x)) + self.scale_1x1(self.conv_1x1(x))
        if self.scale_identity is not None:
            out = out + self.scale_identity(x)
        return self.relu(self.bn(out))

    @torch.no_grad()
    def fuse(self):
        if hasattr(self, "rbr_reparam"):
            return
        w = self.conv.weight * self.scale_conv.weight.view(-1, 1, 1, 1)
        w = w + _pad_1x1_to_3x3(self.conv_1x1.weight) * self.scale_1x1.weight.view(-1, 1, 1, 1)
        if self.scale_identity is not None:
            w = w + _identity_kernel(self.in_channels, 1, w) * self.scale_identity.weight.view(
                -1, 1, 1, 1)
        w, b = fold_bn(w, None, self.bn)
        self.rbr_reparam = _conv_from(self.conv, w, b)
        del self.conv, self.scale_conv, self.conv_1x1, self.scale_1x1, self.scale_identity, self.bn


BlockFn = Callable[..., nn.Module]


class BottleRep(nn.Module):
    """Two blocks with a (learnably weighted) residual, the unit of BepC3."""

    def __init__(self, c1, c2, basic_block: BlockFn, weight=True):
        super().__init__()
        self.conv1 = basic_block(c1, c2)
        self.conv2 = basic_block(c2, c2)
        self.shortcut = c1 == c2
        self.alpha = nn.Parameter(torch.ones(1)) if weight else 1.0

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return out + self.alpha * x if self.shortcut else out


class RepBlock(nn.Module):
    """``conv1`` then ``n - 1`` more blocks (or BottleRep pairs when ``bottle=True``)."""

    def __init__(self, c1, c2, n=1, block: BlockFn = RepVGGBlock, bottle=False):
        super().__init__()
        if bottle:
            self.conv1 = BottleRep(c1, c2, block, weight=True)
            n = n // 2
            make = lambda: BottleRep(c2, c2, block, weight=True)  # noqa: E731
        else:
            self.conv1 = block(c1, c2)
            make = lambda: block(c2, c2)  # noqa: E731
        self.block = nn.Sequential(*(make() for _ in range(n - 1))) if n > 1 else None

    def forward(self, x):
        x = self.conv1(x)
        return self.block(x) if self.block is not None else x


class BepC3(nn.Module):
    """CSP stage of the M/L models: two 1x1 branches, one through a BottleRep RepBlock."""

    def __init__(self, c1, c2, n=1, e=0.5, block: BlockFn = RepVGGBlock, act="relu"):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = ConvBNAct(c1, c_, 1, 1, act=act)
        self.cv2 = ConvBNAct(c1, c_, 1, 1, act=act)
        self.cv3 = ConvBNAct(2 * c_, c2, 1, 1, act=act)
        self.m = RepBlock(c_, c_, n, block, bottle=True)

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPFModule(nn.Module):
    """Spatial pyramid pooling, fast: 1x1 conv, three chained 5x5 max-pools, concat, 1x1 conv."""

    def __init__(self, c1, c2, k=5, act="relu"):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = ConvBNAct(c1, c_, 1, 1, act=act)
        self.cv2 = ConvBNAct(c_ * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class CSPSPPFModule(nn.Module):
    """CSP variant of SPPF."""

    def __init__(self, c1, c2, k=5, e=0.5, act="relu"):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = ConvBNAct(c1, c_, 1, 1, act=act)
        self.cv2 = ConvBNAct(c1, c_, 1, 1, act=act)
        self.cv3 = ConvBNAct(c_, c_, 3, 1, act=act)
        self.cv4 = ConvBNAct(c_, c_, 1, 1, act=act)
        self.m = nn.MaxPool2d(k, 1, k // 2)
        self.cv5 = ConvBNAct(4 * c_, c_, 1, 1, act=act)
        self.cv6 = ConvBNAct(c_, c_, 3, 1, act=act)
        self.cv7 = ConvBNAct(2 * c_, c2, 1, 1, act=act)

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.m(x1)
        y2 = self.m(y1)
        y3 = self.cv6(self.cv5(torch.cat([x1, y1, y2, self.m(y2)], 1)))
        return self.cv7(torch.cat((y0, y3), dim=1))


class SPPF(nn.Module):
    """Official ``SimSPPF`` (ReLU) / ``SPPF`` (SiLU): the pooling module held as ``self.sppf``."""

    def __init__(self, c1, c2, k=5, act="relu"):
        super().__init__()
        self.sppf = SPPFModule(c1, c2, k, act=act)

    def forward(self, x):
        return self.sppf(x)


class CSPSPPF(nn.Module):
    """Official ``SimCSPSPPF`` (ReLU) / ``CSPSPPF`` (SiLU): held as ``self.cspsppf``."""

    def __init__(self, c1, c2, k=5, e=0.5, act="relu"):
        super().__init__()
        self.cspsppf = CSPSPPFModule(c1, c2, k, e, act=act)

    def forward(self, x):
        return self.cspsppf(x)


class Transpose(nn.Module):
    """2x upsampling by a learned 2x2 stride-2 transposed convolution."""

    def __init__(self, c1, c2, k=2, s=2):
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(c1, c2, k, s, bias=True)

    def forward(self, x):
        return self.upsample_transpose(x)


class BiFusion(nn.Module):
    """Fuse an upsampled top-down feature with the same level and the (downsampled) level below."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, act="relu"):
        super().__init__()
        self.cv1 = ConvBNAct(in_channels[0], out_channels, 1, 1, act=act)
        self.cv2 = ConvBNAct(in_channels[1], out_channels, 1, 1, act=act)
        self.cv3 = ConvBNAct(out_channels * 3, out_channels, 1, 1, act=act)
        self.upsample = Transpose(out_channels, out_channels)
        self.downsample = ConvBNAct(out_channels, out_channels, 3, 2, act=act)

    def forward(self, x):
        x0 = self.upsample(x[0])
        x1 = self.cv1(x[1])
        x2 = self.downsample(self.cv2(x[2]))
        return self.cv3(torch.cat((x0, x1, x2), dim=1))
