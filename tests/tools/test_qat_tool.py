"""Smoke test: tools/qat.py end to end in a subprocess (tiny calibrated checkpoint, 1 epoch)."""
import json
import subprocess
import sys

import torch

from quant import test_qat_fixtures as F


def run(repo_root, *args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or repo_root,
                          capture_output=True, text=True, timeout=300)


def test_qat_tool_end_to_end(repo_root, tmp_path):
    float_ck, calib_ck = F.float_checkpoint(), F.calibrated_checkpoint("tensorrt")
    ov = F.overrides(F.data_yaml(), tmp_path, "quant.qat.epochs=1", "train.name=smoke")
    r = run(repo_root, repo_root / "tools/qat.py", "--config", repo_root / "configs/yolov6n.yaml",
            "--weights", calib_ck, "--teacher", float_ck, "--integer-check", *ov,
            cwd=tmp_path)  # works from any directory
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for row in ("QAT report", "float (teacher)", "PTQ (start)", "QAT (best.pt)",
                "integer arithmetic vs fake-quant", "done: 1 QAT epochs"):
        assert row in out, out
    run_dir = tmp_path / "qat" / "smoke"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["recipe"]["distill"] and res["ptq"]["map50_95"] > 0 and res["qat"]["map50_95"] > 0
    assert max(res["integer_check"].values()) <= 1.0 + 1e-6
    ck = torch.load(run_dir / "weights" / "last.pt", weights_only=True)
    assert ck["quant"] and ck["config"]["quant"]["qat"]["epochs"] == 1
    assert (run_dir / "config.yaml").is_file() and (run_dir / "weights" / "best.pt").is_file()

    # resume of a finished run: nothing left to train, same run directory, the report again
    # (with QAT-aware partial quantization of the finished model: quant.qat.max_drop)
    r = run(repo_root, "tools/qat.py", "--resume", run_dir / "weights" / "last.pt",
            "--no-baseline", *ov, "quant.qat.max_drop=0.0", "quant.qat.max_search_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"-> {run_dir}" in r.stdout and "float (teacher)" in r.stdout
    assert "QAT partial (" in r.stdout and "ranked on the trained model" in r.stdout
    part = torch.load(run_dir / "weights" / "partial.pt", weights_only=True)
    assert set(part["skip_layers"]) <= set(part["quant"]["skip"])


def test_qat_tool_errors_are_one_line(repo_root, tmp_path):
    float_ck = F.float_checkpoint()
    ov = F.overrides(F.data_yaml(), tmp_path, "quant.qat.epochs=1")
    r = run(repo_root, "tools/qat.py", "--config", "configs/yolov6n.yaml", "--weights", float_ck,
            "--teacher", float_ck, *ov)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(float_ck) in lines[0] and "not a quantized" in lines[0]
    assert not (tmp_path / "qat").exists()
    assert run(repo_root, "tools/qat.py", "--help").returncode == 0
