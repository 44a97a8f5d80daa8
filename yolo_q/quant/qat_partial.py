"""QAT-aware partial quantization: the fewest layers a TRAINED (QAT) model keeps float.

PTQ's sensitivity ranking says whose rounding hurts the float weights most; QAT then learns
around most of that, and the loss it leaves sits elsewhere. So this ranking is measured on the
trained model itself, one evaluation per group of layers (:func:`layer_groups`: each level of
the detection head, each backbone / neck block): the group made float (:func:`~yolo_q.quant.
partial.with_float_layers`: the model rebuilt with those layers float, every other range kept,
nothing calibrated again) and the mAP that recovers on the selection set (``quant.select_data``,
its first ``quant.sensitivity_images``). Then :func:`~yolo_q.quant.partial.search_max_drop`
along the group ranking, and every layer of the chosen groups whose float is not needed goes
back to INT8 (:func:`prune_float_layers`). There is no retraining: the partial model is the QAT
model with those layers float.

Why groups, measured on the RepVGG reference model's QAT+CWD checkpoint (500 selection images;
``benchmarks/reference/README.md``): PTQ's proxy ranking (output error of one layer quantized
alone) recovered nothing with its first 11 layers float (QAT has learned around exactly those);
single layers made float recover at most 0.05 point each and their gains do not add up (5 top
layers: +0.05). As groups, the stride-8 head level is the one that matters on all 1000 held-out
images (+0.12 of a 0.22 gap; +0.18 of 0.23 on RepOpt), though 500 images do not resolve it.

    summary = run_qat_partial(cfg, "runs/qat/exp/weights/best.pt", "float.pt", max_drop=0.1,
                              out="runs/qat/exp/weights/partial.pt")
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.nn as nn

from ..config import config_to_dict
from ..data import build_datasets_from_config
from ..eval.runner import make_evaluate_fn, val_loader
from ..io import check_output_file, flush_denormal, jsonable, save_checkpoint
from .convert import is_quantized, quant_state, quantized_layers
from .load import load_model
from .partial import search_max_drop, with_float_layers, within_drop
from .ptq import cached_val_batches, make_map_fn, selection_val_set


def layer_groups(names: Sequence[str]) -> Dict[str, List[str]]:
    """The structural units the ranking makes float together: each level of the detection head
    (``detect.<branch>.<i>...`` -> ``detect.*.<i>``), else a backbone / neck block (the first
    two parts of the name, e.g. ``neck.Rep_n3``). In execution order of their first layer."""
    groups: Dict[str, List[str]] = {}
    for n in names:
        parts = n.split(".")
        head_level = parts[0] == "detect" and len(parts) > 2 and parts[2].isdigit()
        key = f"detect.*.{parts[2]}" if head_level else ".".join(parts[:2])
        groups.setdefault(key, []).append(n)
    return groups


def rank_trained(model: nn.Module, cfg, evaluate_fn: Callable[[nn.Module], dict],
                 groups: Optional[Dict[str, List[str]]] = None, progress: bool = False
                 ) -> Dict[str, Any]:
    """Each group of quantized layers (default :func:`layer_groups`) made float alone:
    ``{"map50_95": the model's mAP, "gain": {group: mAP recovered, points}, "ranking": groups,
    most recovered first (ties in order), "groups", "seconds"}``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    groups = layer_groups(quantized_layers(model)) if groups is None else dict(groups)
    base = float(evaluate_fn(model)["map50_95"])
    gain = {}
    for g in tqdm(groups, desc="rank on the trained model", leave=False, disable=not progress):
        m = float(evaluate_fn(with_float_layers(model, groups[g], cfg))["map50_95"])
        gain[g] = 100.0 * (m - base)
    return {"map50_95": base, "gain": gain, "ranking": sorted(groups, key=lambda g: -gain[g]),
            "groups": groups, "seconds": time.perf_counter() - t0}


def prune_float_layers(layers: Sequence[str], evaluate_skip: Callable[[List[str]], float],
                       float_map: float, max_drop: float,
                       log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Quantize again, one at a time (last first), every layer of ``layers`` whose float is not
    needed: a layer goes back to INT8 when ``evaluate_skip`` of the rest still meets
    ``max_drop``. Returns ``{"skip": the layers left float, "steps": [{"removed", "map50_95",
    "kept"}]}`` (one evaluation per layer)."""
    keep = list(layers)
    steps = []
    for n in reversed(list(layers)):
        trial = [k for k in keep if k != n]
        m = float(evaluate_skip(trial))
        ok = within_drop(float_map, m, max_drop)
        steps.append({"removed": n, "map50_95": m, "kept": not ok})
        (log or (lambda _m: None))(f"prune: {n} {'INT8 again' if ok else 'stays float'} "
                                   f"(mAP50-95 {m:.4f} without it)")
        if ok:
            keep = trial
    return {"skip": keep, "steps": steps}


def _checked_models(weights, teacher, cfg):
    model = load_model(weights, cfg=cfg).eval()
    if not is_quantized(model):
        raise ValueError(f"{weights}: not a quantized checkpoint (QAT-aware partial "
                         f"quantization needs a QAT or PTQ checkpoint)")
    float_model = load_model(teacher, cfg=cfg).eval()
    if is_quantized(float_model):
        raise ValueError(f"{teacher}: a quantized checkpoint; the reference must be float")
    if not getattr(float_model, "is_fused", True):
        float_model.fuse()
    return model, float_model


def _choose(model, cfg, ev, float_map: float, max_drop: float, max_steps: Optional[int],
            progress: bool, say) -> Dict[str, Any]:
    """Rank the groups, search along the ranking, prune the chosen groups' layers."""
    rank = rank_trained(model, cfg, ev, progress=progress)
    say(f"QAT-aware partial: {len(rank['groups'])} groups of layers ranked on the trained model "
        f"in {rank['seconds']:.0f} s (float {100 * float_map:.2f}, QAT "
        f"{100 * rank['map50_95']:.2f}); most recovered: "
        + ", ".join(f"{g} {rank['gain'][g]:+.2f}" for g in rank["ranking"][:4]))
    groups = rank["groups"]
    cache: Dict[tuple, float] = {(): rank["map50_95"]}  # sorted float layers -> mAP
    cache.update({tuple(sorted(groups[g])): rank["map50_95"] + rank["gain"][g] / 100.0
                  for g in groups})

    def evaluate_skip(layers: List[str]) -> float:
        key = tuple(sorted(layers))
        if key not in cache:
            cache[key] = float(ev(with_float_layers(model, layers, cfg))["map50_95"])
        return cache[key]

    search = search_max_drop(rank["ranking"], lambda gs: evaluate_skip(
        [n for g in gs for n in groups[g]]), float_map, max_drop, max_steps=max_steps,
        progress=progress, log=say)
    layers = [n for g in search["skip"] for n in groups[g]]
    prune = None
    if layers:
        # not reached: the fewest layers that keep the best set's accuracy
        target = max_drop if search["reached"] else 100.0 * (float_map - evaluate_skip(layers))
        prune = prune_float_layers(layers, evaluate_skip, float_map, target, log=say)
        layers = prune["skip"]
    return {"float_layers": layers, "float_groups": list(search["skip"]),
            "reached": bool(search["reached"]), "select_partial": evaluate_skip(layers),
            "qat": rank["map50_95"], "ranking": rank["ranking"], "gain": rank["gain"],
            "steps": search["steps"], "prune": prune["steps"] if prune else []}


def run_qat_partial(cfg, weights, teacher, max_drop: float, out,
                    max_search_steps: Optional[int] = None, progress: bool = False,
                    say: Callable[..., None] = print) -> Dict[str, Any]:
    """The QAT-aware partial model of the quantized checkpoint ``weights`` (see the module
    doc): groups of layers (:func:`layer_groups`) ranked by the mAP each recovers made float;
    the fewest groups along that ranking that bring the model within ``max_drop`` mAP50-95
    points of the float checkpoint ``teacher`` on the selection set (at most
    ``max_search_steps`` evaluations; not reached: the best set tried); then every layer of
    those groups that is not needed goes back to INT8 (:func:`prune_float_layers`; not
    reached: every layer whose float does not add to the best set's accuracy). Saves the
    model to ``out`` (a quantized checkpoint; its config lists the float layers in
    ``quant.skip_layers``) and evaluates it on the val set. Returns ``{"weights",
    "float_layers", "float_groups", "reached", "max_drop", "select": {"images", "float",
    "qat", "partial"} (mAP50-95 on the selection set), "metrics" (val), "ranking", "gain",
    "steps", "prune", "seconds"}``."""
    if max_drop is None or not float(max_drop) >= 0:
        raise ValueError(f"quant.qat.max_drop must be >= 0 (mAP points), got {max_drop}")
    check_output_file(out, [weights, teacher], what="QAT partial checkpoint")
    t0 = time.perf_counter()
    with flush_denormal(True):
        model, float_model = _checked_models(weights, teacher, cfg)
        _, val_ds, _ = build_datasets_from_config(cfg, splits=("val",), verbose=False)
        sel_ds = selection_val_set(cfg, val_ds)
        n_sel = int(cfg.quant.sensitivity_images)
        ev = make_map_fn(cfg, sel_ds, cached_val_batches(val_loader(cfg, sel_ds, workers=0),
                                                         n_sel))
        float_map = float(ev(float_model)["map50_95"])
        c = _choose(model, cfg, ev, float_map, float(max_drop), max_search_steps, progress, say)
        layers = c.pop("float_layers")
        partial = with_float_layers(model, layers, cfg) if layers else model
        metrics = make_evaluate_fn(cfg, val_ds)(partial)
    info = {"weights": str(out), "source": str(weights), "float_layers": layers,
            "max_drop": float(max_drop),
            "select": {"images": min(n_sel, len(sel_ds)),
                       "float": float_map, "qat": c.pop("qat"),
                       "partial": c.pop("select_partial")},
            "metrics": {k: float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
            **c, "seconds": time.perf_counter() - t0}
    _save_partial(partial, cfg, layers, info, out)
    return info


def _save_partial(model, cfg, layers, info, out) -> None:
    cfg_out = config_to_dict(cfg)
    base = [str(s) for s in (cfg_out["quant"].get("skip_layers") or [])]
    cfg_out["quant"]["skip_layers"] = base + [s for s in layers if s not in base]
    save_checkpoint({"model": model.state_dict(), "config": cfg_out, "quant": quant_state(model),
                     "qat_partial": jsonable({k: v for k, v in info.items() if k != "gain"}),
                     "skip_layers": list(layers)}, Path(out))


__all__ = ["layer_groups", "prune_float_layers", "rank_trained", "run_qat_partial"]
