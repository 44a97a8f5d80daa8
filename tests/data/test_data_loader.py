"""Loader: batch contract, seeded determinism with workers, DDP sampling, datasets from config."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolo_q.config import load_config
from yolo_q.data import (DataNotFoundError, DetectionDataset, build_dataloader,
                         build_datasets_from_config, collate_fn, set_epoch)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("YOLOQ_DATA_ROOT", raising=False)


@pytest.fixture
def toy(tmp_path):
    rng = np.random.default_rng(0)
    img_dir, lab_dir = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i in range(10):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        cv2.imwrite(str(img_dir / f"{i:02d}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        n = i % 3  # 0, 1 or 2 boxes
        (lab_dir / f"{i:02d}.txt").write_text(
            "".join(f"{j} {0.3 + 0.2 * j} 0.5 0.3 0.4\n" for j in range(n)))
    return img_dir


def test_collate_contract(toy):
    ds = DetectionDataset(toy, 64, nc=2, verbose=False)
    batch = [ds[i] for i in range(4)]
    imgs, targets, paths, shapes = collate_fn(batch)
    assert imgs.shape == (4, 3, 64, 64) and imgs.dtype == torch.uint8
    assert targets.shape == (0 + 1 + 2 + 0, 6) and targets.dtype == torch.float32
    assert targets[:, 0].tolist() == [1.0, 2.0, 2.0]
    torch.testing.assert_close(targets[1:, 1:], batch[2][1])
    assert paths == ds.im_files[:4] and shapes[3] == batch[3][3]
    (h0, w0), ((rh, rw), (pw, ph)) = shapes[0]
    assert (h0, w0) == tuple(ds.shapes0[0]) and max(h0 * rh, w0 * rw) == pytest.approx(64)


def _epochs(loader, n=2):
    out = []
    for e in range(n):
        set_epoch(loader, e, 10)
        out.append([b for b in loader])
    return out


def test_same_seed_same_batches_with_workers(toy):
    def run(workers, seed):
        ds = DetectionDataset(toy, 64, augment=True, nc=2, seed=seed, verbose=False)
        return _epochs(build_dataloader(ds, 4, True, workers, seed=seed))

    a, b, c = run(2, 0), run(2, 0), run(0, 0)
    for x, y in ((a, b), (a, c)):  # same seed: identical, whatever the worker count
        for ex, ey in zip(x, y):
            for bx, by in zip(ex, ey):
                assert torch.equal(bx[0], by[0]) and torch.equal(bx[1], by[1]) and bx[2] == by[2]
    assert [b[2] for b in a[0]] != [b[2] for b in a[1]]  # reshuffled per epoch
    assert not torch.equal(a[0][0][0], a[1][0][0])  # new augmentation per epoch
    d = run(0, 1)
    assert [b[2] for b in d[0]] != [b[2] for b in a[0]]


def test_distributed_sampler_partitions_the_dataset(toy):
    ds = DetectionDataset(toy, 64, nc=2, verbose=False)
    seen = []
    for rank in range(2):
        loader = build_dataloader(ds, 2, True, 0, seed=3, rank=rank, world_size=2)
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        set_epoch(loader, 1)
        assert loader.sampler.epoch == 1
        seen.append([p for b in loader for p in b[2]])
    assert len(seen[0]) == len(seen[1]) == 5 and sorted(seen[0] + seen[1]) == ds.im_files


def test_drop_last_and_sequential_order(toy):
    ds = DetectionDataset(toy, 64, nc=2, verbose=False)
    loader = build_dataloader(ds, 4, False, 0, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2 and [p for b in batches for p in b[2]] == ds.im_files[:8]


def test_build_datasets_from_config_coco128():
    cfg = load_config(None, ["data.img_size=96"])
    try:
        train, val, info = build_datasets_from_config(cfg)
    except DataNotFoundError as e:
        pytest.skip(f"COCO128 not available: {e}")
    assert len(train) == len(val) == 128 and train.augment and not val.augment
    assert info["nc"] == 80 and info["coco_ids"][79] == 90 and info["val_json"].endswith(".json")
    assert val.image_ids[0] == 9 and val[0][0].shape == (3, 96, 96)
    assert train.hyp["mosaic"] == cfg.data.augment.mosaic
    t2, v2, _ = build_datasets_from_config(cfg, splits=("val",))
    assert t2 is None and len(v2) == 128
    bad = load_config(None, ["data.root=/no/such/coco128"])
    with pytest.raises(DataNotFoundError, match="/no/such/coco128"):
        build_datasets_from_config(bad)
