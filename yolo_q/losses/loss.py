"""YOLOv6 detection loss: one class with options (IoU type, DFL on/off, assigner TAL / ATSS).

Normalization (as YOLOv6): every term is summed over the whole batch and divided by the batch's
total target score ``S = max(sum(target_scores), 1)``. The loss is therefore per-batch normalized
(a mean per unit of assigned target score), not per image, and does not grow with the batch size::

    cls  = sum_{b,n,c} VFL(logit, target_score) / S
    iou  = sum_{positives} (1 - IoU_type(pred, gt)) * w / S       w = sum_c target_score
    dfl  = sum_{positives} DFL(bins, gt distance) * w / S         (0 when use_dfl is off)
    total = cls_weight * cls + iou_weight * iou + dfl_weight * dfl

Under DDP each rank's loss is normalized by its own batch; multiply by the world size to keep the
official YOLOv6 gradient scale (DDP averages gradients).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.head import dist2bbox, make_anchors
from .assigners import ATSSAssigner, AssignResult, TaskAlignedAssigner
from .iou import IOU_TYPES, IoULoss

ASSIGNERS = ("tal", "atss")


def varifocal_loss(logits: torch.Tensor, target_scores: torch.Tensor, labels: torch.Tensor,
                   alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Varifocal loss (VarifocalNet), summed: ``sum(BCE(logits, q) * w)`` with
    ``w = alpha * p^gamma * (1 - label) + q * label``, ``p = sigmoid(logits)``, ``q`` the soft
    target scores and ``label`` the one-hot class of positive anchors (all zeros on background;
    float, or bool for a faster select). BCE is taken on logits for numerical stability; ``w`` is
    differentiated as in YOLOv6 / VarifocalNet."""
    focal = logits.sigmoid().pow(gamma).mul(alpha)
    if labels.dtype == torch.bool:
        weight = torch.where(labels, target_scores, focal)
    else:
        weight = focal * (1 - labels) + target_scores * labels
    bce = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none")
    return (bce * weight).sum()


def dfl_loss(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss per side: ``log_probs (..., reg_max+1)`` (log-softmax over the bins),
    ``target (...)`` continuous distance in ``[0, reg_max)``. With ``i = floor(t)``:
    ``-((i + 1 - t) * log p_i + (t - i) * log p_{i+1})``. Returns ``(...)``."""
    left = target.long()
    w_left = (left + 1).to(target.dtype) - target
    lp_left = log_probs.gather(-1, left[..., None])[..., 0]
    lp_right = log_probs.gather(-1, (left + 1)[..., None])[..., 0]
    return -(lp_left * w_left + lp_right * (1 - w_left))


def _get(cfg, key, default):
    if cfg is None:
        return default
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if v is None else v


class DetectionLoss(nn.Module):
    """YOLOv6 v3.0 loss: varifocal classification + IoU box loss (+ DFL), TAL/ATSS assignment.

    ``loss(outputs, targets, epoch=0) -> (total, parts)`` with ``outputs`` the model's train-mode
    output ``(feats, cls_logits (B, N, nc), reg (B, N, 4 | 4*(reg_max+1)))`` and ``targets (M, 6)``
    ``[batch_idx, cls, x1, y1, x2, y2]`` in input pixels. ``total`` is a scalar (see the module
    docstring for its normalization); ``parts`` holds the detached *weighted* terms
    ``{"cls", "iou", "dfl"}`` (tensors, no host sync), which sum to ``total``.

    Assignment: ATSS while ``epoch < atss_warmup_epochs`` (always with ``assigner="atss"``), then
    TAL on the detached sigmoid scores and predicted boxes. The loss runs in float32 even under
    autocast. Targets on the CPU (as the loader yields them) avoid the one host sync needed to pad
    them; on an accelerator, padding reads the largest per-image box count back.
    """

    def __init__(self, cfg_loss=None, nc: int = 80, strides: Sequence[int] = (8, 16, 32),
                 use_dfl: bool = False, reg_max: int = 16, grid_cell_offset: float = 0.5,
                 grid_cell_size: float = 5.0):
        super().__init__()
        self.nc = int(nc)
        self.strides = tuple(int(s) for s in strides)
        self.use_dfl, self.reg_max = bool(use_dfl), int(reg_max)
        self.grid_cell_offset, self.grid_cell_size = float(grid_cell_offset), float(grid_cell_size)
        self.iou_type = str(_get(cfg_loss, "iou_type", "giou")).lower()
        if self.iou_type not in IOU_TYPES[1:]:
            raise ValueError(f"train.loss.iou_type must be one of {IOU_TYPES[1:]}, "
                             f"got {self.iou_type!r}")
        self.assigner = str(_get(cfg_loss, "assigner", "tal")).lower()
        if self.assigner not in ASSIGNERS:
            raise ValueError(f"train.loss.assigner must be one of {ASSIGNERS}, "
                             f"got {self.assigner!r}")
        if self.use_dfl and self.reg_max < 1:
            raise ValueError(f"model.head.reg_max must be >= 1 with DFL, got {self.reg_max}")
        self.atss_warmup_epochs = int(_get(cfg_loss, "atss_warmup_epochs", 0))
        self.cls_weight = float(_get(cfg_loss, "cls_weight", 1.0))
        self.iou_weight = float(_get(cfg_loss, "iou_weight", 2.5))
        self.dfl_weight = float(_get(cfg_loss, "dfl_weight", 0.5))
        self.vfl_alpha = float(_get(cfg_loss, "vfl_alpha", 0.75))
        self.vfl_gamma = float(_get(cfg_loss, "vfl_gamma", 2.0))
        self.tal = TaskAlignedAssigner(self.nc, topk=int(_get(cfg_loss, "tal_topk", 13)),
                                       alpha=float(_get(cfg_loss, "tal_alpha", 1.0)),
                                       beta=float(_get(cfg_loss, "tal_beta", 6.0)))
        self.atss = ATSSAssigner(self.nc, topk=int(_get(cfg_loss, "atss_topk", 9)))
        self.iou_loss = IoULoss(self.iou_type)
        self._anchor_cache: Dict[tuple, tuple] = {}

    @classmethod
    def from_config(cls, cfg) -> "DetectionLoss":
        """Build from a full config: ``cfg.train.loss`` and ``cfg.model`` (``loss.use_dfl`` None
        follows ``model.head.use_dfl``)."""
        lc, m = cfg.train.loss, cfg.model
        use_dfl = m.head.use_dfl if lc.use_dfl is None else lc.use_dfl
        return cls(lc, m.nc, strides=tuple(m.head.strides), use_dfl=use_dfl,
                   reg_max=m.head.reg_max, grid_cell_offset=m.head.grid_cell_offset,
                   grid_cell_size=m.head.grid_cell_size)

    def extra_repr(self) -> str:
        return (f"nc={self.nc}, strides={self.strides}, iou_type={self.iou_type!r}, "
                f"use_dfl={self.use_dfl}, reg_max={self.reg_max}, assigner={self.assigner!r}, "
                f"atss_warmup_epochs={self.atss_warmup_epochs}, weights=(cls={self.cls_weight}, "
                f"iou={self.iou_weight}, dfl={self.dfl_weight})")

    # ------------------------------------------------------------------ helpers
    def _dummy_box(self, device) -> torch.Tensor:
        key = ("dummy", str(device))
        if key not in self._anchor_cache:  # built once per device: no host->device copy per step
            self._anchor_cache[key] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
        return self._anchor_cache[key]

    def anchors(self, shapes: Sequence[Tuple[int, int]], device) -> tuple:
        """Cached ``(points (N,2) grid units, strides (N,1), points px (N,2), anchor boxes px
        (N,4), n_per_level)`` for the given level shapes."""
        key = (tuple(shapes), str(device))
        if key not in self._anchor_cache:
            points, stride = make_anchors(shapes, self.strides, self.grid_cell_offset,
                                          device=device)
            pts_px = points * stride
            half = self.grid_cell_size * stride * 0.5
            boxes = torch.cat((pts_px - half, pts_px + half), -1)
            n_per_level = [h * w for h, w in shapes]
            if len(self._anchor_cache) > 16:
                self._anchor_cache.clear()
            self._anchor_cache[key] = (points, stride, pts_px, boxes, n_per_level)
        return self._anchor_cache[key]

    def pad_targets(self, targets: torch.Tensor, bs: int, device):
        """``(M, 6)`` rows ``[batch_idx, cls, x1, y1, x2, y2]`` -> ``labels (B, G)`` long, ``boxes
        (B, G, 4)``, ``mask (B, G)`` bool on ``device``; G = most boxes in one image."""
        if targets.ndim != 2 or targets.shape[-1] != 6:
            raise ValueError("DetectionLoss: targets must be (M, 6) [batch_idx, cls, x1, y1, x2, "
                             f"y2], got shape {tuple(targets.shape)}")
        targets = targets.detach().float()
        m = targets.shape[0]
        if m == 0:
            return (torch.zeros(bs, 0, dtype=torch.long, device=device),
                    torch.zeros(bs, 0, 4, device=device),
                    torch.zeros(bs, 0, dtype=torch.bool, device=device))
        tdev = targets.device
        bidx = targets[:, 0].long()
        if tdev.type == "cpu":  # free to validate here: no device sync
            if bool((bidx < 0).any()) or bool((bidx >= bs).any()):
                raise ValueError(f"DetectionLoss: targets batch_idx must be in [0, {bs}), got "
                                 f"{bidx.min().item()}..{bidx.max().item()}")
            cls_ = targets[:, 1]
            if bool((cls_ < 0).any()) or bool((cls_ >= self.nc).any()):
                raise ValueError(f"DetectionLoss: target class ids must be in [0, {self.nc}) "
                                 f"(model.nc), got {cls_.min().item():g}..{cls_.max().item():g}")
        counts = torch.bincount(bidx, minlength=bs)
        if counts.numel() > bs:
            raise ValueError(f"DetectionLoss: targets batch_idx >= batch size {bs}")
        n_max = int(counts.max())  # host read (free when targets are on the CPU)
        order = torch.argsort(bidx, stable=True)
        t, b = targets[order], bidx[order]
        pos = torch.arange(m, device=tdev) - (counts.cumsum(0) - counts)[b]
        labels = torch.zeros(bs, n_max, dtype=torch.long, device=tdev)
        boxes = torch.zeros(bs, n_max, 4, device=tdev)
        mask = torch.zeros(bs, n_max, dtype=torch.bool, device=tdev)
        labels[b, pos] = t[:, 1].long()
        boxes[b, pos] = t[:, 2:6]
        mask[b, pos] = True
        nb = tdev.type == "cpu" and torch.device(device).type == "cuda"
        return (labels.to(device, non_blocking=nb), boxes.to(device, non_blocking=nb),
                mask.to(device, non_blocking=nb))

    # ------------------------------------------------------------------ forward
    def forward(self, outputs, targets: torch.Tensor, epoch: int = 0):
        feats, cls_logits, reg = outputs
        device = cls_logits.device
        if device.type in ("cuda", "cpu", "xpu", "mps"):
            with torch.autocast(device_type=device.type, enabled=False):
                return self._forward(feats, cls_logits.float(), reg.float(), targets, epoch)
        return self._forward(feats, cls_logits.float(), reg.float(), targets, epoch)

    def _forward(self, feats, cls_logits, reg, targets, epoch):
        bs, n, nc = cls_logits.shape
        device = cls_logits.device
        if nc != self.nc:
            raise ValueError(f"DetectionLoss: cls_logits have {nc} classes, loss built for "
                             f"{self.nc} (model.nc)")
        n_reg = 4 * (self.reg_max + 1) if self.use_dfl else 4
        if reg.shape[-1] != n_reg:
            raise ValueError(f"DetectionLoss: reg has {reg.shape[-1]} channels, expected {n_reg} "
                             f"(use_dfl={self.use_dfl}, reg_max={self.reg_max}); check "
                             f"train.loss.use_dfl against model.head.use_dfl / reg_max")
        if len(feats) != len(self.strides):
            raise ValueError(f"DetectionLoss: {len(feats)} feature levels but strides "
                             f"{self.strides} (model.head.strides)")
        shapes = [tuple(f.shape[-2:]) for f in feats]
        points, stride, pts_px, anc_boxes, n_per_level = self.anchors(shapes, device)
        if points.shape[0] != n:
            raise ValueError(f"DetectionLoss: {n} predictions but the feature maps {shapes} give "
                             f"{points.shape[0]} anchors")
        gt_labels, gt_boxes, mask_gt = self.pad_targets(targets, bs, device)

        # decode predicted boxes (grid units)
        if self.use_dfl:
            log_probs = reg.view(bs, n, 4, self.reg_max + 1).log_softmax(-1)
            proj = torch.arange(self.reg_max + 1, device=device, dtype=reg.dtype)
            dist = log_probs.exp() @ proj
        else:
            log_probs, dist = None, reg
        pred_boxes = dist2bbox(dist, points, xywh=False)

        with torch.no_grad():
            pd_px = pred_boxes.detach() * stride
            if self.assigner == "atss" or epoch < self.atss_warmup_epochs:
                res: AssignResult = self.atss(anc_boxes, n_per_level, gt_labels, gt_boxes, mask_gt,
                                              pd_px)
            else:
                res = self.tal(cls_logits.detach().sigmoid(), pd_px, pts_px, gt_labels, gt_boxes,
                               mask_gt)
            target_scores, fg = res.scores, res.fg_mask
            onehot = torch.zeros(bs, n, nc + 1, dtype=torch.bool, device=device)
            onehot.scatter_(-1, res.labels[..., None], True)  # background (nc) -> dropped column
            labels = onehot[..., :nc]
            score_sum = target_scores.sum().clamp(min=1.0)
            box_w = target_scores.sum(-1)  # (B, N), zero on background
            tgt_boxes = res.boxes / stride  # grid units

        loss_cls = varifocal_loss(cls_logits, target_scores, labels, self.vfl_alpha,
                                  self.vfl_gamma) / score_sum
        # box losses over all anchors at once (no boolean indexing -> no host sync); background
        # rows see a fixed dummy box pair so they stay finite and get exactly zero gradient
        fg4 = fg[..., None]
        dummy = self._dummy_box(device)
        iou_l = self.iou_loss(torch.where(fg4, pred_boxes, dummy),
                              torch.where(fg4, tgt_boxes, dummy))
        loss_iou = (iou_l * box_w).sum() / score_sum
        if self.use_dfl:
            ltrb = torch.cat((points - tgt_boxes[..., :2], tgt_boxes[..., 2:] - points), -1)
            ltrb = ltrb.clamp_(0, self.reg_max - 0.01)
            loss_dfl = (dfl_loss(log_probs, ltrb).mean(-1) * box_w).sum() / score_sum
        else:
            loss_dfl = cls_logits.new_zeros(())
        parts = {"cls": self.cls_weight * loss_cls, "iou": self.iou_weight * loss_iou,
                 "dfl": self.dfl_weight * loss_dfl}
        total = parts["cls"] + parts["iou"] + parts["dfl"]
        return total, {k: v.detach() for k, v in parts.items()}
