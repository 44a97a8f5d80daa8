"""Detection losses: IoU family, label assigners (TAL, ATSS), VFL, DFL and ``DetectionLoss``."""
from .assigners import ATSSAssigner, AssignResult, TaskAlignedAssigner, points_in_boxes
from .iou import IOU_TYPES, IoULoss, bbox_iou, box_area, box_iou
from .loss import DetectionLoss, dfl_loss, varifocal_loss

__all__ = ["ATSSAssigner", "AssignResult", "DetectionLoss", "IOU_TYPES", "IoULoss",
           "TaskAlignedAssigner", "bbox_iou", "box_area", "box_iou", "dfl_loss", "points_in_boxes",
           "varifocal_loss"]
