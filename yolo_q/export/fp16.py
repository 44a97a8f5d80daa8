"""FP16 ONNX for TensorRT strongly typed builds: every float tensor that is not INT8 becomes FP16.

A strongly typed TensorRT network (the only kind TensorRT 11 builds) computes each tensor in the
type the ONNX gives it, so an FP32 graph makes an FP32 engine and the layers a QDQ graph keeps
float (partial quantization, the high-precision head outputs, DFL, the float parts between Q/DQ)
run in FP32 - slower than an FP16 engine. :func:`convert_fp16` rewrites a graph (float or QDQ):

* opset raised to 19 (QuantizeLinear / DequantizeLinear take FP16 scales from opset 19 on);
* Q of constant weights folded into int8 initializers (exact, computed in FP32), so the weight
  grid does not change; Q/DQ scales stored as FP16 (a scale below FP16's smallest normal value
  2**-14 is raised to it and the folded weights are re-rounded on the new grid; counted);
* every other float32 initializer / Constant / Cast target / ConstantOfShape value -> FP16,
  except inputs ONNX defines as float32 only (Resize scales/roi, NonMaxSuppression boxes,
  scores, thresholds), which get a Cast back to float32;
* graph inputs and outputs stay float32 (a Cast at each end), so runners feed the same tensors.

ONNX Runtime runs the result on CPU (it inserts casts around FP16 nodes it has no CPU kernel
for), which is how the tests check it against the FP32 graph.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

__all__ = ["FP16_MIN_SCALE", "convert_fp16", "write_fp16", "is_fp16_graph"]

PathLike = Union[str, os.PathLike]
FP16_OPSET = 19
FP16_MIN_SCALE = 2.0 ** -14


def fp32_slots(node):
    """(input positions, output positions) of ``node`` whose ONNX type constraint allows float32
    but not float16 at opset 19 (e.g. Range, Resize scales, NonMaxSuppression)."""
    import onnx
    if node.domain not in ("", "ai.onnx"):
        return (), ()
    try:
        schema = onnx.defs.get_schema(node.op_type, FP16_OPSET)
    except Exception:  # noqa: BLE001  (unknown op: leave it alone)
        return (), ()
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def only_f32(type_str):
        types = allowed.get(type_str, {type_str})
        return "tensor(float)" in types and "tensor(float16)" not in types

    def positions(formals, n):
        out = []
        for k in range(n):
            f = formals[min(k, len(formals) - 1)] if formals else None
            if f is not None and only_f32(f.type_str):
                out.append(k)
        return tuple(out)
    return (positions(schema.inputs, len(node.input)),
            positions(schema.outputs, len(node.output)))


def _arr(proto_tensor):
    from onnx import numpy_helper
    return numpy_helper.to_array(proto_tensor)


def _tensor(arr, name):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(arr), name)


def _raise_opset(proto):
    from onnx import helper, version_converter
    cur = max([o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] or [0])
    if cur >= FP16_OPSET:
        return proto
    custom = [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
    if custom:  # the converter does not know plugin ops: take them out and put them back
        keep = [n for n in proto.graph.node if n.domain in ("", "ai.onnx")]
        extra = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx")]
        outs = list(proto.graph.output)
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
        ins = {i for n in custom for i in n.input}
        del proto.graph.output[:]
        proto.graph.output.extend(helper.make_tensor_value_info(i, 1, None) for i in sorted(ins))
        del proto.opset_import[:]
        proto.opset_import.append(helper.make_opsetid("", cur))
        proto = version_converter.convert_version(proto, FP16_OPSET)
        proto.graph.node.extend(custom)
        del proto.graph.output[:]
        proto.graph.output.extend(outs)
        proto.opset_import.extend(extra)
        return proto
    return version_converter.convert_version(proto, FP16_OPSET)


def _quantize(x, scale, zp, axis):
    shape = [1] * x.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = scale.size
    s = scale.reshape(shape).astype(np.float32)
    z = zp.reshape(shape).astype(np.int32) if zp is not None else 0
    info = np.iinfo(zp.dtype if zp is not None else np.uint8)
    q = np.rint(x.astype(np.float32) / s) + z
    return np.clip(q, info.min, info.max).astype(zp.dtype if zp is not None else np.uint8)


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _fold_weight_quantize(g, inits: Dict[str, object]) -> Dict[str, int]:
    """Q(constant) -> integer initializer; scales below FP16_MIN_SCALE raised (re-rounding the
    folded weights). Returns counts."""
    stats = {"folded": 0, "raised_scales": 0}
    keep = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and all(i in inits for i in n.input if i):
            x = _arr(inits[n.input[0]])
            scale = _arr(inits[n.input[1]]).astype(np.float32)
            zp = _arr(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
            new_scale = np.maximum(scale, FP16_MIN_SCALE)
            if (new_scale != scale).any():
                stats["raised_scales"] += int((new_scale != scale).sum())
                name = n.input[1] + "_fp16min"
                inits[name] = _tensor(new_scale, name)
                g.initializer.append(inits[name])
                # the paired DQ must use the same (raised) scale
                for m in g.node:
                    if m.op_type == "DequantizeLinear" and m.input[0] == n.output[0]:
                        m.input[1] = name
            q = _quantize(x, new_scale, zp, _axis(n))
            t = _tensor(q, n.output[0])
            g.initializer.append(t)
            inits[n.output[0]] = t
            stats["folded"] += 1
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return stats


def _constants_to_initializers(g) -> None:
    """Constant nodes with a tensor ``value`` -> initializers (what the folding reads)."""
    keep = []
    for n in g.node:
        vals = [a for a in n.attribute if a.name == "value" and a.t.dims is not None]
        if n.op_type == "Constant" and len(n.attribute) == 1 and vals:
            t = _tensor(_arr(vals[0].t), n.output[0])
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _raise_small_scales(g, inits, stats) -> None:
    """Activation Q/DQ scales below the FP16 range are raised to its smallest normal value."""
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits:
            s = _arr(inits[n.input[1]])
            if s.dtype == np.float32 and (s < FP16_MIN_SCALE).any():
                stats["raised_scales"] += int((s < FP16_MIN_SCALE).sum())
                inits[n.input[1]].CopyFrom(_tensor(np.maximum(s, FP16_MIN_SCALE), n.input[1]))


def _drop_unused_initializers(g) -> Dict[str, Any]:
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used or i.name in {o.name for o in g.output}]
    del g.initializer[:]
    g.initializer.extend(live)
    return {i.name: i for i in g.initializer}


def _fp32_only_initializers(g, inits, slots) -> set:
    """Initializers read only by inputs that must stay float32 (they stay float32)."""
    readers: Dict[str, list] = {}
    for j, n in enumerate(g.node):
        for k, name in enumerate(n.input):
            readers.setdefault(name, []).append(k in slots[j][0])
    return {name for name in inits if readers.get(name) and all(readers[name])}


def _floats_to_fp16(g, fp32_inits) -> None:
    """float32 initializers, Cast targets and Constant values -> FP16."""
    import onnx
    from onnx import TensorProto
    F32 = TensorProto.FLOAT
    for i in g.initializer:
        if i.data_type == F32 and i.name not in fp32_inits:
            i.CopyFrom(_tensor(_arr(i).astype(np.float16), i.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == F32:
                a.i = TensorProto.FLOAT16
            elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR and \
                    a.t.data_type == F32 and n.op_type in ("Constant", "ConstantOfShape"):
                a.t.CopyFrom(_tensor(_arr(a.t).astype(np.float16), a.t.name))


def _cast_fp32_slots(g, slots, fp32_inits) -> list:
    """The nodes with Casts around the inputs/outputs that ONNX allows only in float32."""
    from onnx import TensorProto, helper
    new_nodes = []
    for n, (ins, outs) in zip(list(g.node), slots):
        for k in ins:
            if n.input[k] and n.input[k] not in fp32_inits:
                cast_out = f"{n.input[k]}_fp32_for_{n.name or n.op_type}"
                new_nodes.append(helper.make_node("Cast", [n.input[k]], [cast_out],
                                                  to=TensorProto.FLOAT, name=cast_out + "/Cast"))
                n.input[k] = cast_out
        new_nodes.append(n)
        for k in outs:
            if n.output[k]:
                fp32_out = n.output[k] + "_fp32"
                new_nodes.append(helper.make_node("Cast", [fp32_out], [n.output[k]],
                                                  to=TensorProto.FLOAT16, name=fp32_out + "/Cast"))
                n.output[k] = fp32_out
    return new_nodes


def _rename(nodes, old: str, new: str, outputs: bool) -> None:
    for n in nodes:
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new
        if outputs:
            for k, name in enumerate(n.output):
                if name == old:
                    n.output[k] = new


def _float32_io(g, inits, new_nodes) -> Tuple[list, list]:
    """Casts that keep the float32 graph inputs / outputs float32: (head, tail) nodes."""
    from onnx import TensorProto, helper
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    head, tail = [], []
    for vi in g.input:
        if vi.name not in inits and vi.type.tensor_type.elem_type == F32:
            internal = vi.name + "_fp16"
            _rename(new_nodes, vi.name, internal, outputs=False)
            head.append(helper.make_node("Cast", [vi.name], [internal], to=F16,
                                         name=internal + "/Cast"))
    for vo in g.output:
        if vo.type.tensor_type.elem_type == F32:
            internal = vo.name + "_fp16"
            _rename(new_nodes, vo.name, internal, outputs=True)
            tail.append(helper.make_node("Cast", [internal], [vo.name], to=F32,
                                         name=vo.name + "/Cast"))
    return head, tail


def convert_fp16(proto, metadata: bool = True):
    """Return ``proto`` rewritten to FP16 as the module docstring says (modified in place)."""
    import onnx
    proto = _raise_opset(proto)
    g = proto.graph
    _constants_to_initializers(g)
    inits = {i.name: i for i in g.initializer}
    stats = _fold_weight_quantize(g, inits)
    _raise_small_scales(g, inits, stats)
    inits = _drop_unused_initializers(g)
    slots = [fp32_slots(n) for n in g.node]
    fp32_inits = _fp32_only_initializers(g, inits, slots)
    _floats_to_fp16(g, fp32_inits)
    new_nodes = _cast_fp32_slots(g, slots, fp32_inits)
    head, tail = _float32_io(g, inits, new_nodes)
    del g.node[:]
    g.node.extend(head + new_nodes + tail)
    del g.value_info[:]
    if metadata:
        meta = {m.key: m for m in proto.metadata_props}
        for k, v in {"precision": "fp16", "fp16_raised_scales": str(stats["raised_scales"]),
                     "fp16_folded_weight_q": str(stats["folded"])}.items():
            (meta[k] if k in meta else proto.metadata_props.add(key=k)).value = v
    if not any(n.domain not in ("", "ai.onnx") for n in g.node):
        onnx.checker.check_model(proto, full_check=True)
    return proto


def is_fp16_graph(path_or_proto) -> bool:
    """True if the graph was written by :func:`convert_fp16` (metadata ``precision=fp16``)."""
    import onnx
    proto = (onnx.load(str(path_or_proto), load_external_data=False)
             if isinstance(path_or_proto, (str, os.PathLike)) else path_or_proto)
    return any(m.key == "precision" and m.value == "fp16" for m in proto.metadata_props)


def write_fp16(src: PathLike, dst: Optional[PathLike] = None) -> Path:
    """Write the FP16 version of ``src`` to ``dst`` (default ``<stem>_fp16.onnx`` next to it,
    never over ``src``); returns ``dst``. Atomic."""
    import onnx
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: ONNX file not found")
    dst = Path(dst) if dst else src.with_name(src.stem + "_fp16.onnx")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{src}: FP16 output would overwrite the input; choose another path")
    proto = convert_fp16(onnx.load(str(src)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, dst)
    return dst
