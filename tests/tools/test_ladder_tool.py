"""tools/ladder.py end to end on a tiny model: a 1-epoch float checkpoint with its results.csv
shipped beside it -> the whole ladder -> ladder.json in the schema of issue #16."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from yolo_q.config import load_config
from yolo_q.data.synthetic import generate
from yolo_q.ladder import parse_variant
from yolo_q.training import train

from conftest import TINY


def test_ladder_end_to_end(repo_root, tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY.format(repo=repo_root, tmp=tmp_path))
    generate(tmp_path / "data", n_train=16, n_val=8, size=64, seed=1, workers=1)
    summary = train(load_config(cfg_path), verbose=False)
    shipped = tmp_path / "ship" / "tiny.pt"
    shipped.parent.mkdir()
    shutil.copyfile(summary["last"], shipped)
    shutil.copyfile(tmp_path / "runs" / "train" / "float" / "results.csv", shipped.with_suffix(".csv"))

    out = tmp_path / "ladder.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(repo_root / "tools" / "ladder.py"), "--quiet",
                        "--variant", f"repvgg={cfg_path}:{shipped}", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lad = json.loads(out.read_text())
    assert lad["data_command"] == (f"python datasets/synthetic.py --out {tmp_path}/data --train 16 "
                                   f"--val 8 --size 64 --seed 1")
    assert lad["eval_command"] == f"python tools/eval.py --config {cfg_path} --weights {shipped}"
    e = lad["variants"]["repvgg"]
    assert e["float_weights"] == str(shipped) and e["epochs"] == 1 and len(e["curve"]) == 1
    assert set(e["ptq"]) == {"max", "percentile"}
    values = [e["float"], *e["ptq"].values(), e["per_tensor"], e["partial"], e["qat"],
              e["qat_cwd"], e["ort_int8"], e["ort_int8_trt_flavour"]]
    assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in values), e
    assert e["curve"][-1] == pytest.approx(e["float"], abs=0.01)  # the shipped weights' eval
    assert isinstance(e["partial_float_layers"], list) and e["val_images"] == 8
    assert e["regime"].endswith("mosaic off; choices on the val images")
    from yolo_q.reference import sha256
    assert e["float_sha256"] == sha256(shipped)
    assert "### repvgg" in r.stdout and "| QAT+CWD |" in r.stdout

    # a second run reuses every pipeline stage: the given checkpoint's conversion is rewritten
    # only when its bytes change (its mtime is in the later stages' fingerprints), and the
    # float curve is the CSV shipped beside it
    pipe_dir = tmp_path / "runs" / "pipeline" / "ladder_repvgg"
    state = json.loads((pipe_dir / "pipeline.json").read_text())
    assert state["train"]["result"]["results_csv"] == str(shipped.with_suffix(".csv"))
    float_pt = pipe_dir / "float" / "weights" / "float.pt"
    before = float_pt.stat().st_mtime_ns
    r2 = subprocess.run([sys.executable, str(repo_root / "tools" / "ladder.py"),
                         "--variant", f"repvgg={cfg_path}:{shipped}", "--out", str(out)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for stage in ("ptq", "qat", "export", "eval", "speed"):
        assert f"[{stage}] up to date" in r2.stdout, r2.stdout[-3000:]
    assert float_pt.stat().st_mtime_ns == before
    assert json.loads(out.read_text())["variants"]["repvgg"] == e

    # with QAT-aware partial quantization: its row, nothing else changes
    r2b = subprocess.run([sys.executable, str(repo_root / "tools" / "ladder.py"),
                          "--variant", f"repvgg={cfg_path}:{shipped}", "--out", str(out),
                          "quant.qat.max_drop=0.0", "quant.qat.max_search_steps=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r2b.returncode == 0, r2b.stderr[-3000:]
    e2 = json.loads(out.read_text())["variants"]["repvgg"]
    assert 0.0 <= e2["qat_cwd_partial"] <= 100.0 and e2["qat_partial_float_layers"] == []
    assert e2["qat_partial_max_drop"] == 0.0 and 0.0 <= e2["ort_int8_qat_partial"] <= 100.0
    assert {k: v for k, v in e2.items()
            if not (k.startswith("qat_") or k.endswith("qat_partial")) or k == "qat_cwd"} == e
    assert "| QAT+CWD, QAT-aware partial (" in r2b.stdout

    # the eval command reproduces the float row
    cmd = lad["eval_command"].split()
    assert cmd[:2] == ["python", "tools/eval.py"]
    r = subprocess.run([sys.executable, *cmd[1:], "--save-json", str(tmp_path / "m.json")],
                       cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert 100 * m["map50_95"] == pytest.approx(e["float"], abs=0.01)

    # the ladder's models scored again on another val set (benchmarks/reference/reeval.py)
    generate(tmp_path / "more", n_train=2, n_val=12, size=64, seed=1, workers=1)
    r = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "reference" / "reeval.py"),
                        "--val-data", str(tmp_path / "more" / "synthetic.yaml"),
                        "--ladder", str(out), "--out", str(tmp_path / "re.json"),
                        "--output-dir", str(tmp_path / "runs" / "pipeline")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "re.json").read_text())["ladders"]["ladder"]["repvgg"]
    by = {(x["stage"], x["runtime"]): x for x in rows}
    assert by[("float", "torch FP32")]["ladder"] == e["float"]
    assert by[("qat+cwd", "ORT INT8 (onnxruntime flavour)")]["ladder"] == e["ort_int8"]
    assert all(0 <= x["map50_95"] <= 100 for x in rows)
    torch_rows = [x for x in rows if x["runtime"].startswith("torch")]
    assert torch_rows and all("native_conv" in x for x in torch_rows)
    assert not any("native_conv" in x for x in rows if x["runtime"].startswith("ORT"))
    # the float model (no rounding to amplify float differences) scores alike with both convs
    fl = by[("float", "torch FP32")]
    assert fl["native_conv"] == pytest.approx(fl["map50_95"], abs=0.05)
    bad = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "reference" / "reeval.py"),
                          "--val-data", str(tmp_path / "nope.yaml"), "--ladder", str(out),
                          "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope.yaml does not exist" in bad.stderr


def test_ladder_bad_variant(repo_root, tmp_path):
    with pytest.raises(ValueError, match="name=config.yaml:weights.pt"):
        parse_variant("repvgg")
    r = subprocess.run([sys.executable, str(repo_root / "tools" / "ladder.py"), "--variant",
                        f"x={repo_root}/configs/demo.yaml:{tmp_path}/missing.pt"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing.pt does not exist" in r.stderr
    assert r.stderr.count("\n") == 1  # one line, no traceback


def test_ladder_keeps_variants_it_does_not_redo(repo_root, tmp_path, monkeypatch):
    """A ladder built over several sittings: running only 'repopt' keeps the earlier 'repvgg'
    entry of the same JSON and replaces 'repopt'; each run's pipeline directory is named
    after the JSON (ladder_harsh.json -> ladder_harsh_<name>)."""
    import yolo_q.ladder as lad
    seen = []
    monkeypatch.setattr(lad, "_run_variant",
                        lambda v, ov, verbose, tag: seen.append(f"{tag}_{v.name}") or {"new": 1})
    cfg = str(repo_root / "configs" / "demo.yaml")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    out = tmp_path / "ladder_harsh.json"
    old_eval = "python tools/eval.py --config repvgg.yaml --weights repvgg.pt"
    out.write_text(json.dumps({"eval_command": old_eval,
                               "variants": {"repvgg": {"old": 1}, "repopt": {"old": 2}}}))
    res = lad.run_ladder([lad.LadderVariant("repopt", cfg, str(weights))], str(out))
    assert res["variants"] == {"repvgg": {"old": 1}, "repopt": {"new": 1}}
    assert json.loads(out.read_text())["variants"] == res["variants"]
    assert seen == ["ladder_harsh_repopt"]
    assert res["eval_command"] == old_eval  # still the ladder's first variant (repvgg)
    # nothing kept: the eval command is this run's first variant's
    res = lad.run_ladder([lad.LadderVariant("repvgg", cfg, str(weights)),
                          lad.LadderVariant("repopt", cfg, str(weights))], str(out))
    assert res["eval_command"] == f"python tools/eval.py --config {cfg} --weights {weights}"
    out.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a ladder JSON"):
        lad.run_ladder([lad.LadderVariant("repopt", cfg, str(weights))], str(out))
