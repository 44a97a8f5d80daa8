"""Every TensorRT API use in deploy/ and the TensorRT backend, checked against the real Python
bindings of the newest TensorRT 10.x and 11.x releases, without a GPU.

The ``tensorrt-cu12-bindings`` / ``tensorrt-cu13-bindings`` wheels (~1.3 MB) are fetched with
``pip download --no-deps`` into a cache directory (``$YOLO_Q_TRT_WHEELS`` or
``<tmp>/yolo_q_trt_wheels``); the native libraries their ``tensorrt.so`` links
(``libnvinfer.so.N``, ``libnvinfer_plugin.so.N``, ``libnvonnxparser.so.N``, read with
``readelf -d``) are replaced by stub shared libraries compiled with gcc that define the symbols
the module needs (``nm -D --undefined-only``, minus what libc / libstdc++ / Python provide).
The bindings then import on a CPU machine; ``deploy/trt_api.py`` runs against them in a
subprocess. Skips only when a wheel cannot be fetched (no network, no cached wheel) or the
tools (gcc, readelf, nm) are missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("YOLO_Q_TRT_WHEELS",
                            Path(tempfile.gettempdir()) / "yolo_q_trt_wheels"))
# (id, requirement): the newest 10.x (CUDA 12 wheel), the newest 11.x (CUDA 13 wheel), and the
# oldest 10.x this code supports
RELEASES = [("10.x-newest", "tensorrt-cu12-bindings<11"),
            ("11.x-newest", "tensorrt-cu13-bindings>=11,<12"),
            ("10.8", "tensorrt-cu12-bindings==10.8.0.43")]


def _wheel_version(name: str):
    m = re.match(r"tensorrt_cu\d+_bindings-([\d.]+?)(?:\.post\d+)?-", name)
    return tuple(int(v) for v in m.group(1).split(".")) if m else ()


def _matches(req: str, whl: Path) -> bool:
    pkg = req.split("<")[0].split(">")[0].split("=")[0].replace("-", "_")
    if not whl.name.startswith(pkg + "-"):
        return False
    v = _wheel_version(whl.name)
    if "==" in req:
        return v == tuple(int(x) for x in req.split("==")[1].split("."))
    major = v[0] if v else -1
    return ("<11" in req and major < 11) or (">=11" in req and major == 11)


def _fetch(req: str) -> Path:
    d = CACHE / re.sub(r"[^\w.]+", "_", req)
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", "--disable-pip-version-check", "--timeout", "20", "-q", "-d",
                        str(d), req], capture_output=True, text=True, timeout=300)
    wheels = sorted((w for w in d.glob("*.whl") if _matches(req, w)),
                    key=lambda w: _wheel_version(w.name))
    if not wheels:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot fetch {req} (pip download: {last}); needs PyPI access once")
    return wheels[-1]


def _undefined(so: Path):
    out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True,
                         text=True, check=True).stdout
    return sorted({p[1] for p in (line.split() for line in out.splitlines())
                   if len(p) == 2 and p[0] == "U" and "@" not in p[1]})


_PROVIDERS_PY = """
import ctypes, sys
libs = [ctypes.CDLL(None)] + [ctypes.CDLL(n) for n in
        ("libc.so.6", "libstdc++.so.6", "libm.so.6", "libgcc_s.so.1")]
def found(s):
    for lib in libs:
        try:
            getattr(lib, s)
            return True
        except AttributeError:
            pass
    return False
print("\\n".join(s for s in sys.stdin.read().split() if not found(s)))
"""


def _prepare(whl: Path) -> Path:
    """Unpacked wheel + stub libraries in ``<wheel>.env/``; returns that directory."""
    env = whl.with_suffix(".env")
    if (env / "ready").is_file():
        return env
    shutil.rmtree(env, ignore_errors=True)
    (env / "lib").mkdir(parents=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(env / "site")
    so = next((env / "site").glob("tensorrt_bindings/tensorrt*.so"))
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", subprocess.run(
        ["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout)
    nv = [n for n in needed if n.startswith("libnv")]
    assert nv, f"{so}: links no libnv* library ({needed})"
    syms = subprocess.run([sys.executable, "-c", _PROVIDERS_PY],
                          input=" ".join(s for s in _undefined(so) if not s.startswith(("Py", "_Py"))),
                          capture_output=True, text=True, check=True).stdout.split()
    src = env / "stub.c"
    src.write_text("".join(f"void {s}(void) {{}}\n" for s in syms))
    for lib in nv:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(env / "lib" / lib), str(src),
                        f"-Wl,-soname,{lib}"], check=True, capture_output=True)
    (env / "ready").write_text(whl.name)
    return env


def _run_checker(env: Path, *extra):
    e = dict(os.environ, PYTHONPATH=str(env / "site"),
             LD_LIBRARY_PATH=os.pathsep.join([str(env / "lib"),
                                              os.environ.get("LD_LIBRARY_PATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "deploy" / "trt_api.py"), "--module",
                           "tensorrt_bindings", *extra], capture_output=True, text=True, env=e,
                          timeout=120)


@pytest.fixture(scope="session", params=RELEASES, ids=[r[0] for r in RELEASES])
def bindings(request):
    for tool in ("gcc", "readelf", "nm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: needed to build stub TensorRT libraries")
    whl = _fetch(request.param[1])
    return whl, _prepare(whl)


def test_deploy_code_conforms_to_real_bindings(bindings):
    whl, env = bindings
    r = _run_checker(env)
    assert r.returncode == 0, f"{whl.name}:\n{r.stdout}{r.stderr}"
    version = re.search(r"tensorrt ([\d.]+): (\d+) API uses, ok", r.stdout)
    assert version and version.group(1).split(".")[:2] == \
        [str(v) for v in _wheel_version(whl.name)[:2]]
    assert int(version.group(2)) > 40  # the builder + runner really were scanned


def test_checker_catches_removed_and_misused_api(bindings, tmp_path):
    """The pre-fix build code (weak typing flags) fails on 11.x and passes on 10.x; a wrong
    argument list and a mis-named TensorRT object fail everywhere."""
    whl, env = bindings
    code = '''
import sys
sys.path.insert(0, %r)
import trt_api
import tensorrt_bindings as trt
src = """
def build(trt, onnx_path):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.INT8)
"""
bad = """
def run(trt, logger):
    builder = trt.Builder(logger, 3)
    net = builder.create_network(0)
"""
open(%r, "w").write(src)
open(%r, "w").write(bad)
from pathlib import Path
old = trt_api.check(trt, trt_api.collect_uses(["old.py"], Path(%r)))
wrong = trt_api.check(trt, trt_api.collect_uses(["bad.py"], Path(%r)))
print("OLD", len(old), *old, sep="\\n")
print("BAD", len(wrong), *wrong, sep="\\n")
''' % (str(REPO / "deploy"), str(tmp_path / "old.py"), str(tmp_path / "bad.py"),
       str(tmp_path), str(tmp_path))
    e = dict(os.environ, PYTHONPATH=str(env / "site"),
             LD_LIBRARY_PATH=str(env / "lib"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    old = r.stdout.split("BAD")[0]
    bad = r.stdout.split("BAD")[1]
    if _wheel_version(whl.name)[0] >= 11:
        assert "BuilderFlag.FP16: 'FP16' does not exist" in old
        assert "BuilderFlag.INT8: 'INT8' does not exist" in old
    else:
        assert old.startswith("OLD\n0"), old
    assert "Builder(<2 positional>): no signature fits" in bad
    assert "stored as 'net'" in bad and "INetworkDefinition" in bad


def test_unfetchable_wheel_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CACHE", tmp_path)
    with pytest.raises(pytest.skip.Exception, match=r"cannot fetch tensorrt-cu12-bindings==0\.0\.1"):
        _fetch("tensorrt-cu12-bindings==0.0.1")
