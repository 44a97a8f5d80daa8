"""Partial quantization: the max-drop search logic (stub evaluations), float layers in the
checkpoint and in the exported QDQ graph, and run_ptq end to end."""
import json

import pytest
import torch

from test_ptq_fixtures import IMG, cfg as make_cfg, float_checkpoint
from yolo_q import load_model
from yolo_q.quant import quant_state, quantized_layers
from yolo_q.quant.partial import search_max_drop, skip_top
from yolo_q.quant.ptq import run_ptq
from yolo_q.quant.modules import QuantLayerMixin
from yolo_q.quant.partial import float_layers_in_onnx

FLOAT = 0.5
DROPS = {"a": 0.004, "b": 0.002, "c": 0.001, "d": 0.0005}  # mAP lost by quantizing each layer
RANKING = ["a", "b", "c", "d"]


def _stub():
    calls = []

    def evaluate_skip(skip):  # quantization losses add up over the quantized layers
        calls.append(list(skip))
        return FLOAT - sum(v for k, v in DROPS.items() if k not in skip)
    return evaluate_skip, calls


@pytest.mark.parametrize("max_drop, expect_k", [
    (1.0, 0),    # full PTQ loses 0.75 points: already within 1.0
    (0.3, 2),    # 0.75 -> 0.35 -> 0.15
    (0.35, 1),   # within D is inclusive (0.35 points after skipping 'a')
    (0.1, 3),    # 0.05 after skipping a, b, c
    (0.0, 4),    # only all-float is within 0
])
def test_max_drop_search_stops_at_first_prefix_within_d(max_drop, expect_k):
    evaluate_skip, calls = _stub()
    res = search_max_drop(RANKING, evaluate_skip, FLOAT, max_drop, progress=False,
                          log=lambda _m: None)
    assert res["reached"] and res["skip"] == RANKING[:expect_k] and res["num_float"] == expect_k
    assert calls == [RANKING[:k] for k in range(expect_k + 1)]  # greedy, in ranking order
    steps = res["steps"]
    assert [s["k"] for s in steps] == list(range(expect_k + 1))
    assert [s["added"] for s in steps] == [None] + RANKING[:expect_k]
    assert all(not s["ok"] for s in steps[:-1]) and steps[-1]["ok"]
    remaining = sum(DROPS[k] for k in RANKING[expect_k:])
    assert steps[-1]["drop_points"] == pytest.approx(100 * remaining)
    assert steps[0]["drop_points"] == pytest.approx(75.0 / 100)


def test_max_drop_search_not_reached_and_errors():
    evaluate_skip, calls = _stub()
    res = search_max_drop(RANKING, evaluate_skip, FLOAT, 0.01, max_steps=2, progress=False,
                          log=lambda _m: None)
    assert not res["reached"] and len(calls) == 2
    assert res["skip"] == ["a"]  # the best evaluated set
    with pytest.raises(ValueError, match="percentage points"):
        search_max_drop(RANKING, evaluate_skip, FLOAT, -1, progress=False)
    assert skip_top(RANKING, 2) == ["a", "b"] and skip_top(RANKING, 0) == []
    with pytest.raises(ValueError, match="only 4"):
        skip_top(RANKING, 5)


def test_run_ptq_skip_top_float_layers_in_checkpoint_and_onnx(tmp_path):
    from yolo_q.export.qdq import export_qdq

    c = make_cfg()
    s = run_ptq(c, float_checkpoint(), skip_top=2, run_dir=tmp_path, flavour="tensorrt",
                progress=False, verbose=False)
    chosen = s["skip_layers"]
    assert len(chosen) == 2 and chosen == s["sensitivity"]["ranking"][:2]
    assert s["sensitivity"]["rank_by"] == "proxy" and s["sensitivity"]["proxy_seconds"] > 0
    assert s["float"]["images"] == 8 and s["partial"] is not None
    ck = torch.load(tmp_path / "ptq.pt", weights_only=True)
    assert ck["skip_layers"] == chosen and ck["config"]["quant"]["skip_layers"] == chosen
    assert set(chosen) <= set(ck["quant"]["skip"])
    assert ck["ptq"]["partial"]["map50_95"] == pytest.approx(s["partial"]["map50_95"])
    model = load_model(tmp_path / "ptq.pt")
    assert not set(chosen) & set(quantized_layers(model))
    assert not any(isinstance(model.get_submodule(n), QuantLayerMixin) for n in chosen)
    onnx_path = export_qdq(model, tmp_path / "partial.onnx", img_size=IMG, raw_outputs=True)
    quantized = quantized_layers(model)
    state = float_layers_in_onnx(onnx_path, chosen + quantized[:5])
    assert all(state[n] for n in chosen)  # no Q/DQ on the float layers' input and weight
    assert not any(state[n] for n in quantized[:5])
    files = json.loads((tmp_path / "summary.json").read_text())["files"]
    for key in ("checkpoint", "config", "csv", "json", "summary"):
        assert (tmp_path / files[key].split("/")[-1]).is_file(), key


def test_run_ptq_max_drop_end_to_end(tmp_path):
    c = make_cfg()
    s = run_ptq(c, float_checkpoint(), calib="max", max_drop=0.0, max_search_steps=3,
                out=tmp_path / "p.pt", progress=False, verbose=False)
    steps = s["search"]["steps"]
    assert 1 <= len(steps) <= 3 and [st["k"] for st in steps] == list(range(len(steps)))
    ranking = s["sensitivity"]["ranking"]
    assert steps[0]["map50_95"] == pytest.approx(s["subset_ptq"]["map50_95"])
    if s["search"]["reached"]:
        assert steps[-1]["ok"] and s["skip_layers"] == ranking[:len(steps) - 1]
    else:
        best = max(steps, key=lambda st: (st["map50_95"], -st["k"]))
        assert s["skip_layers"] == ranking[:best["k"]]
    ck = torch.load(tmp_path / "p.pt", weights_only=True)
    assert ck["skip_layers"] == s["skip_layers"] and ck["quant"]["calib"] == "max"
    assert set(quant_state(load_model(tmp_path / "p.pt"))["skip"]) >= set(s["skip_layers"])
    with pytest.raises(ValueError, match="mutually exclusive"):
        run_ptq(c, float_checkpoint(), skip_top=1, max_drop=0.3, progress=False, verbose=False)


def _first_val_images(src_yaml, dst, n):
    """A copy of ``src_yaml``'s dataset whose val split keeps only its first ``n`` images."""
    import shutil
    shutil.copytree(src_yaml.parent, dst)
    for sub in ("images", "labels"):
        for f in sorted((dst / sub / "val").iterdir())[n:]:
            f.unlink()
    return dst / src_yaml.name


def test_choices_measured_on_quant_select_data(tmp_path):
    """quant.select_data: the sensitivity subset and the max-drop search use that data's val
    split (here the first 4 of the 8 val images), the reported rows the whole val split."""
    from test_ptq_fixtures import data_yaml
    weights = float_checkpoint()  # first: it writes the val (pseudo) labels the copy needs
    sel = _first_val_images(data_yaml(), tmp_path / "sel", 4)
    kw = dict(calib="max", max_drop=0.0, max_search_steps=2, progress=False, verbose=False)
    held = run_ptq(make_cfg(f"quant.select_data={sel}"), weights, **kw)
    same = run_ptq(make_cfg("quant.sensitivity_images=4"), weights, **kw)
    assert held["subset_float"]["images"] == 4 and held["float"]["images"] == 8
    for k in ("subset_float", "subset_ptq", "float", "ptq"):
        assert held[k]["map50_95"] == pytest.approx(same[k]["map50_95"]), k
    assert held["search"]["steps"] == same["search"]["steps"]
    from yolo_q.data import DataNotFoundError
    with pytest.raises(DataNotFoundError, match="quant.select_data: .*nope.yaml does not exist"):
        run_ptq(make_cfg(f"quant.select_data={tmp_path / 'nope.yaml'}"), weights, **kw)
