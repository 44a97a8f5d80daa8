"""Float ONNX export (legacy TorchScript exporter) with optional end-to-end NMS.

The exported graph has one input ``images`` (B, 3, H, W) float in [0, 1] and one output
``outputs`` (B, N, 5 + nc): cx, cy, w, h in input pixels, objectness, class scores. The legacy
exporter (``dynamo=False``) also turns ``torch.fake_quantize_*`` into
QuantizeLinear/DequantizeLinear pairs, so a fake-quant model exports to a QDQ graph.

``end2end=True`` appends NMS: ``nms="onnx"`` (default; aliases ``onnxruntime``, ``ort``) builds
it from standard ONNX ops (NonMaxSuppression, which TensorRT's ONNX parser maps to its NMS layer;
runs in ONNX Runtime and TensorRT), ``nms="efficient_nms"`` (aliases ``tensorrt``, ``trt``)
appends the deprecated EfficientNMS_TRT plugin node (TensorRT only; kept as an option). Both give ``num_dets (B,1) int32``, ``det_boxes (B,K,4)`` x1y1x2y2,
``det_scores (B,K)``, ``det_classes (B,K) int32``; rows past ``num_dets`` are zeros.
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..io import atomic_path

__all__ = ["E2E_OUTPUTS", "export_onnx", "add_nms_onnxruntime", "add_nms_tensorrt",
           "onnx_info", "shared_initializers"]

E2E_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
INPUT_NAME, OUTPUT_NAME = "images", "outputs"
NMS_KINDS = ("onnx", "efficient_nms")
NMS_ALIASES = {"onnxruntime": "onnx", "ort": "onnx", "tensorrt": "efficient_nms",
               "trt": "efficient_nms", "EfficientNMS_TRT": "efficient_nms"}
PathLike = Union[str, os.PathLike]


def _require_onnx():
    try:
        import onnx
        return onnx
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx package: pip install onnx") from None


def _hw(img_size) -> Tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = (int(v) for v in img_size)
    return h, w


def export_onnx(model: torch.nn.Module, path: PathLike, img_size=640, batch: int = 1,
                opset: int = 13, dynamic_batch: bool = False, simplify: bool = True,
                end2end: bool = False, nms: str = "onnx", conf_thres: float = 0.25,
                iou_thres: float = 0.45, max_det: int = 100, fuse: bool = False,
                constant_folding: bool = True, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Export ``model`` (eval-mode output ``(B, N, 5+nc)``) to ONNX at ``path``; returns the path.

    ``img_size``: int or (h, w), multiples of the model stride. ``batch``: the static batch (also
    the example batch when ``dynamic_batch``). ``fuse=True`` exports a fused deep copy (the
    caller's model is never modified; its train/eval mode is restored). ``simplify`` runs
    onnxslim or onnxsim when installed (silently skipped otherwise). See the module docstring
    for ``end2end``/``nms``. The file is written atomically.
    """
    onnx = _require_onnx()
    h, w = _hw(img_size)
    s = getattr(model, "stride", None)  # Model.stride: tensor of the level strides
    stride = int(s.max()) if isinstance(s, torch.Tensor) and s.numel() else 32
    if h % stride or w % stride or h <= 0 or w <= 0:
        raise ValueError(f"export img_size {h}x{w} must be positive multiples of the model "
                         f"stride {stride}")
    if batch < 1:
        raise ValueError(f"export batch must be >= 1, got {batch}")
    if end2end and opset < 11:
        raise ValueError(f"end2end NMS needs opset >= 11, got {opset}")
    nms = NMS_ALIASES.get(nms, nms)
    if end2end and nms not in ("onnx", "efficient_nms"):
        raise ValueError(f"nms must be 'onnx' or 'efficient_nms', got {nms!r}")
    if fuse:
        model = copy.deepcopy(model)
        model.fuse()
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dummy = torch.zeros(batch, 3, h, w, device=device)
    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    try:
        with torch.no_grad():
            y = model(dummy)
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[-1] < 6:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"export: model must return raw predictions (B, N, 5+nc) in eval "
                             f"mode, got {got}")
        dyn = ({INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning, legacy exporter deprecation
            torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dyn, do_constant_folding=constant_folding,
                              training=torch.onnx.TrainingMode.EVAL)
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    if simplify:
        proto = _simplify(proto)
    if end2end:
        kw = dict(conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                  raw_shape=tuple(y.shape[1:]))
        proto = (add_nms_onnxruntime(proto, **kw) if nms == "onnx"
                 else add_nms_tensorrt(proto, **kw))
    meta = {"producer": "yolo_q", "stride": str(stride), "nc": str(int(y.shape[-1]) - 5),
            "img_size": f"{h},{w}", "batch": "dynamic" if dynamic_batch else str(batch),
            "end2end": nms if end2end else "none"}
    if end2end:
        meta.update(conf_thres=str(conf_thres), iou_thres=str(iou_thres), max_det=str(max_det))
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    existing = {m.key: m for m in proto.metadata_props}
    for k, v in meta.items():
        (existing[k] if k in existing else proto.metadata_props.add(key=k)).value = v
    if not (end2end and nms == "efficient_nms"):  # the plugin op has no ONNX schema
        onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def _simplify(proto):
    """onnxslim, else onnxsim, else unchanged (both optional)."""
    try:
        import onnxslim
    except ImportError:
        onnxslim = None
    if onnxslim is not None:
        try:
            return onnxslim.slim(proto)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"onnxslim failed ({e}); keeping the unsimplified graph")
            return proto
    try:
        import onnxsim
    except ImportError:
        return proto
    try:
        out, ok = onnxsim.simplify(proto)
        return out if ok else proto
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"onnxsim failed ({e}); keeping the unsimplified graph")
        return proto


def _raw_output_dims(proto, shape: Optional[Sequence[int]] = None) -> Tuple[object, int, int]:
    """(batch dim, N, nc) of the ``outputs`` tensor; ``shape`` = known (N, 5+nc) when the graph
    does not record them (dynamic axes)."""
    out = [o for o in proto.graph.output if o.name == OUTPUT_NAME]
    if not out:
        raise ValueError(f"graph has no output named '{OUTPUT_NAME}' to append NMS to")
    dims = out[0].type.tensor_type.shape.dim
    b = "batch"
    if len(dims) == 3 and dims[0].HasField("dim_value"):
        b = dims[0].dim_value
    if shape is None:
        if len(dims) != 3 or not all(d.HasField("dim_value") for d in dims[1:]):
            raise ValueError("end2end NMS needs the (N, 5+nc) size of 'outputs': the graph does "
                             "not record it, pass raw_shape=(N, 5+nc)")
        shape = (dims[1].dim_value, dims[2].dim_value)
    return b, int(shape[0]), int(shape[1]) - 5


def _opset(proto) -> int:
    return max([o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] or [0])


class _Graph:
    """Tiny helper to append nodes/constants with unique names."""

    def __init__(self, proto, prefix: str):
        from onnx import helper, numpy_helper
        self.proto, self.g, self.prefix = proto, proto.graph, prefix
        self.helper, self.nph = helper, numpy_helper
        self.n = 0

    def name(self, s):
        self.n += 1
        return f"{self.prefix}/{s}_{self.n}"

    def const(self, value, dtype):
        import numpy as np
        name = self.name("const")
        self.g.initializer.append(self.nph.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, n_out=1, outputs=None, **attrs):
        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.g.node.append(self.helper.make_node(op_type, list(inputs), outs,
                                                 name=self.name(op_type), **attrs))
        return outs[0] if len(outs) == 1 else outs


def _split_raw(G: _Graph):
    """Raw outputs -> (boxes x1y1x2y2 (B,N,4), scores obj*cls (B,N,nc))."""
    import numpy as np
    ax = G.const([2], np.int64)

    def sl(a, b):
        return G.op("Slice", [OUTPUT_NAME, G.const([a], np.int64), G.const([b], np.int64), ax])
    xy, wh, obj, cls = sl(0, 2), sl(2, 4), sl(4, 5), sl(5, np.iinfo(np.int64).max)
    half = G.op("Mul", [wh, G.const(0.5, np.float32)])
    boxes = G.op("Concat", [G.op("Sub", [xy, half]), G.op("Add", [xy, half])], axis=2)
    scores = G.op("Mul", [cls, obj])
    return boxes, scores


def _set_outputs(proto, specs):
    from onnx import TensorProto, helper
    del proto.graph.output[:]
    for name, elem, shape in specs:
        proto.graph.output.append(helper.make_tensor_value_info(
            name, {"f": TensorProto.FLOAT, "i": TensorProto.INT32}[elem], shape))


def add_nms_onnxruntime(proto, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        max_det: int = 100, raw_shape: Optional[Sequence[int]] = None):
    """Append class-aware NMS built from standard ONNX ops (NonMaxSuppression, TopK) to a graph
    whose output is ``outputs (B, N, 5+nc)``; outputs become :data:`E2E_OUTPUTS`.

    Every (box, class) pair with score > conf_thres is a candidate (multi-label, like
    ``postprocess(..., multi_label=True)``); per image the best ``max_det`` survivors are
    returned, sorted by score. ``raw_shape = (N, 5+nc)`` when the graph does not record it."""
    import numpy as np
    opset = _opset(proto)
    if opset < 11:
        raise ValueError(f"ONNX NMS needs opset >= 11, graph has {opset}")
    b, n, nc = _raw_output_dims(proto, raw_shape)
    k = int(min(max_det, n * nc))
    G = _Graph(proto, "nms")
    boxes, scores = _split_raw(G)

    def unsqueeze(x, axis):
        if opset >= 13:
            return G.op("Unsqueeze", [x, G.const([axis], np.int64)])
        return G.op("Unsqueeze", [x], axes=[axis])

    scores_t = G.op("Transpose", [scores], perm=[0, 2, 1])  # (B, nc, N)
    sel = G.op("NonMaxSuppression", [boxes, scores_t, G.const([max_det], np.int64),
                                     G.const([iou_thres], np.float32),
                                     G.const([conf_thres], np.float32)], center_point_box=0)
    sel_scores = G.op("GatherND", [scores_t, sel])  # (K,)
    zeros = G.op("ConstantOfShape", [G.op("Shape", [scores_t])],
                 value=G.nph.from_array(np.zeros(1, np.float32)))
    masked = G.op("ScatterND", [zeros, sel, sel_scores])  # kept scores, 0 elsewhere
    flat = G.op("Reshape", [masked, G.const([0, -1], np.int64)])  # (B, nc*N)
    vals, idx = G.op("TopK", [flat, G.const([k], np.int64)], n_out=2, axis=1)
    n_const = G.const(n, np.int64)
    cls_idx, box_idx = G.op("Div", [idx, n_const]), G.op("Mod", [idx, n_const])
    gidx = G.op("Expand", [unsqueeze(box_idx, 2),
                           G.op("Concat", [G.op("Shape", [box_idx]), G.const([4], np.int64)],
                                axis=0)])
    det_boxes = G.op("GatherElements", [boxes, gidx], axis=1)  # (B, k, 4)
    valid = G.op("Greater", [vals, G.const(0.0, np.float32)])
    validf = G.op("Cast", [valid], to=1)
    validi = G.op("Cast", [valid], to=7)
    G.op("Mul", [det_boxes, unsqueeze(validf, 2)], outputs=["det_boxes"])
    G.op("Mul", [vals, validf], outputs=["det_scores"])
    G.op("Cast", [G.op("Mul", [cls_idx, validi])], outputs=["det_classes"], to=6)
    if opset >= 13:
        cnt = G.op("ReduceSum", [validi, G.const([1], np.int64)], keepdims=1)
    else:
        cnt = G.op("ReduceSum", [validi], axes=[1], keepdims=1)
    G.op("Cast", [cnt], outputs=["num_dets"], to=6)
    _set_outputs(proto, [("num_dets", "i", [b, 1]), ("det_boxes", "f", [b, k, 4]),
                         ("det_scores", "f", [b, k]), ("det_classes", "i", [b, k])])
    return proto


def add_nms_tensorrt(proto, conf_thres: float = 0.25, iou_thres: float = 0.45,
                     max_det: int = 100, class_agnostic: bool = False,
                     raw_shape: Optional[Sequence[int]] = None):
    """Append TensorRT's ``EfficientNMS_TRT`` plugin node (domain ``TRT``, plugin_version 1) to a
    graph whose output is ``outputs (B, N, 5+nc)``; outputs become :data:`E2E_OUTPUTS`. The
    result runs only in TensorRT (the ONNX parser maps the node to the plugin)."""
    from onnx import helper
    b, n, nc = _raw_output_dims(proto, raw_shape)
    G = _Graph(proto, "nms")
    boxes, scores = _split_raw(G)
    attrs = dict(background_class=-1, box_coding=0, iou_threshold=float(iou_thres),
                 max_output_boxes=int(max_det), plugin_version="1", score_activation=0,
                 score_threshold=float(conf_thres))
    if class_agnostic:
        attrs["class_agnostic"] = 1
    G.g.node.append(helper.make_node("EfficientNMS_TRT", [boxes, scores], list(E2E_OUTPUTS),
                                     name="nms/EfficientNMS_TRT", domain="TRT", **attrs))
    if not any(o.domain == "TRT" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("TRT", 1))
    _set_outputs(proto, [("num_dets", "i", [b, 1]), ("det_boxes", "f", [b, max_det, 4]),
                         ("det_scores", "f", [b, max_det]), ("det_classes", "i", [b, max_det])])
    return proto


def onnx_info(path_or_proto) -> Dict[str, object]:
    """Summary of an exported model: input name/shape (ints or dim names), output names, number
    of QuantizeLinear/DequantizeLinear nodes, custom ops, metadata."""
    onnx = _require_onnx()
    proto = (path_or_proto if not isinstance(path_or_proto, (str, os.PathLike))
             else onnx.load(str(path_or_proto), load_external_data=False))
    init = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init]

    def shape(vi):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in vi.type.tensor_type.shape.dim]
    ops: Dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "inputs": {i.name: shape(i) for i in inputs},
        "outputs": {o.name: shape(o) for o in proto.graph.output},
        "num_quantize": ops.get("QuantizeLinear", 0),
        "num_dequantize": ops.get("DequantizeLinear", 0),
        "has_qdq": bool(ops.get("QuantizeLinear", 0) or ops.get("DequantizeLinear", 0)),
        "custom_ops": sorted({n.op_type for n in proto.graph.node
                              if n.domain not in ("", "ai.onnx")}),
        "op_counts": ops,
        "opset": _opset(proto),
        "metadata": {m.key: m.value for m in proto.metadata_props},
    }


def shared_initializers(path_or_proto, op_types: Sequence[str] = ("Conv",)) -> List[str]:
    """Initializer names used by more than one node of ``op_types``, directly or through the
    Identity nodes the exporter inserts when it de-duplicates equal tensors (e.g. the identical
    zero biases of a fresh model; such tensors cannot be quantized per layer)."""
    onnx = _require_onnx()
    proto = (path_or_proto if not isinstance(path_or_proto, (str, os.PathLike))
             else onnx.load(str(path_or_proto), load_external_data=False))
    init = {i.name for i in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node  # exporter dedup: Identity(init)
             if n.op_type == "Identity" and n.input and n.input[0] in init}
    uses: Dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in op_types:
            for name in {alias.get(i, i) for i in node.input[1:]}:
                if name in init:
                    uses[name] = uses.get(name, 0) + 1
    return sorted(n for n, c in uses.items() if c > 1)
