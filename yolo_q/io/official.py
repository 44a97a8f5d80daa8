"""Official YOLOv6 checkpoints read without running pickled code (restricted unpickler), and
the function-changing module attributes they carry (BN eps, conv geometry, activations, head)."""
from __future__ import annotations

import collections
import math
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError, PathLike

# --------------------------------------------------------------------------------------------
# Official YOLOv6 checkpoints: pickled nn.Module trees of ``yolov6.*`` classes (usually fp16).
# They are read WITHOUT importing the official code and without running pickled code: a
# restricted unpickler maps every module class to an inert container that only stores its state,
# allows the few torch/collections functions that rebuild tensors, rebuilds numeric numpy scalars
# and arrays (the trainer's ``results``) from their bytes, and refuses everything else. The
# function-changing module attributes (BN eps, conv geometry, activations, head settings) are
# read from the inert tree: :func:`official_settings` gives the config values they imply and
# :func:`check_official_function` refuses a model that would compute something else.
# --------------------------------------------------------------------------------------------


class _InertModule:
    """Placeholder for a pickled module of an allowed class: keeps its ``__dict__``, runs nothing."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):  # REDUCE-style construction: ignore arguments
        self.__dict__["_state"] = {}

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, dict) else {}


class _MethodRef:
    """A pickled bound method of an inert module (the official ``fuse_model`` stores
    ``forward = forward_fuse``): only its name is kept."""

    def __init__(self, name: str):
        self.name = name


def _inert_getattr(obj, name):
    if isinstance(obj, _InertModule) and isinstance(name, str) and name.isidentifier():
        return _MethodRef(name)
    raise pickle.UnpicklingError(f"refused global 'builtins.getattr' on {type(obj).__name__}")


_NUMERIC_KINDS = "biufc"  # bool, signed/unsigned int, float, complex: data, never code


class _NumpyDType:
    """``numpy.dtype(name)`` of a numeric type; the pickled BUILD state only sets the byte order."""

    def __init__(self, name, align=False, copy=True):
        try:
            dt = np.dtype(name) if isinstance(name, str) and len(name) <= 8 else None
        except TypeError:
            dt = None
        if dt is None or dt.kind not in _NUMERIC_KINDS or dt.fields or dt.subdtype:
            raise pickle.UnpicklingError(f"refused numpy dtype {name!r} (only numeric dtypes)")
        self.dtype = dt

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "="
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


def _numpy_buffer(dtype, data, count: int) -> np.ndarray:
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("refused numpy data that is not a numeric buffer")
    if len(data) != count * dtype.dtype.itemsize:
        raise pickle.UnpicklingError("refused numpy data of the wrong size")
    return np.frombuffer(bytes(data), dtype=dtype.dtype, count=count).copy()


def _numpy_scalar(dtype, data=None):
    """``numpy._core.multiarray.scalar``: a numeric scalar from its bytes -> a Python number."""
    return _numpy_buffer(dtype, data, 1)[0].item()


class _NumpyArray:
    """``numpy._core.multiarray._reconstruct(ndarray, ...)`` + BUILD: a numeric array from bytes."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("refused numpy array state")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError("refused numpy array shape")
        count = math.prod(shape)
        self.array = _numpy_buffer(dtype, data, count).reshape(shape, order="F" if fortran else "C")


class _NDArrayClass:  # stands for the global ``numpy.ndarray`` (only a _reconstruct argument)
    pass


def _numpy_reconstruct(cls, shape=None, typecode=None):
    if cls is not _NDArrayClass:
        raise pickle.UnpicklingError("refused numpy _reconstruct of a non-ndarray class")
    return _NumpyArray()


def _numpy_frombuffer(data, dtype, shape, order="C"):
    if isinstance(dtype, _NumpyDType) and isinstance(shape, tuple) and \
            all(isinstance(n, int) and n >= 0 for n in shape) and order in ("C", "F"):
        data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        return _numpy_buffer(dtype, data, math.prod(shape)).reshape(shape, order=order)
    raise pickle.UnpicklingError("refused numpy _frombuffer arguments")


def _empty_bytes(*args):
    """``bytes()``: protocol 2 pickles an empty bytes object (e.g. of an empty array) so."""
    if args:
        raise pickle.UnpicklingError("refused global 'builtins.bytes' with arguments")
    return b""


def _codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as protocol-2 pickles use it for raw bytes: ``(str, 'latin1')`` only."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    raise pickle.UnpicklingError("refused global '_codecs.encode' (only latin1 text)")


_STUBS: Dict[str, type] = {}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "getattr"): _inert_getattr, ("__builtin__", "getattr"): _inert_getattr,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _empty_bytes, ("__builtin__", "bytes"): _empty_bytes,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy", "ndarray"): _NDArrayClass,
}
for _np_mod in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 / numpy 1 names
    _SAFE_GLOBALS[(_np_mod, "scalar")] = _numpy_scalar
    _SAFE_GLOBALS[(_np_mod, "_reconstruct")] = _numpy_reconstruct
for _np_mod in ("numpy._core.numeric", "numpy.core.numeric"):  # pickle protocol 5 arrays
    _SAFE_GLOBALS[(_np_mod, "_frombuffer")] = _numpy_frombuffer
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


def _plain(obj):
    """Numpy placeholders -> arrays, recursively through dicts, lists and tuples."""
    if isinstance(obj, _NumpyArray):
        return obj.array
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


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


@dataclass
class OfficialCheckpoint:
    """What an official checkpoint holds for yolo_q: the float32 state dict (training branches
    dropped), the inert module tree (for its attributes) and plain metadata (``epoch``,
    ``results``...; optimizer and scheduler state are dropped)."""
    state_dict: Dict[str, torch.Tensor]
    tree: Any
    meta: Dict[str, Any] = field(default_factory=dict)


def read_official(path: PathLike, prefer: str = "ema") -> OfficialCheckpoint:
    """Read an official YOLOv6 checkpoint (``ema`` if present, else ``model``)."""
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
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()
          if not k.startswith(OFFICIAL_EXTRA_PREFIXES)}
    meta = {k: _plain(v) for k, v in obj.items()
            if k in ("epoch", "results", "updates") and not isinstance(v, _InertModule)}
    return OfficialCheckpoint(sd, mod, meta)


def read_official_checkpoint(path: PathLike, prefer: str = "ema") -> Dict[str, torch.Tensor]:
    """Extract the float32 state dict of an official YOLOv6 checkpoint (``ema`` if present,
    else ``model``), dropping the anchor-aided/distillation training branches."""
    return read_official(path, prefer).state_dict


def _inert_modules(mod: _InertModule, prefix: str = ""):
    """``(path, inert module)`` pairs, pre-order, like ``nn.Module.named_modules``."""
    yield prefix, mod
    for k, child in (mod._state.get("_modules") or {}).items():
        if isinstance(child, _InertModule):
            yield from _inert_modules(child, f"{prefix}.{k}" if prefix else k)


def _kind(mod: _InertModule) -> str:
    return mod._qualname.rsplit(".", 1)[-1]


def _attr(mod: _InertModule, name: str, default=None):
    st = mod._state
    for d in (st, st.get("_buffers") or {}, st.get("_parameters") or {}):
        if name in d:
            return d[name]
    return default


def official_settings(tree: _InertModule, source: str = "checkpoint") -> Dict[str, Any]:
    """Config values (``model.*`` keys) that the official modules' attributes imply: BN eps and
    momentum (one value for the whole model), the head's ``use_dfl`` / ``reg_max``."""
    out: Dict[str, Any] = {}
    for attr, key in (("eps", "bn_eps"), ("momentum", "bn_momentum")):
        seen: Dict[Any, str] = {}
        for path, m in _inert_modules(tree):
            if _kind(m) == "BatchNorm2d":
                seen.setdefault(_attr(m, attr), path)
        if len(seen) > 1:
            (v1, p1), (v2, p2) = list(seen.items())[:2]
            raise CheckpointError(f"{source}: BatchNorm {attr} differs between layers ({v1} at "
                                  f"{p1}, {v2} at {p2}); yolo_q uses one model.{key}")
        if seen:
            value = next(iter(seen))
            if value is not None:
                out[key] = float(value)
    detect = (tree._state.get("_modules") or {}).get("detect")
    if isinstance(detect, _InertModule):
        for attr in ("use_dfl", "reg_max"):
            if _attr(detect, attr) is not None:
                out[f"head.{attr}"] = _attr(detect, attr)
    return out


# official module kind -> (yolo_q module type, the attributes that change its function)
_LEAF_ATTRS = {
    "Conv2d": (nn.Conv2d, ("kernel_size", "stride", "padding", "dilation", "groups",
                           "padding_mode")),
    "ConvTranspose2d": (nn.ConvTranspose2d, ("kernel_size", "stride", "padding", "dilation",
                                             "groups", "padding_mode", "output_padding")),
    "BatchNorm2d": (nn.BatchNorm2d, ("eps", "affine", "track_running_stats")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
}
_ACTIVATIONS = {"ReLU": "relu", "SiLU": "silu", "Identity": "identity"}  # also yolov6's own SiLU
_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a = tuple(a) if isinstance(a, (list, tuple)) else (a,)
        b = tuple(b) if isinstance(b, (list, tuple)) else (b,)
        if len(a) != len(b):
            a, b = (a * len(b) if len(a) == 1 else a), (b * len(a) if len(b) == 1 else b)
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
    return a == b


def _act_name(m) -> Optional[str]:
    if isinstance(m, _InertModule):
        return _ACTIVATIONS.get(_kind(m))
    for cls, name in ((nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.Identity, "identity")):
        if type(m) is cls:
            return name
    return None


def _check_detect(path: str, off: _InertModule, ours, err) -> None:
    stride = _attr(off, "stride")
    values = {"nc": _attr(off, "nc"), "use_dfl": _attr(off, "use_dfl"),
              "reg_max": _attr(off, "reg_max"), "grid_cell_offset": _attr(off, "grid_cell_offset"),
              "strides": [float(s) for s in stride.tolist()] if isinstance(stride, torch.Tensor)
              else None}
    mine = {"nc": ours.nc, "use_dfl": ours.use_dfl, "reg_max": ours.reg_max,
            "grid_cell_offset": ours.grid_cell_offset, "strides": [float(s) for s in ours.strides]}
    for k, v in values.items():
        if v is not None and not _same(v, mine[k]):
            err(f"{path}.{k}" if k != "strides" else f"{path}.stride", v, mine[k])


def check_official_function(tree: _InertModule, model: nn.Module, source: str = "checkpoint"):
    """Refuse (one line naming the attribute) when ``model`` would compute something other than
    the official module tree ``tree``: conv geometry, BN eps/affine, pooling, activation types,
    the head's class count, DFL, strides and grid offset. Weights are checked by the strict
    state-dict load; training-only branches (anchor-aided, distillation) are skipped."""
    ours = dict(model.named_modules())

    def err(name, official, mine):
        raise CheckpointError(f"{source}: cannot honour official {name} = {official!r} "
                              f"(yolo_q's model has {mine!r})")

    for path, off in _inert_modules(tree):
        if path and (path + ".").startswith(OFFICIAL_EXTRA_PREFIXES):
            continue
        kind, mine = _kind(off), ours.get(path)
        if kind in _LEAF_ATTRS:
            cls, attrs = _LEAF_ATTRS[kind]
            if not isinstance(mine, cls):
                err(path, kind, type(mine).__name__ if mine is not None else None)
            for a in attrs:
                if not _same(_attr(off, a), getattr(mine, a)):
                    err(f"{path}.{a}", _attr(off, a), getattr(mine, a))
        elif kind in _ACTIVATIONS or off._qualname.startswith("torch.nn.modules.activation."):
            if mine is None and _ACTIVATIONS.get(kind) == "identity":
                continue  # e.g. RepVGGBlock.se = Identity(): yolo_q has no module there
            if _ACTIVATIONS.get(kind) != _act_name(mine):
                err(f"{path} activation", kind, type(mine).__name__ if mine is not None else None)
        elif kind == "Detect" and hasattr(mine, "use_dfl"):
            _check_detect(path, off, mine, err)
        elif kind == "ConvModule" and "act" not in (off._state.get("_modules") or {}):
            act = getattr(mine, "act", None)  # official activation_type=None: no act module
            if _act_name(act) != "identity":
                err(f"{path}.activation_type", None, type(act).__name__)
        elif kind == "BottleRep" and not _same(_attr(off, "shortcut"), getattr(mine, "shortcut", None)):
            err(f"{path}.shortcut", _attr(off, "shortcut"), getattr(mine, "shortcut", None))
        elif off._qualname.startswith("torch.nn.modules.") and kind not in _CONTAINERS:
            err(f"{path} module", kind, type(mine).__name__ if mine is not None else None)
