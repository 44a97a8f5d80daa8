"""TensorRT deploy code without TensorRT: import, the one-line error path, and the engine builder
driven through a stand-in ``tensorrt`` module that records the API calls."""
import importlib.util
import sys
import types

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
    assert "\n" not in msg and "pip install tensorrt" in msg and "CUDA 12" in msg
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
    trt.__version__ = "10.3.0"

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


def test_build_qdq_engine_sets_int8_fp16_profile_cache(fake_trt, onnx_files, tmp_path):
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"OLD")
    out = dtrt.build_engine(onnx_files["qdq"], tmp_path / "q.engine", workspace_gb=2,
                            max_batch=16, timing_cache=cache)
    assert out.read_bytes() == b"ENGINE"
    cfg = fake_trt.config
    assert cfg.flags == {"fp16", "int8"}  # Q/DQ found -> explicit INT8, FP16 for the rest
    assert cfg.pool == {"workspace": 2 << 30}
    assert cfg.profiles[0].shapes == {"images": ((1, 3, 32, 32), (8, 3, 32, 32),
                                                 (16, 3, 32, 32))}
    assert fake_trt.cache_in == b"OLD" and cache.read_bytes() == b"OLD+new"
    assert fake_trt.network.flags == 0
    assert ("plugins", "") in fake_trt.calls


def test_build_float_engine_and_options(fake_trt, onnx_files, tmp_path):
    e = dtrt.build_engine(onnx_files["float"], tmp_path / "f.engine")
    assert fake_trt.config.flags == {"fp16"} and fake_trt.config.profiles == []  # static batch
    assert (tmp_path / "f.timing.cache").read_bytes() == b"+new" and e.is_file()
    with pytest.raises(ValueError, match="no Q/DQ nodes"):
        dtrt.build_engine(onnx_files["float"], tmp_path / "f.engine", int8=True)
    dtrt.build_engine(onnx_files["qdq"], tmp_path / "s.engine", strongly_typed=True)
    assert fake_trt.config.flags == set() and fake_trt.network.flags == 1 << 5
    fake_trt.fake_parse_errors = ["In node 3: unsupported op Foo"]
    with pytest.raises(RuntimeError, match="could not parse the ONNX model: In node 3"):
        dtrt.build_engine(onnx_files["float"], tmp_path / "x.engine")
