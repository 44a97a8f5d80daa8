"""Evaluation: post-processing (pure-torch NMS), COCO metrics and runtime backends
(torch, ONNX Runtime, OpenVINO, TensorRT) behind one interface, tied together by :func:`evaluate`."""
from .backends import (BACKEND_KINDS, Backend, OrtBackend, OvBackend, TorchBackend, TrtBackend,
                       build_backend)
from .coco import STAT_NAMES, COCOEvaluator, coco_gt_from_dataset, load_class_map, plot_pr_curves
from .postprocess import (box_iou, e2e_to_detections, nms, postprocess, scale_boxes, xywh2xyxy,
                          xyxy2xywh)
from .runner import evaluate

__all__ = ["BACKEND_KINDS", "Backend", "COCOEvaluator", "OrtBackend", "OvBackend", "STAT_NAMES",
           "TorchBackend", "TrtBackend", "box_iou", "build_backend", "coco_gt_from_dataset",
           "e2e_to_detections", "evaluate", "load_class_map", "nms", "plot_pr_curves",
           "postprocess", "scale_boxes", "xywh2xyxy", "xyxy2xywh"]
