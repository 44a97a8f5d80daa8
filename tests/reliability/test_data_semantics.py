"""Dataset semantics that used to give silently wrong data or scores (issue #21): duplicate COCO
image ids, categories that do not cover the classes, BOM/CRLF label files, a ``coco_ids`` file in
the data YAML, and evaluator ground truth built from the cleaned annotations (a box the loader
drops is never scored and never crashes pycocotools)."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_q.data import DataError, DetectionDataset, load_data_yaml
from yolo_q.data import formats as F
from yolo_q.eval import COCOEvaluator

REPO = Path(__file__).resolve().parents[2]
SIZES = {"a.jpg": (40, 80), "b.jpg": (60, 60), "c.jpg": (50, 100)}  # (h, w)


def _images(root: Path) -> Path:
    d = root / "images" / "val"
    d.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in SIZES.items():
        cv2.imwrite(str(d / name), np.full((h, w, 3), 90, np.uint8))
    return d


def _coco(images=None, anns=(), cats=((1, "p"), (2, "q"))):
    images = images if images is not None else [
        {"id": i + 1, "file_name": n, "height": h, "width": w}
        for i, (n, (h, w)) in enumerate(SIZES.items())]
    return {"images": images, "categories": [{"id": c, "name": n} for c, n in cats],
            "annotations": [dict({"id": k + 1, "iscrowd": 0}, **a) for k, a in enumerate(anns)]}


def _write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _perfect(ds):
    """Detections equal to the dataset's (kept) labels: (n, 6) xyxy pixels, score 1, class."""
    out = []
    for lab, (h, w) in zip(ds.labels, ds.shapes0):
        c, cx, cy, bw, bh = np.asarray(lab, np.float64).reshape(-1, 5).T
        out.append(np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                             (cy + bh / 2) * h, np.ones_like(c), c], 1))
    return out


def _score(ds):
    ev = COCOEvaluator.from_dataset(ds)
    for f, det in zip(ds.im_files, _perfect(ds)):
        ev.add(f, det)
    return ev, ev.summarize(per_class=False, pr_curves=False)


def _one_line_naming(err, path):
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and str(path) in msg, msg


# ------------------------------------------------------------------------ A: data
def test_duplicate_image_id_is_rejected_naming_the_file(tmp_path):
    img_dir = _images(tmp_path)
    doc = _coco(images=[{"id": 1, "file_name": "a.jpg", "height": 40, "width": 80},
                        {"id": 1, "file_name": "b.jpg", "height": 60, "width": 60}],
                anns=[{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10]}])
    jf = _write_json(tmp_path / "dup.json", doc)
    with pytest.raises(DataError, match=r"images\[1\]\.id 1 is also images\[0\]\.id") as e:
        DetectionDataset(img_dir, 64, nc=2, json_file=jf, cache=False, verbose=False)
    _one_line_naming(e, jf)
    # the same file name twice (images are matched to files by name) is rejected as well
    doc["images"][1].update(id=2, file_name="sub/a.jpg")
    with pytest.raises(DataError, match="file names must be unique") as e:
        F.load_coco_json(_write_json(jf, doc))
    _one_line_naming(e, jf)


def test_categories_must_cover_the_classes(tmp_path):
    img_dir = _images(tmp_path)
    # 4 of 8 categories: classes 4..7 had no category (evaluation failed naming no file)
    cats = [(i + 1, f"c{i}") for i in range(4)]
    jf = _write_json(tmp_path / "half.json", _coco(
        anns=[{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10]}], cats=cats))
    with pytest.raises(DataError, match="4 categories but the dataset has nc=8") as e:
        DetectionDataset(img_dir, 64, nc=8, json_file=jf, cache=False, verbose=False)
    _one_line_naming(e, jf)
    # an annotation of a category that 'categories' does not list
    jf2 = _write_json(tmp_path / "unlisted.json", _coco(
        anns=[{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10]},
              {"image_id": 2, "category_id": 9, "bbox": [10, 10, 20, 10]}]))
    with pytest.raises(DataError, match=r"annotations\[1\]\.category_id 9 is not in") as e:
        DetectionDataset(img_dir, 64, nc=2, json_file=jf2, cache=False, verbose=False)
    _one_line_naming(e, jf2)
    # coco_ids that name categories the JSON lacks
    with pytest.raises(DataError, match=r"lacks category id\(s\) \[5\]") as e:
        F.load_coco_json(jf, coco_ids=[1, 2, 3, 4, 5])
    _one_line_naming(e, jf)


def test_bom_and_crlf_label_files_keep_every_box(tmp_path):
    img_dir = _images(tmp_path)
    lbl_dir = tmp_path / "labels" / "val"
    lbl_dir.mkdir(parents=True)
    for name in SIZES:
        text = "0 0.5 0.5 0.25 0.25\r\n1 0.3 0.4 0.2 0.3\r\n\r\n"
        (lbl_dir / name).with_suffix(".txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = DetectionDataset(img_dir, 64, nc=2, cache=False, verbose=False)
    assert [len(l) for l in ds.labels] == [2, 2, 2]
    assert ds.bad_report["boxes_dropped"] == {} and ds.bad_report["label_issues"] == {}
    np.testing.assert_allclose(ds.labels[0], [[0, 0.5, 0.5, 0.25, 0.25], [1, 0.3, 0.4, 0.2, 0.3]],
                               atol=1e-6)
    # an image list with a BOM
    lst = tmp_path / "val.txt"
    lst.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(f"images/val/{n}" for n in SIZES).encode())
    assert [Path(f).name for f in F.list_images(lst)] == sorted(SIZES)


def _data_yaml(tmp_path, coco_ids, nc=2):
    y = tmp_path / "data.yaml"
    y.write_text(f"path: .\ntrain: images/val\nval: images/val\nval_json: val.json\nnc: {nc}\n"
                 f"names: {[f'n{i}' for i in range(nc)]}\ncoco_ids: {coco_ids}\n")
    return y


def test_coco_ids_file_in_the_data_yaml(tmp_path):
    """README: ``coco_ids: coco80_to_91.txt`` (class index -> COCO category id, a file under the
    dataset root); ``<class> <id>`` per line or one id per line."""
    img_dir = _images(tmp_path)
    _write_json(tmp_path / "val.json", _coco(
        anns=[{"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 10]},
              {"image_id": 2, "category_id": 3, "bbox": [5, 5, 30, 30]}],
        cats=((3, "three"), (7, "seven"))))
    (tmp_path / "ids.txt").write_text("# class id\n0 7\n1 3\n")
    info = load_data_yaml(_data_yaml(tmp_path, "ids.txt"))
    assert info["coco_ids"] == [7, 3]
    (tmp_path / "ids1.txt").write_text("7\r\n3\r\n")  # one id per line, CRLF
    assert load_data_yaml(_data_yaml(tmp_path, "ids1.txt"))["coco_ids"] == [7, 3]
    ds = DetectionDataset(img_dir, 64, nc=2, json_file=info["val_json"], coco_ids=info["coco_ids"],
                          cache=False, verbose=False)
    assert ds.labels[0][:, 0].tolist() == [0] and ds.labels[1][:, 0].tolist() == [1]
    ev, res = _score(ds)
    assert ev.class_map == [7, 3] and res["map50_95"] == pytest.approx(1.0)
    # the file the README names, against the inline list of datasets/coco128.yaml
    shared = REPO.parent / "shared" / "datasets" / "coco128" / "coco80_to_91.txt"
    if shared.is_file():
        inline = load_data_yaml(REPO / "datasets" / "coco128.yaml", check=False)["coco_ids"]
        assert F.read_coco_ids(shared, 80) == inline
    # bad files: one line naming the YAML key and the file
    for text, match in (("0 7\n", "list of 2 integers"), ("0 7\n1 7\n", "duplicate"),
                        ("0 7\n2 3\n", "class indices must be 0..1"), ("a b\n", ":1: expected")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(DataError, match=match) as e:
            load_data_yaml(_data_yaml(tmp_path, "bad.txt"))
        _one_line_naming(e, tmp_path / "bad.txt")
        assert "key 'coco_ids'" in str(e.value)
    with pytest.raises(DataError, match="key 'coco_ids': path not found"):
        load_data_yaml(_data_yaml(tmp_path, "missing.txt"))


# ------------------------------------------------------------------------ B: evaluator GT
BAD_BOXES = [
    {"image_id": 1, "category_id": 1, "bbox": [60, 10, -20, 10]},       # negative width
    {"image_id": 2, "category_id": 2, "bbox": ["x", 1, 2, 3]},          # not numeric
    {"image_id": 2, "category_id": 1, "bbox": [5, 5, 20, "nan"]},       # not numeric
    {"image_id": 3, "category_id": 2, "bbox": [1, 2, 3]},               # three values
    {"image_id": 3, "category_id": 2, "bbox": [900, 10, 20, 10]},       # far outside
    {"image_id": 3, "category_id": "p", "bbox": [10, 10, 20, 10]},      # bad class
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10]},        # duplicate of the first
]
GOOD_BOXES = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10], "area": 150.0},
    {"image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30]},
    {"image_id": 3, "category_id": 1, "bbox": [40, 10, 20, 30], "area": "big"},
    {"image_id": 3, "category_id": 2, "bbox": [0, 0, 100, 50], "iscrowd": 1, "area": 4000},
]


@pytest.mark.parametrize("bad", [[b] for b in BAD_BOXES] + [BAD_BOXES], ids=[
    "negative_width", "string", "nan", "three_values", "outside", "bad_class", "duplicate", "all"])
def test_evaluator_scores_only_the_boxes_the_loader_keeps(tmp_path, bad):
    img_dir = _images(tmp_path)
    jf = _write_json(tmp_path / "val.json", _coco(anns=GOOD_BOXES[:1] + bad + GOOD_BOXES[1:]))
    ds = DetectionDataset(img_dir, 64, nc=2, json_file=jf, cache=False, verbose=False)
    assert sum(len(l) for l in ds.labels) == 3
    dropped = sum(ds.bad_report["boxes_dropped"].values())
    assert dropped == len(bad)  # counted once, by the loader
    ev, res = _score(ds)  # used to be 0.9381 (negative width) or a pycocotools crash ('x')
    assert res["map50_95"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0)
    anns = ev.gt_dict["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4]
    # the JSON's area where valid (else w*h), and its crowd region, kept
    assert [a["area"] for a in anns] == [150.0, 900.0, 600.0, 4000.0]
    assert [a["iscrowd"] for a in anns] == [0, 0, 0, 1]
    # a missed box still costs: drop one detection of the kept boxes
    ev2 = COCOEvaluator.from_dataset(ds)
    for i, (f, det) in enumerate(zip(ds.im_files, _perfect(ds))):
        ev2.add(f, det[:0] if i == 1 else det)
    assert ev2.summarize(per_class=False, pr_curves=False)["map50_95"] < 0.99
