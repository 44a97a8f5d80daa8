"""Read any weights file: a yolo_q checkpoint, a plain state dict or an official YOLOv6 one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from .checkpoint import CheckpointError, PathLike, check_checkpoint_file, describe_load_error
from .official import OfficialCheckpoint, read_official


def read_checkpoint_any(path: PathLike) -> Dict[str, Any]:
    """Read a yolo_q checkpoint, a plain state dict, or an official YOLOv6 checkpoint.

    Returns ``{"model": state_dict, "config": dict|None, "quant": dict|None, "source": str}``
    (plus ``"official"``: the :class:`~yolo_q.io.official.OfficialCheckpoint` for official ones).
    """
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_err:  # noqa: BLE001 - maybe an official (pickled-module) checkpoint
        off = _read_official(path)
        return {"model": off.state_dict, "config": None, "quant": None, "source": "official",
                "official": off, "note": str(safe_err).splitlines()[0] if str(safe_err) else ""}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        sd = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) and ckpt.get("ema") else ckpt["model"]
        return {"model": sd, "config": ckpt.get("config"), "quant": ckpt.get("quant"),
                "source": "yolo_q"}
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt, "config": None, "quant": None, "source": "state_dict"}
    raise CheckpointError(f"{path}: unrecognised checkpoint layout "
                          f"(top-level keys: {sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__})")


def _read_official(path: Path) -> OfficialCheckpoint:
    """The restricted reader; a refused global is explained in our words."""
    try:
        return read_official(path)
    except CheckpointError as e:
        if "refused global" in str(e):
            raise CheckpointError(describe_load_error(path, e)) from None
        raise


def is_deploy_form(sd: Dict[str, torch.Tensor]) -> bool:
    return not any(".bn." in k or k.endswith("rbr_identity.weight") for k in sd)
