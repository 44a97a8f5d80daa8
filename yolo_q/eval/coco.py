"""COCO bbox evaluation (pycocotools; faster-coco-eval when importable, same numbers).

Ground truth comes from a COCO JSON file (or dict) or is built from a dataset's YOLO labels
(:func:`coco_gt_from_dataset`). Predictions are added per image as ``(n, 6)`` boxes
``[x1, y1, x2, y2, score, cls]`` in ORIGINAL image pixels; ``cls`` is the model's class index,
mapped to COCO category ids by a class map (for a COCO JSON: the i-th category sorted by id,
i.e. COCO 80 -> 91; for YOLO labels: identity unless a map is given).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..io import write_text_atomic
from ..data.formats import coco_ground_truth, read_coco_ids

__all__ = ["STAT_NAMES", "COCOEvaluator", "coco_gt_from_dataset", "load_class_map",
           "plot_pr_curves"]

# The 12 numbers of COCOeval.summarize(), in order.
STAT_NAMES = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")

PathLike = Union[str, os.PathLike]


def _coco_api(backend: str = "auto"):
    """(COCO, COCOeval, name) for ``backend`` in auto | pycocotools | faster."""
    if backend not in ("auto", "pycocotools", "faster"):
        raise ValueError(f"COCO eval backend must be auto | pycocotools | faster, got {backend!r}")
    if backend in ("auto", "faster"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster
            return COCO, COCOeval_faster, "faster_coco_eval"
        except ImportError:
            if backend == "faster":
                raise RuntimeError("faster-coco-eval is not installed: pip install "
                                   "faster-coco-eval") from None
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise RuntimeError("COCO evaluation needs pycocotools: pip install pycocotools") from None
    return COCO, COCOeval, "pycocotools"


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Swallow the prints of pycocotools unless verbose."""
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def load_class_map(src) -> List[int]:
    """Class index -> category id, from a list/tuple, a dict ``{cls: id}``, or a file: a text
    file with ``<cls> <id>`` per line (as ``coco80_to_91.txt``) or one id per line, or a JSON
    list/dict."""
    if src is None:
        raise ValueError("class map is None")
    if isinstance(src, Mapping):
        keys = sorted(int(k) for k in src)
        if keys != list(range(len(keys))):
            raise ValueError(f"class map keys must be 0..{len(keys) - 1}, got {keys[:5]}...")
        return [int(src[k] if k in src else src[str(k)]) for k in keys]
    if isinstance(src, (list, tuple, np.ndarray)):
        return [int(v) for v in src]
    return read_coco_ids(src)


def _names_list(names, n: Optional[int] = None) -> List[str]:
    if names is None:
        return [str(i) for i in range(n or 0)]
    if isinstance(names, Mapping):
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(v) for v in names]


def _dataset_class_map(ds):
    for attr in ("coco_ids", "class_map"):
        v = getattr(ds, attr, None)
        if v is not None:
            return v
    return None


def coco_gt_from_dataset(ds, class_map=None) -> Dict[str, Any]:
    """COCO ground-truth dict built from a dataset with YOLO labels.

    Uses ``ds.im_files``, ``ds.image_ids``, ``ds.shapes0`` (original ``(h, w)`` per image),
    ``ds.labels`` (per image ``(n, 5)``: ``cls cx cy w h`` normalized) and ``ds.names``.
    ``class_map`` (see :func:`load_class_map`; default ``ds.coco_ids`` or ``ds.class_map`` if
    present, else ``cls + 1``) maps class index -> category id. ``area`` is the box area."""
    for attr in ("im_files", "image_ids", "shapes0", "labels", "names"):
        if not hasattr(ds, attr):
            raise AttributeError(f"coco_gt_from_dataset: dataset {type(ds).__name__} has no "
                                 f"attribute '{attr}'")
    names = _names_list(ds.names)
    if class_map is None:
        class_map = _dataset_class_map(ds)
    cmap = load_class_map(class_map) if class_map is not None else [i + 1 for i in
                                                                    range(len(names))]
    if len(cmap) < len(names):
        raise ValueError(f"class map has {len(cmap)} entries but the dataset has "
                         f"{len(names)} classes")
    n_img = len(ds.im_files)
    if not (len(ds.image_ids) == len(ds.shapes0) == len(ds.labels) == n_img):
        raise ValueError(f"dataset lists differ in length: im_files {n_img}, image_ids "
                         f"{len(ds.image_ids)}, shapes0 {len(ds.shapes0)}, labels "
                         f"{len(ds.labels)}")
    images, anns = [], []
    for f, img_id, (h0, w0), lab in zip(ds.im_files, ds.image_ids, ds.shapes0, ds.labels):
        img_id = int(img_id)
        images.append({"id": img_id, "file_name": os.path.basename(str(f)), "height": int(h0),
                       "width": int(w0)})
        lab = np.asarray(lab, dtype=np.float64).reshape(-1, 5)
        for c, cx, cy, w, h in lab:
            c = int(c)
            if not 0 <= c < len(cmap):
                raise ValueError(f"{f}: class {c} outside 0..{len(cmap) - 1}")
            bw, bh = w * w0, h * h0
            x1, y1 = cx * w0 - bw / 2, cy * h0 - bh / 2
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cmap[c],
                         "bbox": [x1, y1, bw, bh], "area": bw * bh, "iscrowd": 0})
    cats = [{"id": cmap[i], "name": names[i], "supercategory": ""} for i in range(len(names))]
    return {"info": {"description": "yolo_q ground truth from YOLO labels"}, "images": images,
            "annotations": anns, "categories": cats}


def _to_numpy(det) -> np.ndarray:
    if isinstance(det, torch.Tensor):
        det = det.detach().to("cpu", torch.float64).numpy()
    det = np.asarray(det, dtype=np.float64)
    if det.size == 0:
        return np.zeros((0, 6))
    if det.ndim != 2 or det.shape[1] < 6:
        raise ValueError(f"detections must be (n, 6) [x1, y1, x2, y2, score, cls], got "
                         f"{det.shape}")
    return det[:, :6]


class COCOEvaluator:
    """Accumulate detections and compute COCO bbox metrics.

    ``gt``: a COCO JSON path, a COCO dict, or a dataset: its ``json_file`` when it has one and
    ``prefer_json`` (official areas and crowd regions), else GT built from its YOLO labels
    (:func:`coco_gt_from_dataset`). A JSON (path or the dataset's) is read through
    :func:`yolo_q.data.formats.coco_ground_truth`: only the boxes the data loader keeps are
    ground truth (a dropped box is never scored and never reaches pycocotools); a dict is used
    as given. ``class_map``: class index -> category id (default: the
    dataset's ``coco_ids``/``class_map``, else the GT's category ids sorted, i.e. COCO 80->91 for
    a COCO JSON). ``backend``: auto | pycocotools | faster.

    >>> ev = COCOEvaluator("instances_val2017.json")
    >>> ev.add(image_id, dets)            # (n, 6) in original pixels
    >>> res = ev.summarize()              # res["map50_95"], res["stats"], ...
    """

    def __init__(self, gt, class_map=None, verbose: bool = False, backend: str = "auto",
                 names: Optional[Sequence[str]] = None, prefer_json: bool = True):
        self.verbose = verbose
        self._COCO, self._COCOeval, self.backend = _coco_api(backend)
        self.source = "dict"
        self._file_index: Dict[str, int] = {}
        if isinstance(gt, (str, os.PathLike)):
            path = Path(gt)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: COCO annotation file not found")
            data = coco_ground_truth(path, load_class_map(class_map) if class_map is not None
                                     else None)
            self.source = str(path)
        elif isinstance(gt, Mapping):
            data = dict(gt)
        elif hasattr(gt, "labels") and hasattr(gt, "shapes0"):
            if class_map is None:
                class_map = _dataset_class_map(gt)
            json_file = getattr(gt, "json_file", None) if prefer_json else None
            if json_file and Path(json_file).is_file():
                # the boxes the loader kept (dropped ones are never scored), the JSON's areas
                # and crowd regions
                data = coco_ground_truth(
                    json_file, load_class_map(class_map) if class_map is not None else None,
                    getattr(gt, "nc", None))
                self.source = str(json_file)
            else:
                data = coco_gt_from_dataset(gt, class_map)
                if class_map is None:
                    class_map = [c["id"] for c in data["categories"]]
                self.source = f"dataset {type(gt).__name__}"
            for f, i in zip(gt.im_files, gt.image_ids):
                self._file_index[str(f)] = int(i)
        else:
            raise TypeError(f"COCOEvaluator: gt must be a JSON path, a COCO dict or a dataset, "
                            f"got {type(gt).__name__}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.source}: COCO ground truth has no '{key}'")
        data.setdefault("info", {})
        data.setdefault("licenses", [])
        self.gt_dict = data
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        self.class_map = load_class_map(class_map) if class_map is not None else cat_ids
        unknown = set(self.class_map) - set(cat_ids)
        if unknown:
            raise ValueError(f"{self.source}: class map uses category ids {sorted(unknown)[:5]} "
                             f"that are not in the ground truth categories")
        self._cat_to_cls = {c: i for i, c in enumerate(self.class_map)}
        cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        self.names = (list(names) if names is not None
                      else [cat_names.get(c, str(c)) for c in self.class_map])
        self.image_ids = [int(im["id"]) for im in data["images"]]
        base_count: Dict[str, int] = {}
        for im in data["images"]:
            b = os.path.basename(str(im.get("file_name", "")))
            base_count[b] = base_count.get(b, 0) + 1
        for im in data["images"]:
            b = os.path.basename(str(im.get("file_name", "")))
            if b and base_count[b] == 1:
                self._file_index.setdefault(b, int(im["id"]))
        self._id_set = set(self.image_ids)
        with _quiet(verbose):
            self.coco_gt = self._COCO()
            self.coco_gt.dataset = data
            self.coco_gt.createIndex()
        self.reset()
        self.last_summary: Optional[Dict[str, Any]] = None
        self.last_table = ""

    @classmethod
    def from_dataset(cls, ds, class_map=None, **kwargs) -> "COCOEvaluator":
        """Evaluator whose ground truth is built from ``ds``'s YOLO labels."""
        return cls(ds, class_map=class_map, **kwargs)

    # ---------------------------------------------------------------- accumulate
    def reset(self):
        """Forget all added predictions."""
        self._dets: Dict[int, np.ndarray] = {}

    def image_id(self, key) -> int:
        """Image id for an image path (full path from a dataset, or a file name present in the
        GT), or for an int id; raises KeyError naming the image if unknown."""
        if isinstance(key, (int, np.integer)):
            if int(key) not in self._id_set:
                raise KeyError(f"image id {int(key)} is not in the ground truth ({self.source})")
            return int(key)
        key = str(key)
        if key in self._file_index:
            return self._file_index[key]
        base = os.path.basename(key)
        if base in self._file_index:
            return self._file_index[base]
        stem = os.path.splitext(base)[0]
        if stem.isdigit() and int(stem) in self._id_set:
            return int(stem)
        raise KeyError(f"{key}: image not found in the ground truth ({self.source})")

    def add(self, image_id, det) -> None:
        """Add the detections of one image (``(n, 6)`` in original pixels); an image added with
        zero detections still counts (its ground truth boxes are misses). ``image_id`` may also
        be an image path."""
        img_id = self.image_id(image_id)
        d = _to_numpy(det)
        if d.shape[0] and (d[:, 5].min() < 0 or d[:, 5].max() >= len(self.class_map)):
            raise ValueError(f"image {img_id}: class index {int(d[:, 5].max())} outside the "
                             f"class map 0..{len(self.class_map) - 1}")
        prev = self._dets.get(img_id)
        self._dets[img_id] = d if prev is None else np.concatenate((prev, d))

    def update(self, image_ids: Sequence, dets: Sequence) -> None:
        """Add a batch: one entry of ``dets`` per image id (or path)."""
        if len(image_ids) != len(dets):
            raise ValueError(f"update: {len(image_ids)} image ids but {len(dets)} detections")
        for i, d in zip(image_ids, dets):
            self.add(i, d)

    @property
    def num_images(self) -> int:
        return len(self._dets)

    @property
    def evaluated_ids(self) -> List[int]:
        """Ids of the images added since the last reset, sorted."""
        return sorted(self._dets)

    def results(self) -> List[Dict[str, Any]]:
        """Predictions in COCO results format (bbox ``[x, y, w, h]`` rounded to 3 decimals,
        score to 5)."""
        out = []
        for img_id in sorted(self._dets):
            d = self._dets[img_id]
            for x1, y1, x2, y2, s, c in d.tolist():
                out.append({"image_id": img_id, "category_id": self.class_map[int(c)],
                            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3),
                                     round(y2 - y1, 3)],
                            "score": round(s, 5)})
        return out

    def save_json(self, path: PathLike) -> Path:
        """Write the predictions as a COCO results JSON (atomically)."""
        return write_text_atomic(path, json.dumps(self.results()))

    # ---------------------------------------------------------------- metrics
    def _empty_summary(self, reason: str) -> Dict[str, Any]:
        stats = [0.0] * len(STAT_NAMES)
        res: Dict[str, Any] = dict(zip(STAT_NAMES, stats))
        res.update(stats=stats, per_class=[], pr_curve=None, num_images=self.num_images,
                   num_detections=0, backend=self.backend, note=reason)
        return res

    def summarize(self, per_class: bool = True, pr_curves: bool = True,
                  image_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """Run COCOeval over the images added so far (``image_ids``: only these of them, e.g.
        one half of the set for a split-half check; ids that were not added raise KeyError).

        Returns ``map50_95``, ``map50`` and the other 11 named COCO stats (see STAT_NAMES),
        ``stats`` (the 12 numbers as a list), ``per_class`` (list of dicts: class, category_id,
        name, num_gt, ap50_95, ap50; NaN when the class has no GT), ``pr_curve`` (dict:
        ``recall (101,)``, ``precision (K, 101)`` per class at IoU 0.5, all areas, 100 dets,
        NaN rows for classes without GT, ``mean (101,)``, ``classes``, ``names``),
        ``num_images``, ``num_detections``, ``backend``. No images or no detections gives
        all-zero stats."""
        if image_ids is None:
            img_ids = self.evaluated_ids
        else:
            img_ids = sorted({int(i) for i in image_ids})
            missing = [i for i in img_ids if i not in self._dets]
            if missing:
                raise KeyError(f"summarize: image ids {missing[:5]} have no added detections")
        if not img_ids:
            res = self._empty_summary("no images were evaluated")
        elif not any(self._dets[i].shape[0] for i in img_ids):
            res = self._empty_summary("no detections")
        else:
            res = self._run_cocoeval(per_class, pr_curves, img_ids)
        self.last_summary = res
        return res

    def _run_cocoeval(self, per_class: bool, pr_curves: bool,
                      img_ids: List[int]) -> Dict[str, Any]:
        results = self.results()
        if len(img_ids) < len(self._dets):
            keep = set(img_ids)
            results = [r for r in results if r["image_id"] in keep]
        buf = io.StringIO()
        try:
            with _quiet(self.verbose):
                coco_dt = self.coco_gt.loadRes(results)
                ev = self._COCOeval(self.coco_gt, coco_dt, "bbox")
                ev.params.imgIds = img_ids
                ev.evaluate()
                ev.accumulate()
                with contextlib.redirect_stdout(buf):
                    ev.summarize()
        except Exception as e:  # noqa: BLE001
            if self.backend == "pycocotools":
                raise
            warnings.warn(f"{self.backend} failed ({type(e).__name__}: {e}); falling back to "
                          f"pycocotools")
            self._COCO, self._COCOeval, self.backend = _coco_api("pycocotools")
            with _quiet(self.verbose):
                self.coco_gt = self._COCO()
                self.coco_gt.dataset = self.gt_dict
                self.coco_gt.createIndex()
            return self._run_cocoeval(per_class, pr_curves, img_ids)
        self.last_table = buf.getvalue()
        if self.verbose:
            print(self.last_table, end="")
        stats = [float(v) for v in ev.stats[:len(STAT_NAMES)]]
        res: Dict[str, Any] = dict(zip(STAT_NAMES, stats))
        res.update(stats=stats, num_images=len(img_ids), num_detections=len(results),
                   backend=self.backend)
        precision = np.asarray(ev.eval["precision"])  # (T, R, K, A, M)
        cat_ids = [int(c) for c in ev.params.catIds]
        if per_class:
            id_set = set(img_ids)
            num_gt: Dict[int, int] = {}
            for a in self.gt_dict["annotations"]:
                if a.get("iscrowd", 0) or int(a["image_id"]) not in id_set:
                    continue
                num_gt[int(a["category_id"])] = num_gt.get(int(a["category_id"]), 0) + 1
            rows = []
            for k, cid in enumerate(cat_ids):
                p_all = precision[:, :, k, 0, -1]
                p50 = precision[0, :, k, 0, -1]
                rows.append({"class": self._cat_to_cls.get(cid), "category_id": cid,
                             "name": self._name_of(cid), "num_gt": num_gt.get(cid, 0),
                             "ap50_95": _mean_valid(p_all), "ap50": _mean_valid(p50)})
            rows.sort(key=lambda r: (r["class"] is None, r["class"] or 0, r["category_id"]))
            res["per_class"] = rows
        if pr_curves:
            p = precision[0, :, :, 0, -1].T.astype(np.float64)  # (K, R)
            p[p < 0] = np.nan
            valid = ~np.isnan(p).all(1)
            res["pr_curve"] = {
                "recall": np.asarray(ev.params.recThrs, dtype=np.float64),
                "precision": p,
                "mean": (p[valid].mean(0) if valid.any() else np.zeros(p.shape[1])),
                "classes": [self._cat_to_cls.get(c) for c in cat_ids],
                "category_ids": cat_ids,
                "names": [self._name_of(c) for c in cat_ids],
                "iou": 0.5,
            }
        return res

    def _name_of(self, cat_id: int) -> str:
        i = self._cat_to_cls.get(cat_id)
        return self.names[i] if i is not None and i < len(self.names) else str(cat_id)

    def save_pr_curves(self, path: PathLike, summary: Optional[Dict[str, Any]] = None) -> Path:
        """Save the PR curves of ``summary`` (default: the last summarize()) as ``.npz``:
        recall (R,), precision (K, R), mean (R,), category_ids (K,), names (K,)."""
        s = summary or self.last_summary
        if not s or not s.get("pr_curve"):
            raise ValueError("no PR curves: call summarize(pr_curves=True) with detections first")
        pr = s["pr_curve"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, recall=pr["recall"], precision=pr["precision"], mean=pr["mean"],
                 category_ids=np.asarray(pr["category_ids"]), names=np.asarray(pr["names"]))
        return path


def _mean_valid(p: np.ndarray) -> float:
    v = p[p > -1]
    return float(v.mean()) if v.size else math.nan


def plot_pr_curves(summary: Dict[str, Any], path: PathLike, top: int = 10,
                   title: Optional[str] = None) -> Path:
    """Plot precision vs recall at IoU 0.5 (mean over classes, plus the ``top`` classes by
    AP50) from a :meth:`COCOEvaluator.summarize` result into a PNG."""
    pr = summary.get("pr_curve")
    if not pr:
        raise ValueError("summary has no 'pr_curve' (no detections, or pr_curves=False)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, p = pr["recall"], pr["precision"]
    valid = ~np.isnan(p).all(1) if p.size else np.zeros(0, bool)
    ap = np.full(len(p), -1.0)
    ap[valid] = np.nanmean(p[valid], 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    for k in np.argsort(-ap)[:top]:
        if ap[k] < 0:
            continue
        ax.plot(r, p[k], lw=0.8, alpha=0.6, label=f"{pr['names'][k]} {ap[k]:.3f}")
    ax.plot(r, pr["mean"], lw=2.5, color="k",
            label=f"all classes {summary.get('map50', float('nan')):.3f} mAP@0.5")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=title or "precision-recall @ IoU 0.5")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
