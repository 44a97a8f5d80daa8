"""``export_model``: one call behind ``tools/export.py``.

* float checkpoint, ``flavour=float`` -> float ONNX of the fused (deploy-form) model;
* quantized checkpoint (PTQ/QAT: has a ``quant`` entry) -> QDQ ONNX of the flavour it was
  converted for (``tensorrt`` | ``onnxruntime``; asking for the other flavour is an error, since
  the flavour changes the fake-quant model). Layers kept float (``quant.skip_layers``, the DFL
  conv) have no Q/DQ. ``flavour=float`` exports the same weights without quantization;
* float checkpoint with a QDQ flavour: an error pointing at ``tools/ptq.py`` unless
  ``calib_images`` is given, in which case a quick PTQ runs first (convert with ``cfg.quant``,
  max calibration on those images by default; no sensitivity analysis, no partial quantization
  beyond ``quant.skip_layers``). Use ``tools/ptq.py`` for a real PTQ.

``flavour=None`` follows the checkpoint: its quant flavour, else float.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from ..data import DataError, check_model_nc, load_data_yaml
from ..data.images import config_class_names, image_batches
from ..data.loader import resolve_data_yaml
from ..io import check_output_file, flush_denormal
from ..quant import is_quantized, load_model, quant_state, set_quant_enabled
from ..quant.ptq import quantize_model
from .fp16 import write_fp16
from .onnx import export_onnx, onnx_info
from .qdq import export_qdq

__all__ = ["EXPORT_FLAVOURS", "ExportError", "default_output",
           "quick_ptq", "export_model"]

EXPORT_FLAVOURS = ("float", "tensorrt", "onnxruntime")


class ExportError(ValueError):
    """The requested export is not possible as asked; the message says what to do."""


def default_output(weights, flavour: str, img_size: int, fp16: bool = False) -> Path:
    """``<weights dir>/<stem>[_int8_<flavour>]_<imgsz>[_fp16].onnx``."""
    w = Path(weights)
    tag = "" if flavour == "float" else f"_int8_{flavour}"
    return w.with_name(f"{w.stem}{tag}_{img_size}{'_fp16' if fp16 else ''}.onnx")


def quick_ptq(model_fused: torch.nn.Module, cfg, flavour: str, batches: Iterable,
              method: str = "max", num_batches: Optional[int] = None,
              progress: bool = False) -> torch.nn.Module:
    """Convert a FUSED float model for ``flavour`` (other options from ``cfg.quant``) and
    calibrate it on ``batches`` (uint8 or float image tensors). Returns the fake-quant model."""
    with torch.no_grad(), flush_denormal():
        return quantize_model(model_fused, cfg, batches, method=method, progress=progress,
                              flavour=flavour, strict=False, num_batches=num_batches)


def _names(cfg) -> Optional[list]:
    try:
        names = config_class_names(cfg)
        return None if not names or names[0] == "class0" else names
    except Exception:  # noqa: BLE001  (names are optional metadata)
        return None


def _check_nc_with_data(model, cfg, src: str) -> None:
    """The model's classes vs the config's data YAML (whose names go into the ONNX metadata);
    export needs no data, so a data YAML that cannot be read is not checked."""
    try:
        info = load_data_yaml(resolve_data_yaml(cfg.data.dataset), check=False)
    except (DataError, OSError):
        return
    check_model_nc(model, info["nc"], src, info["yaml_file"])


def export_model(cfg, weights, flavour: Optional[str] = None, out=None,
                 img_size: Optional[int] = None, batch: int = 1, dynamic: Optional[bool] = None,
                 opset: Optional[int] = None, simplify: Optional[bool] = None,
                 end2end: Optional[bool] = None, nms: Optional[str] = None,
                 calib_images=None, calib_num: int = 64, calib_method: str = "max",
                 calib_batch: int = 8, fp16: bool = False) -> Dict[str, Any]:
    """Export ``weights`` (checkpoint path, or a model) to ONNX; see the module docstring.
    ``None`` arguments come from ``cfg.export`` / ``cfg.data.img_size`` (``simplify``: QDQ graphs
    only when asked explicitly). ``nms``: end-to-end
    NMS kind: ``onnx`` (ONNX NonMaxSuppression; runs in ONNX Runtime and TensorRT, default) or
    ``efficient_nms`` (the deprecated EfficientNMS_TRT plugin, TensorRT only). ``fp16``: write
    FP16 for every tensor that is not INT8 (:func:`yolo_q.export.fp16.convert_fp16`), for a
    strongly typed TensorRT build.
    Returns ``{"path", "flavour", "quantized", "calibrated_here", "info"}`` (``info``:
    :func:`yolo_q.export.onnx_info`)."""

    e = cfg.export
    if out:  # before anything is loaded or calibrated
        check_output_file(out, [] if isinstance(weights, torch.nn.Module) else [weights],
                          what="ONNX output")
    model, has_quant, src = _export_source(cfg, weights)
    model_flavour = quant_state(model)["flavour"] if has_quant else None
    flavour = flavour or model_flavour or "float"
    if flavour not in EXPORT_FLAVOURS:
        raise ExportError(f"--flavour must be one of {', '.join(EXPORT_FLAVOURS)}, got {flavour!r}")
    img_size = int(img_size or cfg.data.img_size)
    out = Path(out) if out else default_output(src if src != "model" else "model.pt", flavour,
                                               img_size, fp16)
    check_output_file(out, [src] if src != "model" else [], what="ONNX output")  # default
    common = dict(img_size=img_size, batch=batch,
                  opset=int(e.opset if opset is None else opset),
                  dynamic_batch=bool(e.dynamic_batch if dynamic is None else dynamic),
                  metadata=_export_metadata(cfg, src, flavour),
                  end2end=bool(e.end2end if end2end is None else end2end), nms=nms or "onnx",
                  conf_thres=float(e.conf_thres), iou_thres=float(e.iou_thres),
                  max_det=int(e.max_det))
    calibrated_here = False
    if flavour == "float":
        _export_float(model, has_quant, out, bool(e.simplify if simplify is None else simplify),
                      common)
    else:
        if has_quant and model_flavour != flavour:
            raise ExportError(f"{src} was quantized for the '{model_flavour}' flavour; export "
                              f"it with --flavour {model_flavour} (or --flavour float), or "
                              f"re-run tools/ptq.py with quant.flavour={flavour}")
        if not has_quant:
            model = _quick_calibrated(model, cfg, src, flavour, img_size, calib_images,
                                      calib_num, calib_method, calib_batch, common["metadata"])
            calibrated_here = True
        # QDQ graphs are simplified only on request (a simplifier may fold weight Q/DQ pairs)
        export_qdq(model, out, flavour=flavour, simplify=bool(simplify),
                   ort_weights=str(e.ort_weights), act_storage=str(e.act_storage), **common)
    if fp16:
        _rewrite_fp16(out)
    return {"path": str(out), "flavour": flavour, "quantized": flavour != "float",
            "calibrated_here": calibrated_here, "fp16": fp16, "info": onnx_info(out)}


def _export_source(cfg, weights):
    """``(model, has_quant, source name)`` of a checkpoint path or a model, nc checked."""
    if isinstance(weights, torch.nn.Module):
        model, src = weights.eval(), "model"
    else:
        model, src = load_model(weights, cfg, stored_config_first=True), str(weights)
    _check_nc_with_data(model, cfg, src)
    return model, is_quantized(model), src


def _export_metadata(cfg, src: str, flavour: str) -> Dict[str, str]:
    meta = {"source": Path(src).name, "flavour": flavour}
    names = _names(cfg)
    if names:
        meta["names"] = json.dumps(names)
    return meta


def _export_float(model, has_quant: bool, out: Path, simplify: bool, common) -> None:
    """A float graph: a float model (fused here if needed), or a quantized one with its
    quantizers off (the same QAT/PTQ weights)."""
    if has_quant:
        model = copy.deepcopy(model)
        set_quant_enabled(model, False)
        fuse = False
    else:
        fuse = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    export_onnx(model, out, simplify=simplify, fuse=fuse, **common)


def _quick_calibrated(model, cfg, src: str, flavour: str, img_size: int, calib_images,
                      calib_num: int, calib_method: str, calib_batch: int, meta) -> torch.nn.Module:
    """A float model quick-PTQ'd on ``calib_images`` (``--calib-images``) for ``flavour``."""
    if calib_images is None:
        raise ExportError(f"{src} is a float checkpoint: --flavour {flavour} needs a "
                          f"quantized one (run tools/ptq.py first), or pass "
                          f"--calib-images DIR for a quick max-calibration PTQ")
    fused = copy.deepcopy(model)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()):
        fused.fuse()
    batches = image_batches(calib_images, img_size, calib_batch, limit=calib_num)
    meta["calibration"] = f"{calib_method} on {Path(str(calib_images)).name}"
    return quick_ptq(fused, cfg, flavour, batches, method=calib_method)


def _rewrite_fp16(out: Path) -> None:
    """``out`` rewritten in place to FP16 (:func:`yolo_q.export.fp16.write_fp16`)."""
    tmp = out.with_name(out.stem + ".fp32.tmp.onnx")
    os.replace(out, tmp)
    try:
        write_fp16(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
