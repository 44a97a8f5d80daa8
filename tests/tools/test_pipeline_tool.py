"""Smoke test: tools/pipeline.py end to end on a tiny config (both variants), then a re-run that
reuses every stage, then --force of one stage."""
import json
import os
import subprocess
import sys

import pytest

from yolo_q.config import ConfigError, load_config

TINY = """\
_base_: {repo}/configs/yolov6n.yaml
model: {{nc: 8, width_multiple: 0.125}}
data: {{dataset: {tmp}/data/synthetic.yaml, img_size: 64, workers: 0, cache_labels: false,
       augment: {{mosaic: 0.0}}}}
train: {{epochs: 2, batch_size: 8, nominal_batch: 8, device: cpu, progress_bar: false,
        tensorboard: false, lr0: 0.02, warmup_epochs: 0}}
eval: {{batch_size: 8}}
quant: {{calib_batches: 2, sensitivity_images: 8, sensitivity_proxy_images: 4, qat: {{epochs: 1}}}}
pipeline:
  name: tiny
  output_dir: {tmp}/runs
  synthetic: {{out: {tmp}/data, train: 16, val: 8, size: 64, seed: 1,
              spec: {{min_size: 0.3, max_size: 0.5, small_fraction: 0.0, max_objects: 2,
                     max_distractors: 0}}}}
  variants: [base, repopt]
  repopt_hs_epochs: 1
  calib_methods: [percentile, max]
  speed_iters: 2
  speed_batches: [1]
  eval_batch: 8
"""


def run(repo_root, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(repo_root / "tools" / "pipeline.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_pipeline_end_to_end_reuse_and_force(repo_root, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(repo=repo_root, tmp=tmp_path))
    r = run(repo_root, "--config", cfg, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out_dir = tmp_path / "runs" / "tiny"

    # the final table: one row per variant with every stage's mAP and the ORT latencies
    table = r.stdout[r.stdout.index("mAP50-95 (%) per stage"):]
    for head in ("float", "PTQ", "partial PTQ", "QAT+CWD", "ORT FP32", "ORT INT8", "speed-up"):
        assert head in table
    rows = {line.split()[0]: line for line in table.splitlines()[2:4]}
    assert set(rows) == {"base", "repopt"}
    assert all(line.rstrip().endswith("x") for line in rows.values())  # a measured speed-up

    # data generated, both variants trained (RepOpt from hyper-search scales), every stage recorded
    assert (tmp_path / "data" / "synthetic.yaml").is_file()
    assert (out_dir / "repopt" / "hs" / "scales.pt").is_file()
    state = json.loads((out_dir / "pipeline.json").read_text())
    for v in ("", ":repopt"):
        for stage in ("train", "ptq", "qat", "export", "eval", "speed"):
            assert stage + v in state, (stage + v, sorted(state))
    ev = state["eval"]["result"]["rows"]
    runtimes = {(e["stage"], e["runtime"]) for e in ev}
    assert ("float", "torch FP32") in runtimes and ("float", "ORT FP32") in runtimes
    assert ("qat+cwd", "ORT INT8 (onnxruntime flavour)") in runtimes
    assert ("ptq", "ORT INT8 (tensorrt flavour)") in runtimes
    trt = [e for e in ev if e["runtime"].startswith("TensorRT")]
    assert trt and all("skipped" in e or e.get("map50_95") is not None for e in trt)
    for e in ev:
        if not e.get("skipped"):
            assert 0.0 <= e["map50_95"] <= 1.0
    # OpenVINO evaluates its own copy of the onnxruntime-flavour export (int8 signed acts)
    exp = state["export"]["result"]
    ov_file = exp.get("int8_onnxruntime_openvino")
    assert ov_file and ov_file != exp["int8_onnxruntime"]
    ov_rows = [e for e in ev if e["runtime"] == "OpenVINO INT8 (onnxruntime flavour)"]
    assert ov_rows and all(e["source"] == ov_file for e in ov_rows)
    import onnx
    meta = {p.key: p.value for p in onnx.load(ov_file).metadata_props}
    assert meta["act_storage"] == "int8"
    # torch float and ORT FP32 of the same weights agree (same pre/post-processing)
    m = {(e["stage"], e["runtime"]): e.get("map50_95") for e in ev}
    assert abs(m[("float", "torch FP32")] - m[("float", "ORT FP32")]) < 0.05
    assert [c["calib"] for c in state["ptq"]["result"]["calib_rows"]] == ["percentile", "max"]
    # the QAT summary prints its float and PTQ rows: the PTQ stage's numbers, not "-"
    qat_report = r.stdout[r.stdout.index("QAT report"):].splitlines()
    for label, key in (("float (teacher)", "float"), ("PTQ (start)", "ptq")):
        line = next(x for x in qat_report if x.startswith(label))
        assert f"{100 * state['ptq']['result'][key]['map50_95']:.2f}" in line.split(), line

    # report with plots and the resolved config
    report = (out_dir / "report.md").read_text()
    for part in ("## Summary", "### mAP per stage and runtime", "### PTQ", "### Latency",
                 "## Resolved config", "Variant `repopt`"):
        assert part in report
    for name in ("map_per_stage_base", "sensitivity_base", "curves_base", "pr_base",
                 "map_per_stage_repopt", "curves_repopt"):
        png = out_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"plots/{name}.png" in report
    assert (out_dir / "config.yaml").is_file()

    # the numbers behind the plots: real sensitivity scores; QAT continues after the float epochs
    from yolo_q.pipeline import Pipeline
    from yolo_q.report import write_report
    pipe = Pipeline(load_config(cfg), verbose=False)
    results = pipe.recorded_results()
    assert set(results) == {"base", "repopt"}
    rep = write_report(tmp_path / "report_again", pipe.cfg, results, pipe.state)
    sens = rep["plot_data"]["sens_base"]
    assert len(sens) > 10 and max(sens) > 0 and sens == sorted(sens, reverse=True)
    curves = rep["plot_data"]["curves_base"]
    assert curves["float"] == [1, 2] and curves["QAT+CWD"] == [3]
    assert "hyper-search" in rep["plot_data"]["curves_repopt"]
    # the stage plot shows each stage's change vs float torch, in points
    deltas = rep["plot_data"]["map_base"]
    assert deltas["float"]["map50_95"] == pytest.approx(100 * m[("float", "torch FP32")])
    d = {s["stage"]: s["d_map50_95"] for s in deltas["stages"]}
    assert d["ptq / torch fake-quant"] == pytest.approx(
        100 * (m[("ptq", "torch fake-quant")] - m[("float", "torch FP32")]))

    # a re-run reuses every stage
    r2 = run(repo_root, "--config", cfg, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "running ..." not in r2.stdout, r2.stdout[-3000:]
    assert r2.stdout.count("up to date") == 13  # data + 6 stages x 2 variants

    # a pipeline.json written before config entries counted (and no start records) is trusted
    # where its files still match: nothing re-runs, nothing is moved
    st = json.loads((out_dir / "pipeline.json").read_text())
    for rec in st.values():
        rec["inputs"].pop("config", None)
    (out_dir / "pipeline.json").write_text(json.dumps(st))
    (out_dir / "pipeline_started.json").unlink()
    r2b = run(repo_root, "--config", cfg, cwd=tmp_path)
    assert r2b.returncode == 0 and r2b.stdout.count("up to date") == 13, r2b.stdout[-3000:]

    # --force eval redoes the evaluations only
    r3 = run(repo_root, "--config", cfg, "--force", "eval", cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "[eval] running" in r3.stdout and "[eval:repopt] running" in r3.stdout
    assert "[train] up to date" in r3.stdout and "[speed] up to date" in r3.stdout

    # a changed setting re-runs the stages that depend on it; QAT starts afresh instead of
    # reusing its finished run made from the other PTQ model (which is moved aside)
    qat_last = out_dir / "qat" / "weights" / "last.pt"
    before = qat_last.stat().st_mtime_ns
    r4 = run(repo_root, "--config", cfg, "quant.calib=max", "pipeline.variants=[base]", cwd=tmp_path)
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert "[train] up to date" in r4.stdout and "[ptq] running" in r4.stdout
    assert "[qat] running" in r4.stdout and "was made for other inputs: moved to" in r4.stdout
    assert qat_last.stat().st_mtime_ns != before
    old = out_dir / "qat.old" / "weights" / "last.pt"  # the earlier run is kept, not deleted
    assert old.stat().st_mtime_ns == before
    ck = json.loads((out_dir / "pipeline.json").read_text())["ptq"]["result"]
    assert ck["calib"] == "max"

    # a fix that changes what QAT computes (its STAGE_VERSION bumped) re-runs QAT and what
    # follows from it, not the float or PTQ stages, and keeps the old run
    bump = ("import runpy, sys, yolo_q.pipeline as p; p.STAGE_VERSION['qat'] += 1; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r5 = subprocess.run([sys.executable, "-c", bump, str(repo_root / "tools" / "pipeline.py"),
                         "--config", str(cfg), "quant.calib=max", "pipeline.variants=[base]"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r5.returncode == 0, r5.stderr[-3000:]
    assert "[train] up to date" in r5.stdout and "[ptq] up to date" in r5.stdout
    assert "[qat] running" in r5.stdout and "[export] running" in r5.stdout
    assert (out_dir / "qat.old2" / "weights" / "last.pt").is_file()

    # QAT-aware partial quantization (quant.qat.max_drop) is its own stage after QAT: QAT and
    # the export are reused, the eval gets its row
    r6 = subprocess.run([sys.executable, "-c", bump, str(repo_root / "tools" / "pipeline.py"),
                         "--config", str(cfg), "quant.calib=max", "pipeline.variants=[base]",
                         "quant.qat.max_drop=0.0", "quant.qat.max_search_steps=2"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r6.returncode == 0, r6.stderr[-3000:]
    for stage, what in (("qat", "up to date"), ("qat_partial", "running"),
                        ("export", "running"), ("eval", "running")):
        assert f"[{stage}] {what}" in r6.stdout, (stage, r6.stdout[-3000:])
    st6 = json.loads((out_dir / "pipeline.json").read_text())
    part = st6["qat_partial"]["result"]
    assert len(part["float_groups"]) <= 1 and (out_dir / "qat_partial" / "partial.pt").is_file()
    rows6 = {e["stage"]: e for e in st6["eval"]["result"]["rows"]
             if e["runtime"] == "torch fake-quant"}
    label = f"qat+cwd partial ({len(part['float_layers'])} float)"
    prow = rows6[label]
    assert prow["map50_95"] == pytest.approx(part["metrics"]["map50_95"], abs=1e-9)
    ort6 = next(e for e in st6["eval"]["result"]["rows"]
                if e["stage"] == label and e["runtime"].startswith("ORT INT8"))
    assert ort6["source"] == st6["export"]["result"]["int8_partial"]
    assert abs(ort6["map50_95"] - prow["map50_95"]) < 0.05


def test_pipeline_errors(repo_root, tmp_path):
    r = run(repo_root, "--config", repo_root / "configs" / "demo.yaml", "--force", "trian",
            cwd=tmp_path)
    assert r.returncode == 2 and "trian" in r.stderr
    with pytest.raises(ConfigError, match="pipeline.variants"):
        load_config(repo_root / "configs" / "demo.yaml", ["pipeline.variants=[base,repot]"])
    r = run(repo_root, "--config", repo_root / "configs" / "demo.yaml",
            "pipeline.float_weights=missing.pt", f"pipeline.output_dir={tmp_path}/runs",
            "pipeline.synthetic.train=16", "pipeline.synthetic.val=4",
            f"pipeline.synthetic.out={tmp_path}/data", f"data.dataset={tmp_path}/data/synthetic.yaml",
            cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.pt" in r.stderr


@pytest.mark.parametrize("name", ["demo", "benchmark", "coco128", "synthetic320"])
def test_pipeline_configs_load(repo_root, name):
    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    assert cfg.pipeline.name and cfg.data.dataset


@pytest.mark.parametrize("calib, methods, expected", [
    ("max", ["percentile"], ["max", "percentile"]),          # quant.calib is never ignored
    ("percentile", ["percentile", "max", "mse"], ["percentile", "max", "mse"]),
    ("mse", ["max", "mse", "max"], ["mse", "max"]),          # main first, duplicates once
    ("entropy", [], ["entropy"]),
])
def test_ptq_stage_calibrators_main_first(repo_root, calib, methods, expected):
    """The pipeline's main PTQ (what sensitivity, partial, QAT and export build on) uses
    quant.calib; pipeline.calib_methods only adds comparison rows (it used to take
    calib_methods[0] and silently ignore quant.calib)."""
    from yolo_q.pipeline import calibrators
    cfg = load_config(repo_root / "configs" / "demo.yaml",
                      [f"quant.calib={calib}", f"pipeline.calib_methods=[{','.join(methods)}]"])
    assert calibrators(cfg) == expected


def test_qat_recipe_changes_rerun_qat_only():
    """The stages after PTQ read QAT's recipe through QAT's files, PTQ not at all: a change of
    quant.qat.* / quant.distill.* changes QAT's fingerprint only; any other quant key (or a
    new default) changes them all."""
    from yolo_q.pipeline import STAGE_CONFIG, _config_digest
    base = load_config(None)
    qat_only = load_config(None, ["quant.qat.epochs=9", "quant.qat.learn_scales=true",
                                  "quant.distill.tau=2"])
    calib = load_config(None, ["quant.calib=mse"])
    for stage in ("ptq", "qat", "export", "eval", "speed"):
        keys = STAGE_CONFIG[stage]
        assert (_config_digest(base, keys) == _config_digest(qat_only, keys)) == (stage != "qat")
        assert _config_digest(base, keys) != _config_digest(calib, keys), stage
    # the dropped entries are gone from the hash, everything else of the section stays
    # QAT-aware partial quantization's settings and the search subset: not QAT's training
    search = load_config(None, ["quant.qat.max_drop=0.1", "quant.sensitivity_images=999"])
    for stage, changes in (("ptq", True), ("qat", False), ("qat_partial", True)):
        keys = STAGE_CONFIG[stage]
        assert (_config_digest(base, keys) != _config_digest(search, keys)) == changes, stage
    nested = ("quant", "-quant.qat.epochs", "-quant.qat.learn_scales", "-quant.distill.tau")
    assert _config_digest(base, nested) == _config_digest(qat_only, nested)
    assert _config_digest(base, nested[:-1]) != _config_digest(qat_only, nested[:-1])
