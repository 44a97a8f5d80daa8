"""Shared helpers for the quantization tests: a tiny fused YOLOv6-N with random but
well-scaled weights, image batches, and per-process caches of calibrated / exported models."""
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
from yolo_q.config import load_config
from yolo_q.models import build_model

REPO = Path(__file__).resolve().parents[2]
IMG = 64
_TMP = Path(tempfile.mkdtemp(prefix="yolo_q_quant_tests_"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def tiny_cfg(*overrides):
    return load_config(str(REPO / "configs" / "yolov6n.yaml"),
                       ["model.width_multiple=0.125", "model.nc=3", *overrides])


def images(n: int = 2, size: int = IMG, seed: int = 0) -> torch.Tensor:
    """uint8 images (B, 3, H, W): smooth random patterns plus noise, like the loader's batches."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                        align_corners=False)
    x = (x + 0.15 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def _normalize_(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Scale every conv so its output has unit std (random RepVGG weights explode otherwise)."""
    normalize_activations_(model, x)


@functools.lru_cache(maxsize=None)
def _tiny_fused(seed: int, use_dfl: bool):
    extra = ["model.head.use_dfl=true"] if use_dfl else []
    model = randomize_(build_model(tiny_cfg(*extra)), seed).fuse().eval()
    _normalize_(model, images(2, IMG, seed + 100).float() / 255)
    return model


def tiny_fused(seed: int = 0, use_dfl: bool = False) -> torch.nn.Module:
    """A fresh copy of the tiny fused float model (width 1/8, nc=3)."""
    return copy.deepcopy(_tiny_fused(seed, use_dfl))


def calib_batches(n: int = 3, size: int = IMG, seed: int = 10):
    return [images(2, size, seed + i) for i in range(n)]


@functools.lru_cache(maxsize=None)
def _calibrated(flavour: str, hp: bool, skip: tuple, method: str):
    from yolo_q.quant import calibrate, convert

    q = convert(tiny_fused(), flavour=flavour, high_precision_outputs=hp, skip_layers=list(skip))
    calibrate(q, calib_batches(), method=method, progress=False)
    return q


def calibrated(flavour: str = "tensorrt", hp: bool = True, skip: tuple = (),
               method: str = "percentile"):
    """A converted + calibrated copy of the tiny model (cached per process)."""
    return copy.deepcopy(_calibrated(flavour, hp, tuple(skip), method))


@functools.lru_cache(maxsize=None)
def exported(flavour: str, hp: bool = True, skip: tuple = (), raw: bool = False) -> Path:
    """Path of a QDQ export of :func:`calibrated` (cached per process; do not modify)."""
    from yolo_q.export.qdq import export_qdq

    name = f"{flavour}_{int(hp)}_{len(skip)}_{int(raw)}.onnx"
    return export_qdq(_calibrated(flavour, hp, tuple(skip), "percentile"), _TMP / name,
                      img_size=IMG, batch=2, raw_outputs=raw)


DEAD_LAYER = "neck.Rep_p4.block.0.rbr_reparam"


def dead_channel_model(name: str = DEAD_LAYER, per_channel: bool = True, dead: int = 1):
    """The tiny model with output channels ``0..dead-1`` of ``name`` dead (weights 1e-4 of their
    size) and channel 0 with a large bias (100), converted (onnxruntime flavour) and
    max-calibrated: without the int32 bias floor of the weight scales, that channel's bias code
    round(b / (s_x s_w)) is far beyond the int32 range."""
    from yolo_q.quant import calibrate, convert

    model = tiny_fused()
    conv = model.get_submodule(name)
    with torch.no_grad():
        for c in range(dead):  # amax 1e-4: the calibration floor
            conv.weight[c] *= 1e-4 / conv.weight[c].abs().max()
        conv.bias[0] = 100.0
    q = convert(model, flavour="onnxruntime", high_precision_outputs=False,
                per_channel_weights=per_channel)
    calibrate(q, calib_batches(), method="max", progress=False)
    return q


def unfloored_(q, name: str = DEAD_LAYER):
    """Set the weight amax of ``name`` back to max |w| per channel (calibration before the int32
    bias floor existed; what an old checkpoint holds). Returns ``q``."""
    layer = q.get_submodule(name)
    layer._weight_quantizer.amax = layer.weight.detach().abs().amax(dim=(1, 2, 3))
    return q
