"""Checkpoint I/O: atomic saves, safe loads (``weights_only=True``), official YOLOv6 import."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match the model; names the file."""


def save_checkpoint(obj: Dict[str, Any], path: PathLike) -> Path:
    """Save atomically: write a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the previous file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: PathLike, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    """Load a yolo_q checkpoint with ``torch.load(weights_only=True)``: tensors, numbers,
    strings, lists and dicts only; nothing pickled is executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
