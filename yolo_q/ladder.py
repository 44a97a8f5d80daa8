"""The accuracy ladder of a converged float checkpoint (issue #16, item 3): float; PTQ with each
calibrator (per-channel weights); per-tensor weights; partial quantization; QAT without and
with channel-wise distillation; ONNX Runtime INT8 of the QAT+CWD model (onnxruntime flavour)
and of the PTQ model (tensorrt flavour) - all on the same val images - written as one JSON.

It is the pipeline (:class:`yolo_q.pipeline.Pipeline`) run on the given checkpoint
(``pipeline.float_weights``: no float training) with the QAT comparison run on, plus one
per-tensor-weights PTQ; the pipeline's settings (calibrators, ``max_drop``, flavours, QAT
epochs) come from the variant's config. Each variant runs in its own pipeline directory
(``<pipeline.output_dir>/<out stem>_<name>``, e.g. ``ladder_repvgg`` for ``ladder.json``), so an
interrupted ladder continues where it stopped; variants already in ``out`` that are not re-run
are kept.

``ladder.json``::

    {"data_command": ..., "eval_command": ...,
     "variants": {"repvgg": {"float_weights", "float_sha256", "config", "epochs", "curve", "float",
                             "ptq": {calibrator: mAP}, "per_tensor", "partial",
                             "partial_float_layers", "qat", "qat_cwd",
                             "qat_cwd_partial"?, "qat_partial_float_layers"?,
                             "qat_partial_max_drop"?, "ort_int8_qat_partial"?, "ort_int8",
                             "ort_int8_trt_flavour", "regime", "val_images"}, ...}}

(``?``: only with ``quant.qat.max_drop``, QAT-aware partial quantization of the QAT+CWD model.)
mAP50-95 in % (2 decimals); ``curve``: the val mAP of every evaluated epoch, read from the
training's ``results.csv`` shipped beside the checkpoint (``<weights stem>.csv``; empty when
absent).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import copy_config, resolve_config
from .data import build_datasets_from_config
from .engine.hooks import read_results_csv
from .eval.backends import OrtBackend, TorchBackend
from .eval.runner import make_evaluate_fn
from .io import read_checkpoint_any, read_json, write_json
from .pipeline import Pipeline
from .quant import load_model
from .quant.ptq import run_ptq
from .quant.qat import qat_epochs
from .reference import sha256

__all__ = ["LadderVariant", "data_command", "ladder_entry", "reevaluate_ladder", "run_ladder"]

# the ladder's pipeline settings that the variant config cannot turn off
FORCED = ["pipeline.variants=[base]", "pipeline.qat=true", "pipeline.qat_distill=true",
          "pipeline.qat_compare_no_distill=true", "pipeline.flavours=[onnxruntime,tensorrt]"]


@dataclass
class LadderVariant:
    name: str  # e.g. repvgg, repopt
    config: str  # the variant's (reference) config
    weights: str  # its float checkpoint


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(100.0 * float(v), 2)


def data_command(cfg) -> str:
    """The ``datasets/synthetic.py`` command that regenerates ``cfg.pipeline.synthetic``."""
    syn = cfg.pipeline.synthetic
    if syn is None:
        raise ValueError("ladder: the config has no pipeline.synthetic section; pass the data "
                         "command explicitly")
    spec = " ".join(f"{k}={v}" for k, v in (syn.spec or {}).items())
    return (f"python datasets/synthetic.py --out {syn.out} --train {syn.train} --val {syn.val} "
            f"--size {syn.size} --seed {syn.seed}" + (f" --spec {spec}" if spec else ""))


def _curve(weights: str) -> Dict[str, Any]:
    csv = Path(weights).with_suffix(".csv")
    if not csv.is_file():
        ck = read_checkpoint_any(weights)
        return {"epochs": int(ck.get("epoch", -1)) + 1 if "epoch" in ck else None, "curve": []}
    rows = read_results_csv(csv)
    return {"epochs": int(rows[-1]["epoch"]) if rows else None,
            "curve": [_pct(r["map50_95"]) for r in rows if r.get("map50_95") is not None]}


def _chosen_on(cfg) -> str:
    """Where the ladder's choices (partial search, QAT's best epoch) were measured."""
    q = cfg.quant
    if not q.get("select_data"):
        return "; choices on the val images"
    return f"; choices on the val split of {q.select_data} ({q.sensitivity_images} for the search)"


def ladder_entry(result: Dict[str, Any], per_tensor: Dict[str, Any], cfg) -> Dict[str, Any]:
    """One variant's ladder row from its pipeline results (``Pipeline.run()['results']['base']``)
    and the per-tensor PTQ summary."""
    rows = {(r["stage"], r["runtime"]): r for r in result["eval"]["rows"] if not r.get("skipped")}

    def m(stage, runtime):
        r = rows.get((stage, runtime))
        return _pct(r["map50_95"]) if r else None

    ptq = result["ptq"]
    q = cfg.quant
    return {
        "float": m("float", "torch FP32"),
        "ptq": {c["calib"]: _pct(c["map50_95"]) for c in ptq["calib_rows"]},
        "per_tensor": _pct(per_tensor["ptq"]["map50_95"]),
        "partial": _pct((ptq.get("partial") or {}).get("map50_95")),
        "partial_float_layers": list(ptq.get("skip_layers") or []),
        "qat": m("qat", "torch fake-quant"),
        "qat_cwd": m("qat+cwd", "torch fake-quant"),
        **_qat_partial(result, rows),
        "ort_int8": m("qat+cwd", "ORT INT8 (onnxruntime flavour)"),
        "ort_int8_trt_flavour": m("ptq", "ORT INT8 (tensorrt flavour)"),
        "regime": (f"{q.calib} calibration, "
                   f"INT8 {'per-channel' if q.per_channel_weights else 'per-tensor'} weights"
                   f"{' (mse ranges)' if q.weight_calib == 'mse' else ''}, "
                   f"per-tensor activations, {'float' if q.high_precision_outputs else 'INT8'} "
                   f"head outputs; partial at max_drop {cfg.pipeline.max_drop}; QAT "
                   f"{qat_epochs(cfg)} epoch(s)"
                   f"{', mosaic off' if cfg.quant.qat.close_mosaic else ' with mosaic'}"
                   f"{_chosen_on(cfg)}"),
        "val_images": int(rows[("float", "torch FP32")].get("images") or 0)
        if ("float", "torch FP32") in rows else None,
    }


def _qat_partial(result: Dict[str, Any], rows) -> Dict[str, Any]:
    """The QAT-aware partial row (``quant.qat.max_drop``), when the pipeline ran it."""
    part = result.get("qat_partial")
    if not part:
        return {}
    row = next((r for (stage, runtime), r in rows.items()
                if stage.startswith("qat+cwd partial") and runtime == "torch fake-quant"), None)
    ort = next((r for (stage, runtime), r in rows.items()
                if stage.startswith("qat+cwd partial") and runtime.startswith("ORT INT8")), None)
    return {"qat_cwd_partial": _pct(row["map50_95"]) if row else None,
            "qat_partial_float_layers": list(part["float_layers"]),
            "qat_partial_max_drop": part["max_drop"],
            "ort_int8_qat_partial": _pct(ort["map50_95"]) if ort else None}


def _run_variant(v: LadderVariant, overrides: Sequence[str], verbose: bool,
                 tag: str = "ladder") -> Dict[str, Any]:
    cfg = resolve_config(v.config, list(overrides) + FORCED + [
        f"pipeline.float_weights={v.weights}", f"pipeline.name={tag}_{v.name}"])
    res = Pipeline(cfg, verbose=verbose).run()["results"]["base"]
    p = cfg.pipeline
    calib = str(cfg.quant.calib)
    pt_dir = Path(p.output_dir) / p.name / "per_tensor"
    per_tensor = run_ptq(copy_config(cfg), res["train"]["weights"], calib=calib,
                         per_tensor_weights=True, run_dir=pt_dir, out=pt_dir / "ptq.pt",
                         eval_images=p.eval_images, progress=False, verbose=False)
    entry = {"float_weights": str(v.weights), "float_sha256": sha256(v.weights),
             "config": str(v.config), **_curve(v.weights),
             **ladder_entry(res, per_tensor, cfg)}
    return entry


def _kept(out, names) -> Dict[str, Any]:
    """What an existing ladder JSON ``out`` keeps from earlier sittings: ``{"variants": the
    variants this run does not redo, "eval_command": its eval command}`` (both only when some
    variant is kept: the eval command names the ladder's first variant)."""
    p = Path(out)
    if not p.is_file():
        return {}
    try:
        old = read_json(p)
    except ValueError:
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("variants", {}), dict):
        raise ValueError(f"ladder: {out} exists and is not a ladder JSON; move it away first")
    variants = {k: e for k, e in (old.get("variants") or {}).items() if k not in names}
    if not variants:
        return {}
    kept = {"variants": variants}
    if isinstance(old.get("eval_command"), str):
        kept["eval_command"] = old["eval_command"]
    return kept


def run_ladder(variants: Sequence[LadderVariant], out: str, overrides: Sequence[str] = (),
               data_cmd: Optional[str] = None, verbose: bool = True) -> Dict[str, Any]:
    """Run the ladder of every variant and write ``out`` (see the module docstring). The
    ``eval_command`` evaluates the first variant's checkpoint with its config (the earlier
    sitting's, when ``out`` keeps variants of one)."""
    if not variants:
        raise ValueError("ladder: no variants given")
    for v in variants:
        for what, path in (("config", v.config), ("weights", v.weights)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"ladder: {v.name}: {what} {path} does not exist")
    first = variants[0]
    cfg0 = resolve_config(first.config, overrides)
    ov = " ".join(shlex.quote(o) for o in overrides)
    kept = _kept(out, {v.name for v in variants})
    result: Dict[str, Any] = {
        "data_command": data_cmd or data_command(cfg0),
        "eval_command": kept.get("eval_command") or (
            f"python tools/eval.py --config {first.config} --weights {first.weights}"
            + (f" {ov}" if ov else "")),
        "variants": kept.get("variants", {})}
    for v in variants:
        result["variants"][v.name] = _run_variant(v, overrides, verbose, Path(out).stem)
        write_json(out, result)  # after every variant: a partial ladder is kept
    return result


# ------------------------------------------------------------------ re-evaluation on more images
REEVAL_RUNTIMES = ("torch FP32", "torch fake-quant", "ORT INT8 (onnxruntime flavour)",
                   "ORT INT8 (tensorrt flavour)")


def reevaluate_ladder(ladder_json, val_yaml, output_dir: str = "runs/pipeline",
                      native_conv: bool = True) -> Dict[str, Any]:
    """Evaluate the models a ladder already made (its pipelines' torch and ONNX Runtime rows,
    ``<output_dir>/<json stem>_<variant>/pipeline.json``) again on the val split of
    ``val_yaml`` - more images than the ladder's, to see which differences are real.
    ``native_conv``: every torch row also with PyTorch's own convolution instead of oneDNN
    (another float summation order: how much an INT8 model's mAP moves with the float
    arithmetic alone). Returns ``{variant: [{stage, runtime, source, ladder (mAP on the
    ladder's images), map50_95, native_conv?}, ...]}`` (mAP in %)."""
    ladder = read_json(ladder_json)
    out: Dict[str, Any] = {}
    for name, entry in (ladder.get("variants") or {}).items():
        pipe = Path(output_dir) / f"{Path(ladder_json).stem}_{name}" / "pipeline.json"
        if not pipe.is_file():
            raise FileNotFoundError(f"{ladder_json}: variant '{name}': {pipe} not found (the "
                                    f"ladder's pipeline directory)")
        cfg = resolve_config(entry["config"], [f"data.dataset={val_yaml}"])
        _, val_ds, _ = build_datasets_from_config(cfg, splits=("val",), verbose=False)
        evaluate = {b: make_evaluate_fn(cfg, val_ds, backend=b)
                    for b in (OrtBackend, TorchBackend)}
        rows = []
        for r in read_json(pipe)["eval"]["result"]["rows"]:
            if r.get("skipped") or r["runtime"] not in REEVAL_RUNTIMES:
                continue
            ort = r["runtime"].startswith("ORT")
            ev = evaluate[OrtBackend if ort else TorchBackend]
            src = r["source"] if ort else load_model(r["source"]).eval()
            row = {"stage": r["stage"], "runtime": r["runtime"], "source": r["source"],
                   "ladder": _pct(r["map50_95"]), "map50_95": _pct(ev(src)["map50_95"])}
            if native_conv and not ort:
                torch.backends.mkldnn.enabled = False
                try:
                    row["native_conv"] = _pct(ev(src)["map50_95"])
                finally:
                    torch.backends.mkldnn.enabled = True
            rows.append(row)
        out[name] = rows
    return out


def parse_variant(spec: str) -> LadderVariant:
    """``name=config.yaml:weights.pt`` -> :class:`LadderVariant`."""
    name, sep, rest = spec.partition("=")
    config, sep2, weights = rest.partition(":")
    if not (sep and sep2 and name and config and weights):
        raise ValueError(f"--variant {spec!r}: expected name=config.yaml:weights.pt")
    return LadderVariant(name, config, weights)


def format_ladder(result: Dict[str, Any]) -> str:
    """One markdown table per variant."""
    out: List[str] = []
    for name, e in result["variants"].items():
        out += [f"### {name} ({e['float_weights']}, {e.get('epochs')} epochs; {e['regime']})", "",
                "| model | mAP50-95 | Δ vs float |", "|---|---:|---:|"]
        ref = e["float"]
        rows = [("float", ref)] + [(f"PTQ {c}", v) for c, v in e["ptq"].items()] + [
            ("PTQ per-tensor weights", e["per_tensor"]),
            (f"partial PTQ ({len(e['partial_float_layers'])} float)", e["partial"]),
            ("QAT", e["qat"]), ("QAT+CWD", e["qat_cwd"])]
        if "qat_cwd_partial" in e:
            n = len(e["qat_partial_float_layers"])
            rows += [(f"QAT+CWD, QAT-aware partial ({n} float)", e["qat_cwd_partial"]),
                     (f"QAT+CWD, QAT-aware partial ({n} float), ORT INT8",
                      e.get("ort_int8_qat_partial"))]
        rows += [("QAT+CWD, ORT INT8 (onnxruntime flavour)", e["ort_int8"]),
                 ("PTQ, ORT INT8 (tensorrt flavour)", e["ort_int8_trt_flavour"])]
        for label, v in rows:
            d = "" if v is None or ref is None or label == "float" else f"{v - ref:+.2f}"
            out.append(f"| {label} | {'' if v is None else f'{v:.2f}'} | {d} |")
        out.append("")
    return "\n".join(out)
