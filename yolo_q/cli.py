"""Shared command-line plumbing for tools/*.py: ``--config``, dot-list overrides, ``--weights``,
and :func:`run_tool`, the one place that turns an expected failure into one line on stderr."""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Optional, Sequence

from .config import ConfigError, resolve_config
from .io import CheckpointError

# an error raised by (or caused by) these runtimes means the model file could not be used
RUNTIME_PACKAGES = ("onnxruntime", "openvino", "tensorrt", "onnx", "google")
OPENVINO_TRACE = ("Exception from src/",)  # how OpenVINO's RuntimeError messages begin
EXPECTED = (ConfigError, CheckpointError, OSError, ValueError, KeyError)
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 1, 130


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", "-c", required=required, help="experiment YAML (configs/...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dot-list config overrides, e.g. train.epochs=3 model.width_multiple=0.25")


def config_from_args(args: argparse.Namespace):
    """``--config`` + overrides, else the config stored in ``--weights``, else the defaults
    (:func:`yolo_q.config.resolve_config`)."""
    return resolve_config(args.config, args.overrides, getattr(args, "weights", None))


def _chain(e: BaseException, hidden: bool = False):
    """``e`` and what caused it (``hidden``: also contexts hidden by ``raise ... from None``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ and not hidden else e.__context__)


def _missing_package(e: BaseException) -> bool:
    """An optional third-party package is not installed (also when our code re-raised it as
    ``RuntimeError("... pip install ...") from None``)."""
    return any(isinstance(c, ModuleNotFoundError) and c.name and
               c.name.split(".")[0] != "yolo_q" for c in _chain(e, hidden=True))


def _raised_in_runtime(e: BaseException) -> bool:
    """``e`` is a runtime library's own exception type, or a plain ``RuntimeError`` raised from
    its code (OpenVINO raises ``RuntimeError("Exception from src/...")``); a ``TypeError`` etc.
    from inside a runtime stays a bug (ours: a wrong call)."""
    if (type(e).__module__ or "").split(".")[0] in RUNTIME_PACKAGES:
        return True
    if type(e) is not RuntimeError:
        return False
    if str(e).startswith(OPENVINO_TRACE):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    frame_mod = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return frame_mod.split(".")[0] in RUNTIME_PACKAGES


def is_expected(e: BaseException) -> bool:
    """A failure the user can fix (bad file, path, key, value, missing package or a model file
    a runtime cannot load), as opposed to a bug."""
    if isinstance(e, EXPECTED) or getattr(e, "user_facing", False):
        return True
    return _missing_package(e) or any(_raised_in_runtime(c) for c in _chain(e))


def one_line(e: BaseException) -> str:
    """The message of an expected failure on one line, naming the file when the error has one."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{where}: {e.strerror}"
    if isinstance(e, ModuleNotFoundError) and e.name:
        return f"{e} (install it: pip install {e.name.split('.')[0]})"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        # re-raised from a DataLoader worker: the message is the worker's traceback, whose last
        # line is "<module>.<Type>: <message>"
        head, sep, msg = lines[-1].partition(": ")
        if sep and head.rsplit(".", 1)[-1] == type(e).__name__:
            lines = [msg]
    if lines and lines[0].startswith(OPENVINO_TRACE):  # C++ source locations, then the message
        lines = [" ".join(ln for ln in lines if not ln.startswith(OPENVINO_TRACE + ("Check '",)))]
    return lines[0] if lines and lines[0] else type(e).__name__


def run_tool(main, argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's ``main(argv)``. Expected failures (:func:`is_expected`): one line
    ``error: ...`` on stderr, exit 2. Anything else is a bug: the traceback, then
    ``internal error (please report ...)``, exit 1. Ctrl-C: ``interrupted``, exit 130."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place that sorts failures
        if is_expected(e):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"internal error (please report it with the command and the traceback above): "
              f"{type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
