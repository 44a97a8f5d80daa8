"""Sensitivity analysis: rank statistics, the incremental proxy runner, both modes end to end."""
import csv
import json
import math

import pytest
import torch

from test_ptq_fixtures import setup
from yolo_q.quant import quantize_model, quantize_only, quantized_layers
from yolo_q.quant.ptq import make_map_fn
from yolo_q.quant.sensitivity import (IncrementalRunner, detection_output_error, format_table,
                                      rankdata, save_report, sensitivity_analysis, spearman)


def test_rank_statistics_hand_computed(monkeypatch):
    assert rankdata([10, 30, 20, 20]) == [1.0, 4.0, 2.5, 2.5]
    # d = (0, 1, -1, 0): 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    ties = ([1, 2, 2, 3, 5], [2, 1, 4, 4, 9])
    with_scipy = spearman(*ties)
    import builtins
    real_import = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert spearman(*ties) == pytest.approx(with_scipy)  # own ranks == scipy
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_detection_output_error_hand_computed():
    ref = torch.zeros(1, 2, 7)
    ref[0, :, :4] = torch.tensor([[10.0, 10, 4, 4], [30, 30, 2, 2]])
    ref[0, :, 5:] = torch.tensor([[0.8, 0.1], [0.2, 0.0]])
    assert detection_output_error(ref, ref) == 0.0
    y = ref.clone()
    y[0, 0, 0] += 2.0  # box 0 shifted by half its width: IoU = 8 / 24
    y[0, 1, 5] = 0.6  # anchor 1: score 0.2 -> 0.6, weight max(0.2, 0.6)
    w0, w1 = 0.8, 0.6
    expected = (w1 * 0.4) / (w0 + w1) + (w0 * (1 - 8 / 24)) / (w0 + w1)
    assert detection_output_error(y, ref) == pytest.approx(expected)


def test_incremental_runner_matches_full_forward():
    cfg, fused, batches, _, _ = setup()
    q = quantize_model(fused, cfg, batches, progress=False).eval()
    x = batches[0].float() / 255
    runner = IncrementalRunner(q, x)
    layers = quantized_layers(q)
    with torch.no_grad():
        torch.testing.assert_close(runner.reference, fused.eval()(x), rtol=0, atol=1e-5)
        last = runner.run(layers[-1])
        for name in (layers[0], "backbone.ERBlock_5.2.cspsppf.m", layers[40], layers[-1]):
            got = runner.run(name)
            quantize_only(q, [name])
            torch.testing.assert_close(got, q(x), rtol=0, atol=0)
            assert not torch.equal(got, runner.reference)
        # the cached float activations were not modified by the partial runs
        assert torch.equal(runner.run(layers[-1]), last)
    assert len(runner.downstream(layers[-1])) < len(runner.downstream(layers[0]))


def test_sensitivity_both_modes_rank_all_layers(tmp_path):
    cfg, fused, batches, val_ds, val_batches = setup()
    cfg.quant.num_bits = 4  # fake-quant only; makes single-layer drops measurable on 4 images
    q = quantize_model(fused, cfg, batches, progress=False)
    evaluate = make_map_fn(cfg, val_ds, val_batches[:1])  # 4 images: 72 evaluations
    float_m, ptq_m = evaluate(fused), evaluate(q)
    assert float_m["map50_95"] > 0.9  # pseudo GT = the float model's detections
    enabled = {n: t.enabled for n, t in q.named_modules() if hasattr(t, "_amax")}
    rep = sensitivity_analysis(q, proxy_batches=[batches[0]], evaluate_fn=evaluate, mode="both",
                               float_metrics=float_m, ptq_metrics=ptq_m, progress=False)
    # quantizer modes are restored
    assert enabled == {n: t.enabled for n, t in q.named_modules() if hasattr(t, "_amax")}
    layers = quantized_layers(q)
    assert [r["layer"] for r in rep["layers"]] == layers
    assert sorted(rep["ranking"]) == sorted(layers) and rep["rank_by"] == "exact"
    for key in ("proxy_rank", "exact_rank", "rank"):
        assert sorted(r[key] for r in rep["layers"]) == list(range(1, len(layers) + 1))
    assert rep["proxy_seconds"] > 0 and rep["exact_seconds"] > 0 and rep["proxy_images"] == 4
    assert rep["speedup"] == pytest.approx(rep["exact_seconds"] / rep["proxy_seconds"])
    assert -1 <= rep["spearman"] <= 1
    assert all(r["proxy_score"] >= 0 for r in rep["layers"])
    assert max(r["proxy_score"] for r in rep["layers"]) > 0
    drops = [r["exact_drop"] for r in rep["layers"]]
    assert max(drops) > 0.01  # some single layers measurably hurt mAP
    top = rep["layers"][layers.index(rep["ranking"][0])]
    assert top["exact_drop"] == max(drops)
    assert top["exact_drop"] == pytest.approx(float_m["map50_95"] - top["exact_map50_95"])
    # table and files
    table = format_table(rep)
    assert rep["ranking"][0] in table.splitlines()[1] and "Spearman" in table
    files = save_report(rep, tmp_path)
    rows = list(csv.DictReader(open(files["csv"])))
    assert [r["layer"] for r in rows] == rep["ranking"]
    data = json.loads(files["json"].read_text())
    assert data["ranking"] == rep["ranking"] and data["proxy_seconds"] == rep["proxy_seconds"]


def test_sensitivity_all_but_and_errors():
    cfg, fused, batches, _, _ = setup()
    q = quantize_model(fused, cfg, batches, progress=False)
    calls = []

    def fake_eval(model):  # records which layers are quantized; all-but: every layer but one
        on = [n for n in quantized_layers(model)
              if all(t.enabled for _, t in model.get_submodule(n).quantizers())]
        calls.append(len(on))
        return {"map50_95": 0.5, "map50": 0.6}
    layers = quantized_layers(q)[:3]
    rep = sensitivity_analysis(q, evaluate_fn=fake_eval, mode="exact", all_but=True,
                               layers=layers, float_metrics={"map50_95": 0.7, "map50": 0.8},
                               ptq_metrics={"map50_95": 0.4, "map50": 0.5}, progress=False)
    n = len(quantized_layers(q))
    assert calls == [1, 1, 1, n - 1, n - 1, n - 1]
    assert all(r["exact_drop"] == pytest.approx(0.2) and r["all_but_gain"] == pytest.approx(0.1)
               for r in rep["layers"])
    assert rep["proxy_seconds"] is None and rep["spearman"] is None
    with pytest.raises(ValueError, match="mode"):
        sensitivity_analysis(q, mode="fast")
    with pytest.raises(ValueError, match="evaluate_fn"):
        sensitivity_analysis(q, mode="exact")
    with pytest.raises(KeyError, match="did you mean"):
        sensitivity_analysis(q, [batches[0]], layers=["backbone.stem.rbr_reparamm"])
