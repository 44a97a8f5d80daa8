"""Smoke test: tools/ptq.py end to end on tiny data, then tools/eval.py on its checkpoint."""
import json
import re
import subprocess
import sys

import pytest
import torch

from quant.test_ptq_fixtures import float_checkpoint


def run(repo_root, *args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_ptq_tool_sensitivity_skip_top_then_eval(repo_root, tmp_path):
    weights = float_checkpoint()  # config (tiny data, quant.* sizes) stored inside
    r = run(repo_root, repo_root / "tools/ptq.py", "--weights", weights, "--sensitivity",
            "--skip-top", "1", "--integer-check", "--sensitivity-gain", "4",
            "--project", tmp_path / "runs", "--name", "t",
            "--no-progress", "quant.calib=max", cwd=tmp_path)  # from another directory
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "t"
    for f in ("config.yaml", "ptq.pt", "sensitivity.csv", "sensitivity.json", "summary.json"):
        assert (run_dir / f).is_file(), f
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["calib"] == "max" and len(summary["skip_layers"]) == 1
    assert summary["skip_layers"] == summary["sensitivity"]["ranking"][:1]
    assert summary["sensitivity"]["gain"] == 4.0 and "error gain 4" in r.stdout
    # side-by-side table, ranked sensitivity table, integer check
    out = r.stdout
    assert re.search(r"^float\s+[\d.]+\s+[\d.]+", out, re.M)
    assert re.search(r"^PTQ \(all layers\)\s+[\d.]+\s+[\d.]+\s+[-+][\d.]+", out, re.M)
    assert re.search(r"^partial \(1 float\)\s+[\d.]+", out, re.M)
    assert f"   1  {summary['skip_layers'][0]}" in out and "proxy" in out
    assert "integer check" in out
    ck = torch.load(run_dir / "ptq.pt", weights_only=True)
    assert ck["skip_layers"] == summary["skip_layers"] and ck["quant"]["calib"] == "max"
    # tools/eval.py on the PTQ checkpoint reproduces the partial model's mAP
    r = run(repo_root, repo_root / "tools/eval.py", "--weights", run_dir / "ptq.pt",
            "--batch", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"mAP50-95 ([\d.]+)\s+mAP50 ([\d.]+)", r.stdout)
    assert m, r.stdout
    assert abs(float(m.group(1)) - summary["partial"]["map50_95"]) < 1e-4


def _tool(repo_root):
    import importlib.util
    spec = importlib.util.spec_from_file_location("ptq_tool", repo_root / "tools/ptq.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ptq_tool_errors_and_help(repo_root, tmp_path, capsys):
    from yolo_q.cli import run_tool
    tool = _tool(repo_root)
    rc = run_tool(tool.main, ["--weights", str(tmp_path / "missing.pt"), "--project",
                              str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.pt" in err[0]
    rc = run_tool(tool.main, ["--weights", str(float_checkpoint()), "--sensitivity",
                              "--sensitivity-gain", "0", "--project", str(tmp_path),
                              "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: quant.sensitivity_gain must be a positive number, got 0.0"]
    with pytest.raises(SystemExit) as e:
        tool.get_args_parser().parse_intermixed_args(["--weights", "x.pt", "--skip-top", "1",
                                                      "--max-drop", "0.3"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--max-drop" in out and "percentage points" in out
