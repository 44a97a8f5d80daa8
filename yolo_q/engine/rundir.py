"""Run directories: checked before anything is created, never silently overwritten, and removed
again when the run that created them fails before writing anything of its own there."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..io.paths import OutputPathError, check_output_dir, first_missing

logger = logging.getLogger(__name__)
MIN_FREE_BYTES = 64 * 1024 * 1024  # a few checkpoints of a small model
SETUP_FILES = ("config.yaml",)  # written at the start of a run, before any result
_CREATED = {}  # resolved run dir -> the top-most folder make_run_dir created for it


class RunDirError(OutputPathError):
    """The output location cannot be used; names the path."""


def check_writable(path: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail now, naming ``path``, if it cannot take files (permissions, read-only, a regular
    file in the way, full disk); creates nothing."""
    try:
        check_output_dir(path, what="run directory", min_free=min_free)
    except OutputPathError as e:
        raise RunDirError(str(e)) from None


def _create(run: Path) -> None:
    """mkdir -p ``run`` and write a probe file; on failure remove what was created."""
    top = first_missing(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=run)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        if top is not None and top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        raise RunDirError(f"{run}: output directory is not writable ({e.strerror or e})") from None
    if top is not None:
        _CREATED[run.resolve()] = top


def make_run_dir(output_dir, name: str, exist_ok: bool = False, resume_from: Optional[Path] = None,
                 min_free: int = MIN_FREE_BYTES) -> Path:
    """``output_dir/name``; if it exists and is not empty, ``name2``, ``name3``... unless
    ``exist_ok`` (reuse, files may be overwritten) or resuming (the run's own folder, which must
    exist). Checked first (:func:`check_writable`), created after."""
    root = Path(output_dir)
    if resume_from is not None:
        run = Path(resume_from).resolve().parent
        run = run.parent if run.name == "weights" else run
        if not run.is_dir():
            raise RunDirError(f"{run}: the run directory of {resume_from} does not exist")
    else:
        run = root / name
        if not exist_ok:
            i = 2
            while run.exists() and (not run.is_dir() or any(run.iterdir())):
                run = root / f"{name}{i}"
                i += 1
    check_writable(run, min_free)
    _create(run)
    return run


def remove_if_unused(run: Path) -> bool:
    """Remove ``run`` (and the empty parents created with it) when :func:`make_run_dir`
    created it in this process and it holds nothing but :data:`SETUP_FILES`; True when
    removed."""
    run = Path(run).resolve()
    top = _CREATED.get(run)
    if top is None or not run.is_dir():
        return False
    if any(p.name not in SETUP_FILES or not p.is_file() for p in run.iterdir()):
        return False
    for p in run.iterdir():
        p.unlink()
    _CREATED.pop(run, None)
    folder = run
    while True:  # the run dir, then each parent make_run_dir created, while empty
        try:
            folder.rmdir()
        except OSError:
            break
        if folder == top.resolve() or folder.parent == folder:
            break
        folder = folder.parent
    logger.info("removed %s (the run stopped before writing results there)", run)
    return True


@contextlib.contextmanager
def discard_unused_run_dirs() -> Iterator[None]:
    """Inside: a run's work. An exception before the run wrote anything but its config into a
    run directory :func:`make_run_dir` created inside this block removes that directory again
    (no empty ``runs/train/exp7`` left behind by a run that could not start)."""
    before = set(_CREATED)
    try:
        yield
    except BaseException:
        for run in set(_CREATED) - before:
            remove_if_unused(run)
        raise
