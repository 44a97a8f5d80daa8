"""Data YAML validation, YOLO txt vs COCO JSON parsing (COCO128), label cache."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from yolo_q.data import (DataError, DataNotFoundError, DetectionDataset, img2label_path,
                         load_data_yaml, to_coco_dict)
from yolo_q.data import formats as F

REPO = Path(__file__).resolve().parents[2]
COCO128_YAML = REPO / "datasets" / "coco128.yaml"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("YOLOQ_DATA_ROOT", raising=False)


@pytest.fixture(scope="module")
def coco128():
    info = load_data_yaml(COCO128_YAML, check=False)
    if not Path(info["path"]).is_dir():
        pytest.skip(f"COCO128 not available at {info['path']}")
    return load_data_yaml(COCO128_YAML)


def test_coco128_yaml(coco128):
    root = Path(coco128["path"])
    assert root.resolve() == (REPO.parent / "shared" / "datasets" / "coco128").resolve()
    assert coco128["train"] == coco128["val"] == str(root / "images" / "train2017")
    assert coco128["nc"] == 80 and len(coco128["names"]) == 80
    assert coco128["names"] == (root / "classes.txt").read_text().split("\n")[:80]
    mapping = [int(line.split()[1]) for line in (root / "coco80_to_91.txt").read_text().splitlines()]
    assert coco128["coco_ids"] == mapping


def test_yolo_and_coco_json_agree_on_coco128(coco128):
    yolo = DetectionDataset(coco128["train"], 320, nc=80, names=coco128["names"])
    js = DetectionDataset(coco128["val"], 320, nc=80, json_file=coco128["val_json"],
                          coco_ids=coco128["coco_ids"])
    assert yolo.im_files == js.im_files and len(yolo) == 128
    assert yolo.image_ids == js.image_ids  # numeric stems == COCO ids
    assert sum(len(l) for l in yolo.labels) == sum(len(l) for l in js.labels) == 929
    assert js.bad_report["crowd_skipped"] == 10
    for a, b, (h, w) in zip(yolo.labels, js.labels, js.shapes0):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a[:, 0], b[:, 0])
        # the JSON's pixel boxes are rounded to 0.01 px
        np.testing.assert_allclose(a[:, 1:] * [w, h, w, h], b[:, 1:] * [w, h, w, h], atol=0.01)
    # the two images without a label file are valid images without objects
    assert yolo.bad_report["no_labels"] == 2 and yolo.bad_report["boxes_dropped"] == {}
    # JSON class indices: category id -> index through coco_ids (80 -> 91 mapping)
    d = json.loads(Path(coco128["val_json"]).read_text())
    first = next(a for a in d["annotations"] if a["image_id"] == js.image_ids[0] and not a["iscrowd"])
    assert coco128["coco_ids"][int(js.labels[0][0, 0])] == first["category_id"]


def test_to_coco_dict_round_trip(coco128):
    from pycocotools.coco import COCO
    ds = DetectionDataset(coco128["val"], 320, nc=80, json_file=coco128["val_json"],
                          coco_ids=coco128["coco_ids"])
    gt = ds.coco_gt()
    orig = json.loads(Path(coco128["val_json"]).read_text())
    want = {a["id"]: a for a in orig["annotations"]}
    got = [a for a in gt["annotations"] if a["image_id"] == 9]
    ref = [a for a in orig["annotations"] if a["image_id"] == 9 and not a["iscrowd"]]
    assert len(got) == len(ref) > 0 and want
    for g, r in zip(got, ref):
        assert g["category_id"] == r["category_id"]
        np.testing.assert_allclose(g["bbox"], r["bbox"], atol=2e-3)
    api = COCO()
    api.dataset = gt
    api.createIndex()
    assert len(api.getImgIds()) == 128 and len(api.getAnnIds()) == 929


def test_img2label_path():
    p = os.path.join(os.sep, "d", "images", "x", "images", "train", "a.b.jpg")
    assert img2label_path(p) == os.path.join(os.sep, "d", "images", "x", "labels", "train", "a.b.txt")


def _write_yaml(tmp_path, text, name="d.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_relative_paths_env_and_root_override(tmp_path, monkeypatch):
    ds = tmp_path / "sets" / "toy"
    (ds / "imgs").mkdir(parents=True)
    y = _write_yaml(tmp_path, "path: sets/toy\ntrain: imgs\nval: imgs\nnames: [a, b]\n")
    info = load_data_yaml(y)
    assert info["path"] == str(ds) and info["train"] == str(ds / "imgs") and info["nc"] == 2
    assert info["train_json"] is None and info["coco_ids"] is None
    # ${VAR:-default}: default relative to the YAML, env value wins when set
    y2 = _write_yaml(tmp_path, "path: ${YOLOQ_DATA_ROOT:-sets}/toy\ntrain: imgs\nval: imgs\n"
                               "nc: 2\nnames: {0: a, 1: b}\n", "e.yaml")
    assert load_data_yaml(y2)["path"] == str(ds)
    other = tmp_path / "elsewhere"
    (other / "toy" / "imgs").mkdir(parents=True)
    monkeypatch.setenv("YOLOQ_DATA_ROOT", str(other))
    assert load_data_yaml(y2)["train"] == str(other / "toy" / "imgs")
    # explicit root replaces `path`
    assert load_data_yaml(y, root=str(ds))["val"] == str(ds / "imgs")
    with pytest.raises(DataNotFoundError, match="nowhere"):
        load_data_yaml(y, root=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("text,match", [
    ("train: imgs\nnames: [a]\n", "missing required key 'val'"),
    ("train: imgs\nval: imgs\nnc: 3\nnames: [a, b]\n", "2 entries but nc=3"),
    ("train: imgs\nval: imgs\nnames: [a, b]\ncoco_ids: [1]\n", "coco_ids"),
    ("train: imgs\nval: imgs\nnames: [a]\ntrian: x\n", "unknown key"),
    ("- just\n- a list\n", "top level"),
])
def test_yaml_invalid_names_file_and_key(tmp_path, text, match):
    (tmp_path / "imgs").mkdir()
    y = _write_yaml(tmp_path, text)
    with pytest.raises(DataError, match=match) as e:
        load_data_yaml(y)
    assert str(y) in str(e.value)


def test_yaml_missing_path_names_key_and_path(tmp_path):
    (tmp_path / "imgs").mkdir()
    y = _write_yaml(tmp_path, "train: imgs\nval: missing_val_dir\nnames: [a]\n")
    with pytest.raises(DataNotFoundError) as e:
        load_data_yaml(y)
    msg = str(e.value)
    assert str(y) in msg and "'val'" in msg and str(tmp_path / "missing_val_dir") in msg
    with pytest.raises(DataNotFoundError, match="no_such.yaml"):
        load_data_yaml(tmp_path / "no_such.yaml")


def test_parse_yolo_label_rules(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("0 0.5 0.5 0.2 0.2\n"          # ok
                 "1 0.98 0.5 0.1 0.1\n"          # x2 = 1.03: clipped
                 "1 0.5 0.5 0.2\n"               # 4 columns
                 "x 0.5 0.5 0.2 0.2\n"           # not numeric
                 "7 0.5 0.5 0.2 0.2\n"           # class >= nc
                 "0 0.5 0.5 0.0 0.2\n"           # zero width
                 "0 3.0 3.0 0.2 0.2\n"           # far outside
                 "0 0.5 0.5 0.2 0.2\n"           # duplicate of line 1
                 "1 0.5 0.5 0.2 0.2000004\n")    # within rounding of a real box: kept
    labels, issues, counts, status = F.parse_yolo_label(f, nc=3, shape=(100, 200))
    assert status == "ok"
    np.testing.assert_allclose(labels[1], [1, 0.965, 0.5, 0.07, 0.1], atol=1e-6)
    assert len(labels) == 3
    assert counts == {"clipped": 1, "drop_bad_columns": 1, "drop_non_numeric": 1,
                      "drop_bad_class": 1, "drop_degenerate": 1, "drop_out_of_image": 1,
                      "drop_duplicate": 1}
    assert any(s.startswith("line 5: class 7") for s in issues)
    assert F.parse_yolo_label(tmp_path / "none.txt", 3, (10, 10))[3] == "missing"
    (tmp_path / "e.txt").write_text("\n")
    assert F.parse_yolo_label(tmp_path / "e.txt", 3, (10, 10))[3] == "empty"


def test_to_coco_dict_hand_computed():
    d = to_coco_dict(["a/x.jpg"], [7], [(100, 200)], [np.array([[1, 0.5, 0.25, 0.1, 0.2]])],
                     ["p", "q"], coco_ids=[5, 9])
    assert d["images"] == [{"id": 7, "file_name": "x.jpg", "height": 100, "width": 200}]
    a = d["annotations"][0]
    assert a["category_id"] == 9 and a["bbox"] == [90.0, 15.0, 20.0, 20.0] and a["area"] == 400.0


def test_coco_json_edge_cases(tmp_path):
    import cv2
    img_dir = tmp_path / "images" / "val"
    img_dir.mkdir(parents=True)
    for name, (h, w) in {"a.jpg": (40, 80), "b.jpg": (40, 80), "extra.jpg": (40, 80)}.items():
        cv2.imwrite(str(img_dir / name), np.zeros((h, w, 3), np.uint8))
    d = {"images": [{"id": 11, "file_name": "a.jpg", "width": 80, "height": 40},
                    {"id": 12, "file_name": "b.jpg", "width": 160, "height": 80},  # size differs
                    {"id": 13, "file_name": "gone.jpg", "width": 80, "height": 40}],
         "categories": [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}],
         "annotations": [
             {"id": 1, "image_id": 11, "category_id": 7, "bbox": [8, 4, 16, 8], "iscrowd": 0},
             {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0, 0, 80, 40], "iscrowd": 1},
             {"id": 3, "image_id": 11, "category_id": "dog", "bbox": [8, 4, 16, 8], "iscrowd": 0},
             {"id": 4, "image_id": 11, "category_id": 3, "bbox": [70, 30, 12, 10], "iscrowd": 0},
             {"id": 5, "image_id": 11, "category_id": 3, "bbox": [8, 4, 0, 8], "iscrowd": 0},
             {"id": 6, "image_id": 12, "category_id": 3, "bbox": [40, 20, 80, 40]}]}
    jf = tmp_path / "val.json"
    jf.write_text(json.dumps(d))
    ds = DetectionDataset(img_dir, 64, json_file=jf, verbose=False)
    assert ds.nc == 2 and ds.names == ["x", "y"]  # contiguous indices in sorted id order
    assert [Path(f).name for f in ds.im_files] == ["a.jpg", "b.jpg"] and ds.image_ids == [11, 12]
    np.testing.assert_allclose(ds.labels[0], [[1, 0.2, 0.2, 0.2, 0.2],
                                              [0, 75 / 80, 35 / 40, 10 / 80, 10 / 40]], atol=1e-6)
    np.testing.assert_allclose(ds.labels[1], [[0, 0.5, 0.5, 0.5, 0.5]], atol=1e-6)
    r = ds.bad_report
    assert r["crowd_skipped"] == 1 and r["boxes_clipped"] == 1
    assert r["boxes_dropped"] == {"bad_class": 1, "degenerate": 1}
    assert [Path(p).name for p in r["not_in_json"]] == ["extra.jpg"]
    assert [Path(p).name for p in r["json_size_mismatch"]] == ["b.jpg"]
    # explicit coco_ids: class index -> category id
    ds2 = DetectionDataset(img_dir, 64, json_file=jf, coco_ids=[7, 3], verbose=False)
    assert ds2.labels[0][:, 0].tolist() == [0, 1]
    with pytest.raises(DataError, match="val2.json"):
        (tmp_path / "val2.json").write_text("{not json")
        DetectionDataset(img_dir, 64, json_file=tmp_path / "val2.json", verbose=False)
