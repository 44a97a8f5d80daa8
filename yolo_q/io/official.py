"""Official YOLOv6 checkpoints read without running pickled code (restricted unpickler)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from .checkpoint import CheckpointError, PathLike

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
