"""The side-by-side kit of benchmarks/official (issue #16 item 1): prepare.py's linked view of
a dataset, and curve.py reading an official run's TensorBoard files (two sittings of a resumed
run) beside our results.csv."""
import subprocess
import sys

import pytest

import yaml
from torch.utils.tensorboard import SummaryWriter

from yolo_q.data.synthetic import generate


def _run(repo_root, script, *args, cwd):
    return subprocess.run([sys.executable, str(repo_root / "benchmarks" / "official" / script),
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_prepare_links_the_dataset(repo_root, tmp_path):
    generate(tmp_path / "src", n_train=3, n_val=2, size=64, seed=0, workers=1)
    r = _run(repo_root, "prepare.py", "--src", tmp_path / "src", "--out", tmp_path / "off",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load((tmp_path / "off" / "data.yaml").read_text())
    assert data["nc"] == len(data["names"]) and not data["is_coco"]
    val = sorted((tmp_path / "off" / "images" / "val").iterdir())
    assert len(val) == 2 and val[0].stat().st_nlink == 2  # a hard link, not a copy
    again = _run(repo_root, "prepare.py", "--src", tmp_path / "src", "--out", tmp_path / "off",
                 cwd=tmp_path)
    assert again.returncode != 0 and "exists; remove it first" in again.stderr


def test_curve_joins_the_sittings_of_an_official_run(repo_root, tmp_path):
    run = tmp_path / "official"
    for epochs in ((1, 2), (2, 3)):  # the second sitting redid epoch 2 (resumed)
        w = SummaryWriter(str(run))
        for e in epochs:
            w.add_scalar("val/mAP@0.50:0.95", 0.1 * e + (0.01 if epochs[0] == 2 else 0), e)
            w.add_scalar("val/mAP@0.5", 0.2 * e, e)
            w.add_scalar("train/cls_loss", 1.0 / e, e)
        w.close()
    ours = tmp_path / "ours.csv"
    ours.write_text("epoch,cls,iou,map50_95,map50\n1,1.0,1.0,0.12,0.3\n2,0.9,0.8,,\n"
                    "3,0.8,0.7,0.33,0.6\n4,0.7,0.6,0.4,0.7\n")
    r = _run(repo_root, "curve.py", "--official", run, "--ours", ours, "--out",
             tmp_path / "cmp" / "side", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "cmp" / "side.csv").read_text().splitlines()
    assert lines == ["epoch,official_map50_95,ours_map50_95,official_map50,ours_map50",
                     "1,10.00,12.00,20.00,30.00", "2,21.00,,40.00,", "3,31.00,33.00,60.00,60.00"]
    assert (tmp_path / "cmp" / "side.png").stat().st_size > 0
    bad = _run(repo_root, "curve.py", "--official", tmp_path, "--ours", ours, "--out",
               tmp_path / "x", cwd=tmp_path)
    assert bad.returncode != 0 and "no TensorBoard event files" in bad.stderr


@pytest.mark.parametrize("script, args", [
    ("loss_parity.py", ["--seeds", "1"]),
    ("aug_stats.py", ["--config", "configs/demo.yaml", "--official-data", "x.yaml"])])
def test_comparisons_need_the_official_checkout(repo_root, tmp_path, script, args):
    """loss_parity.py / aug_stats.py compare against the official code imported at run time;
    without it on the path they say so in one line (their results are in the README)."""
    r = _run(repo_root, script, *args, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        "error: the official code is not importable; put ../official_yolov6 on PYTHONPATH")
