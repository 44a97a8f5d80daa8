"""Which TensorRT Python API our code uses, read from the code itself, and a check of it against
an installed ``tensorrt`` module (real bindings; no GPU needed, the bindings only have to import).

Collected by ``ast`` from :data:`SCANNED` (files, or ``file::Name`` for one class), so the list cannot drift from the code:

* every ``trt.<A>.<B>...`` chain (module functions, classes, enum members) and its call arguments;
* every attribute / method call on a variable (or ``self.<name>``) whose name is a key of
  :data:`TRT_OBJECTS` - the naming rule for TensorRT objects in these files;
* every assignment of a call result: when the bindings say the call returns a TensorRT class, the
  target must be named for that class in :data:`TRT_OBJECTS` (otherwise its uses would go
  unchecked).

``python deploy/trt_api.py [--module tensorrt]`` prints the problems (exit 1) or ``ok``. The test
``tests/deploy/test_trt_api_conformance.py`` runs it against the newest TensorRT 10.x and 11.x
bindings wheels. Standard library only.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("deploy/trt.py", "deploy/gpu_check.py", "yolo_q/eval/backends.py::TrtBackend")
MODULE_ALIAS = "trt"  # ``import tensorrt as trt`` / ``trt = require_tensorrt()``

# variable / attribute name -> TensorRT class of the object it holds (the naming rule)
TRT_OBJECTS: Dict[str, str] = {
    "logger": "Logger", "builder": "Builder", "network": "INetworkDefinition",
    "parser": "OnnxParser", "config": "IBuilderConfig", "profile": "IOptimizationProfile",
    "timing_cache": "ITimingCache", "serialized": "IHostMemory", "inp": "ITensor",
    "layer": "ILayer", "runtime": "Runtime", "engine": "ICudaEngine",
    "context": "IExecutionContext", "parser_error": "ParserError",
}


@dataclass
class Use:
    where: str                 # file:line
    owner: str                 # "trt" (module) or a TensorRT class name
    chain: List[str]           # attribute path below the owner
    call: bool = False
    nargs: int = 0
    kwargs: List[str] = field(default_factory=list)
    starred: bool = False
    target: Optional[str] = None  # name the call result is assigned to

    def __str__(self):
        return f"{self.where}: {self.owner}.{'.'.join(self.chain)}"


def _chain(node) -> Optional[List[str]]:
    """``a.b.c`` -> ["a", "b", "c"]; ``self.a.b`` -> ["a", "b"]; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    parts.reverse()
    return parts[1:] if parts[0] == "self" and len(parts) > 1 else parts


def _owner(parts: List[str]):
    """(owner, chain below it) if ``parts`` starts at the module alias or a TensorRT object."""
    if len(parts) >= 2 and parts[0] == MODULE_ALIAS:
        return MODULE_ALIAS, parts[1:]
    if len(parts) >= 2 and parts[0] in TRT_OBJECTS:
        return TRT_OBJECTS[parts[0]], parts[1:]
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, where: str):
        self.where, self.uses = where, []
        self._in_call = set()

    def _add(self, node, owner, chain, **kw):
        self.uses.append(Use(f"{self.where}:{node.lineno}", owner, chain, **kw))

    def visit_Assign(self, node):
        if isinstance(node.value, ast.Call) and len(node.targets) == 1:
            t = _chain(node.targets[0])
            self._call(node.value, target=t[-1] if t else None)
            for a in node.value.args + [k.value for k in node.value.keywords]:
                self.visit(a)
            self.visit(node.value.func.value if isinstance(node.value.func, ast.Attribute)
                       else node.value.func)
            return
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            parts = _chain(node.args[0])
            o = _owner(parts) if parts else None
            if parts and o is None and parts[0] in (MODULE_ALIAS, *TRT_OBJECTS):
                o = (MODULE_ALIAS, []) if parts[0] == MODULE_ALIAS else (TRT_OBJECTS[parts[0]], [])
            if o and f.id == "getattr":  # hasattr() is a guard: the code handles both
                self._add(node, o[0], o[1] + [node.args[1].value])
        elif self._call(node):
            for a in node.args + [k.value for k in node.keywords]:
                self.visit(a)
            if isinstance(f, ast.Attribute):
                self.visit(f.value)
            return
        self.generic_visit(node)

    def _call(self, node, target=None) -> bool:
        parts = _chain(node.func) if isinstance(node.func, ast.Attribute) else None
        o = _owner(parts) if parts else None
        if not o:
            return False
        self._in_call.add(id(node.func))
        self._add(node, o[0], o[1], call=True, nargs=len(node.args),
                  kwargs=[k.arg for k in node.keywords if k.arg],
                  starred=any(isinstance(a, ast.Starred) for a in node.args)
                  or any(k.arg is None for k in node.keywords), target=target)
        return True

    def visit_Attribute(self, node):
        if id(node) in self._in_call:
            return
        parts = _chain(node)
        o = _owner(parts) if parts else None
        if o and isinstance(node.ctx, ast.Load):
            self._add(node, o[0], o[1])
            return
        self.generic_visit(node)


def collect_uses(paths: Sequence[str] = SCANNED, root: Path = ROOT) -> List[Use]:
    """Every TensorRT API use in ``paths`` (relative to ``root``; missing files are skipped)."""
    uses: List[Use] = []
    for entry in paths:
        rel, _, scope = entry.partition("::")  # "file::Name": only that class / function
        p = root / rel
        if not p.is_file():
            continue
        tree = ast.parse(p.read_text(), filename=str(p))
        nodes = [n for n in tree.body if getattr(n, "name", None) == scope] if scope else [tree]
        if scope and not nodes:
            raise ValueError(f"{rel}: no top-level '{scope}' to scan (update trt_api.SCANNED)")
        for node in nodes:
            c = _Collector(rel)
            c.visit(node)
            uses += c.uses
    return uses


# ------------------------------------------------------------------ signatures from pybind docs
def _split_params(s: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def signatures(obj, name: str) -> Optional[List[List[tuple]]]:
    """Overloads of a pybind11 callable as lists of (param name, has default), without ``self``;
    None when no signature can be read."""
    doc = getattr(obj, "__doc__", None) or ""
    sigs = re.findall(rf"^(?:\d+\.\s*)?{re.escape(name)}\((.*)\)\s*->", doc, re.M)
    sigs = [s for s in sigs if s not in ("*args, **kwargs",)] or sigs
    if not sigs:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return None
        return [[(p.name if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else
                  ("*" if p.kind == p.VAR_POSITIONAL else "**"), p.default is not p.empty)
                 for p in sig.parameters.values() if p.name != "self"]]
    out = []
    for s in sigs:
        params = []
        for p in _split_params(s):
            pname = p.split(":")[0].split("=")[0].strip()
            if pname == "self":
                continue
            params.append(("*" if pname.startswith("*") and not pname.startswith("**") else
                           "**" if pname.startswith("**") else pname, "=" in p))
        out.append(params)
    return out


def _fits(params, nargs: int, kwargs: Sequence[str]) -> bool:
    names = [n for n, _ in params if n not in ("*", "**")]
    if nargs > len(names) and "*" not in [n for n, _ in params]:
        return False
    given = set(names[:nargs]) | set(kwargs)
    if any(k not in names for k in kwargs) and "**" not in [n for n, _ in params]:
        return False
    return all(has_default or n in given for n, has_default in params if n not in ("*", "**"))


def _returns(obj, name: str) -> List[str]:
    doc = getattr(obj, "__doc__", None) or ""
    return re.findall(rf"^(?:\d+\.\s*)?{re.escape(name)}\(.*\)\s*->\s*([\w.]+)", doc, re.M)


def check(trt, uses: Sequence[Use]) -> List[str]:
    """Problems with ``uses`` against the module ``trt``: missing attributes / enum members,
    calls no overload accepts, TensorRT results stored under names of another class."""
    problems = []
    for u in uses:
        obj = trt if u.owner == MODULE_ALIAS else getattr(trt, u.owner, None)
        if obj is None:
            problems.append(f"{u}: tensorrt has no class {u.owner}")
            continue
        parent, ok = None, True
        for name in u.chain:
            if not hasattr(obj, name):
                problems.append(f"{u}: '{name}' does not exist in tensorrt {trt.__version__}")
                ok = False
                break
            parent, obj = obj, getattr(obj, name)
        if not ok or not u.call:
            continue
        last = u.chain[-1]
        sig_obj, sig_name = (obj.__init__, "__init__") if inspect.isclass(obj) else (obj, last)
        sigs = signatures(sig_obj, sig_name)
        if sigs is not None and not u.starred and \
                not any(_fits(s, u.nargs, u.kwargs) for s in sigs):
            shown = " | ".join("(" + ", ".join(n + ("=..." if d else "") for n, d in s) + ")"
                               for s in sigs)
            problems.append(f"{u}(<{u.nargs} positional>{''.join(', ' + k + '=' for k in u.kwargs)})"
                            f": no signature fits; tensorrt {trt.__version__} has {shown}")
        if u.target is not None:
            ret = last if inspect.isclass(obj) else next(iter(_returns(obj, last)), "")
            cls = ret.rsplit(".", 1)[-1]
            if ret.startswith("tensorrt") and hasattr(trt, cls) and inspect.isclass(getattr(trt, cls)):
                want = TRT_OBJECTS.get(u.target)
                if want is None or not issubclass(getattr(trt, cls), getattr(trt, want, object)):
                    problems.append(f"{u}: returns tensorrt.{cls} but is stored as '{u.target}' "
                                    f"({'not a TRT_OBJECTS name' if want is None else want}); "
                                    f"name it for its class in deploy/trt_api.TRT_OBJECTS")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", default="tensorrt", help="module to check against "
                    "(tensorrt, or tensorrt_bindings for a bare bindings wheel)")
    ap.add_argument("--list", action="store_true", help="print every use found")
    args = ap.parse_args(argv)
    uses = collect_uses()
    if args.list:
        for u in uses:
            print(u)
    try:
        trt = importlib.import_module(args.module)
    except Exception as e:  # noqa: BLE001  (ImportError, or OSError from a missing native lib)
        print(f"error: cannot import {args.module}: {e}", file=sys.stderr)
        return 2
    problems = check(trt, uses)
    for p in problems:
        print(p)
    print(f"tensorrt {trt.__version__}: {len(uses)} API uses, "
          f"{'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
