"""Shared command-line plumbing for tools/*.py: ``--config``, dot-list overrides, ``--weights``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .config import ConfigError, resolve_config
from .io import CheckpointError


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", "-c", required=required, help="experiment YAML (configs/...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dot-list config overrides, e.g. train.epochs=3 model.width_multiple=0.25")


def config_from_args(args: argparse.Namespace):
    """``--config`` + overrides, else the config stored in ``--weights``, else the defaults
    (:func:`yolo_q.config.resolve_config`)."""
    return resolve_config(args.config, args.overrides, getattr(args, "weights", None))


def run_tool(main, argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's ``main(argv)``, turning expected user errors into one line on stderr + exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(argv) or 0
    except Exception as e:  # noqa: BLE001
        expected = (ConfigError, CheckpointError, FileNotFoundError, ValueError, KeyError)
        if not (isinstance(e, expected) or getattr(e, "user_facing", False)):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
