"""A dataset with 10% corrupt images and 10% corrupt label files (plus an image that vanishes
after the scan) trains to the end; every skip is counted in the log and the run summary."""
import logging
import random

import pytest
import torch

from reliability_utils import tiny_cfg, tiny_dataset
from yolo_q.cli import is_expected, one_line
from yolo_q.data.dataset import BrokenDatasetError
from yolo_q.engine import Hook
from yolo_q.io import load_checkpoint
from yolo_q.training import train


class DeleteImage(Hook):
    """Removes an image after the dataset scan: it fails to decode mid-epoch."""

    def __init__(self, path):
        self.path = path

    def before_train(self):
        self.path.unlink()


def test_training_survives_corrupt_images_and_labels(tmp_path, caplog):
    yaml_path = tiny_dataset(tmp_path / "data", n_train=20, n_val=4)
    images = sorted((tmp_path / "data" / "images" / "train").glob("*.jpg"))
    labels = tmp_path / "data" / "labels" / "train"
    rng = random.Random(0)
    # 2 of 20 images: truncated JPEG, random bytes
    data = images[3].read_bytes()
    images[3].write_bytes(data[: len(data) // 2])
    images[11].write_bytes(bytes(rng.randrange(256) for _ in range(700)))
    # 2 of 20 label files: binary garbage; wrong columns, non-numbers, NaN, class out of range
    (labels / images[5].with_suffix(".txt").name).write_bytes(b"\x00\xff\xfe garbage\n\x89PNG")
    (labels / images[7].with_suffix(".txt").name).write_text(
        "0 0.5 0.5 0.2\nx 0.5 0.5 0.2 0.2\n0 0.5 nan 0.2 0.2\n99 0.5 0.5 0.2 0.2\n")
    gone = images[16]

    caplog.set_level(logging.INFO)
    cfg = tiny_cfg(yaml_path, tmp_path / "runs", epochs=1)
    s = train(cfg, extra_hooks=[DeleteImage(gone)])

    assert s["epochs"] == 1 and load_checkpoint(s["last"])["epoch"] == 0  # trained to the end
    bad = s["bad_data"]
    assert sorted(bad["corrupt_images"]) == sorted(str(images[i]) for i in (3, 11))
    assert bad["images"] == 18 and bad["images_found"] == 20
    assert sorted(bad["label_issues"]) == sorted(str(labels / images[i].with_suffix(".txt").name)
                                                 for i in (5, 7))
    assert bad["boxes_dropped"] == {"bad_class": 1, "bad_columns": 3, "non_numeric": 2}
    assert bad["runtime_failures"] == [str(gone)] and bad["substitutions"] >= 1

    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "train: bad data: 2 corrupt images skipped, 6 labels dropped" in log
    assert f"cannot read {gone}, substituting another sample" in log
    assert "epoch 1/1 done" in log


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise BrokenDatasetError("train: 16 unreadable images in a row from data/x; broken")


def test_broken_dataset_is_one_line_even_from_a_dataloader_worker():
    """The error re-raised by a DataLoader worker carries the worker's traceback as its
    message: the tools still print the one line (and exit 2, not 'internal error')."""
    with pytest.raises(BrokenDatasetError) as info:
        next(iter(torch.utils.data.DataLoader(_Broken(), num_workers=1)))
    assert "Original Traceback" in str(info.value)
    assert is_expected(info.value)
    assert one_line(info.value) == "train: 16 unreadable images in a row from data/x; broken"


def test_every_image_gone_after_the_scan_stops_with_broken_dataset(tmp_path):
    yaml_path = tiny_dataset(tmp_path / "data", n_train=20, n_val=4)
    cfg = tiny_cfg(yaml_path, tmp_path / "runs", epochs=1)
    images = sorted((tmp_path / "data" / "images" / "train").glob("*.jpg"))

    class DeleteAll(Hook):
        def before_train(self):
            for p in images:
                p.unlink()

    with pytest.raises(BrokenDatasetError, match="unreadable images in a row from"):
        train(cfg, extra_hooks=[DeleteAll()])
