"""Smoke tests: tools/info.py and tools/convert.py end to end in subprocesses."""
import json
import subprocess
import sys

import torch

from yolo_q import build_model, load_config


def run(repo_root, *args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or repo_root,
                          capture_output=True, text=True, timeout=300)


def test_info_json_counts(repo_root, tmp_path):
    r = run(repo_root, repo_root / "tools/info.py", "--config", repo_root / "configs/yolov6n.yaml",
            "--json", cwd=tmp_path)  # works from any directory
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert abs(info["fused_params"] - 4_646_957) / 4_646_957 < 0.005
    assert abs(info["fused_gflops"] - 11.32) / 11.32 < 0.01
    assert info["params"] > info["fused_params"] and info["gflops"] > info["fused_gflops"]


def test_info_bad_override_one_line(repo_root):
    r = run(repo_root, "tools/info.py", "--config", "configs/yolov6n.yaml", "train.epoch=3")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epoch" in lines[0] and "epochs" in lines[0]


def test_convert_writes_weights_only_checkpoint(repo_root, tmp_path, randomize):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.nc=3", "model.width_multiple=0.125"])
    model = randomize(build_model(cfg)).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    r = run(repo_root, "tools/convert.py", tmp_path / "sd.pt", tmp_path / "out.pt", "--config",
            "configs/yolov6n.yaml", "model.nc=3", "model.width_multiple=0.125")
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / "out.pt", weights_only=True)
    assert ck["config"]["model"]["nc"] == 3
    from yolo_q import load_model
    again = load_model(tmp_path / "out.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    for p in ("tools/info.py", "tools/convert.py"):
        assert run(repo_root, p, "--help").returncode == 0
