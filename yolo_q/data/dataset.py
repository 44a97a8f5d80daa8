"""Detection dataset: scans (and caches) images + labels once, reports bad data once, and yields
letterboxed or augmented samples.

Sample contract (``__getitem__``): ``(img, labels, path, shape_info)`` with ``img`` a uint8 tensor
``(3, S, S)`` RGB, ``labels`` float32 ``(n, 5)`` ``[cls, x1, y1, x2, y2]`` pixels of ``img``,
``shape_info = ((h0, w0), ((ratio_h, ratio_w), (pad_w, pad_h)))`` with
``orig = (letterboxed - pad) / ratio`` (exact without augmentation; for mosaic samples it is the
letterbox mapping the image alone would have had).

Augmentation randomness is a pure function of ``(seed, epoch, index)``: results do not depend on
the number of workers or on which worker loads a sample.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from . import formats as F
from . import transforms as T
from ..config.schema import AugmentConfig

LOGGER = logging.getLogger("yolo_q.data")
MAX_SUBSTITUTIONS = 16  # consecutive unreadable samples before giving up


def hyp_dict(hyp: Any) -> Dict[str, Any]:
    """Augmentation settings as a plain dict: defaults of ``AugmentConfig`` <- ``hyp``
    (a dataclass, an OmegaConf node, a dict or None)."""
    out = dataclasses.asdict(AugmentConfig())
    if hyp is None:
        return out
    if dataclasses.is_dataclass(hyp):
        given = dataclasses.asdict(hyp)
    else:
        try:
            from omegaconf import DictConfig, OmegaConf
            given = OmegaConf.to_container(hyp, resolve=True) if isinstance(hyp, DictConfig) else dict(hyp)
        except ImportError:  # pragma: no cover
            given = dict(hyp)
    unknown = set(given) - set(out)
    if unknown:
        raise F.DataError(f"unknown augmentation key(s) {sorted(unknown)}; known: {sorted(out)}")
    out.update(given)
    return out


def mosaic_closed(epoch: int, total_epochs: Optional[int], close: int) -> bool:
    """Whether mosaic/mixup are off in ``epoch`` (0-based): the last ``close`` epochs of a run of
    ``total_epochs``, only when the run is longer than ``close`` (never the whole run)."""
    if total_epochs is None or close <= 0 or total_epochs <= close:
        return False
    return epoch >= total_epochs - close


def verify_image(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """Cheap integrity check: header (size), PNG CRCs, and a full decode only for JPEGs that do
    not end with the EOI marker (truncated files). Returns ``((h, w), None)`` or ``(None, why)``."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
            im.verify()
        if w < 1 or h < 1:
            return None, f"empty image ({w}x{h})"
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                tail = f.read(2)
            if tail != b"\xff\xd9":
                with Image.open(path) as im:
                    im.load()  # raises on a truncated JPEG
        return (h, w), None
    except Exception as e:  # noqa: BLE001 - any failure means the image is unusable
        msg = str(e).splitlines()[0] if str(e) else ""
        return None, f"{type(e).__name__}: {msg}"[:200]


def imread(path: str) -> Optional[np.ndarray]:
    """BGR uint8 (H, W, 3) or None; EXIF orientation ignored (labels refer to stored pixels)."""
    try:
        return cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None


def _add_counts(total: Dict[str, int], counts: Dict[str, int]) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v


class BrokenDatasetError(RuntimeError):
    """Too many images of a scanned dataset fail to decode at training time (changed or
    removed files); names the source folder."""
    user_facing = True  # tools print the message as one line (yolo_q.cli.run_tool)


class DetectionDataset(Dataset):
    """Images + YOLO txt labels (label dir: ``/images/`` -> ``/labels/``) or a COCO JSON.

    Args:
        source: image folder, ``.txt`` list of images, or a list of those.
        img_size: square output side ``S``.
        augment: train-time augmentation (mosaic, mixup, affine, HSV, flips per ``hyp``).
        hyp: :class:`yolo_q.config.schema.AugmentConfig` (or dict / OmegaConf node).
        nc, names: class count / names (``names`` wins; from the JSON when absent).
        json_file: COCO instances JSON; labels come from it instead of txt files, image ids are
            its ids, images not in the JSON are dropped (reported).
        coco_ids: class index -> COCO category id (JSON category mapping; else sorted ids).
        cache: read/write the label cache (next to the labels, else ``$YOLOQ_CACHE_DIR`` or
            ``~/.cache/yolo_q``; never fails on a read-only folder).
        seed: base seed of the per-sample augmentation generator.
        prefix: name used in log messages (``train``/``val``).

    Attributes: ``im_files``, ``image_ids``, ``shapes0`` ((h, w) per image, int array),
    ``labels`` (per image float32 ``(n,5)`` ``cls cx cy w h`` normalised to the original image),
    ``nc``, ``names``, ``bad_report`` (dict, see :meth:`bad_report`).

    Epochs: call :meth:`set_epoch` before each epoch. It seeds the augmentation of that epoch
    and, in the last ``hyp.close_mosaic_epochs`` epochs of runs longer than that, switches mosaic
    and mixup off (the other augmentations stay on, as in YOLOv6; see :func:`mosaic_closed`). The state lives in shared memory, so it also reaches
    persistent DataLoader workers.
    """

    def __init__(self, source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                 img_size: int = 640, augment: bool = False, hyp: Any = None, *,
                 nc: Optional[int] = None, names: Optional[Sequence[str]] = None,
                 json_file: Optional[Union[str, os.PathLike]] = None,
                 coco_ids: Optional[Sequence[int]] = None, cache: bool = True, seed: int = 0,
                 prefix: str = "", verbose: bool = True):
        self.source = source
        self.img_size = int(img_size)
        self.augment = bool(augment)
        self.hyp = hyp_dict(hyp)
        self.seed = int(seed)
        self.prefix = prefix or "data"
        if names is not None:
            names = [str(n) for n in names]
            if nc is not None and nc != len(names):
                raise F.DataError(f"{source}: nc={nc} but {len(names)} names")
            nc = len(names)
        self.json_file = str(json_file) if json_file else None
        self.coco_ids = list(coco_ids) if coco_ids is not None else None

        files = F.list_images(source)
        if not files:
            raise F.DataNotFoundError(f"no images found in dataset path: {source}")
        data, cache_msg = self._load_or_scan(files, nc, cache)
        keep = data["im_files"]
        if not len(keep):
            raise F.DataError(f"{source}: none of the {len(files)} images is usable; "
                              f"first issues: {list(data['report']['corrupt_images'].items())[:3]}")
        self.im_files: List[str] = [str(f) for f in keep]
        self.shapes0 = np.asarray(data["shapes"], np.int64).reshape(-1, 2)
        counts = np.asarray(data["label_counts"], np.int64)
        flat = np.asarray(data["labels"], np.float32).reshape(-1, 5)
        self.labels: List[np.ndarray] = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
        self.image_ids: List[int] = [int(i) for i in data["image_ids"]]
        self.nc = int(data["nc"]) if nc is None else int(nc)
        self.names = list(names) if names is not None else list(data["names"]) or \
            [str(i) for i in range(self.nc)]
        if len(self.names) != self.nc:
            self.names = [str(i) for i in range(self.nc)]
        self._report = data["report"]

        n = len(self.im_files)
        # shared across DataLoader workers: [epoch, mosaic_on, substitutions]; failed flags
        self._state = torch.tensor([0, 1, 0], dtype=torch.int64).share_memory_()
        self._failed = torch.zeros(n, dtype=torch.int8).share_memory_()
        if verbose:
            self._log_report(cache_msg)

    # ------------------------------------------------------------------ scanning
    def _label_source(self, files: List[str]) -> Tuple[List[str], Path]:
        if self.json_file:
            return [self.json_file], Path(self.json_file).with_suffix(".cache")
        label_files = [F.img2label_path(f) for f in files]
        return label_files, Path(label_files[0]).parent.with_suffix(".cache")

    def _load_or_scan(self, files: List[str], nc: Optional[int], use_cache: bool):
        deps, cache_path = self._label_source(files)
        extra = (f"nc={nc}|json={self.json_file}|coco_ids={self.coco_ids}|"
                 f"tol={F.OUT_TOLERANCE}|min={F.MIN_BOX_PX}")
        key = F.files_hash(files + deps, extra) if use_cache else ""
        if use_cache:
            z = F.load_cache(cache_path, key)
            if z is not None:
                data = {k: z[k] for k in ("im_files", "shapes", "label_counts", "labels", "image_ids")}
                data["report"] = json.loads(str(z["report"]))
                data["nc"] = int(z["nc"])
                data["names"] = [str(s) for s in z["names"]]
                return data, "labels from cache"
        data = self._scan(files, nc)
        msg = "labels scanned"
        if use_cache:
            payload = {k: np.asarray(v) for k, v in data.items() if k not in ("report", "names")}
            payload["im_files"] = np.asarray(data["im_files"], dtype=str)
            payload["names"] = np.asarray(data["names"], dtype=str)
            payload["report"] = np.asarray(json.dumps(data["report"]))
            payload["key"] = np.asarray(key)
            payload["version"] = np.asarray(F.CACHE_VERSION)
            where = F.save_cache(cache_path, payload)
            msg += f", cache saved to {where}" if where else ", cache not writable (skipped)"
        return data, msg

    def _scan(self, files: List[str], nc: Optional[int]) -> Dict[str, Any]:
        if len(files) > 5000:
            LOGGER.info("%s: scanning %d images...", self.prefix, len(files))
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as ex:
            checked = list(ex.map(verify_image, files, chunksize=64))
        report: Dict[str, Any] = {
            "source": str(self.source), "images_found": len(files), "images": 0, "boxes": 0,
            "no_labels": 0, "corrupt_images": {}, "not_in_json": [], "json_size_mismatch": [],
            "boxes_clipped": 0, "boxes_dropped": {}, "label_issues": {}, "crowd_skipped": 0}
        counts: Dict[str, int] = {}
        im_files, shapes, labels, ids = [], [], [], []
        names: List[str] = []
        if self.json_file:
            cj = F.load_coco_json(self.json_file, self.coco_ids, nc)
            names = cj["names"]
            nc_eff = nc if nc is not None else len(cj["cat_to_cls"])
        else:
            nc_eff = nc
        for f, (shape, err) in zip(files, checked):
            if shape is None:
                report["corrupt_images"][f] = err
                continue
            if self.json_file:
                meta = cj["images"].get(os.path.basename(f))
                if meta is None:
                    report["not_in_json"].append(f)
                    continue
                jshape = (meta["height"], meta["width"])
                if jshape != shape:
                    report["json_size_mismatch"].append(f)
                lab, issues, c = F.coco_image_labels(cj["anns"].get(meta["id"], []),
                                                     cj["cat_to_cls"], nc_eff, jshape)
                status = "ok" if len(lab) or issues else "empty"
                where = f"{self.json_file}:{os.path.basename(f)}"
                iid = meta["id"]
            else:
                where = F.img2label_path(f)
                lab, issues, c, status = F.parse_yolo_label(where, nc_eff, shape)
                iid = None
            _add_counts(counts, c)
            if issues:
                report["label_issues"][where] = issues
            if status != "ok" or not len(lab):
                report["no_labels"] += 1
            im_files.append(f)
            shapes.append(shape)
            labels.append(lab)
            ids.append(iid)
        if not self.json_file:
            stems = [Path(f).stem for f in im_files]
            numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
            ids = [int(s) for s in stems] if numeric else list(range(len(im_files)))
        if nc_eff is None:
            nc_eff = int(max((int(l[:, 0].max()) for l in labels if len(l)), default=0)) + 1
        report["images"] = len(im_files)
        report["boxes"] = int(sum(len(l) for l in labels))
        report["boxes_clipped"] = counts.pop("clipped", 0)
        report["crowd_skipped"] = counts.pop("crowd", 0)
        report["boxes_dropped"] = {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("drop_")}
        report["unreadable_labels"] = counts.get("unreadable_label", 0)
        flat = np.concatenate(labels, 0) if labels else np.zeros((0, 5), np.float32)
        return {"im_files": im_files, "shapes": np.asarray(shapes, np.int64).reshape(-1, 2),
                "label_counts": np.asarray([len(l) for l in labels], np.int64),
                "labels": flat.astype(np.float32), "image_ids": np.asarray(ids, np.int64),
                "report": report, "nc": nc_eff, "names": names}

    def _log_report(self, cache_msg: str) -> None:
        r = self._report
        LOGGER.info("%s: %d images, %d boxes, %d images without objects (%s; %s)", self.prefix,
                    r["images"], r["boxes"], r["no_labels"], r["source"], cache_msg)
        lines = [f"{p}: corrupt image skipped ({why})" for p, why in r["corrupt_images"].items()]
        lines += [f"{p}: not in {self.json_file}, skipped" for p in r["not_in_json"]]
        lines += [f"{p}: size differs from {self.json_file}" for p in r["json_size_mismatch"]]
        lines += [f"{p}: {msg}" for p, msgs in r["label_issues"].items() for msg in msgs]
        if not lines and not r["boxes_clipped"]:
            return
        dropped = sum(r["boxes_dropped"].values())
        parts = [f"{len(r['corrupt_images'])} corrupt images skipped",
                 f"{dropped} labels dropped" + (f" {r['boxes_dropped']}" if dropped else ""),
                 f"{r['boxes_clipped']} boxes clipped to the image"]
        if self.json_file:
            parts.insert(1, f"{len(r['not_in_json'])} images not in the JSON")
        head = f"{self.prefix}: bad data: " + ", ".join(parts)
        shown = lines[:20]
        more = f"\n  ... and {len(lines) - 20} more (see dataset.bad_report)" if len(lines) > 20 else ""
        LOGGER.warning("%s%s%s", head, "".join(f"\n  {s}" for s in shown), more)

    @property
    def bad_report(self) -> Dict[str, Any]:
        """Scan report (counts + file names) plus live runtime substitutions:
        ``runtime_failures`` (images that failed to decode in ``__getitem__``) and
        ``substitutions`` (samples replaced by another one)."""
        r = dict(self._report)
        failed = torch.nonzero(self._failed).flatten().tolist()
        r["runtime_failures"] = [self.im_files[i] for i in failed]
        r["substitutions"] = int(self._state[2])
        return r

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int, total_epochs: Optional[int] = None) -> None:
        """Seed this epoch's augmentation; mosaic/mixup off in the last ``close`` =
        ``hyp.close_mosaic_epochs`` epochs (``epoch >= total_epochs - close``, 0-based), and only
        in runs longer than that (``total_epochs > close``): closing never covers a whole run
        (the official YOLOv6 check, ``epoch == epochs - close``, never fires in shorter runs)."""
        self._state[0] = int(epoch)
        self._state[1] = int(not mosaic_closed(epoch, total_epochs,
                                               int(self.hyp.get("close_mosaic_epochs", 0) or 0)))

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def mosaic_enabled(self) -> bool:
        return bool(self._state[1])

    @mosaic_enabled.setter
    def mosaic_enabled(self, value: bool) -> None:
        self._state[1] = int(bool(value))

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.im_files)

    def _load(self, index: int, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        """Decode image ``index``; on failure mark it, count it and substitute another one."""
        n = len(self)
        for _ in range(MAX_SUBSTITUTIONS):
            if not self._failed[index]:
                img = imread(self.im_files[index])
                if img is not None and img.size:
                    return img, index
                self._failed[index] = 1
                LOGGER.warning("%s: cannot read %s, substituting another sample (counted in "
                               "bad_report['runtime_failures'])", self.prefix, self.im_files[index])
            self._state[2] += 1
            index = int(rng.integers(n))
        raise BrokenDatasetError(f"{self.prefix}: {MAX_SUBSTITUTIONS} unreadable images in a row from "
                           f"{self.source}; the dataset is broken (see bad_report)")

    def _letterboxed(self, index: int, rng: np.random.Generator):
        img0, index = self._load(index, rng)
        h0, w0 = img0.shape[:2]
        img, (rh, rw), (pw, ph) = T.letterbox(img0, self.img_size, augment=self.augment)
        labels = T.normalized_to_pixels(self.labels[index], w0 * rw, h0 * rh, pw, ph)
        return img, labels, index, ((h0, w0), ((rh, rw), (pw, ph)))

    def _mosaic(self, index: int, rng: np.random.Generator):
        idx = [index] + [int(i) for i in rng.integers(0, len(self), 3)]
        imgs, labs, info = [], [], None
        for k, i in enumerate(idx):
            img0, i = self._load(i, rng)
            if k == 0:
                index = i
                h0, w0 = img0.shape[:2]
                _, ratio, pad = T.letterbox_params(h0, w0, self.img_size)
                info = ((h0, w0), (ratio, pad))
            imgs.append(T.resize_long_side(img0, self.img_size, augment=True))
            labs.append(self.labels[i])
        canvas, labels = T.mosaic4(imgs, labs, self.img_size, rng)
        h = self.hyp
        img, labels = T.random_affine(canvas, labels, (self.img_size, self.img_size), rng,
                                      h["degrees"], h["translate"], h["scale"], h["shear"])
        return img, labels, index, info

    def __getitem__(self, index: int):
        index = int(index)
        h = self.hyp
        if not self.augment:
            rng = np.random.default_rng((self.seed, 0, index))
            img, labels, index, info = self._letterboxed(index, rng)
        else:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if self.mosaic_enabled and h["mosaic"] > 0 and rng.random() < h["mosaic"]:
                img, labels, index, info = self._mosaic(index, rng)
                if h["mixup"] > 0 and rng.random() < h["mixup"]:
                    img2, labels2, _, _ = self._mosaic(int(rng.integers(len(self))), rng)
                    img, labels = T.mixup(img, labels, img2, labels2, rng)
            else:
                img, labels, index, info = self._letterboxed(index, rng)
                img, labels = T.random_affine(img, labels, img.shape[:2], rng, h["degrees"],
                                              h["translate"], h["scale"], h["shear"])
            T.augment_hsv(img, h["hsv_h"], h["hsv_s"], h["hsv_v"], rng)
            if h["flipud"] > 0 and rng.random() < h["flipud"]:
                img, labels = T.flip_ud(img, labels)
            if h["fliplr"] > 0 and rng.random() < h["fliplr"]:
                img, labels = T.flip_lr(img, labels)
        img = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
        return (torch.from_numpy(img), torch.from_numpy(np.asarray(labels, np.float32).reshape(-1, 5)),
                self.im_files[index], info)

    # ------------------------------------------------------------------ helpers
    def coco_gt(self) -> Dict[str, Any]:
        """COCO instances dict of this dataset's labels (ids = ``image_ids``, category ids =
        ``coco_ids`` or ``cls + 1``) for COCO evaluation when no JSON is given."""
        return F.to_coco_dict(self.im_files, self.image_ids, [tuple(s) for s in self.shapes0],
                              self.labels, self.names, self.coco_ids)
