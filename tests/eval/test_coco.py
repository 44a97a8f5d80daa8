import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest

from eval_testutils import COCO128
from yolo_q.eval.coco import (STAT_NAMES, COCOEvaluator, coco_gt_from_dataset, load_class_map,
                              plot_pr_curves)

COCO_JSON = COCO128 / "annotations" / "instances_train2017.json"
needs_coco128 = pytest.mark.skipif(not COCO_JSON.is_file(), reason="COCO128 not available")


def synthetic_ds():
    """4 images, 3 classes, non-overlapping boxes (YOLO-normalized labels)."""
    rng = np.random.default_rng(0)
    shapes0 = [(200, 300), (240, 320), (100, 100), (300, 200)]
    labels = []
    for h0, w0 in shapes0:
        rows = []
        for k in range(4):  # boxes on a diagonal, never overlapping
            cx, cy = (k + 0.5) / 4, (k + 0.5) / 4
            rows.append([k % 3, cx, cy, rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2)])
        labels.append(np.array(rows, np.float32))
    return SimpleNamespace(im_files=[f"/data/imgs/im{i}.jpg" for i in range(4)],
                           image_ids=[10, 11, 12, 13], shapes0=shapes0, labels=labels,
                           names=["a", "b", "c"])


def gt_dets(ds, i, shift=0.0, score=1.0):
    """Ground-truth boxes of image i as (n, 6) detections, shifted right by shift*width."""
    (h0, w0), lab = ds.shapes0[i], ds.labels[i].astype(np.float64)
    w, h = lab[:, 3] * w0, lab[:, 4] * h0
    x1, y1 = lab[:, 1] * w0 - w / 2 + shift * w, lab[:, 2] * h0 - h / 2
    return np.stack([x1, y1, x1 + w, y1 + h, np.full_like(w, score), lab[:, 0]], 1)


def test_gt_from_dataset():
    ds = synthetic_ds()
    d = coco_gt_from_dataset(ds)
    assert [im["id"] for im in d["images"]] == [10, 11, 12, 13]
    assert d["images"][1] == {"id": 11, "file_name": "im1.jpg", "height": 240, "width": 320}
    assert [c["id"] for c in d["categories"]] == [1, 2, 3]  # default: cls + 1
    a = d["annotations"][0]
    (h0, w0), lab = ds.shapes0[0], ds.labels[0][0]
    assert a["category_id"] == int(lab[0]) + 1 and a["id"] == 1 and a["iscrowd"] == 0
    assert a["bbox"] == pytest.approx([(lab[1] - lab[3] / 2) * w0, (lab[2] - lab[4] / 2) * h0,
                                       lab[3] * w0, lab[4] * h0])
    assert coco_gt_from_dataset(ds, class_map=[7, 8, 9])["categories"][0]["id"] == 7
    with pytest.raises(AttributeError, match="shapes0"):
        coco_gt_from_dataset(SimpleNamespace(im_files=[], image_ids=[], labels=[], names=[]))


def test_perfect_predictions_give_map_1():
    ds = synthetic_ds()
    ev = COCOEvaluator(ds)
    for i, f in enumerate(ds.im_files):
        ev.add(f, gt_dets(ds, i))  # full path from the dataset
    res = ev.summarize()
    assert res["map50_95"] == 1.0 and res["map50"] == 1.0 and res["map75"] == 1.0
    assert res["stats"] == [res[k] for k in STAT_NAMES] and len(res["stats"]) == 12
    assert res["num_images"] == 4 and res["num_detections"] == 16
    assert [r["name"] for r in res["per_class"]] == ["a", "b", "c"]
    assert all(r["ap50_95"] == 1.0 for r in res["per_class"])
    pr = res["pr_curve"]
    assert pr["precision"].shape == (3, 101) and np.all(pr["precision"] == 1.0)
    assert pr["recall"][0] == 0 and pr["recall"][-1] == 1


def test_shifted_boxes_follow_iou_thresholds():
    # shifting a box by d of its width gives IoU (1-d)/(1+d); d = 0.28/1.72 -> IoU 0.72:
    # a match at IoU thresholds .50,.55,.60,.65,.70 (5 of 10), none at .75+
    ds = synthetic_ds()
    ev = COCOEvaluator(ds)
    d = 0.28 / 1.72
    for i in range(4):
        ev.add(ds.image_ids[i], gt_dets(ds, i, shift=d))
    res = ev.summarize()
    assert res["map50"] == pytest.approx(1.0)
    assert res["map75"] == pytest.approx(0.0)
    assert res["map50_95"] == pytest.approx(0.5)
    # one image predicted, three seen with no detections: recall at most 1/4 of the boxes
    ev.reset()
    ev.add(10, gt_dets(ds, 0))
    for i in (11, 12, 13):
        ev.add(i, np.zeros((0, 6)))
    res = ev.summarize()
    assert res["num_images"] == 4 and res["mar_100"] == pytest.approx(0.25, abs=0.1)
    assert res["map50"] < 0.5


def test_no_predictions_no_crash(tmp_path):
    ds = synthetic_ds()
    ev = COCOEvaluator(ds)
    res = ev.summarize()
    assert res["map50_95"] == 0.0 and res["stats"] == [0.0] * 12
    for i in ds.image_ids:
        ev.add(i, np.zeros((0, 6)))
    res = ev.summarize()
    assert res["map50"] == 0.0 and res["num_images"] == 4 and res["pr_curve"] is None
    assert json.loads(ev.save_json(tmp_path / "r.json").read_text()) == []


def test_bad_inputs_name_the_problem():
    ds = synthetic_ds()
    ev = COCOEvaluator(ds)
    with pytest.raises(KeyError, match="nope.jpg"):
        ev.add("/x/nope.jpg", np.zeros((0, 6)))
    with pytest.raises(ValueError, match="class index 5"):
        ev.add(10, np.array([[0, 0, 1, 1, 0.5, 5]]))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        COCOEvaluator("/no/such/missing.json")


def test_silent_unless_verbose():
    ds = synthetic_ds()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev = COCOEvaluator(ds)
        ev.add(10, gt_dets(ds, 0))
        ev.summarize()
    assert out.getvalue() == ""
    assert "Average Precision" in ev.last_table


@needs_coco128
def test_matches_direct_pycocotools_on_coco128(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = json.loads(COCO_JSON.read_text())
    ev = COCOEvaluator(COCO_JSON)
    assert ev.class_map == load_class_map(COCO128 / "coco80_to_91.txt")  # 80 -> 91 by default
    cat_to_cls = {c: i for i, c in enumerate(ev.class_map)}
    rng = np.random.default_rng(0)
    results, per_image = [], {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        if a["iscrowd"]:
            continue
        for _ in range(2):  # two jittered copies per box (one usually a duplicate -> FP)
            x, y, w, h = (np.array(a["bbox"]) + rng.normal(0, 0.08, 4) * np.r_[a["bbox"][2:],
                                                                                a["bbox"][2:]])
            x, y, w, h = (round(float(v), 3) for v in (x, y, max(w, 1), max(h, 1)))
            s = round(float(rng.uniform(0.05, 1)), 5)
            results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                            "bbox": [x, y, w, h], "score": s})
            per_image[a["image_id"]].append([x, y, x + w, y + h, s, cat_to_cls[a["category_id"]]])
    for img_id, rows in per_image.items():
        ev.add(img_id, np.array(rows, np.float64).reshape(-1, 6))
    res = ev.summarize()

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(COCO_JSON))
        direct = COCOeval(gt, gt.loadRes(results), "bbox")
        direct.params.imgIds = sorted(per_image)
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    assert res["backend"] == "pycocotools"
    assert np.allclose(res["stats"], direct.stats, atol=1e-12)
    assert 0.2 < res["map50_95"] < 0.9  # jitter really costs something
    # saved JSON reproduces the same predictions
    saved = json.loads(ev.save_json(tmp_path / "pred.json").read_text())
    key = lambda r: (r["image_id"], r["score"], r["category_id"])  # noqa: E731
    for a, b in zip(sorted(saved, key=key), sorted(results, key=key)):
        assert a["category_id"] == b["category_id"] and a["image_id"] == b["image_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1.5e-3)
    # PR curves: one row per category, arrays saved for plotting
    pr = res["pr_curve"]
    assert pr["precision"].shape == (80, 101)
    valid = ~np.isnan(pr["precision"]).all(1)
    assert valid.sum() == len({a["category_id"] for a in data["annotations"]
                               if not a["iscrowd"]})
    npz = np.load(ev.save_pr_curves(tmp_path / "pr.npz"))
    assert npz["precision"].shape == (80, 101)
    png = plot_pr_curves(res, tmp_path / "pr.png")
    assert png.stat().st_size > 1000


@needs_coco128
def test_yolo_labels_gt_matches_json_on_coco128():
    """GT built from COCO128's YOLO labels scores the same perfect predictions as its JSON."""
    data = json.loads(COCO_JSON.read_text())
    sizes = {im["file_name"]: (im["height"], im["width"], im["id"]) for im in data["images"]}
    names = (COCO128 / "classes.txt").read_text().split("\n")[:80]
    files, ids, shapes, labels = [], [], [], []
    for f in sorted(sizes):
        h, w, i = sizes[f]
        lab = COCO128 / "labels" / "train2017" / f.replace(".jpg", ".txt")
        arr = np.loadtxt(lab, ndmin=2) if lab.is_file() else np.zeros((0, 5))
        files.append(str(COCO128 / "images" / "train2017" / f))
        ids.append(i)
        shapes.append((h, w))
        labels.append(arr.reshape(-1, 5))
    ds = SimpleNamespace(im_files=files, image_ids=ids, shapes0=shapes, labels=labels,
                         names=names, coco_ids=load_class_map(COCO128 / "coco80_to_91.txt"))
    ev_yolo, ev_json = COCOEvaluator(ds), COCOEvaluator(COCO_JSON)
    assert ev_yolo.class_map == ev_json.class_map
    rng = np.random.default_rng(1)
    for k in range(len(files)):
        det = gt_dets(ds, k, shift=0.0, score=1.0)
        det[:, 4] = rng.uniform(0.1, 1, len(det))
        det[:, :4] += rng.normal(0, 2, (len(det), 4))
        ev_yolo.add(files[k], det)
        ev_json.add(files[k], det)
    a, b = ev_yolo.summarize(), ev_json.summarize()
    assert a["num_images"] == b["num_images"] == 128
    assert a["map50"] == pytest.approx(b["map50"], abs=0.01)
    assert a["map50_95"] == pytest.approx(b["map50_95"], abs=0.01)


def test_load_class_map(tmp_path):
    p = tmp_path / "map.txt"
    p.write_text("0 1\n1 2\n2 5  # comment\n")
    assert load_class_map(p) == [1, 2, 5]
    assert load_class_map({"1": 4, "0": 3}) == [3, 4]
    (tmp_path / "m.json").write_text("[3, 9]")
    assert load_class_map(tmp_path / "m.json") == [3, 9]
    p.write_text("0 1 2\n")
    with pytest.raises(ValueError, match="map.txt:1"):
        load_class_map(p)


def test_summarize_image_subset_equals_evaluating_those_images_alone():
    ds = synthetic_ds()
    shifts = {10: 0.0, 11: 0.1, 12: 0.3, 13: 0.05}
    ev = COCOEvaluator(ds)
    for i, s in shifts.items():
        ev.add(i, gt_dets(ds, ds.image_ids.index(i), shift=s))
    assert ev.evaluated_ids == [10, 11, 12, 13]
    whole = ev.summarize()["map50_95"]
    for subset in ([10, 12], [11, 13], [12]):
        alone = COCOEvaluator(ds)
        for i in subset:
            alone.add(i, gt_dets(ds, ds.image_ids.index(i), shift=shifts[i]))
        ref = alone.summarize()
        got = ev.summarize(image_ids=subset)
        assert got["map50_95"] == pytest.approx(ref["map50_95"]) and got["num_images"] == len(subset)
        assert [r["num_gt"] for r in got["per_class"]] == [r["num_gt"] for r in ref["per_class"]]
    # the two halves differ (image 12 is shifted most) and bracket the whole set
    a, b = ev.summarize(image_ids=[10, 12])["map50_95"], ev.summarize(image_ids=[11, 13])["map50_95"]
    assert a < b and a < whole < b
    with pytest.raises(KeyError, match="99"):
        ev.summarize(image_ids=[10, 99])
