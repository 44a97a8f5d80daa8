"""Inference on images, folders and videos with any backend (``tools/infer.py``).

The pipeline is the evaluation's: :func:`yolo_q.data.letterbox` -> backend -> the shared
:func:`~yolo_q.eval.postprocess` (or an end-to-end graph's NMS outputs) ->
:func:`~yolo_q.eval.scale_boxes` back to original pixels. Outputs: the images (or the video) with
boxes drawn, and ``detections.json``::

    [{"file": "img.jpg", "frame": null, "width": 640, "height": 480,
      "detections": [{"box": [x1, y1, x2, y2], "score": 0.91, "class": 3, "name": "car"}]}]

(``frame`` is the frame index for videos.)
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.images import (IMAGE_EXTS, VIDEO_EXTS, config_class_names, image_batches,
                           letterbox_batch, list_images, read_image)
from .backends import Backend, build_backend
from .postprocess import e2e_to_detections, postprocess, scale_boxes
from ..io import check_output_file, make_output_dir, read_checkpoint_any, write_text_atomic

__all__ = ["IMAGE_EXTS", "VIDEO_EXTS", "list_images", "letterbox_batch", "image_batches",
           "detect", "draw_detections", "class_names", "run_inference"]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


@torch.no_grad()
def detect(backend: Backend, imgs_bgr: Sequence[np.ndarray], img_size: int,
           conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 300,
           classes: Optional[Sequence[int]] = None, agnostic: bool = False) -> List[torch.Tensor]:
    """Detections ``(n, 6)`` [x1, y1, x2, y2, score, cls] in original pixels, one per image."""
    x, shapes = letterbox_batch(imgs_bgr, img_size)
    x = x.to(backend.device).float().div_(255.0)
    out = backend(x)
    if backend.end2end:
        dets = e2e_to_detections(*out)
        if classes is not None:
            keep = torch.as_tensor(list(classes))
            dets = [d[torch.isin(d[:, 5].long(), keep)] for d in dets]
        dets = [d[d[:, 4] > conf_thres][:max_det] for d in dets]
    else:
        dets = postprocess(out, conf_thres, iou_thres, max_det, classes=classes,
                           agnostic=agnostic)
    return [scale_boxes(d.detach().cpu(), s) for d, s in zip(dets, shapes)]


def _color(c: int) -> Tuple[int, int, int]:
    """A distinct BGR colour per class (golden-ratio hue walk)."""
    import cv2
    hsv = np.uint8([[[int((c * 0.618034 % 1.0) * 179), 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_detections(img: np.ndarray, det: torch.Tensor, names: Sequence[str]) -> np.ndarray:
    """Draw boxes and ``name score`` labels on a copy of a BGR image."""
    import cv2
    out = img.copy()
    lw = max(1, round(sum(img.shape[:2]) / 2 * 0.003))
    for x1, y1, x2, y2, score, cls in det.tolist():
        c = int(cls)
        color = _color(c)
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, color, lw, cv2.LINE_AA)
        label = f"{names[c] if 0 <= c < len(names) else c} {score:.2f}"
        fs = max(0.3, lw / 3)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, max(1, lw // 2))
        top = p1[1] - th - base if p1[1] - th - base >= 0 else p1[1]
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw, top + th + base), color, -1)
        cv2.putText(out, label, (p1[0], top + th), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255),
                    max(1, lw // 2), cv2.LINE_AA)
    return out


def class_names(cfg=None, backend: Optional[Backend] = None, nc: Optional[int] = None
                ) -> List[str]:
    """Class names from the ONNX metadata (``names``, written by :func:`yolo_q.export.api.
    export_model`), else the config's data YAML (when it has ``model.nc`` names), else
    ``class0..``."""
    session = getattr(backend, "session", None)
    if session is not None:
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("names"):
            try:
                return [str(n) for n in json.loads(meta["names"])]
            except ValueError:
                pass
    if cfg is not None:
        names = config_class_names(cfg)
        if names:
            return names
        nc = nc or int(cfg.model.nc)
    return [f"class{i}" for i in range(nc or 80)]


def _records(det: torch.Tensor, names: Sequence[str]) -> List[Dict[str, Any]]:
    return [{"box": [round(v, 2) for v in row[:4]], "score": round(row[4], 5),
             "class": int(row[5]),
             "name": names[int(row[5])] if 0 <= int(row[5]) < len(names) else str(int(row[5]))}
            for row in det.tolist()]


def _video_frames(path: Path):
    import cv2
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot open the video")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            yield i, frame, fps
            i += 1
    finally:
        cap.release()


def run_inference(cfg, backend: str, model_source, source: PathLike, out_dir: PathLike,
                  img_size: Optional[int] = None, conf_thres: float = 0.25,
                  iou_thres: float = 0.45, max_det: int = 300, batch_size: int = 1,
                  classes: Optional[Sequence[int]] = None, save_images: bool = True,
                  max_frames: Optional[int] = None, **backend_kwargs) -> Dict[str, Any]:
    """Detect objects in ``source`` (image, folder, ``.txt`` list, glob or video) with
    ``backend`` (torch | onnxruntime | tensorrt; ``model_source`` a checkpoint/model, ONNX or
    engine) and write the drawn images (or ``<video stem>.mp4``) plus ``detections.json`` to
    ``out_dir``. Returns ``{"json", "images", "detections", "out_dir", "names"}``."""
    engine, img_size = _inference_backend(cfg, backend, model_source, img_size, backend_kwargs)
    names = class_names(cfg, engine)
    src = Path(str(source)).expanduser()
    is_video = src.is_file() and src.suffix.lower() in VIDEO_EXTS
    files = [] if is_video else list_images(source)
    inputs = [model_source, source]
    check_output_file(Path(out_dir) / "detections.json", inputs, what="detections file")
    out = make_output_dir(out_dir, inputs, what="--out directory",
                          same_names=([src] if is_video else files) if save_images else ())
    args = dict(conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, classes=classes)
    if is_video:
        results = _infer_video(engine, src, out, img_size, names, args, save_images, max_frames)
    else:
        results = _infer_images(engine, files, out, img_size, names, args, save_images,
                                batch_size)
    json_path = write_text_atomic(out / "detections.json", json.dumps(results, indent=1))
    return {"json": str(json_path), "images": len(results),
            "detections": sum(len(r["detections"]) for r in results),
            "out_dir": str(out), "names": names}


def _inference_backend(cfg, backend: str, model_source, img_size, backend_kwargs):
    """The backend (a torch checkpoint with its own config; ``cfg`` for a plain state dict) and
    the checked square input size."""
    kw = dict(backend_kwargs)
    if backend == "torch" and isinstance(model_source, (str, os.PathLike)):
        # the checkpoint's own config (inferred for official ones); cfg for a plain state dict
        ck = read_checkpoint_any(model_source)
        if ck.get("config") is None and ck.get("source") != "official":
            kw.setdefault("cfg", cfg)
    engine = build_backend(backend, model_source, **kw)
    if img_size is None:
        img_size = engine.input_hw[0] if engine.input_hw else int(cfg.data.img_size)
    if engine.input_hw and engine.input_hw[0] != engine.input_hw[1]:
        raise ValueError(f"{model_source}: a non-square input {engine.input_hw} is not supported "
                         f"by the letterbox; export a square model")
    stride = 32
    if img_size % stride:
        raise ValueError(f"--imgsz {img_size} must be a multiple of {stride}")
    return engine, img_size


def _infer_video(engine, src: Path, out: Path, img_size: int, names, args, save_images: bool,
                 max_frames: Optional[int]) -> List[Dict[str, Any]]:
    import cv2
    results: List[Dict[str, Any]] = []
    writer = None
    try:
        for i, frame, fps in _video_frames(src):
            if max_frames is not None and i >= max_frames:
                break
            det = detect(engine, [frame], img_size, **args)[0]
            results.append({"file": str(src), "frame": i, "width": frame.shape[1],
                            "height": frame.shape[0], "detections": _records(det, names)})
            if save_images:
                if writer is None:
                    writer = cv2.VideoWriter(str(out / f"{src.stem}.mp4"),
                                             cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                             (frame.shape[1], frame.shape[0]))
                writer.write(draw_detections(frame, det, names))
    finally:
        if writer is not None:
            writer.release()
    if not results:
        raise ValueError(f"{src}: the video has no readable frames")
    return results


def _infer_images(engine, files, out: Path, img_size: int, names, args, save_images: bool,
                  batch_size: int) -> List[Dict[str, Any]]:
    import cv2
    results: List[Dict[str, Any]] = []
    used: set = set()
    for s in range(0, len(files), batch_size):
        chunk, imgs = [], []
        for f in files[s:s + batch_size]:
            try:
                imgs.append(read_image(f))
                chunk.append(f)
            except ValueError as e:
                logger.warning("skipping %s", e)
        if not imgs:
            continue
        for f, img, det in zip(chunk, imgs, detect(engine, imgs, img_size, **args)):
            results.append({"file": str(f), "frame": None, "width": img.shape[1],
                            "height": img.shape[0], "detections": _records(det, names)})
            if save_images:
                name = f.name if f.name not in used else f"{len(used)}_{f.name}"
                used.add(name)
                cv2.imwrite(str(out / name), draw_detections(img, det, names))
    return results
