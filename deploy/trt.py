"""TensorRT 10 engine builder and runner for yolo_q ONNX exports (float or QDQ).

Build (explicit quantization: a QDQ ONNX carries its own scales, so there is no calibrator; the
INT8 flag is set when the graph has Q/DQ nodes, FP16 lets the remaining layers run in half):

    python deploy/trt.py build yolov6n_qdq_trt.onnx --fp16 --int8 auto --max-batch 32
    python deploy/trt.py info yolov6n_qdq_trt.engine
    python deploy/trt.py bench yolov6n_qdq_trt.engine --batch 1 --iters 200

Run from Python (torch CUDA tensors are the I/O buffers; no pycuda):

    runner = TrtRunner("model.engine")
    outs = runner(imgs_cuda_float)          # {"outputs": (B, N, 5+nc)} or the e2e outputs

``tensorrt`` is imported lazily: this module imports (and ``require_tensorrt`` explains what is
missing in one line) on machines without TensorRT or a GPU. It does not import yolo_q.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]
INSTALL_HINT = "on a machine with an NVIDIA GPU and CUDA 12 run: pip install tensorrt"



class TensorRTUnavailable(RuntimeError):
    """TensorRT or CUDA is missing (or too old); the message says what and how to install."""

    user_facing = True  # tools print the message as one line and exit 2


__all__ = ["TensorRTUnavailable", "require_tensorrt", "is_available", "onnx_has_qdq", "build_engine", "TrtRunner"]


def require_tensorrt():
    """Return the ``tensorrt`` module, or raise RuntimeError with one line saying what is
    missing (package, CUDA GPU, or a TensorRT older than 10) and how to install it."""
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
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {version} found but the TensorRT 10 API is required; "
                           f"run: pip install -U 'tensorrt>=10'")
    return trt


def is_available() -> bool:
    """True when tensorrt >= 10 imports and a CUDA GPU is visible."""
    try:
        require_tensorrt()
        return True
    except RuntimeError:
        return False


def onnx_has_qdq(onnx_path: PathLike) -> bool:
    """True if the ONNX graph contains QuantizeLinear/DequantizeLinear nodes (explicit
    quantization)."""
    import onnx
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)


def _network_has_qdq(trt, network) -> bool:
    kinds = {getattr(trt.LayerType, "QUANTIZE", None), getattr(trt.LayerType, "DEQUANTIZE", None)}
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(onnx_path: PathLike, engine_path: Optional[PathLike] = None, fp16: bool = True,
                 int8: Optional[bool] = None, workspace_gb: float = 4.0, min_batch: int = 1,
                 opt_batch: Optional[int] = None, max_batch: int = 32,
                 timing_cache: Optional[PathLike] = None, strongly_typed: bool = False,
                 verbose: bool = False) -> Path:
    """Build a serialized TensorRT engine from an ONNX file; returns the engine path.

    ``int8=None``: enable INT8 iff the network has Q/DQ layers (explicit quantization; no
    calibrator). ``fp16``: allow FP16 kernels for the rest (falls back to FP32 where FP16 is not
    available). ``strongly_typed``: build a strongly typed network instead (precision follows the
    ONNX types and Q/DQ; precision flags are not set). A dynamic batch dimension gets one
    optimization profile ``min_batch / opt_batch (default max_batch // 2) / max_batch``.
    ``timing_cache`` (default ``<engine>.timing.cache``) is loaded when present and saved after
    the build. Same as ``trtexec --onnx=M --fp16 --int8 --saveEngine=E
    --timingCacheFile=C --memPoolSize=workspace:<MiB>``.
    """
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX file not found")
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    cache_path = (Path(timing_cache) if timing_cache
                  else engine_path.with_name(engine_path.stem + ".timing.cache"))
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # EfficientNMS_TRT and other built-in plugins
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # TRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    has_qdq = _network_has_qdq(trt, network)
    if int8 is None:
        int8 = has_qdq
    if int8 and not has_qdq:
        raise ValueError(f"{onnx_path}: int8=True but the graph has no Q/DQ nodes; export a QDQ "
                         f"model (explicit quantization) - calibration in TensorRT is not used")
    if not strongly_typed:
        if fp16:
            if getattr(builder, "platform_has_fast_fp16", True):
                config.set_flag(trt.BuilderFlag.FP16)
            elif verbose:
                print("FP16 is not fast on this GPU; building FP32 (plus INT8 if requested)")
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)
    # dynamic batch -> one optimization profile
    profile = None
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
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(inp.name, (min_batch, *shape[1:]), (opt, *shape[1:]),
                              (max_batch, *shape[1:]))
    if profile is not None:
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log "
                           f"above; try --verbose or a larger --workspace)")
    _atomic_write(engine_path, memoryview(serialized))
    _atomic_write(cache_path, memoryview(config.get_timing_cache().serialize()))
    if verbose:
        mode = "strongly typed" if strongly_typed else \
            "+".join(["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else []))
        print(f"built {engine_path} ({mode}, {time.time() - t0:.1f}s); timing cache {cache_path}")
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
    """Execute a serialized engine with the TensorRT 10 tensor API on torch CUDA buffers.

    ``__call__(x)`` takes a (B, 3, H, W) tensor (moved to the engine's device/dtype) and returns
    ``{output name: tensor}`` on the GPU, enqueued on torch's current stream. Attributes:
    ``input_name``, ``output_names``, ``input_hw``, ``fixed_batch`` (None for dynamic batch),
    ``min_batch``/``max_batch`` (profile 0), ``device``.
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
                raise RuntimeError(f"{self.path}: could not deserialize the engine (built with "
                                   f"another TensorRT version or for another GPU? rebuild it)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input tensor, got {inputs}")
        self.input_name = inputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.out_dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n))
                           for n in self.output_names}
        self.input_hw = (int(shape[2]), int(shape[3])) if len(shape) == 4 else None
        if shape[0] >= 0:
            self.fixed_batch = self.min_batch = self.max_batch = int(shape[0])
        else:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.fixed_batch, self.min_batch, self.max_batch = None, int(lo[0]), int(hi[0])

    def __call__(self, x) -> Dict[str, "torch.Tensor"]:
        torch = self.torch
        x = x.to(self.device, self.input_dtype).contiguous()
        b = x.shape[0]
        if not self.min_batch <= b <= self.max_batch:
            raise ValueError(f"{self.path}: batch {b} outside the engine's range "
                             f"{self.min_batch}..{self.max_batch}")
        ctx = self.context
        ctx.set_input_shape(self.input_name, tuple(x.shape))
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.out_dtypes[name], device=self.device)
            ctx.set_tensor_address(name, t.data_ptr())
            outs[name] = t
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        return outs

    def info(self) -> Dict[str, object]:
        e = self.engine
        return {"engine": str(self.path), "input": self.input_name,
                "input_shape": tuple(e.get_tensor_shape(self.input_name)),
                "batch_range": (self.min_batch, self.max_batch),
                "outputs": {n: tuple(e.get_tensor_shape(n)) for n in self.output_names},
                "num_layers": e.num_layers, "tensorrt": self.trt.__version__}


def _bench(runner: TrtRunner, batch: int, iters: int, warmup: int = 20) -> Tuple[float, float]:
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
    ap = argparse.ArgumentParser(description="Build / inspect / benchmark TensorRT 10 engines "
                                             "from yolo_q ONNX exports.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="ONNX -> engine")
    b.add_argument("onnx")
    b.add_argument("--engine", help="output path (default: <onnx>.engine)")
    b.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    b.add_argument("--int8", choices=["auto", "on", "off"], default="auto",
                   help="auto: on iff the ONNX has Q/DQ nodes")
    b.add_argument("--workspace", type=float, default=4.0, help="GiB")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=None)
    b.add_argument("--max-batch", type=int, default=32)
    b.add_argument("--timing-cache", default=None)
    b.add_argument("--strongly-typed", action="store_true")
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
            int8 = {"auto": None, "on": True, "off": False}[args.int8]
            path = build_engine(args.onnx, args.engine, fp16=args.fp16, int8=int8,
                                workspace_gb=args.workspace, min_batch=args.min_batch,
                                opt_batch=args.opt_batch, max_batch=args.max_batch,
                                timing_cache=args.timing_cache,
                                strongly_typed=args.strongly_typed, verbose=args.verbose)
            print(path)
        elif args.cmd == "info":
            for k, v in TrtRunner(args.engine).info().items():
                print(f"{k}: {v}")
        else:
            ms, ips = _bench(TrtRunner(args.engine), args.batch, args.iters)
            print(f"batch {args.batch}: {ms:.3f} ms/batch, {ips:.1f} images/s")
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
