"""RepBiFPAN necks of YOLOv6 v3.0 (RepBlock stages for N/S, BepC3 stages for M/L)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .blocks import BepC3, BiFusion, BlockFn, ConvBNAct, RepBlock
from .registry import NECKS


class _BiFPAN(nn.Module):
    """Top-down path with BiFusion (P5->P4->P3, using P2 too), then a bottom-up PAN path.

    ``channels`` is the 11-entry list: five backbone widths followed by six neck widths.
    Returns the three head inputs (P3, P4, P5).
    """

    def _stage(self, c1, c2, n, block):  # pragma: no cover - overridden
        raise NotImplementedError

    def __init__(self, channels: Sequence[int], repeats: Sequence[int], block: BlockFn,
                 act: str = "relu"):
        super().__init__()
        ch, r = channels, repeats
        self.reduce_layer0 = ConvBNAct(ch[4], ch[5], 1, 1, act=act)
        self.Bifusion0 = BiFusion([ch[3], ch[2]], ch[5], act=act)
        self.Rep_p4 = self._stage(ch[5], ch[5], r[5], block)
        self.reduce_layer1 = ConvBNAct(ch[5], ch[6], 1, 1, act=act)
        self.Bifusion1 = BiFusion([ch[2], ch[1]], ch[6], act=act)
        self.Rep_p3 = self._stage(ch[6], ch[6], r[6], block)
        self.downsample2 = ConvBNAct(ch[6], ch[7], 3, 2, act=act)
        self.Rep_n3 = self._stage(ch[6] + ch[7], ch[8], r[7], block)
        self.downsample1 = ConvBNAct(ch[8], ch[9], 3, 2, act=act)
        self.Rep_n4 = self._stage(ch[5] + ch[9], ch[10], r[8], block)
        self.out_channels = (ch[6], ch[8], ch[10])

    def forward(self, feats):
        p2, p3, p4, p5 = feats
        fpn_out0 = self.reduce_layer0(p5)
        f_out0 = self.Rep_p4(self.Bifusion0([fpn_out0, p4, p3]))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(self.Bifusion1([fpn_out1, p3, p2]))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return [pan_out2, pan_out1, pan_out0]


@NECKS.register("RepBiFPANNeck")
class RepBiFPANNeck(_BiFPAN):
    def _stage(self, c1, c2, n, block):
        return RepBlock(c1, c2, n, block)


@NECKS.register("CSPRepBiFPANNeck")
class CSPRepBiFPANNeck(_BiFPAN):
    def __init__(self, channels, repeats, block, act="relu", csp_e=0.5, block_act="relu"):
        self.csp_e, self.block_act = csp_e, block_act
        super().__init__(channels, repeats, block, act)

    def _stage(self, c1, c2, n, block):
        return BepC3(c1, c2, n, self.csp_e, block, act=self.block_act)
