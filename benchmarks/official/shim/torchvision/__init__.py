"""A stand-in for ``torchvision`` when running the official YOLOv6 code for the side-by-side
comparison (benchmarks/official/README.md): torchvision does not import against the CPU torch
wheel here, and the official code only needs ``torchvision.ops.nms`` (used by its evaluation).
Put ``benchmarks/official/shim`` first on PYTHONPATH; never used by yolo_q itself."""
from . import ops  # noqa: F401

__version__ = "0.0-yolo_q-shim"
