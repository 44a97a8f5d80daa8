"""Speed measurements behind ``tools/benchmark.py`` (not part of the test suite's assertions).

* :func:`speed_benchmark`: inference latency (median, p90) and throughput of torch FP32 eager
  (unfused) and fused, ONNX Runtime FP32, ONNX Runtime INT8 of our QDQ flavours,
  ``onnxruntime.quantization.quantize_static`` of the same float ONNX (QDQ, per-channel; the
  reference row) and TensorRT when present, with speed-ups vs ONNX Runtime FP32.
* :func:`train_benchmark`: images/s of one training step (forward + DetectionLoss + backward +
  SGD step) on random images and random targets (seeded).

Timings on a shared CPU drift; every measurement here runs the candidates round-robin
(:func:`round_robin`, rotating the order each round) so that drift hits all of them alike, and
ratios are only computed between rows of the same run. Denormals are flushed to zero.
"""
from __future__ import annotations

import concurrent.futures
import copy
import functools
import logging
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data.images import image_batches
from .engine.session import build_optimizer_for
from .eval.api import val_loader_for
from .eval.backends import (TorchBackend, TrtBackend, build_backend, format_ov_summary,
                            load_deploy_trt, ov_compile, ov_precision_summary,
                            openvino_missing)
from .eval.coco import COCOEvaluator
from .eval.runner import evaluate
from .config import copy_config
from .export.api import quick_ptq
from .export.onnx import export_onnx, shared_initializers
from .export.qdq import export_qdq, ort_optimized_op_counts, resolve_ort_weights
from .io import flush_denormal, read_checkpoint_any
from .losses import DetectionLoss
from .models import build_model
from .quant import is_quantized, load_model, quant_state

__all__ = ["FLAGS_OF_INTEREST", "cpu_info", "round_robin", "summarize_times",
           "randomize_weights", "normalize_activations_", "random_targets", "make_train_step", "train_benchmark",
           "speed_benchmark", "format_speed_table", "format_train_table", "ov_layer_times",
           "format_ov_layer_times"]

# oneDNN's instruction-set cap, honoured by OpenVINO's CPU plugin (not by ONNX Runtime's MLAS):
# ONEDNN_MAX_CPU_ISA=AVX2 or AVX512_CORE runs OpenVINO as on a CPU without VNNI,
# AVX512_CORE_VNNI as on one with VNNI but no AMX.
ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                     "amx_int8", "amx_bf16")


# ------------------------------------------------------------------------------ environment
def cpu_info() -> Dict[str, Any]:
    """CPU model name (``lscpu``, else /proc/cpuinfo), the flags of interest that are present,
    logical CPUs, load average and library versions."""
    model, flags = platform.processor() or "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                model = val.strip()
            elif key.strip() == "Flags":
                flags = set(val.split())
    except (OSError, subprocess.SubprocessError):
        pass
    if not flags and Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
                break
    versions = {"torch": torch.__version__}
    for pkg in ("onnxruntime", "openvino", "nncf"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except (ImportError, AttributeError):
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"model": model, "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
            "cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in load] if load else None,
            "versions": versions, "isa_cap": os.environ.get(ISA_CAP_ENV) or None}


def cpu_line(info: Optional[Dict[str, Any]] = None) -> str:
    """One line: CPU model, CPU count, flags of interest, load average, library versions."""
    info = info or cpu_info()
    flags = " ".join(info["flags"]) or "none of " + ",".join(FLAGS_OF_INTEREST)
    load = f", load avg {info['loadavg'][0]:.2f}" if info.get("loadavg") else ""
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    cap = (f"; OpenVINO/oneDNN ISA capped at {info['isa_cap']} ({ISA_CAP_ENV})"
           if info.get("isa_cap") else "")
    return f"CPU: {info['model']} ({info['cpus']} CPUs; flags: {flags}{load}; {vers}{cap})"


# ------------------------------------------------------------------------------ timing
def round_robin(fns: Dict[str, Callable[[], Any]], iters: int, warmup: int = 1,
                sync: Optional[Dict[str, Callable[[], Any]]] = None
                ) -> Dict[str, List[float]]:
    """Time each callable ``iters`` times, interleaved: round ``i`` runs all of them, starting
    at a rotating position. ``warmup`` untimed calls each first. ``sync[name]`` (e.g. CUDA
    synchronize) is called before stopping that clock. Returns seconds per call."""
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
        if sync and n in sync:
            sync[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(iters):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            if sync and n in sync:
                sync[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def summarize_times(seconds: Sequence[float], batch: int) -> Dict[str, float]:
    """Median / p90 latency (ms) and throughput (images/s at the median)."""
    a = np.asarray(seconds, dtype=np.float64)
    med = float(np.median(a))
    return {"median_ms": 1000 * med, "p90_ms": 1000 * float(np.percentile(a, 90)),
            "min_ms": 1000 * float(a.min()), "img_per_s": batch / med, "iters": int(a.size)}


# ------------------------------------------------------------------------------ models/data
@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0, gain: float = 1.0,
                      gamma_min: float = 0.5) -> torch.nn.Module:
    """Random weights, biases and BN statistics (in place): conv weights of std
    ``(gain / fan_in) ** 0.5``, BN gammas in ``[gamma_min, gamma_min + 0.5)``.
    A fresh model's identical zero biases are merged into one shared initializer by the ONNX
    exporter, which then cannot be quantized per layer: benchmark exports need this (or
    trained weights)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + gamma_min)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and m.weight.requires_grad:
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (gain / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@torch.no_grad()
def normalize_activations_(model: torch.nn.Module, x: torch.Tensor, special=None,
                           types=(torch.nn.Conv2d, torch.nn.ConvTranspose2d)) -> torch.nn.Module:
    """Rescale every conv of ``types`` (in execution order, one forward pass on ``x``) so its
    output has unit std, as in a trained network: random RepVGG weights otherwise grow
    activations by orders of magnitude. ``special(conv, input)``, when given, may set a conv's
    weights itself and return True (e.g. prediction convs given logit-like outputs); that
    conv's output is then recomputed, not rescaled."""
    def hook(mod, inp, out):
        if special is not None and special(mod, inp[0]):
            return mod._conv_forward(inp[0], mod.weight, mod.bias)
        s = out.std().clamp(min=1e-6)
        mod.weight.div_(s)
        if mod.bias is not None:
            mod.bias.div_(s)
        return out / s
    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, types) and m.weight.requires_grad]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return model


def random_images(batch: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (B, 3, S, S): low-frequency patterns plus noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(1, img_size // 16), max(1, img_size // 16), generator=g)
    x = torch.nn.functional.interpolate(low, size=(img_size, img_size), mode="bilinear",
                                        align_corners=False)
    x = (0.85 * x + 0.15 * torch.rand(batch, 3, img_size, img_size, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def random_targets(batch: int, img_size: int, nc: int, per_image: int = 8, seed: int = 0
                   ) -> torch.Tensor:
    """Deterministic random targets ``(batch*per_image, 6)`` = [batch_idx, cls, x1, y1, x2, y2]
    in pixels; box sides 4..50% of the image, fully inside it."""
    g = torch.Generator().manual_seed(seed)
    n = batch * per_image
    wh = (torch.rand(n, 2, generator=g) * 0.46 + 0.04) * img_size
    xy = torch.rand(n, 2, generator=g) * (img_size - wh)
    cls = torch.randint(0, nc, (n, 1), generator=g).float()
    bidx = torch.arange(batch).repeat_interleave(per_image).float()[:, None]
    return torch.cat((bidx, cls, xy, xy + wh), 1)


# ------------------------------------------------------------------------------ training step
def make_train_step(cfg, batch: int = 8, img_size: int = 320, seed: int = 0,
                    per_image: int = 8) -> Tuple[Callable[[], float], torch.nn.Module]:
    """One closure = one training step of ``build_model(cfg)`` (train mode) on fixed random
    images and targets: forward, ``DetectionLoss``, backward, SGD/AdamW step (the configured
    optimizer and parameter groups), zero grads. Returns ``(step, model)``; ``step()`` returns
    the loss."""

    torch.manual_seed(seed)
    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size = int(batch)
    cfg.train.nominal_batch = int(batch)  # one optimizer step per training step
    model = build_model(cfg).train()
    optimizer = build_optimizer_for(model, cfg, reinit=True)
    loss_fn = DetectionLoss.from_config(cfg)
    imgs = random_images(batch, img_size, seed).float() / 255.0
    targets = random_targets(batch, img_size, int(cfg.model.nc), per_image, seed)

    def step() -> float:
        out = model(imgs)
        loss, _ = loss_fn(out, targets, 10)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, model


def train_benchmark(cfg, batch: int = 8, img_size: int = 320, threads: int = 2,
                    warmup: int = 3, steps: int = 10, seed: int = 0,
                    extra: Optional[Dict[str, Callable[[], Any]]] = None) -> Dict[str, Any]:
    """Median seconds per training step and images/s (see :func:`make_train_step`) after
    ``warmup`` steps; ``extra`` callables (e.g. another implementation's step) are timed
    round-robin with ours. Returns ``{"rows": [...], "cpu": ..., "settings": ...}``."""
    if img_size % 32:
        raise ValueError(f"--imgsz {img_size} must be a multiple of 32")
    torch.set_num_threads(int(threads))
    with flush_denormal():
        step, _ = make_train_step(cfg, batch, img_size, seed)
        fns = {"yolo_q": step, **(extra or {})}
        times = round_robin(fns, steps, warmup)
    rows = []
    for name, t in times.items():
        s = summarize_times(t, batch)
        rows.append({"impl": name, "model": str(cfg.model.name), "batch": batch,
                     "img_size": img_size, "threads": threads,
                     "s_per_step": s["median_ms"] / 1000, "p90_s": s["p90_ms"] / 1000,
                     "img_per_s": s["img_per_s"], "steps": s["iters"]})
    base = rows[0]["s_per_step"]
    for r in rows:
        r["speedup_vs_yolo_q"] = base / r["s_per_step"]
    return {"rows": rows, "cpu": cpu_info(),
            "settings": dict(batch=batch, img_size=img_size, threads=threads, warmup=warmup,
                             steps=steps, seed=seed)}


def format_train_table(res: Dict[str, Any]) -> str:
    """The rows of :func:`train_benchmark` as fixed-width text under the CPU line."""
    lines = [cpu_line(res["cpu"]),
             f"{'impl':<12}{'model':<10}{'batch':>6}{'imgsz':>7}{'thr':>5}{'s/step':>9}"
             f"{'p90 s':>8}{'img/s':>8}{'vs yolo_q':>11}"]
    for r in res["rows"]:
        lines.append(f"{r['impl']:<12}{r['model']:<10}{r['batch']:>6}{r['img_size']:>7}"
                     f"{r['threads']:>5}{r['s_per_step']:>9.3f}{r['p90_s']:>8.3f}"
                     f"{r['img_per_s']:>8.2f}{r['speedup_vs_yolo_q']:>10.2f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ inference
def _ort_session(path, threads: int, spin: bool = False, defaults: bool = False):
    """A CPU session with ``threads`` intra-op threads. ``spin=False`` stops ORT's idle
    threads from busy-waiting after each run, which would steal the cores from the torch rows
    that run next in the round-robin (and from other processes on a shared machine).
    ``defaults``: ORT's default session options except the thread count (idle threads spin)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    if defaults:
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def decode_nodes(fp32_onnx: Path) -> List[str]:
    """Names of the box-decoding nodes of our float ONNX (the nodes directly under
    ``/detect/``, after the prediction convs): the part our exports leave float, which the
    peers' quantizers are told to leave float too (ONNX Runtime's ``nodes_to_exclude``, NNCF's
    ``IgnoredScope``; OpenVINO keeps ONNX node names as its operations' names)."""
    import onnx
    return [n.name for n in onnx.load(str(fp32_onnx)).graph.node
            if n.name.startswith("/detect/") and n.name.count("/") == 2]


def _quantize_static(fp32_onnx: Path, out: Path, calib: Sequence[np.ndarray]) -> Path:
    """``onnxruntime.quantization.quantize_static``: QDQ format, per-channel weights, its
    default int8 types, calibrated (MinMax) on ``calib`` (float arrays (B, 3, H, W)). The box
    decoding after the prediction convs (the nodes directly under ``/detect/``) is excluded,
    as our exports leave it float: by default quantize_static also quantizes the output Concat
    of boxes (pixels) and scores (0..1) on one int8 grid (step ~2.5 at 640 px), which sets
    every score to 0 or 2.5 (mAP 0)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"images": x}

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # it logs one INFO line per rescaled bias
    try:
        quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, nodes_to_exclude=decode_nodes(fp32_onnx))
    finally:
        root.setLevel(level)
    return out


def _nncf_quantize(fp32_onnx: Path, out: Path, calib: Sequence[np.ndarray]) -> Path:
    """NNCF post-training quantization (``nncf.quantize``, default preset and settings) of the
    float ONNX read by OpenVINO, calibrated on ``calib``, the box decoding left float
    (``IgnoredScope``, as Ultralytics' NNCF export does for its decode: quantized, NNCF's
    default puts boxes in pixels and scores on shared int8 grids and loses ~20 points of mAP
    on the reference model); saved as OpenVINO IR (``out``.xml)."""
    import nncf
    import openvino as ov
    model = ov.Core().read_model(str(fp32_onnx))
    names = {op.get_friendly_name() for op in model.get_ops()}
    ignored = nncf.IgnoredScope(names=[n for n in decode_nodes(fp32_onnx) if n in names],
                                validate=False)
    images = [x[i:i + 1] for x in calib for i in range(len(x))]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        qmodel = nncf.quantize(model, nncf.Dataset(images), subset_size=len(images),
                               ignored_scope=ignored)
    finally:
        root.setLevel(level)
    ov.save_model(qmodel, str(out), compress_to_fp16=False)
    return out


def _trt_available() -> Optional[str]:
    """None when TensorRT + CUDA can run here, else why not (one line)."""
    try:
        load_deploy_trt().require_tensorrt()
        return None
    except Exception as e:  # noqa: BLE001
        return str(e).splitlines()[0] if str(e) else type(e).__name__


# ------------------------------------------------------------------------------ runtimes
@dataclass
class Runtime:
    """One row of the speed table: its label, the model file it runs (a key of the exported
    files; None for torch), ``runner(bench, path) -> prepare(x_tensor, x_numpy) -> (fn, sync)``,
    whether it is an FP32 row (speed-ups are against the fastest FP32 row of the same batch),
    ``missing() -> None | why`` for a runtime whose package may be absent (the row is then
    skipped) and ``backend``: ``(kind, kwargs)`` of :func:`yolo_q.eval.build_backend` that
    computes this row's mAP (None: the torch model of the row). Adding a runtime is one entry
    in :data:`RUNTIMES` (plus its model file in :func:`_bench_onnx`)."""
    label: str
    onnx: Optional[str]
    runner: Callable
    fp32: bool = False
    missing: Optional[Callable[[], Optional[str]]] = None
    backend: Optional[Tuple[str, Dict[str, Any]]] = ("onnxruntime", {})

    @property
    def needs_tensorrt(self) -> bool:
        return self.missing is _trt_available


def _torch_runner(attr: str):
    def runner(bench: "_Bench", path):
        model = getattr(bench, attr)
        return lambda x_t, x_np: (lambda: _torch_run(model, x_t), None)
    return runner


def _ort_runner(defaults: bool = False):
    """ONNX Runtime with our session options (:func:`_ort_session`), or with ORT's defaults
    (only the thread count set: idle threads spin, as a user gets it)."""
    def runner(bench: "_Bench", path):
        session = _ort_session(path, bench.threads, bench.ort_spin, defaults=defaults)
        name = session.get_inputs()[0].name
        return lambda x_t, x_np: (lambda: session.run(None, {name: x_np}), None)
    return runner


def _ov_runner(precision: Optional[str] = "f32"):
    """OpenVINO CPU, ``inference_num_threads`` = threads, LATENCY hint (one synchronous
    request per batch), the model reshaped to each batch size (static shapes); ``precision``
    of the float layers (None: OpenVINO's default for the CPU)."""
    def runner(bench: "_Bench", path):
        def prepare(x_t, x_np):
            compiled = ov_compile(path, bench.threads, "LATENCY", precision,
                                  batch=int(x_np.shape[0]))
            bench.ov_graphs[(str(path), int(x_np.shape[0]))] = format_ov_summary(
                ov_precision_summary(compiled))
            request = compiled.create_infer_request()
            return (lambda: request.infer({0: x_np})), None
        return prepare
    return runner


def _trt_runner(**kwargs):
    """Float ONNX -> FP16 engine, QDQ ONNX -> INT8 + FP16 engine (strongly typed; the precision
    comes from the ONNX, see ``deploy/README.md``)."""
    def runner(bench: "_Bench", path):
        engine = TrtBackend(path, fp16=True, max_batch=bench.max_batch, **kwargs)

        def prepare(x_t, x_np):
            xg = x_t.to(engine.device)
            return (lambda: engine(xg)), engine.synchronize
        return prepare
    return runner


def _nncf_missing() -> Optional[str]:
    why = openvino_missing()
    if why:
        return why
    try:
        import nncf  # noqa: F401
        return None
    except ImportError as e:
        return f"needs nncf (pip install -c constraints.txt nncf): {e}"


_OV = ("openvino", {})
# our QDQ exports: variant -> (flavour, config overrides): "onnxruntime_post" quantizes SiLU
# outputs after the activation (the conv stays float in ORT), "onnxruntime_int8out" also
# quantizes the prediction convs' outputs (no high-precision outputs: every conv integer);
# "_s8": signed activations stored as int8 (zero point 0, for OpenVINO; the same fake-quant
# model as the variant without it, so it is quantized once)
QDQ_VARIANTS = {"onnxruntime": ("onnxruntime", []),
                "onnxruntime_s8": ("onnxruntime", ["export.act_storage=int8"]),
                "onnxruntime_post": ("onnxruntime", ["quant.preact_output=false"]),
                "onnxruntime_post_s8": ("onnxruntime", ["quant.preact_output=false",
                                                        "export.act_storage=int8"]),
                "onnxruntime_int8out": ("onnxruntime", ["quant.high_precision_outputs=false"]),
                "tensorrt": ("tensorrt", [])}
RUNTIMES: Dict[str, Runtime] = {
    "torch_eager": Runtime("torch FP32 eager (unfused)", None, _torch_runner("eager"), True,
                           backend=None),
    "torch_fused": Runtime("torch FP32 fused", None, _torch_runner("fused"), True, backend=None),
    "ort_fp32": Runtime("ORT FP32", "ort_fp32", _ort_runner(), True),
    "ort_fp32_default": Runtime("ORT FP32, ORT default options", "ort_fp32",
                                _ort_runner(defaults=True), True),
    "ov_fp32": Runtime("OpenVINO FP32", "ort_fp32", _ov_runner(), True, openvino_missing, _OV),
    # OpenVINO's own default float precision: bf16 on CPUs with AMX / AVX512-BF16 (not FP32, so
    # not a candidate for "the fastest FP32 row"; on other CPUs the same as ov_fp32)
    "ov_default_precision": Runtime("OpenVINO float, its default precision", "ort_fp32",
                                    _ov_runner(None), False, openvino_missing,
                                    ("openvino", {"precision": None})),
    "ort_int8_onnxruntime": Runtime("ORT INT8 ours (onnxruntime flavour)", "ort_int8_onnxruntime",
                                    _ort_runner()),
    "ort_int8_onnxruntime_default": Runtime("ORT INT8 ours (onnxruntime fl.), ORT defaults",
                                            "ort_int8_onnxruntime", _ort_runner(defaults=True)),
    "ort_int8_onnxruntime_post": Runtime("ORT INT8 ours (onnxruntime fl., Q after SiLU)",
                                         "ort_int8_onnxruntime_post", _ort_runner()),
    "ort_int8_onnxruntime_int8out": Runtime("ORT INT8 ours (onnxruntime fl., INT8 outputs)",
                                            "ort_int8_onnxruntime_int8out", _ort_runner()),
    "ort_int8_tensorrt": Runtime("ORT INT8 ours (tensorrt flavour)", "ort_int8_tensorrt",
                                 _ort_runner()),
    "ort_quantize_static": Runtime("ORT INT8 quantize_static (reference)", "ort_quantize_static",
                                   _ort_runner()),
    "ov_int8_onnxruntime": Runtime("OpenVINO INT8 ours (onnxruntime flavour)",
                                   "ort_int8_onnxruntime", _ov_runner(), False, openvino_missing,
                                   _OV),
    "ov_int8_onnxruntime_s8": Runtime("OpenVINO INT8 ours (onnxruntime fl., int8 signed acts)",
                                      "ort_int8_onnxruntime_s8", _ov_runner(), False,
                                      openvino_missing, _OV),
    "ov_int8_onnxruntime_post_s8": Runtime("OpenVINO INT8 ours (Q after SiLU, int8 signed acts)",
                                           "ort_int8_onnxruntime_post_s8", _ov_runner(), False,
                                           openvino_missing, _OV),
    "ov_int8_onnxruntime_post": Runtime("OpenVINO INT8 ours (onnxruntime fl., Q after SiLU)",
                                        "ort_int8_onnxruntime_post", _ov_runner(), False,
                                        openvino_missing, _OV),
    "ov_int8_onnxruntime_int8out": Runtime("OpenVINO INT8 ours (onnxruntime fl., INT8 outputs)",
                                           "ort_int8_onnxruntime_int8out", _ov_runner(), False,
                                           openvino_missing, _OV),
    "ov_int8_tensorrt": Runtime("OpenVINO INT8 ours (tensorrt flavour)", "ort_int8_tensorrt",
                                _ov_runner(), False, openvino_missing, _OV),
    "ov_quantize_static": Runtime("OpenVINO INT8 quantize_static", "ort_quantize_static",
                                  _ov_runner(), False, openvino_missing, _OV),
    "ov_nncf": Runtime("OpenVINO INT8 NNCF (nncf.quantize)", "ov_nncf", _ov_runner(), False,
                       _nncf_missing, _OV),
    "trt_fp16": Runtime("TensorRT FP16", "ort_fp32", _trt_runner(int8=False), True,
                        _trt_available, ("tensorrt", {"int8": False})),
    "trt_int8": Runtime("TensorRT INT8 (tensorrt flavour)", "ort_int8_tensorrt",
                        _trt_runner(int8=True), False, _trt_available,
                        ("tensorrt", {"int8": True})),
}
ROW_LABELS = {k: r.label for k, r in RUNTIMES.items()}
DEFAULT_ROWS = tuple(ROW_LABELS)


def extra_runtimes(extra_onnx: Dict[str, Any]) -> Dict[str, Runtime]:
    """Rows for ONNX files quantized elsewhere (``name -> path``, e.g. ModelOpt's INT8 from
    ``benchmarks/modelopt_int8.py``): each in ONNX Runtime (our session options) and OpenVINO."""
    out = {}
    for name, path in extra_onnx.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--extra-onnx {name}={path}: file not found")
        out[f"ort_extra_{name}"] = Runtime(f"ORT {name}", f"extra_{name}", _ort_runner())
        out[f"ov_extra_{name}"] = Runtime(f"OpenVINO {name}", f"extra_{name}", _ov_runner(),
                                          False, openvino_missing, _OV)
    return out


def parse_extra_onnx(items: Sequence[str]) -> Dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}`` (one line naming a malformed item)."""
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--extra-onnx {it!r}: expected NAME=PATH (NAME letters, digits, "
                             f"_ or -)")
        out[name] = path
    return out


@dataclass
class _Bench:
    """The models, files and settings the stages of :func:`speed_benchmark` share."""
    cfg: Any
    rows: Sequence[str]
    img_size: int
    threads: int
    ort_spin: bool
    max_batch: int
    work: Path
    log: Callable[[str], None]
    notes: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # row -> why it did not run
    eager: Any = None
    fused: Any = None
    source: str = ""
    qmodels: Dict[str, torch.nn.Module] = field(default_factory=dict)
    calib_batches: List[torch.Tensor] = field(default_factory=list)
    calib_src: str = ""
    onnx_files: Dict[str, Path] = field(default_factory=dict)
    runtimes: Dict[str, Runtime] = field(default_factory=dict)
    ov_graphs: Dict[Tuple[str, int], str] = field(default_factory=dict)  # (file, batch) -> summary


class BenchmarkProcessError(RuntimeError):
    """The speed benchmark's own process ended abnormally (e.g. a native crash in a runtime)."""


def _prefixed_log(prefix: str, msg: str) -> None:
    print(f"{prefix}{msg}", flush=True)


def _no_log(msg: str) -> None:
    pass


def speed_benchmark_isolated(cfg, log_prefix: Optional[str] = "", **kwargs) -> Dict[str, Any]:
    """:func:`speed_benchmark` in a fresh (spawned) process: every runtime starts from a clean
    process, as when a user runs ``tools/benchmark.py``, and a native crash inside a runtime
    (seen once in a long-lived process that had already run OpenVINO and ONNX Runtime
    evaluations) becomes a :class:`BenchmarkProcessError` instead of ending the caller."""
    kwargs["log"] = (functools.partial(_prefixed_log, log_prefix) if log_prefix is not None
                     else _no_log)
    ctx = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            return pool.submit(speed_benchmark, copy_config(cfg), **kwargs).result()
    except BrokenProcessPool:
        raise BenchmarkProcessError("the speed benchmark's process ended abnormally (a crash "
                                    "inside a runtime); run tools/benchmark.py speed alone "
                                    "to see it") from None


def speed_benchmark(cfg, weights=None, quant_weights: Sequence[str] = (), img_size: int = 640,
                    batches: Sequence[int] = (1, 32), threads: int = 2, warmup: int = 3,
                    iters: int = 20, iters_large: int = 5, rows: Sequence[str] = DEFAULT_ROWS,
                    calib=None, calib_num: int = 16, calib_method: str = "max",
                    work_dir=None, seed: int = 0, ort_spin: bool = False,
                    extra_onnx: Optional[Dict[str, Any]] = None, val=None,
                    val_images: Optional[int] = None, val_batch: int = 8,
                    log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Latency/throughput table (see the module docstring).

    ``weights``: float checkpoint (None: ``build_model(cfg)`` with :func:`randomize_weights`).
    ``quant_weights``: quantized checkpoints (PTQ/QAT) used for the INT8 rows of their flavour;
    a flavour without one is converted from the float model and calibrated (``calib_method``)
    on ``calib`` (an image folder/glob/list, or None for random images, ``calib_num`` images).
    The ``quantize_static`` row uses the same calibration images. ``rows``: subset of
    :data:`DEFAULT_ROWS`. ``iters`` timed rounds at batch 1, ``iters_large`` at larger batches.
    ONNX files are exported with a dynamic batch into ``work_dir`` (default: a temp dir).
    ``ort_spin``: let ORT's idle threads busy-wait (its default; off here, see
    :func:`_ort_session`; the ``*_default`` rows use ORT's defaults whatever this says).
    ``extra_onnx``: ``{name: path}`` of ONNX files quantized elsewhere, timed in ONNX Runtime
    and OpenVINO (:func:`extra_runtimes`). ``val``: a data YAML (or True: the config's
    ``data.dataset``) whose val images (the first ``val_images``) give every row a COCO
    mAP50-95 at ``img_size`` through the shared evaluation, plus torch fake-quant of each
    INT8 flavour for reference (``res["map"]``).
    Speed-ups: against ORT FP32 and against the fastest FP32 row of the same batch.
    """
    unknown = [r for r in rows if r not in ROW_LABELS]
    if unknown:
        raise ValueError(f"unknown benchmark row(s) {unknown}; choose from {', '.join(ROW_LABELS)}")
    if img_size % 32:
        raise ValueError(f"--imgsz {img_size} must be a multiple of 32")
    extras = extra_runtimes(extra_onnx or {})
    torch.set_num_threads(int(threads))
    tmp = tempfile.TemporaryDirectory(prefix="yolo_q_bench_") if work_dir is None else None
    work = Path(tmp.name if tmp is not None else work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bench = _Bench(cfg, list(rows) + list(extras), img_size, threads, ort_spin, max(batches),
                   work, log, runtimes={**RUNTIMES, **extras})
    for name, path in (extra_onnx or {}).items():
        bench.onnx_files[f"extra_{name}"] = Path(path)
    try:
        with flush_denormal():
            _bench_models(bench, weights, quant_weights, seed)
            _bench_calibration(bench, calib, calib_num, seed)
            _bench_onnx(bench, calib_method)
            graph_ops = _graph_ops(bench.onnx_files)
            prepares = _runners(bench)
            results = _time_rows(bench, prepares, batches, seed, warmup, iters, iters_large,
                                 graph_ops)
            maps = _bench_map(bench, list(prepares), val, val_images, val_batch) if val else {}
        for r in results:
            if r["row"] in maps:
                r["map50_95"] = maps[r["row"]]
        return {"rows": results, "cpu": cpu_info(), "notes": bench.notes, "map": maps,
                "skipped": dict(bench.skipped),
                "settings": dict(model=str(bench.cfg.model.name), weights=bench.source,
                                 img_size=img_size, batches=list(batches), threads=threads,
                                 warmup=warmup, iters=iters, iters_large=iters_large,
                                 calib=bench.calib_src, calib_method=calib_method,
                                 ort_spin=ort_spin, val=str(val) if val else None,
                                 val_images=val_images),
                "onnx": ({k: str(v) for k, v in bench.onnx_files.items()} if tmp is None
                         else {})}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _bench_models(bench: _Bench, weights, quant_weights, seed: int) -> None:
    """The float model (eager and fused copies) and the given quantized models by flavour."""
    if weights:
        model = load_model(weights, bench.cfg, stored_config_first=True)
        if is_quantized(model):
            raise ValueError(f"{weights}: a quantized checkpoint; pass it as --quant-weights "
                             f"(--weights is the float model)")
        bench.cfg = getattr(model, "yolo_q_config", bench.cfg)
        bench.source = str(weights)
    else:
        model = randomize_weights(build_model(bench.cfg), seed).eval()
        bench.source = "random weights (randomize_weights)"
    bench.eager = model.eval()
    bench.fused = copy.deepcopy(bench.eager).fuse().eval()
    for qw in quant_weights:
        if not read_checkpoint_any(qw).get("quant"):
            raise ValueError(f"{qw}: not a quantized checkpoint (no 'quant' entry)")
        qm = load_model(qw)
        bench.qmodels[quant_state(qm)["flavour"]] = qm
        bench.notes.append(f"INT8 {quant_state(qm)['flavour']} flavour from {qw}")


def _bench_calibration(bench: _Bench, calib, calib_num: int, seed: int) -> None:
    """Calibration images (quick PTQ and quantize_static): ``calib`` or random images."""
    if calib is not None:
        bench.calib_batches = list(image_batches(calib, bench.img_size, 4, limit=calib_num))
        bench.calib_src = str(calib)
    else:
        bench.calib_batches = [random_images(min(4, calib_num - i), bench.img_size, seed + 100 + i)
                               for i in range(0, calib_num, 4)]
        bench.calib_src = "random images"


def _variant_qmodel(bench: _Bench, variant: str):
    """The quantized model of a variant that differs from ``variant`` only in export options
    (``export.*`` overrides), if one is already built: the same fake-quant model, exported
    another way."""
    flavour, overrides = QDQ_VARIANTS[variant]
    quant = [o for o in overrides if not o.startswith("export.")]
    for v, (f, ov) in QDQ_VARIANTS.items():
        if v in bench.qmodels and f == flavour and \
                [o for o in ov if not o.startswith("export.")] == quant:
            return bench.qmodels[v]
    return None


def _bench_onnx(bench: _Bench, calib_method: str) -> None:
    """The float ONNX, our INT8 QDQ ONNX per flavour (given or quick-PTQ models) and the
    ``quantize_static`` reference, as the rows need them."""
    rows, files, cfg = bench.rows, bench.onnx_files, bench.cfg
    if any(bench.runtimes[r].onnx for r in rows):
        bench.log("exporting float ONNX ...")
        files["ort_fp32"] = export_onnx(bench.fused, bench.work / "fp32.onnx",
                                        img_size=bench.img_size, dynamic_batch=True,
                                        simplify=False)
        shared = shared_initializers(files["ort_fp32"])
        if shared:
            bench.notes.append(f"float ONNX shares {len(shared)} conv initializers (identical "
                               f"weights/biases, e.g. an untrained model): quantize_static "
                               f"cannot quantize those per layer")
    needed = {bench.runtimes[r].onnx for r in rows}
    for variant, (flavour, overrides) in QDQ_VARIANTS.items():
        key = f"ort_int8_{variant}"
        if key not in needed:
            continue
        vcfg = copy_config(cfg, overrides) if overrides else cfg
        qm = _variant_qmodel(bench, variant)
        if qm is None:
            bench.log(f"quick PTQ ({calib_method}, {bench.calib_src}) for the {variant} "
                      f"flavour ...")
            qm = quick_ptq(bench.fused, vcfg, flavour, bench.calib_batches, method=calib_method)
            bench.notes.append(f"INT8 {variant} flavour: quick PTQ ({calib_method} calibration "
                               f"on {len(bench.calib_batches)} batches of {bench.calib_src})")
        bench.qmodels[variant] = qm
        files[key] = export_qdq(qm, bench.work / f"int8_{variant}.onnx", flavour=flavour,
                                img_size=bench.img_size, dynamic_batch=True,
                                ort_weights=str(cfg.export.ort_weights),
                                act_storage=str(vcfg.export.act_storage))
        if flavour == "onnxruntime":
            bench.notes.append(f"INT8 onnxruntime flavour: "
                               f"{resolve_ort_weights(str(cfg.export.ort_weights))} weights "
                               f"(export.ort_weights={cfg.export.ort_weights})")
    calib_np = [(b.float() / 255).numpy() for b in bench.calib_batches]
    if "ort_quantize_static" in needed:
        bench.log("onnxruntime.quantization.quantize_static ...")
        files["ort_quantize_static"] = _quantize_static(
            files["ort_fp32"], bench.work / "int8_quantize_static.onnx", calib_np)
    if "ov_nncf" in needed and not _nncf_missing():
        bench.log("nncf.quantize (OpenVINO model of the float ONNX) ...")
        files["ov_nncf"] = _nncf_quantize(files["ort_fp32"], bench.work / "int8_nncf.xml",
                                          calib_np)
        bench.notes.append(f"NNCF INT8: nncf.quantize of the float ONNX read by OpenVINO, "
                           f"default preset, calibrated on the same {sum(len(c) for c in calib_np)} "
                           f"images")


def _bench_map(bench: _Bench, rows: Sequence[str], val, val_images: Optional[int],
               val_batch: int) -> Dict[str, float]:
    """COCO mAP50-95 of every timed row on the val set (one evaluation per model file and
    runtime kind; the session options do not change the numbers), plus ``torch_fq_<flavour>``:
    torch fake-quant of each INT8 flavour, the reference the runtimes must match."""
    cfg = copy.deepcopy(bench.cfg)
    data = None if val is True else str(val)
    val_ds, loader, _ = val_loader_for(cfg, val_batch, bench.img_size, data, workers=0)
    max_batches = -(-val_images // val_batch) if val_images else None

    def score(backend) -> float:
        res = evaluate(backend, loader, COCOEvaluator.from_dataset(val_ds),
                       conf_thres=cfg.eval.conf_thres, iou_thres=cfg.eval.iou_thres,
                       max_det=cfg.eval.max_det, progress=False, max_batches=max_batches)
        return float(res["map50_95"])

    bench.log(f"mAP on {data or cfg.data.dataset} ({val_images or 'all'} val images) ...")
    done: Dict[Any, float] = {}
    out: Dict[str, float] = {}
    for r in rows:
        rt = bench.runtimes[r]
        if rt.backend is None:
            key = (r, None)
            if key not in done:
                done[key] = score(TorchBackend(getattr(bench, r.split("_", 1)[1])))
        else:
            kind, kw = rt.backend
            key = (kind, rt.onnx)
            if kind == "tensorrt":
                continue
            if key not in done:
                done[key] = score(build_backend(kind, str(bench.onnx_files[rt.onnx]),
                                                threads=bench.threads, **kw))
        out[r] = done[key]
    scored: Dict[int, float] = {}  # variants that share one fake-quant model score it once
    for flavour, qm in bench.qmodels.items():
        if id(qm) not in scored:
            scored[id(qm)] = score(TorchBackend(qm))
        out[f"torch_fq_{flavour}"] = scored[id(qm)]
    return out


def _graph_ops(onnx_files: Dict[str, Path]) -> Dict[str, Dict[str, int]]:
    """What ONNX Runtime's optimizer made of each INT8 graph (op counts)."""
    out = {}
    for key, path in onnx_files.items():
        if key.startswith(("ort_int8", "extra_")) or key == "ort_quantize_static":
            c = ort_optimized_op_counts(path)
            out[key] = {k: int(c.get(k, 0)) for k in
                        ("QLinearConv", "Conv", "QuantizeLinear", "DequantizeLinear",
                         "QLinearConcat", "QLinearAdd", "MaxPool")}
    return out


def _runners(bench: _Bench) -> Dict[str, Callable]:
    """``row -> prepare(x_tensor, x_numpy) -> (fn, sync)`` for every row that can run here."""
    why_missing: Dict[Callable, Optional[str]] = {}
    out = {}
    for r in bench.rows:
        rt = bench.runtimes[r]
        if rt.missing is not None:
            if rt.missing not in why_missing:
                why_missing[rt.missing] = rt.missing()
            if why_missing[rt.missing]:
                bench.skipped[r] = why_missing[rt.missing]
                continue
        if rt.onnx is not None and rt.onnx not in bench.onnx_files:
            continue
        try:
            out[r] = rt.runner(bench, bench.onnx_files.get(rt.onnx))
        except Exception as e:  # noqa: BLE001 - a runtime that cannot build is a skipped row
            if not rt.needs_tensorrt:
                raise
            bench.skipped[r] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return out


def _time_rows(bench: _Bench, prepares: Dict[str, Callable], batches: Sequence[int], seed: int,
               warmup: int, iters: int, iters_large: int, graph_ops) -> List[Dict[str, Any]]:
    """The one timing loop: per batch size, every runner round-robin; rows with speed-ups vs
    ONNX Runtime FP32 and vs the fastest FP32 row of that batch."""
    results = []
    for b in batches:
        x_t = random_images(b, bench.img_size, seed + b).float() / 255.0
        x_np = x_t.numpy()
        fns: Dict[str, Callable[[], Any]] = {}
        sync: Dict[str, Callable[[], Any]] = {}
        for r, prepare in prepares.items():
            fns[r], s = prepare(x_t, x_np)
            if s is not None:
                sync[r] = s
        n = iters if b == 1 else iters_large
        bench.log(f"batch {b}: {len(fns)} backends x {n} rounds (round-robin) ...")
        times = round_robin(fns, n, warmup if b == 1 else min(warmup, 1), sync)
        base = times.get("ort_fp32")
        base_med = float(np.median(base)) if base else None
        fp32 = {r: float(np.median(t)) for r, t in times.items() if bench.runtimes[r].fp32}
        fastest = min(fp32, key=fp32.get) if fp32 else None
        for r, t in times.items():
            s = summarize_times(t, b)
            med = s["median_ms"] / 1000
            row = {"row": r, "label": bench.runtimes[r].label, "batch": b,
                   "img_size": bench.img_size, "threads": bench.threads, **s,
                   "speedup_vs_ort_fp32": base_med / med if base_med else None,
                   "fastest_fp32": fastest,
                   "speedup_vs_fastest_fp32": fp32[fastest] / med if fastest else None}
            if r in graph_ops:
                row["ort_graph_ops"] = graph_ops[r]
            rt = bench.runtimes[r]
            if rt.backend and rt.backend[0] == "openvino":  # what OpenVINO made of the file
                ov_graph = bench.ov_graphs.get((str(bench.onnx_files.get(rt.onnx)), b))
                if ov_graph:
                    row["ov_graph"] = ov_graph
            results.append(row)
    return results


@torch.inference_mode()
def _torch_run(model, x):
    return model(x)


def format_speed_table(res: Dict[str, Any]) -> str:
    """The speed table as fixed-width text, with the CPU line, what ONNX Runtime made of each
    INT8 graph, and the notes (see :func:`format_speed_markdown` for a markdown table)."""
    s = res["settings"]
    lines = [cpu_line(res["cpu"]),
             f"model {s['model']} ({s['weights']}), {s['img_size']} px, {s['threads']} threads",
             f"{'backend':<46}{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'img/s':>9}"
             f"{'vs ORT FP32':>13}{'vs fastest FP32':>17}{'mAP50-95':>10}"]
    for r in res["rows"]:
        sp, fs, m = _speed_cells(r)
        lines.append(f"{r['label']:<46}{r['batch']:>6}{r['median_ms']:>11.1f}{r['p90_ms']:>9.1f}"
                     f"{r['img_per_s']:>9.2f}{sp:>13}{fs:>17}{m:>10}")
    for r, why in res.get("skipped", {}).items():
        lines.append(f"{ROW_LABELS.get(r, r):<46} skipped: {why}")
    for k, v in res.get("map", {}).items():
        if k.startswith("torch_fq_"):
            lines.append(f"torch fake-quant ({k[9:]} flavour): mAP50-95 {100 * v:.2f}")
    for r in res["rows"]:
        if r.get("ort_graph_ops") and r["batch"] == res["rows"][0]["batch"]:
            ops = r["ort_graph_ops"]
            lines.append(f"  {r['label']}: ORT-optimized graph has {ops['QLinearConv']} "
                         f"QLinearConv, {ops['Conv']} float Conv, {ops['QuantizeLinear']} Q, "
                         f"{ops['DequantizeLinear']} DQ")
    first = res["rows"][0]["batch"] if res["rows"] else None
    for r in res["rows"]:
        if r.get("ov_graph") and r["batch"] == first:
            lines.append(f"  {r['label']}: OpenVINO runs {r['ov_graph']}")
    lines += [f"note: {n}" for n in res.get("notes", [])]
    return "\n".join(lines)


def _speed_cells(r: Dict[str, Any]) -> Tuple[str, str, str]:
    sp = f"{r['speedup_vs_ort_fp32']:.2f}x" if r.get("speedup_vs_ort_fp32") else "-"
    fs = f"{r['speedup_vs_fastest_fp32']:.2f}x" if r.get("speedup_vs_fastest_fp32") else "-"
    m = f"{100 * r['map50_95']:.2f}" if r.get("map50_95") is not None else "-"
    return sp, fs, m


def format_speed_markdown(res: Dict[str, Any]) -> str:
    """The rows of :func:`speed_benchmark` as a markdown table (speed-ups vs ORT FP32 and vs
    the fastest FP32 row of the same batch, named under the table; mAP50-95 in %)."""
    lines = ["| backend | batch | median ms | p90 ms | img/s | vs ORT FP32 | vs fastest FP32 "
             "| mAP50-95 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        sp, fs, m = _speed_cells(r)
        lines.append(f"| {r['label']} | {r['batch']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} "
                     f"| {r['img_per_s']:.2f} | {sp} | {fs} | {m} |")
    for r, why in res.get("skipped", {}).items():
        lines.append(f"| {ROW_LABELS.get(r, r)} | – | skipped: {why} | | | | | |")
    fastest = {r["batch"]: r["fastest_fp32"] for r in res["rows"] if r.get("fastest_fp32")}
    labels = {r["row"]: r["label"] for r in res["rows"]}
    lines += [""] + [f"Fastest FP32 at batch {b}: {labels[f]}." for b, f in fastest.items()]
    for k, v in res.get("map", {}).items():
        if k.startswith("torch_fq_"):
            lines.append(f"torch fake-quant ({k[9:]} flavour): mAP50-95 {100 * v:.2f}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ OpenVINO layers
def _ov_group(name: str, node_type: str) -> str:
    """Group of a profiled OpenVINO node: its type, convolutions also by the top-level scope of
    the exporter's names (``/backbone/...`` -> ``Convolution backbone``)."""
    if node_type == "Convolution" and name.startswith("/") and name.count("/") > 1:
        return f"{node_type} {name.split('/')[1]}"
    return node_type


def ov_layer_times(paths: Sequence[str], batch: int = 1, iters: int = 10, threads: int = 2,
                   img_size: int = 640, seed: int = 0) -> Dict[str, Any]:
    """Per-layer OpenVINO CPU times of model files (ONNX or IR) on the same random images,
    round-robin: for each file the MINIMUM over ``iters`` runs of every executed node
    (``PERF_COUNT``), summed per group (:func:`_ov_group`) and in total, plus the wall-clock
    min / median of the runs. On a machine shared with other jobs the per-node minima are far
    steadier than wall times: a node is measured quiet if any one of its runs was."""
    reqs = {}
    for p in paths:
        compiled = ov_compile(p, threads, "LATENCY", "f32", batch=batch, perf_count=True)
        shape = compiled.input(0).get_partial_shape()
        hw = [d.get_length() if d.is_static else img_size for d in list(shape)[2:]]
        reqs[str(p)] = (compiled.create_infer_request(), hw)
    x = {p: np.ascontiguousarray(random_images(batch, max(hw), seed)[..., :hw[0], :hw[1]]
                                 .float().numpy() / 255.0) for p, (_, hw) in reqs.items()}
    nodes: Dict[str, Dict[Tuple[str, str, str], float]] = {p: {} for p in reqs}

    def runner(p):
        req = reqs[p][0]

        def fn():
            req.infer({0: x[p]})
            for info in req.profiling_info:
                if info.status == info.Status.EXECUTED:
                    k = (info.node_name, info.node_type, info.exec_type)
                    ms = info.real_time.total_seconds() * 1000
                    nodes[p][k] = min(nodes[p].get(k, ms), ms)
        return fn

    times = round_robin({p: runner(p) for p in reqs}, iters, warmup=1)
    out: Dict[str, Any] = {"batch": batch, "threads": threads, "iters": iters, "files": {}}
    for p, t in times.items():
        groups: Dict[str, float] = {}
        for (name, kind, _), ms in nodes[p].items():
            g = _ov_group(name, kind)
            groups[g] = groups.get(g, 0.0) + ms
        out["files"][p] = {"wall_min_ms": 1000 * min(t),
                           "wall_median_ms": 1000 * float(np.median(t)),
                           "node_min_sum_ms": sum(groups.values()), "groups": groups,
                           "nodes": [[*k, ms] for k, ms in nodes[p].items()]}
    return out


def format_ov_layer_times(res: Dict[str, Any]) -> str:
    """Groups x files table of :func:`ov_layer_times` (ms), totals last."""
    files = list(res["files"])
    names = [Path(f).stem[-20:] for f in files]  # the tail tells variants apart
    groups = sorted({g for f in files for g in res["files"][f]["groups"]},
                    key=lambda g: -res["files"][files[0]]["groups"].get(g, 0.0))
    w = max([len(g) for g in groups] + [26])
    lines = [f"OpenVINO per-layer minima over {res['iters']} runs, batch {res['batch']}, "
             f"{res['threads']} threads (ms)",
             f"{'group':<{w}}" + "".join(f"{n:>22}" for n in names)]
    for g in groups:
        lines.append(f"{g:<{w}}" + "".join(f"{res['files'][f]['groups'].get(g, 0.0):>22.1f}"
                                           for f in files))
    for key, label in (("node_min_sum_ms", "sum of per-layer minima"),
                       ("wall_min_ms", "wall min"), ("wall_median_ms", "wall median")):
        lines.append(f"{label:<{w}}" + "".join(f"{res['files'][f][key]:>22.1f}" for f in files))
    return "\n".join(lines)
