"""TensorRT deploy code without TensorRT: import, the one-line error path, and the engine builder
driven through a stand-in ``tensorrt`` module that records the API calls."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from yolo_q.eval import TrtBackend, build_backend
from yolo_q.eval.backends import load_deploy_trt
from yolo_q.export import export_onnx

dtrt = load_deploy_trt()  # deploy/trt.py imports without tensorrt

onnx = pytest.importorskip("onnx")
TRT_READY = dtrt.is_available()
no_trt = pytest.mark.skipif(TRT_READY, reason="TensorRT and CUDA are available here")


@no_trt
def test_missing_tensorrt_is_one_clear_line(tmp_path):
    with pytest.raises(RuntimeError) as e:
        dtrt.require_tensorrt()
    msg = str(e.value)
    assert "\n" not in msg and "pip install -e '.[trt]'" in msg and "CUDA 13" in msg
    assert "tensorrt-cu12>=10.8,<11" in msg
    has_pkg = importlib.util.find_spec("tensorrt") is not None
    assert ("tensorrt Python package is not installed" in msg) == (not has_pkg)
    assert ("no CUDA GPU" in msg) == (not torch.cuda.is_available())
    for make in (lambda: TrtBackend(tmp_path / "m.engine"),
                 lambda: build_backend("trt", tmp_path / "m.onnx")):
        with pytest.raises(RuntimeError) as e2:
            make()
        assert str(e2.value) == msg


@no_trt
def test_cli_reports_error_and_exit_code(capsys):
    assert dtrt.main(["build", "nothing.onnx"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: TensorRT backend unavailable") and err.count("\n") == 1


class _Rec:
    """Stand-in tensorrt (10.x names) recording what the builder is asked to do."""

    def __init__(self):
        self.calls = []
        self.fake_parse_errors = []


def fake_tensorrt(rec):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.8.0"

    class Logger:
        WARNING, INFO = "W", "I"

        def __init__(self, level):
            rec.calls.append(("logger", level))

    class Enum:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    trt.Logger = Logger
    trt.init_libnvinfer_plugins = lambda logger, ns: rec.calls.append(("plugins", ns))
    trt.NetworkDefinitionCreationFlag = Enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = Enum(WORKSPACE="workspace")
    trt.BuilderFlag = Enum(FP16="fp16", INT8="int8")
    trt.LayerType = Enum(QUANTIZE="q", DEQUANTIZE="dq", CONVOLUTION="conv")

    class Layer:
        def __init__(self, t):
            self.type = t

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags, self.layers, self.inputs = flags, [], []
            rec.network = self

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            if rec.fake_parse_errors:
                return False
            m = onnx.load(path)
            kinds = {"QuantizeLinear": "q", "DequantizeLinear": "dq"}
            self.network.layers = [Layer(kinds.get(n.op_type, "conv")) for n in m.graph.node]
            for i in m.graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1
                        for d in i.type.tensor_type.shape.dim]
                self.network.inputs.append(Tensor(i.name, tuple(dims)))
            return True

        num_errors = property(lambda self: len(rec.fake_parse_errors))

        def get_error(self, i):
            return rec.fake_parse_errors[i]

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob + b"+new"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool = set(), [], {}

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, f):
            self.flags.add(f)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, blob):
            rec.cache_in = bytes(blob)
            return Cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            rec.config = Config()
            return rec.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE" if network.layers else None

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    rec = _Rec()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return rec


class FQ(torch.nn.Module):
    def __init__(self, quant):
        super().__init__()
        self.conv, self.quant = torch.nn.Conv2d(3, 6, 1), quant
        self.stride = torch.tensor([32.0])

    def forward(self, x):
        if self.quant:
            x = torch.fake_quantize_per_tensor_affine(x, 1 / 127, 0, -128, 127)
        return self.conv(x).flatten(2).permute(0, 2, 1)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    return {"qdq": export_onnx(FQ(True), d / "qdq.onnx", img_size=32, dynamic_batch=True),
            "float": export_onnx(FQ(False), d / "float.onnx", img_size=32)}


def test_onnx_has_qdq(onnx_files):
    assert dtrt.onnx_has_qdq(onnx_files["qdq"]) and not dtrt.onnx_has_qdq(onnx_files["float"])


def test_build_is_strongly_typed_with_profile_and_cache(fake_trt, onnx_files, tmp_path):
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"OLD")
    out = dtrt.build_engine(onnx_files["qdq"], tmp_path / "q.engine", workspace_gb=2,
                            max_batch=16, timing_cache=cache, require_int8=True)
    assert out.read_bytes() == b"ENGINE"
    cfg = fake_trt.config
    assert cfg.flags == set()  # no precision flags: the ONNX types decide
    assert fake_trt.network.flags == 1 << 5  # STRONGLY_TYPED
    assert cfg.pool == {"workspace": 2 << 30}
    assert cfg.profiles[0].shapes == {"images": ((1, 3, 32, 32), (8, 3, 32, 32),
                                                 (16, 3, 32, 32))}
    assert fake_trt.cache_in == b"OLD" and cache.read_bytes() == b"OLD+new"
    assert ("plugins", "") in fake_trt.calls


def test_build_float_engine_and_errors(fake_trt, onnx_files, tmp_path, capsys):
    e = dtrt.build_engine(onnx_files["float"], tmp_path / "f.engine")
    assert fake_trt.config.profiles == [] and e.is_file()  # static batch: no profile
    assert (tmp_path / "f.timing.cache").read_bytes() == b"+new"
    assert "run in FP32" in capsys.readouterr().err  # an FP32 ONNX gives an FP32 engine
    with pytest.raises(ValueError, match="no Q/DQ nodes"):
        dtrt.build_engine(onnx_files["float"], tmp_path / "f.engine", require_int8=True)
    fake_trt.fake_parse_errors = ["In node 3: unsupported op Foo"]
    with pytest.raises(RuntimeError, match="could not parse the ONNX model: In node 3"):
        dtrt.build_engine(onnx_files["float"], tmp_path / "x.engine")


def test_old_tensorrt_is_refused(fake_trt, monkeypatch):
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.7.0")
    with pytest.raises(RuntimeError, match="10.8 or newer"):
        dtrt.require_tensorrt()


def test_engine_cache_key_changes_with_each_part(onnx_files, tmp_path):
    base = dict(options={"max_batch": 32}, trt_version="11.4.0.106", gpu_name="NVIDIA H100")
    key = dtrt.engine_cache_key(onnx_files["qdq"], **base)
    assert key == dtrt.engine_cache_key(onnx_files["qdq"], **base)
    copy = tmp_path / "same.onnx"
    copy.write_bytes(onnx_files["qdq"].read_bytes())  # content, not path or mtime
    assert dtrt.engine_cache_key(copy, **base) == key
    changed = [dtrt.engine_cache_key(onnx_files["float"], **base),
               dtrt.engine_cache_key(onnx_files["qdq"], **{**base, "options": {"max_batch": 8}}),
               dtrt.engine_cache_key(onnx_files["qdq"], **{**base, "trt_version": "10.16.1.11"}),
               dtrt.engine_cache_key(onnx_files["qdq"], **{**base, "gpu_name": "NVIDIA A100"})]
    assert len({key, *changed}) == 5


def test_cached_engine_reuses_only_matching_builds(fake_trt, onnx_files, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "FakeGPU")
    entered = []

    class Dev:
        def __init__(self, d):
            entered.append(str(d))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    monkeypatch.setattr(torch.cuda, "device", Dev)
    a = dtrt.cached_engine(onnx_files["qdq"], cache_dir=tmp_path, max_batch=8)
    assert entered == ["cuda:0"] and a.is_file() and a.with_suffix(".json").is_file()
    assert dtrt.cached_engine(onnx_files["qdq"], cache_dir=tmp_path, max_batch=8) == a
    assert entered == ["cuda:0"]  # reused, not rebuilt
    b = dtrt.cached_engine(onnx_files["qdq"], cache_dir=tmp_path, max_batch=16)
    assert b != a and len(entered) == 2


@pytest.fixture
def fake_deploy(monkeypatch):
    """deploy/trt.py with the GPU parts replaced: records what TrtBackend asks to build."""
    built = []

    def cached_engine(onnx_path, **kw):
        built.append((Path(onnx_path), kw))
        return Path(onnx_path).with_suffix(".engine")

    class Runner:
        def __init__(self, engine_path, device=None):
            self.engine_path, self.device = engine_path, torch.device("cpu")
            self.input_hw, self.fixed_batch, self.max_batch = (32, 32), None, 2
            self.output_names = ["outputs"]
            self.output_shapes = {"outputs": (-1, 4, 8)}
            self.batches = []

        def __call__(self, x):
            self.batches.append(x.shape[0])
            return {"outputs": x.mean((1, 2, 3))[:, None, None].expand(-1, 4, 8).half()}
    monkeypatch.setattr(dtrt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(dtrt, "cached_engine", cached_engine)
    monkeypatch.setattr(dtrt, "TrtRunner", Runner)
    return built


def test_trt_backend_builds_from_the_fp16_rewrite(fake_deploy, onnx_files, tmp_path):
    from yolo_q.export.fp16 import is_fp16_graph
    be = TrtBackend(onnx_files["float"], cache_dir=tmp_path, max_batch=2)
    src, kw = fake_deploy[-1]
    assert src == tmp_path / "float_fp16.onnx" and is_fp16_graph(src)  # FP16 engine
    assert kw["require_int8"] is False and kw["max_batch"] == 2 and kw["cache_dir"] == tmp_path
    x = torch.rand(5, 3, 32, 32)
    y = be(x)  # batches beyond the profile's max are split; same raw output as other backends
    assert be.runner.batches == [2, 2, 1] and y.dtype == torch.float32
    assert torch.allclose(y[:, 0, 0], x.mean((1, 2, 3)), atol=1e-3)
    TrtBackend(onnx_files["qdq"], cache_dir=tmp_path, int8=True)
    src, kw = fake_deploy[-1]
    assert src.name == "qdq_fp16.onnx" and kw["require_int8"] is True
    assert dtrt.onnx_precision(src) == {"int8": True, "fp16": True, "fp32_compute": False}
    TrtBackend(src, cache_dir=tmp_path)  # already FP16: built as it is
    assert fake_deploy[-1][0] == src
    TrtBackend(onnx_files["float"], fp16=False, cache_dir=tmp_path)  # FP32 as asked
    assert fake_deploy[-1][0] == onnx_files["float"]
    with pytest.raises(ValueError, match="int8=False but the ONNX is a QDQ"):
        TrtBackend(onnx_files["qdq"], int8=False, cache_dir=tmp_path)
