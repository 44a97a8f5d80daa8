"""QAT-aware partial quantization: a quantized model with some layers made float
(``with_float_layers``: the same computation as those layers' quantizers switched off, ranges
kept, readers of a float producer keep its grid), the ranking on the trained model, and
``run_qat_partial`` end to end (search, checkpoint, val mAP)."""
import copy
import hashlib

import pytest
import torch

from quant_testutils import calibrated, images, tiny_cfg
from test_qat_fixtures import calibrated_checkpoint, data_yaml, float_checkpoint
from test_qat_fixtures import tiny_cfg as qat_cfg
from yolo_q import load_model
from yolo_q.io import OutputPathError
from yolo_q.quant import disable_layers, quant_state, quantized_layers
from yolo_q.quant.modules import QuantLayerMixin
from yolo_q.quant.partial import with_float_layers
from yolo_q.quant.qat_partial import (_choose, layer_groups, prune_float_layers, rank_trained,
                                      run_qat_partial)


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x.float() / 255)


def test_with_no_layers_is_the_same_model():
    for flavour in ("tensorrt", "onnxruntime"):
        m = calibrated(flavour)
        x = images(2)
        assert torch.equal(_out(with_float_layers(m, [], tiny_cfg()), x), _out(m, x))


def test_tensorrt_flavour_float_layer_equals_its_quantizers_off():
    m = calibrated("tensorrt")
    before = copy.deepcopy(m.state_dict())
    layer = quantized_layers(m)[5]
    out = with_float_layers(m, [layer], tiny_cfg())
    ref = copy.deepcopy(m)
    disable_layers(ref, [layer])
    x = images(2, seed=3)
    assert torch.allclose(_out(out, x), _out(ref, x), atol=1e-6, rtol=0)
    assert not torch.allclose(_out(out, x), _out(m, x), atol=1e-6, rtol=0)
    assert layer in quant_state(out)["skip"] and layer not in quantized_layers(out)
    assert not isinstance(out.get_submodule(layer), QuantLayerMixin)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # input untouched
    with pytest.raises(ValueError, match="not quantized"):
        with_float_layers(m, ["backbone.nope"], tiny_cfg())


def test_onnxruntime_reader_of_a_float_producer_keeps_its_grid():
    """The onnxruntime flavour: a conv's readers use its output quantizer as their input grid.
    With the producer float, each reader gets its own input quantizer with that range: the
    model computes what the original does with only the producer's input and weight
    quantizers off."""
    m = calibrated("onnxruntime")
    specs = quant_state(m)["layers"]
    readers = {}
    for s in specs:
        src = s["input_from"]
        if src.endswith("._output_quantizer"):
            readers.setdefault(src[:-len("._output_quantizer")], []).append(s["name"])
    producer = next(iter(readers))
    out = with_float_layers(m, [producer], tiny_cfg())
    amax = m.get_submodule(f"{producer}._output_quantizer").amax
    for r in readers[producer]:
        assert torch.equal(out.get_submodule(f"{r}._input_quantizer").amax, amax)
    ref = copy.deepcopy(m)
    layer = ref.get_submodule(producer)
    for attr in ("_input_quantizer", "_weight_quantizer"):
        if getattr(layer, attr) is not None:
            getattr(layer, attr).disable()
    x = images(2, seed=4)
    assert torch.allclose(_out(out, x), _out(ref, x), atol=1e-5, rtol=0)


def test_layer_groups_are_head_levels_and_blocks():
    names = ["backbone.stem.rbr_reparam", "backbone.ERBlock_2.0.rbr_reparam",
             "backbone.ERBlock_2.1.block.0.rbr_reparam", "neck.Rep_n3.conv1.rbr_reparam",
             "detect.stems.0.block.conv", "detect.cls_convs.0.block.conv", "detect.cls_preds.0",
             "detect.reg_preds.1", "detect.proj_conv"]
    assert layer_groups(names) == {
        "backbone.stem": names[:1], "backbone.ERBlock_2": names[1:3], "neck.Rep_n3": names[3:4],
        "detect.*.0": names[4:7], "detect.*.1": names[7:8], "detect.proj_conv": names[8:]}
    m = calibrated("tensorrt")
    groups = layer_groups(quantized_layers(m))
    assert [n for g in groups.values() for n in g] == quantized_layers(m)


def test_rank_trained_orders_groups_by_recovered_map():
    m = calibrated("tensorrt")
    names = quantized_layers(m)
    # a stand-in metric: mAP is higher when names[3] is float, and a bit when names[7] is
    fake = {names[3]: 0.02, names[7]: 0.01}

    def evaluate(model):
        q = set(quantized_layers(model))
        return {"map50_95": 0.5 + sum(v for n, v in fake.items() if n not in q)}
    groups = {"a": names[8:10], "b": [names[7]], "c": [names[2], names[3]]}
    rank = rank_trained(m, tiny_cfg(), evaluate, groups=groups)
    assert rank["ranking"] == ["c", "b", "a"] and rank["map50_95"] == 0.5
    assert rank["gain"] == pytest.approx({"c": 2.0, "b": 1.0, "a": 0.0})


def test_prune_returns_unneeded_layers_to_int8():
    need = {"b": 0.002, "d": 0.001}  # mAP lost while each of these is quantized
    calls = []

    def evaluate_skip(skip):
        calls.append(list(skip))
        return 0.5 - sum(v for k, v in need.items() if k not in skip)
    res = prune_float_layers(["a", "b", "c", "d"], evaluate_skip, 0.5, 0.15)
    # d alone costs 0.1 point (within 0.15): it goes back to INT8; b (0.2) stays float
    assert res["skip"] == ["b"]
    assert calls == [["a", "b", "c"], ["a", "b"], ["a"], ["b"]]
    assert [s["kept"] for s in res["steps"]] == [False, False, True, False]


def test_not_reached_keeps_only_the_layers_that_add_accuracy():
    """When no set of groups meets max_drop, the best set tried is pruned to the layers whose
    float adds to its accuracy (not kept whole)."""
    m = calibrated("tensorrt")
    groups = layer_groups(quantized_layers(m))
    g, members = next((k, v) for k, v in groups.items() if len(v) >= 3)
    need = members[1]

    def evaluate(model):
        return {"map50_95": 0.5 + (0.002 if need not in set(quantized_layers(model)) else 0.0)}
    say = []
    c = _choose(m, tiny_cfg(), evaluate, 0.6, 0.1, 3, False, say.append)
    assert not c["reached"] and c["float_groups"] == [g]
    assert c["float_layers"] == [need]
    assert c["select_partial"] == pytest.approx(0.502)
    assert [s["kept"] for s in c["prune"]] == [n == need for n in reversed(members)]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_run_qat_partial_end_to_end(tmp_path):
    teacher, weights = float_checkpoint(), calibrated_checkpoint("onnxruntime")
    cfg = qat_cfg(data_yaml(), tmp_path, "quant.sensitivity_images=16")
    sha = _sha(weights)
    say = []
    info = run_qat_partial(cfg, weights, teacher, 0.0, tmp_path / "partial.pt",
                           max_search_steps=2, say=say.append)
    assert _sha(weights) == sha
    steps = info["steps"]
    assert [s["k"] for s in steps][:1] == [0] and len(steps) <= 2
    assert info["float_groups"] == info["ranking"][:len(info["float_groups"])]
    in_groups = [n for g in info["float_groups"] for n in layer_groups(
        quantized_layers(load_model(weights)))[g]]
    assert set(info["float_layers"]) <= set(in_groups)
    if not info["reached"]:  # the best set tried, pruned without losing its accuracy
        best = max(steps, key=lambda s: (s["map50_95"], -s["k"]))
        assert len(info["float_groups"]) == best["k"]
        assert info["select"]["partial"] >= best["map50_95"] - 1e-9
    model = load_model(tmp_path / "partial.pt")
    assert set(info["float_layers"]) <= set(quant_state(model)["skip"])
    ck = torch.load(tmp_path / "partial.pt", weights_only=True)
    assert set(info["float_layers"]) <= set(ck["config"]["quant"]["skip_layers"])
    from yolo_q.data import build_datasets_from_config
    from yolo_q.eval.runner import make_evaluate_fn
    _, val, _ = build_datasets_from_config(cfg, splits=("val",), verbose=False)
    assert make_evaluate_fn(cfg, val)(model)["map50_95"] == pytest.approx(
        info["metrics"]["map50_95"], abs=1e-9)
    assert any("ranked on the trained model" in str(s) for s in say)
    with pytest.raises(OutputPathError, match="QAT partial checkpoint"):
        run_qat_partial(cfg, weights, teacher, 0.1, weights, say=say.append)
    with pytest.raises(ValueError, match="must be float"):
        run_qat_partial(cfg, weights, weights, 0.1, tmp_path / "p2.pt", say=say.append)
    with pytest.raises(ValueError, match=">= 0"):
        run_qat_partial(cfg, weights, teacher, -1, tmp_path / "p3.pt", say=say.append)
