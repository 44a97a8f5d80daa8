"""Shared assets for the PTQ tests (no tests here): tiny synthetic data whose validation labels
are a tiny float model's own detections ("pseudo GT": the float mAP is ~1, so quantization
moves it measurably), and that model saved as a float checkpoint with its config. Built once per
process."""
from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from conftest import randomize_
from yolo_q.benchmark import normalize_activations_

REPO = Path(__file__).resolve().parents[2]
IMG = 64
_TMP = Path(tempfile.mkdtemp(prefix="yolo_q_ptq_tests_"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def overrides(data_yaml, *extra):
    return ["model.width_multiple=0.125", "model.nc=8", f"data.dataset={data_yaml}",
            f"data.img_size={IMG}", "data.workers=0", "data.cache_labels=false",
            "eval.batch_size=4", "quant.calib_batches=2", "quant.calib_batch_size=4",
            "quant.sensitivity_images=8", "quant.sensitivity_proxy_images=4", *extra]


def cfg(*extra):
    from yolo_q.config import load_config
    return load_config(REPO / "configs" / "yolov6n.yaml", overrides(data_yaml(), *extra))


@functools.lru_cache(maxsize=None)
def _data_yaml() -> Path:
    from yolo_q.data.synthetic import generate
    path = generate(_TMP / "data", n_train=8, n_val=8, size=IMG, seed=3, workers=1,
                    min_objects=1, max_objects=2, max_distractors=0)
    text = path.read_text()  # GT from the (pseudo) label files, not the JSON
    path.write_text("\n".join(l for l in text.splitlines() if not l.startswith("val_json")) + "\n")
    return path


def data_yaml() -> Path:
    return _data_yaml()


def _normalize_(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Scale every conv so its output has unit std (random RepVGG weights explode otherwise)."""
    normalize_activations_(model, x, types=(torch.nn.Conv2d,))


@torch.no_grad()
def _pseudo_label_val(model: torch.nn.Module, per_image: int = 3) -> None:
    """Val labels := the float model's ``per_image`` best detections per image (YOLO txt)."""
    import cv2
    from yolo_q.eval.postprocess import postprocess

    root = data_yaml().parent
    for f in sorted((root / "images" / "val").iterdir()):
        img = cv2.imread(str(f))[:, :, ::-1].copy()  # RGB, IMG x IMG: no letterbox
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        det = postprocess(model(x), conf_thres=0.001, iou_thres=0.65, max_det=per_image,
                          multi_label=False)[0]
        lines = []
        for x1, y1, x2, y2, _s, c in det.tolist():
            x1, y1, x2, y2 = (min(max(v, 0.0), IMG) for v in (x1, y1, x2, y2))
            if x2 - x1 > 1 and y2 - y1 > 1:
                lines.append(f"{int(c)} {(x1 + x2) / 2 / IMG:.6f} {(y1 + y2) / 2 / IMG:.6f} "
                             f"{(x2 - x1) / IMG:.6f} {(y2 - y1) / IMG:.6f}")
        (root / "labels" / "val" / (f.stem + ".txt")).write_text("\n".join(lines) + "\n")


@functools.lru_cache(maxsize=None)
def _float_checkpoint() -> Path:
    from yolo_q.config import config_to_dict
    from yolo_q.io import save_checkpoint
    from yolo_q.models import build_model

    c = cfg()
    model = randomize_(build_model(c), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    _normalize_(model, torch.rand(2, 3, IMG, IMG, generator=g))
    with torch.no_grad():  # valid boxes (positive distances, ~1-3 strides) and real scores
        for conv in model.detect.reg_preds:
            conv.weight.mul_(0.2)
            conv.bias.add_(2.0)
        for conv in model.detect.cls_preds:
            conv.bias.add_(1.0)
    _pseudo_label_val(model)
    return save_checkpoint({"model": model.state_dict(), "config": config_to_dict(c)},
                           _TMP / "float.pt")


def float_checkpoint() -> Path:
    """A float (unfused) checkpoint ``{"model", "config"}`` of a random, well-scaled tiny model
    (width 1/8, nc 8, 64 px) whose detections are the val labels."""
    return _float_checkpoint()


@functools.lru_cache(maxsize=None)
def _setup():
    """(cfg, fused float model, calibration batches, val dataset, val batches)."""
    from yolo_q import load_model
    from yolo_q.data import build_dataloader, build_datasets_from_config
    from yolo_q.quant.ptq import cached_val_batches, calibration_batches

    c = cfg()
    fused = load_model(float_checkpoint(), cfg=c).fuse()
    batches = calibration_batches(c)
    _, val_ds, _ = build_datasets_from_config(c, splits=("val",), verbose=False)
    loader = build_dataloader(val_ds, 4, shuffle=False, workers=0)
    return c, fused, batches, val_ds, cached_val_batches(loader, 8)


def setup():
    """Fresh copies of (cfg, fused float model, calibration batches, val dataset, 8 val images
    as two cached batches)."""
    c, fused, batches, val_ds, val_batches = _setup()
    return copy.deepcopy(c), copy.deepcopy(fused), batches, val_ds, val_batches
