"""Without TensorRT or a GPU every TensorRT entry point stops with one line (no traceback), and
the speed benchmark reports skipped rows."""
import subprocess
import sys

import pytest
import torch

from yolo_q.cli import run_tool
from yolo_q.eval.backends import load_deploy_trt

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(load_deploy_trt().is_available(),
                                reason="TensorRT and CUDA are available here")


def _one_line(err: str):
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "TensorRT backend unavailable" in err and "pip install" in err


def test_gpu_check_stops_with_one_line():
    r = subprocess.run([sys.executable, str(REPO / "deploy" / "gpu_check.py")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("gpu_check: ")
    _one_line(r.stderr)


def test_eval_tool_trt_stops_with_one_line(tmp_path, capsys):
    import tools.eval as tool
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not needed: TensorRT is checked first")
    assert run_tool(tool.main, ["--config", str(REPO / "configs" / "demo.yaml"),
                                "--trt", str(onnx)]) == 2
    _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):  # --int8 is gone: INT8 comes only from a QDQ ONNX
        tool.get_args_parser().parse_args(["--trt", str(onnx), "--int8"])


def test_speed_benchmark_reports_skipped_trt_rows():
    from yolo_q.benchmark import format_speed_table, speed_benchmark
    from yolo_q.config import load_config
    cfg = load_config(str(REPO / "configs" / "yolov6n.yaml"),
                      ["model.width_multiple=0.125", "model.depth_multiple=0.1"])
    res = speed_benchmark(cfg, img_size=64, batches=[1], iters=1, warmup=0, threads=1,
                          rows=["ort_fp32", "trt_fp16", "trt_int8"], calib_num=2,
                          log=lambda s: None)
    assert [r["row"] for r in res["rows"]] == ["ort_fp32"]
    assert set(res["skipped"]) == {"trt_fp16", "trt_int8"}
    table = format_speed_table(res)
    assert "TensorRT FP16" in table and "skipped: TensorRT backend unavailable" in table
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("bad", ["weights", "data", "images"])
def test_gpu_check_bad_input_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, bad):
    """With TensorRT present (stubbed here), a bad input stops deploy/gpu_check.py with one
    line naming it, before the work dir is made or any model is built."""
    import types

    import deploy.gpu_check as gpu_check
    import deploy.trt as dtrt
    monkeypatch.setattr(dtrt, "require_tensorrt", lambda: types.SimpleNamespace(__version__="0"))
    monkeypatch.setattr(gpu_check, "_model", lambda *a: pytest.fail("work started"))
    corrupt = tmp_path / "s.pt"
    corrupt.write_text("not a checkpoint")
    images, empty = tmp_path / "imgs", tmp_path / "empty"
    images.mkdir()
    empty.mkdir()
    (images / "a.jpg").write_bytes(b"listed, not read")
    data = tmp_path / "data.yaml"  # a valid data YAML: the default (coco128) needs the shared data
    data.write_text(f"path: {tmp_path}\ntrain: imgs\nval: imgs\nnc: 1\nnames: [a]\n")
    args = {"weights": ["--weights-s", str(corrupt)], "data": ["--data", str(tmp_path / "no.yaml")],
            "images": ["--data", str(data)]}[bad]
    args += ["--images", str(empty if bad == "images" else images)]
    work = tmp_path / "work"
    assert run_tool(gpu_check.main, [*args, "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert {"weights": str(corrupt), "data": "no.yaml", "images": str(empty)}[bad] in err
    assert not work.exists()
