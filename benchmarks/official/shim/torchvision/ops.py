"""``torchvision.ops.nms`` backed by yolo_q's exact greedy NMS (pure torch)."""
import torch

from yolo_q.eval.postprocess import nms as _nms


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the kept boxes (x1y1x2y2), by decreasing score, like torchvision's."""
    return _nms(boxes, scores, iou_threshold, use_torchvision=False)
