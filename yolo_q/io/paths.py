"""Output locations checked before any work starts: one line naming the path, nothing created.

``check_output_file`` / ``check_output_dir`` refuse a location that cannot take the output (a
read-only place, a parent that is a regular file, a directory where a file is expected, a file
where a directory is expected) or that is one of the run's inputs (resolved paths, so symlinks
and ``./x`` spellings are caught; hard links by ``os.path.samefile``). Writability is probed
with a temporary file in the nearest existing folder, removed at once (root-proof: permission
bits do not stop root, a read-only mount or ``/proc`` does)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

PathLike = Union[str, os.PathLike]

__all__ = ["OutputPathError", "check_output_dir", "check_output_file", "first_missing",
           "make_output_dir", "same_path"]


class OutputPathError(OSError):
    """An output location cannot be used; the message names the path."""

    user_facing = True  # tools print the message as one line (yolo_q.cli.run_tool)


def same_path(a: PathLike, b: PathLike) -> bool:
    """``a`` and ``b`` name the same file: equal after resolving symlinks, or hard links."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.resolve() == pb.resolve():
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` (absolute) that exists (or is a dangling link)."""
    p = path.absolute().parent
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, what: str, anc: Optional[Path] = None) -> None:
    """The folders above ``path`` are folders, and the nearest existing one (``anc``) takes
    files."""
    anc = anc or _existing_ancestor(path)
    if not anc.is_dir():
        raise OutputPathError(f"{path}: the {what} is not writable: {anc} is a regular "
                              f"file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{path}: the {what} is not writable: {anc} does not take "
                              f"files ({e.strerror or e})") from None


def _check_not_input(path: Path, inputs: Iterable, what: str) -> None:
    for inp in inputs:
        if inp is not None and not hasattr(inp, "state_dict") and same_path(path, inp):
            raise OutputPathError(f"{path}: the {what} would overwrite the input {inp}; "
                                  f"choose another output path")


def check_output_file(path: PathLike, inputs: Iterable = (), what: str = "output file") -> Path:
    """``path`` can be written as a file and is none of ``inputs``; creates nothing."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputPathError(f"{p}: the {what} is an existing directory; give a file path")
    if p.exists() and not p.is_file():
        raise OutputPathError(f"{p}: the {what} exists and is not a regular file")
    _check_not_input(p, inputs, what)
    _check_parent(p, what)
    if p.is_file() and not os.access(p, os.W_OK):
        raise OutputPathError(f"{p}: the {what} exists and is read-only")
    return p


def check_output_dir(path: PathLike, inputs: Iterable = (), what: str = "output directory",
                     min_free: int = 0, same_names: Iterable = ()) -> Path:
    """``path`` is (or can become) a writable directory and is none of ``inputs``; creates
    nothing. ``same_names``: input files whose names the outputs reuse (e.g. drawn images), so
    ``path`` must not be the folder holding them. ``min_free``: bytes the disk must have free."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{p}: the {what} is an existing file, not a directory")
    _check_not_input(p, inputs, what)
    for inp in same_names:
        if same_path(p, Path(inp).expanduser().absolute().parent):
            raise OutputPathError(f"{p}: the {what} holds the input {inp}, which the output of "
                                  f"the same name would overwrite; choose another directory")
    _check_parent(p, what, p if p.is_dir() else None)
    if min_free:
        free = shutil.disk_usage(p if p.is_dir() else _existing_ancestor(p)).free
        if free < min_free:
            raise OutputPathError(f"{p}: only {free / 2**20:.1f} MiB free; need at least "
                                  f"{min_free / 2**20:.0f} MiB for the {what}")
    return p


def make_output_dir(path: PathLike, inputs: Iterable = (), what: str = "output directory",
                    min_free: int = 0, same_names: Iterable = ()) -> Path:
    """:func:`check_output_dir`, then create it (parents included)."""
    p = check_output_dir(path, inputs, what, min_free, same_names)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{p}: cannot create the {what} ({e.strerror or e})") from None
    return p


def first_missing(path: PathLike) -> Optional[Path]:
    """The top-most folder of ``path`` that does not exist yet (what ``mkdir -p`` would create
    first), or None when ``path`` exists."""
    p = Path(path).absolute()
    if p.exists():
        return None
    while not p.parent.exists() and p.parent != p:
        p = p.parent
    return p
