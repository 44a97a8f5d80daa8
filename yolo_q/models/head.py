"""Efficient decoupled head of YOLOv6 v3.0 (anchor-free, optional DFL) and anchor helpers."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBNAct
from .registry import HEADS


def make_anchors(shapes: Sequence[Tuple[int, int]], strides: Sequence[int], offset: float = 0.5,
                 device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor points in grid units, (N, 2) as (x, y), and the stride of each point, (N, 1)."""
    points, stride_t = [], []
    for (h, w), s in zip(shapes, strides):
        sy = torch.arange(h, device=device, dtype=dtype) + offset
        sx = torch.arange(w, device=device, dtype=dtype) + offset
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).reshape(-1, 2))
        stride_t.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_t)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, xywh: bool = True):
    """(l, t, r, b) distances from anchor points -> boxes (cx, cy, w, h) or (x1, y1, x2, y2)."""
    lt, rb = distance.chunk(2, -1)
    x1y1, x2y2 = anchor_points - lt, anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), -1)
    return torch.cat((x1y1, x2y2), -1)


@HEADS.register("EffiDeHead")
class EffiDeHead(nn.Module):
    """Per level: 1x1 stem, then separate 3x3 cls and reg convs and 1x1 prediction convs.

    Training mode returns ``(feats, cls_logits (B, N, nc), reg (B, N, 4 or 4*(reg_max+1)))``.
    Eval mode returns the official YOLOv6 layout ``(B, N, 5 + nc)``: cx, cy, w, h in input
    pixels, a column of ones (objectness) and the class scores.
    """

    def __init__(self, nc: int, in_channels: Sequence[int], strides=(8, 16, 32), use_dfl=False,
                 reg_max=16, prior_prob=1e-2, grid_cell_offset=0.5, grid_cell_size=5.0):
        super().__init__()
        assert len(in_channels) == len(strides)
        self.nc, self.no, self.nl = nc, nc + 5, len(in_channels)
        self.use_dfl, self.reg_max = use_dfl, reg_max
        self.prior_prob = prior_prob
        self.grid_cell_offset, self.grid_cell_size = grid_cell_offset, grid_cell_size
        self.strides = [int(s) for s in strides]
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32), persistent=False)
        # DFL projection (kept, as in the official model, even when DFL is off)
        self.proj = nn.Parameter(torch.linspace(0, reg_max, reg_max + 1), requires_grad=False)
        self.proj_conv = nn.Conv2d(reg_max + 1, 1, 1, bias=False)
        self.proj_conv.weight = nn.Parameter(self.proj.detach().view(1, -1, 1, 1).clone(),
                                             requires_grad=False)
        n_reg = 4 * (reg_max + 1) if use_dfl else 4
        self.stems = nn.ModuleList(ConvBNAct(c, c, 1, 1, act="silu") for c in in_channels)
        self.cls_convs = nn.ModuleList(ConvBNAct(c, c, 3, 1, act="silu") for c in in_channels)
        self.reg_convs = nn.ModuleList(ConvBNAct(c, c, 3, 1, act="silu") for c in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, nc, 1) for c in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, n_reg, 1) for c in in_channels)
        self.initialize_biases()

    def initialize_biases(self):
        b = -math.log((1 - self.prior_prob) / self.prior_prob)
        for conv in self.cls_preds:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, b)
        for conv in self.reg_preds:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, 1.0)

    def _level(self, i: int, x: torch.Tensor):
        x = self.stems[i](x)
        return self.cls_preds[i](self.cls_convs[i](x)), self.reg_preds[i](self.reg_convs[i](x))

    def forward(self, feats: List[torch.Tensor]):
        outs = [self._level(i, x) for i, x in enumerate(feats)]
        if self.training:
            cls = torch.cat([c.flatten(2) for c, _ in outs], 2).permute(0, 2, 1)
            reg = torch.cat([r.flatten(2) for _, r in outs], 2).permute(0, 2, 1)
            return feats, cls, reg
        return self.decode(outs)

    def decode(self, outs):
        cls_list, reg_list, shapes = [], [], []
        for cls, reg in outs:
            b, _, h, w = cls.shape
            shapes.append((h, w))
            if self.use_dfl:
                reg = reg.reshape(b, 4, self.reg_max + 1, h * w).permute(0, 2, 1, 3)
                reg = self.proj_conv(F.softmax(reg, dim=1))
            cls_list.append(torch.sigmoid(cls).reshape(b, self.nc, h * w))
            reg_list.append(reg.reshape(b, 4, h * w))
        cls = torch.cat(cls_list, -1).permute(0, 2, 1)
        reg = torch.cat(reg_list, -1).permute(0, 2, 1)
        points, strides = make_anchors(shapes, self.strides, self.grid_cell_offset,
                                       device=cls.device, dtype=cls.dtype)
        boxes = dist2bbox(reg, points, xywh=True) * strides
        ones = torch.ones_like(cls[..., :1])
        return torch.cat((boxes, ones, cls), -1)
