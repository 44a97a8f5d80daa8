import numpy as np
import pytest

from quant_testutils import calibrated, exported, tiny_fused
from yolo_q.quant import apply_shared_scales, convert, quant_state
from yolo_q.quant.graph import ModelGraph

onnx = pytest.importorskip("onnx")


def test_fx_trace_finds_every_concat():
    g = ModelGraph(tiny_fused())
    # SPPF x2, BiFusion x2, PAN x2, then the head's decode concats
    assert len(g.cat_nodes()) == 6 + 6
    assert g.nonneg(next(n for n in g.gm.graph.nodes if n.op == "placeholder"))


def _groups(q):
    return [set(gr) for gr in quant_state(q)["shared"]]


def test_concat_groups_follow_the_rule_tensorrt():
    q = calibrated("tensorrt")
    groups = _groups(q)
    sppf = "backbone.ERBlock_5.2.cspsppf"
    # pools re-quantize their input; the pooled maps are concatenated and read by cv5
    assert {f"{sppf}.m._input_quantizer", f"{sppf}.cv5.block.conv._input_quantizer"} in groups
    # fpn_out0 is both a Concat input (-> Rep_n4) and the input of the upsampling deconv
    assert {"neck.Bifusion0.upsample.upsample_transpose._input_quantizer",
            "neck.Rep_n4.conv1.rbr_reparam._input_quantizer"} in groups
    for gr in quant_state(q)["shared"]:
        amax = {q.get_submodule(n).amax.item() for n in gr}
        assert len(amax) == 1, gr
    assert all(len(g) > 1 for g in groups)
    # the rule, independently: for every Concat, every quantizer reading the Concat output or
    # (through max-pools) one of its inputs is in a single group
    g = ModelGraph(tiny_fused())
    by_input = {}
    for s in quant_state(q)["layers"]:
        for c in g.layers[s["name"]].calls:
            by_input.setdefault(c.args[0], []).append(f"{s['name']}._input_quantizer")
    for cat in g.cat_nodes()[:6]:
        tensors = [cat] + list(cat.args[0])
        for t in list(tensors):
            while t.op == "call_module" and "cspsppf.m" in t.target:
                t = t.args[0]
                tensors.append(t)
        members = {n for t in tensors for n in by_input.get(t, [])}
        if len(members) > 1:
            assert any(members <= gr for gr in groups), members


def test_concat_groups_onnxruntime_include_producer_outputs():
    q = calibrated("onnxruntime", hp=False)
    groups = _groups(q)
    bif = "neck.Bifusion0"
    assert {f"{bif}.upsample.upsample_transpose._output_quantizer",
            f"{bif}.cv1.block.conv._output_quantizer",
            f"{bif}.downsample.block.conv._output_quantizer",
            f"{bif}.cv3.block.conv._input_quantizer"} in groups
    for gr in quant_state(q)["shared"]:
        assert len({q.get_submodule(n).amax.item() for n in gr}) == 1


def test_sharing_can_be_switched_off():
    q = convert(tiny_fused(), share_concat_scales=False)
    assert quant_state(q)["shared"] == []
    assert apply_shared_scales(q) == 0
    shared = calibrated("tensorrt")
    a = shared.get_submodule("backbone.ERBlock_5.2.cspsppf.m._input_quantizer")
    # after an EMA drift, apply_shared_scales restores the group max
    a.amax = a.amax * 2
    assert apply_shared_scales(shared) > 0
    b = shared.get_submodule("backbone.ERBlock_5.2.cspsppf.cv5.block.conv._input_quantizer")
    assert a.amax.item() == b.amax.item()


def _qdq_params(path):
    from onnx import numpy_helper
    m = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    out = []
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            axis = next((a.i for a in n.attribute if a.name == "axis"), None)
            out.append((n, consts.get(n.input[1]), consts.get(n.input[2]), axis))
    return m, out


def test_exported_tensorrt_graph_shares_concat_scales_and_is_symmetric_int8():
    from yolo_q.export.qdq import concat_scales
    path = exported("tensorrt")
    checked = 0
    for c in concat_scales(path):
        if c["scales"]:
            np.testing.assert_allclose(c["scales"], c["scales"][0], rtol=1e-6)
            checked += 1
    assert checked == 6  # SPPF x2, BiFusion x2, PAN x2
    m, qdq = _qdq_params(path)
    assert all(zp is not None and zp.dtype == np.int8 and not zp.any() for _, _, zp, _ in qdq)
    producer = {o: n for n in m.graph.node for o in n.output}
    weight_axes = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            dq = producer[n.input[1]]
            assert dq.op_type == "DequantizeLinear"
            weight_axes.setdefault(n.op_type, set()).add(
                next(a.i for a in dq.attribute if a.name == "axis"))
    assert weight_axes == {"Conv": {0}, "ConvTranspose": {1}}
    # every scale/zero point is an initializer or constant (no computed scales)
    assert all(s is not None for _, s, _, _ in qdq)


def test_exported_onnxruntime_graph_shares_concat_ranges():
    from yolo_q.export.qdq import concat_scales
    path = exported("onnxruntime", hp=False, raw=True)
    _, qdq = _qdq_params(path)
    amax_of_scale = {}
    for _, s, zp, _ in qdq:  # uint8 zp 0: amax = 255 s; uint8 zp 128 (signed grid): 127 s
        if s.size == 1:
            amax_of_scale[float(s)] = float(s) * (255 if int(zp) == 0 else 127)
    checked = 0
    for c in concat_scales(path):
        if c["scales"]:
            amax = [amax_of_scale[s] for s in c["scales"]]
            np.testing.assert_allclose(amax, amax[0], rtol=1e-5)
            checked += 1
    assert checked == 6
    assert {zp.dtype for _, _, zp, axis in qdq if axis is None} == {np.dtype(np.uint8)}
