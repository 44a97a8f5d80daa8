"""Images outside a dataset: listing (file, folder, list, glob), reading and letterboxed
uint8 batches (inference, quick calibration), and the class names of a config's data YAML."""
from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..io import PathLike
from .dataset import imread
from .formats import load_data_yaml
from .loader import resolve_data_yaml
from .transforms import letterbox

__all__ = ["IMAGE_EXTS", "VIDEO_EXTS", "config_class_names", "image_batches", "letterbox_batch",
           "list_images", "read_image"]

logger = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg")


def list_images(source: PathLike) -> List[Path]:
    """Image files of ``source``: one image, a folder (sorted, not recursive), a ``.txt`` list
    (one path per line, relative to the list's folder) or a glob pattern."""
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    elif p.is_file() and p.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        files = [(p.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
    elif p.is_file():
        files = [p]
    elif any(c in s for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(s) if Path(f).suffix.lower() in IMAGE_EXTS)
    else:
        raise FileNotFoundError(f"{s}: no such image, folder, list or video")
    if not files:
        raise FileNotFoundError(f"{s}: no images found (extensions {', '.join(IMAGE_EXTS)})")
    return files


def read_image(path: PathLike) -> np.ndarray:
    img = imread(str(path))
    if img is None or not img.size:
        raise ValueError(f"{path}: cannot read the image")
    return img


def letterbox_batch(imgs_bgr: Sequence[np.ndarray], img_size: int):
    """BGR uint8 images -> (uint8 tensor (B, 3, S, S) RGB, shapes) with the data loader's
    letterbox; ``shapes`` as in the batch contract (for :func:`yolo_q.eval.scale_boxes`)."""
    arrs, shapes = [], []
    for img in imgs_bgr:
        lb, ratio, pad = letterbox(img, img_size)
        arrs.append(np.ascontiguousarray(lb[:, :, ::-1].transpose(2, 0, 1)))
        shapes.append((tuple(img.shape[:2]), (tuple(ratio), tuple(pad))))
    return torch.from_numpy(np.stack(arrs)), shapes


def image_batches(source: PathLike, img_size: int, batch_size: int = 8,
                  limit: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Letterboxed uint8 batches (B, 3, S, S) of the images in ``source`` (at most ``limit``
    images), e.g. for a quick calibration; unreadable images are skipped with a warning."""
    files = list_images(source)[:limit] if limit else list_images(source)
    buf: List[np.ndarray] = []
    for f in files:
        try:
            buf.append(read_image(f))
        except ValueError as e:
            logger.warning("skipping %s", e)
            continue
        if len(buf) == batch_size:
            yield letterbox_batch(buf, img_size)[0]
            buf = []
    if buf:
        yield letterbox_batch(buf, img_size)[0]


def config_class_names(cfg) -> Optional[List[str]]:
    """The class names of ``cfg.data.dataset`` when they are this model's (``model.nc`` names);
    None without a readable data YAML or when its class count differs."""
    try:
        names = load_data_yaml(resolve_data_yaml(cfg.data.dataset), check=False)["names"]
        names = [str(names[k]) for k in sorted(names, key=int)] if isinstance(names, dict) \
            else [str(n) for n in names]
        if len(names) == int(cfg.model.nc):  # else the YAML is not this model's
            return names
    except Exception:  # noqa: BLE001  (no or broken data YAML: names are optional here)
        pass
    return None
