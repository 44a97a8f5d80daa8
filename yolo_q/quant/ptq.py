"""Post-training quantization end to end (:func:`run_ptq`, behind ``tools/ptq.py``) and loading
of quantized checkpoints (:func:`load_quantized`, used by :func:`yolo_q.load_model`).

``run_ptq``: float checkpoint (EMA weights) -> fused model -> :func:`~yolo_q.quant.convert` by
``cfg.quant`` -> calibration on ``quant.calib_batches`` x ``quant.calib_batch_size`` TRAINING
images without augmentation -> COCO mAP of float vs PTQ on the validation set -> optional
sensitivity analysis (:mod:`~yolo_q.quant.sensitivity`) on ``quant.sensitivity_images``
validation images and partial quantization (:mod:`~yolo_q.quant.partial`) -> checkpoint.

Quantized checkpoint (loads with ``torch.load(weights_only=True)``)::

    {"model": converted model state_dict (incl. ``*._input_quantizer._amax`` ...),
     "config": resolved config dict (quant.skip_layers includes the float layers),
     "quant": quant_state(model), "ptq": metrics and settings, "skip_layers": float layers}
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from .convert import (CalibrationError, calibrate, convert, is_quantized, quant_state,
                      quantized_layers)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ loading
def load_quantized(cfg, state_dict: Dict[str, torch.Tensor], quant_state: dict,
                   source: str = "quantized checkpoint") -> nn.Module:
    """Rebuild a fake-quant model: ``build_model(cfg).fuse()`` -> ``convert(state=quant_state)``
    -> strict ``load_state_dict`` (mismatches are named). Returns the model in eval mode."""
    from ..engine.checkpoint import load_state_into
    from ..models import build_model

    if not isinstance(quant_state, dict) or "layers" not in quant_state:
        raise ValueError(f"{source}: 'quant' entry is not a yolo_q quant state")
    model = convert(build_model(cfg).fuse(), state=quant_state)
    load_state_into(model, state_dict, source)
    return model.eval()


# ------------------------------------------------------------------------------ data
def calibration_dataset(cfg, verbose: bool = False):
    """The TRAINING split of ``cfg.data`` as a :class:`~yolo_q.data.DetectionDataset` with
    ``augment=False`` (letterboxed images, as at evaluation)."""
    from ..data import DetectionDataset, load_data_yaml
    from ..data.loader import resolve_data_yaml

    d = cfg.data
    info = load_data_yaml(resolve_data_yaml(d.dataset), root=d.get("root", None))
    if info["train"] is None:
        raise ValueError(f"{info['yaml_file']}: key 'train' missing (calibration uses the "
                         f"training images)")
    return DetectionDataset(info["train"], img_size=int(d.img_size), augment=False,
                            nc=info["nc"], names=info["names"], json_file=info["train_json"],
                            coco_ids=info["coco_ids"], cache=bool(d.cache_labels),
                            seed=int(cfg.train.seed), prefix="calib", verbose=verbose)


def calibration_batches(cfg, num_batches: Optional[int] = None, batch_size: Optional[int] = None,
                        dataset=None) -> List[torch.Tensor]:
    """``num_batches`` (default ``quant.calib_batches``) uint8 image batches of ``batch_size``
    (default ``quant.calib_batch_size``) from the training images without augmentation, drawn
    in a seeded random order (``train.seed``), kept in memory (reused for every calibration)."""
    from ..data import build_dataloader

    q = cfg.quant
    n = int(q.calib_batches if num_batches is None else num_batches)
    bs = int(q.calib_batch_size if batch_size is None else batch_size)
    if n < 1 or bs < 1:
        raise ValueError(f"quant.calib_batches ({n}) and quant.calib_batch_size ({bs}) must be "
                         f">= 1")
    ds = calibration_dataset(cfg) if dataset is None else dataset
    loader = build_dataloader(ds, bs, shuffle=True, workers=min(int(cfg.data.workers), 2),
                              seed=int(cfg.train.seed), persistent_workers=False)
    out = []
    for imgs, *_ in loader:
        out.append(imgs)
        if len(out) >= n:
            break
    if len(out) < n:
        logger.warning("calibration: only %d of %d batches available (%d training images)",
                       len(out), n, len(ds))
    return out


def _trim(batch, k: int):
    imgs, targets, paths, shapes = batch[:4]
    if targets is not None and len(targets):
        targets = targets[targets[:, 0] < k]
    return imgs[:k], targets, list(paths)[:k], list(shapes)[:k]


def cached_val_batches(loader, max_images: int) -> List[tuple]:
    """The first ``max_images`` images of a (sequential) validation loader, kept in memory."""
    out, n = [], 0
    for batch in loader:
        k = min(len(batch[2]), max_images - n)
        out.append(tuple(batch[:4]) if k == len(batch[2]) else _trim(batch, k))
        n += k
        if n >= max_images:
            break
    return out


def make_map_fn(cfg, val_ds, batches, max_images: Optional[int] = None, progress: bool = False,
                desc: Optional[str] = None, halves: bool = False
                ) -> Callable[[nn.Module], Dict[str, float]]:
    """``fn(model) -> {"map50_95", "map50", "images", "seconds"}``: COCO mAP (yolo_q.eval) on
    ``batches`` (a loader or a list of batches; the first ``max_images`` images). ``halves``:
    also ``map50_95_halves``, mAP50-95 of the same detections on the even- and the odd-numbered
    images separately (the split-half reliability check of exact sensitivity)."""
    from ..eval import COCOEvaluator, evaluate

    evaluator = COCOEvaluator.from_dataset(val_ds)
    e = cfg.eval

    def fn(model: nn.Module) -> Dict[str, float]:
        src = cached_val_batches(batches, max_images) if max_images else batches
        res = evaluate(model, src, evaluator, conf_thres=e.conf_thres, iou_thres=e.iou_thres,
                       max_det=e.max_det, progress=progress, desc=desc)
        out = {"map50_95": float(res["map50_95"]), "map50": float(res["map50"]),
               "images": int(res["images"]), "seconds": float(res["seconds"])}
        if halves:
            ids = evaluator.evaluated_ids
            out["map50_95_halves"] = [
                float(evaluator.summarize(False, False, image_ids=ids[k::2])["map50_95"])
                for k in (0, 1)]
        return out
    return fn


# ------------------------------------------------------------------------------ quantize
def quantize_model(fused: nn.Module, cfg, batches: Sequence[torch.Tensor],
                   skip: Sequence[str] = (), method: Optional[str] = None,
                   progress: bool = True) -> nn.Module:
    """``convert`` a copy of the fused float model by ``cfg.quant`` with the extra float layers
    ``skip`` added to ``quant.skip_layers``, then calibrate it on ``batches``. A quantizer that
    no calibration data reached is named in a :class:`CalibrationError`."""
    base = [str(s) for s in (cfg.quant.skip_layers or [])]
    qmodel = convert(fused, cfg, skip_layers=base + [s for s in skip if s not in base])
    try:
        calibrate(qmodel, batches, method=method or cfg.quant.calib, num_batches=len(batches),
                  progress=progress, strict=True)
    except CalibrationError as e:
        e.user_facing = True  # tools print it as one line
        raise
    return qmodel


def _metric_row(name: str, m: Optional[dict], ref: Optional[dict]) -> str:
    if not m:
        return ""
    d1 = d2 = ""
    if ref is not None and m is not ref:
        d1 = f"{100 * (m['map50_95'] - ref['map50_95']):+.2f}"
        d2 = f"{100 * (m['map50'] - ref['map50']):+.2f}"
    return f"{name:<22}{m['map50_95']:>10.4f}{m['map50']:>9.4f}{d1:>12}{d2:>10}\n"


def format_comparison(float_m: dict, ptq_m: Optional[dict], partial_m: Optional[dict] = None,
                      partial_label: str = "partial", title: str = "") -> str:
    """Side-by-side float / PTQ / partial mAP table; deltas in percentage points vs float."""
    out = (f"{title}\n" if title else "") + \
        f"{'model':<22}{'mAP50-95':>10}{'mAP50':>9}{'d50-95 pts':>12}{'d50 pts':>10}\n"
    out += _metric_row("float", float_m, float_m)
    out += _metric_row("PTQ (all layers)", ptq_m, float_m)
    out += _metric_row(partial_label, partial_m, float_m)
    return out


def _device(spec: Optional[str]) -> torch.device:
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _resolved_cfg(cfg, calib, per_tensor_weights, flavour, sensitivity_gain=None):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # private copy
    q = cfg.quant
    if sensitivity_gain is not None:
        q.sensitivity_gain = float(sensitivity_gain)
    if not (float(q.sensitivity_gain) > 0 and math.isfinite(float(q.sensitivity_gain))):
        raise ValueError(f"quant.sensitivity_gain must be a positive number, got "
                         f"{q.sensitivity_gain}")
    if calib is not None:
        q.calib = calib
    if per_tensor_weights:
        q.per_channel_weights = False
    if flavour is not None:
        q.flavour = flavour
    from .convert import FLAVOURS, resolve_settings
    from .calibrators import METHODS
    if q.calib not in METHODS:
        raise ValueError(f"quant.calib: '{q.calib}' is not one of {METHODS}")
    if q.flavour is not None and q.flavour not in FLAVOURS:
        raise ValueError(f"quant.flavour: '{q.flavour}' is not one of {FLAVOURS}")
    q.flavour = resolve_settings(cfg)["flavour"]  # store the effective flavour
    return cfg


def _sensitivity(qmodel, float_model, cfg, batches, val_ds, val_loader, mode, all_but,
                 progress, say, run_dir, files):
    """Sensitivity report on ``quant.sensitivity_images`` val images; returns (report, subset
    evaluate fn, float and PTQ metrics on the subset)."""
    from . import sensitivity as sens

    q = cfg.quant
    eval_sub = make_map_fn(cfg, val_ds, cached_val_batches(val_loader, int(q.sensitivity_images)),
                           halves=mode != "proxy")
    sub_float, sub_ptq = eval_sub(float_model), eval_sub(qmodel)
    proxy_imgs = torch.cat(batches)[:max(1, int(q.sensitivity_proxy_images))]
    gain = float(q.sensitivity_gain)
    report = sens.sensitivity_analysis(qmodel, proxy_batches=list(proxy_imgs.split(8)),
                                       evaluate_fn=eval_sub, mode=mode, all_but=all_but,
                                       float_metrics=sub_float, ptq_metrics=sub_ptq,
                                       progress=progress, gain=gain,
                                       proxy_metric=str(q.sensitivity_proxy))
    report.update(subset_images=sub_float["images"], calib=q.calib,
                  per_channel_weights=bool(q.per_channel_weights))
    say(f"\nsensitivity ({mode}{f', error gain {gain:g}' if gain != 1 else ''}; exact/max-drop "
        f"on {sub_float['images']} val images: float {sub_float['map50_95']:.4f}, "
        f"PTQ {sub_ptq['map50_95']:.4f})")
    say(sens.format_table(report), end="")
    if run_dir is not None:
        files.update({k: str(v) for k, v in sens.save_report(report, run_dir).items()})
    return report, eval_sub, sub_float, sub_ptq


def _integer_report(model, batch, say) -> dict:
    from .integer import integer_check

    try:
        dev = integer_check(model, batch)
    except (OverflowError, RuntimeError) as e:  # e.g. a bias that overflows int32
        say(f"\ninteger check failed: {str(e).splitlines()[0]}")
        return {"max": None, "layers": {}, "error": str(e).splitlines()[0]}
    say("\ninteger check (max deviation of integer-only arithmetic, in output steps):")
    for name, v in sorted(dev.items(), key=lambda kv: -kv[1]):
        say(f"  {v:8.3f}  {name}")
    return {"max": max(dev.values()) if dev else None, "layers": dev}


def run_ptq(cfg, float_weights, calib: Optional[str] = None, per_tensor_weights: bool = False,
            sensitivity: bool = False, sensitivity_mode: str = "proxy", all_but: bool = False,
            skip_top: Optional[int] = None, max_drop: Optional[float] = None,
            max_search_steps: Optional[int] = None, out=None, run_dir=None,
            flavour: Optional[str] = None, integer_check: bool = False,
            eval_images: Optional[int] = None, device: Optional[str] = "cpu",
            progress: bool = True, verbose: bool = True, out_full=None,
            sensitivity_gain: Optional[float] = None) -> Dict[str, Any]:
    """Post-training quantization of the float checkpoint ``float_weights``.

    Args:
        cfg: full config (``quant``, ``data``, ``eval`` sections are used).
        calib / per_tensor_weights / flavour / sensitivity_gain: override ``quant.calib`` /
            ``quant.per_channel_weights`` / ``quant.flavour`` / ``quant.sensitivity_gain``.
        sensitivity: run the per-layer sensitivity analysis (``sensitivity_mode``: proxy, exact
            or both; ``all_but`` adds the all-but-this-layer measurement) on
            ``quant.sensitivity_images`` validation images (the proxy on
            ``quant.sensitivity_proxy_images`` calibration images); ranked table on stdout,
            ``sensitivity.csv``/``.json`` in ``run_dir``.
        skip_top: keep the ``k`` most sensitive layers float (runs the sensitivity analysis,
            proxy mode unless ``sensitivity`` says otherwise).
        max_drop: keep the fewest most-sensitive layers float such that mAP50-95 on the
            sensitivity subset is at most ``max_drop`` percentage points below float
            (0.3 -> 0.003 mAP50-95); see :func:`yolo_q.quant.partial.search_max_drop`
            (``max_search_steps`` caps its evaluations).
        out: checkpoint path (default ``run_dir/ptq.pt``; nothing is written without either).
            With partial quantization it holds the partial model.
        out_full: also save the all-layers-quantized model here (the usual QAT starting point
            when ``out`` holds a partial model).
        integer_check: also report :func:`yolo_q.quant.integer_check` per layer.
        eval_images: evaluate on the first N validation images only (default: all).
    Returns a summary dict (metrics, settings, timings, paths, ``table``).
    """
    import json

    from ..config import config_to_dict, save_config
    from ..data import build_dataloader, build_datasets_from_config, check_model_nc
    from ..engine.checkpoint import load_model, save_checkpoint
    from ..engine.trainer import flush_denormal
    from . import partial as partial_mod
    from .sensitivity import MODES, jsonable

    if skip_top is not None and max_drop is not None:
        raise ValueError("--skip-top and --max-drop are mutually exclusive")
    if sensitivity_mode not in MODES:
        raise ValueError(f"sensitivity mode '{sensitivity_mode}' is not one of {MODES}")
    cfg = _resolved_cfg(cfg, calib, per_tensor_weights, flavour, sensitivity_gain)
    q = cfg.quant
    dev = _device(device)
    run_dir = Path(run_dir) if run_dir is not None else None
    out = Path(out) if out is not None else (run_dir / "ptq.pt" if run_dir else None)
    say = print if verbose else (lambda *a, **k: None)
    times: Dict[str, float] = {}
    files: Dict[str, str] = {}
    t_all = t0 = time.perf_counter()

    with flush_denormal(dev.type == "cpu"):
        # ---- float model (EMA weights, fused) and data
        float_model = load_model(float_weights, cfg=cfg, device=dev)
        if is_quantized(float_model):
            raise ValueError(f"{float_weights}: already a quantized checkpoint; PTQ needs float "
                             f"weights")
        if not getattr(float_model, "is_fused", True):
            float_model.fuse()
        _, val_ds, info = build_datasets_from_config(cfg, splits=("val",), verbose=False)
        check_model_nc(float_model, val_ds.nc, float_weights, info["yaml_file"])  # before calib
        batches = calibration_batches(cfg)
        val_loader = build_dataloader(val_ds, int(cfg.eval.batch_size), shuffle=False,
                                      workers=min(int(cfg.data.workers), 2),
                                      seed=int(cfg.train.seed), persistent_workers=False)
        times["data"] = time.perf_counter() - t0

        # ---- PTQ of every layer, float vs PTQ mAP
        t0 = time.perf_counter()
        qmodel = quantize_model(float_model, cfg, batches, progress=progress)
        times["calibrate"] = time.perf_counter() - t0
        n_layers = len(quantized_layers(qmodel))
        say(f"PTQ: {n_layers} quantized layers, calib={q.calib}, "
            f"{'per-channel' if q.per_channel_weights else 'per-tensor'} weights, "
            f"flavour={q.flavour}, {sum(len(b) for b in batches)} calibration images")
        eval_full = make_map_fn(cfg, val_ds, val_loader, max_images=eval_images,
                                progress=progress, desc="eval")
        t0 = time.perf_counter()
        float_m, ptq_m = eval_full(float_model), eval_full(qmodel)
        times["eval"] = time.perf_counter() - t0

        # ---- sensitivity ranking
        report = sub_float = sub_ptq = None
        if sensitivity or skip_top is not None or max_drop is not None:
            t0 = time.perf_counter()
            report, eval_sub, sub_float, sub_ptq = _sensitivity(
                qmodel, float_model, cfg, batches, val_ds, val_loader,
                sensitivity_mode if sensitivity else "proxy", all_but, progress, say, run_dir,
                files)
            times["sensitivity"] = time.perf_counter() - t0

        # ---- partial quantization
        chosen: List[str] = []
        search = partial_m = None
        final = qmodel
        if skip_top is not None:
            chosen = partial_mod.skip_top(report["ranking"], int(skip_top))
        elif max_drop is not None:
            cache: Dict[tuple, float] = {(): sub_ptq["map50_95"]}

            def evaluate_skip(skip: List[str]) -> float:
                if tuple(skip) not in cache:
                    m = quantize_model(float_model, cfg, batches, skip=skip, progress=False)
                    cache[tuple(skip)] = eval_sub(m)["map50_95"]
                return cache[tuple(skip)]

            t0 = time.perf_counter()
            search = partial_mod.search_max_drop(report["ranking"], evaluate_skip,
                                                 sub_float["map50_95"], float(max_drop),
                                                 max_steps=max_search_steps, progress=progress,
                                                 log=say)
            times["search"] = time.perf_counter() - t0
            chosen = search["skip"]
        if skip_top is not None or max_drop is not None:
            if chosen:
                final = quantize_model(float_model, cfg, batches, skip=chosen, progress=progress)
                partial_m = eval_full(final)
            else:
                partial_m = dict(ptq_m)
            say(f"partial quantization: {len(chosen)} float layer(s)"
                f"{': ' + ', '.join(chosen) if chosen else ''}")

        int_check = _integer_report(final, batches[0][:2], say) if integer_check else None

    # ---- checkpoint, config, summary
    table = format_comparison(float_m, ptq_m, partial_m,
                              partial_label=f"partial ({len(chosen)} float)",
                              title=f"val mAP ({float_m['images']} images)")
    if sub_float is not None:
        table += "\n" + format_comparison(
            sub_float, sub_ptq, title=f"sensitivity subset ({sub_float['images']} images)")
    ptq_info = {"float": float_m, "ptq": ptq_m, "partial": partial_m, "calib": q.calib,
                "per_channel_weights": bool(q.per_channel_weights), "flavour": q.flavour,
                "calib_images": int(sum(len(b) for b in batches)), "quantized_layers": n_layers,
                "skip_layers": chosen, "source": str(float_weights)}
    if chosen:  # the saved config rebuilds the same partial model
        base = [str(s) for s in (q.skip_layers or [])]
        q.skip_layers = base + [s for s in chosen if s not in base]
    if out_full is not None:
        full_cfg = config_to_dict(cfg)
        full_cfg["quant"]["skip_layers"] = [str(s) for s in (q.skip_layers or []) if s not in chosen]
        save_checkpoint({"model": qmodel.state_dict(), "config": full_cfg,
                         "quant": quant_state(qmodel),
                         "ptq": jsonable(dict(ptq_info, partial=None, skip_layers=[])),
                         "skip_layers": []}, out_full)
        files["checkpoint_full"] = str(out_full)
    if out is not None:
        save_checkpoint({"model": final.state_dict(), "config": config_to_dict(cfg),
                         "quant": quant_state(final), "ptq": jsonable(ptq_info),
                         "skip_layers": list(chosen)}, out)
        files["checkpoint"] = str(out)
    if run_dir is not None:
        files["config"] = str(save_config(cfg, run_dir / "config.yaml"))
        files["summary"] = str(run_dir / "summary.json")
    times["total"] = time.perf_counter() - t_all
    sens_keys = ("mode", "gain", "proxy_metric", "rank_by", "ranking", "proxy_seconds",
                 "exact_seconds", "all_but_seconds", "speedup", "spearman", "exact_split_half",
                 "exact_reliability", "spearman_ceiling", "proxy_images", "subset_images")
    summary = dict(ptq_info, subset_float=sub_float, subset_ptq=sub_ptq,
                   drop_points=100 * (float_m["map50_95"] - ptq_m["map50_95"]),
                   partial_drop_points=(100 * (float_m["map50_95"] - partial_m["map50_95"])
                                        if partial_m else None),
                   sensitivity=None if report is None else {k: report.get(k) for k in sens_keys},
                   search=search, integer_check=int_check, times=times, files=files,
                   run_dir=str(run_dir) if run_dir else None, table=table)
    if run_dir is not None:
        Path(files["summary"]).write_text(json.dumps(jsonable(summary), indent=2),
                                          encoding="utf-8")
    say("\n" + table, end="")
    return summary


__all__ = ["calibration_batches", "calibration_dataset", "cached_val_batches",
           "format_comparison", "load_quantized", "make_map_fn", "quantize_model", "run_ptq"]
