"""Deterministic synthetic detection benchmark: textured shapes on cluttered backgrounds.

8 classes that differ by SHAPE (colours and textures are random per object): circle, square,
triangle, star, cross, ring, crescent, letter_L. (A hexagon was left out: at 10 px it cannot be
told from a circle.) Objects span ~10 px to ~35% of the image (a quarter of them "small",
10-24 px at 320; log-uniform sizes within each band), may occlude each other by at most
``max_occlusion`` of their area, and get boxes computed from their VISIBLE drawn pixels. Clutter: non-class blobs and lines; backgrounds: gradients, smooth noise,
stripes; per-image colour noise and occasional blur.

Every image is a pure function of ``(seed, split, index)``, so files are byte-identical across
runs and worker counts. Both label layouts are written::

    out/images/{train,val}/000001.jpg         out/labels/{train,val}/000001.txt  (YOLO)
    out/annotations/instances_{train,val}.json (COCO; image id = file number)
    out/synthetic.yaml                         (data YAML, paths relative to itself)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import cv2
import numpy as np

from .formats import to_coco_dict

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "letter_L")
SPLITS = {"train": 0, "val": 1}
_SHIFT = 4  # sub-pixel bits for cv2.fillPoly


@dataclass
class SyntheticSpec:
    """Difficulty knobs (sizes are fractions of the image side)."""
    min_objects: int = 2
    max_objects: int = 8
    min_size: float = 0.03  # ~10 px at 320
    max_size: float = 0.35
    small_size: float = 0.075  # "small" objects: min_size..small_size (~10-24 px at 320) ...
    small_fraction: float = 0.25  # ... drawn with this probability, else small_size..max_size
    max_occlusion: float = 0.4  # max fraction of an object hidden by later objects
    max_rotation: float = 25.0  # degrees
    aspect_jitter: float = 0.2  # width/height scaled by up to 1 +- this
    max_distractors: int = 6  # non-class blobs + lines per image (up to)
    noise_sigma: float = 8.0  # per-pixel Gaussian colour noise, up to
    blur_prob: float = 0.15
    min_contrast: float = 90.0  # L1 RGB distance object colour vs. local background
    ext: str = ".jpg"  # .jpg | .png
    jpeg_quality: int = 92


# ------------------------------------------------------------------------------ shapes
def _circle(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _regular(k: int, start: float = -90.0) -> np.ndarray:
    t = np.deg2rad(start + np.arange(k) * 360.0 / k)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = np.deg2rad(-90.0 + np.arange(2 * points) * 180.0 / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _cross(a: float = 0.33) -> np.ndarray:
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                     (-a, a), (-1, a), (-1, -a), (-a, -a)], np.float64)


_L = np.array([(-0.7, -1), (-0.12, -1), (-0.12, 0.42), (0.7, 0.42), (0.7, 1), (-0.7, 1)], np.float64)
_SQUARE = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float64)
# class -> list of (polygon, fill value): drawn in order (value 0 cuts holes)
SHAPES: Dict[str, List[Tuple[np.ndarray, int]]] = {
    "circle": [(_circle(), 255)],
    "square": [(_SQUARE * 0.9, 255)],
    "triangle": [(_regular(3) * 1.1 + (0, 0.2), 255)],
    "star": [(_star(), 255)],
    "cross": [(_cross(), 255)],
    "ring": [(_circle(), 255), (_circle() * 0.55, 0)],
    "crescent": [(_circle(), 255), (_circle() * 0.85 + (0.45, -0.1), 0)],
    "letter_L": [(_L, 255)],
}


def _transform(poly: np.ndarray, sx: float, sy: float, rot: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(rot), math.sin(rot)
    x, y = poly[:, 0] * sx, poly[:, 1] * sy
    return np.stack([c * x - s * y + cx, s * x + c * y + cy], 1)


def _fill(mask: np.ndarray, pts: np.ndarray, value: int) -> None:
    p = np.round(pts * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [p], int(value), lineType=cv2.LINE_AA, shift=_SHIFT)


# ------------------------------------------------------------------------------ textures
def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    kind = rng.integers(4)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.ogrid[0:s, 0:s]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy) / s - min(0, np.cos(a)) - min(0, np.sin(a))
        t = (t / max(float(t.max()), 1e-6))[..., None]
        img = c1.astype(np.float32) * (1 - t) + c2.astype(np.float32) * t
    elif kind == 1:  # smooth colour noise
        g = int(rng.integers(2, 7))
        small = np.clip(c1 + rng.uniform(-90, 90, (g, g, 3)), 0, 255).astype(np.float32)
        img = cv2.resize(small, (s, s), interpolation=cv2.INTER_CUBIC)
    elif kind == 2:  # stripes (soft, moderate contrast)
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 40)
        t = (0.5 + 0.5 * np.sin((np.cos(a) * xx + np.sin(a) * yy) * (2 * np.pi / period)))[..., None]
        c2 = np.clip(c1 + rng.uniform(-60, 60, 3), 0, 255)
        img = c1.astype(np.float32) * (1 - t) + c2.astype(np.float32) * t
    else:  # flat
        img = np.broadcast_to(c1, (s, s, 3))
    return np.ascontiguousarray(img, dtype=np.float32)


def _texture(rng: np.random.Generator, h: int, w: int, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    kind = rng.integers(5)
    if kind == 0:
        return np.broadcast_to(c1.astype(np.float32), (h, w, 3))
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    if kind == 1:  # stripes
        a, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
        t = (np.sin((np.cos(a) * xx + np.sin(a) * yy) * (2 * np.pi / period)) > 0).astype(np.float32)
    elif kind == 2:  # checker
        cell = rng.uniform(2, 7)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    elif kind == 3:  # gradient
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx / max(w, 1) + np.sin(a) * yy / max(h, 1)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:  # speckle
        t = rng.uniform(0, 1, (h, w)).astype(np.float32)
    t = t[..., None]
    return c1.astype(np.float32) * (1 - t) + c2.astype(np.float32) * t


def _object_colours(rng: np.random.Generator, refs: np.ndarray, min_l1: float
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Two texture colours that both differ from every local background colour in ``refs``
    by at least ``min_l1`` (L1 over RGB), so the whole silhouette stays visible."""
    best, best_d = None, -1.0
    for _ in range(24):
        c1 = rng.uniform(0, 255, 3)
        c2 = np.clip(c1 + rng.choice([-1, 1], 3) * rng.uniform(20, 50, 3), 0, 255)
        d = min(float(np.abs(refs - c1).sum(1).min()), float(np.abs(refs - c2).sum(1).min()))
        if d >= min_l1:
            return c1, c2
        if d > best_d:
            best, best_d = (c1, c2), d
    return best


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    rad = np.ones_like(t)
    for k in range(2, 6):
        rad += rng.uniform(0.08, 0.3) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    stretch = rng.uniform(1.6, 3.0)
    pts = np.stack([rad * np.cos(t) * stretch, rad * np.sin(t)], 1)
    return _transform(pts, r, r, rng.uniform(0, np.pi), cx, cy)


# ------------------------------------------------------------------------------ one image
def render_image(seed: int, split: int, index: int, size: int, spec: SyntheticSpec
                 ) -> Tuple[np.ndarray, List[Tuple[int, int, int, int, int, int]]]:
    """Render image ``index`` of ``split``; returns ``(BGR uint8 image, objects)`` with objects
    ``(cls, x1, y1, x2, y2, visible_area)`` in pixels (x2/y2 exclusive), boxes tight on the
    visible drawn pixels."""
    rng = np.random.default_rng((int(seed), int(split), int(index)))
    img = _background(rng, size)
    _draw_clutter(rng, img, size, spec)  # under the objects: irregular blobs and lines
    owner, objects = _draw_objects(rng, img, size, spec)
    out = _finish_image(rng, img, spec)
    return np.ascontiguousarray(out), _visible_boxes(owner, objects)


def _draw_clutter(rng, img: np.ndarray, s: int, spec: SyntheticSpec) -> None:
    n_clutter = int(rng.integers(0, spec.max_distractors + 1))
    for _ in range(n_clutter):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            r = rng.uniform(0.02, 0.08) * s
            pts = _blob(rng, rng.uniform(0, s), rng.uniform(0, s), r)
            x0, y0 = (max(0, int(v) - 1) for v in pts.min(0))
            x1, y1 = (min(s, int(v) + 2) for v in pts.max(0))
            if x1 <= x0 or y1 <= y0:
                continue
            layer = np.zeros((y1 - y0, x1 - x0), np.uint8)
            _fill(layer, pts - (x0, y0), 255)
            a = (layer.astype(np.float32) * (rng.uniform(0.4, 0.9) / 255))[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + np.asarray(colour, np.float32) * a
        else:
            p = rng.uniform(0, s, (int(rng.integers(2, 5)), 2))
            cv2.polylines(img, [np.round(p * (1 << _SHIFT)).astype(np.int32)], False, colour,
                          int(rng.integers(1, 3)), cv2.LINE_AA, _SHIFT)


def _draw_objects(rng, img: np.ndarray, s: int, spec: SyntheticSpec):
    """Draw the objects (each at most ``max_occlusion`` hidden by later ones); returns the
    per-pixel owner map and ``[(cls, (y0, x0, h, w))]``."""
    owner = np.full((s, s), -1, np.int16)
    full_area: List[int] = []  # drawn pixels per object
    visible: List[int] = []  # of those, not yet covered by later objects
    objects: List[Tuple[int, Tuple[int, int, int, int]]] = []  # (cls, patch box)
    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    lo, mid, hi = (math.log(f * s) for f in (spec.min_size, spec.small_size, spec.max_size))
    for _ in range(n_obj):
        cls = int(rng.integers(len(CLASSES)))
        side = math.exp(rng.uniform(lo, mid) if rng.random() < spec.small_fraction else
                        rng.uniform(mid, hi))  # log-uniform within each band
        jx, jy = 1 + rng.uniform(-spec.aspect_jitter, spec.aspect_jitter, 2)
        rot = math.radians(rng.uniform(-spec.max_rotation, spec.max_rotation))
        sx, sy = side / 2 * jx, side / 2 * jy
        half = int(math.ceil(1.6 * max(sx, sy))) + 2
        pw = 2 * half
        mask = np.zeros((pw, pw), np.uint8)
        for poly, val in SHAPES[CLASSES[cls]]:
            _fill(mask, _transform(poly, sx, sy, rot, half, half), val)
        ys, xs = np.nonzero(mask > 127)
        if len(ys) < 12:
            continue
        my0, my1, mx0, mx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        mask = mask[my0:my1, mx0:mx1]
        mh, mw = mask.shape
        if mh >= s or mw >= s:
            continue
        solid = mask > 127
        placed = False
        for _try in range(10):
            y0, x0 = int(rng.integers(0, s - mh + 1)), int(rng.integers(0, s - mw + 1))
            under = owner[y0:y0 + mh, x0:x0 + mw]
            hidden = np.bincount(under[solid & (under >= 0)], minlength=len(full_area))
            ok = True
            for k in np.nonzero(hidden)[0]:
                if visible[k] - hidden[k] < (1 - spec.max_occlusion) * full_area[k]:
                    ok = False
                    break
            if ok:
                placed = True
                break
        if not placed:
            continue
        region = img[y0:y0 + mh, x0:x0 + mw]
        hh, hw = (mh + 1) // 2, (mw + 1) // 2
        refs = [region[a:a + hh, b:b + hw][solid[a:a + hh, b:b + hw]] for a in (0, mh - hh)
                for b in (0, mw - hw)]
        refs = np.stack([r.mean(0) for r in refs if len(r)])  # local background colours
        c1, c2 = _object_colours(rng, refs, spec.min_contrast)
        tex = _texture(rng, mh, mw, c1, c2)
        a = (mask.astype(np.float32) / 255)[..., None]
        img[y0:y0 + mh, x0:x0 + mw] = region * (1 - a) + tex * a
        for k in np.nonzero(hidden)[0]:
            visible[k] -= int(hidden[k])
        under[solid] = len(full_area)
        full_area.append(int(solid.sum()))
        visible.append(full_area[-1])
        objects.append((cls, (y0, x0, mh, mw)))
    return owner, objects


def _finish_image(rng, img: np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """Thin lines over everything (minor occlusion, boxes unchanged), colour noise, gain
    jitter, occasional blur; RGB float -> BGR uint8."""
    s = img.shape[0]
    for _ in range(int(rng.integers(0, 3))):
        p = rng.uniform(0, s, (2, 2))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, tuple(np.round(p[0] * 16).astype(int)), tuple(np.round(p[1] * 16).astype(int)),
                 colour, 1, cv2.LINE_AA, 4)
    img *= rng.uniform(0.85, 1.15, 3).astype(np.float32)
    sigma = rng.uniform(0, spec.noise_sigma)
    if sigma > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    if rng.random() < spec.blur_prob:
        img = cv2.GaussianBlur(img, (3, 3), 0.7)
    img += 0.5
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)[..., ::-1]  # RGB -> BGR (OpenCV)
    return out


def _visible_boxes(owner: np.ndarray, objects) -> List[Tuple[int, int, int, int, int, int]]:
    labels = []
    for k, (cls, (y0, x0, mh, mw)) in enumerate(objects):
        vis = owner[y0:y0 + mh, x0:x0 + mw] == k
        ys, xs = np.nonzero(vis)
        if len(ys) < 12:
            continue
        labels.append((cls, x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1,
                       y0 + int(ys.max()) + 1, int(len(ys))))
    return labels


def _encode(img: np.ndarray, spec: SyntheticSpec) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(spec.jpeg_quality)] if spec.ext == ".jpg" else \
        [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(spec.ext, img, params)
    if not ok:  # pragma: no cover
        raise RuntimeError(f"cannot encode {spec.ext}")
    return buf.tobytes()


def _work(args) -> List[Tuple[int, list]]:
    out_dir, split, start, stop, size, seed, spec_dict = args
    spec = SyntheticSpec(**spec_dict)
    res = []
    for i in range(start, stop):
        img, labels = render_image(seed, SPLITS[split], i, size, spec)
        with open(os.path.join(out_dir, "images", split, f"{i + 1:06d}{spec.ext}"), "wb") as f:
            f.write(_encode(img, spec))
        res.append((i, labels))
    return res


def generate(out_dir: Union[str, os.PathLike], n_train: int = 2000, n_val: int = 200,
             size: int = 320, seed: int = 0, workers: Optional[int] = None,
             spec: Optional[SyntheticSpec] = None, **overrides) -> Path:
    """Write the synthetic dataset (both layouts) and its data YAML; return the YAML path.

    ``overrides`` are :class:`SyntheticSpec` fields. ``workers`` processes render in parallel
    (default: CPU count); output does not depend on it.
    """
    spec = dataclasses.replace(spec or SyntheticSpec(), **overrides)
    if spec.ext not in (".jpg", ".png"):
        raise ValueError(f"ext must be .jpg or .png, got {spec.ext!r}")
    if size < 64 or size % 32:
        raise ValueError(f"size must be a multiple of 32 >= 64, got {size}")
    out = Path(out_dir)
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    spec_dict = dataclasses.asdict(spec)
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("images", "labels"):
            d = out / sub / split
            d.mkdir(parents=True, exist_ok=True)
            for old in d.iterdir():  # a previous, larger run must not leave extra files
                if old.is_file() and old.suffix in (".jpg", ".png", ".txt"):
                    old.unlink()
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        chunk = max(1, min(64, -(-n // max(1, 4 * workers))))
        jobs = [(str(out), split, a, min(n, a + chunk), size, seed, spec_dict)
                for a in range(0, n, chunk)]
        if workers > 1 and n >= 64:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                results = [r for part in ex.map(_work, jobs) for r in part]
        else:
            results = [r for job in jobs for r in _work(job)]
        results.sort(key=lambda t: t[0])
        files, ids, shapes, norm = [], [], [], []
        for i, labels in results:
            lines = []
            rows = []
            for cls, x1, y1, x2, y2, _area in labels:
                cx, cy, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
                rows.append((cls, cx, cy, w, h))
            (out / "labels" / split / f"{i + 1:06d}.txt").write_text(
                "".join(line + "\n" for line in lines))
            files.append(f"{i + 1:06d}{spec.ext}")
            ids.append(i + 1)
            shapes.append((size, size))
            norm.append(np.array(rows, np.float64).reshape(-1, 5))
        coco = to_coco_dict(files, ids, shapes, norm, CLASSES)
        # exact integer boxes and visible-pixel areas (to_coco_dict rounds from normalised)
        k = 0
        for (i, labels) in results:
            for cls, x1, y1, x2, y2, area in labels:
                coco["annotations"][k]["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                coco["annotations"][k]["area"] = area
                k += 1
        coco["info"] = {"description": f"yolo_q synthetic shapes, split={split}, seed={seed}, "
                                       f"size={size}", "version": "1"}
        (out / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(coco, separators=(",", ":")))
    yaml_path = out / "synthetic.yaml"
    names = ", ".join(CLASSES)
    yaml_path.write_text(
        f"# Synthetic shapes benchmark: {n_train} train / {n_val} val images, {size}px, seed {seed}.\n"
        f"# Generated by: python datasets/synthetic.py --out {out_dir} --train {n_train} "
        f"--val {n_val} --size {size} --seed {seed}\n"
        f"# Both layouts exist: YOLO txt in labels/ (used for train) and COCO JSON in annotations/.\n"
        f"path: .\n"
        f"train: images/train\n"
        f"val: images/val\n"
        f"val_json: annotations/instances_val.json\n"
        f"nc: {len(CLASSES)}\n"
        f"names: [{names}]\n"
        f"coco_ids: [{', '.join(str(i + 1) for i in range(len(CLASSES)))}]\n")
    return yaml_path
