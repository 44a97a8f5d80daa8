"""Label assignment for anchor-free detection: Task-Aligned (TAL) and ATSS.

Both assigners are vectorized over the batch and the ground truths. Ground truths come padded:
``gt_labels (B, G)`` (long), ``gt_boxes (B, G, 4)`` pixels ``xyxy``, ``mask_gt (B, G)`` bool
(False on padding). Both return an :class:`AssignResult` whose ``labels`` are ``nc``
(background) where ``fg_mask`` is False. Rules shared by both:

* a gt can only be assigned to anchors whose centre lies strictly inside it;
* an anchor claimed by several gts goes to the claiming gt with the highest IoU (TAL: IoU with the
  anchor's predicted box; ATSS: IoU with the anchor box).

The largest intermediates are a few ``(B, G, N)`` tensors (no ``(B, G, N, 4)`` and no one-hot over
the anchors). Nothing synchronizes with the host.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .iou import box_iou


class AssignResult(NamedTuple):
    labels: torch.Tensor  # (B, N) long, nc = background
    boxes: torch.Tensor  # (B, N, 4) assigned gt box, pixels xyxy (zeros where background)
    scores: torch.Tensor  # (B, N, nc) soft class targets, zero rows on background
    fg_mask: torch.Tensor  # (B, N) bool
    gt_idx: torch.Tensor  # (B, N) long, index of the assigned gt (0 where background)


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """``points (N, 2)`` x ``boxes (B, G, 4)`` -> bool ``(B, G, N)``: point strictly inside box."""
    x, y = points[:, 0], points[:, 1]
    b = boxes[..., None, :]  # (B, G, 1, 4)
    return (((x - b[..., 0]) > eps) & ((y - b[..., 1]) > eps)
            & ((b[..., 2] - x) > eps) & ((b[..., 3] - y) > eps))


def _empty_result(bs: int, n: int, nc: int, device, dtype=torch.float32) -> AssignResult:
    return AssignResult(torch.full((bs, n), nc, dtype=torch.long, device=device),
                        torch.zeros(bs, n, 4, device=device, dtype=dtype),
                        torch.zeros(bs, n, nc, device=device, dtype=dtype),
                        torch.zeros(bs, n, dtype=torch.bool, device=device),
                        torch.zeros(bs, n, dtype=torch.long, device=device))


def _pow(x: torch.Tensor, e: float) -> torch.Tensor:
    return x if e == 1 else x.pow(e)


def _resolve(cand_idx: torch.Tensor, cand_ok: torch.Tensor, cand_iou: torch.Tensor, n: int):
    """One gt per anchor. ``cand_idx (B, G, K)``: candidate anchors of each gt, ``cand_ok``: which
    of them the gt claims, ``cand_iou``: their overlaps. An anchor claimed by several gts goes to
    the claiming gt with the highest overlap. Returns ``gt_idx (B, N)`` and ``fg_mask (B, N)``."""
    bs, n_gt, _ = cand_idx.shape
    claims = cand_iou.new_full((bs, n_gt, n), -1.0)
    claims.scatter_(-1, cand_idx, torch.where(cand_ok, cand_iou, -1.0))
    best, gt_idx = claims.max(1)  # max(): faster than argmax on CPU
    fg_mask = best >= 0
    return gt_idx.masked_fill_(~fg_mask, 0), fg_mask


def _gather_targets(gt_labels, gt_boxes, gt_idx, fg_mask, score, nc: int):
    """Per anchor: label (``nc`` on background), gt box (zeros on background) and the class score
    map ``(B, N, nc)`` holding ``score (B, N)`` at the label."""
    labels = torch.gather(gt_labels, 1, gt_idx).masked_fill_(~fg_mask, nc)  # (B, N)
    boxes = torch.gather(gt_boxes, 1, gt_idx[..., None].expand(-1, -1, 4))
    boxes = torch.where(fg_mask[..., None], boxes, 0.0)
    scores = torch.zeros(*labels.shape, nc + 1, device=labels.device, dtype=gt_boxes.dtype)
    scores.scatter_(-1, labels[..., None], score.to(scores.dtype)[..., None])
    return labels, boxes, scores[..., :nc]


class TaskAlignedAssigner(nn.Module):
    """TOOD task-aligned assignment (YOLOv6 v3.0: ``topk=13, alpha=1, beta=6``).

    Per gt, the alignment metric ``t = s^alpha * u^beta`` (``s``: predicted score of the gt's class,
    ``u``: IoU of the predicted box with the gt) is computed for the anchors inside the gt; the
    ``topk`` anchors by ``t`` become candidates. Target scores are the one-hot class times the
    normalized alignment ``t * max_u / max_t`` (maxima over the gt's positive anchors).
    """

    def __init__(self, nc: int, topk: int = 13, alpha: float = 1.0, beta: float = 6.0,
                 eps: float = 1e-9):
        super().__init__()
        self.nc, self.topk, self.alpha, self.beta, self.eps = nc, topk, alpha, beta, eps

    @torch.no_grad()
    def forward(self, pd_scores: torch.Tensor, pd_boxes: torch.Tensor, anchor_points: torch.Tensor,
                gt_labels: torch.Tensor, gt_boxes: torch.Tensor,
                mask_gt: torch.Tensor) -> AssignResult:
        """pd_scores (B, N, nc) probabilities, pd_boxes (B, N, 4) pixels xyxy, anchor_points (N, 2)
        pixels; gt tensors as in the module docstring."""
        bs, n, _ = pd_scores.shape
        n_gt = gt_boxes.shape[1]
        if n_gt == 0:
            return _empty_result(bs, n, self.nc, pd_scores.device, pd_scores.dtype)
        mask_gt = mask_gt.bool()
        labels = gt_labels.long().clamp(0, self.nc - 1)
        in_gts = points_in_boxes(anchor_points, gt_boxes) & mask_gt[..., None]  # (B, G, N)
        # score of each gt's class at every anchor: (B, G, N)
        b_idx = torch.arange(bs, device=labels.device)[:, None]
        cls_score = pd_scores.transpose(1, 2)[b_idx, labels]
        overlaps = torch.where(in_gts, box_iou(gt_boxes, pd_boxes), 0.0)
        align = _pow(cls_score, self.alpha) * _pow(overlaps, self.beta)  # zero outside the gt
        k = min(self.topk, n)
        topk_idx = align.topk(k, dim=-1).indices  # (B, G, k)
        # in_gts already excludes padded gts
        gt_idx, fg_mask = _resolve(topk_idx, in_gts.gather(-1, topk_idx),
                                   overlaps.gather(-1, topk_idx), n)
        # normalize the alignment per gt so that its best positive gets the gt's best IoU:
        # t * max_u / max_t, maxima over each gt's final positives (O(B*N) via scatter-amax)
        idx = gt_idx[:, None, :]
        align_a = torch.where(fg_mask, align.gather(1, idx)[:, 0], 0.0)  # (B, N)
        iou_a = torch.where(fg_mask, overlaps.gather(1, idx)[:, 0], 0.0)
        max_align = align_a.new_zeros(bs, n_gt).scatter_reduce_(1, gt_idx, align_a, "amax")
        max_iou = iou_a.new_zeros(bs, n_gt).scatter_reduce_(1, gt_idx, iou_a, "amax")
        norm = align_a * max_iou.gather(1, gt_idx) / (max_align.gather(1, gt_idx) + self.eps)
        tgt_labels, tgt_boxes, tgt_scores = _gather_targets(labels, gt_boxes, gt_idx, fg_mask, norm,
                                                            self.nc)
        return AssignResult(tgt_labels, tgt_boxes, tgt_scores, fg_mask, gt_idx)


class ATSSAssigner(nn.Module):
    """Adaptive Training Sample Selection (Zhang et al. 2020), YOLOv6's warm-up assigner.

    Per gt and per pyramid level, the ``topk`` anchors whose centres are closest to the gt centre
    are candidates; those with anchor-box IoU ``>=`` mean + std (unbiased) of the candidates' IoUs
    and centre inside the gt are positive. Target scores are the one-hot class times the IoU of the
    anchor's predicted box with its gt (hard one-hot when ``pd_boxes`` is None).
    """

    def __init__(self, nc: int, topk: int = 9, eps: float = 1e-9):
        super().__init__()
        self.nc, self.topk, self.eps = nc, topk, eps

    @torch.no_grad()
    def forward(self, anchor_boxes: torch.Tensor, n_per_level: Sequence[int],
                gt_labels: torch.Tensor, gt_boxes: torch.Tensor, mask_gt: torch.Tensor,
                pd_boxes: Optional[torch.Tensor] = None) -> AssignResult:
        """anchor_boxes (N, 4) pixels xyxy, levels concatenated in the order of ``n_per_level``;
        pd_boxes (B, N, 4) pixels or None."""
        bs, n_gt = gt_boxes.shape[:2]
        n = anchor_boxes.shape[0]
        if sum(n_per_level) != n:
            raise ValueError(f"ATSSAssigner: n_per_level sums to {sum(n_per_level)}, "
                             f"but there are {n} anchor boxes")
        dtype = gt_boxes.dtype if gt_boxes.is_floating_point() else torch.float32
        if n_gt == 0:
            return _empty_result(bs, n, self.nc, anchor_boxes.device, dtype)
        mask_gt = mask_gt.bool()
        labels = gt_labels.long().clamp(0, self.nc - 1)
        gt_c = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, G, 2)
        anc_c = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2  # (N, 2)
        cand_idx, start = [], 0
        for n_l in n_per_level:  # loop over pyramid levels only
            # squared distance, per coordinate so no (B, G, N_l, 2) tensor
            d2 = ((gt_c[..., None, 0] - anc_c[start:start + n_l, 0]).square()
                  + (gt_c[..., None, 1] - anc_c[start:start + n_l, 1]).square())
            cand_idx.append(d2.topk(min(self.topk, n_l), dim=-1, largest=False).indices + start)
            start += n_l
        cand_idx = torch.cat(cand_idx, -1)  # (B, G, K)
        # everything else only on the K candidates per gt
        cand_iou = box_iou(gt_boxes[..., None, :], anchor_boxes[cand_idx])[..., 0, :]  # (B, G, K)
        thr = cand_iou.mean(-1, keepdim=True)
        if cand_idx.shape[-1] > 1:
            thr = thr + cand_iou.std(-1, keepdim=True)
        cand_c = anc_c[cand_idx]  # (B, G, K, 2)
        inside = ((cand_c - gt_boxes[..., None, :2]).amin(-1) > self.eps) & \
                 ((gt_boxes[..., None, 2:] - cand_c).amin(-1) > self.eps)
        # IoU >= threshold (1e-6 guards rounding when all candidate IoUs tie), centre inside
        ok = (cand_iou >= thr - 1e-6) & inside & mask_gt[..., None]
        gt_idx, fg_mask = _resolve(cand_idx, ok, cand_iou, n)
        if pd_boxes is None:
            score = fg_mask.to(dtype)
        else:  # soft score: IoU of each anchor's prediction with its gt
            assigned = torch.gather(gt_boxes, 1, gt_idx[..., None].expand(-1, -1, 4))
            score = box_iou(pd_boxes[..., None, :], assigned[..., None, :])[..., 0, 0]
            score = torch.where(fg_mask, score, 0.0)
        tgt_labels, tgt_boxes, tgt_scores = _gather_targets(labels, gt_boxes, gt_idx, fg_mask,
                                                            score, self.nc)
        return AssignResult(tgt_labels, tgt_boxes, tgt_scores, fg_mask, gt_idx)
