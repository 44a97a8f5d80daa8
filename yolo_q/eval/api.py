"""``run_eval``: one call behind ``tools/eval.py`` — any backend, shared data, post-processing
and COCO evaluation."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from .backends import build_backend
from .coco import COCOEvaluator
from .runner import evaluate
from ..config import check_img_size
from ..data import build_dataloader, build_datasets_from_config, check_model_nc
from ..io import check_output_dir, check_output_file, write_json

logger = logging.getLogger(__name__)


def val_loader_for(cfg, batch_size: int, img_size: Optional[int] = None, data: Optional[str] = None,
                   workers: Optional[int] = None):
    """Validation dataset + loader (no augmentation, letterboxed to ``img_size``)."""
    if data:
        cfg.data.dataset = data
    if img_size:
        cfg.data.img_size = int(img_size)
    _, val_ds, info = build_datasets_from_config(cfg, splits=("val",))
    loader = build_dataloader(val_ds, batch_size, shuffle=False,
                              workers=cfg.data.workers if workers is None else workers,
                              seed=cfg.train.seed)
    return val_ds, loader, info


def backend_from_args(weights=None, onnx=None, trt=None, threads: Optional[int] = None,
                      openvino=None):
    """``(backend, source, kwargs)`` from the tools' mutually exclusive ``--weights`` /
    ``--onnx`` / ``--openvino`` / ``--trt`` options (OpenVINO on CPU: a float ONNX in FP32, a
    QDQ ONNX in INT8; TensorRT from an ONNX: FP16 for every non-INT8 tensor; INT8 where the
    ONNX has Q/DQ)."""
    if weights:
        return "torch", weights, {}
    if onnx:
        return "onnxruntime", onnx, {"threads": threads}
    if openvino:
        return "openvino", openvino, {"threads": threads}
    return "tensorrt", trt, {"fp16": True}


def _check_outputs(save_json, save_dir, inputs) -> None:
    """``--save-json`` / ``--save-dir`` usable and not an input, before any inference."""
    inputs = [i for i in inputs if isinstance(i, (str, Path))]
    if save_json:
        check_output_file(save_json, inputs, what="--save-json file")
    if save_dir:
        check_output_dir(save_dir, inputs, what="--save-dir directory")
        for name in ("predictions.json", "pr_curves.npz"):
            check_output_file(Path(save_dir) / name, inputs, what="--save-dir file")


def run_eval(cfg, backend: str = "torch", source=None, batch_size: int = 8,
             img_size: Optional[int] = None, data: Optional[str] = None, conf: Optional[float] = None,
             iou: Optional[float] = None, max_det: Optional[int] = None, half: bool = False,
             save_json: Optional[str] = None, save_dir: Optional[str] = None,
             max_images: Optional[int] = None, per_class: bool = False, verbose: bool = True,
             **backend_kwargs) -> Dict[str, Any]:
    """Evaluate ``source`` (checkpoint / model for ``torch``, .onnx for ``onnxruntime`` and
    ``openvino``, .engine or
    .onnx for ``tensorrt``) on the config's validation set; returns the metrics dict.

    Checked before any inference, each with one line: ``img_size`` (else ``data.img_size``) is a
    multiple of the model's max stride; the model's class count (torch: the model's ``nc``;
    ONNX / TensorRT: output channels - 5) equals the dataset's ``nc``; ``save_json`` /
    ``save_dir`` can be written and are not inputs."""
    _check_outputs(save_json, save_dir, [source, data or cfg.data.dataset])
    if img_size:
        check_img_size(img_size, cfg, "--imgsz", "command line")
    else:
        check_img_size(cfg.data.img_size, cfg, "data.img_size", "config")
    kwargs = dict(backend_kwargs)
    if backend == "torch":
        kwargs.update(cfg=cfg if not isinstance(source, (str, Path)) or not str(source).endswith(
            (".pt", ".pth")) else kwargs.get("cfg"), half=half)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    elif backend == "tensorrt":
        kwargs.setdefault("fp16", True)
    engine = build_backend(backend, source, **kwargs)  # fails fast (e.g. TensorRT missing)
    val_ds, loader, info = val_loader_for(cfg, batch_size, img_size, data)
    check_model_nc(engine, val_ds.nc, source if isinstance(source, (str, Path)) else
                   f"the {backend} model", info["yaml_file"])
    evaluator = COCOEvaluator.from_dataset(val_ds)
    max_batches = -(-max_images // batch_size) if max_images else None
    res = evaluate(engine, loader, evaluator,
                   conf_thres=cfg.eval.conf_thres if conf is None else conf,
                   iou_thres=cfg.eval.iou_thres if iou is None else iou,
                   max_det=cfg.eval.max_det if max_det is None else max_det,
                   progress=verbose, max_batches=max_batches)
    if verbose:
        print(evaluator.last_table, end="")
        if per_class and res.get("per_class"):
            print(f"{'class':<20}{'AP50-95':>9}{'AP50':>9}")
            for row in res["per_class"]:
                if isinstance(row, dict):
                    print(f"{str(row.get('name', row.get('class'))):<20}"
                          f"{row.get('ap50_95', float('nan')):>9.4f}{row.get('ap50', float('nan')):>9.4f}")
    if save_dir:
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        evaluator.save_json(out / "predictions.json")
        evaluator.save_pr_curves(out / "pr_curves.npz", res)
    if save_json:
        scalars = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
        scalars["stats"] = [float(s) for s in res.get("stats", [])]
        write_json(save_json, scalars)
    return res
