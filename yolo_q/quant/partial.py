"""Partial quantization: keep the most sensitive layers in float.

* :func:`skip_top` - the ``k`` first layers of a sensitivity ranking.
* :func:`search_max_drop` - the fewest float layers (a prefix of the ranking, added greedily one
  at a time) that keep mAP50-95 within ``max_drop`` of the float model. ``max_drop`` is in mAP
  **percentage points**: ``0.3`` means mAP50-95 may be at most 0.003 below float (e.g. 0.4120
  float -> >= 0.4090).

The float layers become ``quant.skip_layers`` of a fresh :func:`yolo_q.quant.convert` (plain
modules, no quantizers), so they are saved in the checkpoint's quant state and the QDQ export
has no Q/DQ on them (:func:`float_layers_in_onnx` checks an exported graph).

* :func:`with_float_layers` - a trained (QAT) model with some of its layers made float, every
  other range kept, nothing calibrated again (the partial model of a QAT checkpoint,
  :mod:`yolo_q.quant.qat_partial`).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch.nn as nn

from ..export.qdq import conv_quantization
from ..io import load_state_into
from ..models import build_model
from .convert import (apply_shared_scales, convert, floor_weight_scales, quant_state,
                      resolve_settings)
from .modules import QUANTIZER_ATTRS

logger = logging.getLogger(__name__)


def skip_top(ranking: Sequence[str], k: int) -> List[str]:
    """The ``k`` most sensitive layers of ``ranking`` (most sensitive first)."""
    if k < 0:
        raise ValueError(f"--skip-top must be >= 0, got {k}")
    if k > len(ranking):
        raise ValueError(f"--skip-top {k}: the model has only {len(ranking)} quantized layers")
    return list(ranking[:k])


def within_drop(float_map: float, m: float, max_drop: float) -> bool:
    """Whether mAP50-95 ``m`` is at most ``max_drop`` points below ``float_map`` (both as
    fractions; inclusive, with a 1e-9 tolerance for the points' rounding)."""
    return 100.0 * (float_map - m) <= max_drop + 1e-9


def search_max_drop(ranking: Sequence[str], evaluate_skip: Callable[[List[str]], float],
                    float_map: float, max_drop: float, max_steps: Optional[int] = None,
                    progress: bool = True, log: Optional[Callable[[str], None]] = None) -> dict:
    """Greedy search for the fewest float layers that keep mAP within ``max_drop`` points.

    For ``k = 0, 1, 2, ...`` the ``k`` most sensitive layers of ``ranking`` stay float and
    ``evaluate_skip(layers) -> mAP50-95`` measures the partly quantized model; the search stops
    at the first ``k`` with ``100 * (float_map - mAP) <= max_drop``. ``max_steps`` caps the
    number of evaluations (default: until every layer is float). Returns ``{"skip": [...],
    "reached": bool, "max_drop": ..., "float_map50_95": ..., "steps": [{"k", "added", "map50_95",
    "drop_points", "ok"}]}``; when the target is not reached ``skip`` is the best step's set.
    """
    from tqdm import tqdm

    if max_drop < 0:
        raise ValueError(f"--max-drop must be >= 0 (mAP percentage points), got {max_drop}")
    limit = len(ranking) + 1 if max_steps is None else min(int(max_steps), len(ranking) + 1)
    steps: List[Dict] = []
    result = {"skip": [], "reached": False, "max_drop": float(max_drop),
              "float_map50_95": float(float_map), "steps": steps}
    bar = tqdm(total=limit, desc=f"partial [max-drop {max_drop}]", leave=False,
               disable=not progress)
    for k in range(limit):
        skip = list(ranking[:k])
        m = float(evaluate_skip(skip))
        drop = 100.0 * (float_map - m)
        ok = within_drop(float_map, m, max_drop)
        steps.append({"k": k, "added": ranking[k - 1] if k else None, "map50_95": m,
                      "drop_points": drop, "ok": ok})
        msg = (f"partial: {k:2d} float layer(s){' (+' + ranking[k - 1] + ')' if k else ''}: "
               f"mAP50-95 {m:.4f}, drop {drop:.2f} pts {'<=' if ok else '>'} {max_drop}")
        (log or logger.info)(msg)
        bar.update(1)
        if ok:
            result.update(skip=skip, reached=True)
            break
    bar.close()
    if not result["reached"]:
        best = max(steps, key=lambda s: (s["map50_95"], -s["k"]))
        result["skip"] = list(ranking[:best["k"]])
    result["num_float"] = len(result["skip"])
    return result


def float_layers_in_onnx(path, layers: Sequence[str], check_input: bool = True) -> Dict[str, bool]:
    """For each layer name: True when its node in the exported ONNX graph reads its weight (and,
    with ``check_input``, its input) from no DequantizeLinear, i.e. it runs in float. In the
    onnxruntime flavour a float layer can still read a tensor that its (quantized) producer
    quantized at its output: use ``check_input=False`` there."""

    info = conv_quantization(path)
    out = {}
    for name in layers:
        node = info.get(name)
        if node is None:
            raise KeyError(f"{path}: no Conv/MaxPool node for layer '{name}'")
        out[name] = not node["weight"] and not (check_input and node["input"])
    return out


# the quant-state entries that are convert() settings (the rest describes the layers)
_STATE_SETTINGS = ("flavour", "num_bits", "per_channel_weights", "weight_calib",
                   "high_precision_outputs", "preact_output", "share_concat_scales", "calib",
                   "percentile", "num_histogram_bins", "calib_batches")


def _is_quantizer_key(key: str) -> bool:
    return any(f".{a}." in key for a in QUANTIZER_ATTRS)


def with_float_layers(model: nn.Module, layers: Sequence[str], cfg) -> nn.Module:
    """A copy of the calibrated (or QAT-trained) quantized ``model`` with ``layers`` float too.

    The model is rebuilt by :func:`~yolo_q.quant.convert` with ``layers`` added to its float
    layers (``cfg``: the model's config, for ``build_model(cfg).fuse()``), so its structure is
    what a checkpoint, the QDQ export and the integer check expect. Weights and every remaining
    range are copied; a reader that took its input grid from a producer that is now float (the
    onnxruntime flavour shares one quantizer between a conv's output and its readers) gets its
    own input quantizer with the producer's range - the same grid as before. Nothing is
    calibrated again. Shared-scale groups are re-tied and the int32 bias floor re-applied."""
    state = quant_state(model)
    layers = [str(n) for n in layers]
    unknown = [n for n in layers if n not in {s["name"] for s in state["layers"]}]
    if unknown:
        raise ValueError(f"with_float_layers: not quantized layer(s) {unknown[:3]}")
    sd = model.state_dict()
    fused = build_model(cfg).fuse()
    load_state_into(fused, {k: v for k, v in sd.items() if not _is_quantizer_key(k)},
                    "quantized model")
    settings = resolve_settings(None, **{k: state[k] for k in _STATE_SETTINGS},
                                skip_layers=list(state["skip"]) + layers)
    out = convert(fused.to(next(model.parameters()).device), **settings)
    new_sd = out.state_dict()
    reads_from = {s["name"]: s["input_from"] for s in state["layers"]}
    for k in new_sd:
        if k in sd:
            new_sd[k] = sd[k]
        elif k.endswith("._input_quantizer._amax"):  # its grid came from a producer's output
            new_sd[k] = sd[f"{reads_from[k[:-len('._input_quantizer._amax')]]}._amax"]
        else:
            raise KeyError(f"with_float_layers: no value for {k}")
    out.load_state_dict(new_sd)
    apply_shared_scales(out)
    floor_weight_scales(out)
    return out.train(model.training)


__all__ = ["float_layers_in_onnx", "search_max_drop", "skip_top", "with_float_layers",
           "within_drop"]
