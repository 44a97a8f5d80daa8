"""Post-processing of raw detector outputs: score filtering, class-aware greedy NMS and the
mapping of letterboxed boxes back to original image pixels.

Raw predictions are the eval-mode model output ``(B, N, 5 + nc)``: ``cx, cy, w, h`` in input
pixels, an objectness column and ``nc`` class scores (probabilities, not logits). Detections are
``(n, 6)`` tensors ``[x1, y1, x2, y2, score, cls]`` sorted by descending score.

NMS is pure torch (exact greedy NMS, vectorized per block of candidates); ``torchvision.ops`` is
used as a fast path only when ``import torchvision`` works (it does not against the CPU torch
wheel of this project).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["box_iou", "xywh2xyxy", "xyxy2xywh", "nms", "nms_reference", "postprocess",
           "scale_boxes", "clip_boxes", "e2e_to_detections"]

_TV_NMS = None  # cached: False when torchvision is unusable, else torchvision.ops.batched_nms


def _torchvision_batched_nms():
    global _TV_NMS
    if _TV_NMS is None:
        try:  # torchvision may be installed but fail to load (e.g. missing libc10_cuda)
            import torchvision  # noqa: F401
            from torchvision.ops import batched_nms
            _TV_NMS = batched_nms
        except Exception:  # noqa: BLE001  (ImportError, OSError, RuntimeError, ...)
            _TV_NMS = False
    return _TV_NMS or None


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> corner boxes."""
    xy, wh = x[..., :2], x[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def xyxy2xywh(x: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> centre/size boxes."""
    return torch.cat(((x[..., :2] + x[..., 2:4]) / 2, x[..., 2:4] - x[..., :2]), -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of corner boxes ``a (n, 4)`` and ``b (m, 4)`` -> ``(n, m)``; 0 where the
    union is empty."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:4], b[None, :, 2:4])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)  # inter is 0 where union is


def _suppression(boxes_a, cls_a, boxes_b, cls_b, iou_thres):
    """``(n, m)`` bool: box i of ``a`` suppresses box j of ``b`` (IoU above the threshold and,
    when classes are given, the same class)."""
    m = box_iou(boxes_a, boxes_b) > iou_thres
    if cls_a is not None:
        m &= cls_a[:, None] == cls_b[None, :]
    return m


def _greedy_sweep(m: torch.Tensor, limit: Optional[int]) -> np.ndarray:
    """Greedy pass over an upper-triangular suppression matrix ``m`` (bool, ``(k, k)``):
    returns the bool keep mask, stopping after ``limit`` kept boxes."""
    mc = m.cpu().numpy()
    k = mc.shape[0]
    keep = np.zeros(k, dtype=bool)
    removed = np.zeros(k, dtype=bool)
    active = mc.any(1)
    n = 0
    for i in range(k):
        if removed[i]:
            continue
        keep[i] = True
        n += 1
        if limit is not None and n >= limit:
            break
        if active[i]:
            removed |= mc[i]
    return keep


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float,
        classes: Optional[torch.Tensor] = None, max_keep: Optional[int] = None,
        block: int = 1024, use_torchvision: bool = True) -> torch.Tensor:
    """Greedy NMS; class-aware when ``classes`` is given (boxes of different classes never
    suppress each other). Returns indices into ``boxes`` in order of descending score, at most
    ``max_keep`` of them. A box is suppressed by a higher-scoring kept box when IoU > iou_thres.

    The pure-torch path sorts the candidates and walks them in blocks: a block first drops the
    boxes suppressed by boxes kept so far (one vectorized IoU), then computes the block's
    suppression matrix (vectorized) and resolves it with a sequential sweep that only touches
    rows of kept boxes. It stops as soon as ``max_keep`` boxes are kept.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if use_torchvision and _torchvision_batched_nms() is not None:
        cls = classes if classes is not None else torch.zeros(n, dtype=torch.long,
                                                              device=boxes.device)
        keep = _torchvision_batched_nms()(boxes.float(), scores.float(), cls, float(iou_thres))
        return keep[:max_keep] if max_keep is not None else keep
    boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    sboxes = boxes[order]
    scls = classes[order] if classes is not None else None
    kept: List[torch.Tensor] = []  # positions in sorted order
    kept_boxes = sboxes[:0]
    kept_cls = scls[:0] if scls is not None else None
    n_kept = 0
    s = 0
    while s < n:
        # with a cap, small first blocks: most candidates never need to be looked at
        step = block if max_keep is None else int(min(block, max(128, 2 * (max_keep - n_kept))))
        b = sboxes[s:s + step]
        c = scls[s:s + step] if scls is not None else None
        s0, s = s, s + step
        if n_kept:
            alive = ~_suppression(kept_boxes, kept_cls, b, c, iou_thres).any(0)
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            b = b[idx]
            c = c[idx] if c is not None else None
        else:
            idx = torch.arange(b.shape[0], device=b.device)
        m = _suppression(b, c, b, c, iou_thres).triu(1)  # m[i, j]: earlier i suppresses later j
        keep = _greedy_sweep(m, None if max_keep is None else max_keep - n_kept)
        keep = torch.from_numpy(keep).to(b.device)
        kept.append(idx[keep] + s0)
        kept_boxes = torch.cat((kept_boxes, b[keep]))
        if kept_cls is not None:
            kept_cls = torch.cat((kept_cls, c[keep]))
        n_kept += int(keep.sum())
        if max_keep is not None and n_kept >= max_keep:
            break
    pos = torch.cat(kept) if kept else order[:0]
    if max_keep is not None:
        pos = pos[:max_keep]
    return order[pos]


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float,
                  classes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain sequential greedy NMS (one box at a time); slow, for tests and as a reference."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    iou = box_iou(boxes.float(), boxes.float()).tolist()
    cls = classes.tolist() if classes is not None else [0] * len(order)
    keep: List[int] = []
    for i in order:
        if all(not (iou[k][i] > iou_thres and cls[k] == cls[i]) for k in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def postprocess(preds: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                max_det: int = 300, classes: Optional[Sequence[int]] = None,
                agnostic: bool = False, multi_label: bool = False,
                max_nms: int = 30000) -> List[torch.Tensor]:
    """Raw ``(B, N, 5 + nc)`` predictions -> list of ``(n, 6)`` detections per image,
    ``[x1, y1, x2, y2, score, cls]`` in input pixels, sorted by score.

    score = objectness * class score; candidates need ``score > conf_thres``. With
    ``multi_label`` every (box, class) pair above the threshold is a candidate (as used for COCO
    mAP), otherwise only the best class of each box. ``classes`` keeps only those class ids.
    NMS is class-aware unless ``agnostic``; at most ``max_nms`` candidates (highest scores)
    enter NMS and at most ``max_det`` detections are returned per image.
    """
    if isinstance(preds, (list, tuple)):
        preds = preds[0]
    if preds.dim() != 3 or preds.shape[-1] < 6:
        raise ValueError(f"postprocess expects raw predictions (B, N, 5+nc), got shape "
                         f"{tuple(preds.shape)}")
    if not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"iou_thres must be in [0, 1], got {iou_thres}")
    nc = preds.shape[-1] - 5
    cls_filter = (torch.as_tensor(list(classes), device=preds.device)
                  if classes is not None else None)
    out = []
    for x in preds:
        x = x.float()
        scores = x[:, 5:] * x[:, 4:5]
        if multi_label and nc > 1:
            mask = scores > conf_thres
            if int(mask.sum()) > max_nms:  # straight to the best max_nms pairs
                s, flat = scores.flatten().topk(max_nms)
                i, j = flat // nc, flat % nc
            else:
                i, j = mask.nonzero(as_tuple=True)
                s = scores[i, j]
        else:
            s, j = scores.max(1)
            i = (s > conf_thres).nonzero().squeeze(1)
            s, j = s[i], j[i]
        if cls_filter is not None:
            m = torch.isin(j, cls_filter)
            i, j, s = i[m], j[m], s[m]
        if s.numel() > max_nms:
            top = s.topk(max_nms).indices
            i, j, s = i[top], j[top], s[top]
        boxes = xywh2xyxy(x[i, :4])
        keep = nms(boxes, s, iou_thres, None if agnostic else j, max_keep=max_det)
        out.append(torch.cat((boxes[keep], s[keep, None], j[keep, None].to(boxes.dtype)), 1))
    return out


def clip_boxes(boxes: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """Clip corner boxes (first 4 columns) in place to an image of ``shape = (h, w)``."""
    h, w = shape
    boxes[:, 0].clamp_(0, w)
    boxes[:, 1].clamp_(0, h)
    boxes[:, 2].clamp_(0, w)
    boxes[:, 3].clamp_(0, h)
    return boxes


def scale_boxes(boxes, shape_info, clip: bool = True):
    """Map corner boxes (first 4 columns of ``(n, >=4)``) from the letterboxed input back to the
    original image and clip them to it. ``shape_info = ((h0, w0), ((ratio_h, ratio_w),
    (pad_w, pad_h)))`` as produced by the data loader: ``orig = (letterboxed - pad) / ratio``.
    Returns a new tensor (or array, for numpy input); other columns are copied unchanged."""
    is_np = isinstance(boxes, np.ndarray)
    b = torch.as_tensor(boxes).clone()
    if not b.is_floating_point():
        b = b.float()
    (h0, w0), ((rh, rw), (pw, ph)) = shape_info
    b[:, [0, 2]] = (b[:, [0, 2]] - float(pw)) / float(rw)
    b[:, [1, 3]] = (b[:, [1, 3]] - float(ph)) / float(rh)
    if clip:
        clip_boxes(b, (float(h0), float(w0)))
    return b.numpy() if is_np else b


def e2e_to_detections(num_dets, det_boxes, det_scores, det_classes) -> List[torch.Tensor]:
    """End-to-end NMS outputs (``num_dets (B,1)``, ``det_boxes (B,K,4)``, ``det_scores (B,K)``,
    ``det_classes (B,K)``, as from EfficientNMS_TRT or our ONNX NMS graph) -> list of ``(n, 6)``
    detections like :func:`postprocess`."""
    num = torch.as_tensor(num_dets).reshape(-1).long()
    boxes = torch.as_tensor(det_boxes).float()
    scores = torch.as_tensor(det_scores).float()
    cls = torch.as_tensor(det_classes).float()
    return [torch.cat((boxes[i, :n], scores[i, :n, None], cls[i, :n, None]), 1)
            for i, n in enumerate(num.tolist())]
