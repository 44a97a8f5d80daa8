"""Atomic file writes and JSON helpers (ground floor: stdlib, numpy and torch only)."""
from __future__ import annotations

import contextlib
import filecmp
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]


def process_umask() -> int:
    """The process umask (read from /proc where possible: ``os.umask`` can only be read by
    setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, keep_same: bool = False) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it replaces ``path`` (``os.replace``),
    on any error it is removed. A crash leaves the previous file or the new one, never half.
    The file gets the mode a plain ``open(path, "w")`` would give (``0o666 & ~umask``), not
    ``mkstemp``'s private 0600. ``keep_same``: when ``path`` already holds the same bytes it is
    left alone (keeps its mtime, which fingerprints of later work may hold)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the rename
            os.fsync(f.fileno())
        if not (keep_same and path.is_file() and filecmp.cmp(tmp, path, shallow=False)):
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: PathLike, writer, keep_same: bool = False) -> Path:
    """``writer(f)`` writes into a binary file object; the result lands at ``path`` atomically
    (``keep_same``: see :func:`atomic_path`)."""
    with atomic_path(path, keep_same) as tmp, open(tmp, "wb") as f:
        writer(f)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def jsonable(obj):
    """Plain JSON types (NaN/inf -> None, tensors/numpy scalars -> float)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return obj
    try:
        v = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return v if math.isfinite(v) else None


def to_builtin(obj: Any) -> Any:
    """numpy scalars/arrays, tuples and nested containers -> ``weights_only``-safe types."""
    if isinstance(obj, dict):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_json(path: PathLike, obj: Any, indent: int = 2, **kwargs) -> Path:
    """Write ``obj`` as JSON atomically (``json.dumps`` keyword arguments pass through)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, **kwargs))


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
