"""tools/benchmark.py: `train` and `speed` end to end on a tiny model (timings are not asserted,
only their bookkeeping), plus the round-robin timer and the random targets."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from yolo_q.benchmark import FLAGS_OF_INTEREST, random_targets, round_robin, summarize_times

TINY = ["model.width_multiple=0.125", "model.depth_multiple=0.1", "model.nc=3"]


def test_round_robin_rotates_and_summarize():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = round_robin(fns, iters=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, then rounds starting at a rotating position
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t) == 3 for t in times.values())
    s = summarize_times([0.4, 0.1, 0.3, 0.2], batch=8)
    assert s["median_ms"] == pytest.approx(250.0)
    assert s["p90_ms"] == pytest.approx(370.0)  # numpy linear interpolation: 0.3 + 0.7 * 0.1
    assert s["img_per_s"] == pytest.approx(32.0) and s["iters"] == 4


def test_random_targets_deterministic_and_inside():
    t = random_targets(4, 320, nc=5, per_image=3, seed=1)
    assert t.shape == (12, 6) and torch.equal(t, random_targets(4, 320, 5, 3, 1))
    assert torch.equal(t[:, 0], torch.arange(4).repeat_interleave(3).float())
    assert ((t[:, 1] >= 0) & (t[:, 1] < 5)).all()
    assert (t[:, 2:4] >= 0).all() and (t[:, 4:6] <= 320).all()
    assert ((t[:, 4:6] - t[:, 2:4]) >= 0.04 * 320 - 1e-4).all()


def test_train_subcommand(repo_root, tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run([sys.executable, repo_root / "tools/benchmark.py", "train", *TINY,
                        "--imgsz", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
                        "--json", out], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("CPU: ") and "yolo_q" in r.stdout
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert (row["batch"], row["img_size"], row["threads"], row["steps"]) == (2, 64, 2, 2)
    assert row["img_per_s"] == pytest.approx(2 / row["s_per_step"])
    assert row["speedup_vs_yolo_q"] == 1.0
    assert set(res["cpu"]["flags"]) <= set(FLAGS_OF_INTEREST) and res["cpu"]["model"]
    assert (subprocess.run([sys.executable, repo_root / "tools/benchmark.py", "train", "--help"],
                           capture_output=True, timeout=120).returncode == 0)


def test_speed_subcommand(repo_root, tmp_path):
    # its own process, as a user runs it (in a long-lived pytest worker that had run other
    # OpenVINO/ORT tests, the in-process run once ended the worker; not reproduced alone)
    rows = ["torch_eager", "torch_fused", "ort_fp32", "ort_int8_onnxruntime", "ort_quantize_static"]
    if importlib.util.find_spec("openvino") is not None:
        rows += ["ov_fp32", "ov_int8_onnxruntime", "ov_int8_onnxruntime_s8"]
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, repo_root / "tools/benchmark.py", "speed", *TINY,
                        "--imgsz", "64", "--batch", "1", "2", "--iters", "2", "--iters-large", "2",
                        "--warmup", "1", "--calib-num", "4", "--rows", *rows, "--json", str(out),
                        "--work-dir", str(tmp_path / "onnx")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert "ORT INT8 ours (onnxruntime flavour)" in text and "QLinearConv" in text
    res = json.loads(out.read_text())
    assert [(r["row"], r["batch"]) for r in res["rows"]] == [(n, b) for b in (1, 2) for n in rows]
    for r in res["rows"]:
        assert r["img_per_s"] == pytest.approx(r["batch"] * 1000 / r["median_ms"])
        assert r["p90_ms"] >= r["median_ms"] and r["iters"] == 2
        if r["row"] == "ort_fp32":
            assert r["speedup_vs_ort_fp32"] == pytest.approx(1.0)
        # speed-ups against the fastest FP32 row of the same batch
        fp32 = [x for x in res["rows"] if x["batch"] == r["batch"] and
                x["row"] in ("torch_eager", "torch_fused", "ort_fp32", "ov_fp32")]
        best = min(fp32, key=lambda x: x["median_ms"])
        assert r["fastest_fp32"] == best["row"]
        assert r["speedup_vs_fastest_fp32"] == pytest.approx(best["median_ms"] / r["median_ms"])
    ours = next(r for r in res["rows"] if r["row"] == "ort_int8_onnxruntime")["ort_graph_ops"]
    # ONNX Runtime fused our Q/DQ placement into integer convolutions
    assert ours["QLinearConv"] > 2 * ours["Conv"]
    for f in ("fp32.onnx", "int8_onnxruntime.onnx", "int8_quantize_static.onnx"):
        assert (tmp_path / "onnx" / f).is_file()
    if "ov_int8_onnxruntime_s8" not in rows:
        return
    # what OpenVINO made of each file: float convs in FP32; our INT8 exports all-integer convs,
    # with int8 signed activations no requantize pass; the _s8 variant reused the quick PTQ
    graphs = {r["row"]: r["ov_graph"] for r in res["rows"] if r["batch"] == 1 and "ov_graph" in r}
    assert set(graphs) == {"ov_fp32", "ov_int8_onnxruntime", "ov_int8_onnxruntime_s8"}
    n = int(graphs["ov_fp32"].split("Convolution 0/")[1].split()[0])
    assert n > 10 and all(f"Convolution {n}/{n} int8" in graphs[k] for k in
                          ("ov_int8_onnxruntime", "ov_int8_onnxruntime_s8"))
    assert graphs["ov_int8_onnxruntime_s8"].endswith(" 0 requantize")
    assert not graphs["ov_int8_onnxruntime"].endswith(" 0 requantize")
    assert "OpenVINO runs Convolution" in text
    assert sum("quick PTQ" in n for n in res["notes"]) == 1
    files = [str(tmp_path / "onnx" / f) for f in ("int8_onnxruntime.onnx",
                                                   "int8_onnxruntime_s8.onnx")]
    r = subprocess.run([sys.executable, repo_root / "tools/benchmark.py", "ov-layers", *files,
                        "--iters", "2", "--json", str(tmp_path / "layers.json")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sum of per-layer minima" in r.stdout
    lay = json.loads((tmp_path / "layers.json").read_text())
    for f in files:
        one = lay["files"][f]
        assert one["groups"]["Convolution backbone"] > 0
        assert one["node_min_sum_ms"] == pytest.approx(sum(x[-1] for x in one["nodes"]))
        assert one["wall_min_ms"] <= one["wall_median_ms"]


def test_speed_extra_onnx_and_map(repo_root, tmp_path):
    """--extra-onnx rows run the given file in ONNX Runtime (and OpenVINO); --val gives every
    row the mAP of the shared evaluation: the same INT8 file as an extra row scores exactly as
    our row, and torch fake-quant of the flavour is reported beside it."""
    from yolo_q.benchmark import parse_extra_onnx, speed_benchmark
    from yolo_q.config import load_config
    from yolo_q.data.synthetic import CLASSES, generate
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_extra_onnx(["no_path"])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        speed_benchmark(None, extra_onnx={"x": str(tmp_path / "missing.onnx")})
    yaml = generate(tmp_path / "d", 1, 4, 64, 0, workers=1)
    cfg = load_config(str(repo_root / "configs/yolov6n.yaml"),
                      [*TINY[:2], f"model.nc={len(CLASSES)}", f"data.dataset={yaml}",
                       "data.workers=0"])
    kw = dict(img_size=64, batches=[1], iters=1, warmup=0, calib_num=4, log=lambda s: None)
    first = speed_benchmark(cfg, rows=["ort_int8_onnxruntime"], work_dir=tmp_path / "a", **kw)
    ours = first["onnx"]["ort_int8_onnxruntime"]
    res = speed_benchmark(cfg, rows=["ort_int8_onnxruntime"], extra_onnx={"copy": ours},
                          val=True, work_dir=tmp_path / "b", **kw)
    rows = {r["row"]: r for r in res["rows"]}
    assert "ort_extra_copy" in rows and rows["ort_extra_copy"]["label"] == "ORT copy"
    assert rows["ort_extra_copy"]["map50_95"] == rows["ort_int8_onnxruntime"]["map50_95"]
    assert 0 <= res["map"]["torch_fq_onnxruntime"] <= 1
    if importlib.util.find_spec("openvino") is not None:
        assert "map50_95" in rows["ov_extra_copy"]
    else:
        assert "ov_extra_copy" in res["skipped"]


def test_cpu_line_names_an_isa_cap():
    """A run with OpenVINO's kernels capped (ONEDNN_MAX_CPU_ISA, how a VNNI machine measures
    the no-VNNI / no-AMX classes in benchmarks/cpu_int8.md) says so in its CPU line."""
    from yolo_q.benchmark import ISA_CAP_ENV, cpu_line
    info = {"model": "X", "cpus": 2, "flags": ["avx2"], "loadavg": [0.5], "versions": {}}
    assert "capped" not in cpu_line({**info, "isa_cap": None})
    assert "ISA capped at AVX2" in cpu_line({**info, "isa_cap": "AVX2"})
    assert ISA_CAP_ENV == "ONEDNN_MAX_CPU_ISA"  # the variable oneDNN (OpenVINO's CPU plugin) reads
