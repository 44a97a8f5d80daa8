"""Checkpoint I/O: atomic saves, safe loads (``weights_only=True``), strict state loading."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .files import PathLike, write_bytes_atomic


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not match the model; names the file."""


def save_checkpoint(obj: Dict[str, Any], path: PathLike, keep_same: bool = False) -> Path:
    """Save atomically: write a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the previous file or the new one, never a truncated one.
    ``keep_same``: a file at ``path`` with the same bytes is left alone (keeps its mtime).
    """
    return write_bytes_atomic(path, lambda f: torch.save(obj, f), keep_same)


def half_state(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``sd`` with every floating tensor stored as float16 (half the file; a float32 model loads
    it with ``load_state_dict``, which casts back). Refuses values float16 cannot hold."""
    out = {}
    for k, v in sd.items():
        if torch.is_tensor(v) and v.is_floating_point():
            h = v.detach().to(torch.float16)
            if not torch.isfinite(h).all() and torch.isfinite(v).all():
                raise ValueError(f"{k}: values beyond float16's range ({v.abs().max().item():.3g})")
            v = h
        out[k] = v
    return out


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_PROTO = b"\x80"  # a binary pickle (protocol >= 2): torch's legacy format


def check_checkpoint_file(path: PathLike) -> Path:
    """``path`` is a file that looks like a PyTorch checkpoint (a zip archive or a binary
    pickle); else a :class:`CheckpointError` that says what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (empty file)")
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO)):
        kind = "a text file" if _is_text(head) else "not a zip archive or a binary pickle"
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({kind}; it starts with "
                              f"{head!r})")
    return path


def _is_text(head: bytes) -> bool:
    return all(32 <= c < 127 or c in b"\t\r\n" for c in head)


def describe_load_error(path: Path, e: BaseException) -> str:
    """One line for a failed safe load: a refused global in our words (never PyTorch's advice
    to retry with the unsafe loader), else the first line of the error."""
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text) or \
        re.search(r"refused global '([^']+)'", text)
    if refused or "Weights only load failed" in text:
        what = f"global '{refused.group(1)}'" if refused else "an object that is not plain data"
        return (f"{path}: refused {what}: the file holds pickled code or objects, not only "
                f"tensors, numbers, strings, lists and dicts, and loading them could run code; "
                f"nothing was run (use checkpoints written by yolo_q; an official YOLOv6 file "
                f"converts with tools/convert.py)")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {first})"


def load_checkpoint(path: PathLike, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    """Load a yolo_q checkpoint with ``torch.load(weights_only=True)``: tensors, numbers,
    strings, lists and dicts only; nothing pickled is executed."""
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
        raise CheckpointError(describe_load_error(path, e)) from None


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
