"""Safe loading: every load in the code base is ``torch.load(weights_only=True)`` or the restricted
unpickler (checked on the source), and a checkpoint carrying a malicious ``__reduce__`` is refused
by every loading entry point without running it (a marker file the payload would create stays
absent; a control load with plain pickle shows the payload is live)."""
import ast
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reliability_utils import REPO, run_tool, tiny_cfg, tiny_dataset
from yolo_q import load_model
from yolo_q.io import (CheckpointError, load_checkpoint, read_checkpoint_any,
                       read_official_checkpoint)
from yolo_q.io.official import _restricted_pickle

# ----------------------------------------------------------------------------- static check
SCANNED = ("yolo_q", "tools", "deploy", "datasets", "benchmarks")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal",
                  "shelve"}
PICKLE_FUNCS = {"load", "loads", "Unpickler", "open"}
UNSAFE_YAML = {"unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _name(node) -> str:
    """Dotted name of a Name/Attribute chain (``torch.serialization.load``), else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_loads(source: str, filename: str = "<src>"):
    """``file:line: what`` for each load that could unpickle arbitrary objects."""
    tree = ast.parse(source, filename)
    found = []
    aliases = {}  # local name -> dotted origin (import torch as t; from torch import load)
    restricted_bases = set()  # pickle.Unpickler used as the base of a class with find_class
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if node.module.split(".")[0] in PICKLE_MODULES and a.name in PICKLE_FUNCS:
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
        elif isinstance(node, ast.ClassDef):
            if any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body):
                restricted_bases.update(id(b) for b in node.bases)

    def full(node) -> str:
        n = _name(node)
        head, _, rest = n.partition(".")
        return (aliases.get(head, head) + ("." + rest if rest else "")) if n else ""

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in restricted_bases:
            mod, _, attr = full(node).rpartition(".")
            if mod.split(".")[0] in PICKLE_MODULES and attr in PICKLE_FUNCS:
                found.append(f"{filename}:{node.lineno}: {full(node)}")
        if not isinstance(node, ast.Call):
            continue
        fn = full(node.func)
        if fn in ("torch.load", "torch.serialization.load"):
            wo, pm = _kw(node, "weights_only"), _kw(node, "pickle_module")
            safe = (isinstance(wo, ast.Constant) and wo.value is True) or \
                (pm is not None and _name(pm).split(".")[-1] == "_restricted_pickle")
            if not safe:
                found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True "
                             f"or the restricted pickle module")
        elif fn in ("numpy.load", "np.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(f"{filename}:{node.lineno}: numpy.load(allow_pickle=...)")
        elif fn.startswith("yaml."):
            attr = fn.split(".")[-1]
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if attr in UNSAFE_YAML or (attr == "load" and (
                    loader is None or _name(loader).split(".")[-1] not in SAFE_YAML_LOADERS)):
                found.append(f"{filename}:{node.lineno}: {fn} (not a safe loader)")
    return found


def test_static_checker_finds_unsafe_loads():
    bad = """
import pickle, torch, yaml
import numpy as np
from torch import load as tl
torch.load(p)
torch.load(p, weights_only=False)
tl(p, map_location="cpu")
m.load = pickle.load
obj = pickle.loads(b)
np.load(p, allow_pickle=True)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
"""
    good = """
import pickle, torch, yaml
import numpy as np
class R(pickle.Unpickler):
    def find_class(self, m, n): raise pickle.UnpicklingError(n)
torch.load(p, map_location="cpu", weights_only=True)
torch.load(p, weights_only=False, pickle_module=_restricted_pickle)
np.load(p, allow_pickle=False)
yaml.safe_load(text); yaml.load(text, Loader=yaml.SafeLoader)
"""
    lines = sorted(int(f.split(":")[1]) for f in unsafe_loads(bad))
    assert lines == [5, 6, 7, 8, 9, 10, 11, 12], unsafe_loads(bad)
    assert unsafe_loads(good) == []


def test_every_load_in_the_code_base_is_safe():
    files = [p for d in SCANNED if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30 and any(p.name == "checkpoint.py" for p in files)
    found = [f for p in files for f in unsafe_loads(p.read_text(encoding="utf-8"),
                                                    str(p.relative_to(REPO)))]
    assert found == [], "\n".join(found)


# ----------------------------------------------------------------------------- payloads
class _Payload:
    """Unpickling this runs code that creates ``marker`` (via ``exec`` or ``os.system``)."""

    def __init__(self, marker, how="exec"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch '{self.marker}'",))
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write(kind: str, path: Path, marker: Path) -> Path:
    if kind == "zip":  # torch's current format, payload where a state dict would be
        torch.save({"model": _Payload(marker), "epoch": 1}, path)
    elif kind == "zip_module":  # official-checkpoint shape: a pickled object under 'model'
        torch.save({"model": _Payload(marker, "system")}, path)
    elif kind == "legacy":  # torch < 1.6 format
        torch.save({"model": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif kind == "raw":  # a bare pickle: torch.load's legacy reader unpickles it first thing
        with open(path, "wb") as f:
            pickle.dump(_Payload(marker, "system"), f, protocol=2)
    elif kind == "raw_p0":
        with open(path, "wb") as f:
            pickle.dump({"model": _Payload(marker)}, f, protocol=0)
    return path


KINDS = ("zip", "zip_module", "legacy", "raw", "raw_p0")


@pytest.fixture(params=KINDS)
def evil(request, tmp_path):
    """(checkpoint path, marker): the payload is proven live by an unrestricted load."""
    marker = tmp_path / "PWNED"
    path = _write(request.param, tmp_path / f"evil_{request.param}.pt", marker)
    if request.param.startswith("raw"):
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists(), "control: the payload should run under a plain unpickler"
    marker.unlink()
    return path, marker


def _tiny_trainer(tmp_path):
    from yolo_q.engine import Trainer
    from yolo_q.models import build_model
    from yolo_q.optim import build_optimizer
    cfg = tiny_cfg(tmp_path / "no_data.yaml", tmp_path / "runs")
    model = build_model(cfg)
    return Trainer(model, build_optimizer(model, cfg), [None], lambda *a: None, cfg)


def _entry_points(tmp_path):
    from yolo_q.config import resolve_config
    from yolo_q.optim.repopt import ScalesError, load_scales
    return {
        "load_checkpoint": (load_checkpoint, CheckpointError),
        "read_checkpoint_any": (read_checkpoint_any, CheckpointError),
        "read_official_checkpoint": (read_official_checkpoint, CheckpointError),
        "load_model": (load_model, CheckpointError),
        "Trainer.resume": (_tiny_trainer(tmp_path).resume, CheckpointError),
        "load_scales": (load_scales, ScalesError),
        "eval config_for": (lambda p: resolve_config(None, (), str(p)), CheckpointError),
    }


def test_malicious_checkpoint_refused_by_every_entry_point(evil, tmp_path):
    path, marker = evil
    for name, (load, error) in _entry_points(tmp_path).items():
        with pytest.raises(error) as e:
            load(path)
        assert str(path) in str(e.value), (name, str(e.value))
        assert not marker.exists(), f"{name} ran the pickled payload"


def test_malicious_checkpoint_refused_by_train(tmp_path):
    """train(weights=...) and train(resume=...) (tools/train.py --weights / --resume)."""
    from yolo_q.training import train
    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    cfg = tiny_cfg(data, tmp_path / "runs")
    (tmp_path / "ckpt").mkdir()
    for kind in ("raw", "zip"):
        marker = tmp_path / f"PWNED_{kind}"
        path = _write(kind, tmp_path / "ckpt" / f"{kind}.pt", marker)
        for kw in ({"weights": str(path)}, {"resume": str(path)}):
            with pytest.raises(CheckpointError, match=str(path)):
                train(cfg, verbose=False, **kw)
            assert not marker.exists(), (kind, kw)


@pytest.mark.parametrize("tool", ["eval.py", "convert.py"])
def test_malicious_checkpoint_refused_by_tools(tmp_path, tool):
    marker = tmp_path / "PWNED"
    path = _write("raw", tmp_path / "evil.pt", marker)
    args = ["--weights", path] if tool == "eval.py" else [path, tmp_path / "out.pt"]
    r = run_tool(tool, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and str(path) in r.stderr
    assert "refused global" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_restricted_pickle_module_load_is_restricted_too(tmp_path):
    """torch.load(pickle_module=...) calls its ``load`` directly for legacy files; it used to be
    plain ``pickle.load`` (a bare pickle ran its payload through read_checkpoint_any)."""
    marker = tmp_path / "PWNED"
    path = _write("raw", tmp_path / "evil.pt", marker)
    with open(path, "rb") as f, pytest.raises(pickle.UnpicklingError, match="posix.system"):
        _restricted_pickle.load(f)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_restricted_loader_still_reads_legacy_official_checkpoints(tmp_path):
    """The official trainer's pickled-module checkpoints, also in torch's legacy format."""
    names = ["yolov6", "yolov6.models", "yolov6.models.yolo"]
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    try:
        Model = type("Model", (nn.Module,), {"__module__": "yolov6.models.yolo",
                                             "__qualname__": "Model"})
        sys.modules["yolov6.models.yolo"].Model = Model
        m = Model()
        m.stem = nn.Conv2d(3, 4, 3)
        m.register_buffer("scale", torch.tensor([2.0]))
        for legacy in (False, True):
            p = tmp_path / f"official_{legacy}.pt"
            torch.save({"model": m.half(), "epoch": 3}, p, _use_new_zipfile_serialization=not legacy)
            sd = read_official_checkpoint(p)
            assert sorted(sd) == ["scale", "stem.bias", "stem.weight"]
            assert torch.equal(sd["stem.weight"], m.stem.weight.float())
    finally:
        for n in names:
            sys.modules.pop(n, None)
