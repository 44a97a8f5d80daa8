"""``convert(model, cfg)``: swap the layers of a fused float model for quantized ones.

Nothing global is patched: a deep copy of the model is returned, with

* every Conv2d / ConvTranspose2d / MaxPool2d that the eval forward calls replaced by its
  :mod:`~yolo_q.quant.modules` counterpart, except the DFL projection conv (``skip_dfl``) and the
  layers named in ``skip_layers`` (exact module path, a prefix such as ``detect.stems`` or an
  fnmatch pattern such as ``neck.Rep_n4.*``): those stay plain float, with no quantizers;
* per-channel weight quantizers (axis 0; axis 1 for transposed convs), per-tensor activations;
* the activation module that directly follows a conv absorbed into the quantized layer;
* flavour ``tensorrt``: signed int8 input quantizers on every quantized layer (TensorRT-style
  explicit quantization); flavour ``onnxruntime``: the OUTPUT of every quantized conv is quantized
  (uint8 zero point 0 after ReLU, the signed grid stored as uint8 otherwise) and an input is
  quantized only when no quantized producer already did it, so ONNX Runtime fuses
  DequantizeLinear -> Conv -> (Relu) -> QuantizeLinear into QLinearConv; with
  ``preact_output`` (default) a conv whose activation is not ReLU-like (SiLU) quantizes its
  output BEFORE the activation (layer spec ``output_at: "pre"``): ONNX Runtime cannot fuse a
  SiLU into QLinearConv, so this keeps the conv integer, and the activation's readers quantize
  its output with their own input quantizers;
* high-precision outputs: the prediction convs (``detect.cls_preds.*``, ``detect.reg_preds.*``)
  quantize input and weights, nothing quantizes their outputs (``high_precision_outputs=False``
  adds a signed output quantizer, for comparison);
* shared scales (``share_concat_scales``): groups of activation quantizers that must use one
  scale (Concat inputs/outputs, see :mod:`yolo_q.quant.graph` for the exact rule); after
  calibration every group gets the maximum amax of its members;
* weight scales with an int32 bias floor (:func:`floor_weight_scales`): ``s_x * s_w[c]`` is
  never so small that the bias code ``round(b_c / (s_x s_w[c]))`` leaves int32 (dead channels
  with a bias), so fake quantization, the integer check and every runtime compute the same.

The structure is described by :func:`quant_state` (plain lists/dicts/strings, safe for
``torch.load(weights_only=True)``); ``convert(build_model(cfg).fuse(), state=saved_state)``
rebuilds exactly the same modules, so a saved ``state_dict`` loads with no mismatch.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import warnings
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .graph import NONNEG_ACTS, ModelGraph
from .modules import (QUANT_MODULES, QuantConv2d, QuantConvTranspose2d, QuantLayerMixin,
                      QuantMaxPool2d, weight_axis)
from .calibrators import _abs_max, _reduce_dims
from .tensor_quantizer import AMAX_EPS, TensorQuantizer

FLAVOURS = ("tensorrt", "onnxruntime")
DFL_LAYERS = ("detect.proj_conv",)
OUTPUT_LAYERS = ("detect.cls_preds.*", "detect.reg_preds.*")
STATE_VERSION = 1
_STATE_ATTR = "_yolo_q_quant_state"
INT32_MAX = 2 ** 31 - 1
BIAS_SCALE_MARGIN = 1e-4  # relative, as ONNX Runtime's quantizer (1.0001)

WEIGHT_CALIB = ("max", "mse")
_DEFAULTS = dict(flavour="tensorrt", num_bits=8, per_channel_weights=True, weight_calib="max",
                 skip_dfl=True,
                 high_precision_outputs=True, preact_output=True, share_concat_scales=True,
                 skip_layers=[],
                 calib="percentile", percentile=99.99, num_histogram_bins=2048,
                 calib_batches=16)


class QuantStateError(ValueError):
    """A quant state does not describe the given model (or the model is not quantized)."""


class CalibrationError(RuntimeError):
    """Calibration left quantizers without a range; the message names them."""


# ------------------------------------------------------------------------------ settings
def resolve_settings(cfg=None, **overrides) -> dict:
    """Settings for :func:`convert` from a full config (``cfg.quant``; ``quant.flavour: null``
    follows ``export.flavour`` when that is a QDQ flavour), a ``quant`` section, a dict or
    None (defaults), then keyword overrides."""
    out = dict(_DEFAULTS)
    quant = cfg
    export_flavour = None
    if cfg is not None and hasattr(cfg, "quant"):
        quant = cfg.quant
        export_flavour = getattr(getattr(cfg, "export", None), "flavour", None)
    if quant is not None:
        get = quant.get if isinstance(quant, dict) else (lambda k, d=None: getattr(quant, k, d))
        for k in _DEFAULTS:
            v = get(k, None)
            if v is not None:
                out[k] = list(v) if k == "skip_layers" else v
        if get("flavour", None) is None and export_flavour in FLAVOURS:
            out["flavour"] = export_flavour
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"convert(): unknown option(s) {sorted(unknown)}; "
                        f"known: {sorted(_DEFAULTS)}")
    out.update({k: v for k, v in overrides.items() if v is not None})
    if out["flavour"] not in FLAVOURS:
        raise ValueError(f"quant.flavour: '{out['flavour']}' is not one of {FLAVOURS}")
    if out["weight_calib"] not in WEIGHT_CALIB:
        raise ValueError(f"quant.weight_calib: '{out['weight_calib']}' is not one of "
                         f"{WEIGHT_CALIB}")
    out["skip_layers"] = [str(s) for s in out["skip_layers"]]
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


# ------------------------------------------------------------------------------ planning
def plan(model: nn.Module, settings: dict) -> dict:
    """Analyse a fused float model and return the quant state (see module docstring)."""
    g = ModelGraph(model)
    flavour, hp = settings["flavour"], settings["high_precision_outputs"]
    layers = list(g.layers.values())
    candidates = []
    for layer in layers:
        m = g.modules[layer.name]
        if isinstance(m, nn.ConvTranspose2d) and m.groups != 1:
            warnings.warn(f"{layer.name}: grouped ConvTranspose2d is left in float")
            continue
        candidates.append(layer)
    names = [l.name for l in candidates]
    skip = set()
    if settings["skip_dfl"]:
        skip |= {n for n in names if n in DFL_LAYERS}
    for pat in settings["skip_layers"]:
        hit = {n for n in names if _matches(n, pat)}
        if not hit:
            prefixes = {n.rsplit(".", k)[0] for n in names for k in range(n.count(".") + 1)}
            close = difflib.get_close_matches(pat, sorted(prefixes), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"quant.skip_layers: '{pat}' matches no quantizable layer{hint}")
        skip |= hit
    quant = [l for l in candidates if l.name not in skip]
    qnames = {l.name for l in quant}

    def is_output(name):
        return any(fnmatch.fnmatchcase(name, p) for p in OUTPUT_LAYERS)

    out_kind: Dict[str, str] = {}
    pre = {l.name for l in quant if flavour == "onnxruntime" and settings["preact_output"]
           and l.kind != "maxpool" and l.act_type and l.act_type not in NONNEG_ACTS
           and not is_output(l.name)}
    for l in quant:
        if l.kind == "maxpool":
            nonneg = all(g.nonneg(c.args[0]) for c in l.calls)
            out_kind[l.name] = "" if flavour != "onnxruntime" else (
                "unsigned" if nonneg else "signed")
        elif is_output(l.name):
            out_kind[l.name] = "" if hp else "signed"
        elif flavour == "onnxruntime":
            out_kind[l.name] = "unsigned" if l.act_type in NONNEG_ACTS and l.name not in pre \
                else "signed"
        else:
            out_kind[l.name] = ""

    specs = []
    for l in quant:
        in_kind, input_from = "signed", f"{l.name}._input_quantizer"
        if flavour == "onnxruntime":
            producers = [g.producer_layer(c.args[0]) for c in l.calls]
            if all(p in qnames and out_kind[p] and p not in pre for p in producers):
                in_kind, input_from = "", f"{producers[0]}._output_quantizer"
            elif all(g.nonneg(c.args[0]) for c in l.calls):
                in_kind = "unsigned"
        specs.append(dict(name=l.name, kind=l.kind, act=l.act, act_type=l.act_type,
                          input=in_kind, output=out_kind[l.name], input_from=input_from,
                          output_at="pre" if l.name in pre else "post"))

    shared: List[List[str]] = []
    if settings["share_concat_scales"]:
        shared = _shared_groups(g, quant, specs)
    return dict(version=STATE_VERSION, flavour=flavour, num_bits=int(settings["num_bits"]),
                per_channel_weights=bool(settings["per_channel_weights"]),
                weight_calib=str(settings["weight_calib"]),
                high_precision_outputs=bool(hp),
                preact_output=bool(settings["preact_output"] and flavour == "onnxruntime"),
                share_concat_scales=bool(settings["share_concat_scales"]),
                skip=sorted(skip), skip_layers=list(settings["skip_layers"]),
                calib=str(settings["calib"]), percentile=float(settings["percentile"]),
                num_histogram_bins=int(settings["num_histogram_bins"]),
                calib_batches=int(settings["calib_batches"]), layers=specs, shared=shared)


def _shared_groups(g: ModelGraph, quant, specs) -> List[List[str]]:
    maxpools = {l.name for l in quant if l.kind == "maxpool"}
    rep = g.scale_classes(maxpools)
    order: Dict[str, int] = {}
    by_class: Dict[object, List[str]] = {}
    layer_by_name = {l.name: l for l in quant}
    for spec in specs:
        l = layer_by_name[spec["name"]]
        attach = []
        if spec["input"]:
            attach += [(f"{l.name}._input_quantizer", c.args[0]) for c in l.calls]
        if spec["output"]:
            nodes = l.calls if spec.get("output_at") == "pre" else l.out_nodes
            attach += [(f"{l.name}._output_quantizer", n) for n in nodes]
        for qname, node in attach:
            order.setdefault(qname, len(order))
            by_class.setdefault(rep[node], []).append(qname)
    # one quantizer = one scale: merge classes that share a quantizer
    parent = {q: q for q in order}

    def find(q):
        while parent[q] != q:
            parent[q] = parent[parent[q]]
            q = parent[q]
        return q

    for members in by_class.values():
        for q in members[1:]:
            a, b = find(members[0]), find(q)
            if a != b:
                parent[a] = b
    groups: Dict[str, List[str]] = {}
    for q in order:
        groups.setdefault(find(q), []).append(q)
    return [sorted(set(v), key=order.get) for v in groups.values() if len(set(v)) > 1]


# ------------------------------------------------------------------------------ convert
def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _act_quantizer(kind: str, state: dict, name: str) -> Optional[TensorQuantizer]:
    if not kind:
        return None
    unsigned = kind == "unsigned"
    return TensorQuantizer(state["num_bits"], unsigned=unsigned,
                           uint8_storage=(not unsigned and state["flavour"] == "onnxruntime"),
                           calibrator="max" if state["calib"] == "max" else "percentile",
                           num_bins=state["num_histogram_bins"], name=name)


def _apply(model: nn.Module, state: dict) -> None:
    modules = dict(model.named_modules())
    device = next(model.parameters(), torch.empty(0)).device
    for spec in state["layers"]:
        name = spec["name"]
        m = modules.get(name)
        expect = {"conv": nn.Conv2d, "conv_transpose": nn.ConvTranspose2d,
                  "maxpool": nn.MaxPool2d}.get(spec["kind"])
        if m is None or expect is None or not isinstance(m, expect) or \
                (spec["kind"] == "conv" and isinstance(m, nn.ConvTranspose2d)):
            raise QuantStateError(f"quant state: layer '{name}' ({spec['kind']}) does not exist "
                                  f"in this model (found {type(m).__name__ if m else 'nothing'})")
        in_q = _act_quantizer(spec["input"], state, f"{name}._input_quantizer")
        out_q = _act_quantizer(spec["output"], state, f"{name}._output_quantizer")
        if spec["kind"] == "maxpool":
            new = QuantMaxPool2d.from_float(m, in_q, out_q)
        else:
            axis = weight_axis(m) if state["per_channel_weights"] else None
            w_q = TensorQuantizer(state["num_bits"], axis=axis,
                                  num_channels=m.weight.shape[axis] if axis is not None else None,
                                  calibrator="max", name=f"{name}._weight_quantizer")
            act = None
            if spec["act"]:
                act = modules.get(spec["act"])
                if act is None:
                    raise QuantStateError(f"quant state: activation '{spec['act']}' of layer "
                                          f"'{name}' does not exist in this model")
                _set_submodule(model, spec["act"], nn.Identity())
            cls = QuantConvTranspose2d if spec["kind"] == "conv_transpose" else QuantConv2d
            new = cls.from_float(m, act, in_q, w_q, out_q)
            new.quant_before_act = spec.get("output_at") == "pre"
        new.to(device)  # the quantizer buffers (pools have no parameters of their own)
        _set_submodule(model, name, new)


def convert(model: nn.Module, cfg=None, *, state: Optional[dict] = None, **overrides) -> nn.Module:
    """Return a quantized copy of the FUSED float ``model`` (the input is not modified).

    ``cfg``: full config, ``quant`` section, dict or None; keyword ``overrides`` (``flavour``,
    ``skip_layers``, ``high_precision_outputs``, ...) win. With ``state`` (from
    :func:`quant_state`), rebuild that exact structure instead of analysing the model.
    Quantizers start uncalibrated: run :func:`calibrate` (or load a calibrated state dict).
    """
    if is_quantized(model):
        raise QuantStateError("convert(): the model is already quantized")
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ValueError("convert() needs a fused model (no BatchNorm): call model.fuse() first")
    if state is None:
        state = plan(model, resolve_settings(cfg, **overrides))
    else:
        if cfg is not None or overrides:
            raise TypeError("convert(): pass either cfg/overrides or state, not both")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise QuantStateError(f"convert(): unsupported quant state (version "
                                  f"{state.get('version') if isinstance(state, dict) else '?'})")
        state = copy.deepcopy(state)
    qmodel = copy.deepcopy(model)
    _apply(qmodel, state)
    object.__setattr__(qmodel, _STATE_ATTR, state)
    return qmodel


def is_quantized(model: nn.Module) -> bool:
    return isinstance(getattr(model, _STATE_ATTR, None), dict)


def quant_state(model: nn.Module) -> dict:
    """The structure description of a converted model (a copy; plain python types)."""
    if not is_quantized(model):
        raise QuantStateError("model is not quantized (use yolo_q.quant.convert first)")
    return copy.deepcopy(getattr(model, _STATE_ATTR))


def restore(model: nn.Module, state: dict, state_dict: Optional[dict] = None,
            strict: bool = True) -> nn.Module:
    """Rebuild a quantized model from a fused float model, its quant state and (optionally) a
    saved state dict of the quantized model."""
    qmodel = convert(model, state=state)
    if state_dict is not None:
        qmodel.load_state_dict(state_dict, strict=strict)
    return qmodel


# ------------------------------------------------------------------------------ helpers
def quantized_layers(model: nn.Module) -> List[str]:
    """Names of the quantized layers in execution order."""
    return [s["name"] for s in quant_state(model)["layers"]]


def layer_modules(model: nn.Module) -> Dict[str, QuantLayerMixin]:
    return {n: model.get_submodule(n) for n in quantized_layers(model)}


def _check_names(model: nn.Module, names: Iterable[str]) -> List[str]:
    known = quantized_layers(model)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=1)
            raise KeyError(f"'{n}' is not a quantized layer"
                           + (f" (did you mean '{close[0]}'?)" if close else ""))
    return names


def activation_quantizers(model: nn.Module) -> Dict[str, TensorQuantizer]:
    out = {}
    for name, layer in layer_modules(model).items():
        for attr, q in layer.quantizers():
            if attr != "_weight_quantizer":
                out[f"{name}.{attr}"] = q
    return out


def weight_quantizers(model: nn.Module) -> Dict[str, TensorQuantizer]:
    return {f"{n}._weight_quantizer": l._weight_quantizer for n, l in layer_modules(model).items()
            if getattr(l, "_weight_quantizer", None) is not None}


def all_quantizers(model: nn.Module) -> Dict[str, TensorQuantizer]:
    return {**activation_quantizers(model), **weight_quantizers(model)}


def set_quant_enabled(model: nn.Module, enabled: bool = True) -> None:
    """Enable (fake-quantize) or disable (float pass-through) every quantizer."""
    for q in all_quantizers(model).values():
        q.enable() if enabled else q.disable()


def quantize_only(model: nn.Module, names: Sequence[str]) -> None:
    """Enable the quantizers of ``names`` only; all other layers run in float (sensitivity
    analysis). In the onnxruntime flavour a layer's input grid may belong to its producer's
    output quantizer, which is then off unless the producer is listed too."""
    keep = set(_check_names(model, names))
    for name, layer in layer_modules(model).items():
        for _, q in layer.quantizers():
            q.enable() if name in keep else q.disable()


def disable_layers(model: nn.Module, names: Sequence[str]) -> None:
    """Disable the quantizers of ``names`` (the layers run in float, structure unchanged)."""
    for name in _check_names(model, names):
        for _, q in model.get_submodule(name).quantizers():
            q.disable()


@torch.no_grad()
def calibrate_weights(model: nn.Module, method: Optional[str] = None) -> Dict[str, int]:
    """Weight amax per output channel (per tensor when not per-channel), raised where the int32
    bias code would not fit (:func:`floor_weight_scales`; needs the activation ranges, so call
    it after them). ``method`` (default: the quant state's ``weight_calib``): ``max`` = max |w|;
    ``mse`` = the clip ``a * max |w|`` (``a`` in :data:`MSE_WEIGHT_CLIPS`) with the least
    squared error of the fake-quantized weights (:func:`mse_weight_amax`). Returns
    :func:`floor_weight_scales`'s counts."""
    method = method or quant_state(model).get("weight_calib", "max")
    if method not in WEIGHT_CALIB:
        raise ValueError(f"weight calibration '{method}' is not one of {WEIGHT_CALIB}")
    for q_name, q in weight_quantizers(model).items():
        w = model.get_submodule(q_name.rsplit(".", 1)[0]).weight.detach().float()
        q.amax = _abs_max(w, q.axis) if method == "max" else mse_weight_amax(q, w)
    return floor_weight_scales(model)


MSE_WEIGHT_CLIPS = torch.linspace(0.3, 1.0, 71)  # fractions of max |w| searched by weight mse


@torch.no_grad()
def mse_weight_amax(q: TensorQuantizer, w: torch.Tensor) -> torch.Tensor:
    """Per channel of ``q`` (or per tensor): the amax ``a * max |w|`` over
    :data:`MSE_WEIGHT_CLIPS` whose fake-quantization of ``w`` on ``q``'s grid has the least
    summed squared error (rounding + clipping; ties keep the larger clip). Leaves ``q.amax``
    at the result."""
    full = _abs_max(w, q.axis).clamp(min=AMAX_EPS)
    dims = _reduce_dims(w, q.axis)

    def sq_error(amax):
        q.amax = amax
        d2 = (q.fake_quant(w) - w).pow(2)
        return d2.sum(dim=dims) if dims is not None else d2.sum()

    best, best_err = full.clone(), sq_error(full)
    for a in MSE_WEIGHT_CLIPS.flip(0)[1:].tolist():  # below the full range, downwards
        err = sq_error(full * a)
        better = err < best_err
        best = torch.where(better, full * a, best)
        best_err = torch.where(better, err, best_err)
    q.amax = best
    return best


def input_grid_quantizer(model: nn.Module, spec: dict) -> Optional[TensorQuantizer]:
    """The quantizer whose grid a layer's input is on (its own input quantizer, or in the
    onnxruntime flavour its producer's output quantizer: ``spec["input_from"]``); None when
    the layer has none."""
    q = model.get_submodule(spec["input_from"]) if spec.get("input_from") else None
    return q if isinstance(q, TensorQuantizer) else None


def _code_span(q: TensorQuantizer) -> int:
    """Largest |code - zero point| on ``q``'s grid (128 signed, 255 unsigned at 8 bits)."""
    return max(q.quant_max - q.zero_point, q.zero_point - q.quant_min)


def bias_amax_floor(layer: QuantLayerMixin, x_q: TensorQuantizer) -> torch.Tensor:
    """The smallest weight amax (per output channel; one value for a per-tensor quantizer) at
    which the layer's int32 bias code ``round(b / (s_x s_w))`` plus the largest product sum
    the layer can accumulate (``K`` taps x code spans of input and weight, capped at 2^30)
    stays within int32, with a relative margin of ``BIAS_SCALE_MARGIN`` (float32 rounding of
    the scales and of the runtime's own division). float64."""
    wq = layer._weight_quantizer
    taps = layer.weight.numel() // layer.out_channels  # (C_in / groups) * kh * kw
    max_sum = min(taps * _code_span(x_q) * _code_span(wq), 2 ** 30)
    bound = INT32_MAX - max_sum
    s_x = x_q.scale.detach().double()
    b = layer.bias.detach().abs().double()
    if wq.axis is None:
        b = b.max()
    s_w = b * (1.0 + BIAS_SCALE_MARGIN) / (s_x * bound)
    return s_w * wq.qmax_abs


@torch.no_grad()
def floor_weight_scales(model: nn.Module) -> Dict[str, int]:
    """Raise every calibrated weight amax below :func:`bias_amax_floor` to it, so that every
    bias fits the int32 code that integer engines give it (ONNX Runtime's QLinearConv, the
    integer check): a channel whose weights are all near zero (dead) but whose bias is not
    would otherwise get a code beyond int32, which ONNX Runtime's graph optimizer turns into
    INT32_MIN. Only such channels change: their weights round on a coarser grid, which moves
    the channel's output by at most ``taps * 255 * |b| / 2^31`` (about 0.05 % of the bias for a
    3x3 conv over 512 channels). ONNX Runtime's own quantizer raises weight scales the same
    way (``_adjust_weight_scale_for_int32_bias``, without the accumulator margin).
    Layers without a bias or without a calibrated input grid are left alone (enabled or not).
    Returns ``{layer: channels raised}``; idempotent."""
    raised = {}
    layers = layer_modules(model)
    for spec in quant_state(model)["layers"]:
        layer = layers[spec["name"]]
        wq = getattr(layer, "_weight_quantizer", None)
        x_q = input_grid_quantizer(model, spec)
        if wq is None or getattr(layer, "bias", None) is None or not wq.is_calibrated or \
                x_q is None or not x_q.is_calibrated:
            continue
        floor = bias_amax_floor(layer, x_q).to(wq.amax.device)
        low = wq.amax.double() < floor
        if low.any():
            up = floor.float()  # rounded up to float32, so that the floor holds as stored
            up = torch.where(up.double() < floor, torch.nextafter(up, up + 1), up)
            wq.amax = torch.where(low, up, wq.amax)
            raised[spec["name"]] = int(low.sum())
    return raised


def apply_shared_scales(model: nn.Module) -> int:
    """Set every shared-scale group to the max amax of its members (calibrated members only).
    Returns the number of groups updated. Call again after EMA range updates."""
    n = 0
    for group in quant_state(model)["shared"]:
        qs = [model.get_submodule(q) for q in group]
        qs = [q for q in qs if q.is_calibrated]
        if len(qs) > 1:
            amax = torch.stack([q.amax.detach().float().cpu() for q in qs]).max()
            for q in qs:
                q.amax = amax
            n += 1
    return n


def _to_input(batch, device) -> torch.Tensor:
    if isinstance(batch, dict):
        batch = batch.get("imgs", batch.get("img"))
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibration batch must be a tensor or (imgs, ...) tuple, got "
                        f"{type(batch).__name__}")
    x = batch.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@contextmanager
def _modes(quantizers, calib: bool, quant: bool):
    saved = [(q, q._disabled, q._if_calib, q._if_quant) for q in quantizers]
    try:
        for q in quantizers:
            q._disabled, q._if_calib, q._if_quant = False, calib, quant
        yield
    finally:
        for q, d, c, u in saved:
            q._disabled, q._if_calib, q._if_quant = d, c, u


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, method: Optional[str] = None,
              num_batches: Optional[int] = None, percentile: Optional[float] = None,
              progress: bool = True, strict: bool = True) -> Dict[str, float]:
    """PTQ calibration: run ``num_batches`` of ``batches`` (uint8 or float image tensors, or
    loader tuples whose first item is the images; default ``quant.calib_batches``) through the
    model in float, collect activation statistics, set
    every amax (``method``: max | percentile | mse | entropy; default from the quant state),
    share concat scales, then weights (``weight_calib`` of the quant state) with the int32 bias
    floor (:func:`calibrate_weights`). Quantizers that saw no data are named
    in a :class:`CalibrationError` (``strict``) or a warning (then they are disabled).
    Returns ``{quantizer name: amax}`` for the activation quantizers."""
    from tqdm import tqdm

    state = quant_state(model)
    method = method or state["calib"]
    percentile = state["percentile"] if percentile is None else percentile
    if num_batches is None:
        num_batches = state.get("calib_batches")
    acts = activation_quantizers(model)
    for q in acts.values():
        q.set_calibrator("max" if method == "max" else "percentile")  # a fresh calibrator
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with _modes(all_quantizers(model).values(), calib=False, quant=False), \
                _modes(acts.values(), calib=True, quant=False):
            bar = tqdm(total=num_batches, desc="calibrate", disable=not progress, leave=False)
            for i, batch in enumerate(batches):
                if num_batches is not None and i >= num_batches:
                    break
                model(_to_input(batch, device))
                seen += 1
                bar.update(1)
            bar.close()
    finally:
        model.train(was_training)
    if seen == 0:
        raise CalibrationError("calibrate(): the batch iterable yielded no batches")
    missing = []
    kwargs = {} if method == "max" else dict(percentile=percentile)
    for name, q in acts.items():
        if not q.load_calib_amax(method, strict=False, **kwargs):
            missing.append(name)
        q.reset_calib()
    if missing:
        msg = (f"calibrate(): {len(missing)} quantizer(s) saw no data (their layers never ran "
               f"on the calibration batches): {', '.join(missing)}")
        if strict:
            raise CalibrationError(msg)
        warnings.warn(msg + "; they are disabled")
        for name in missing:
            acts[name].disable()
    if state["share_concat_scales"]:
        apply_shared_scales(model)
    calibrate_weights(model)  # after the input scales: the bias floor depends on them
    return {n: float(q.amax.max()) for n, q in acts.items() if q.is_calibrated}


def learn_activation_scales(model: nn.Module, lr_ratio: float = 1.0) -> List[nn.Parameter]:
    """QAT option: every calibrated activation amax becomes a trained parameter (LSQ,
    :meth:`TensorQuantizer.learn_amax`); each shared-scale group gets ONE parameter, so tied
    scales stay tied through every step and through the model EMA. The parameters form the
    optimizer group ``quant_scale`` (LR ``lr_ratio`` x the weights' LR, no weight decay; see
    :func:`yolo_q.optim.param_groups`): call before the optimizer is built."""
    acts = {n: q for n, q in activation_quantizers(model).items() if q.is_calibrated and q.enabled}
    params = []
    for group in quant_state(model)["shared"]:
        shared = None
        for name in (g for g in group if g in acts):
            shared = acts.pop(name).learn_amax(shared)
        params += [shared] if shared is not None else []
    params += [q.learn_amax() for q in acts.values()]
    for p in params:
        p.optim_group, p.lr_ratio = "quant_scale", float(lr_ratio)
    return params


def floor_learned_scales(model: nn.Module) -> None:
    """Re-apply the ``AMAX_EPS`` floor to learned activation ranges (QAT: after each epoch, on
    the model and its EMA, before they are evaluated and saved)."""
    for q in activation_quantizers(model).values():
        if q.learns_amax:
            q.amax = q.amax.detach()


def enable_range_ema(model: nn.Module, ema: float = 0.99) -> None:
    """QAT option: activation ranges follow an EMA of the batch max in training mode."""
    for q in activation_quantizers(model).values():
        q.enable_range_ema(ema)


# ------------------------------------------------------------------------------ analysis
@contextmanager
def capture_layer_outputs(model: nn.Module, names: Optional[Sequence[str]] = None):
    """Record the output of each quantized layer (dict name -> list of tensors, one per call)."""
    names = quantized_layers(model) if names is None else _check_names(model, names)
    store: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(_m, _i, out, n=n):
            store[n].append(out.detach())
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_output_errors(model: nn.Module, batch) -> Dict[str, Dict[str, float]]:
    """Per quantized layer: error of its fake-quant output against the float model on the same
    images (accumulated through the network): ``mse`` and ``snr_db`` (float power / error)."""
    x = _to_input(batch, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        qs = list(all_quantizers(model).values())
        with capture_layer_outputs(model) as ref, _modes(qs, calib=False, quant=False):
            model(x)
        with capture_layer_outputs(model) as got:
            model(x)
    finally:
        model.train(was_training)
    out = {}
    for n in ref:
        r = torch.cat([t.flatten() for t in ref[n]]).double()
        q = torch.cat([t.flatten() for t in got[n]]).double()
        mse = float(((q - r) ** 2).mean())
        power = float((r ** 2).mean())
        snr = 10 * math.log10(power / mse) if mse > 0 and power > 0 else math.inf
        out[n] = dict(mse=mse, snr_db=snr)
    return out


__all__ = ["CalibrationError", "DFL_LAYERS", "FLAVOURS", "OUTPUT_LAYERS", "QUANT_MODULES",
           "QuantStateError", "activation_quantizers", "all_quantizers", "apply_shared_scales",
           "bias_amax_floor", "calibrate", "calibrate_weights", "capture_layer_outputs", "convert",
           "disable_layers", "enable_range_ema", "floor_learned_scales", "floor_weight_scales",
           "input_grid_quantizer", "is_quantized", "layer_modules", "layer_output_errors",
           "learn_activation_scales", "mse_weight_amax", "plan", "quant_state",
           "quantize_only", "quantized_layers", "resolve_settings", "restore", "set_quant_enabled",
           "weight_quantizers"]
