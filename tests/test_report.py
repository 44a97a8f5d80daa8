"""Pipeline report pieces: the stage plot shows Δ mAP vs float."""
import pytest

from yolo_q.report import plot_map_per_stage, stage_deltas

ROWS = [
    {"stage": "float", "runtime": "torch FP32", "map50_95": 0.6361, "map50": 0.80},
    {"stage": "ptq", "runtime": "torch fake-quant", "map50_95": 0.6324, "map50": 0.7990},
    {"stage": "qat+cwd", "runtime": "torch fake-quant", "map50_95": 0.6408, "map50": 0.8050},
    {"stage": "float", "runtime": "ORT FP32", "map50_95": 0.6361, "map50": 0.80},
    {"stage": "ptq", "runtime": "torch fake-quant", "map50_95": 0.1, "map50": 0.1},  # repeated
    {"stage": "ptq", "runtime": "TensorRT INT8", "skipped": "no GPU"},
]


def test_stage_deltas_are_changes_vs_float_torch():
    d = stage_deltas(ROWS)
    assert d["float"] == pytest.approx({"map50_95": 63.61, "map50": 80.0})
    got = {s["stage"]: (s["d_map50_95"], s["d_map50"]) for s in d["stages"]}
    assert list(got) == ["ptq / torch fake-quant", "qat+cwd / torch fake-quant",
                         "float / ORT FP32"]  # float torch is the reference; skipped/repeat out
    assert got["ptq / torch fake-quant"] == pytest.approx((-0.37, -0.10))
    assert got["qat+cwd / torch fake-quant"] == pytest.approx((0.47, 0.50))
    assert got["float / ORT FP32"] == pytest.approx((0.0, 0.0))


def test_stage_plot_written_and_skipped_without_float(tmp_path):
    png = plot_map_per_stage(stage_deltas(ROWS), tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_map_per_stage(stage_deltas(ROWS[1:]), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
