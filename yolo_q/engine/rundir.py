"""Run directories: created up front, checked writable, never silently overwritten."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

MIN_FREE_BYTES = 64 * 1024 * 1024  # a few checkpoints of a small model


class RunDirError(OSError):
    """The output location cannot be used; names the path."""

    user_facing = True  # tools print the message as one line (yolo_q.cli.run_tool)


def check_writable(path: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail now, naming ``path``, if it cannot take files (permissions, read-only, full disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"{path}: output directory is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(path).free
    if free < min_free:
        raise RunDirError(f"{path}: only {free / 2**20:.1f} MiB free; need at least "
                          f"{min_free / 2**20:.0f} MiB for checkpoints")


def make_run_dir(output_dir, name: str, exist_ok: bool = False, resume_from: Optional[Path] = None,
                 min_free: int = MIN_FREE_BYTES) -> Path:
    """``output_dir/name``; if it exists and is not empty, ``name2``, ``name3``... unless
    ``exist_ok`` (reuse, files may be overwritten) or resuming (the run's own folder)."""
    root = Path(output_dir)
    if resume_from is not None:
        run = Path(resume_from).resolve().parent
        run = run.parent if run.name == "weights" else run
    else:
        run = root / name
        if not exist_ok:
            i = 2
            while run.exists() and (not run.is_dir() or any(run.iterdir())):
                run = root / f"{name}{i}"
                i += 1
    check_writable(run, min_free)
    return run
