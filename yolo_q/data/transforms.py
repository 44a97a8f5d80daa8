"""Image/box transforms on BGR uint8 ``(H, W, 3)`` numpy images (OpenCV), labels ``(n, 5)``
float32 ``[cls, x1, y1, x2, y2]`` in pixels of the image they belong to.

Every random transform takes a ``numpy.random.Generator`` so that a sample's augmentation is a
pure function of its seed (see :class:`yolo_q.data.dataset.DetectionDataset`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

PAD_VALUE = 114
ShapeInfo = Tuple[Tuple[int, int], Tuple[Tuple[float, float], Tuple[float, float]]]


def resize_long_side(img: np.ndarray, size: int, augment: bool = False) -> np.ndarray:
    """Resize so that the longer side is ``size`` (aspect kept). Linear interpolation, or area
    interpolation when shrinking without augmentation."""
    h0, w0 = img.shape[:2]
    r = size / max(h0, w0)
    if r == 1:
        return img
    w, h = max(1, round(w0 * r)), max(1, round(h0 * r))
    interp = cv2.INTER_AREA if (r < 1 and not augment) else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def letterbox_params(h0: int, w0: int, size: int
                     ) -> Tuple[Tuple[int, int], Tuple[float, float], Tuple[float, float]]:
    """Geometry of :func:`letterbox`: ``((h, w) resized, (ratio_h, ratio_w), (pad_w, pad_h))``."""
    r = size / max(h0, w0)
    h, w = max(1, round(h0 * r)), max(1, round(w0 * r))
    return (h, w), (h / h0, w / w0), (float((size - w) // 2), float((size - h) // 2))


def letterbox(img: np.ndarray, size: int, color: int = PAD_VALUE, augment: bool = False
              ) -> Tuple[np.ndarray, Tuple[float, float], Tuple[float, float]]:
    """Resize to fit a ``size x size`` square (aspect kept, up- or down-scaling) and pad
    centrally with ``color``.

    Returns ``(img, (ratio_h, ratio_w), (pad_w, pad_h))`` where the ratios are the exact
    resized/original side ratios and pads the left/top padding in pixels, so that
    ``orig = (letterboxed - pad) / ratio``.
    """
    (h, w), ratio, (pw, ph) = letterbox_params(img.shape[0], img.shape[1], size)
    img = resize_long_side(img, size, augment)
    assert img.shape[:2] == (h, w)
    if (h, w) != (size, size):
        left, top = int(pw), int(ph)
        img = cv2.copyMakeBorder(img, top, size - h - top, left, size - w - left,
                                 cv2.BORDER_CONSTANT, value=(color, color, color))
    return img, ratio, (pw, ph)


def normalized_to_pixels(labels: np.ndarray, w: float, h: float, padw: float = 0.0,
                         padh: float = 0.0) -> np.ndarray:
    """``[cls, cx, cy, w, h]`` normalised -> ``[cls, x1, y1, x2, y2]`` pixels of a ``w x h``
    image placed at offset ``(padw, padh)``."""
    out = np.zeros((len(labels), 5), np.float32)
    if len(labels):
        out[:, 0] = labels[:, 0]
        out[:, 1] = w * (labels[:, 1] - labels[:, 3] / 2) + padw
        out[:, 2] = h * (labels[:, 2] - labels[:, 4] / 2) + padh
        out[:, 3] = w * (labels[:, 1] + labels[:, 3] / 2) + padw
        out[:, 4] = h * (labels[:, 2] + labels[:, 4] / 2) + padh
    return out


def unletterbox_boxes(boxes: np.ndarray, shape_info: ShapeInfo, clip: bool = True) -> np.ndarray:
    """Map ``(n, 4)`` xyxy boxes from the letterboxed image back to original pixels."""
    (h0, w0), ((rh, rw), (pw, ph)) = shape_info
    b = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    b[:, [0, 2]] = (b[:, [0, 2]] - pw) / rw
    b[:, [1, 3]] = (b[:, [1, 3]] - ph) / rh
    if clip:
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w0)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h0)
    return b


def augment_hsv(img: np.ndarray, hgain: float, sgain: float, vgain: float,
                rng: np.random.Generator) -> np.ndarray:
    """Random hue/saturation/value gains (in place, BGR) via lookup tables."""
    if not (hgain or sgain or vgain):
        return img
    r = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * r[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)
    return img


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2.0,
                   ar_thr: float = 20.0, area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Boolean mask of transformed boxes worth keeping: sides > ``wh_thr`` px, aspect ratio <
    ``ar_thr`` and area > ``area_thr`` of the (scaled) box before the transform.
    ``before``/``after`` are ``(n, 4)`` xyxy; ``before`` already scaled by the affine scale."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def affine_matrix(in_size: Tuple[int, int], out_size: Tuple[int, int], degrees: float,
                  translate: float, scale: float, shear: float, rng: np.random.Generator,
                  center: Optional[Tuple[float, float]] = None) -> Tuple[np.ndarray, float]:
    """3x3 matrix: move ``center`` (default: input centre) to the origin, rotate+scale, shear,
    then translate to the output centre +- ``translate`` * output size. Returns ``(M, s)``."""
    (hi, wi), (ho, wo) = in_size, out_size
    cx, cy = center if center is not None else (wi / 2, hi / 2)
    C = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    a = rng.uniform(-degrees, degrees) if degrees else 0.0
    s = rng.uniform(1 - scale, 1 + scale) if scale else 1.0
    R = np.eye(3)
    R[:2] = cv2.getRotationMatrix2D((0, 0), a, s)
    S = np.eye(3)
    if shear:
        S[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
        S[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    T = np.eye(3)
    T[0, 2] = (rng.uniform(0.5 - translate, 0.5 + translate) if translate else 0.5) * wo
    T[1, 2] = (rng.uniform(0.5 - translate, 0.5 + translate) if translate else 0.5) * ho
    return T @ S @ R @ C, s


def transform_boxes(labels: np.ndarray, M: np.ndarray, s: float, out_size: Tuple[int, int]
                    ) -> np.ndarray:
    """Apply ``M`` to the 4 corners of each box, take the enclosing box, clip to the output and
    drop boxes that became too small/thin (:func:`box_candidates`)."""
    if not len(labels):
        return np.zeros((0, 5), np.float32)
    ho, wo = out_size
    n = len(labels)
    xy = np.ones((n * 4, 3))
    xy[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)
    xy = (xy @ M.T)[:, :2].reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    new = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, wo)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, ho)
    keep = box_candidates(labels[:, 1:5] * s, new)
    out = np.concatenate([labels[keep, :1], new[keep]], 1)
    return out.astype(np.float32)


def random_affine(img: np.ndarray, labels: np.ndarray, out_size: Tuple[int, int],
                  rng: np.random.Generator, degrees: float = 0.0, translate: float = 0.1,
                  scale: float = 0.5, shear: float = 0.0,
                  center: Optional[Tuple[float, float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation in ONE ``cv2.warpAffine`` to ``out_size`` (h, w);
    boxes follow, are clipped and filtered."""
    M, s = affine_matrix(img.shape[:2], out_size, degrees, translate, scale, shear, rng, center)
    ho, wo = out_size
    if img.shape[:2] != (ho, wo) or not np.allclose(M, np.eye(3)):
        img = cv2.warpAffine(img, M[:2], dsize=(wo, ho), flags=cv2.INTER_LINEAR,
                             borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    return img, transform_boxes(labels, M, s, out_size)


def mosaic4(imgs: Sequence[np.ndarray], labels: Sequence[np.ndarray], size: int,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Tile 4 images (each already resized to long side ``size``) around a random centre of a
    ``2*size`` canvas filled with 114. ``labels[i]`` are normalised ``cls cx cy w h`` of image
    ``i``; returns the canvas and ``[cls, x1, y1, x2, y2]`` canvas pixels (clipped)."""
    s = size
    canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, np.uint8)
    yc, xc = (int(rng.uniform(0.5 * s, 1.5 * s)) for _ in range(2))
    out = []
    for i, (img, lab) in enumerate(zip(imgs, labels)):
        h, w = img.shape[:2]
        if i == 0:  # top left: image's bottom-right corner at the centre
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        out.append(normalized_to_pixels(lab, w, h, x1a - x1b, y1a - y1b))
    lab = np.concatenate(out, 0) if out else np.zeros((0, 5), np.float32)
    lab[:, 1:] = lab[:, 1:].clip(0, 2 * s)
    return canvas, lab


def mixup(img1: np.ndarray, labels1: np.ndarray, img2: np.ndarray, labels2: np.ndarray,
          rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Blend two equally sized images with ratio ~ Beta(32, 32); labels are concatenated."""
    r = rng.beta(32.0, 32.0)
    img = cv2.addWeighted(img1, r, img2, 1.0 - r, 0.0)
    return img, np.concatenate([labels1, labels2], 0)


def flip_lr(img: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    img = np.ascontiguousarray(img[:, ::-1])
    labels = labels.copy()
    labels[:, [1, 3]] = w - labels[:, [3, 1]]
    return img, labels


def flip_ud(img: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    h = img.shape[0]
    img = np.ascontiguousarray(img[::-1])
    labels = labels.copy()
    labels[:, [2, 4]] = h - labels[:, [4, 2]]
    return img, labels
