"""Dataset formats: the data YAML, image lists, YOLO txt labels, COCO JSON annotations and the
label cache.

Labels everywhere in :mod:`yolo_q.data` are float32 arrays ``(n, 5)`` = ``cls cx cy w h``
normalised to the ORIGINAL image (the YOLO txt convention); COCO JSON boxes are converted to it.

Bad labels are never fatal: :func:`check_boxes` clips boxes slightly outside the image, drops
degenerate / far-outside / wrong-class / malformed ones, and returns human-readable issues that
the dataset counts and reports once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import yaml

from ..io import write_bytes_atomic

LOGGER = logging.getLogger("yolo_q.data")
PathLike = Union[str, os.PathLike]
IMG_FORMATS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CACHE_VERSION = 2  # 2: BOM-tolerant labels, COCO JSON id/category checks
OUT_TOLERANCE = 0.05  # boxes up to 5% of the image beyond an edge are clipped, beyond: dropped
ROUNDING_TOLERANCE = 1e-3  # clipping by less than this (normalised) is rounding, not counted
MIN_BOX_PX = 0.5  # boxes narrower/shorter than this (original pixels, after clipping) are dropped


class DataError(ValueError):
    """A data YAML or dataset is invalid; the message names the file and key/path."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset path (folder, list, annotation file) does not exist; names the path."""


# --------------------------------------------------------------------------------------------
# data YAML
# --------------------------------------------------------------------------------------------
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_env(text: str) -> str:
    """Expand ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` (default used when VAR is unset or
    empty). Relative values taken from the environment are made absolute w.r.t. the cwd."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        val = os.environ.get(name, "")
        if val:
            return os.path.abspath(os.path.expanduser(val))
        if m.group(2) is not None:
            return m.group(2)
        return m.group(0)
    return _ENV_RE.sub(sub, text)


def _read_data_mapping(yaml_file: Path) -> Dict[str, Any]:
    """The data YAML's mapping, with known keys and the required ones (one-line errors)."""
    try:
        with open(yaml_file, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise DataNotFoundError(f"{yaml_file}: data YAML not found") from None
    except yaml.YAMLError as e:
        raise DataError(f"{yaml_file}: YAML syntax error: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{yaml_file}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{yaml_file}: cannot read data YAML ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{yaml_file}: top level must be a mapping with keys train, val, nc, names")
    known = {"path", "train", "val", "test", "nc", "names", "train_json", "val_json", "test_json",
             "coco_ids", "download"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DataError(f"{yaml_file}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    for key in ("train", "val", "names"):
        if raw.get(key) in (None, "", []):
            raise DataError(f"{yaml_file}: missing required key '{key}'")
    return raw


def _data_classes(raw: Dict[str, Any], yaml_file: Path):
    """``(names, nc, coco_ids)`` checked against each other."""
    names = raw["names"]
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{yaml_file}: key 'names': dict keys must be class indices") from None
        if keys != list(range(len(keys))):
            raise DataError(f"{yaml_file}: key 'names': indices must be 0..{len(keys) - 1}")
        names = [str(names[k] if k in names else names[str(k)]) for k in keys]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        raise DataError(f"{yaml_file}: key 'names' must be a list or a mapping index -> name")
    nc = raw.get("nc", len(names))
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise DataError(f"{yaml_file}: key 'nc' must be a positive integer, got {nc!r}")
    if len(names) != nc:
        raise DataError(f"{yaml_file}: key 'names' has {len(names)} entries but nc={nc}")
    coco_ids = raw.get("coco_ids")
    if coco_ids is not None and not isinstance(coco_ids, str):
        coco_ids = _check_coco_ids(coco_ids, nc, f"{yaml_file}: key 'coco_ids'")
    return names, nc, coco_ids


def _data_root(raw: Dict[str, Any], yaml_file: Path, root, check: bool) -> Path:
    """The dataset root: ``root`` (e.g. ``data.root``) else the YAML's ``path`` (relative to
    the YAML's folder), environment variables expanded."""
    base = yaml_file.parent
    if root is not None and str(root) != "":
        droot = Path(expand_env(str(root))).expanduser()
        droot = droot if droot.is_absolute() else Path.cwd() / droot
    else:
        droot = Path(expand_env(str(raw.get("path") or ".")))
        droot = droot if droot.is_absolute() else base / droot
    droot = Path(os.path.normpath(droot))
    if check and not os.path.isdir(droot):  # os.path: False (not OSError) on e.g. long names
        src = "data.root override" if root else "key 'path'"
        raise DataNotFoundError(f"{yaml_file}: {src}: dataset root not found: {droot} "
                                f"(set YOLOQ_DATA_ROOT or data.root to relocate it)")
    return droot


def load_data_yaml(path: PathLike, root: Optional[PathLike] = None, check: bool = True) -> Dict[str, Any]:
    """Read and validate a data YAML; return a dict with absolute paths.

    Keys: ``path`` (dataset root; optional, default the YAML's folder; relative -> against the
    YAML's folder; ``${VAR:-default}`` expanded), ``train``, ``val`` (image folders, ``.txt``
    lists, or lists of those; relative -> against ``path``), ``nc``, ``names`` (list or
    ``{index: name}``), optional ``train_json``/``val_json`` (COCO instances JSON; when given the
    labels come from it), optional ``coco_ids`` (class index -> COCO category id).

    ``root`` (e.g. ``cfg.data.root``) replaces the YAML's ``path``. With ``check`` every path
    must exist, else :class:`DataNotFoundError` naming the YAML, the key and the path.
    Returned extra key: ``yaml_file``.
    """
    yaml_file = Path(path).expanduser().resolve()
    raw = _read_data_mapping(yaml_file)
    names, nc, coco_ids = _data_classes(raw, yaml_file)
    droot = _data_root(raw, yaml_file, root, check)

    def resolve(key: str) -> Union[None, str, List[str]]:
        val = raw.get(key)
        if val in (None, ""):
            return None
        vals = val if isinstance(val, (list, tuple)) else [val]
        out = []
        for v in vals:
            p = Path(expand_env(str(v))).expanduser()
            p = Path(os.path.normpath(p if p.is_absolute() else droot / p))
            if check and not os.path.exists(p):
                raise DataNotFoundError(f"{yaml_file}: key '{key}': path not found: {p}")
            out.append(str(p))
        return out if isinstance(val, (list, tuple)) else out[0]

    if isinstance(coco_ids, str):  # a file (as coco80_to_91.txt), relative to the root
        ids_file = resolve("coco_ids")
        coco_ids = (read_coco_ids(ids_file, nc, f"{yaml_file}: key 'coco_ids'")
                    if check or os.path.isfile(ids_file) else None)
    info = {"yaml_file": str(yaml_file), "path": str(droot), "nc": nc, "names": names,
            "coco_ids": coco_ids}
    for key in ("train", "val", "test", "train_json", "val_json", "test_json"):
        info[key] = resolve(key)
    return info


def _check_coco_ids(ids: Any, nc: Optional[int], where: str) -> List[int]:
    """``ids`` as a list of ``nc`` distinct integers, else :class:`DataError` at ``where``."""
    if (not isinstance(ids, (list, tuple)) or (nc is not None and len(ids) != nc)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        n = f"{nc} " if nc is not None else ""
        raise DataError(f"{where} must be a list of {n}integers (class index -> COCO category "
                        f"id), or a file of them")
    if len(set(ids)) != len(ids):
        raise DataError(f"{where} has duplicate category ids")
    return [int(i) for i in ids]


def read_coco_ids(path: PathLike, nc: Optional[int] = None, where: Optional[str] = None
                  ) -> List[int]:
    """Class index -> COCO category id from a file: ``<class> <id>`` per line (as
    ``coco80_to_91.txt``) or one id per line (line order = class index), ``#`` comments; or a
    ``.json`` list / ``{class: id}`` mapping. Classes must be ``0..n-1`` (``n == nc`` when
    given), ids distinct. Errors name the file (and ``where``, e.g. the data YAML key)."""
    path = Path(path)
    where = f"{where}: {path}" if where else str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataNotFoundError(f"{where}: class map file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot read the class map ({type(e).__name__}: {e})") from None
    pairs: Dict[int, int] = {}
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if isinstance(obj, dict):
            try:
                pairs = {int(k): v for k, v in obj.items()}
            except ValueError:
                raise DataError(f"{where}: keys must be class indices") from None
            obj = [pairs[k] for k in sorted(pairs)] if sorted(pairs) == list(range(len(pairs))) \
                else None
        if obj is None:
            raise DataError(f"{where}: class indices must be 0..{len(pairs) - 1}")
        return _check_coco_ids(obj, nc, where)
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split("#")[0].split()
        if not parts:
            continue
        try:
            if len(parts) == 2:
                cls, cid = int(parts[0]), int(parts[1])
            elif len(parts) == 1:
                cls, cid = len(pairs), int(parts[0])
            else:
                raise ValueError
        except ValueError:
            raise DataError(f"{where}:{n}: expected '<class> <category id>' or '<category id>', "
                            f"got {line.strip()!r}") from None
        if cls in pairs:
            raise DataError(f"{where}:{n}: class {cls} is mapped twice")
        pairs[cls] = cid
    if sorted(pairs) != list(range(len(pairs))):
        raise DataError(f"{where}: class indices must be 0..{len(pairs) - 1}")
    return _check_coco_ids([pairs[k] for k in range(len(pairs))], nc, where)


def check_model_nc(model: Any, data_nc: Optional[int], model_src: Any, data_src: Any) -> None:
    """The one check that a model predicts the dataset's classes, used by every entry point that
    puts a model on a dataset (eval on every backend, PTQ, QAT, export).

    ``model``: a class count, or anything with ``nc`` (a model, an eval backend: an ONNX / TensorRT
    graph's output channels - 5) or ``detect.nc``; None / unknown counts are not checked (e.g.
    end-to-end NMS graphs). Raises :class:`DataError` naming both sources and both counts."""
    nc = model if isinstance(model, int) and not isinstance(model, bool) else \
        getattr(model, "nc", None)
    if nc is None:
        nc = getattr(getattr(model, "detect", None), "nc", None)
    if nc is None or data_nc is None or int(nc) == int(data_nc):
        return
    raise DataError(f"{model_src} predicts {int(nc)} classes but the dataset {data_src} has "
                    f"nc={int(data_nc)}: use the data YAML the model was trained on (data.dataset "
                    f"/ --data), or train/fine-tune the model for these {int(data_nc)} classes")


# --------------------------------------------------------------------------------------------
# image lists and label paths
# --------------------------------------------------------------------------------------------
def img2label_path(img_path: PathLike) -> str:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (last ``/images/`` replaced)."""
    p = str(img_path)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    i = p.rfind(sa)
    if i >= 0:
        p = p[:i] + sb + p[i + len(sa):]
    return os.path.splitext(p)[0] + ".txt"


def list_images(source: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """Sorted absolute image paths from a folder (recursive), a ``.txt`` list (one path per
    line, relative lines against the list's folder) or a list of those. Missing -> error."""
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    files: List[str] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files += [str(f) for f in p.rglob("*") if f.suffix.lower() in IMG_FORMATS and f.is_file()]
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    f = Path(line).expanduser()
                    files.append(str(f if f.is_absolute() else p.parent / f))
        elif p.is_file() and p.suffix.lower() in IMG_FORMATS:
            files.append(str(p))
        else:
            raise DataNotFoundError(f"dataset path not found: {p}" if not p.exists() else
                                    f"dataset path is not an image folder, .txt list or image: {p}")
    files = sorted({os.path.normpath(os.path.abspath(f)) for f in files
                    if os.path.splitext(f)[1].lower() in IMG_FORMATS})
    return files


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------
def check_boxes(cls: np.ndarray, xyxy: np.ndarray, nc: Optional[int], shape: Tuple[int, int],
                where: Sequence[str], issues: List[str], counts: Dict[str, int],
                kept: Optional[List[int]] = None) -> np.ndarray:
    """Validate normalised boxes; return kept labels ``(n,5)`` ``cls cx cy w h``.

    ``xyxy`` normalised corners, ``shape`` (h, w) of the image (for the pixel-size threshold),
    ``where[i]`` names the row in messages. Appends messages to ``issues`` and increments
    ``counts`` keys ``clipped`` and ``drop_<reason>``; ``kept`` (optional) gets the indices of
    the kept rows.
    """
    h, w = shape
    keep: List[np.ndarray] = []
    seen = set()
    for i in range(len(cls)):
        c = cls[i]
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        reason = None
        if not np.isfinite([c, x1, y1, x2, y2]).all():
            reason, msg = "non_numeric", "non-finite value"
        elif c != int(c) or c < 0 or (nc is not None and c >= nc):
            reason, msg = "bad_class", f"class {c:g} not in 0..{(nc - 1) if nc else '?'}"
        elif x2 <= x1 or y2 <= y1:
            reason, msg = "degenerate", "zero or negative width/height"
        elif min(x1, y1) < -OUT_TOLERANCE or max(x2, y2) > 1 + OUT_TOLERANCE:
            reason, msg = "out_of_image", "box outside the image (not normalised?)"
        if reason is None:
            cx1, cy1, cx2, cy2 = min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0), \
                min(max(x2, 0.0), 1.0), min(max(y2, 0.0), 1.0)
            if (cx2 - cx1) * w < MIN_BOX_PX or (cy2 - cy1) * h < MIN_BOX_PX:
                reason, msg = "degenerate", f"box smaller than {MIN_BOX_PX} px after clipping"
            elif max(-x1, -y1, x2 - 1, y2 - 1) > ROUNDING_TOLERANCE:
                counts["clipped"] = counts.get("clipped", 0) + 1
        if reason is None:
            row = (int(c), (cx1 + cx2) / 2, (cy1 + cy2) / 2, cx2 - cx1, cy2 - cy1)
            key = tuple(np.float32(row))
            if key in seen:
                reason, msg = "duplicate", "duplicate box"
            else:
                seen.add(key)
                keep.append(np.array(row, np.float32))
                if kept is not None:
                    kept.append(i)
                continue
        counts[f"drop_{reason}"] = counts.get(f"drop_{reason}", 0) + 1
        issues.append(f"{where[i]}: {msg}, dropped")
    return np.stack(keep) if keep else np.zeros((0, 5), np.float32)


def parse_yolo_label(path: PathLike, nc: Optional[int], shape: Tuple[int, int]
                     ) -> Tuple[np.ndarray, List[str], Dict[str, int], str]:
    """Parse a YOLO txt label file (``cls cx cy w h`` normalised per line).

    Returns ``(labels (n,5) float32, issues, counts, status)`` with status ``ok`` | ``missing``
    | ``empty``. A missing or empty file is a valid image without objects. Lines with a wrong
    column count or non-numbers are dropped and reported, as are invalid boxes (see
    :func:`check_boxes`).
    """
    issues: List[str] = []
    counts: Dict[str, int] = {}
    try:
        # utf-8-sig: a BOM (Windows editors) is not part of the first line's class index
        text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        return np.zeros((0, 5), np.float32), issues, counts, "missing"
    except OSError as e:
        issues.append(f"unreadable label file ({e.strerror}), image used without objects")
        counts["unreadable_label"] = 1
        return np.zeros((0, 5), np.float32), issues, counts, "missing"
    rows, where = [], []
    for ln, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            counts["drop_bad_columns"] = counts.get("drop_bad_columns", 0) + 1
            issues.append(f"line {ln}: {len(parts)} columns (expected 5: cls cx cy w h), dropped")
            continue
        try:
            rows.append([float(v) for v in parts])
        except ValueError:
            counts["drop_non_numeric"] = counts.get("drop_non_numeric", 0) + 1
            issues.append(f"line {ln}: not numeric, dropped")
            continue
        where.append(f"line {ln}")
    if not rows:
        return np.zeros((0, 5), np.float32), issues, counts, "empty" if not issues else "ok"
    a = np.array(rows, np.float64)
    xyxy = np.stack([a[:, 1] - a[:, 3] / 2, a[:, 2] - a[:, 4] / 2,
                     a[:, 1] + a[:, 3] / 2, a[:, 2] + a[:, 4] / 2], 1)
    labels = check_boxes(a[:, 0], xyxy, nc, shape, where, issues, counts)
    return labels, issues, counts, "ok"


def _category_id(v: Any) -> Optional[int]:
    """An annotation's ``category_id`` as an int, None when it is not an integer (then the box is
    dropped as a bad class)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        return None
    return int(v)


def _bbox_numbers(bb: Any) -> Optional[Tuple[float, float, float, float]]:
    """``[x, y, w, h]`` as four floats, None when it is not four (finite or not) numbers."""
    if not isinstance(bb, (list, tuple)) or len(bb) != 4:
        return None
    if any(isinstance(v, (bool, str)) for v in bb):
        return None
    try:
        x, y, w, h = (float(v) for v in bb)
    except (TypeError, ValueError, OverflowError):
        return None
    return x, y, w, h


def _read_coco_dict(json_file: Path) -> Dict[str, Any]:
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise DataNotFoundError(f"COCO annotation file not found: {json_file}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_file}: not valid JSON ({e})") from None
    except (OSError, RecursionError) as e:
        raise DataError(f"{json_file}: cannot read COCO annotations ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or "images" not in d:
        raise DataError(f"{json_file}: not a COCO instances file (no 'images' key)")
    return d


def _coco_entries(d: Dict[str, Any], json_file: Path, key: str, required: Sequence[str]
                  ) -> List[dict]:
    items = d.get(key, [])
    if not isinstance(items, list):
        raise DataError(f"{json_file}: '{key}' must be a list, got {type(items).__name__}")
    for i, it in enumerate(items):
        missing = [k for k in required if not isinstance(it, dict) or k not in it]
        if missing:
            raise DataError(f"{json_file}: {key}[{i}]: missing {', '.join(missing)}")
    return items


def _coco_integer(json_file: Path, v: Any, where: str, minimum: Optional[int] = None) -> int:
    try:
        n = int(v) if not isinstance(v, (bool, dict, list)) else None
    except (TypeError, ValueError, OverflowError):
        n = None
    if n is None or (minimum is not None and n < minimum):
        raise DataError(f"{json_file}: {where} must be an integer"
                        f"{f' >= {minimum}' if minimum is not None else ''}, got {v!r}")
    return n


def _coco_ident(json_file: Path, v: Any, where: str) -> int:
    """Integer ids (also as integral floats or digit strings): the dataset and the evaluator
    store image ids as int64."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    elif isinstance(v, str) and v.strip().lstrip("-").isdigit() and v.strip().isascii():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not -2**63 <= v < 2**63:
        raise DataError(f"{json_file}: {where} must be an integer id, got {v!r}")
    return v


def _coco_categories(d, json_file: Path, coco_ids, nc) -> Tuple[Dict[int, int], List[str],
                                                                  Dict[int, int]]:
    """``(cat_to_cls, names, first)``: category id -> class, class names, id -> its index."""
    cats = _coco_entries(d, json_file, "categories", ("id",))
    cat_ids = [_coco_integer(json_file, c["id"], f"categories[{i}].id")
               for i, c in enumerate(cats)]
    first: Dict[Any, int] = {}
    for i, cid in enumerate(cat_ids):
        if cid in first:
            raise DataError(f"{json_file}: categories[{i}].id {cid} is also categories"
                            f"[{first[cid]}].id; category ids must be unique")
        first[cid] = i
    if coco_ids is not None:
        missing = [int(c) for c in coco_ids if int(c) not in first]
        if missing:
            raise DataError(f"{json_file}: 'categories' lacks category id(s) {missing[:8]} that "
                            f"coco_ids maps classes to ({len(cats)} categories, "
                            f"{len(coco_ids)} classes)")
        cat_to_cls = {int(cid): i for i, cid in enumerate(coco_ids)}
    else:
        if nc is not None and len(cat_ids) != nc:
            raise DataError(f"{json_file}: {len(cat_ids)} categories but the dataset has nc={nc} "
                            f"classes; list all {nc} categories, or map classes to category ids "
                            f"with coco_ids in the data YAML")
        cat_to_cls = {cid: i for i, cid in enumerate(sorted(cat_ids))}
    id2name = {cid: str(c.get("name", cid)) for cid, c in zip(cat_ids, cats)}
    names = [id2name.get(cid, str(cid)) for cid, _ in sorted(cat_to_cls.items(), key=lambda t: t[1])]
    return cat_to_cls, names, first


def _coco_images(d, json_file: Path) -> Dict[str, Dict[str, Any]]:
    """``{file_name: {"id", "width", "height"}}``; duplicate ids or file names are refused."""
    images: Dict[str, Dict[str, Any]] = {}
    by_id: Dict[int, int] = {}
    by_name: Dict[str, int] = {}
    for i, im in enumerate(_coco_entries(d, json_file, "images",
                                         ("id", "file_name", "width", "height"))):
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DataError(f"{json_file}: images[{i}].file_name must be a non-empty string")
        iid = _coco_ident(json_file, im["id"], f"images[{i}].id")
        if iid in by_id:  # the second image would get the first one's boxes
            raise DataError(f"{json_file}: images[{i}].id {iid} is also images[{by_id[iid]}].id; "
                            f"image ids must be unique")
        base = os.path.basename(im["file_name"])
        if base in by_name:  # images are matched to files by name
            raise DataError(f"{json_file}: images[{i}].file_name {base!r} is also images"
                            f"[{by_name[base]}].file_name; file names must be unique")
        by_id[iid], by_name[base] = i, i
        images[base] = {
            "id": iid,
            "width": _coco_integer(json_file, im["width"], f"images[{i}].width", minimum=1),
            "height": _coco_integer(json_file, im["height"], f"images[{i}].height", minimum=1)}
    return images


def load_coco_json(json_file: PathLike, coco_ids: Optional[Sequence[int]] = None,
                   nc: Optional[int] = None) -> Dict[str, Any]:
    """Read a COCO instances JSON.

    Category ids map to contiguous class indices: through ``coco_ids`` (index -> id) when
    given, else in sorted id order. Returns ``{"images": {file_name: {"id", "width", "height"}},
    "anns": {image_id: [ann, ...]}, "cat_to_cls": {id: cls}, "names": [...] }``.

    Rejected with a :class:`DataError` naming the file (these would silently mislabel images or
    mis-score a model): two images with the same id or the same file name; duplicate category
    ids; an annotation whose (integer) ``category_id`` is not in ``categories``; ``coco_ids``
    that are not all in ``categories``; without ``coco_ids``, a number of categories other than
    ``nc`` (the data YAML's).
    """
    json_file = Path(json_file)
    d = _read_coco_dict(json_file)
    cat_to_cls, names, first = _coco_categories(d, json_file, coco_ids, nc)
    images = _coco_images(d, json_file)
    anns: Dict[Any, list] = {}
    for i, a in enumerate(_coco_entries(d, json_file, "annotations", ("image_id",))):
        cid = _category_id(a.get("category_id"))
        if cid is not None and cid not in first:
            more = "..." if len(first) > 8 else ""
            raise DataError(f"{json_file}: annotations[{i}].category_id {cid} is not in "
                            f"'categories' (ids {sorted(first)[:8]}{more})")
        image_id = _coco_ident(json_file, a["image_id"], f"annotations[{i}].image_id")
        anns.setdefault(image_id, []).append(a)
    return {"images": images, "anns": anns, "cat_to_cls": cat_to_cls, "names": names}


def coco_image_labels(anns: Sequence[dict], cat_to_cls: Dict[int, int], nc: Optional[int],
                      shape: Tuple[int, int], kept: Optional[List[int]] = None
                      ) -> Tuple[np.ndarray, List[str], Dict[str, int]]:
    """Convert one image's COCO annotations (bbox ``x y w h`` pixels of ``shape`` = (h, w)) to
    labels ``(n,5)``; ``iscrowd`` regions are skipped (counted as ``crowd``). ``kept``
    (optional) gets the indices into ``anns`` of the kept annotations, in label order."""
    h, w = shape
    issues: List[str] = []
    counts: Dict[str, int] = {}
    cls, xyxy, where, index = [], [], [], []
    for j, a in enumerate(anns):
        if a.get("iscrowd", 0):
            counts["crowd"] = counts.get("crowd", 0) + 1
            continue
        bb = a.get("bbox")
        if not isinstance(bb, (list, tuple)) or len(bb) != 4:
            counts["drop_bad_columns"] = counts.get("drop_bad_columns", 0) + 1
            issues.append(f"annotation {a.get('id')}: bbox must be [x, y, w, h], dropped")
            continue
        nums = _bbox_numbers(bb)
        if nums is None:
            counts["drop_non_numeric"] = counts.get("drop_non_numeric", 0) + 1
            issues.append(f"annotation {a.get('id')}: bbox values must be numbers, dropped")
            continue
        x, y, bw, bh = nums
        cid = _category_id(a.get("category_id", -1))
        cls.append(cat_to_cls.get(cid, -1) if cid is not None else -1)  # -1: dropped below
        xyxy.append([x / w, y / h, (x + bw) / w, (y + bh) / h])
        where.append(f"annotation {a.get('id')} (category {a.get('category_id')})")
        index.append(j)
    if not cls:
        return np.zeros((0, 5), np.float32), issues, counts
    rows: List[int] = []
    labels = check_boxes(np.array(cls, np.float64), np.array(xyxy, np.float64), nc, shape, where,
                         issues, counts, rows)
    if kept is not None:
        kept.extend(index[r] for r in rows)
    return labels, issues, counts


def coco_ground_truth(json_file: PathLike, coco_ids: Optional[Sequence[int]] = None,
                      nc: Optional[int] = None) -> Dict[str, Any]:
    """The COCO ground truth of exactly the boxes the loader keeps from ``json_file``: every
    annotation that :func:`coco_image_labels` drops (non-numeric / negative / degenerate /
    far-outside / duplicate box, bad class) is left out — so a dropped box is never scored and
    never reaches pycocotools — while kept boxes keep the JSON's ``bbox``, ``area`` (when a
    positive number) and crowd regions (``iscrowd``, with a valid box) stay as ignore regions.
    Annotation ids are renumbered 1..N (pycocotools indexes by id). Nothing is logged: the
    dataset already reported the drops once. Same errors as :func:`load_coco_json`."""
    cj = load_coco_json(json_file, coco_ids, nc)
    c2c = cj["cat_to_cls"]
    nc_eff = nc if nc is not None else len(c2c)
    cls_to_cat = sorted(c2c.items(), key=lambda t: t[1])
    names = cj["names"]
    out: Dict[str, Any] = {
        "info": {"description": f"yolo_q ground truth: the boxes kept from {json_file}"},
        "licenses": [], "images": [], "annotations": [],
        "categories": [{"id": int(cid), "name": names[c] if c < len(names) else str(cid),
                        "supercategory": ""} for cid, c in cls_to_cat]}
    anns_out = out["annotations"]
    for fname, meta in cj["images"].items():
        h, w, iid = meta["height"], meta["width"], meta["id"]
        out["images"].append({"id": iid, "file_name": fname, "height": h, "width": w})
        anns = cj["anns"].get(iid, [])
        kept: List[int] = []
        coco_image_labels(anns, c2c, nc_eff, (h, w), kept)
        crowd = [j for j, a in enumerate(anns) if a.get("iscrowd", 0)]
        for j in sorted(kept + crowd):
            a = anns[j]
            nums = _bbox_numbers(a.get("bbox"))
            cid = _category_id(a.get("category_id", -1))
            if j in crowd and (nums is None or not np.isfinite(nums).all() or nums[2] <= 0
                               or nums[3] <= 0 or c2c.get(cid, nc_eff) >= nc_eff):
                continue  # an unusable crowd region: nothing to ignore
            area = a.get("area")
            if isinstance(area, bool) or not isinstance(area, (int, float)) \
                    or not math.isfinite(area) or area <= 0:
                area = nums[2] * nums[3]
            anns_out.append({"id": len(anns_out) + 1, "image_id": iid, "category_id": cid,
                             "bbox": list(nums), "area": float(area),
                             "iscrowd": int(j in crowd)})
    return out


def to_coco_dict(file_names: Sequence[str], image_ids: Sequence[int], shapes: Sequence[Tuple[int, int]],
                 labels: Sequence[np.ndarray], names: Sequence[str],
                 coco_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Build a COCO instances dict from normalised labels (e.g. ground truth for COCO eval of a
    YOLO-txt dataset). Category id = ``coco_ids[cls]`` or ``cls + 1``; ``area`` = box area."""
    cat_ids = list(coco_ids) if coco_ids is not None else [i + 1 for i in range(len(names))]
    out = {"info": {"description": "yolo_q"}, "licenses": [],
           "categories": [{"id": int(cat_ids[i]), "name": str(n), "supercategory": ""}
                          for i, n in enumerate(names)],
           "images": [], "annotations": []}
    aid = 1
    for fn, iid, (h, w), lab in zip(file_names, image_ids, shapes, labels):
        out["images"].append({"id": int(iid), "file_name": os.path.basename(fn),
                              "height": int(h), "width": int(w)})
        for c, cx, cy, bw, bh in np.asarray(lab, np.float64).reshape(-1, 5):
            pw, ph = bw * w, bh * h
            out["annotations"].append({
                "id": aid, "image_id": int(iid), "category_id": int(cat_ids[int(c)]),
                "bbox": [round((cx * w) - pw / 2, 3), round((cy * h) - ph / 2, 3),
                         round(pw, 3), round(ph, 3)],
                "area": round(pw * ph, 3), "iscrowd": 0})
            aid += 1
    return out


# --------------------------------------------------------------------------------------------
# label cache (.npz, no pickle)
# --------------------------------------------------------------------------------------------
def files_hash(paths: Sequence[PathLike], extra: str = "") -> str:
    """Hash of paths + sizes + mtimes (missing files count as such)."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{extra}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|-\n".encode())
    return h.hexdigest()


def cache_dir() -> Path:
    """Fallback cache folder: ``$YOLOQ_CACHE_DIR`` or ``~/.cache/yolo_q``."""
    return Path(os.environ.get("YOLOQ_CACHE_DIR") or Path.home() / ".cache" / "yolo_q")


def cache_candidates(primary: PathLike) -> List[Path]:
    """Where a label cache may live: next to the labels, then in :func:`cache_dir`."""
    primary = Path(primary)
    tag = hashlib.sha1(str(primary.resolve()).encode()).hexdigest()[:16]
    return [primary, cache_dir() / f"{primary.stem}-{tag}.cache"]


def _writable_dir(d: Path) -> bool:
    """Writable for us AND not marked read-only by its mode bits (which root would ignore):
    shared, read-only dataset folders are never written to."""
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)
    except OSError:
        return False


def save_cache(path: PathLike, payload: Dict[str, np.ndarray]) -> Optional[Path]:
    """Write the cache atomically to the first writable candidate; never raises."""
    for cand in cache_candidates(path):
        if not _writable_dir(cand.parent):
            continue
        try:
            write_bytes_atomic(cand, lambda f: np.savez(f, **payload))
            return cand
        except OSError as e:
            LOGGER.debug("label cache not writable at %s (%s)", cand, e)
    return None


def load_cache(path: PathLike, key: str) -> Optional[Dict[str, np.ndarray]]:
    """Return the cached arrays if a candidate exists with a matching key, else None."""
    for cand in cache_candidates(path):
        try:
            with np.load(cand, allow_pickle=False) as z:
                if str(z["key"]) == key and int(z["version"]) == CACHE_VERSION:
                    return {k: z[k] for k in z.files}
        except (OSError, KeyError, ValueError, EOFError):
            continue
        except Exception as e:  # noqa: BLE001 - a corrupt cache must never stop training
            LOGGER.debug("ignoring unreadable label cache %s (%s)", cand, e)
    return None
