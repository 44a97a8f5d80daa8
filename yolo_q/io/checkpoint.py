"""Checkpoint I/O: atomic saves, safe loads (``weights_only=True``), strict state loading."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .files import PathLike, write_bytes_atomic


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match the model; names the file."""


def save_checkpoint(obj: Dict[str, Any], path: PathLike) -> Path:
    """Save atomically: write a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the previous file or the new one, never a truncated one.
    """
    return write_bytes_atomic(path, lambda f: torch.save(obj, f))


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


def load_state_into(model: torch.nn.Module, sd: Dict[str, torch.Tensor], source: str = "weights"):
    """Strict load that converts dtype and names missing/unexpected/mismatched keys on failure."""
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(ref[k].shape)}" for k in ref
           if k in sd and sd[k].shape != ref[k].shape]
    if missing or unexpected or bad:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", bad)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(f"{source}: does not match the model: {'; '.join(parts)}")
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()}, strict=True)
    return model
