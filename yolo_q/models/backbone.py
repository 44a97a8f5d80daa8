"""EfficientRep (N/S) and CSPBep (M/L) backbones of YOLOv6 v3.0."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .blocks import CSPSPPF, SPPF, BepC3, BlockFn, RepBlock
from .registry import BACKBONES


def _merge_layer(block_name: str, cspsppf: bool, c: int) -> tuple:
    act = "silu" if block_name == "conv_silu" else "relu"
    if cspsppf:
        return "cspsppf", CSPSPPF(c, c, 5, act=act)
    return "sppf", SPPF(c, c, 5, act=act)


class _Backbone(nn.Module):
    """Stem + four stages; returns P2..P5 (``fuse_p2``) or P3..P5 feature maps."""

    def _stage_body(self, c, n, block):  # pragma: no cover - overridden
        raise NotImplementedError

    def __init__(self, channels: Sequence[int], repeats: Sequence[int], block: BlockFn,
                 block_name: str, fuse_p2=True, cspsppf=False, in_channels=3):
        super().__init__()
        self.fuse_p2 = fuse_p2
        self.stem = block(in_channels, channels[0], 3, 2)
        for i in range(1, 5):
            layers = [block(channels[i - 1], channels[i], 3, 2),
                      self._stage_body(channels[i], repeats[i], block)]
            stage = nn.Sequential(*layers)
            if i == 4:
                name, merge = _merge_layer(block_name, cspsppf, channels[4])
                stage.add_module("2", merge)
                self.merge_name = name
            setattr(self, f"ERBlock_{i + 1}", stage)

    def forward(self, x):
        outs = []
        x = self.stem(x)
        for i, stage in enumerate((self.ERBlock_2, self.ERBlock_3, self.ERBlock_4, self.ERBlock_5)):
            x = stage(x)
            if i > 0 or self.fuse_p2:
                outs.append(x)
        return tuple(outs)


@BACKBONES.register("EfficientRep")
class EfficientRep(_Backbone):
    def _stage_body(self, c, n, block):
        return RepBlock(c, c, n, block)


@BACKBONES.register("CSPBepBackbone")
class CSPBepBackbone(_Backbone):
    def __init__(self, channels, repeats, block, block_name, fuse_p2=True, cspsppf=False,
                 in_channels=3, csp_e=0.5):
        self.csp_e = csp_e
        self.act = "silu" if block_name == "conv_silu" else "relu"
        super().__init__(channels, repeats, block, block_name, fuse_p2, cspsppf, in_channels)

    def _stage_body(self, c, n, block):
        return BepC3(c, c, n, self.csp_e, block, act=self.act)
