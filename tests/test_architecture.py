"""The import graph of ``yolo_q`` (read from the source with ``ast``: module-level AND
function-level imports): no import cycle between modules or packages, and arrows only point
down the floors of the layout (README "Layout"). Run as a script to print the measurements:
``python tests/test_architecture.py``."""
from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]

# floors from the ground up; a module may import its own floor (without a cycle) or lower ones
FLOORS = {
    "yolo_q.config": 0, "yolo_q.io": 0,
    "yolo_q.models": 1, "yolo_q.data": 1, "yolo_q.losses": 1, "yolo_q.optim": 1,
    "yolo_q.engine": 2,
    "yolo_q.eval": 3, "yolo_q.quant": 3, "yolo_q.export": 3,
    "yolo_q.pipeline": 4, "yolo_q.report": 4, "yolo_q.benchmark": 4, "yolo_q.cli": 4,
    "yolo_q.training": 4, "yolo_q.ladder": 4, "yolo_q.reference": 4,
    "yolo_q": 5,  # the package top: load_config, build_model, load_model
}


def modules(root: Path = ROOT) -> Dict[str, Tuple[Path, bool]]:
    """``{"yolo_q.quant.ptq": (path, is_package)}`` for every module of the package."""
    out = {}
    for p in sorted((root / "yolo_q").rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _targets(mod: str, is_pkg: bool, node, mods) -> List[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        if node.level:
            base = base[:len(base) - (node.level - 1)]
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        names = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:  # "import yolo_q.x.y" -> the deepest module that exists
            name = name.rpartition(".")[0]
        parts = name.split(".")
        # importing a.b.c runs a.b's __init__ too, unless a.b is a package of the importer
        # (then it is already loading); the package top is always loaded first
        out += [p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                if not mod.startswith(p + ".")] + [name]
    return [t for t in out if t.startswith("yolo_q")]


def import_graph(root: Path = ROOT) -> Tuple[Dict[str, Set[str]], List[Tuple[str, str, int]]]:
    """Module -> imported yolo_q modules; plus every function-level yolo_q import
    ``(module, target, line)``."""
    mods = modules(root)
    edges: Dict[str, Set[str]] = collections.defaultdict(set)
    in_functions = []
    for mod, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(mod, is_pkg, node, mods):
                    if t != mod:
                        edges[mod].add(t)
                        if id(node) in nested:
                            in_functions.append((mod, t, node.lineno))
    return edges, in_functions


def cycles(nodes, edges) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack, on, out = [], set(), []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])


def package_graph(edges) -> Dict[str, Set[str]]:
    out: Dict[str, Set[str]] = collections.defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if package_of(a) != package_of(b):
                out[package_of(a)].add(package_of(b))
    return out


def upward_arrows(edges) -> List[str]:
    bad = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            fa, fb = FLOORS[package_of(a)], FLOORS[package_of(b)]
            if fb > fa:
                bad.append(f"{a} (floor {fa}) -> {b} (floor {fb})")
    return bad


def test_every_package_has_a_floor():
    assert sorted({package_of(m) for m in modules()} - set(FLOORS)) == []


def test_no_module_import_cycle():
    edges, _ = import_graph()
    assert cycles(sorted(modules()), edges) == []


# Floor 3 still has one package-level circle (no module-level one): quantization's workflows
# (ptq, qat, sensitivity, partial) evaluate (eval) and export (export), while export's QDQ writer
# and eval's checkpoint backend (through yolo_q.load_model) need the quantization core. The
# package top of yolo_q.quant holds only the core, so no module imports back. It may shrink, never
# grow: splitting the core out (e.g. yolo_q/qcore) would remove it.
KNOWN_PACKAGE_CYCLES = [["yolo_q.eval", "yolo_q.export", "yolo_q.quant"]]


def test_no_package_import_cycle():
    pkg = package_graph(import_graph()[0])
    found = cycles(sorted(FLOORS), pkg)
    assert all(any(set(c) <= set(k) for k in KNOWN_PACKAGE_CYCLES) for c in found), found


def test_no_function_level_yolo_q_import():
    """Imports inside functions are for optional dependencies (onnx, onnxruntime, tensorrt, ...)
    only; a yolo_q import there would hide an arrow from a reader."""
    assert import_graph()[1] == []


def test_arrows_point_down_the_floors():
    assert upward_arrows(import_graph()[0]) == []


def test_checker_finds_a_cycle_and_an_upward_arrow(tmp_path):
    (tmp_path / "yolo_q" / "io").mkdir(parents=True)
    (tmp_path / "yolo_q" / "engine").mkdir()
    (tmp_path / "yolo_q" / "__init__.py").write_text("")
    (tmp_path / "yolo_q" / "io" / "__init__.py").write_text("")
    (tmp_path / "yolo_q" / "engine" / "__init__.py").write_text("")
    (tmp_path / "yolo_q" / "io" / "a.py").write_text("def f():\n    from ..engine import b\n")
    (tmp_path / "yolo_q" / "engine" / "b.py").write_text("from ..io.a import f\n")
    edges, in_functions = import_graph(tmp_path)
    assert cycles(sorted(modules(tmp_path)), edges) == [["yolo_q.engine.b", "yolo_q.io.a"]]
    assert upward_arrows(edges) == [
        "yolo_q.io.a (floor 0) -> yolo_q.engine (floor 2)",
        "yolo_q.io.a (floor 0) -> yolo_q.engine.b (floor 2)"]
    assert in_functions == [("yolo_q.io.a", "yolo_q.engine", 2),
                            ("yolo_q.io.a", "yolo_q.engine.b", 2)]


def longest_functions(root: Path = ROOT, top: int = 10) -> List[Tuple[int, str]]:
    """``(lines, "path:line name")`` of the longest functions of ``yolo_q`` (docstring included)."""
    out = []
    for mod, (path, _) in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1,
                            f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)[:top]


MAX_FUNCTION_LINES = 80  # issue #19: no god-functions in the library


def test_no_library_function_longer_than_the_limit():
    too_long = [f"{where} ({n} lines)" for n, where in longest_functions(top=20)
                if n > MAX_FUNCTION_LINES]
    assert not too_long, f"split these into named steps: {too_long}"


def main() -> int:
    edges, in_functions = import_graph()
    mod_cycles = cycles(sorted(modules()), edges)
    pkg = package_graph(edges)
    pkg_cycles = cycles(sorted(FLOORS), pkg)
    up = upward_arrows(edges)
    print(f"modules: {len(modules())}, import arrows: {sum(map(len, edges.values()))}")
    print(f"module import cycles: {len(mod_cycles)}" + "".join(f"\n  {c}" for c in mod_cycles))
    print(f"package import cycles: {len(pkg_cycles)}" + "".join(f"\n  {c}" for c in pkg_cycles))
    print(f"upward arrows: {len(up)}" + "".join(f"\n  {u}" for u in up))
    print(f"function-level yolo_q imports: {len(in_functions)}")
    for a in sorted(pkg):
        print(f"  {a} -> {', '.join(sorted(pkg[a]))}")
    print("longest functions (lines):")
    for n, where in longest_functions():
        print(f"  {n:4d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
