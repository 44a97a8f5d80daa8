"""Post-training quantization end to end (:func:`run_ptq`, behind ``tools/ptq.py``); quantized
checkpoints load with :func:`yolo_q.load_model` (:mod:`yolo_q.quant.load`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..config import config_to_dict, copy_config, save_config
from ..data import (DataNotFoundError, DetectionDataset, build_dataloader,
                    build_datasets_from_config, check_model_nc, load_data_yaml)
from ..data.loader import resolve_data_yaml
from ..eval.coco import COCOEvaluator
from ..eval.runner import evaluate
from ..io import (check_output_dir, check_output_file, flush_denormal, jsonable,
                  save_checkpoint, write_json)
from . import partial as partial_mod
from . import sensitivity as sens
from .calibrators import METHODS
from .convert import (FLAVOURS, CalibrationError, calibrate, convert, is_quantized, quant_state,
                      quantized_layers, resolve_settings)
from .integer import bias_overflow_lines, int32_bias_overflow, integer_check
from .load import load_model
from .sensitivity import MODES

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ data
def calibration_dataset(cfg, verbose: bool = False):
    """The TRAINING split of ``cfg.data`` as a :class:`~yolo_q.data.DetectionDataset` with
    ``augment=False`` (letterboxed images, as at evaluation)."""

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
                   progress: bool = True, flavour: Optional[str] = None, strict: bool = True,
                   num_batches: Optional[int] = None) -> nn.Module:
    """``convert`` a copy of the fused float model by ``cfg.quant`` (``flavour`` overrides it)
    with the extra float layers ``skip`` added to ``quant.skip_layers``, then calibrate it on
    ``num_batches`` of ``batches`` (default: all). With ``strict``, a quantizer that no
    calibration data reached is named in a :class:`CalibrationError`."""
    base = [str(s) for s in (cfg.quant.skip_layers or [])]
    extra = {"flavour": flavour} if flavour else {}
    qmodel = convert(fused, cfg, skip_layers=base + [s for s in skip if s not in base], **extra)
    if num_batches is None and hasattr(batches, "__len__"):
        num_batches = len(batches)
    try:
        calibrate(qmodel, batches, method=method or cfg.quant.calib, num_batches=num_batches,
                  progress=progress, strict=strict)
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
    cfg = copy_config(cfg)
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
    if q.calib not in METHODS:
        raise ValueError(f"quant.calib: '{q.calib}' is not one of {METHODS}")
    if q.flavour is not None and q.flavour not in FLAVOURS:
        raise ValueError(f"quant.flavour: '{q.flavour}' is not one of {FLAVOURS}")
    q.flavour = resolve_settings(cfg)["flavour"]  # store the effective flavour
    return cfg


def selection_val_set(cfg, val_ds: DetectionDataset) -> DetectionDataset:
    """The validation set quantization makes its choices on: the val split of
    ``quant.select_data`` (same image size and settings; its classes must match ``val_ds``),
    else ``val_ds`` itself."""
    path = cfg.quant.get("select_data")
    if not path:
        return val_ds
    yaml_path = resolve_data_yaml(path)
    if not yaml_path.is_file():
        raise DataNotFoundError(f"quant.select_data: {path} does not exist")
    sel = copy_config(cfg)
    sel.data.dataset, sel.data.root = str(yaml_path), None
    _, ds, _ = build_datasets_from_config(sel, splits=("val",), verbose=False)
    if ds.nc != val_ds.nc:
        raise ValueError(f"quant.select_data: {path} has {ds.nc} classes, data.dataset "
                         f"{val_ds.nc}")
    return ds


def _sensitivity(qmodel, float_model, cfg, batches, val_ds, val_loader, mode, all_but,
                 progress, say, run_dir, files):
    """Sensitivity report on ``quant.sensitivity_images`` val images; returns (report, subset
    evaluate fn, float and PTQ metrics on the subset)."""

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
    where = f" of {q.select_data}" if q.get("select_data") else ""
    say(f"\nsensitivity ({mode}{f', error gain {gain:g}' if gain != 1 else ''}; exact/max-drop "
        f"on {sub_float['images']} val images{where}: float {sub_float['map50_95']:.4f}, "
        f"PTQ {sub_ptq['map50_95']:.4f})")
    say(sens.format_table(report), end="")
    if run_dir is not None:
        files.update({k: str(v) for k, v in sens.save_report(report, run_dir).items()})
    return report, eval_sub, sub_float, sub_ptq


def _integer_report(model, batch, say) -> dict:

    try:
        dev = integer_check(model, batch)
    except (OverflowError, RuntimeError) as e:  # e.g. an input grid that is not calibrated
        say(f"\ninteger check failed: {str(e).splitlines()[0]}")
        return {"max": None, "layers": {}, "error": str(e).splitlines()[0]}
    say("\ninteger check (max deviation of integer-only arithmetic, in output steps):")
    for name, v in sorted(dev.items(), key=lambda kv: -kv[1]):
        say(f"  {v:8.3f}  {name}")
    saturated = int32_bias_overflow(model)
    for line in bias_overflow_lines(saturated):
        say(line)
    return {"max": max(dev.values()) if dev else None, "layers": dev,
            "bias_saturated": saturated}


@dataclass
class PTQOptions:
    """What :func:`run_ptq` does besides calibrating every layer (see its docstring)."""
    calib: Optional[str] = None
    per_tensor_weights: bool = False
    sensitivity: bool = False
    sensitivity_mode: str = "proxy"
    all_but: bool = False
    skip_top: Optional[int] = None
    max_drop: Optional[float] = None
    max_search_steps: Optional[int] = None
    out: Any = None
    run_dir: Any = None
    flavour: Optional[str] = None
    integer_check: bool = False
    eval_images: Optional[int] = None
    device: Optional[str] = "cpu"
    progress: bool = True
    verbose: bool = True
    out_full: Any = None
    sensitivity_gain: Optional[float] = None

    @property
    def partial(self) -> bool:
        return self.skip_top is not None or self.max_drop is not None


@dataclass
class _PTQState:
    """What the stages of :func:`run_ptq` hand each other."""
    cfg: Any
    opts: PTQOptions
    say: Callable
    float_model: Any = None
    batches: Any = None
    val_ds: Any = None
    val_loader: Any = None
    sel_ds: Any = None  # the choices' val set (quant.select_data, else val_ds)
    sel_loader: Any = None
    qmodel: Any = None
    eval_full: Any = None
    float_m: Any = None
    ptq_m: Any = None
    report: Any = None
    eval_sub: Any = None
    sub_float: Any = None
    sub_ptq: Any = None
    chosen: List[str] = field(default_factory=list)
    search: Any = None
    partial_m: Any = None
    final: Any = None
    int_check: Any = None
    times: Dict[str, float] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)


def run_ptq(cfg, float_weights, options: Optional[PTQOptions] = None, **kwargs) -> Dict[str, Any]:
    """Post-training quantization of the float checkpoint ``float_weights``; ``options`` (or the
    same fields as keyword arguments) of :class:`PTQOptions`:

    * calib / per_tensor_weights / flavour / sensitivity_gain: override ``quant.calib`` /
      ``quant.per_channel_weights`` / ``quant.flavour`` / ``quant.sensitivity_gain``.
    * sensitivity: run the per-layer sensitivity analysis (``sensitivity_mode``: proxy, exact or
      both; ``all_but`` adds the all-but-this-layer measurement) on ``quant.sensitivity_images``
      validation images (the proxy on ``quant.sensitivity_proxy_images`` calibration images);
      ranked table on stdout, ``sensitivity.csv``/``.json`` in ``run_dir``.
    * skip_top: keep the ``k`` most sensitive layers float (runs the sensitivity analysis, proxy
      mode unless ``sensitivity`` says otherwise).
    * max_drop: keep the fewest most-sensitive layers float such that mAP50-95 on the sensitivity
      subset is at most ``max_drop`` percentage points below float (0.3 -> 0.003 mAP50-95); see
      :func:`yolo_q.quant.partial.search_max_drop` (``max_search_steps`` caps its evaluations).
    * out: checkpoint path (default ``run_dir/ptq.pt``; nothing is written without either). With
      partial quantization it holds the partial model. out_full: also save the
      all-layers-quantized model here (the usual QAT starting point when ``out`` is partial).
    * integer_check: also report :func:`yolo_q.quant.integer_check` per layer.
    * eval_images: evaluate on the first N validation images only (default: all).

    ``cfg``: full config (``quant``, ``data``, ``eval`` sections are used). Returns a summary dict
    (metrics, settings, timings, paths, ``table``).
    """
    opts = options or PTQOptions(**kwargs)
    if opts.skip_top is not None and opts.max_drop is not None:
        raise ValueError("--skip-top and --max-drop are mutually exclusive")
    if opts.sensitivity_mode not in MODES:
        raise ValueError(f"sensitivity mode '{opts.sensitivity_mode}' is not one of {MODES}")
    _check_outputs(opts, float_weights)
    cfg = _resolved_cfg(cfg, opts.calib, opts.per_tensor_weights, opts.flavour,
                        opts.sensitivity_gain)
    st = _PTQState(cfg, opts, print if opts.verbose else (lambda *a, **k: None))
    t_all = time.perf_counter()
    dev = _device(opts.device)
    with flush_denormal(dev.type == "cpu"):
        _stage("data", st, _load_float_and_data, float_weights, dev)
        _stage("calibrate", st, _calibrate_all)
        _stage("eval", st, _evaluate_all)
        if opts.sensitivity or opts.partial:
            _stage("sensitivity", st, _rank_layers)
        if opts.partial:
            _choose_float_layers(st)
        st.final = _partial_model(st) if opts.partial else st.qmodel
        if opts.integer_check:
            st.int_check = _integer_report(st.final, st.batches[0][:2], st.say)
    return _write_outputs(st, float_weights, t_all)


def _check_outputs(opts: PTQOptions, float_weights) -> None:
    """Every output location usable and none of them the float input, before any work."""
    inputs = [float_weights] if isinstance(float_weights, (str, Path)) else []
    if opts.run_dir is not None:
        check_output_dir(opts.run_dir, inputs, what="PTQ run directory")
    out = opts.out if opts.out is not None else (
        Path(opts.run_dir) / "ptq.pt" if opts.run_dir is not None else None)
    for path in (out, opts.out_full):
        if path is not None:
            check_output_file(path, inputs, what="PTQ checkpoint")


def _stage(name: str, st: _PTQState, fn, *args) -> None:
    t0 = time.perf_counter()
    fn(st, *args)
    st.times[name] = time.perf_counter() - t0


def _load_float_and_data(st: _PTQState, float_weights, dev) -> None:
    """Float model (EMA weights, fused), calibration batches, validation set and loader."""
    cfg = st.cfg
    st.float_model = load_model(float_weights, cfg=cfg, device=dev)
    if is_quantized(st.float_model):
        raise ValueError(f"{float_weights}: already a quantized checkpoint; PTQ needs float "
                         f"weights")
    if not getattr(st.float_model, "is_fused", True):
        st.float_model.fuse()
    _, st.val_ds, info = build_datasets_from_config(cfg, splits=("val",), verbose=False)
    check_model_nc(st.float_model, st.val_ds.nc, float_weights, info["yaml_file"])  # before calib
    st.batches = calibration_batches(cfg)
    st.sel_ds = selection_val_set(cfg, st.val_ds)

    def loader(ds):
        return build_dataloader(ds, int(cfg.eval.batch_size), shuffle=False,
                                workers=min(int(cfg.data.workers), 2), seed=int(cfg.train.seed),
                                persistent_workers=False)
    st.val_loader = loader(st.val_ds)
    st.sel_loader = st.val_loader if st.sel_ds is st.val_ds else loader(st.sel_ds)


def _calibrate_all(st: _PTQState) -> None:
    q = st.cfg.quant
    st.qmodel = quantize_model(st.float_model, st.cfg, st.batches, progress=st.opts.progress)
    st.say(f"PTQ: {len(quantized_layers(st.qmodel))} quantized layers, calib={q.calib}, "
           f"{'per-channel' if q.per_channel_weights else 'per-tensor'} weights "
           f"({q.weight_calib} ranges), flavour={q.flavour}, "
           f"{sum(len(b) for b in st.batches)} calibration images")


def _evaluate_all(st: _PTQState) -> None:
    """Float vs PTQ mAP on the validation set (the first ``eval_images``)."""
    st.eval_full = make_map_fn(st.cfg, st.val_ds, st.val_loader, max_images=st.opts.eval_images,
                               progress=st.opts.progress, desc="eval")
    st.float_m, st.ptq_m = st.eval_full(st.float_model), st.eval_full(st.qmodel)


def _rank_layers(st: _PTQState) -> None:
    o = st.opts
    st.report, st.eval_sub, st.sub_float, st.sub_ptq = _sensitivity(
        st.qmodel, st.float_model, st.cfg, st.batches, st.sel_ds, st.sel_loader,
        o.sensitivity_mode if o.sensitivity else "proxy", o.all_but, o.progress, st.say,
        Path(o.run_dir) if o.run_dir is not None else None, st.files)


def _choose_float_layers(st: _PTQState) -> None:
    """The layers partial quantization keeps float: the top ``skip_top`` of the ranking, or the
    fewest that meet ``max_drop`` (:func:`~yolo_q.quant.partial.search_max_drop`)."""
    o = st.opts
    if o.skip_top is not None:
        st.chosen = partial_mod.skip_top(st.report["ranking"], int(o.skip_top))
        return
    cache: Dict[tuple, float] = {(): st.sub_ptq["map50_95"]}

    def evaluate_skip(skip: List[str]) -> float:
        if tuple(skip) not in cache:
            m = quantize_model(st.float_model, st.cfg, st.batches, skip=skip, progress=False)
            cache[tuple(skip)] = st.eval_sub(m)["map50_95"]
        return cache[tuple(skip)]

    t0 = time.perf_counter()
    st.search = partial_mod.search_max_drop(st.report["ranking"], evaluate_skip,
                                            st.sub_float["map50_95"], float(o.max_drop),
                                            max_steps=o.max_search_steps, progress=o.progress,
                                            log=st.say)
    st.times["search"] = time.perf_counter() - t0
    st.chosen = st.search["skip"]


def _partial_model(st: _PTQState):
    """The model with the chosen layers float, and its validation mAP."""
    final = st.qmodel
    if st.chosen:
        final = quantize_model(st.float_model, st.cfg, st.batches, skip=st.chosen,
                               progress=st.opts.progress)
        st.partial_m = st.eval_full(final)
    else:
        st.partial_m = dict(st.ptq_m)
    st.say(f"partial quantization: {len(st.chosen)} float layer(s)"
           f"{': ' + ', '.join(st.chosen) if st.chosen else ''}")
    return final


def _comparison_table(st: _PTQState) -> str:
    table = format_comparison(st.float_m, st.ptq_m, st.partial_m,
                              partial_label=f"partial ({len(st.chosen)} float)",
                              title=f"val mAP ({st.float_m['images']} images)")
    if st.sub_float is not None:
        table += "\n" + format_comparison(
            st.sub_float, st.sub_ptq, title=f"sensitivity subset ({st.sub_float['images']} images)")
    return table


def _save_checkpoints(st: _PTQState, ptq_info: Dict[str, Any], out, run_dir) -> None:
    """``out`` (the final, maybe partial model) and ``out_full`` (every layer quantized); the
    saved config rebuilds the same (partial) model."""
    q, chosen = st.cfg.quant, st.chosen
    if chosen:
        base = [str(s) for s in (q.skip_layers or [])]
        q.skip_layers = base + [s for s in chosen if s not in base]
    if st.opts.out_full is not None:
        full_cfg = config_to_dict(st.cfg)
        full_cfg["quant"]["skip_layers"] = [str(s) for s in (q.skip_layers or []) if s not in chosen]
        save_checkpoint({"model": st.qmodel.state_dict(), "config": full_cfg,
                         "quant": quant_state(st.qmodel),
                         "ptq": jsonable(dict(ptq_info, partial=None, skip_layers=[])),
                         "skip_layers": []}, st.opts.out_full)
        st.files["checkpoint_full"] = str(st.opts.out_full)
    if out is not None:
        save_checkpoint({"model": st.final.state_dict(), "config": config_to_dict(st.cfg),
                         "quant": quant_state(st.final), "ptq": jsonable(ptq_info),
                         "skip_layers": list(chosen)}, out)
        st.files["checkpoint"] = str(out)
    if run_dir is not None:
        st.files["config"] = str(save_config(st.cfg, run_dir / "config.yaml"))
        st.files["summary"] = str(run_dir / "summary.json")


_SENS_KEYS = ("mode", "gain", "proxy_metric", "rank_by", "ranking", "proxy_seconds",
              "exact_seconds", "all_but_seconds", "speedup", "spearman", "exact_split_half",
              "exact_reliability", "spearman_ceiling", "proxy_images", "subset_images")


def _write_outputs(st: _PTQState, float_weights, t_all: float) -> Dict[str, Any]:
    """Checkpoints, config, ``summary.json`` and the printed table; returns the summary."""
    q, o = st.cfg.quant, st.opts
    run_dir = Path(o.run_dir) if o.run_dir is not None else None
    out = Path(o.out) if o.out is not None else (run_dir / "ptq.pt" if run_dir else None)
    table = _comparison_table(st)
    ptq_info = {"float": st.float_m, "ptq": st.ptq_m, "partial": st.partial_m, "calib": q.calib,
                "per_channel_weights": bool(q.per_channel_weights), "flavour": q.flavour,
                "calib_images": int(sum(len(b) for b in st.batches)),
                "quantized_layers": len(quantized_layers(st.qmodel)),
                "skip_layers": st.chosen, "source": str(float_weights)}
    _save_checkpoints(st, ptq_info, out, run_dir)
    st.times["total"] = time.perf_counter() - t_all
    fm, pm = st.float_m["map50_95"], st.partial_m["map50_95"] if st.partial_m else None
    summary = dict(ptq_info, subset_float=st.sub_float, subset_ptq=st.sub_ptq,
                   drop_points=100 * (fm - st.ptq_m["map50_95"]),
                   partial_drop_points=100 * (fm - pm) if pm is not None else None,
                   sensitivity=None if st.report is None else
                   {k: st.report.get(k) for k in _SENS_KEYS},
                   search=st.search, integer_check=st.int_check, times=st.times, files=st.files,
                   run_dir=str(run_dir) if run_dir else None, table=table)
    if run_dir is not None:
        write_json(st.files["summary"], jsonable(summary))
    st.say("\n" + table, end="")
    return summary


__all__ = ["calibration_batches", "calibration_dataset", "cached_val_batches",
           "format_comparison", "make_map_fn", "PTQOptions", "quantize_model", "run_ptq",
           "selection_val_set"]
