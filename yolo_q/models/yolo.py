"""The detector (backbone -> neck -> head) and ``build_model(cfg)``."""
from __future__ import annotations

import math

import torch.nn as nn

from .blocks import fuse_modules
from .registry import BACKBONES, BLOCKS, HEADS, NECKS


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def scaled_repeats(n: int, depth: float) -> int:
    return max(round(n * depth), 1) if n > 1 else n


class Model(nn.Module):
    """YOLOv6-style detector. ``forward_features`` -> neck outputs, ``forward_head`` -> head."""

    _is_fuse_walker = True

    def __init__(self, backbone: nn.Module, neck: nn.Module, detect: nn.Module):
        super().__init__()
        self.backbone, self.neck, self.detect = backbone, neck, detect
        self.stride = detect.stride
        self.nc = detect.nc

    def forward_features(self, x):
        return self.neck(self.backbone(x))

    def forward_head(self, feats):
        return self.detect(feats)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "Model":
        """Deploy form, in place: every block with a ``fuse()`` re-parameterizes itself
        (RepVGG branches -> one 3x3 conv, BN folded into the preceding conv)."""
        return fuse_modules(self)

    @property
    def is_fused(self) -> bool:
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())


def build_model(cfg) -> Model:
    """Build a detector from a config (the full config or its ``model`` section)."""
    m = cfg.model if hasattr(cfg, "model") else cfg
    bb, nk, hd = m.backbone, m.neck, m.head
    ch = [make_divisible(c * m.width_multiple) for c in list(bb.out_channels) + list(nk.out_channels)]
    rep = [scaled_repeats(n, m.depth_multiple) for n in list(bb.num_repeats) + list(nk.num_repeats)]
    if len(ch) != 11 or len(rep) != 9:
        raise ValueError("model.backbone.out_channels needs 5 entries, model.neck.out_channels 6, "
                         "model.backbone.num_repeats 5 and model.neck.num_repeats 4")
    if not bb.fuse_p2:
        raise ValueError("model.backbone.fuse_p2=false is not supported by the v3.0 BiFPAN necks")
    block = BLOCKS.get(m.block)
    kwargs = dict(csp_e=bb.csp_e) if bb.type == "CSPBepBackbone" else {}
    backbone = BACKBONES.get(bb.type)(ch[:5], rep[:5], block, m.block, fuse_p2=bb.fuse_p2,
                                      cspsppf=bb.cspsppf, **kwargs)
    nkw = {}
    if nk.type == "CSPRepBiFPANNeck":
        nkw = dict(csp_e=nk.csp_e, block_act="silu" if m.block == "conv_silu" else "relu")
    neck = NECKS.get(nk.type)(ch, rep, block, **nkw)
    detect = HEADS.get(hd.type)(m.nc, neck.out_channels, strides=tuple(hd.strides),
                                use_dfl=hd.use_dfl, reg_max=hd.reg_max, prior_prob=hd.prior_prob,
                                grid_cell_offset=hd.grid_cell_offset,
                                grid_cell_size=hd.grid_cell_size)
    return set_batchnorm(Model(backbone, neck, detect), m.bn_eps, m.bn_momentum)


def set_batchnorm(model: nn.Module, eps: float, momentum: float) -> nn.Module:
    """Give every BatchNorm of ``model`` the same ``eps`` and ``momentum`` (in place)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eps, mod.momentum = float(eps), float(momentum)
    return model
