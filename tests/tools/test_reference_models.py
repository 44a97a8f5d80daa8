"""Shipped reference checkpoints (issue #16 item 5): each loads with ``weights_only=True``, is
float16 and <= 10 MB, matches its recorded sha256 and reproduces its recorded float mAP on the
deterministic check subset (the first val images, regenerated). Plus the shipping code itself
on a tiny run."""
import shutil

import pytest
import torch

from yolo_q.config import load_config
from yolo_q.data.synthetic import generate
from yolo_q.engine.hooks import read_results_csv
from yolo_q.io import half_state, read_json
from yolo_q.reference import check_map, curve_gain, join_stages, sha256, ship_reference
from yolo_q.training import train

from conftest import TINY

MANIFEST = "benchmarks/reference/models.json"


def _shipped(root):
    p = root / MANIFEST
    return read_json(p) if p.is_file() else {}


def _names():
    from pathlib import Path
    names = sorted(_shipped(Path(__file__).resolve().parents[2]))
    return names or [pytest.param(None, marks=pytest.mark.skip(reason="no reference model shipped"))]


@pytest.mark.parametrize("name", _names())
def test_shipped_reference_reproduces_its_map(repo_root, tmp_path, name):
    e = _shipped(repo_root)[name]
    path = repo_root / e["weights"]
    assert path.stat().st_size <= 10 * 2 ** 20
    assert sha256(path) == e["sha256"]
    ck = torch.load(path, map_location="cpu", weights_only=True)
    floats = [v for v in ck["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    got = check_map(path, repo_root / e["config"], e["check"], tmp_path)
    assert got == pytest.approx(e["check"]["map50_95"], abs=0.2)
    assert e["check"]["map50_95"] > 10.0  # a trained detector, not noise


def test_curve_gain():
    rows = [{"epoch": float(i), "map50_95": m} for i, m in
            enumerate([0.1, 0.3, 0.40, 0.41, 0.42, 0.425, 0.43, 0.43, 0.431, 0.433], 1)]
    assert curve_gain(rows) == pytest.approx(100 * (0.433 - 0.43))  # epoch 8 -> 10
    assert curve_gain(rows[:1]) is None


def test_join_stages_continues_the_epochs(tmp_path):
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "ab.csv"
    a.write_text("epoch,lr,map50_95\n1,0.02,0.1\n2,0.01,\n3,0.001,0.5\n")
    b.write_text("epoch,lr,map50_95\n1,0.0002,0.51\n2,0.0002,0.52\n")
    join_stages([a, b], out)
    rows = read_results_csv(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["map50_95"] for r in rows] == [0.1, None, 0.5, 0.51, 0.52]
    assert curve_gain(rows) == pytest.approx(100 * (0.52 - 0.51))  # epoch 4 -> 5
    b.write_text("epoch,lr,map50,map50_95\n1,0.0002,0.9,0.51\n")
    with pytest.raises(ValueError, match="b.csv has other columns"):
        join_stages([a, b], out)


def test_half_state_loads_back_and_refuses_overflow():
    m = torch.nn.Conv2d(3, 4, 3)
    h = half_state(m.state_dict())
    assert all(v.dtype == torch.float16 for v in h.values())
    m2 = torch.nn.Conv2d(3, 4, 3)
    m2.load_state_dict(h)
    assert m2.weight.dtype == torch.float32
    torch.testing.assert_close(m2.weight, m.weight, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="big: values beyond float16"):
        half_state({"big": torch.tensor([1e6])})


def test_ship_reference_on_a_tiny_run(repo_root, tmp_path, monkeypatch):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY.format(repo=repo_root, tmp=tmp_path))
    generate(tmp_path / "data", n_train=16, n_val=8, size=64, seed=1, workers=1)
    train(load_config(cfg_path), verbose=False)
    run = tmp_path / "runs" / "train" / "float"
    out = tmp_path / "ship"
    e = ship_reference(run, "tiny", cfg_path, out, check_images=4)
    assert (out / "tiny.csv").read_bytes() == (run / "results.csv").read_bytes()
    assert (out / "tiny.png").stat().st_size > 0
    assert read_json(out / "models.json") == {"tiny": e}
    assert e["sha256"] == sha256(out / "tiny.pt") and e["epochs"] == 1 and e["val_images"] == 8
    assert e["check"] == {"val_images": 4, "size": 64, "seed": 1, "spec": {},
                          "map50_95": e["check"]["map50_95"]}
    # the float16 copy scores what the float32 run scored on the same val images
    assert e["val_map50_95"] == pytest.approx(
        100 * read_results_csv(run / "results.csv")[-1]["map50_95"], abs=0.5)
    assert check_map(out / "tiny.pt", cfg_path, e["check"], tmp_path / "again") == \
        e["check"]["map50_95"]
    # two stages (here the same run twice): one joined curve, the weights of the last stage
    e2 = ship_reference([run, run], "tiny2", cfg_path, out, check_images=4)
    assert e2["epochs"] == 2 and e2["stages"] == [{"run": run.as_posix(), "epochs": 1}] * 2
    assert e2["sha256"] == e["sha256"] and e2["val_map50_95"] == e["val_map50_95"]
    assert [r["epoch"] for r in read_results_csv(out / "tiny2.csv")] == [1, 2]
    shutil.rmtree(out)


def test_the_readme_main_job_starts_from_a_shipped_reference(repo_root):
    """configs/demo.yaml quantizes a shipped reference checkpoint (listed with its hash), on
    the val images that checkpoint's mAP was recorded on."""
    demo = load_config(repo_root / "configs" / "demo.yaml")
    shipped = {e["weights"]: e for e in _shipped(repo_root).values()}
    assert demo.pipeline.float_weights in shipped
    ref = load_config(repo_root / shipped[demo.pipeline.float_weights]["config"])
    d, r = demo.pipeline.synthetic, ref.pipeline.synthetic
    assert (d.size, d.seed, d.val, dict(d.spec)) == (r.size, r.seed, r.val, dict(r.spec))


LADDERS = ("ladder.json", "ladder_harsh.json")


@pytest.mark.parametrize("ladder", LADDERS)
def test_shipped_ladders_were_measured_on_the_shipped_checkpoints(repo_root, ladder):
    """Every variant of a committed ladder names a shipped checkpoint and was measured on that
    very file: same sha256 where the ladder recorded one, and its float row and curve are the
    shipped model's recorded mAP (when measured on as many val images) and curve (a re-shipped
    model without a re-run ladder fails)."""
    path = repo_root / "benchmarks" / "reference" / ladder
    if not path.is_file():
        pytest.skip(f"{ladder} not committed")
    by_weights = {e["weights"]: e for e in _shipped(repo_root).values()}
    for name, v in read_json(path)["variants"].items():
        e = by_weights.get(v["float_weights"])
        assert e is not None, f"{ladder}: {name} uses {v['float_weights']}, not a shipped model"
        if "float_sha256" in v:
            assert v["float_sha256"] == e["sha256"], f"{ladder}: {name} measured another file"
        if v.get("val_images", e["val_images"]) == e["val_images"]:  # else: another val set
            assert v["float"] == pytest.approx(e["val_map50_95"], abs=0.006), f"{ladder}: {name}"
        assert v["epochs"] == e["epochs"]
        shipped_curve = read_results_csv(repo_root / e["weights"].replace(".pt", ".csv"))
        assert v["curve"][-1] == pytest.approx(100 * shipped_curve[-1]["map50_95"], abs=0.006)
