from . import backbone, blocks, head, neck  # noqa: F401  (register components)
from .head import dist2bbox, make_anchors
from .registry import BACKBONES, BLOCKS, HEADS, NECKS, Registry
from .yolo import Model, build_model, make_divisible

__all__ = ["BACKBONES", "BLOCKS", "HEADS", "NECKS", "Model", "Registry", "build_model",
           "dist2bbox", "make_anchors", "make_divisible"]
