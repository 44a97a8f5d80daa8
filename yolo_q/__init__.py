"""yolo_q: YOLOv6-style detection training with quantization built in."""
from .config import load_config
from .models import build_model
from .quant.load import load_model

__version__ = "0.1.0"
__all__ = ["build_model", "load_config", "load_model", "__version__"]

