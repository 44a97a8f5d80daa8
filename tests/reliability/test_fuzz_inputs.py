"""Property-based fuzzing of the input parsers: YOLO txt labels, COCO JSON, the data YAML and
the config loader (file + ``key=value`` overrides). Random bytes and values may only raise the
documented errors (DataError / ConfigError), each naming the file or key, on one line; bad
labels are never fatal and every input line/annotation is accounted for."""
import atexit
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yolo_q.config import ConfigError, load_config
from yolo_q.data import formats as F

# CI: 60 fixed (derandomized) examples per test; YOLOQ_FUZZ_EXAMPLES=5000 for a deep random run
_DEEP = int(os.environ.get("YOLOQ_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_DEEP or 60, deadline=None, derandomize=not _DEEP, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_DIR = Path(tempfile.mkdtemp(prefix="yoloq_fuzz_"))  # (hypothesis and function fixtures don't mix)
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)

# -------------------------------------------------------------------------------- values
WS = st.sampled_from([" ", "  ", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\xa0"])
TOKENS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-0.2, 1.2).map(lambda v: f"{v:.6f}"),
    st.integers(-3, 12).map(str),
    st.sampled_from(["nan", "-inf", "1e400", "-0", "0x10", "1_0", "\u0661", "", "#", "1,2",
                     "0.5.5", "\x00", "\ufffd", "e", "NaN", "+.5"]),
    st.text(max_size=4),
)
LINE = st.lists(st.tuples(TOKENS, WS), max_size=7).map(lambda ts: "".join(t + w for t, w in ts))
LABEL_TEXT = st.one_of(
    st.lists(LINE, max_size=8).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.integers(10**300, 10**310),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
JSONV = st.recursive(SCALAR, lambda c: st.one_of(st.lists(c, max_size=4),
                                                 st.dictionaries(st.text(max_size=8), c, max_size=4)),
                     max_leaves=15)


def _write(name: str, data: bytes) -> Path:
    p = _DIR / name
    p.write_bytes(data)
    return p


def _assert_valid_labels(lab: np.ndarray, nc):
    assert lab.dtype == np.float32 and lab.ndim == 2 and lab.shape[1] == 5
    assert np.isfinite(lab).all()
    cls, cx, cy, w, h = lab.T
    assert (cls == np.round(cls)).all() and (cls >= 0).all()
    if nc is not None:
        assert (cls < nc).all()
    assert (w > 0).all() and (h > 0).all()
    eps = 1e-6
    assert (cx - w / 2 >= -eps).all() and (cx + w / 2 <= 1 + eps).all()
    assert (cy - h / 2 >= -eps).all() and (cy + h / 2 <= 1 + eps).all()


def _esc(text: str) -> str:
    """How messages show names: control characters escaped (messages stay one line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _one_line_naming(msg: str, *names: str, one_line: bool = True):
    assert not one_line or len(msg.splitlines()) == 1, msg
    assert any(n and n in msg for n in names), (msg, names)


# -------------------------------------------------------------------------------- YOLO txt
@FUZZ
@given(data=LABEL_TEXT, nc=st.one_of(st.none(), st.integers(1, 5)),
       shape=st.tuples(st.integers(1, 300), st.integers(1, 300)))
def test_yolo_label_parser_never_raises_and_accounts_for_every_line(data, nc, shape):
    p = _write("label.txt", data)
    lab, issues, counts, status = F.parse_yolo_label(p, nc, shape)
    _assert_valid_labels(lab, nc)
    assert status in ("ok", "empty")
    lines = [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.split()]
    dropped = sum(v for k, v in counts.items() if k.startswith("drop_"))
    assert len(lab) + dropped == len(lines)  # every non-blank line kept or counted as dropped
    assert len(issues) == dropped and all(i.startswith("line ") for i in issues)
    assert status == ("empty" if not lines else "ok")


def test_unreadable_label_is_not_fatal():
    d = _DIR / "a_folder.txt"
    d.mkdir(exist_ok=True)  # a folder where the label file should be
    lab, issues, counts, status = F.parse_yolo_label(d, 3, (10, 10))
    assert len(lab) == 0 and counts == {"unreadable_label": 1} and status == "missing"


# -------------------------------------------------------------------------------- COCO JSON
NUM = st.one_of(st.integers(-20, 120), st.floats(allow_nan=True, allow_infinity=True),
                st.integers(10**300, 10**310), st.booleans(), st.text(max_size=3), st.none())
IMAGE = st.fixed_dictionaries(
    {"id": st.one_of(st.integers(0, 3), JSONV), "file_name": st.one_of(st.just("a.jpg"), JSONV),
     "width": st.one_of(st.integers(1, 100), NUM), "height": st.one_of(st.integers(1, 100), NUM)})
ANN = st.fixed_dictionaries(
    {"image_id": st.one_of(st.integers(0, 3), JSONV)},
    optional={"bbox": st.one_of(st.lists(NUM, min_size=4, max_size=4), JSONV),
              "category_id": NUM, "iscrowd": st.one_of(st.integers(0, 1), JSONV), "id": JSONV})
CAT = st.fixed_dictionaries({"id": st.one_of(st.integers(0, 5), NUM)}, optional={"name": JSONV})
COCO = st.fixed_dictionaries({"images": st.one_of(st.lists(IMAGE, max_size=3), JSONV)},
                             optional={"annotations": st.one_of(st.lists(ANN, max_size=8), JSONV),
                                       "categories": st.one_of(st.lists(CAT, max_size=4), JSONV)})
COCO_BYTES = st.one_of(COCO.map(lambda d: json.dumps(d).encode()),
                       JSONV.map(lambda d: json.dumps(d).encode()), st.binary(max_size=100))


@FUZZ
@given(data=COCO_BYTES, nc=st.one_of(st.none(), st.integers(1, 6)))
def test_coco_json_only_raises_data_error_naming_the_file(data, nc):
    p = _write("instances.json", data)
    try:
        cj = F.load_coco_json(p)
    except F.DataError as e:
        _one_line_naming(str(e), str(p))
        return
    for meta in cj["images"].values():
        anns = cj["anns"].get(meta["id"], [])
        lab, issues, counts = F.coco_image_labels(anns, cj["cat_to_cls"], nc,
                                                  (meta["height"], meta["width"]))
        _assert_valid_labels(lab, nc)
        dropped = sum(v for k, v in counts.items() if k.startswith("drop_"))
        assert len(lab) + dropped + counts.get("crowd", 0) == len(anns)
        assert len(issues) == dropped


# ------------------------------------------------------------------ COCO JSON semantics
# Well-formed JSON whose meaning is wrong: duplicate image ids / file names, categories that miss
# classes, annotations of unlisted categories, non-numeric / negative / outside / duplicate
# boxes, crowd regions. Through the real dataset and evaluator: a one-line DataError naming the
# file, or every annotation kept or counted once — and perfect detections of the kept boxes
# score exactly 1.0 (a dropped box never reaches the ground truth), never another exception.
SEM_SIZES = {"a.jpg": (40, 80), "b.jpg": (60, 60), "c.jpg": (50, 100)}  # (h, w)
_SEM_DIR = _DIR / "sem" / "images"


def _sem_images() -> Path:
    if not _SEM_DIR.is_dir():
        import cv2
        _SEM_DIR.mkdir(parents=True)
        for name, (h, w) in SEM_SIZES.items():
            cv2.imwrite(str(_SEM_DIR / name), np.full((h, w, 3), 100, np.uint8))
    return _SEM_DIR


@st.composite
def coco_semantics(draw):
    """(doc, coco_ids, nc): mostly consistent documents with bad boxes, plus one of the
    document-level faults now and then."""
    fault = draw(st.sampled_from([None] * 6 + ["dup_id", "dup_name", "dup_cat", "few_cats",
                                                "coco_id_missing", "unlisted_cat"]))
    files = draw(st.lists(st.sampled_from(sorted(SEM_SIZES) + ["gone.jpg"]), min_size=1,
                          max_size=4, unique=True))
    ids = draw(st.lists(st.integers(1, 9), min_size=len(files), max_size=len(files), unique=True))
    if fault == "dup_id" and len(ids) > 1:
        ids[-1] = ids[0]
    if fault == "dup_name" and len(files) > 1:
        files[-1] = files[0]
    images = [{"id": i, "file_name": f, "height": SEM_SIZES.get(f, (30, 30))[0],
               "width": SEM_SIZES.get(f, (30, 30))[1]} for f, i in zip(files, ids)]
    cat_ids = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True))
    if fault == "dup_cat":
        cat_ids.append(cat_ids[0])
    anns = []
    for k in range(draw(st.integers(0, 8))):
        iid = draw(st.sampled_from(ids + [99]))
        h, w = next(((im["height"], im["width"]) for im in images if im["id"] == iid), (30, 30))
        kind = draw(st.sampled_from(["ok", "ok", "ok", "negative", "non_numeric", "short",
                                     "outside", "tiny", "duplicate"]))
        x, y = draw(st.integers(0, w - 2)), draw(st.integers(0, h - 2))
        bb = [x, y, draw(st.integers(1, w - x)), draw(st.integers(1, h - y))]
        if kind == "negative":
            bb[draw(st.sampled_from([2, 3]))] *= -1
        elif kind == "non_numeric":
            bb[draw(st.integers(0, 3))] = draw(st.sampled_from(["x", None, "1", float("nan"),
                                                                float("inf"), [1], True]))
        elif kind == "short":
            bb = bb[:draw(st.integers(0, 3))]
        elif kind == "outside":
            bb[0] = w + draw(st.integers(5, 50))
        elif kind == "tiny":
            bb[2] = 0.2
        cat = draw(st.one_of(st.sampled_from(cat_ids), st.sampled_from(cat_ids),
                             st.sampled_from(["x", None, 1.5, True])))
        ann = {"id": k + 1, "image_id": iid, "category_id": cat, "bbox": bb,
               "iscrowd": draw(st.sampled_from([0, 0, 0, 1]))}
        if kind == "duplicate" and anns:
            ann.update({k2: anns[-1][k2] for k2 in ("image_id", "category_id", "bbox")})
        if draw(st.booleans()):
            ann["area"] = draw(st.sampled_from([100.0, 0, -5, "big", None]))
        anns.append(ann)
    if fault == "unlisted_cat" and anns:
        anns[-1]["category_id"] = 9
    doc = {"images": images, "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
           "annotations": anns}
    mapping = draw(st.sampled_from(["sorted", "nc", "coco_ids"]))
    coco_ids, nc = None, None
    if mapping == "nc" or fault == "few_cats":
        nc = len(set(cat_ids)) + (draw(st.sampled_from([-1, 1])) if fault == "few_cats" else 0)
        nc = nc if nc >= 1 else 2
    elif mapping == "coco_ids" or fault == "coco_id_missing":
        coco_ids = draw(st.permutations(sorted(set(cat_ids))))
        coco_ids = coco_ids[:draw(st.integers(1, len(coco_ids)))]
        if fault == "coco_id_missing":
            coco_ids.append(7)
        nc = len(coco_ids)
    return doc, coco_ids, nc


def _perfect_detections(ds):
    out = []
    for lab, (h, w) in zip(ds.labels, ds.shapes0):
        c, cx, cy, bw, bh = np.asarray(lab, np.float64).reshape(-1, 5).T
        out.append(np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                             (cy + bh / 2) * h, np.ones_like(c), c], 1))
    return out


@FUZZ
@given(case=coco_semantics())
def test_coco_semantics_one_line_error_or_counted_and_scored_right(case):
    from yolo_q.data import DetectionDataset
    from yolo_q.eval import COCOEvaluator
    doc, coco_ids, nc = case
    img_dir = _sem_images()
    p = _write("semantics.json", json.dumps(doc).encode())
    try:
        ds = DetectionDataset(img_dir, 64, nc=nc, json_file=p, coco_ids=coco_ids, cache=False,
                              verbose=False)
        ev = COCOEvaluator.from_dataset(ds)
    except F.DataError as e:  # the JSON's fault: names it (no usable image: names the folder)
        _one_line_naming(str(e), str(p), str(img_dir))
        return
    ids = [im["id"] for im in doc["images"]]
    assert len(ids) == len(set(ids))  # duplicate ids never load
    assert all(a["category_id"] in {c["id"] for c in doc["categories"]}
               for a in doc["annotations"] if type(a["category_id"]) is int)
    # every annotation of a loaded image is kept, dropped (counted) or a crowd region
    r = ds.bad_report
    n_anns = sum(1 for a in doc["annotations"] if a["image_id"] in set(ds.image_ids))
    kept = sum(len(lab) for lab in ds.labels)
    assert kept + sum(r["boxes_dropped"].values()) + r["crowd_skipped"] == n_anns
    # ground truth = the kept boxes (+ valid crowd regions); perfect detections score 1.0
    assert sum(1 for a in ev.gt_dict["annotations"] if not a["iscrowd"]
               and a["image_id"] in set(ds.image_ids)) == kept
    for f, det in zip(ds.im_files, _perfect_detections(ds)):
        ev.add(f, det)
    res = ev.summarize(per_class=False, pr_curves=False)
    if kept:
        assert res["map50_95"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0)
    else:
        assert res["map50_95"] == 0.0 and res["note"] == "no detections"


# -------------------------------------------------------------------------------- data YAML
DATA_YAML = st.one_of(
    st.binary(max_size=80),
    JSONV.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"train": st.sampled_from([".", "missing_dir", 3, None]),
                           "val": st.sampled_from([".", "x", None]), "names": JSONV},
                          optional={"nc": SCALAR, "coco_ids": JSONV, "path": SCALAR,
                                    "extra_key": SCALAR}).map(lambda v: json.dumps(v).encode()),
)


@FUZZ
@given(data=DATA_YAML)
def test_data_yaml_only_raises_data_error_naming_the_file(data):
    p = _write("data.yaml", data)
    try:
        info = F.load_data_yaml(p)
    except F.DataError as e:  # (may quote a path value with a newline verbatim)
        _one_line_naming(str(e), str(p), one_line=False)
        return
    assert info["nc"] == len(info["names"]) >= 1


# -------------------------------------------------------------------------------- config
SECTIONS = {"model": ["nc", "width_multiple", "block", "backbone", "head", "scales"],
            "train": ["epochs", "lr0", "optimizer", "loss", "device", "name", "seed"],
            "data": ["img_size", "augment", "dataset", "root"],
            "quant": ["calib", "qat", "skip_layers", "flavour"], "export": ["opset"],
            "eval": ["conf_thres"]}
KEYS = st.one_of(st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]
                                 + list(SECTIONS) + ["train.loss.iou_type", "_base_"]),
                 st.text(max_size=8))
VALUES = st.one_of(st.integers(-2, 700).map(str), st.floats().map(str), st.text(max_size=6),
                   st.sampled_from(["", "[1,2]", "{a: 1}", "null", "true", "${train.epochs}",
                                    "${nope}", "${oc.env:YOLOQ_NO_SUCH_VAR}", "[", "{", "'",
                                    "sgd", "repvgg", "!!python/object/apply:os.system [ls]",
                                    "${", "???", "a=b", "\x01", "\ud800"]))
OVERRIDES = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES),
                               st.text(max_size=8)), max_size=3)
YAML_TREE = st.dictionaries(
    st.one_of(st.sampled_from(list(SECTIONS) + ["_base_"]), st.text(max_size=5)),
    st.one_of(SCALAR, st.lists(SCALAR, max_size=3),
              st.dictionaries(st.sampled_from(sum(SECTIONS.values(), []) + ["x"]),
                              st.one_of(SCALAR, st.lists(SCALAR, max_size=2)), max_size=3)),
    max_size=4)
CONFIG_BYTES = st.one_of(st.binary(max_size=80), JSONV.map(lambda v: json.dumps(v).encode()),
                         YAML_TREE.map(lambda v: yaml.safe_dump(v).encode()))


@FUZZ
@given(data=CONFIG_BYTES, overrides=OVERRIDES)
def test_config_loader_only_raises_config_error_naming_file_or_key(data, overrides):
    p = _write("config.yaml", data)
    try:
        cfg = load_config(p, overrides)
    except ConfigError as e:
        msg = str(e)
        # OmegaConf's key grammar has escapes (\\=) and indexing ([i]): compare the plain part
        keys = [re.split(r"[\\\[=]", o)[0] for o in overrides]
        # the key, or the part of it up to its first unknown segment
        prefixes = [".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 2)]
        names = [f"'{_esc(k)}" for k in prefixes] + [f"'{_esc(o)}'" for o in overrides]
        _one_line_naming(msg, str(p), *names)
        if not msg.startswith(str(p)):  # not the file's fault: a command-line override
            assert msg.startswith("command line"), msg
        return
    assert isinstance(cfg.train.epochs, int) and cfg.model.block  # resolved and validated


@pytest.mark.parametrize("overrides, key", [
    (["train.epochs=${nope}"], "train.epochs"),
    (["model.block=${oc.env:YOLOQ_NO_SUCH_VAR}"], "model.block"),
    (["train.name=[1"], "train.name"),
    (["model=3"], "model"),
    (["train.name=\udcff"], "train.name"),  # a non-UTF-8 byte on the command line
    (["=3"], "'=3'"),
])
def test_config_errors_found_by_fuzzing(overrides, key):
    """Regressions: these escaped as OmegaConf/YAML errors (or only at first use, mid-run)."""
    with pytest.raises(ConfigError, match=f"command line.*{key}"):
        load_config(None, overrides)


@pytest.mark.parametrize("text, match", [
    (b"\xff\xfe train: {}", "not a UTF-8"),
    (b"_base_: 3\n", "_base_"),
    (b"_base_: [no_such_base.yaml]\n", "_base_.*no_such_base.yaml"),
])
def test_config_file_errors_found_by_fuzzing(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_bytes(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert str(e.value).startswith(str(p))


@pytest.mark.parametrize("doc, match", [
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 5}]}, r"images\[0\].width"),
    ({"images": [{"id": 1, "width": 5, "height": 5}]}, r"images\[0\]: missing file_name"),
    ({"images": [], "annotations": [{"bbox": [1, 2, 3, 4]}]}, r"annotations\[0\]: missing image_id"),
    ({"images": [], "categories": [{"id": "cat"}]}, r"categories\[0\].id"),
    ({"images": {"a": 1}}, "'images' must be a list"),
])
def test_coco_errors_found_by_fuzzing(tmp_path, doc, match):
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(F.DataError, match=match) as e:
        F.load_coco_json(p)
    assert str(p) in str(e.value)


def test_bad_coco_annotation_values_are_dropped_not_fatal():
    anns = [{"id": 1, "bbox": ["1", 2, 3, 4], "category_id": 1},
            {"id": 2, "bbox": [10**400, 2, 3, 4], "category_id": 1},
            {"id": 3, "bbox": [1, 2, 3, 4], "category_id": [1]},
            {"id": 4, "bbox": [1, 2, 3, 4], "category_id": 1}]
    lab, issues, counts = F.coco_image_labels(anns, {1: 0}, 1, (10, 10))
    assert counts == {"drop_non_numeric": 2, "drop_bad_class": 1} and len(issues) == 3
    assert np.allclose(lab, [[0, 0.25, 0.4, 0.3, 0.4]])
    assert math.isclose(float(lab[0, 1]), (1 + 3 / 2) / 10, rel_tol=1e-6)
