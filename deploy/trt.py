"""TensorRT engine builder and runner for yolo_q ONNX exports (TensorRT 10.8+ and 11.x).

Every engine is built from a **strongly typed** network: each tensor has the type the ONNX gives
it. INT8 comes from the Q/DQ nodes of a QDQ export (explicit quantization, scales in the graph,
no calibrator); FP16 comes from FP16 tensors in the ONNX (``tools/export.py --fp16``, or
:func:`yolo_q.export.fp16.convert_fp16`). There are no precision builder flags: TensorRT 11
removed them (``BuilderFlag.FP16/INT8``, calibrators, ``platform_has_fast_*``) and on 10.x a
strongly typed network forbids them. The same code therefore builds on 10.x (JetPack) and 11.x.

    python deploy/trt.py build yolov6n_int8_tensorrt_640_fp16.onnx --max-batch 32
    python deploy/trt.py info yolov6n_int8_tensorrt_640_fp16.engine
    python deploy/trt.py bench yolov6n_int8_tensorrt_640_fp16.engine --batch 1 --iters 200

Run from Python (torch CUDA tensors are the I/O buffers; no pycuda):

    runner = TrtRunner("model.engine", device="cuda:0")
    outs = runner(imgs)          # {"outputs": (B, N, 5+nc)} or the end-to-end outputs

``tensorrt`` is imported lazily: this module imports (and ``require_tensorrt`` explains what is
missing in one line) on machines without TensorRT or a GPU. It does not import yolo_q. Every
TensorRT object is held in a variable named as in ``deploy/trt_api.TRT_OBJECTS``, so the API
conformance test can check each use against the real bindings.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]
MIN_VERSION = (10, 8)
INSTALL_HINT = ("on a machine with an NVIDIA GPU run: pip install -e '.[trt]' (TensorRT 11, CUDA 13), "
                "'.[trt-cu12]' (CUDA 12) or '.[trt10]' (tensorrt-cu12>=10.8,<11; JetPack ships 10.x); "
                "see deploy/README.md")

__all__ = ["TensorRTError", "TensorRTUnavailable", "require_tensorrt", "is_available",
           "onnx_precision", "onnx_has_qdq", "build_engine", "engine_cache_key", "cached_engine",
           "TrtRunner"]


class TensorRTUnavailable(RuntimeError):
    """TensorRT or CUDA is missing (or too old); the message says what and how to install."""

    user_facing = True  # tools print the message as one line and exit 2


class TensorRTError(RuntimeError):
    """TensorRT could not parse, build, load or run a model file; the message names the file."""

    user_facing = True  # tools print the message as one line and exit 2


def _version_tuple(version: str) -> Tuple[int, ...]:
    out = []
    for part in str(version).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def require_tensorrt():
    """Return the ``tensorrt`` module, or raise :class:`TensorRTUnavailable` with one line saying
    what is missing (package, CUDA GPU, or a TensorRT older than 10.8) and how to install it."""
    missing = []
    trt = None
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001  (ImportError, or a broken install raising OSError)
        missing.append("the tensorrt Python package is not installed")
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if not has_cuda:
        missing.append("no CUDA GPU is visible to torch")
    if missing:
        raise TensorRTUnavailable(f"TensorRT backend unavailable: {' and '.join(missing)}; "
                                  f"{INSTALL_HINT}")
    version = str(getattr(trt, "__version__", "0"))
    if _version_tuple(version) < MIN_VERSION:
        raise TensorRTUnavailable(f"TensorRT {version} found but 10.8 or newer is required "
                                  f"(strongly typed INT8/FP16 builds); {INSTALL_HINT}")
    return trt


def is_available() -> bool:
    """True when tensorrt >= 10.8 imports and a CUDA GPU is visible."""
    try:
        require_tensorrt()
        return True
    except RuntimeError:
        return False


def onnx_precision(onnx_path: PathLike) -> Dict[str, bool]:
    """What a strongly typed engine of this ONNX computes in: ``int8`` (Q/DQ nodes present),
    ``fp16`` (FP16 initializers / casts present), ``fp32_compute`` (float32 initializers other
    than Q/DQ scales left, i.e. layers that will run in FP32)."""
    import onnx
    proto = onnx.load(str(onnx_path), load_external_data=False)
    g = proto.graph
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    scales = {i for n in qdq for i in n.input[1:]}
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    fp16 = any(i.data_type == f16 for i in g.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute)
        for n in g.node)
    fp32 = any(i.data_type == f32 and i.name not in scales and len(i.dims) > 1
               for i in g.initializer)
    return {"int8": bool(qdq), "fp16": fp16, "fp32_compute": fp32}


def onnx_has_qdq(onnx_path: PathLike) -> bool:
    """True if the ONNX graph contains QuantizeLinear/DequantizeLinear nodes."""
    return onnx_precision(onnx_path)["int8"]


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _profile_shapes(trt, network, onnx_path, min_batch, opt_batch, max_batch):
    """{input name: (min, opt, max)} for inputs with a dynamic batch dimension."""
    shapes = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = tuple(inp.shape)
        if any(d < 0 for d in shape[1:]):
            raise ValueError(f"{onnx_path}: input '{inp.name}' has dynamic non-batch dims "
                             f"{shape}; export with a fixed img_size")
        if shape[0] < 0:
            if not 1 <= min_batch <= max_batch:
                raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch}, "
                                 f"{max_batch}")
            opt = opt_batch or max(min_batch, max_batch // 2)
            shapes[inp.name] = ((min_batch, *shape[1:]), (opt, *shape[1:]),
                                (max_batch, *shape[1:]))
    return shapes


def build_engine(onnx_path: PathLike, engine_path: Optional[PathLike] = None,
                 workspace_gb: float = 4.0, min_batch: int = 1, opt_batch: Optional[int] = None,
                 max_batch: int = 32, timing_cache: Optional[PathLike] = None,
                 require_int8: bool = False, verbose: bool = False) -> Path:
    """Build a serialized engine from an ONNX file with a strongly typed network; returns the
    engine path. Precision is the ONNX's (see the module docstring); ``require_int8``: error
    unless the graph has Q/DQ nodes. A dynamic batch dimension gets one optimization profile
    ``min_batch / opt_batch (default max_batch // 2) / max_batch``. ``timing_cache`` (default
    ``<engine stem>.timing.cache``) is loaded when present and saved after the build.
    Same as ``trtexec --onnx=M --stronglyTyped --saveEngine=E --timingCacheFile=C
    --memPoolSize=workspace:<MiB>`` (+ ``--minShapes/--optShapes/--maxShapes``).
    Builds for the current CUDA device (``cached_engine`` enters the right one)."""
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX file not found")
    precision = onnx_precision(onnx_path)
    if require_int8 and not precision["int8"]:
        raise ValueError(f"{onnx_path}: INT8 requested but the graph has no Q/DQ nodes; export a "
                         f"quantized checkpoint with tools/export.py --flavour tensorrt")
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    cache_path = (Path(timing_cache) if timing_cache
                  else engine_path.with_name(engine_path.stem + ".timing.cache"))
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # EfficientNMS_TRT (optional e2e NMS)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            parser_error = parser.get_error(i)
            errors.append(str(parser_error))
        raise TensorRTError(f"{onnx_path}: TensorRT could not parse the ONNX model: "
                           f"{'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    shapes = _profile_shapes(trt, network, onnx_path, min_batch, opt_batch, max_batch)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file()
                                              else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    t0 = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log "
                           f"above; try --verbose or a larger --workspace)")
    _atomic_write(engine_path, memoryview(serialized))
    timing_cache = config.get_timing_cache()
    _atomic_write(cache_path, memoryview(timing_cache.serialize()))
    if verbose:
        mode = "+".join(k for k in ("int8", "fp16") if precision[k]) or "fp32"
        print(f"built {engine_path} (strongly typed, {mode}, {time.time() - t0:.1f}s); "
              f"timing cache {cache_path}")
    if not precision["fp16"] and precision["fp32_compute"]:
        print(f"note: {onnx_path.name} has float32 layers and no FP16 tensors: they run in FP32 "
              f"(export with --fp16 for FP16)", file=sys.stderr)
    return engine_path


def engine_cache_key(onnx_path: PathLike, options: Dict[str, object], trt_version: str,
                     gpu_name: str) -> str:
    """sha256 over the ONNX content, the build options, the TensorRT version and the GPU name:
    an engine is reused only when all four are the same."""
    h = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps({"options": options, "tensorrt": str(trt_version), "gpu": str(gpu_name)},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def cached_engine(onnx_path: PathLike, cache_dir: Optional[PathLike] = None, device=None,
                  rebuild: bool = False, verbose: bool = False, **options) -> Path:
    """The engine for ``onnx_path`` built with ``options`` (:func:`build_engine` keywords) on
    ``device`` (default: the current CUDA device), from ``cache_dir`` (default: next to the ONNX)
    as ``<stem>.<key>.engine`` with a ``.json`` sidecar; built when missing or ``rebuild``."""
    trt = require_tensorrt()
    import torch
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX file not found")
    dev = torch.device(device if device is not None else "cuda")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(dev)
    options = {k: v for k, v in options.items() if k != "timing_cache"}
    key = engine_cache_key(onnx_path, options, trt.__version__, gpu)
    out_dir = Path(cache_dir) if cache_dir else onnx_path.parent
    engine_path = out_dir / f"{onnx_path.stem}.{key[:16]}.engine"
    if rebuild or not engine_path.is_file():
        with torch.cuda.device(dev):
            build_engine(onnx_path, engine_path, verbose=verbose, **options)
        meta = {"onnx": str(onnx_path), "key": key, "options": options,
                "tensorrt": trt.__version__, "gpu": gpu}
        _atomic_write(engine_path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return engine_path


def _torch_dtype(trt, dt):
    import torch
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
             "BF16": torch.bfloat16}
    for name, tdt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return tdt
    raise TypeError(f"unsupported TensorRT I/O data type {dt}")


class TrtRunner:
    """Execute a serialized engine with the TensorRT 10/11 tensor API on torch CUDA buffers.

    ``__call__(x)`` takes a (B, 3, H, W) tensor (moved to the engine's device/dtype) and returns
    ``{output name: tensor}`` on the GPU, enqueued on torch's current stream of that device.
    Every call runs inside ``torch.cuda.device(self.device)``, the device the engine was
    deserialized on. A dynamic batch uses optimization profile 0 (its range is checked).
    Attributes: ``input_name``, ``output_names``, ``input_hw``, ``fixed_batch`` (None for a
    dynamic batch), ``min_batch``/``max_batch``, ``device``.
    """

    def __init__(self, engine_path: PathLike, device=None, verbose: bool = False):
        trt = require_tensorrt()
        import torch
        self.trt, self.torch = trt, torch
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: TensorRT engine not found")
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise TensorRTError(f"{self.path}: could not deserialize the engine (built with "
                                   f"another TensorRT version or for another GPU? rebuild it)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names
                  if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names
                             if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input tensor, got {inputs}")
        self.input_name = inputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.out_dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n))
                           for n in self.output_names}
        self.output_shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in self.output_names}
        self.input_hw = (int(shape[2]), int(shape[3])) if len(shape) == 4 else None
        if shape[0] >= 0:
            self.fixed_batch = self.min_batch = self.max_batch = int(shape[0])
        else:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.fixed_batch, self.min_batch, self.max_batch = None, int(lo[0]), int(hi[0])

    def __call__(self, x) -> Dict[str, "torch.Tensor"]:
        torch = self.torch
        with torch.cuda.device(self.device):
            x = x.to(self.device, self.input_dtype).contiguous()
            b = x.shape[0]
            if not self.min_batch <= b <= self.max_batch:
                raise ValueError(f"{self.path}: batch {b} outside the engine's range "
                                 f"{self.min_batch}..{self.max_batch}")
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            outs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                t = torch.empty(shape, dtype=self.out_dtypes[name], device=self.device)
                self.context.set_tensor_address(name, t.data_ptr())
                outs[name] = t
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise TensorRTError(f"{self.path}: TensorRT execution failed")
        return outs

    def info(self) -> Dict[str, object]:
        return {"engine": str(self.path), "input": self.input_name,
                "input_shape": tuple(self.engine.get_tensor_shape(self.input_name)),
                "batch_range": (self.min_batch, self.max_batch),
                "outputs": {n: tuple(self.engine.get_tensor_shape(n)) for n in self.output_names},
                "num_layers": self.engine.num_layers, "tensorrt": self.trt.__version__,
                "device": str(self.device)}


def bench(runner: TrtRunner, batch: int, iters: int, warmup: int = 20) -> Tuple[float, float]:
    """(ms per batch, images/s) of ``runner`` at ``batch`` (random input, GPU-synchronized)."""
    torch = runner.torch
    h, w = runner.input_hw
    x = torch.rand(batch, 3, h, w, device=runner.device)
    for _ in range(warmup):
        runner(x)
    torch.cuda.synchronize(runner.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        runner(x)
    torch.cuda.synchronize(runner.device)
    dt = (time.perf_counter() - t0) / iters
    return 1000 * dt, batch / dt


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Build / inspect / benchmark strongly typed "
                                             "TensorRT 10.8+/11 engines from yolo_q ONNX exports.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="ONNX -> engine (precision = the ONNX's types and Q/DQ)")
    b.add_argument("onnx")
    b.add_argument("--engine", help="output path (default: <onnx>.engine)")
    b.add_argument("--require-int8", action="store_true",
                   help="fail unless the ONNX has Q/DQ nodes")
    b.add_argument("--workspace", type=float, default=4.0, help="GiB")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=None)
    b.add_argument("--max-batch", type=int, default=32)
    b.add_argument("--timing-cache", default=None)
    b.add_argument("--verbose", action="store_true")
    i = sub.add_parser("info", help="print engine I/O")
    i.add_argument("engine")
    r = sub.add_parser("bench", help="latency/throughput of an engine (GPU time incl. launch)")
    r.add_argument("engine")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--iters", type=int, default=200)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            path = build_engine(args.onnx, args.engine, workspace_gb=args.workspace,
                                min_batch=args.min_batch, opt_batch=args.opt_batch,
                                max_batch=args.max_batch, timing_cache=args.timing_cache,
                                require_int8=args.require_int8, verbose=args.verbose)
            print(path)
        elif args.cmd == "info":
            for k, v in TrtRunner(args.engine).info().items():
                print(f"{k}: {v}")
        else:
            ms, ips = bench(TrtRunner(args.engine), args.batch, args.iters)
            print(f"batch {args.batch}: {ms:.3f} ms/batch, {ips:.1f} images/s")
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
