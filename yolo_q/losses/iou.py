"""IoU family for ``xyxy`` boxes: pairwise IoU, and elementwise IoU / GIoU / CIoU / SIoU + loss.

Elementwise functions take matched boxes ``(..., 4)`` and return ``(...)``; :func:`box_iou`
returns every pair. Formulas:

* GIoU = IoU - (C - U) / C, with C the area of the smallest enclosing box, U the union.
* CIoU = IoU - rho^2 / c^2 - a*v, rho the distance between centres, c the enclosing box diagonal,
  v = 4/pi^2 * (atan(w_t/h_t) - atan(w_p/h_p))^2 and a = v / (1 - IoU + v) (a is not
  differentiated, as in the CIoU paper).
* SIoU (Gevorgyan 2022) = IoU - (Delta + Omega) / 2 with the angle cost
  Lambda = sin(2 * min(alpha, pi/2 - alpha)) = 2|dx||dy| / (dx^2 + dy^2) (dx, dy: centre offsets),
  the distance cost Delta = sum_{x,y} 1 - exp(-(2 - Lambda) * (d / c_side)^2) (c_side: enclosing
  box width / height) and the shape cost
  Omega = sum_{w,h} (1 - exp(-|w_p - w_t| / max(w_p, w_t)))^4.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

IOU_TYPES = ("iou", "giou", "ciou", "siou")


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes (negative sides count as 0)."""
    return ((boxes[..., 2] - boxes[..., 0]).clamp(min=0)
            * (boxes[..., 3] - boxes[..., 1]).clamp(min=0))


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Pairwise IoU: ``a (..., N, 4)`` x ``b (..., M, 4)`` -> ``(..., N, M)`` (leading dims
    broadcast). Computed coordinate by coordinate so no ``(..., N, M, 4)`` tensor is built."""
    ax1, ay1, ax2, ay2 = (a[..., :, None, i] for i in range(4))
    bx1, by1, bx2, by2 = (b[..., None, :, i] for i in range(4))
    inter = ((torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_(min=0)
             * (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_(min=0))
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter + eps
    return inter / union


def bbox_iou(pred: torch.Tensor, target: torch.Tensor, iou_type: str = "iou",
             eps: float = 1e-7) -> torch.Tensor:
    """Elementwise IoU-type similarity of matched boxes ``(..., 4)`` -> ``(...)``.

    ``iou_type`` is one of ``iou``, ``giou``, ``ciou``, ``siou``. Widths and heights are not
    clamped, so a predicted box with a negative side still receives a gradient that grows it.
    """
    px1, py1, px2, py2 = pred.unbind(-1)
    tx1, ty1, tx2, ty2 = target.unbind(-1)
    pw, ph = px2 - px1, py2 - py1 + eps
    tw, th = tx2 - tx1, ty2 - ty1 + eps
    inter = ((torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0)
             * (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0))
    union = pw * ph + tw * th - inter + eps
    iou = inter / union
    if iou_type == "iou":
        return iou
    cw = torch.maximum(px2, tx2) - torch.minimum(px1, tx1)  # enclosing box
    ch = torch.maximum(py2, ty2) - torch.minimum(py1, ty1)
    if iou_type == "giou":
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    dx = (tx1 + tx2 - px1 - px2) * 0.5  # centre offsets
    dy = (ty1 + ty2 - py1 - py2) * 0.5
    if iou_type == "ciou":
        c2 = cw.square() + ch.square() + eps
        rho2 = dx.square() + dy.square()
        v = (4 / math.pi ** 2) * (torch.atan(tw / th) - torch.atan(pw / ph)).square()
        with torch.no_grad():
            alpha = v / (v - iou + (1 + eps))
        return iou - (rho2 / c2 + alpha * v)
    if iou_type == "siou":
        adx, ady = dx.abs(), dy.abs()
        angle = 2 * adx * ady / (dx.square() + dy.square() + eps)
        gamma = 2 - angle
        dist = (2 - torch.exp(-gamma * (dx / (cw + eps)).square())
                - torch.exp(-gamma * (dy / (ch + eps)).square()))
        om_w = (pw - tw).abs() / (torch.maximum(pw, tw) + eps)
        om_h = (ph - th).abs() / (torch.maximum(ph, th) + eps)
        shape = (1 - torch.exp(-om_w)).pow(4) + (1 - torch.exp(-om_h)).pow(4)
        return iou - 0.5 * (dist + shape)
    raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")


class IoULoss(nn.Module):
    """``1 - bbox_iou(pred, target, iou_type)`` per matched pair, no reduction."""

    def __init__(self, iou_type: str = "giou", eps: float = 1e-7):
        super().__init__()
        iou_type = str(iou_type).lower()
        if iou_type not in IOU_TYPES:
            raise ValueError(f"train.loss.iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        self.iou_type, self.eps = iou_type, eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - bbox_iou(pred, target, self.iou_type, self.eps)

    def extra_repr(self) -> str:
        return f"iou_type={self.iou_type!r}"
