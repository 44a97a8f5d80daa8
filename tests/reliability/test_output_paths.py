"""Output locations (issue #21): every tool checks where it will write before any work, with one
line naming the path — a read-only place, a parent that is a regular file, a directory where a
file is expected, an output that is one of the inputs (also through a symlink or a hard link) —
and creates nothing at a location that failed the check. Run directories are checked first and
created after; a run that fails before writing anything of its own leaves no directory behind,
and ``--resume`` of a mistyped path creates nothing."""
import hashlib
import os
from pathlib import Path

import pytest

from eval.eval_testutils import tiny_detector
from reliability_utils import REPO, run_tool, tiny_dataset, train_overrides
from yolo_q.config import load_config
from yolo_q.engine.rundir import discard_unused_run_dirs, make_run_dir
from yolo_q.engine.trainer import config_dict
from yolo_q.io import OutputPathError, check_output_dir, check_output_file, save_checkpoint

TINY = ["model.width_multiple=0.125", "model.depth_multiple=0.1", "data.img_size=64",
        "data.workers=0", "eval.batch_size=4", "train.device=cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An 8-class dataset and an nc=8 float checkpoint whose stored config names it."""
    d = tmp_path_factory.mktemp("outpaths")
    data = tiny_dataset(d / "data", n_train=4, n_val=2, size=64)
    cfg = load_config(REPO / "configs/yolov6n.yaml", TINY + ["model.nc=8", f"data.dataset={data}"])
    save_checkpoint({"model": tiny_detector(nc=8).state_dict(), "config": config_dict(cfg)},
                    d / "float.pt")
    return {"dir": d, "data": data, "cfg": cfg, "weights": d / "float.pt"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line(r, *parts):
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]  # log lines (e.g. "run directory: ...") may precede
    assert err.startswith("error: ") and r.stderr.count("error: ") == 1, r.stderr
    assert "Traceback" not in r.stderr
    for p in parts:
        assert str(p) in err, (p, err)
    return err


# ------------------------------------------------------------------------- library checks
def test_check_output_file_refuses_bad_locations_and_creates_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "a_dir").mkdir()
    inp = tmp_path / "in.pt"
    inp.write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(inp)
    os.link(inp, tmp_path / "hard.pt")
    before = _tree(tmp_path)
    cases = {
        blocker / "sub" / "out.json": "a_file is a regular file",
        tmp_path / "a_dir": "is an existing directory",
        Path("/proc/yolo_q_no_such/out.json"): "not writable",  # root-proof read-only place
        tmp_path / "link.pt": "would overwrite the input",
        tmp_path / "hard.pt": "would overwrite the input",
        tmp_path / "a_dir" / ".." / "in.pt": "would overwrite the input",
    }
    for path, why in cases.items():
        with pytest.raises(OutputPathError) as e:
            check_output_file(path, inputs=[inp])
        msg = str(e.value)
        assert msg.startswith(str(path)) and why in msg and len(msg.splitlines()) == 1, msg
    assert _tree(tmp_path) == before  # no probe file, no folder left anywhere
    ok = tmp_path / "new" / "deeper" / "out.json"
    assert check_output_file(ok, inputs=[inp]) == ok and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_check_output_file_refuses_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_file(ro / "out.json")
    finally:
        ro.chmod(0o755)


def test_check_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    img = tmp_path / "imgs" / "a.jpg"
    img.parent.mkdir()
    img.write_bytes(b"jpeg")
    with pytest.raises(OutputPathError, match="is an existing file, not a directory"):
        check_output_dir(blocker)
    with pytest.raises(OutputPathError, match="a_file is a regular file"):
        check_output_dir(blocker / "out")
    with pytest.raises(OutputPathError, match="holds the input"):
        check_output_dir(tmp_path / "imgs", same_names=[img])
    with pytest.raises(OutputPathError, match="would overwrite the input"):
        check_output_dir(tmp_path / "imgs", inputs=[tmp_path / "imgs"])
    assert check_output_dir(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- tools
def test_eval_save_json_checked_before_evaluation(env, tmp_path, monkeypatch):
    """The library entry refuses before the backend is even built; the CLI says it in one line."""
    import yolo_q.eval.api as api
    monkeypatch.setattr(api, "build_backend", lambda *a, **k: pytest.fail("evaluation started"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad in (blocker / "m.json", tmp_path):
        with pytest.raises(OutputPathError, match=str(bad)):
            api.run_eval(env["cfg"], "torch", str(env["weights"]), save_json=str(bad))
    with pytest.raises(OutputPathError, match="a_file"):
        api.run_eval(env["cfg"], "torch", str(env["weights"]), save_dir=str(blocker / "preds"))
    r = run_tool("eval.py", "--weights", env["weights"], "--save-json", blocker / "m.json",
                 cwd=tmp_path)
    _one_line(r, blocker / "m.json", "regular file")
    assert "mAP" not in r.stdout  # nothing was evaluated


def test_outputs_equal_to_inputs_are_refused(env, tmp_path):
    """export --out X.pt --weights X.pt, eval --save-json on the weights (via a symlink),
    convert dst == src, ptq --out == the float input: refused, the input byte-identical,
    and ptq leaves no run directory behind."""
    w = tmp_path / "w.pt"
    w.write_bytes(env["weights"].read_bytes())
    (tmp_path / "alias.pt").symlink_to(w)
    digest = _sha(w)
    runs = [
        run_tool("export.py", "--weights", w, "--out", w, "--flavour", "float", cwd=tmp_path),
        run_tool("eval.py", "--weights", w, "--save-json", tmp_path / "alias.pt", cwd=tmp_path),
        run_tool("convert.py", w, "./alias.pt", cwd=tmp_path),
        run_tool("ptq.py", "--weights", w, "--out", tmp_path / "alias.pt", cwd=tmp_path),
    ]
    for r in runs:
        _one_line(r, "would overwrite the input", w)
        assert _sha(w) == digest
    assert not (tmp_path / "runs").exists()


def test_infer_out_cannot_be_the_source_folder(env, tmp_path):
    imgs = Path(env["data"]).parent / "images" / "val"
    digests = {p: _sha(p) for p in imgs.iterdir()}
    r = run_tool("infer.py", "--weights", env["weights"], "--source", imgs, "--out", imgs,
                 cwd=tmp_path)
    _one_line(r, imgs, "overwrite the input")
    assert digests == {p: _sha(p) for p in imgs.iterdir()}


def test_benchmark_json_is_checked_before_timing(tmp_path):
    r = run_tool("benchmark.py", "train", "--json", tmp_path, "--steps", "1",
                 "model.width_multiple=0.125", "model.depth_multiple=0.1")
    _one_line(r, tmp_path, "existing directory")
    assert "img/s" not in r.stdout


def test_qat_output_dir_checked_before_data_and_models(env, tmp_path, monkeypatch):
    import torch
    import yolo_q.quant.qat as qat
    from yolo_q.quant import calibrate, convert, quant_state
    monkeypatch.setattr(qat, "build_datasets_from_config",
                        lambda *a, **k: pytest.fail("QAT started"))
    q = convert(tiny_detector(nc=8).fuse(), env["cfg"], flavour="onnxruntime")
    calibrate(q, [torch.rand(2, 3, 64, 64)], method="max", progress=False)
    ptq = tmp_path / "ptq.pt"
    save_checkpoint({"model": q.state_dict(), "config": config_dict(env["cfg"]),
                     "quant": quant_state(q)}, ptq)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="a_file is a regular file"):
        qat.run_qat(None, weights=str(ptq), verbose=False,
                    overrides=["quant.distill.enabled=false",
                               f"quant.qat.output_dir={blocker / 'qat'}"])


# ------------------------------------------------------------------------- run directories
def test_resume_of_a_mistyped_path_creates_nothing(tmp_path):
    missing = tmp_path / "runs" / "oops" / "weights" / "last.pt"
    r = run_tool("train.py", "--config", "configs/yolov6n.yaml", "--resume", missing,
                 *train_overrides(tmp_path / "no_data.yaml", tmp_path / "runs"))
    _one_line(r, missing, "not found")
    assert not (tmp_path / "runs").exists()


def test_failed_runs_leave_no_empty_run_directories(env, tmp_path):
    """Training on a missing data YAML, PTQ of an nc=8 model on a 3-class dataset: both fail
    after the run directory would be made; neither leaves it (nor its parents) behind."""
    r = run_tool("train.py", "--config", "configs/yolov6n.yaml",
                 *train_overrides(tmp_path / "no_data.yaml", tmp_path / "runs" / "train"))
    _one_line(r, "no_data.yaml")
    three = Path(env["data"]).parent / "three.yaml"
    three.write_text("path: .\ntrain: images/train\nval: images/val\nnc: 3\nnames: [a, b, c]\n")
    r = run_tool("ptq.py", "--weights", env["weights"], f"data.dataset={three}",
                 "--no-progress", cwd=tmp_path)
    _one_line(r, "nc=3")
    assert _tree(tmp_path) == []


def test_discard_keeps_directories_it_did_not_create_or_that_hold_results(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError), discard_unused_run_dirs():
        make_run_dir(tmp_path, "old", exist_ok=True)
        raise RuntimeError("failed")
    assert (tmp_path / "old").is_dir()  # existed before: not ours to remove
    with pytest.raises(RuntimeError), discard_unused_run_dirs():
        run = make_run_dir(tmp_path, "new")
        (run / "config.yaml").write_text("setup only")
        raise RuntimeError("failed")
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError), discard_unused_run_dirs():
        run = make_run_dir(tmp_path, "kept")
        (run / "weights").mkdir()
        raise RuntimeError("failed after writing a result")
    assert (tmp_path / "kept" / "weights").is_dir()
