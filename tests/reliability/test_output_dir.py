"""Output directory: unwritable or full output locations fail before training starts, naming the
path (root-proof: a path under a regular file, a path in /proc, a faked full disk); an existing
run directory is never overwritten silently (exp -> exp2 ...; train.exist_ok reuses it)."""
import hashlib
import shutil
from collections import namedtuple

import pytest

from reliability_utils import run_tool, tiny_cfg, tiny_dataset, train_overrides
from yolo_q import training as train_mod
from yolo_q.engine.rundir import RunDirError, make_run_dir
from yolo_q.training import train


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if train() gets as far as building the datasets."""
    def started(*a, **k):
        raise AssertionError("training started despite an unusable output directory")
    monkeypatch.setattr(train_mod, "build_datasets_from_config", started)


def _unusable_dirs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return {"under a regular file": blocker / "runs",
            "in /proc": "/proc/yolo_q_no_such_dir/runs"}


def test_unwritable_output_dir_fails_before_training(tmp_path, no_training):
    for why, out in _unusable_dirs(tmp_path).items():
        cfg = tiny_cfg(tmp_path / "data.yaml", out, name="exp")
        with pytest.raises(RunDirError, match="not writable") as e:
            train(cfg, verbose=False)
        assert f"{out}/exp" in str(e.value), why


def test_full_disk_fails_before_training(tmp_path, monkeypatch, no_training):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("yolo_q.engine.rundir.shutil.disk_usage",
                        lambda p: Usage(2**30, 2**30 - 2**20, 2**20))  # 1 MiB free
    cfg = tiny_cfg(tmp_path / "data.yaml", tmp_path / "runs", name="exp")
    with pytest.raises(RunDirError, match=r"only 1\.0 MiB free") as e:
        train(cfg, verbose=False)
    assert str(tmp_path / "runs" / "exp") in str(e.value)


def test_cli_reports_unwritable_output_dir_in_one_line(tmp_path):
    out = _unusable_dirs(tmp_path)["under a regular file"]
    r = run_tool("train.py", "--config", "configs/yolov6n.yaml",
                 *train_overrides(tmp_path / "no_such_data.yaml", out))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{out}/exp" in r.stderr and "not writable" in r.stderr


def test_existing_run_dirs_are_never_overwritten(tmp_path):
    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    runs = tmp_path / "runs"
    (runs / "exp" / "weights").mkdir(parents=True)
    (runs / "exp" / "weights" / "last.pt").write_bytes(b"an earlier run's checkpoint")
    (runs / "exp2").write_text("a file in the way")  # a name taken by a file is skipped too
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in runs.rglob("*") if p.is_file()}

    s = train(tiny_cfg(data, runs, name="exp"), verbose=False)
    assert s["run_dir"] == str(runs / "exp3")
    assert (runs / "exp3" / "weights" / "last.pt").is_file()
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}
    assert sorted(p.name for p in (runs / "exp").rglob("*")) == ["last.pt", "weights"]

    # the next run goes to exp4; exist_ok reuses (and may overwrite) the named directory
    assert make_run_dir(runs, "exp") == runs / "exp4"
    assert make_run_dir(runs, "exp", exist_ok=True) == runs / "exp"
    # an empty directory is reused; resuming continues in the run's own directory
    (runs / "fresh").mkdir()
    assert make_run_dir(runs, "fresh") == runs / "fresh"
    assert make_run_dir(runs, "exp", resume_from=runs / "exp3" / "weights" / "last.pt") == \
        (runs / "exp3").resolve()
