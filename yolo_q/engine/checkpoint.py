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


# --------------------------------------------------------------------------------------------
# Official YOLOv6 checkpoints: pickled nn.Module trees of ``yolov6.*`` classes (usually fp16).
# They are read WITHOUT importing the official code and without running pickled code: a
# restricted unpickler maps every module class to an inert container that only stores its state,
# allows the few torch/collections functions that rebuild tensors, and refuses everything else.
# --------------------------------------------------------------------------------------------
import collections  # noqa: E402
import pickle  # noqa: E402
import types  # noqa: E402


class _InertModule:
    """Placeholder for a pickled module of an allowed class: keeps its ``__dict__``, runs nothing."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):  # REDUCE-style construction: ignore arguments
        self.__dict__["_state"] = {}

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, dict) else {}


_STUBS: Dict[str, type] = {}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
}
_STUB_PREFIXES = ("yolov6.", "torch.nn.modules.")


def _stub(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STUBS:
        _STUBS[key] = type(name, (_InertModule,), {"_qualname": key})
    return _STUBS[key]


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name.endswith("Storage"):  # tensor storage types: data only
            return getattr(torch, name)
        if module.startswith(_STUB_PREFIXES) or module == "yolov6":
            return _stub(module, name)
        raise pickle.UnpicklingError(f"refused global '{module}.{name}' (not on the allow-list)")


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


_restricted_pickle = types.ModuleType("yolo_q_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
# torch.load also calls ``pickle_module.load`` (legacy, non-zip files: magic number, sys info,
# storages); a plain ``pickle.load`` there would run any pickled code, so it is restricted too
_restricted_pickle.load = _restricted_load
_restricted_pickle.__name__ = "yolo_q_restricted_pickle"


def _inert_state_dict(mod: _InertModule, prefix: str = "") -> Dict[str, torch.Tensor]:
    st = mod._state
    out: Dict[str, torch.Tensor] = {}
    non_persistent = st.get("_non_persistent_buffers_set") or set()
    for k, v in (st.get("_parameters") or {}).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v.detach()
    for k, v in (st.get("_buffers") or {}).items():
        if isinstance(v, torch.Tensor) and k not in non_persistent:
            out[prefix + k] = v
    for k, child in (st.get("_modules") or {}).items():
        if isinstance(child, _InertModule):
            out.update(_inert_state_dict(child, f"{prefix}{k}."))
    return out


# training-only branches of the official model that the plain deploy model does not have
OFFICIAL_EXTRA_PREFIXES = ("detect.cls_preds_ab.", "detect.reg_preds_ab.", "detect.reg_preds_dist.")


def read_official_checkpoint(path: PathLike, prefer: str = "ema") -> Dict[str, torch.Tensor]:
    """Extract the float32 state dict of an official YOLOv6 checkpoint (``ema`` if present,
    else ``model``), dropping the anchor-aided/distillation training branches."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False,
                         pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, _InertModule):
        obj = {"model": obj}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict with 'model'/'ema', got {type(obj).__name__}")
    mod = None
    for key in (prefer, "model", "ema"):
        if isinstance(obj.get(key), _InertModule):
            mod = obj[key]
            break
    if mod is None:
        raise CheckpointError(f"{path}: no pickled model under 'ema' or 'model' "
                              f"(keys: {sorted(map(str, obj))})")
    sd = _inert_state_dict(mod)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()
            if not k.startswith(OFFICIAL_EXTRA_PREFIXES)}


def read_checkpoint_any(path: PathLike) -> Dict[str, Any]:
    """Read a yolo_q checkpoint, a plain state dict, or an official YOLOv6 checkpoint.

    Returns ``{"model": state_dict, "config": dict|None, "quant": dict|None, "source": str}``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_err:  # noqa: BLE001 - maybe an official (pickled-module) checkpoint
        sd = read_official_checkpoint(path)
        return {"model": sd, "config": None, "quant": None, "source": "official",
                "note": str(safe_err).splitlines()[0] if str(safe_err) else ""}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        sd = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) and ckpt.get("ema") else ckpt["model"]
        return {"model": sd, "config": ckpt.get("config"), "quant": ckpt.get("quant"),
                "source": "yolo_q"}
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt, "config": None, "quant": None, "source": "state_dict"}
    raise CheckpointError(f"{path}: unrecognised checkpoint layout "
                          f"(top-level keys: {sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__})")


def _is_deploy_form(sd: Dict[str, torch.Tensor]) -> bool:
    return not any(".bn." in k or k.endswith("rbr_identity.weight") for k in sd)


def infer_config(sd: Dict[str, torch.Tensor]):
    """Pick the yolov6 n/s/m/l config whose structure matches the state dict (nc from its shapes)."""
    from ..config import load_config
    from ..models import build_model
    nc = sd["detect.cls_preds.0.weight"].shape[0] if "detect.cls_preds.0.weight" in sd else 80
    deploy = _is_deploy_form(sd)
    for name in ("yolov6n", "yolov6s", "yolov6m", "yolov6l"):
        cfg = load_config(f"configs/{name}.yaml", [f"model.nc={nc}"])
        stem_key = "backbone.stem.rbr_reparam.weight" if deploy else "backbone.stem.rbr_dense.conv.weight"
        if stem_key not in sd and "backbone.stem.block.conv.weight" in sd:
            stem_key = "backbone.stem.block.conv.weight"
        model = build_model(cfg)
        if deploy:
            model.fuse()
        ref = model.state_dict()
        if stem_key in sd and ref.get(stem_key, torch.empty(0)).shape != sd[stem_key].shape:
            continue
        if set(ref) == set(sd) and all(ref[k].shape == sd[k].shape for k in ref):
            return cfg
    raise CheckpointError("weights match none of configs/yolov6{n,s,m,l}.yaml; pass the config "
                          "(--config / cfg=) that built them")


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


def load_model(weights: PathLike, cfg=None, device="cpu", fuse: bool = False):
    """yolo_q / official / plain-state-dict checkpoint -> model in eval mode.

    The config comes from ``cfg`` if given, else from the checkpoint, else it is inferred from the
    weights' shapes (official checkpoints). Deploy-form (fused) weights load into a fused model.
    Quantized checkpoints are rebuilt by :func:`yolo_q.quant.load_quantized` when available.
    """
    from ..config import config_from_dict
    from ..models import build_model
    ck = read_checkpoint_any(weights)
    sd = ck["model"]
    if cfg is None:
        cfg = config_from_dict(ck["config"]) if ck.get("config") else infer_config(sd)
    if ck.get("quant"):
        from ..quant import load_quantized  # quantization lives in yolo_q.quant
        model = load_quantized(cfg, sd, ck["quant"])
    else:
        model = build_model(cfg)
        if _is_deploy_form(sd):
            model.fuse()
        load_state_into(model, sd, str(weights))
        if fuse:
            model.fuse()
    model.yolo_q_config = cfg
    return model.to(device).eval()
