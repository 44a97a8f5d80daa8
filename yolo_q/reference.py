"""Shipped reference checkpoints (issue #16): turn a finished training run into a small float16
checkpoint with its curve, hash and recorded mAP, and check that a shipped one still reproduces
that mAP.

``benchmarks/reference/models.json`` holds one entry per shipped model::

    {"yolov6n_repvgg": {"weights": "benchmarks/reference/yolov6n_repvgg.pt", "sha256": ...,
                        "config": "configs/reference/yolov6n_repvgg.yaml", "epochs": 36,
                        "train_seconds": ..., "val_map50_95": ..., "last20_gain": ...,
                        "check": {"val_images": 25, "size": 160, "seed": 0, "spec": {...},
                                  "map50_95": ...}}}

mAP50-95 in % (4 decimals). ``check`` is a deterministic subset (the first ``val_images`` of
the synthetic val split, regenerated from (seed, size, spec)) small enough for a test.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import resolve_config
from .data.synthetic import generate
from .engine.hooks import read_results_csv
from .eval.api import run_eval
from .io import check_output_file, read_json, write_json
from .models.loading import write_float_checkpoint
from .quant.load import load_model
from .report import plot_curves

__all__ = ["check_map", "curve_gain", "join_stages", "sha256", "ship_reference"]


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def curve_gain(rows: List[Dict[str, Any]], frac: float = 0.2) -> Optional[float]:
    """mAP50-95 gained over the last ``frac`` of the evaluated epochs (points, %): the plateau
    test of issue #16 (< 0.5 points)."""
    pts = [(r["epoch"], r["map50_95"]) for r in rows if r.get("map50_95") is not None]
    if len(pts) < 2:
        return None
    last = pts[-1][0]
    start = last - frac * last
    before = [m for e, m in pts if e <= start]
    if not before:
        return None
    return round(100.0 * (pts[-1][1] - before[-1]), 4)


def join_stages(csvs: List[Path], dst: Path) -> List[int]:
    """Write the results.csv files of consecutive training stages (a run continued with
    ``--weights`` in a new run directory) as one curve: each stage's epochs continue the
    previous stage's last epoch; the other cells are copied as written. Returns each stage's
    number of rows."""
    header, lines, offset, counts = None, [], 0, []
    for csv in csvs:
        text = Path(csv).read_text(encoding="utf-8").splitlines()
        if header is not None and text[:1] != [header]:
            raise ValueError(f"reference: {csv} has other columns than {csvs[0]}")
        header, last = text[0], offset
        for line in text[1:]:
            epoch, rest = line.split(",", 1)
            last = offset + int(float(epoch))
            lines.append(f"{last},{rest}")
        offset = last
        counts.append(len(text) - 1)
    Path(dst).write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return counts


def _synthetic(cfg) -> Dict[str, Any]:
    syn = cfg.pipeline.synthetic
    if syn is None:
        raise ValueError("reference: the config has no pipeline.synthetic section (the data "
                         "the check subset is regenerated from)")
    return {"size": int(syn.size), "seed": int(syn.seed), "spec": dict(syn.spec or {})}


def check_map(weights, config, check: Dict[str, Any], work_dir) -> float:
    """mAP50-95 (%) of ``weights`` on the first ``check['val_images']`` synthetic val images,
    regenerated under ``work_dir`` from ``check``'s size, seed and spec."""
    yaml = generate(Path(work_dir) / "check_data", 0, int(check["val_images"]),
                    int(check["size"]), int(check["seed"]), workers=1, **check["spec"])
    cfg = resolve_config(config, [f"data.dataset={yaml}", "data.workers=0"])
    res = run_eval(cfg, "torch", str(weights), batch_size=16, verbose=False)
    return round(100.0 * res["map50_95"], 4)


def _write_fp16(src, dst: Path, config) -> None:
    """The deploy (fused) form: RepVGG branches folded, BN folded (9.3 MB for YOLOv6-N in
    float16, vs 10.4 MB unfused); quantization and evaluation fuse anyway."""
    model = load_model(src, cfg=resolve_config(config), fuse=True)
    write_float_checkpoint(model, dst, fp16=True, source=Path(src).name)


def ship_reference(run_dir, name: str, config, out_dir="benchmarks/reference",
                   weights: str = "last.pt", check_images: int = 25) -> Dict[str, Any]:
    """Write ``<out_dir>/<name>.pt`` (float16 EMA weights of ``<run_dir>/weights/<weights>``,
    fused), ``<name>.csv`` (the run's results.csv), ``<name>.png`` (its curves) and the model's
    entry in ``<out_dir>/models.json``; returns the entry.

    ``run_dir`` may list the directories of consecutive stages (the later ones started from the
    earlier one's weights): the weights come from the last, the curve, epochs and training time
    from all of them (:func:`join_stages`). ``config``: the config the model is used with (data,
    evaluation, quantization settings), normally the first stage's."""
    runs = [Path(r) for r in ([run_dir] if isinstance(run_dir, (str, Path)) else run_dir)]
    out_dir = Path(out_dir)
    src, csvs = runs[-1] / "weights" / weights, [r / "results.csv" for r in runs]
    for p in (src, *csvs, Path(config)):
        if not p.is_file():
            raise FileNotFoundError(f"reference: {p} does not exist")
    dst = out_dir / f"{name}.pt"
    check_output_file(dst, [src], what="reference checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_fp16(src, dst, config)
    counts = join_stages(csvs, out_dir / f"{name}.csv")  # one stage: a copy
    rows = read_results_csv(out_dir / f"{name}.csv")
    plot_curves({name: rows}, out_dir / f"{name}.png")
    cfg = resolve_config(config)
    full = run_eval(cfg, "torch", str(dst), batch_size=16, verbose=False)
    check = {"val_images": int(check_images), **_synthetic(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        check["map50_95"] = check_map(dst, config, check, tmp)
    entry = {"weights": dst.as_posix(), "sha256": sha256(dst), "config": Path(config).as_posix(),
             "epochs": int(rows[-1]["epoch"]) if rows else None,
             "train_seconds": round(sum(float(r.get("seconds") or 0) for r in rows), 1),
             "val_images": int(full["images"]), "val_map50_95": round(100 * full["map50_95"], 4),
             "last20_gain": curve_gain(rows), "check": check}
    if len(runs) > 1:
        entry["stages"] = [{"run": r.as_posix(), "epochs": n} for r, n in zip(runs, counts)]
    manifest = out_dir / "models.json"
    models = read_json(manifest) if manifest.is_file() else {}
    models[name] = entry
    write_json(manifest, models)
    return entry
