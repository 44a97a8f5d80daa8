"""Sensitivity analysis: rank statistics, the incremental proxy runner, both modes end to end."""
import csv
import json
import math

import pytest
import torch

from test_ptq_fixtures import setup
from yolo_q.quant import quantize_only, quantized_layers
from yolo_q.quant.ptq import quantize_model
from yolo_q.quant.ptq import make_map_fn
from yolo_q.quant.sensitivity import (DetectionAgreement, IncrementalRunner, amplified_error,
                                      detection_output_error, format_table, proxy_sensitivity,
                                      rankdata, save_report, sensitivity_analysis, spearman,
                                      split_half_reliability)
from yolo_q.quant.tensor_quantizer import TensorQuantizer


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
    evaluate = make_map_fn(cfg, val_ds, val_batches[:1], halves=True)  # 4 images: 72 evaluations
    float_m, ptq_m = evaluate(fused), evaluate(q)
    # the halves are the even- and odd-numbered images, evaluated on the same detections
    for k, half in enumerate(float_m["map50_95_halves"]):
        alone = make_map_fn(cfg, val_ds, [_images(val_batches[0], [k, k + 2])])(fused)
        assert half == pytest.approx(alone["map50_95"]) and alone["images"] == 2
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
    # split-half reliability of the exact ranking
    assert -1 <= rep["exact_split_half"] <= 1 and rep["gain"] == 1.0
    assert all(len(r["exact_map50_95_halves"]) == 2 for r in rep["layers"])
    if rep["exact_split_half"] > -1:
        r = rep["exact_split_half"]
        assert rep["exact_reliability"] == pytest.approx(2 * r / (1 + r))
    # table and files
    table = format_table(rep)
    assert rep["ranking"][0] in table.splitlines()[1] and "Spearman" in table
    assert "split-half reliability" in table
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


def _images(batch, idx):
    """The images ``idx`` of a val batch ``(imgs, targets, paths, shapes)``, targets renumbered."""
    imgs, targets, paths, shapes = batch[:4]
    keep = [t for t in targets if int(t[0]) in idx]
    new = [torch.cat([torch.tensor([float(idx.index(int(t[0])))]), t[1:]]) for t in keep]
    targets = torch.stack(new) if new else targets[:0]
    return imgs[idx], targets, [paths[i] for i in idx], [shapes[i] for i in idx]


def test_error_gain_scales_the_quantization_error():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5) * 3
    q = TensorQuantizer(num_bits=8)
    q.amax = 4.0  # clips part of x
    y1 = q(x)
    q.error_gain = 16.0
    y16 = q(x)
    inside = x.abs() < 4  # both kinds of error are present: rounding inside, clipping outside
    assert (y1 - x)[inside].abs().max() > 0 and (y1 - x)[~inside].abs().max() > 1
    # the rounding error is scaled, the clipping is that of INT8
    torch.testing.assert_close((y16 - x)[inside], 16.0 * (y1 - x)[inside], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y16[~inside], y1[~inside])
    assert (y16 - x)[inside].abs().max() <= 16 * q.scale / 2 + 1e-5
    # per-channel and unsigned grids clip to their own ranges
    w = torch.randn(4, 3, 3, 3)
    qc = TensorQuantizer(num_bits=8, axis=0, num_channels=4)
    qc.amax = w.abs().amax(dim=(1, 2, 3)) * 0.5
    qc.error_gain = 8.0
    a = qc.amax.view(-1, 1, 1, 1)  # codes -128..127: the grid reaches -128/127 amax
    wc = torch.maximum(torch.minimum(w, a), -a * 128 / 127)
    qc.error_gain = 1.0
    w1 = qc(w)
    qc.error_gain = 8.0
    torch.testing.assert_close(qc(w), wc + 8.0 * (w1 - wc), rtol=1e-5, atol=1e-5)
    qu = TensorQuantizer(num_bits=8, unsigned=True)
    qu.amax = 2.0
    qu.error_gain = 8.0
    r = torch.tensor([-1.0, 0.5, 3.0])
    assert qu(r)[0] == 0 and qu(r)[2] == pytest.approx(2.0)
    # amplified_error sets every quantizer of a model and restores it, even on errors
    cfg, fused, batches, _, _ = setup()
    qm = quantize_model(fused, cfg, batches, progress=False)
    quantizers = [m for m in qm.modules() if isinstance(m, TensorQuantizer)]
    with amplified_error(qm, 4):
        assert {t.error_gain for t in quantizers} == {4.0}
    assert {t.error_gain for t in quantizers} == {1.0}
    for bad in (0, -2, float("nan")):
        with pytest.raises(ValueError, match="gain"):
            with amplified_error(qm, bad):
                pass
    assert {t.error_gain for t in quantizers} == {1.0}


def test_proxy_grows_with_error_gain_and_keeps_its_order():
    cfg, fused, batches, _, _ = setup()
    q = quantize_model(fused, cfg, batches, progress=False)
    layers = quantized_layers(q)[::6]
    s1 = proxy_sensitivity(q, [batches[0]], layers, metric="output", progress=False)
    s8 = proxy_sensitivity(q, [batches[0]], layers, metric="output", progress=False, gain=8)
    assert s1.metric == s8.metric == "output"
    assert all(s8[n] > 2 * s1[n] > 0 for n in layers)  # roughly linear in the error
    assert spearman([s1[n] for n in layers], [s8[n] for n in layers]) > 0.8
    # gain restored
    assert proxy_sensitivity(q, [batches[0]], layers, metric="output", progress=False) == s1


def test_detection_agreement_hand_computed():
    ref = torch.zeros(2, 3, 7)  # 2 images, 3 anchors, 2 classes (cx, cy, w, h, 1, scores)
    ref[..., 4] = 1
    for (i, a, c), box, score in zip([(0, 0, 5), (0, 1, 6), (1, 0, 5), (1, 2, 6)],
                                     [[20.0, 20, 10, 10], [60, 60, 20, 20], [40, 40, 16, 16],
                                      [10, 80, 8, 8]], [0.9, 0.8, 0.7, 0.1]):  # 0.1: not GT
        ref[i, a, :4] = torch.tensor(box)
        ref[i, a, c] = score
    agree = DetectionAgreement()
    agree.add_reference(ref)
    assert agree.num_boxes == 3
    agree.add("same", ref)
    moved = ref.clone()
    moved[0, 1, 0] += 10.0  # one of the three boxes shifted by half its width: IoU 1/3
    agree.add("moved", moved)
    lost = ref.clone()
    lost[1, 0, 5] = 0.0  # one box no longer detected
    agree.add("lost", lost)
    scores = agree.scores()
    assert scores["same"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < scores["moved"] < 1 and 0 < scores["lost"] < 1
    # a class with one of its two GT boxes missed: AP of that class 0.5 at every IoU -> 1 - 0.75
    assert scores["lost"] == pytest.approx(0.25, abs=0.01)
    empty = DetectionAgreement(gt_conf=0.95)
    empty.add_reference(ref)
    with pytest.raises(ValueError, match="detects nothing with score >= 0.95"):
        empty.scores()


def test_agreement_proxy_ranks_layers_and_falls_back_without_detections():
    cfg, fused, batches, _, _ = setup()
    q = quantize_model(fused, cfg, batches, progress=False)
    layers = quantized_layers(q)[::8]
    s = proxy_sensitivity(q, batches[:2], layers, progress=False, gain=8)
    assert s.metric == "agreement" and all(0 <= s[n] <= 1 for n in layers)
    assert max(s[n] for n in layers) > 0
    with pytest.raises(ValueError, match="proxy metric 'mse' is not one of"):
        proxy_sensitivity(q, batches[:1], layers, metric="mse")
    # no float detection reaches gt_conf: the output error ranks instead
    fb = proxy_sensitivity(q, batches[:1], layers, metric=DetectionAgreement(gt_conf=1.01),
                           progress=False)
    assert fb.metric == "output"
    assert fb == proxy_sensitivity(q, batches[:1], layers, metric="output", progress=False)


def test_split_half_reliability_hand_computed():
    # drops on half A: 0.1, 0.3, 0.2; half B: 0.15, 0.35, 0.05 -> ranks (1,3,2) vs (2,3,1)
    rel = split_half_reliability([0.5, 0.6], [[0.4, 0.45], [0.2, 0.25], [0.3, 0.55]])
    assert rel["split_half"] == pytest.approx(0.5)
    assert rel["reliability"] == pytest.approx(2 * 0.5 / 1.5)
    assert rel["ceiling"] == pytest.approx(math.sqrt(2 / 3))
    same = split_half_reliability([0.5, 0.5], [[0.4, 0.4], [0.2, 0.2], [0.3, 0.3]])
    assert same == {"split_half": pytest.approx(1.0), "reliability": pytest.approx(1.0),
                    "ceiling": pytest.approx(1.0)}
    noise = split_half_reliability([0.5, 0.5], [[0.4, 0.2], [0.2, 0.4], [0.3, 0.3]])
    assert noise["split_half"] == pytest.approx(-1.0) and math.isnan(noise["reliability"])


def test_table_notes_an_exact_ranking_that_does_not_reproduce():
    def report(drops_a, drops_b):
        layers = [dict(layer=f"l{i}", index=i, rank=i + 1, exact_drop=(a + b) / 2,
                       exact_map50_95=0.5 - (a + b) / 2, exact_map50=0.7)
                  for i, (a, b) in enumerate(zip(drops_a, drops_b))]
        halves = [[0.5 - a, 0.5 - b] for a, b in zip(drops_a, drops_b)]
        rel = split_half_reliability([0.5, 0.5], halves)
        return dict(layers=layers, rank_by="exact_drop", num_layers=len(layers),
                    subset_images=40, exact_split_half=rel["split_half"],
                    exact_reliability=rel["reliability"], spearman_ceiling=rel["ceiling"])
    consistent = format_table(report([0.1, 0.3, 0.2, 0.0], [0.12, 0.28, 0.21, 0.01]))
    assert "split-half reliability 1.000" in consistent and "note:" not in consistent
    noisy = format_table(report([0.1, 0.3, 0.2, 0.0], [0.2, 0.0, 0.1, 0.3]))
    assert "note: the exact drops do not reproduce between the two halves of the 40 val " \
           "images" in noisy and "--sensitivity-gain" in noisy
