"""``evaluate``: run any backend over a data loader, post-process and score with COCO metrics."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch

from ..data import build_dataloader
from ..data.formats import check_model_nc
from .backends import Backend, TorchBackend
from .coco import COCOEvaluator
from .postprocess import e2e_to_detections, postprocess, scale_boxes

__all__ = ["evaluate", "make_evaluate_fn", "unpack_batch", "val_loader"]


def unpack_batch(batch):
    """(imgs, targets, paths, shapes) from a loader batch (tuple/list or dict)."""
    if isinstance(batch, dict):
        try:
            return batch["imgs"], batch.get("targets"), batch["paths"], batch["shapes"]
        except KeyError as e:
            raise KeyError(f"evaluate: batch dict has no key {e}; expected imgs, targets, "
                           f"paths, shapes") from None
    if isinstance(batch, (tuple, list)) and len(batch) >= 4:
        return batch[0], batch[1], batch[2], batch[3]
    raise TypeError("evaluate: a batch must be (imgs, targets, paths, shapes) or a dict with "
                    "those keys")


def evaluate(backend, dataloader, evaluator: COCOEvaluator, conf_thres: float = 0.001,
             iou_thres: float = 0.65, max_det: int = 300, progress: bool = True,
             multi_label: bool = True, max_batches: Optional[int] = None,
             desc: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``backend`` (a :class:`Backend`, or a torch model) on ``dataloader`` batches
    ``(imgs uint8 (B,3,H,W), targets, paths, shapes)``.

    Images are converted to float/255 on the backend device, predictions go through the shared
    :func:`postprocess` (``multi_label`` as in YOLOv6's COCO evaluation) or, for end-to-end
    graphs, straight from their NMS outputs; boxes are mapped back to original pixels with
    ``shapes`` and added to ``evaluator`` (reset first). Returns ``evaluator.summarize()`` plus
    ``images``, ``seconds`` (wall time of the loop), ``infer_seconds``, ``post_seconds``,
    ``ms_per_image`` (inference only), ``backend``.
    """
    if isinstance(backend, torch.nn.Module):
        backend = TorchBackend(backend)
    if not isinstance(backend, Backend):
        raise TypeError(f"evaluate: backend must be a Backend or a torch model, got "
                        f"{type(backend).__name__}")
    ds = getattr(dataloader, "dataset", None)
    check_model_nc(backend, getattr(ds, "nc", None), f"the {backend.kind} model",
                   getattr(ds, "source", "of the data loader"))
    evaluator.reset()
    it = dataloader
    if progress:
        try:
            from tqdm import tqdm
            total = len(dataloader) if hasattr(dataloader, "__len__") else None
            if max_batches is not None and total is not None:
                total = min(total, max_batches)
            it = tqdm(dataloader, total=total, desc=desc or f"eval [{backend.kind}]",
                      leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    n_images, t_infer, t_post = 0, 0.0, 0.0
    t_start = time.perf_counter()
    for bi, batch in enumerate(it):
        if max_batches is not None and bi >= max_batches:
            break
        imgs, _, paths, shapes = unpack_batch(batch)
        x = imgs.to(backend.device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        backend.synchronize()
        t0 = time.perf_counter()
        out = backend(x)
        backend.synchronize()
        t1 = time.perf_counter()
        if backend.end2end:
            dets = e2e_to_detections(*out)
        else:
            dets = postprocess(out, conf_thres, iou_thres, max_det, multi_label=multi_label)
        for det, path, shape in zip(dets, paths, shapes):
            det = scale_boxes(det.detach().cpu(), shape)
            evaluator.add(path, det)
        t_post += time.perf_counter() - t1
        t_infer += t1 - t0
        n_images += len(paths)
    seconds = time.perf_counter() - t_start
    res = evaluator.summarize()
    res.update(images=n_images, seconds=seconds, infer_seconds=t_infer, post_seconds=t_post,
               ms_per_image=1000.0 * t_infer / max(n_images, 1), backend=backend.kind,
               coco_backend=res.get("backend"))
    return res


def val_loader(cfg, val_ds, batch_size: Optional[int] = None, workers: Optional[int] = None):
    """The validation loader of ``val_ds`` (no shuffling; ``cfg.eval.batch_size``)."""
    return build_dataloader(val_ds, batch_size or cfg.eval.batch_size, shuffle=False,
                            workers=min(cfg.data.workers, 2) if workers is None else workers,
                            seed=cfg.train.seed)


def make_evaluate_fn(cfg, val_ds, batch_size: Optional[int] = None,
                     max_images: Optional[int] = None, backend=TorchBackend):
    """The one evaluator factory: ``evaluate_fn(source) -> scalar metrics``, COCO mAP of
    ``backend(source)`` (a torch model by default; e.g. :class:`OrtBackend` for an .onnx path)
    on the validation set with the settings of ``cfg.eval``."""
    loader = val_loader(cfg, val_ds, batch_size)
    max_batches = None if not max_images else max(1, max_images // (batch_size or cfg.eval.batch_size))

    def evaluate_fn(source) -> Dict[str, Any]:
        evaluator = COCOEvaluator.from_dataset(val_ds)
        res = evaluate(backend(source), loader, evaluator, conf_thres=cfg.eval.conf_thres,
                       iou_thres=cfg.eval.iou_thres, max_det=cfg.eval.max_det, progress=False,
                       max_batches=max_batches)
        return {k: v for k, v in res.items() if isinstance(v, (int, float))}
    return evaluate_fn
