"""DetectionDataset: letterbox geometry, augmentation validity, bad data, cache, close-mosaic."""
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolo_q.data import (DataNotFoundError, DetectionDataset, letterbox, load_data_yaml,
                         unletterbox_boxes)
from yolo_q.data import transforms as T

REPO = Path(__file__).resolve().parents[2]
NO_AUG = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0,
              flipud=0.0, fliplr=0.0, mosaic=0.0, mixup=0.0)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("YOLOQ_DATA_ROOT", raising=False)


def _coco128():
    info = load_data_yaml(REPO / "datasets" / "coco128.yaml", check=False)
    if not Path(info["path"]).is_dir():
        pytest.skip(f"COCO128 not available at {info['path']}")
    return info


def make_rect_dataset(root: Path, n: int = 6, h: int = 48, w: int = 64, seed: int = 0):
    """Grey images with white rectangles; YOLO labels are the exact rectangles."""
    rng = np.random.default_rng(seed)
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((h, w, 3), 114, np.uint8)
        lines = []
        for _ in range(2):
            bw, bh = rng.integers(10, 20), rng.integers(10, 20)
            x1, y1 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            img[y1:y1 + bh, x1:x1 + bw] = 255
            c = int(rng.integers(3))
            lines.append(f"{c} {(x1 + bw / 2) / w:.6f} {(y1 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        cv2.imwrite(str(root / "images" / "train" / f"{i:03d}.png"), img)
        (root / "labels" / "train" / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root / "images" / "train"


def boxes_mask(shape, labels, margin=1):
    """Boolean mask of the union of the boxes, grown by ``margin`` pixels."""
    inside = np.zeros(shape, bool)
    for _, x1, y1, x2, y2 in labels:
        inside[max(0, int(y1) - margin):int(np.ceil(y2)) + margin,
               max(0, int(x1) - margin):int(np.ceil(x2)) + margin] = True
    return inside


def test_letterbox_hand_computed():
    img = np.zeros((50, 100, 3), np.uint8)
    out, ratio, pad = letterbox(img, 64)
    assert out.shape == (64, 64, 3) and ratio == (0.64, 0.64) and pad == (0.0, 16.0)
    assert (out[:16] == 114).all() and (out[48:] == 114).all() and (out[16:48] == 0).all()
    out, ratio, pad = letterbox(np.zeros((30, 20, 3), np.uint8), 64)  # upscaling, odd padding
    assert out.shape == (64, 64, 3) and ratio == (64 / 30, 43 / 20) and pad == (10.0, 0.0)


def test_letterbox_round_trip_to_original_pixels():
    info = _coco128()
    for size in (320, 640):  # down- and up-scaling (images are 416 px)
        ds = DetectionDataset(info["val"], size, nc=80, json_file=info["val_json"],
                              coco_ids=info["coco_ids"], verbose=False)
        for i in (0, 5, 77):
            img, labels, path, shape_info = ds[i]
            assert img.shape == (3, size, size) and img.dtype == torch.uint8
            (h0, w0), _ = shape_info
            assert (h0, w0) == tuple(ds.shapes0[i]) and path == ds.im_files[i]
            back = unletterbox_boxes(labels[:, 1:].numpy(), shape_info)
            lab = ds.labels[i]
            want = np.stack([(lab[:, 1] - lab[:, 3] / 2) * w0, (lab[:, 2] - lab[:, 4] / 2) * h0,
                             (lab[:, 1] + lab[:, 3] / 2) * w0, (lab[:, 2] + lab[:, 4] / 2) * h0], 1)
            np.testing.assert_allclose(back, want, atol=1e-3)
            np.testing.assert_array_equal(labels[:, 0].numpy(), lab[:, 0])


def test_letterboxed_pixels_match_boxes(tmp_path):
    src = make_rect_dataset(tmp_path, n=3, h=48, w=64)
    ds = DetectionDataset(src, 128, nc=3, verbose=False)
    for i in range(len(ds)):
        img, labels, _, _ = ds[i]
        white = img[0].numpy() > 200
        for _, x1, y1, x2, y2 in labels.numpy():  # upscaled x2: each box region is white inside
            inner = white[int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2]
            assert inner.size and inner.all()


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_augmentation_keeps_boxes_valid_and_on_the_objects(tmp_path, mixup):
    src = make_rect_dataset(tmp_path, n=8)
    hyp = dict(NO_AUG, translate=0.2, scale=0.5, mosaic=1.0, fliplr=0.5, flipud=0.5, mixup=mixup)
    ds = DetectionDataset(src, 64, augment=True, hyp=hyp, nc=3, verbose=False)
    total = covered = 0
    for epoch in range(3):
        ds.set_epoch(epoch, 100)
        for i in range(len(ds)):
            img, labels, _, _ = ds[i]
            assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
            lab = labels.numpy()
            assert lab.dtype == np.float32 and lab.shape[1] == 5
            assert (lab[:, 1:] >= 0).all() and (lab[:, [1, 3]] <= 64).all() and (lab[:, [2, 4]] <= 64).all()
            assert (lab[:, 3] - lab[:, 1] > 2).all() and (lab[:, 4] - lab[:, 2] > 2).all()
            assert set(np.unique(lab[:, 0])) <= {0.0, 1.0, 2.0}
            if mixup:
                continue
            white = img[0].numpy() > 200  # the white rectangles must lie inside the boxes
            inside = boxes_mask(white.shape, lab)
            total += white.sum()
            covered += (white & inside).sum()
    if not mixup:
        assert total > 1000 and covered / total > 0.97


def test_rotation_and_shear_boxes_enclose_objects(tmp_path):
    src = make_rect_dataset(tmp_path, n=4)
    hyp = dict(NO_AUG, degrees=20.0, shear=5.0, mosaic=1.0)
    ds = DetectionDataset(src, 64, augment=True, hyp=hyp, nc=3, verbose=False)
    for i in range(len(ds)):
        img, labels, _, _ = ds[i]
        white = img[0].numpy() > 230
        inside = boxes_mask(white.shape, labels.numpy())
        assert (white & ~inside).sum() <= 0.03 * max(1, white.sum())


def test_set_epoch_closes_mosaic_and_reaches_persistent_workers(tmp_path):
    from yolo_q.data import build_dataloader, set_epoch
    src = make_rect_dataset(tmp_path, n=4, h=64, w=64)
    plain = DetectionDataset(src, 64, augment=False, nc=3, verbose=False)
    ds = DetectionDataset(src, 64, augment=True, hyp=dict(NO_AUG, mosaic=1.0, close_mosaic_epochs=5),
                          nc=3, verbose=False)
    ds.set_epoch(0, 10)
    assert ds.mosaic_enabled and not torch.equal(ds[0][0], plain[0][0])
    ds.set_epoch(5, 10)  # last 5 of 10 epochs: mosaic off, no other augmentation -> letterbox
    assert not ds.mosaic_enabled and torch.equal(ds[0][0], plain[0][0])
    ds.set_epoch(0, 10)
    loader = build_dataloader(ds, 4, False, 2, seed=0, persistent_workers=True)
    first = next(iter(loader))[0]
    set_epoch(loader, 9, 10)
    closed = next(iter(loader))[0]
    want = torch.stack([plain[i][0] for i in range(4)])
    assert not torch.equal(first, want) and torch.equal(closed, want)


def test_close_mosaic_never_covers_a_whole_run(tmp_path):
    """close_mosaic_epochs=5: the last 5 epochs of a 10-epoch run are closed; a run of 5 or fewer
    epochs keeps mosaic on throughout (the old check closed every epoch of those runs)."""
    src = make_rect_dataset(tmp_path, n=4, h=64, w=64)
    ds = DetectionDataset(src, 64, augment=True, hyp=dict(NO_AUG, mosaic=1.0, close_mosaic_epochs=5),
                          nc=3, verbose=False)

    def closed(total):
        out = []
        for e in range(total):
            ds.set_epoch(e, total)
            out.append(not ds.mosaic_enabled)
        return out

    assert closed(10) == [False] * 5 + [True] * 5
    assert closed(6) == [False] + [True] * 5
    assert closed(5) == [False] * 5
    assert closed(3) == [False] * 3
    ds.set_epoch(2, None)  # no run length known: never closed
    assert ds.mosaic_enabled


def write_bad_dataset(root: Path):
    img_dir, lab_dir = root / "images" / "train", root / "labels" / "train"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    good = buf.tobytes()
    for name in ("good", "badlines", "badclass", "outside", "nolabel", "empty"):
        (img_dir / f"{name}.jpg").write_bytes(good)
    (img_dir / "corrupt.jpg").write_bytes(b"\x00not an image at all")
    (img_dir / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (lab_dir / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.25 0.25 0.1 0.1\n")
    (lab_dir / "corrupt.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (lab_dir / "truncated.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (lab_dir / "badlines.txt").write_text("0 0.5 0.5 0.2\n0 0.5 0.5 0.2 0.2 0.9\nabc 1 2 3 4\n"
                                          "1 0.5 0.5 0.3 0.3\n")
    (lab_dir / "badclass.txt").write_text("5 0.5 0.5 0.2 0.2\n-1 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n")
    (lab_dir / "outside.txt").write_text("0 0.99 0.5 0.1 0.1\n0 0.5 0.5 0.0 0.1\n0 2.5 0.5 0.1 0.1\n")
    (lab_dir / "empty.txt").write_text("")
    return img_dir


def test_bad_data_is_counted_reported_once_and_never_raises(tmp_path, caplog):
    src = write_bad_dataset(tmp_path)
    with caplog.at_level(logging.INFO, logger="yolo_q.data"):
        ds = DetectionDataset(src, 64, augment=True, hyp=dict(mosaic=1.0), nc=3, prefix="bad")
    r = ds.bad_report
    assert len(ds) == 6 and r["images_found"] == 8
    assert sorted(Path(p).name for p in r["corrupt_images"]) == ["corrupt.jpg", "truncated.jpg"]
    assert "truncated" in r["corrupt_images"][str(src / "truncated.jpg")]
    assert r["boxes_dropped"] == {"bad_class": 2, "bad_columns": 2, "degenerate": 1,
                                  "non_numeric": 1, "out_of_image": 1}
    assert r["boxes_clipped"] == 1 and r["no_labels"] == 2 and r["boxes"] == 5
    counts = dict(zip((Path(f).stem for f in ds.im_files), (len(l) for l in ds.labels)))
    assert counts == {"badclass": 1, "badlines": 1, "empty": 0, "good": 2, "nolabel": 0, "outside": 1}
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary naming the files
    msg = warnings[0].getMessage()
    for name in ("corrupt.jpg", "truncated.jpg", "badlines.txt", "badclass.txt", "outside.txt"):
        assert name in msg
    for i in range(len(ds)):
        for epoch in (0, 1):
            ds.set_epoch(epoch, 10)
            img, labels, _, _ = ds[i]
            assert img.shape == (3, 64, 64)


def test_corrupt_image_at_runtime_is_substituted_and_counted(tmp_path):
    from yolo_q.data import build_dataloader
    src = make_rect_dataset(tmp_path, n=6)
    ds = DetectionDataset(src, 64, augment=False, nc=3, verbose=False)
    ds2 = DetectionDataset(src, 64, augment=True, nc=3, verbose=False)
    victim = ds.im_files[2]
    Path(victim).write_bytes(b"garbage written after the scan")
    img, labels, path, _ = ds[2]
    assert path != victim and img.shape == (3, 64, 64)
    assert ds.bad_report["runtime_failures"] == [victim] and ds.bad_report["substitutions"] == 1
    # also from DataLoader workers: the counters are shared with the main process
    batches = list(build_dataloader(ds2, 3, True, 2, seed=1))
    assert sum(len(b[2]) for b in batches) == 6 and victim not in [p for b in batches for p in b[2]]
    assert ds2.bad_report["runtime_failures"] == [victim] and ds2.bad_report["substitutions"] >= 1


def test_missing_dataset_path_names_it(tmp_path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nope")):
        DetectionDataset(tmp_path / "nope", 64)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataNotFoundError, match="emptydir"):
        DetectionDataset(tmp_path / "emptydir", 64)


def test_txt_image_list_and_label_cache(tmp_path, monkeypatch):
    src = make_rect_dataset(tmp_path, n=4)
    lst = tmp_path / "list.txt"
    lst.write_text("images/train/000.png\n./images/train/002.png\n")
    ds = DetectionDataset(lst, 64, nc=3, verbose=False)
    assert [Path(f).name for f in ds.im_files] == ["000.png", "002.png"]
    a = DetectionDataset(src, 64, nc=3, verbose=False)
    cache = tmp_path / "labels" / "train.cache"
    assert cache.is_file()
    monkeypatch.setattr(DetectionDataset, "_scan", lambda *a, **k: pytest.fail("cache not used"))
    b = DetectionDataset(src, 64, nc=3, verbose=False)
    assert b.im_files == a.im_files and all(np.array_equal(x, y) for x, y in zip(a.labels, b.labels))
    monkeypatch.undo()
    lab = tmp_path / "labels" / "train" / "001.txt"
    lab.write_text("2 0.5 0.5 0.5 0.5\n")  # changed labels invalidate the cache
    os.utime(lab, ns=(1, 1))
    c = DetectionDataset(src, 64, nc=3, verbose=False)
    np.testing.assert_allclose(c.labels[1], [[2, 0.5, 0.5, 0.5, 0.5]])


def test_cache_on_read_only_folders_does_not_fail(tmp_path, monkeypatch):
    src = make_rect_dataset(tmp_path / "ro", n=3)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("YOLOQ_CACHE_DIR", str(blocker / "cache"))
    labels_dir = tmp_path / "ro" / "labels"
    os.chmod(labels_dir, 0o555)
    try:
        ds = DetectionDataset(src, 64, nc=3, verbose=False)
        assert len(ds) == 3 and not (labels_dir / "train.cache").exists()
    finally:
        os.chmod(labels_dir, 0o755)


def test_hflip_and_affine_transforms_hand_computed():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255
    lab = np.array([[1, 0, 2, 5, 8]], np.float32)
    out, l2 = T.flip_lr(img, lab)
    assert (out[:, 15:] == 255).all() and l2.tolist() == [[1, 15, 2, 20, 8]]
    out, l3 = T.flip_ud(img, lab)
    assert l3.tolist() == [[1, 0, 2, 5, 8]]
    # pure translation by the affine path: no scale, translate fixed to the centre
    rng = np.random.default_rng(0)
    out, l4 = T.random_affine(img, lab, (20, 40), rng, degrees=0, translate=0, scale=0, shear=0)
    assert out.shape == (20, 40, 3)
    np.testing.assert_allclose(l4, [[1, 10, 7, 15, 13]])  # input centre (10,5) -> (20,10)
    assert (out[5:15, 10:15] == 255).all() and (out[:, :10] == 114).all()
