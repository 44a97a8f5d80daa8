"""Synthetic benchmark generator: determinism, both layouts agree, labels are sane."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from yolo_q.data import DetectionDataset, load_data_yaml
from yolo_q.data.synthetic import CLASSES, SyntheticSpec, generate, render_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOQ_CACHE_DIR", str(tmp_path / "cache"))


def _files(root: Path):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix != ".cache"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    y1 = generate(root / "a", n_train=64, n_val=8, size=128, seed=3, workers=1)
    y2 = generate(root / "b", n_train=64, n_val=8, size=128, seed=3, workers=2)
    return y1, y2


def test_same_seed_byte_identical_for_any_worker_count(generated, tmp_path):
    y1, y2 = generated
    a, b = _files(y1.parent), _files(y2.parent)
    assert len(a) == 64 + 8 + 64 + 8 + 2 + 1  # images, labels, 2 JSON, YAML
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k != "synthetic.yaml")  # YAML names its out dir
    c = _files(generate(tmp_path / "c", n_train=4, n_val=2, size=128, seed=4).parent)
    assert c["images/train/000001.jpg"] != a["images/train/000001.jpg"]


def test_both_layouts_agree_and_yaml_loads(generated):
    yaml_path = generated[0]
    info = load_data_yaml(yaml_path)
    assert info["nc"] == len(CLASSES) >= 8 and info["names"] == list(CLASSES)
    assert info["coco_ids"] == list(range(1, 9)) and Path(info["path"]) == yaml_path.parent
    for split in ("train", "val"):
        yolo = DetectionDataset(info[split], 128, nc=8, verbose=False)
        js = DetectionDataset(info[split], 128, nc=8, json_file=yaml_path.parent / "annotations" /
                              f"instances_{split}.json", coco_ids=info["coco_ids"], verbose=False)
        assert yolo.im_files == js.im_files and yolo.image_ids == js.image_ids
        assert yolo.image_ids[:2] == [1, 2]
        assert sum(len(l) for l in yolo.labels) > 2 * len(yolo)
        for a, b in zip(yolo.labels, js.labels):
            np.testing.assert_array_equal(a[:, 0], b[:, 0])
            np.testing.assert_allclose(a[:, 1:] * 128, b[:, 1:] * 128, atol=1e-3)
        assert not yolo.bad_report["boxes_dropped"] and not yolo.bad_report["corrupt_images"]
    d = json.loads((yaml_path.parent / "annotations" / "instances_val.json").read_text())
    for a in d["annotations"]:  # integer pixel boxes; area = visible pixels <= box area
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, int) for v in a["bbox"]) and 0 <= x < x + w <= 128
        assert 0 < a["area"] <= w * h and 0 <= y < y + h <= 128


def test_labels_cover_classes_sizes_and_occlusion_limit():
    spec = SyntheticSpec()
    sizes, classes = [], set()
    for i in range(40):
        img, objs = render_image(0, 0, i, 320, spec)
        assert img.shape == (320, 320, 3) and img.dtype == np.uint8
        for cls, x1, y1, x2, y2, area in objs:
            classes.add(cls)
            sizes.append(max(x2 - x1, y2 - y1))
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 320 and area >= 12
    assert classes == set(range(len(CLASSES)))
    assert min(sizes) <= 14 and max(sizes) >= 80  # small objects and large ones


def test_boxes_are_tight_on_the_drawn_pixels():
    """With a flat background, no noise and no clutter, every box edge row/column contains
    object pixels and nothing outside the boxes differs from the background."""
    spec = SyntheticSpec(max_distractors=0, noise_sigma=0.0, blur_prob=0.0, min_objects=1,
                         max_objects=3)
    checked = 0
    for i in range(60):
        img, objs = render_image(11, 0, i, 192, spec)
        bg = img[0, 0].astype(int)
        if np.abs(img[:8, :8].astype(int) - bg).max() > 2 or np.abs(img[-8:, -8:].astype(int) - bg).max() > 2:
            continue  # not a flat background (gradient / stripes / noise)
        diff = np.abs(img.astype(int) - bg).max(2) > 6
        inside = np.zeros_like(diff)
        for _, x1, y1, x2, y2, _ in objs:
            inside[y1:y2, x1:x2] = True
        thin_lines = diff & ~inside
        assert thin_lines.sum() <= 3 * 192  # only the optional 1-px lines over the image
        for _, x1, y1, x2, y2, _ in objs:
            box = diff[y1:y2, x1:x2]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        checked += 1
    assert checked >= 5


def test_cli_help_and_run(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "datasets" / "synthetic.py"), "--help"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "--train" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "datasets" / "synthetic.py"), "--out", "s",
                        "--train", "3", "--val", "2", "--size", "96", "--seed", "1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s" / "synthetic.yaml").is_file()
    assert len(list((tmp_path / "s" / "images" / "train").glob("*.jpg"))) == 3


def test_cli_spec_matches_generate(tmp_path):
    """--spec KEY=VALUE gives the files generate() writes with the same SyntheticSpec fields
    (the demo / reference data commands); a bad key stops with one line."""
    spec = {"min_size": 0.3, "max_objects": 2, "small_fraction": 0.0}
    r = subprocess.run([sys.executable, str(REPO / "datasets" / "synthetic.py"), "--out", "s",
                        "--train", "3", "--val", "1", "--size", "64", "--seed", "2", "--workers",
                        "1", "--spec", *[f"{k}={v}" for k, v in spec.items()]],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    generate(tmp_path / "g", n_train=3, n_val=1, size=64, seed=2, workers=1, **spec)
    plain = generate(tmp_path / "p", n_train=3, n_val=1, size=64, seed=2, workers=1)
    labels = lambda root: {k: v for k, v in _files(root).items() if k.startswith("labels")}  # noqa: E731
    assert labels(tmp_path / "s") == labels(tmp_path / "g") != labels(plain.parent)
    r = subprocess.run([sys.executable, str(REPO / "datasets" / "synthetic.py"), "--out", "x",
                        "--spec", "max_objectz=2"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --spec 'max_objectz=2'")
    assert r.stderr.count("\n") == 1
