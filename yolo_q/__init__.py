"""yolo_q: YOLOv6-style detection training with quantization built in."""
from .config import load_config
from .models import build_model

__version__ = "0.1.0"
__all__ = ["build_model", "load_config", "load_model", "__version__"]


def load_model(weights, cfg=None, device="cpu", fuse=False):
    """Load a yolo_q or official YOLOv6 checkpoint and return ``model.eval()`` (see
    :func:`yolo_q.engine.checkpoint.load_model`)."""
    from .engine.checkpoint import load_model as _load
    return _load(weights, cfg=cfg, device=device, fuse=fuse)
