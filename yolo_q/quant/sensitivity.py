"""Per-layer quantization sensitivity: which layers cost the most accuracy when quantized?

Two measurements per quantized layer (in :func:`~yolo_q.quant.convert.quantized_layers` order),
both on a calibrated model (:func:`yolo_q.quant.calibrate`):

* **exact** (:func:`exact_sensitivity`): quantize that layer alone (every other layer float) and
  measure COCO mAP on a validation subset; ``drop = float mAP - mAP``. Optionally also *all but
  this layer* (every layer quantized except this one): ``gain = mAP - full-PTQ mAP``.
* **proxy** (:func:`proxy_sensitivity`): the same single-layer quantization on a few calibration
  images, no labels needed. The float activations of every graph node are cached once
  (``torch.fx``); for layer ``L`` only ``L`` and the nodes downstream of it are recomputed.
  Scores (``metric``): ``agreement`` (default, :class:`DetectionAgreement`) = 1 - COCO mAP50-95
  of the layer-quantized model's detections scored against the float model's own detections
  (score >= 0.25) as ground truth, i.e. how far quantizing ``L`` moves what the detector
  reports; ``output`` (:func:`detection_output_error`) = confidence-weighted class-score error +
  confidence-weighted ``1 - IoU`` of the raw boxes, no NMS (cheaper, ranks worse: see
  ``benchmarks/sensitivity_benchmark.md``).

:func:`sensitivity_analysis` runs either or both, ranks the layers (most sensitive first), records
the time each mode took, the speed-up and the Spearman rank correlation between proxy and exact;
:func:`format_table` / :func:`save_report` give the ranked table and the CSV/JSON files.

**Is the exact ranking real?** When ``evaluate_fn`` also returns ``map50_95_halves`` (mAP of the
same detections on two disjoint halves of the subset, :func:`yolo_q.quant.ptq.make_map_fn`
``halves=True``), the report carries the *split-half reliability*: the Spearman correlation of
the per-layer drops measured on one half with those on the other (``exact_split_half``), its
Spearman-Brown value for the whole subset (``exact_reliability`` = 2r / (1 + r)) and the highest
Spearman any proxy can reach against that noisy ranking (``spearman_ceiling`` =
sqrt(reliability)). A single INT8 layer often moves mAP by less than a few hundred validation
images resolve; the ranking is then noise, and so is any correlation with it.

**Error gain** (``gain``, ``quant.sensitivity_gain``): the probed layer's quantization error,
the same INT8 rounding and clipping error, is multiplied by ``gain`` (``x + gain * (q(x) - x)``,
see :class:`~yolo_q.quant.tensor_quantizer.TensorQuantizer`), which lifts per-layer effects
above the mAP noise floor while keeping each layer's error pattern. Only the analysis uses it;
partial quantization then evaluates real INT8 models.
"""
from __future__ import annotations

import csv
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..io import jsonable
from .convert import (_check_names, _to_input, all_quantizers, disable_layers, quantize_only,
                      quantized_layers)
from .modules import QuantLayerMixin
from ..eval.coco import COCOEvaluator
from ..eval.postprocess import postprocess

MODES = ("proxy", "exact", "both")


# ------------------------------------------------------------------------------ statistics
def rankdata(values: Sequence[float]) -> List[float]:
    """Ranks 1..n (ascending) with ties given their average rank (like scipy's default)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr`` when scipy is installed, else the
    Pearson correlation of average ranks, which is the same number). NaN if undefined."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        return math.nan
    try:
        from scipy.stats import spearmanr
    except ImportError:
        spearmanr = None
    if spearmanr is not None:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: NaN, no warning
            return float(spearmanr(a, b)[0])
    ra, rb = rankdata(list(a)), rankdata(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


# ------------------------------------------------------------------------------ proxy metric
def _box_iou_cxcywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of (..., 4) cx, cy, w, h boxes."""
    a1, a2 = a[..., :2] - a[..., 2:4] / 2, a[..., :2] + a[..., 2:4] / 2
    b1, b2 = b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2
    wh = (torch.minimum(a2, b2) - torch.maximum(a1, b1)).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = a[..., 2].clamp(min=0) * a[..., 3].clamp(min=0)
    area_b = b[..., 2].clamp(min=0) * b[..., 3].clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


def detection_output_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """How far decoded detections ``y`` (B, N, 5+nc: cx, cy, w, h, 1, class scores) are from
    ``ref``: with ``w = max(best class score of ref, of y)`` per anchor (the anchors that can
    become detections), ``sum w * sum_c |s - s_ref| / sum w`` (class scores) plus
    ``sum w * (1 - IoU(box, box_ref)) / sum w`` (boxes). 0 when identical."""
    y, ref = y.double(), ref.double()
    s, s_ref = y[..., 5:], ref[..., 5:]
    w = torch.maximum(s.amax(-1), s_ref.amax(-1))
    norm = w.sum().clamp(min=1e-12)
    score_err = ((s - s_ref).abs().sum(-1) * w).sum() / norm
    box_err = ((1.0 - _box_iou_cxcywh(y[..., :4], ref[..., :4])) * w).sum() / norm
    return float(score_err + box_err)


class DetectionAgreement:
    """Proxy metric: how well a perturbed model's detections agree with the float model's.

    ``add_reference(ref)`` turns the float outputs of a batch into pseudo ground truth (NMS,
    score >= ``gt_conf``); ``add(key, y)`` keeps the detections of a perturbed run of the same
    batch (score >= ``conf``, at most ``max_det`` per image, multi-label as for COCO mAP);
    ``scores()`` gives ``{key: 1 - mAP50-95}`` against the pseudo ground truth (pycocotools via
    :class:`yolo_q.eval.COCOEvaluator`). Undefined (``has_reference`` False) when the float
    model detects nothing at ``gt_conf``."""

    def __init__(self, gt_conf: float = 0.25, conf: float = 0.01, iou: float = 0.65,
                 max_det: int = 100):
        self.gt_conf, self.conf, self.iou, self.max_det = gt_conf, conf, iou, max_det
        self.gt: List[torch.Tensor] = []
        self.dets: Dict[str, List[torch.Tensor]] = {}
        self.nc = 0

    def add_reference(self, ref: torch.Tensor) -> None:
        self.nc = int(ref.shape[-1]) - 5
        self.gt += [d.cpu() for d in postprocess(ref, self.gt_conf, self.iou, self.max_det)]

    def add(self, key: str, y: torch.Tensor) -> None:
        self.dets.setdefault(key, []).extend(
            d.cpu() for d in postprocess(y, self.conf, self.iou, self.max_det, multi_label=True))

    @property
    def num_boxes(self) -> int:
        return int(sum(len(g) for g in self.gt))

    @property
    def has_reference(self) -> bool:
        return self.num_boxes > 0

    def scores(self) -> Dict[str, float]:
        if not self.has_reference:
            raise ValueError(f"detection agreement: the float model detects nothing with score "
                             f">= {self.gt_conf} on the proxy images")
        anns = []
        for i, g in enumerate(self.gt):
            for x1, y1, x2, y2, _, c in g.tolist():
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        gt = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(len(self.gt))],
              "annotations": anns,
              "categories": [{"id": c + 1, "name": str(c)} for c in range(self.nc)]}
        ev = COCOEvaluator(gt, class_map=list(range(1, self.nc + 1)))
        out = {}
        for key, dets in self.dets.items():
            ev.reset()
            for i, d in enumerate(dets):
                ev.add(i, d)
            out[key] = 1.0 - float(ev.summarize(False, False)["map50_95"])
        return out


PROXY_METRICS = ("agreement", "output")


class ProxyScores(dict):
    """``{layer: score}`` plus ``metric``: the metric that produced them (``agreement`` falls
    back to ``output`` when the float model detects nothing on the proxy images)."""

    metric: str = ""


# ------------------------------------------------------------------------------ proxy
class _LeafTracer(fx.Tracer):
    """Trace with every quantized layer as one leaf (its quantizers switch at run time)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayerMixin) or super().is_leaf_module(m, qualname)


@contextmanager
def amplified_error(model: nn.Module, gain: float = 1.0):
    """Multiply every quantizer's error by ``gain`` inside the block (restored afterwards)."""
    gain = float(gain)
    if not gain > 0 or not math.isfinite(gain):
        raise ValueError(f"sensitivity gain must be a positive number, got {gain}")
    saved = [(q, q.error_gain) for q in all_quantizers(model).values()]
    try:
        for q, _ in saved:
            q.error_gain = gain
        yield
    finally:
        for q, g in saved:
            q.error_gain = g


@contextmanager
def _saved_quant_modes(model: nn.Module):
    """Restore every quantizer's enabled/disabled flag afterwards."""
    saved = [(q, q.enabled) for q in all_quantizers(model).values()]
    try:
        yield
    finally:
        for q, on in saved:
            q.enable() if on else q.disable()


class IncrementalRunner:
    """Run a quantized model with one layer's quantizers switched on, recomputing only that layer
    and what lies downstream of it; everything upstream comes from a cached float run.

    ``x``: float input (B, 3, H, W). The float run happens at construction (every quantizer off);
    ``run(layer)`` enables ``layer`` alone (callers restore modes, see :func:`proxy_sensitivity`).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model = model
        was_training = model.training
        model.eval()
        try:
            graph = _LeafTracer().trace(model)
        finally:
            model.train(was_training)
        self.gm = fx.GraphModule(model, graph)  # shares the model's modules and quantizers
        self.nodes = list(graph.nodes)
        self.x = x
        calls: Dict[str, List[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                calls.setdefault(str(n.target), []).append(n)
        self.calls = calls
        with torch.no_grad(), _saved_quant_modes(model):
            for q in all_quantizers(model).values():
                q.disable()
            interp = fx.Interpreter(self.gm, garbage_collect_values=False)
            self.reference = interp.run(x)
            self.env = interp.env

    def downstream(self, layer: str) -> set:
        """The call nodes of ``layer`` and every node that (transitively) reads them."""
        dirty = set(self.calls.get(layer, []))
        if not dirty:
            raise KeyError(f"'{layer}' is not called in the traced forward")
        for n in self.nodes:
            if n not in dirty and any(i in dirty for i in n.all_input_nodes):
                dirty.add(n)
        return dirty

    @torch.no_grad()
    def run(self, layer: str):
        quantize_only(self.model, [layer])
        dirty = self.downstream(layer)
        env = {n: v for n, v in self.env.items() if n not in dirty}
        return fx.Interpreter(self.gm).run(self.x, initial_env=env)


def proxy_sensitivity(model: nn.Module, batches: Iterable, layers: Optional[Sequence[str]] = None,
                      metric: Union[str, Callable, "DetectionAgreement"] = "agreement",
                      progress: bool = True,
                      gain: float = 1.0) -> ProxyScores:
    """Proxy score per layer (higher = more sensitive) with only that layer quantized, its
    quantization error times ``gain`` (:func:`amplified_error`), on ``batches`` (image tensors or
    loader tuples). ``metric``: ``agreement`` (:class:`DetectionAgreement` over all the images,
    or such an object with other thresholds; falls back to ``output`` when the float model
    detects nothing there), ``output``
    (:func:`detection_output_error` summed over batches) or a callable ``(y, y_float) -> float``
    summed over batches. ``model`` must be calibrated; quantizer modes are restored afterwards.
    Returns :class:`ProxyScores` (its ``metric`` says which metric was used)."""
    from tqdm import tqdm

    if isinstance(metric, str) and metric not in PROXY_METRICS:
        raise ValueError(f"sensitivity proxy metric '{metric}' is not one of {PROXY_METRICS}")
    layers = quantized_layers(model) if layers is None else _check_names(model, layers)
    device = next(model.parameters()).device
    xs = [_to_input(b, device) for b in batches]
    if not xs:
        raise ValueError("proxy_sensitivity: no batches")
    agree = metric if isinstance(metric, DetectionAgreement) else (
        DetectionAgreement() if metric == "agreement" else None)
    fn = metric if callable(metric) and agree is None else detection_output_error
    scores = ProxyScores({n: 0.0 for n in layers})
    scores.metric = ("agreement" if agree is not None else metric if isinstance(metric, str)
                     else getattr(metric, "__name__", "custom"))
    was_training = model.training
    model.eval()
    try:
        with _saved_quant_modes(model), amplified_error(model, gain):
            bar = tqdm(total=len(xs) * len(layers), desc="sensitivity [proxy]", leave=False,
                       disable=not progress)
            for x in xs:
                runner = IncrementalRunner(model, x)
                ref = runner.reference
                if agree is not None:
                    agree.add_reference(ref)
                for name in layers:
                    y = runner.run(name)
                    scores[name] += fn(y, ref)
                    if agree is not None:
                        agree.add(name, y)
                    bar.update(1)
                del runner
            bar.close()
    finally:
        model.train(was_training)
    if agree is not None:
        if agree.has_reference:
            scores.update(agree.scores())
        else:
            scores.metric = "output"
    return scores


# ------------------------------------------------------------------------------ exact
def exact_sensitivity(model: nn.Module, evaluate_fn: Callable[[nn.Module], dict],
                      layers: Optional[Sequence[str]] = None, all_but: bool = False,
                      progress: bool = True, gain: float = 1.0) -> Dict[str, dict]:
    """``{layer: metrics}`` where ``metrics = evaluate_fn(model)`` (a dict with ``map50_95`` and
    ``map50``) with only that layer quantized, or (``all_but``) every layer but that one; the
    quantization error is multiplied by ``gain`` (:func:`amplified_error`).
    ``model`` must be calibrated; quantizer modes are restored afterwards. ``metrics`` keeps
    ``map50_95_halves`` when ``evaluate_fn`` returns it."""
    from tqdm import tqdm

    layers = quantized_layers(model) if layers is None else _check_names(model, layers)
    out: Dict[str, dict] = {}
    with _saved_quant_modes(model), amplified_error(model, gain):
        bar = tqdm(layers, desc=f"sensitivity [{'all-but' if all_but else 'exact'}]",
                   leave=False, disable=not progress)
        for name in bar:
            if all_but:
                for q in all_quantizers(model).values():
                    q.enable()
                disable_layers(model, [name])
            else:
                quantize_only(model, [name])
            m = evaluate_fn(model)
            out[name] = {"map50_95": float(m["map50_95"]), "map50": float(m["map50"])}
            if "map50_95_halves" in m:
                out[name]["map50_95_halves"] = [float(v) for v in m["map50_95_halves"]]
    return out


def split_half_reliability(float_halves: Sequence[float], layer_halves: Sequence[Sequence[float]]
                           ) -> dict:
    """How well exact drops reproduce: ``split_half`` = Spearman of the per-layer drops measured
    on one half of the images vs the other; ``reliability`` = its Spearman-Brown value for the
    whole set, ``2 r / (1 + r)``; ``ceiling`` = sqrt(reliability), the largest correlation a
    perfect proxy can show against the measured (noisy) ranking. NaN where undefined."""
    a = [float_halves[0] - h[0] for h in layer_halves]
    b = [float_halves[1] - h[1] for h in layer_halves]
    r = spearman(a, b)
    rel = 2 * r / (1 + r) if math.isfinite(r) and r > -1 else math.nan
    ceiling = math.sqrt(rel) if math.isfinite(rel) and rel > 0 else (0.0 if rel <= 0 else math.nan)
    return {"split_half": r, "reliability": rel, "ceiling": ceiling}


# ------------------------------------------------------------------------------ analysis
def _num_images(batch) -> int:
    if isinstance(batch, dict):
        batch = batch.get("imgs", batch.get("img"))
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    return len(batch)


def _descending_ranks(names: List[str], scores: Dict[str, float]) -> Dict[str, int]:
    """1 = highest score (most sensitive); ties keep execution order."""
    order = sorted(range(len(names)), key=lambda i: (-scores[names[i]], i))
    return {names[i]: r + 1 for r, i in enumerate(order)}


def _proxy_rows(model, proxy_batches, names, proxy_metric, progress, gain, report, by_name):
    """The proxy part of :func:`sensitivity_analysis`: scores, ranks and timing."""
    if not proxy_batches:
        raise ValueError("proxy sensitivity needs calibration batches")
    t0 = time.perf_counter()
    proxy = proxy_sensitivity(model, proxy_batches, names, metric=proxy_metric,
                              progress=progress, gain=gain)
    report["proxy_seconds"] = time.perf_counter() - t0
    report["proxy_metric"] = proxy.metric
    report["proxy_images"] = int(sum(_num_images(b) for b in proxy_batches))
    for n, r in _descending_ranks(names, proxy).items():
        by_name[n].update(proxy_score=proxy[n], proxy_rank=r)
    return proxy


def _all_but_rows(model, evaluate_fn, names, ptq_metrics, progress, report, by_name) -> None:
    """The all-but-this-layer part of :func:`sensitivity_analysis` (mAP recovered vs PTQ)."""
    if not ptq_metrics:
        raise ValueError("all-but sensitivity needs the fully quantized model's metrics")
    t0 = time.perf_counter()
    res = exact_sensitivity(model, evaluate_fn, names, all_but=True, progress=progress)
    report["all_but_seconds"] = time.perf_counter() - t0
    recovered = {n: res[n]["map50_95"] - float(ptq_metrics["map50_95"]) for n in names}
    for n, r in _descending_ranks(names, recovered).items():
        by_name[n].update(all_but_map50_95=res[n]["map50_95"],
                          all_but_gain=recovered[n], all_but_rank=r)


def sensitivity_analysis(model: nn.Module, proxy_batches: Optional[Sequence] = None,
                         evaluate_fn: Optional[Callable[[nn.Module], dict]] = None,
                         mode: str = "proxy", all_but: bool = False,
                         float_metrics: Optional[dict] = None, ptq_metrics: Optional[dict] = None,
                         layers: Optional[Sequence[str]] = None, progress: bool = True,
                         gain: float = 1.0, proxy_metric: str = "agreement") -> dict:
    """Rank the quantized layers of a calibrated ``model`` by sensitivity.

    ``mode``: ``proxy`` (needs ``proxy_batches``), ``exact`` (needs ``evaluate_fn`` and
    ``float_metrics``, the float model's metrics on the same images) or ``both``. ``all_but``
    (exact/both) adds the all-but-this-layer measurement (needs ``ptq_metrics``, the fully
    quantized model on the same images). Returns a JSON-serialisable report: ``layers`` (one row
    per layer in execution order: ``layer``, ``index``, ``proxy_score``, ``proxy_rank``,
    ``exact_map50_95``, ``exact_map50``, ``exact_drop``, ``exact_rank``, optionally
    ``all_but_map50_95``, ``all_but_gain``, ``all_but_rank``, and ``rank``), ``ranking`` (names,
    most sensitive first; by exact drop when measured, else by proxy), ``rank_by``,
    ``proxy_seconds``, ``exact_seconds``, ``speedup`` (exact / proxy time), ``spearman``
    (proxy vs exact drop), ``gain`` and the inputs' metrics; with ``map50_95_halves`` in the
    exact metrics (and in ``float_metrics``) also ``exact_split_half``, ``exact_reliability``
    and ``spearman_ceiling`` (:func:`split_half_reliability`). ``gain`` multiplies the probed
    layer's quantization error in the proxy and the single-layer exact runs (the all-but runs
    stay at plain INT8, comparable with ``ptq_metrics``). ``proxy_metric``: ``agreement`` |
    ``output`` (:func:`proxy_sensitivity`); the report's ``proxy_metric`` is the one used.
    """
    if mode not in MODES:
        raise ValueError(f"sensitivity mode '{mode}' is not one of {MODES}")
    names = quantized_layers(model) if layers is None else _check_names(model, layers)
    if not names:
        raise ValueError("sensitivity_analysis: the model has no quantized layers")
    report: dict = {"mode": mode, "num_layers": len(names), "float": float_metrics,
                    "ptq": ptq_metrics, "gain": float(gain), "proxy_seconds": None,
                    "exact_seconds": None, "all_but_seconds": None, "speedup": None,
                    "proxy_metric": None, "spearman": None, "exact_split_half": None,
                    "exact_reliability": None,
                    "spearman_ceiling": None}
    rows = [{"layer": n, "index": i} for i, n in enumerate(names)]
    by_name = {r["layer"]: r for r in rows}
    proxy = exact = None
    if mode in ("proxy", "both"):
        proxy = _proxy_rows(model, proxy_batches, names, proxy_metric, progress, gain, report,
                            by_name)
    if mode in ("exact", "both"):
        if evaluate_fn is None or not float_metrics:
            raise ValueError("exact sensitivity needs evaluate_fn and the float metrics")
        t0 = time.perf_counter()
        res = exact_sensitivity(model, evaluate_fn, names, progress=progress, gain=gain)
        report["exact_seconds"] = time.perf_counter() - t0
        base = float(float_metrics["map50_95"])
        exact = {n: base - res[n]["map50_95"] for n in names}
        if "map50_95_halves" in float_metrics and all("map50_95_halves" in res[n] for n in names):
            rel = split_half_reliability(float_metrics["map50_95_halves"],
                                         [res[n]["map50_95_halves"] for n in names])
            report.update(exact_split_half=rel["split_half"], exact_reliability=rel["reliability"],
                          spearman_ceiling=rel["ceiling"])
        for n, r in _descending_ranks(names, exact).items():
            by_name[n].update(exact_map50_95=res[n]["map50_95"], exact_map50=res[n]["map50"],
                              exact_drop=exact[n], exact_rank=r)
            if "map50_95_halves" in res[n]:
                by_name[n]["exact_map50_95_halves"] = res[n]["map50_95_halves"]
        if all_but:
            _all_but_rows(model, evaluate_fn, names, ptq_metrics, progress, report, by_name)
    if proxy is not None and exact is not None:
        report["spearman"] = spearman([proxy[n] for n in names], [exact[n] for n in names])
        report["speedup"] = report["exact_seconds"] / max(report["proxy_seconds"], 1e-9)
    report["rank_by"] = "exact" if exact is not None else "proxy"
    key = "exact_rank" if exact is not None else "proxy_rank"
    for r in rows:
        r["rank"] = r[key]
    report["ranking"] = [r["layer"] for r in sorted(rows, key=lambda r: r["rank"])]
    report["layers"] = rows
    return report


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: dict, top: Optional[int] = None) -> str:
    """Ranked table (most sensitive first); drops/gains in mAP50-95 percentage points."""
    rows = sorted(report["layers"], key=lambda r: r["rank"])[:top]
    has_p = any("proxy_score" in r for r in rows)
    has_e = any("exact_drop" in r for r in rows)
    has_a = any("all_but_gain" in r for r in rows)
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    head = f"{'rank':>4}  {'layer':<{width}}"
    if has_p:
        head += f"  {'proxy':>10} {'p.rank':>6}"
    if has_e:
        head += f"  {'mAP50-95':>8} {'mAP50':>7} {'drop pts':>8} {'e.rank':>6}"
    if has_a:
        head += f"  {'all-but':>8} {'gain pts':>8}"
    lines = [head]
    for r in rows:
        line = f"{r['rank']:>4}  {r['layer']:<{width}}"
        if has_p:
            line += f"  {_fmt(r.get('proxy_score'), '10.4g')} {_fmt(r.get('proxy_rank'), '6d')}"
        if has_e:
            drop = r.get("exact_drop")
            line += (f"  {_fmt(r.get('exact_map50_95'), '8.4f')}"
                     f" {_fmt(r.get('exact_map50'), '7.4f')}"
                     f" {_fmt(None if drop is None else 100 * drop, '8.2f')}"
                     f" {_fmt(r.get('exact_rank'), '6d')}")
        if has_a:
            gain = r.get("all_but_gain")
            line += (f"  {_fmt(r.get('all_but_map50_95'), '8.4f')}"
                     f" {_fmt(None if gain is None else 100 * gain, '8.2f')}")
        lines.append(line)
    foot = [f"ranked by {report['rank_by']}; {report['num_layers']} layers"]
    if report.get("gain", 1.0) != 1.0:
        foot.append(f"error gain {report['gain']:g}")
    if report.get("proxy_metric"):
        n = report.get("proxy_images")
        foot.append(f"proxy: {report['proxy_metric']}{f' on {n} images' if n else ''}")
    for k in ("proxy", "exact", "all_but"):
        if report.get(f"{k}_seconds") is not None:
            foot.append(f"{k.replace('_', '-')} {report[f'{k}_seconds']:.1f} s")
    if report.get("speedup") is not None:
        foot.append(f"proxy speed-up {report['speedup']:.1f}x")
    if report.get("spearman") is not None:
        foot.append(f"Spearman(proxy, exact drop) {report['spearman']:.3f}")
    if report.get("exact_reliability") is not None:
        foot.append(f"exact split-half reliability {report['exact_reliability']:.3f} "
                    f"(a proxy can reach at most {report['spearman_ceiling']:.3f})")
    out = lines + ["; ".join(foot)]
    rel = report.get("exact_reliability")
    if report.get("exact_split_half") is not None and not (rel is not None and rel >= 0.5):
        n = report.get("subset_images")
        out.append(f"note: the exact drops do not reproduce between the two halves of the "
                   f"{f'{n} ' if n else ''}val images (split-half Spearman "
                   f"{report['exact_split_half']:.2f}): single-layer effects are below what these "
                   f"images resolve, so the exact ranking is mostly noise; use more images "
                   f"(quant.sensitivity_images) or amplify the error (--sensitivity-gain)")
    return "\n".join(out) + "\n"


CSV_FIELDS = ("rank", "layer", "index", "proxy_score", "proxy_rank", "exact_map50_95",
              "exact_map50", "exact_drop", "exact_rank", "all_but_map50_95", "all_but_gain",
              "all_but_rank")


def save_report(report: dict, out_dir) -> Dict[str, Path]:
    """Write ``sensitivity.csv`` (ranked rows) and ``sensitivity.json`` (the whole report)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "sensitivity.csv", out / "sensitivity.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(report["layers"], key=lambda r: r["rank"]):
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    json_path.write_text(json.dumps(jsonable(report), indent=2), encoding="utf-8")
    return {"csv": csv_path, "json": json_path}


__all__ = ["MODES", "IncrementalRunner", "amplified_error", "detection_output_error",
           "exact_sensitivity", "format_table", "jsonable", "proxy_sensitivity", "rankdata",
           "save_report", "sensitivity_analysis", "spearman", "split_half_reliability"]
