"""QDQ ONNX export of a converted (fake-quant) model, plus graph checks.

The legacy TorchScript exporter (``dynamo=False``) turns every enabled ``TensorQuantizer`` into a
QuantizeLinear/DequantizeLinear pair (int8, or uint8 for unsigned / ``uint8_storage``
quantizers; per-channel weights with ``axis`` 0, or 1 for ConvTranspose). What the graph looks
like is decided by :func:`yolo_q.quant.convert` (the *flavour* is part of the quantized model):

* ``tensorrt``: symmetric int8, zero point 0, Q/DQ in front of every quantized conv / pool
  (explicit quantization), shared scales across Concat inputs; float biases.
* ``onnxruntime``: Q/DQ after each conv(+ReLU) (uint8), so ONNX Runtime's graph optimizer fuses
  DQ -> Conv -> Relu -> Q into QLinearConv; verify with :func:`ort_optimized_op_counts`.
  Weights are written as int8 or as uint8 with zero point 128 (the same grid; ``ort_weights``):
  ONNX Runtime runs u8 x s8 convs on x86 CPUs without VNNI with ``vpmaddubsw``, which adds
  pairs of products in int16 and saturates at large codes (255 * 127 * 2 > 32767; documented
  in ONNX Runtime's quantization guide, seen as 65 output steps of error on such a CI machine),
  while its u8 x u8 kernels are exact everywhere. With VNNI (``avx512_vnni`` / ``avx_vnni``)
  u8 x s8 is exact and much faster (YOLOv6-N 640 px, Zen 4, 2 threads: 14.2 vs 25.6 ms).
  ``auto`` picks int8 where the exporting CPU has VNNI (or is not x86), else uint8.
  Signed activation grids (SiLU pre-activations, the upsampling ConvTranspose outputs) are
  stored as uint8 with zero point 128 (``act_storage="uint8"``, what ONNX Runtime's QLinear
  kernels take) or as int8 with zero point 0 (``"int8"``): the same values, so the fake-quant
  model is unchanged. OpenVINO folds a zero point 128 into neither a Concat nor a SiLU: it runs
  an extra u8 -> u8 requantize pass at each (11 on YOLOv6-N, see
  :func:`yolo_q.eval.backends.ov_precision_summary`); with int8 storage every Q/DQ folds into
  the producing convolution (conv + quantize + SiLU + quantize as one int8 kernel).

Skipped layers (``quant.skip_layers``) have no Q/DQ. Biases stay float in both flavours:
ONNX Runtime's graph optimizer converts a fused conv's bias to int32 as
``round(b / (s_x s_w[c]))`` (a code beyond int32 becomes INT32_MIN on x86), so a model whose
codes leave int32 is refused (:func:`yolo_q.quant.floor_weight_scales` prevents it;
calibration and loading apply it). TensorRT adds the float bias inside its fused INT8 conv.
"""
from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..io import atomic_path
from ..quant.convert import FLAVOURS, all_quantizers, is_quantized, quant_state
from ..quant.convert import _to_input, layer_modules
from ..quant.integer import int32_bias_overflow
from ..quant.tensor_quantizer import TensorQuantizer
from .onnx import export_onnx

PathLike = Union[str, os.PathLike]
MIN_OPSET = 13  # per-channel QuantizeLinear (axis) needs opset 13
ORT_WEIGHTS = ("auto", "int8", "uint8")
ACT_STORAGE = ("uint8", "int8")


class QDQExportError(RuntimeError):
    """The model cannot be exported as QDQ ONNX; the message says why."""


def _check_model(model: nn.Module, flavour: Optional[str]) -> str:
    if not is_quantized(model):
        raise QDQExportError("export_qdq() needs a quantized model (yolo_q.quant.convert + "
                             "calibrate); use yolo_q.export.onnx for float export")
    state = quant_state(model)
    if state["num_bits"] != 8:
        raise QDQExportError(f"ONNX QuantizeLinear is 8-bit; the model uses {state['num_bits']} "
                             "bits (fake-quant only)")
    model_flavour = state["flavour"]
    if flavour is not None and flavour != model_flavour:
        if flavour not in FLAVOURS:
            raise QDQExportError(f"export flavour '{flavour}' is not one of {FLAVOURS}")
        raise QDQExportError(f"export flavour '{flavour}' does not match the model, which was "
                             f"converted for '{model_flavour}' (the flavour changes the fake-quant "
                             f"model: convert again with flavour='{flavour}' and re-calibrate)")
    bad = [n for n, q in all_quantizers(model).items() if q.enabled and not q.is_calibrated]
    if bad:
        raise QDQExportError(f"{len(bad)} enabled quantizer(s) are not calibrated: "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    over = int32_bias_overflow(model)
    if over:
        raise QDQExportError(f"the int32 bias code of {sum(over.values())} channel(s) of "
                             f"{', '.join(over)} is beyond int32 (weight scale near zero): "
                             "integer runtimes would compute a wrong value; call "
                             "yolo_q.quant.floor_weight_scales(model) first")
    return model_flavour


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_ort_weights(choice: str = "auto") -> str:
    """``int8`` or ``uint8``: the storage of onnxruntime-flavour weights (see the module
    docstring). ``auto``: int8 where ONNX Runtime's u8 x s8 kernels are exact on this CPU
    (x86 with ``avx512_vnni`` or ``avx_vnni``, or not x86), else uint8."""
    if choice not in ORT_WEIGHTS:
        raise ValueError(f"export.ort_weights must be one of {ORT_WEIGHTS}, got {choice!r}")
    if choice != "auto":
        return choice
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "int8"
    return "int8" if _cpu_flags() & {"avx512_vnni", "avx_vnni"} else "uint8"


@contextlib.contextmanager
def _storage(model: nn.Module, weights: bool, dtype: str):
    """Within the block, the signed weight (``weights``) or activation quantizers store their
    grid as ``dtype`` (int8 | uint8: zero point 0 | 128): the fake-quant values are identical,
    only the exported Q/DQ differs."""
    qs = [q for n, q in model.named_modules() if isinstance(q, TensorQuantizer)
          and (n.rpartition(".")[2] == "_weight_quantizer") == weights and not q.unsigned]
    old = [q.uint8_storage for q in qs]
    try:
        for q in qs:
            q.uint8_storage = dtype == "uint8"
        yield model
    finally:
        for q, o in zip(qs, old):
            q.uint8_storage = o


def weight_storage(model: nn.Module, dtype: str):
    """Context: signed weight quantizers store their grid as ``dtype`` (int8 | uint8)."""
    return _storage(model, True, dtype)


def activation_storage(model: nn.Module, dtype: str):
    """Context: signed activation quantizers store their grid as ``dtype`` (uint8 | int8, zero
    point 128 | 0; the onnxruntime flavour's ``act_storage``)."""
    if dtype not in ACT_STORAGE:
        raise ValueError(f"export.act_storage must be one of {ACT_STORAGE}, got {dtype!r}")
    return _storage(model, False, dtype)


def _torch_export(model, path, img_size, batch, opset, dynamic_batch, raw_outputs=True):
    """Raw-output export (the float exporter expects the decoded (B, N, 5+nc) output)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    device = next(model.parameters()).device
    x = torch.zeros(batch, 3, h, w, device=device)
    out_names = ["cls_logits", "reg"]
    model = _RawOutputs(model)
    dyn = {n: {0: "batch"} for n in ["images", *out_names]} if dynamic_batch else None
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(tmp), opset_version=opset, input_names=["images"],
                          output_names=out_names, dynamic_axes=dyn, do_constant_folding=True,
                          dynamo=False)


class _RawOutputs(nn.Module):
    """Export wrapper: the head's raw (cls logits, reg) instead of decoded boxes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        head = self.model.detect
        feats = self.model.forward_features(x)
        mode = head.training
        head.training = True  # the head's train-mode output: (feats, cls_logits, reg)
        try:
            _, cls, reg = head(feats)
        finally:
            head.training = mode
        return cls, reg


def export_qdq(model: nn.Module, path: PathLike, flavour: Optional[str] = None,
               img_size=640, batch: int = 1, opset: int = 13, dynamic_batch: bool = False,
               simplify: bool = False, raw_outputs: bool = False, ort_weights: str = "auto",
               act_storage: str = "uint8", **export_kwargs) -> Path:
    """Export a converted + calibrated model to QDQ ONNX at ``path``; returns the path.

    ``flavour`` (tensorrt | onnxruntime) must match the flavour the model was converted with
    (None: the model's). The graph is written by :func:`yolo_q.export.onnx.export_onnx` (input
    ``images``, output ``outputs`` (B, N, 5+nc); ``export_kwargs`` such as ``end2end``, ``nms``,
    ``conf_thres`` are passed on) with metadata ``quant_flavour``. ``raw_outputs=True`` instead
    exports the head's raw maps ``cls_logits`` (B, N, nc) and ``reg`` (B, N, 4 or
    4*(reg_max+1)), useful for parity checks. ``ort_weights`` (auto | int8 | uint8): how the
    onnxruntime flavour stores weights (:func:`resolve_ort_weights`; the tensorrt flavour always
    writes int8); recorded as metadata ``ort_weights``. ``act_storage`` (uint8 | int8): how the
    onnxruntime flavour stores signed activation grids (uint8 for ONNX Runtime, int8 for
    OpenVINO; see the module docstring; the tensorrt flavour is always int8); metadata
    ``act_storage``.
    """
    flavour = _check_model(model, flavour)
    if act_storage not in ACT_STORAGE:
        raise QDQExportError(f"export.act_storage must be one of {ACT_STORAGE}, "
                             f"got {act_storage!r}")
    w_dtype = resolve_ort_weights(ort_weights) if flavour == "onnxruntime" else "int8"
    a_dtype = act_storage if flavour == "onnxruntime" else "int8"
    if opset < MIN_OPSET:
        raise QDQExportError(f"opset {opset} < {MIN_OPSET}: per-channel QuantizeLinear needs "
                             f"opset >= {MIN_OPSET}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with weight_storage(model, w_dtype), activation_storage(model, a_dtype):
            if raw_outputs:
                if export_kwargs:
                    raise TypeError(f"raw_outputs=True takes no {sorted(export_kwargs)}")
                _torch_export(model, path, img_size, batch, opset, dynamic_batch)
            else:

                meta = dict(export_kwargs.pop("metadata", None) or {})
                meta.setdefault("quant_flavour", flavour)
                if flavour == "onnxruntime":
                    meta.setdefault("ort_weights", w_dtype)
                    meta.setdefault("act_storage", a_dtype)
                export_onnx(model, path, img_size=img_size, batch=batch, opset=opset,
                            dynamic_batch=dynamic_batch, simplify=simplify, metadata=meta,
                            **export_kwargs)
    finally:
        model.train(was_training)
    _inline_identity_initializers(path)
    if qdq_stats(path)["QuantizeLinear"] == 0 and any(
            q.enabled for q in all_quantizers(model).values()):
        raise QDQExportError(f"{path}: exported graph has no QuantizeLinear nodes")
    return path


def _inline_identity_initializers(path: Path) -> None:
    """The exporter de-duplicates equal initializers (e.g. shared scales) through Identity
    nodes; point their readers at the initializer itself so every Q/DQ scale and zero point is
    a plain initializer (what TensorRT and ONNX Runtime's QDQ fusions look for)."""
    import onnx

    proto = onnx.load(str(path))
    init = {i.name for i in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node
             if n.op_type == "Identity" and n.input[0] in init and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in proto.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


# ------------------------------------------------------------------------------ graph checks
def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(str(model_or_path))
    return model_or_path


def _consts(model) -> Dict[str, "object"]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def qdq_stats(model_or_path) -> Dict[str, int]:
    """Counts of QuantizeLinear / DequantizeLinear / Conv / ConvTranspose nodes."""
    m = _load(model_or_path)
    c = Counter(n.op_type for n in m.graph.node)
    return {k: c.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear", "Conv", "ConvTranspose",
                                     "Concat", "MaxPool")}


def _scope(node_name: str) -> str:
    """Module path from an exporter node name: '/backbone/ERBlock_2/ERBlock_2.0/rbr_reparam/Conv'
    -> 'backbone.ERBlock_2.0.rbr_reparam' (a scope repeats its parent's name for
    Sequential / ModuleList children)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    out: List[str] = []
    for i, p in enumerate(parts):
        if i and p.startswith(parts[i - 1] + "."):
            p = p[len(parts[i - 1]) + 1:]
        out.append(p)
    return ".".join(out)


def conv_quantization(model_or_path) -> Dict[str, Dict[str, bool]]:
    """For every Conv/ConvTranspose/MaxPool node, keyed by module path (from the exporter's
    scope names): whether its input and its weight come from a DequantizeLinear."""
    m = _load(model_or_path)
    producer = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "MaxPool"):
            continue
        def from_dq(i):
            p = producer.get(n.input[i]) if len(n.input) > i else None
            return p is not None and p.op_type == "DequantizeLinear"
        key = _scope(n.name) or n.name
        out[key] = dict(input=from_dq(0), weight=from_dq(1) if n.op_type != "MaxPool" else False,
                        op=n.op_type)
    return out


def concat_scales(model_or_path) -> List[Dict[str, object]]:
    """For every Concat: the scales of all Q/DQ nodes that touch its inputs or output -
    DequantizeLinear feeding an input (through MaxPool), QuantizeLinear reading an input or the
    output (through MaxPool). With shared scales each list has one distinct value."""
    m = _load(model_or_path)
    consts = _consts(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    readers: Dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def scale(n):
        return float(consts[n.input[1]].reshape(-1)[0]) if n.input[1] in consts else None

    res = []
    for n in m.graph.node:
        if n.op_type != "Concat":
            continue
        scales, tensors = [], list(n.input) + [n.output[0]]
        for t in list(tensors):  # follow max-pool chains both ways
            p = producer.get(t)
            while p is not None and p.op_type == "MaxPool":
                t = p.input[0]
                tensors.append(t)
                p = producer.get(t)
        for t in tensors:
            p = producer.get(t)
            if p is not None and p.op_type == "DequantizeLinear":
                scales.append(scale(p))
            for r in readers.get(t, []):
                if r.op_type == "QuantizeLinear":
                    scales.append(scale(r))
        res.append(dict(name=n.name, scales=[s for s in scales if s is not None]))
    return res


def ort_optimized_op_counts(path: PathLike, level: str = "all") -> Counter:
    """Op-type counts of the graph ONNX Runtime (CPU) actually runs after its optimizations
    (QLinearConv etc. appear when the Q/DQ pattern was fused)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath)
    return Counter(n.op_type for n in m.graph.node)


def _layer_tensors(proto, spec: dict):
    """ONNX tensors of one quantized conv layer: (input name, input DQ node or None,
    output name, output Q node or None)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    readers: Dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")
             and _scope(n.name) == spec["name"]]
    if len(convs) != 1:
        return None
    conv = convs[0]
    dq = producer.get(conv.input[0])
    dq = dq if dq is not None and dq.op_type == "DequantizeLinear" else None
    in_name = dq.input[0] if dq is not None else conv.input[0]
    out = conv.output[0]
    users = readers.get(out, [])
    if spec["act_type"] == "relu" and len(users) == 1 and users[0].op_type == "Relu":
        out = users[0].output[0]
    elif spec["act_type"] == "silu":
        mul = [u for u in users if u.op_type == "Mul"]
        if len(mul) == 1:
            out = mul[0].output[0]
    q = None
    if spec["output"]:
        qs = [u for u in readers.get(out, []) if u.op_type == "QuantizeLinear"]
        q = qs[0] if len(qs) == 1 else None
        if q is not None:
            out = q.output[0]
    return in_name, dq, out, q


def _layer_out(layer, x: torch.Tensor):
    """The layer's output where its output quantizer sits: before the activation for a
    ``quant_before_act`` layer (what the ONNX's QuantizeLinear holds), else after it."""
    if not getattr(layer, "quant_before_act", False):
        return layer(x).double().cpu().numpy()
    act = layer.act
    layer.act = torch.nn.Identity()
    try:
        return layer(x).double().cpu().numpy()
    finally:
        layer.act = act


def layer_parity(model: nn.Module, path: PathLike, batch) -> Dict[str, Dict[str, float]]:
    """Per quantized conv layer, does ONNX Runtime compute what the fake-quant layer computes?

    Runs the exported graph once in ONNX Runtime (all CPU optimizations, so fused QLinearConv
    kernels are what is tested) with every layer's input and output exposed (the quantized
    codes where a Q/DQ pair is present, which keeps the fusions), feeds each layer's ONNX input
    to the torch layer and compares the outputs in steps of the output grid (for float outputs:
    ``max|y| / 127``). Returns ``{layer: {"max_steps", "frac_diff"}}``; layers whose tensors
    could not be matched are left out. Local per layer, so it is not affected by how rounding
    differences amplify through a deep network."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper


    proto = onnx.load(str(path))
    consts = _consts(proto)
    layers = layer_modules(model)
    plan, extra = {}, []
    for spec in quant_state(model)["layers"]:
        if spec["kind"] == "maxpool":
            continue
        t = _layer_tensors(proto, spec)
        if t is None:
            continue
        plan[spec["name"]] = t
        for name, node in ((t[0], t[1]), (t[2], t[3])):
            if node is None:
                elem = onnx.TensorProto.FLOAT
            else:
                zp = consts.get(node.input[2]) if len(node.input) > 2 else None
                elem = onnx.TensorProto.UINT8 if zp is not None and zp.dtype == np.uint8 \
                    else onnx.TensorProto.INT8
            extra.append(helper.make_tensor_value_info(name, elem, None))
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend([e for e in {e.name: e for e in extra}.values()
                               if e.name not in known])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = _to_input(batch, torch.device("cpu")).numpy()
    names = [o.name for o in sess.get_outputs()]
    inp = sess.get_inputs()[0]
    b = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)  # a static batch: chunks
    runs = [sess.run(None, {inp.name: x[i:i + b]}) for i in range(0, len(x) - b + 1, b)]
    if not runs:
        raise ValueError(f"{path}: needs a batch of at least {b} images, got {len(x)}")
    values = {n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}

    def deq(name, node):
        v = values[name]
        if node is None:
            return v.astype(np.float64), None
        s = consts[node.input[1]].astype(np.float64)
        zp = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 else 0.0
        return (v.astype(np.float64) - zp) * s, float(s.reshape(-1)[0])

    device = next(model.parameters()).device
    result = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, (in_name, dq, out_name, q) in plan.items():
                xin, _ = deq(in_name, dq)
                y_ort, step = deq(out_name, q)
                y = _layer_out(layers[name], torch.from_numpy(xin).float().to(device))
                if step is None:
                    step = max(float(np.abs(y).max()) / 127.0, 1e-12)
                d = np.abs(y - y_ort) / step
                result[name] = dict(max_steps=float(d.max()), frac_diff=float((d > 0.5).mean()))
    finally:
        model.train(was_training)
    return result


__all__ = ["ACT_STORAGE", "QDQExportError", "activation_storage", "concat_scales",
           "conv_quantization", "export_qdq",
           "layer_parity", "ort_optimized_op_counts", "qdq_stats"]
