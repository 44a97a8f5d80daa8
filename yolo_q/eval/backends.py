"""Runtime backends behind one interface: ``backend(imgs) -> raw predictions (B, N, 5+nc)``.

``imgs`` is a float tensor (B, 3, H, W) in [0, 1] (uint8 / 255). Backends: a torch model
(:class:`TorchBackend`), ONNX Runtime (:class:`OrtBackend`), OpenVINO on CPU (:class:`OvBackend`;
optional ``openvino`` package: a float ONNX runs in FP32, a QDQ ONNX in INT8) and TensorRT
(:class:`TrtBackend`, via ``deploy/trt.py``; needs ``tensorrt`` and a CUDA GPU). A graph exported with end-to-end NMS
returns the tuple ``(num_dets, det_boxes, det_scores, det_classes)`` instead (``end2end=True``);
:func:`yolo_q.eval.evaluate` handles both.

Fixed-shape engines/graphs: a smaller input is padded right/bottom (letterbox grey, which keeps
box coordinates valid); a fixed batch is served by splitting and padding the batch.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from ..export.fp16 import is_fp16_graph, write_fp16
from ..export.qdq import resolve_ort_weights
from ..quant.load import load_model

__all__ = ["Backend", "TorchBackend", "OrtBackend", "OvBackend", "TrtBackend", "build_backend",
           "BACKEND_KINDS", "PAD_VALUE", "OV_HINTS", "OV_PRECISIONS", "openvino_missing",
           "ov_runtime_layers", "ov_precision_summary", "format_ov_summary"]

PAD_VALUE = 114 / 255.0  # letterbox grey
E2E_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
BACKEND_KINDS = ("torch", "onnxruntime", "openvino", "tensorrt")
_ALIASES = {"pt": "torch", "pytorch": "torch", "ort": "onnxruntime", "onnx": "onnxruntime",
            "ov": "openvino", "trt": "tensorrt"}
OV_HINTS = ("LATENCY", "THROUGHPUT")
OV_PRECISIONS = ("f32", "bf16", "f16")
PathLike = Union[str, os.PathLike]
REPO_ROOT = Path(__file__).resolve().parents[2]


class Backend:
    """Base class. Subclasses set ``kind``, ``device``, ``end2end``, ``input_hw`` (fixed (H, W)
    or None) and ``fixed_batch`` (int or None), and implement ``__call__``."""

    kind = "base"
    end2end = False
    device = torch.device("cpu")
    input_hw: Optional[Tuple[int, int]] = None
    fixed_batch: Optional[int] = None
    nc: Optional[int] = None  # classes the model predicts (None: unknown, e.g. end-to-end NMS)

    def __call__(self, imgs: torch.Tensor):
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, img_size=640, batch: int = 1, n: int = 1) -> None:
        """Run ``n`` dummy batches (first-call allocations, cudnn/TensorRT tactics)."""
        h, w = self.input_hw or ((img_size, img_size) if isinstance(img_size, int)
                                 else tuple(img_size))
        x = torch.zeros(batch, 3, h, w, device=self.device)
        for _ in range(n):
            self(x)
        self.synchronize()

    def __repr__(self):
        return (f"{type(self).__name__}(device={self.device}, input_hw={self.input_hw}, "
                f"fixed_batch={self.fixed_batch}, end2end={self.end2end})")


def _nc_from_shape(shape) -> Optional[int]:
    """Class count from a raw output shape ``(B, N, 5 + nc)``; None when not static."""
    shape = list(shape or [])
    last = shape[-1] if len(shape) == 3 else None
    return last - 5 if isinstance(last, int) and not isinstance(last, bool) and last > 5 else None


def _fit_hw(x: torch.Tensor, hw: Optional[Tuple[int, int]], source: str) -> torch.Tensor:
    """Pad (B, 3, h, w) right/bottom to a fixed (H, W); error if larger."""
    if hw is None or tuple(x.shape[-2:]) == tuple(hw):
        return x
    h, w = x.shape[-2:]
    H, W = hw
    if h > H or w > W:
        raise ValueError(f"{source}: input images are {h}x{w} but the model takes {H}x{W}; "
                         f"export/build it for a larger size or evaluate at {H}x{W}")
    return F.pad(x, (0, W - w, 0, H - h), value=PAD_VALUE)


def _run_batched(fn, x, fixed_batch: Optional[int], max_batch: Optional[int] = None):
    """Call ``fn`` on chunks of ``x`` that fit the model's batch: exactly ``fixed_batch``
    (padding the last chunk by repeating its last image) or at most ``max_batch``. Returns a
    tensor or tuple of tensors concatenated over the batch."""
    b = x.shape[0]
    step = fixed_batch or max_batch
    if not step or (b == step if fixed_batch else b <= step):
        return fn(x)
    outs = []
    for s in range(0, b, step):
        chunk = x[s:s + step]
        n = chunk.shape[0]
        if fixed_batch and n < fixed_batch:
            chunk = torch.cat((chunk, chunk[-1:].expand(fixed_batch - n, *chunk.shape[1:])))
        y = fn(chunk)
        outs.append(tuple(t[:n] for t in y) if isinstance(y, tuple) else y[:n])
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


class TorchBackend(Backend):
    """A torch model (eval mode). ``fuse``/``half`` work on a deep copy; ``half`` needs CUDA."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module, device=None, fuse: bool = False,
                 half: bool = False):
        if fuse or half:
            model = copy.deepcopy(model)
        if fuse:
            if not callable(getattr(model, "fuse", None)):
                raise TypeError(f"{type(model).__name__} has no fuse() method")
            model.fuse()
        p = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (
            p.device if p is not None else torch.device("cpu"))
        if half and self.device.type != "cuda":
            raise ValueError(f"half=True needs a CUDA device, got {self.device}")
        self.model = model.to(self.device).eval()
        nc = getattr(model, "nc", None)
        nc = nc if nc is not None else getattr(getattr(model, "detect", None), "nc", None)
        self.nc = int(nc) if isinstance(nc, int) else None
        self.dtype = torch.float16 if half else torch.float32
        if half:
            self.model.half()

    @torch.no_grad()
    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            self.model.eval()
        y = self.model(imgs.to(self.device, self.dtype))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y.float()


class OrtBackend(Backend):
    """ONNX Runtime session. ``threads``: intra-op threads (None: ORT default).
    ``providers``: list, or None for auto (CUDA when available and torch sees a GPU, then
    CPU)."""

    kind = "onnxruntime"

    def __init__(self, onnx_path: PathLike, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError("ONNX Runtime backend needs onnxruntime: pip install "
                               "onnxruntime (or onnxruntime-gpu)") from None
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if "CUDAExecutionProvider" in available and torch.cuda.is_available():
                providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=list(providers))
        except Exception as e:  # noqa: BLE001  (ORT raises its own exception types)
            raise RuntimeError(f"{self.path}: ONNX Runtime could not load the model: "
                               f"{str(e).splitlines()[0]}") from e
        self.providers = self.session.get_providers()
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("ort_weights") == "int8" and \
                self.providers[0] == "CPUExecutionProvider":
            if resolve_ort_weights("auto") == "uint8":
                warnings.warn(f"{self.path}: int8 weights on a CPU without VNNI: ONNX Runtime's "
                              f"u8 x s8 kernels can saturate here and lose accuracy; re-export "
                              f"with export.ort_weights=uint8", RuntimeWarning, stacklevel=2)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ValueError(f"{self.path}: expected a (B, 3, H, W) input, got {shape}")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_hw = ((shape[2], shape[3]) if all(isinstance(v, int) and v > 0
                                                     for v in shape[2:]) else None)
        self.np_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.end2end = set(E2E_OUTPUTS) <= set(self.output_names)
        self._outputs = (list(E2E_OUTPUTS) if self.end2end else
                         ["outputs" if "outputs" in self.output_names else self.output_names[0]])
        if not self.end2end:  # output channels - 5 (box, objectness)
            out = self.session.get_outputs()[self.output_names.index(self._outputs[0])]
            self.nc = _nc_from_shape(out.shape)
        self.device = torch.device("cpu")

    def _run(self, x: torch.Tensor):
        arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(self.np_dtype, copy=False))
        outs = self.session.run(self._outputs, {self.input_name: arr})
        ts = [torch.from_numpy(np.asarray(o)) for o in outs]
        if self.end2end:
            return tuple(ts)
        return ts[0].float()

    def __call__(self, imgs: torch.Tensor):
        x = _fit_hw(imgs.float(), self.input_hw, str(self.path))
        return _run_batched(self._run, x, self.fixed_batch)


def openvino_missing() -> Optional[str]:
    """None when the optional ``openvino`` package imports, else why not (one line)."""
    try:
        import openvino  # noqa: F401
        return None
    except ImportError as e:
        return (f"OpenVINO backend needs the openvino package (pip install -c constraints.txt "
                f"'.[openvino]'): {e}")


def _ov_static(dim) -> Optional[int]:
    return dim.get_length() if dim.is_static else None


def ov_compile(onnx_path: PathLike, threads: Optional[int] = None, hint: str = "LATENCY",
               precision: str = "f32", batch: Optional[int] = None, perf_count: bool = False):
    """Read an ONNX file and compile it for the OpenVINO CPU plugin: ``threads`` inference
    threads (None: OpenVINO's default, all cores), performance ``hint`` LATENCY (one stream:
    every thread on one request; what a synchronous call of one batch wants) or THROUGHPUT
    (several streams, for parallel requests), ``precision`` of the non-INT8 layers (``f32``
    by default; OpenVINO itself would pick bf16 on CPUs with AMX/AVX512-BF16, which is faster
    but no longer FP32-exact; None leaves OpenVINO's default), ``batch``: reshape a dynamic batch to this static size (static
    shapes compile to faster kernels). A QDQ ONNX runs its quantized layers in INT8 (OpenVINO's
    low-precision transformations fuse the Q/DQ pairs into integer convolutions). ``perf_count``:
    per-layer timing (``request.profiling_info``). Also reads OpenVINO IR (.xml)."""
    why = openvino_missing()
    if why:
        raise RuntimeError(why)
    import openvino as ov
    hint = str(hint).upper()
    if hint not in OV_HINTS:
        raise ValueError(f"OpenVINO hint must be one of {', '.join(OV_HINTS)}, got {hint!r}")
    if precision is not None and precision not in OV_PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {', '.join(OV_PRECISIONS)}, "
                         f"got {precision!r}")
    core = ov.Core()
    try:
        model = core.read_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001  (OpenVINO raises its own exception types)
        raise RuntimeError(f"{onnx_path}: OpenVINO could not read the model: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from e
    if batch:
        shape = model.input(0).get_partial_shape()
        shape[0] = int(batch)
        model.reshape({model.input(0).get_any_name(): shape})
    props = ov.properties
    config = {props.hint.performance_mode: getattr(props.hint.PerformanceMode, hint)}
    if precision is not None:  # None: OpenVINO's default for this CPU
        config[props.hint.inference_precision] = getattr(ov.Type, precision)
    if threads:
        config[props.inference_num_threads] = int(threads)
    if perf_count:
        config[props.enable_profiling] = True
    return core.compile_model(model, "CPU", config)


OV_INT8 = ("u8", "i8")
# runtime layer types whose precision says whether the work runs in integer
OV_COMPUTE = ("Convolution", "Deconvolution", "Concatenation", "Pooling", "Interpolate",
              "Subgraph", "Eltwise", "FakeQuantize")
_OV_SKIP = ("Const", "Input", "Output", "Parameter", "Result")


def ov_runtime_layers(compiled) -> list:
    """The layers OpenVINO actually executes (``compiled.get_runtime_model()``, after its
    low-precision transformations and fusions), in execution order: ``name`` (first original
    layer fused into it, else the runtime node's name), ``type`` (``layerType``),
    ``precision`` (``runtimePrecision``: u8/i8 = integer kernel), ``out`` (output
    precisions), ``inputs`` (precisions of the non-constant inputs), ``primitive``
    (``primitiveType``, e.g. ``brgconv_avx512_amx_I8``) and ``fused`` (all original layers)."""
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        get = (lambda k: info[k].astype(str) if k in info else "")  # noqa: E731
        kind = get("layerType")
        if kind in _OV_SKIP:
            continue
        fused = [n for n in get("originalLayersNames").split(",") if n]
        srcs = [i.get_source_output().get_node() for i in op.inputs()]
        inputs = [s.get_rt_info()["outputPrecisions"].astype(str) for s in srcs
                  if s.get_rt_info()["layerType"].astype(str) != "Const"]
        named = [n for n in fused if n.startswith("/")] or fused or [op.get_friendly_name()]
        rows.append(dict(name=named[0], type=kind,
                         precision=get("runtimePrecision"), out=get("outputPrecisions"),
                         inputs=inputs, primitive=get("primitiveType"), fused=fused))
    return rows


def ov_precision_summary(compiled_or_layers) -> dict:
    """Which runtime layers of an OpenVINO compiled model run in integer, from
    :func:`ov_runtime_layers` (or a list it returned): ``counts`` ``{layerType: {"int8": n,
    "float": m}}`` for the compute layers (:data:`OV_COMPUTE`); ``float`` ``{layerType:
    [names]}`` of those running in float; ``conv_out`` output precisions of the
    (de)convolutions (``f32`` = the next layer gets a float tensor); ``reorders`` /
    ``converts`` (names, precision: ``u8->f32`` style); ``requantize``: int8 -> int8 elementwise
    subgraphs (a Q/DQ pair OpenVINO could not fold into the producer, e.g. two grids meeting
    at a Concat)."""
    layers = compiled_or_layers if isinstance(compiled_or_layers, list) \
        else ov_runtime_layers(compiled_or_layers)
    counts: dict = {}
    floats: dict = {}
    conv_out: dict = {}
    reorders, converts, requant = [], [], []
    for r in layers:
        t = r["type"]
        if t in OV_COMPUTE:
            kind = "int8" if r["precision"] in OV_INT8 else "float"
            counts.setdefault(t, {"int8": 0, "float": 0})[kind] += 1
            if kind == "float":
                floats.setdefault(t, []).append(r["name"])
        if t in ("Convolution", "Deconvolution"):
            conv_out[r["out"]] = conv_out.get(r["out"], 0) + 1
        io = f"{','.join(r['inputs'])}->{r['out']}"
        if t == "Reorder":
            reorders.append(f"{r['name']} ({io})")
        elif t == "Convert":
            converts.append(f"{r['name']} ({io})")
        elif t in ("Subgraph", "Eltwise") and r["inputs"] and r["out"] in OV_INT8 \
                and all(p in OV_INT8 for p in r["inputs"]):
            requant.append(r["name"])
    return dict(counts=counts, float=floats, conv_out=conv_out, reorders=reorders,
                converts=converts, requantize=requant)


def format_ov_summary(summary: dict) -> str:
    """One line of :func:`ov_precision_summary`: int8/total per compute layer type, conv output
    precisions, reorder / convert / requantize counts."""
    counts = summary["counts"]
    parts = [f"{t} {counts[t]['int8']}/{counts[t]['int8'] + counts[t]['float']} int8"
             for t in OV_COMPUTE if t in counts]
    outs = ", ".join(f"{k} {v}" for k, v in sorted(summary["conv_out"].items()))
    return (f"{'; '.join(parts)}; conv outputs {outs or '-'}; {len(summary['reorders'])} Reorder, "
            f"{len(summary['converts'])} Convert, {len(summary['requantize'])} requantize")


class OvBackend(Backend):
    """OpenVINO on CPU from an ONNX file (float -> FP32, QDQ -> INT8); see :func:`ov_compile`
    for ``threads``, ``hint`` and ``precision``."""

    kind = "openvino"

    def __init__(self, onnx_path: PathLike, threads: Optional[int] = None, hint: str = "LATENCY",
                 precision: Optional[str] = "f32"):
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        self.compiled = ov_compile(self.path, threads, hint, precision)
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.input(0).get_partial_shape()
        if shape.rank.is_dynamic or len(shape) != 4:
            raise ValueError(f"{self.path}: expected a (B, 3, H, W) input, got {shape}")
        self.fixed_batch = _ov_static(shape[0])
        hw = (_ov_static(shape[2]), _ov_static(shape[3]))
        self.input_hw = hw if None not in hw else None
        names = {n: i for i, o in enumerate(self.compiled.outputs) for n in o.get_names()}
        self.end2end = set(E2E_OUTPUTS) <= set(names)
        self._outputs = ([names[n] for n in E2E_OUTPUTS] if self.end2end else
                         [names.get("outputs", 0)])
        if not self.end2end:
            out = self.compiled.output(self._outputs[0]).get_partial_shape()
            self.nc = _nc_from_shape([_ov_static(d) for d in out] if out.rank.is_static else [])
        self.device = torch.device("cpu")

    def _run(self, x: torch.Tensor):
        arr = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32, copy=False))
        self.request.infer({0: arr})
        ts = [torch.from_numpy(np.array(self.request.get_output_tensor(i).data))
              for i in self._outputs]
        return tuple(ts) if self.end2end else ts[0].float()

    def __call__(self, imgs: torch.Tensor):
        x = _fit_hw(imgs.float(), self.input_hw, str(self.path))
        return _run_batched(self._run, x, self.fixed_batch)


def load_deploy_trt():
    """Import ``deploy/trt.py`` lazily: as ``deploy.trt`` when the repository root is on the path,
    else from the file next to the package (a source checkout)."""
    try:
        mod = importlib.import_module("deploy.trt")
        if hasattr(mod, "require_tensorrt"):
            return mod
    except ImportError:
        pass
    path = REPO_ROOT / "deploy" / "trt.py"
    if not path.is_file():
        raise RuntimeError(f"TensorRT backend: {path} not found (it ships with the yolo_q "
                           f"source tree)")
    name = "yolo_q_deploy_trt"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class TrtBackend(Backend):
    """TensorRT engine (``.engine``/``.plan``) or an ONNX file built into one first.

    From an ONNX, the strongly typed engine computes in the ONNX's types: with ``fp16=True``
    (default) the ONNX is first rewritten to FP16 for every non-INT8 tensor
    (:func:`yolo_q.export.fp16.write_fp16`, ``<stem>_fp16.onnx`` in ``cache_dir``; skipped for
    a graph that is FP16 already), so a float ONNX gives an FP16 engine and a QDQ ONNX an
    INT8 + FP16 engine; ``fp16=False`` builds the ONNX as it is (FP32 / INT8 + FP32).
    ``int8=True`` requires Q/DQ nodes (INT8 comes only from a QDQ export), ``False`` forbids
    them, ``None`` takes the graph as it is. Engines are cached in ``cache_dir`` (default: next
    to the ONNX) under a key of the ONNX content, the build options, the TensorRT version and
    the GPU name (:func:`deploy.trt.cached_engine`). Without tensorrt or CUDA this raises
    ``TensorRTUnavailable`` (a RuntimeError) with a one-line explanation."""

    kind = "tensorrt"

    def __init__(self, engine_or_onnx: PathLike, fp16: bool = True, int8: Optional[bool] = None,
                 workspace_gb: float = 4.0, max_batch: int = 32, cache_dir: Optional[PathLike] = None,
                 device=None, rebuild: bool = False, verbose: bool = False):
        trt_mod = load_deploy_trt()
        trt_mod.require_tensorrt()  # one-line RuntimeError when tensorrt/CUDA is missing
        src = Path(engine_or_onnx)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: TensorRT engine or ONNX file not found")
        if src.suffix.lower() == ".onnx":
            engine_path = self._engine_for_onnx(trt_mod, src, fp16, int8, workspace_gb,
                                                max_batch, cache_dir, device, rebuild, verbose)
        else:
            engine_path = src
        self.path = engine_path
        self.runner = trt_mod.TrtRunner(engine_path, device=device)
        self.device = self.runner.device
        self.input_hw = self.runner.input_hw
        self.fixed_batch = self.runner.fixed_batch
        self.max_batch = self.runner.max_batch
        self.end2end = set(E2E_OUTPUTS) <= set(self.runner.output_names)
        self._out = "outputs" if "outputs" in self.runner.output_names else \
            self.runner.output_names[0]
        if not self.end2end:  # output channels - 5 (box, objectness)
            self.nc = _nc_from_shape(self.runner.output_shapes[self._out])

    @staticmethod
    def _engine_for_onnx(trt_mod, src: Path, fp16, int8, workspace_gb, max_batch, cache_dir,
                         device, rebuild, verbose) -> Path:
        has_qdq = trt_mod.onnx_has_qdq(src)
        if int8 is False and has_qdq:
            raise ValueError(f"{src}: int8=False but the ONNX is a QDQ (INT8) graph; use the "
                             f"float export for an FP16/FP32 engine")
        onnx_path = src
        if fp16 and not is_fp16_graph(src):
            out_dir = Path(cache_dir) if cache_dir else src.parent
            onnx_path = out_dir / f"{src.stem}_fp16.onnx"
            if rebuild or not onnx_path.is_file() or \
                    onnx_path.stat().st_mtime < src.stat().st_mtime:
                write_fp16(src, onnx_path)
        return trt_mod.cached_engine(onnx_path, cache_dir=cache_dir, device=device,
                                     rebuild=rebuild, verbose=verbose,
                                     workspace_gb=float(workspace_gb), max_batch=int(max_batch),
                                     require_int8=bool(int8))

    def _run(self, x: torch.Tensor):
        outs = self.runner(x)
        if self.end2end:
            return tuple(outs[n] for n in E2E_OUTPUTS)
        return outs[self._out].float()

    def __call__(self, imgs: torch.Tensor):
        x = _fit_hw(imgs.to(self.device, torch.float32), self.input_hw, str(self.path))
        return _run_batched(self._run, x, self.fixed_batch, self.max_batch)


def build_backend(kind: str, source=None, **kwargs) -> Backend:
    """Backend by name: ``torch`` (``source``: a model, or a checkpoint path loaded with
    :func:`yolo_q.load_model`; kwargs ``cfg``, ``device``, ``fuse``, ``half``),
    ``onnxruntime``/``ort`` (``source``: .onnx; ``threads``, ``providers``),
    ``openvino``/``ov`` (``source``: .onnx; ``threads``, ``hint``, ``precision``),
    ``tensorrt``/``trt`` (``source``: .engine or .onnx; see :class:`TrtBackend`)."""
    kind = _ALIASES.get(kind.lower(), kind.lower())
    if kind not in BACKEND_KINDS:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_KINDS)}, got {kind!r}")
    if source is None:
        raise ValueError(f"{kind} backend needs a source (model, checkpoint, ONNX or engine)")
    if isinstance(source, Backend):
        return source
    if kind == "torch":
        if isinstance(source, torch.nn.Module):
            kwargs.pop("cfg", None)  # a built model has its own structure
            return TorchBackend(source, **kwargs)
        cfg = kwargs.pop("cfg", None)
        device = kwargs.pop("device", "cpu")
        fuse = kwargs.pop("fuse", True)
        model = load_model(source, cfg=cfg, device=device)
        return TorchBackend(model, device=device, fuse=fuse, **kwargs)
    if kind == "onnxruntime":
        return OrtBackend(source, **kwargs)
    if kind == "openvino":
        return OvBackend(source, **kwargs)
    return TrtBackend(source, **kwargs)
