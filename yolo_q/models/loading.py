"""Float models from state dicts: the yolov6 n/s/m/l config that fits a state dict, and a strict
load into training or deploy (fused) form, and the one writer of float checkpoints
(:func:`write_float_checkpoint`). The one public loader is :func:`yolo_q.load_model`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from ..config import config_from_dict, config_to_dict, load_config
from ..io import (CheckpointError, PathLike, half_state, is_deploy_form, load_state_into,
                  official_settings, save_checkpoint)
from .yolo import build_model

logger = logging.getLogger(__name__)


def infer_config(sd: Dict[str, torch.Tensor], settings: Optional[Dict[str, Any]] = None):
    """Pick the yolov6 n/s/m/l config whose structure matches the state dict (nc from its shapes,
    ``settings`` (``model.*`` keys, e.g. from :func:`weight_settings`) applied first)."""
    nc = sd["detect.cls_preds.0.weight"].shape[0] if "detect.cls_preds.0.weight" in sd else 80
    deploy = is_deploy_form(sd)
    for name in ("yolov6n", "yolov6s", "yolov6m", "yolov6l"):
        cfg = with_settings(load_config(f"configs/{name}.yaml", [f"model.nc={nc}"]), settings)
        stem_key = "backbone.stem.rbr_reparam.weight" if deploy else "backbone.stem.rbr_dense.conv.weight"
        if stem_key not in sd and "backbone.stem.block.conv.weight" in sd:
            stem_key = "backbone.stem.block.conv.weight"
        model = build_model(cfg)
        if deploy:
            model.fuse()
        ref = model.state_dict()
        if stem_key in sd and ref.get(stem_key, torch.empty(0)).shape != sd[stem_key].shape:
            continue
        if set(ref) == set(sd) and all(ref[k].shape == sd[k].shape for k in ref):
            return cfg
    raise CheckpointError("weights match none of configs/yolov6{n,s,m,l}.yaml; pass the config "
                          "(--config / cfg=) that built them")


def float_model_from_state(cfg, sd: Dict[str, torch.Tensor], source: str = "weights",
                           fuse: bool = False) -> torch.nn.Module:
    """``build_model(cfg)`` (fused first for deploy-form weights) + strict load of ``sd``."""
    model = build_model(cfg)
    if is_deploy_form(sd):
        model.fuse()
    load_state_into(model, sd, source)
    if fuse:
        model.fuse()
    return model


def write_float_checkpoint(model: torch.nn.Module, path: PathLike, cfg=None, fp16: bool = False,
                           keep_same: bool = False, **meta: Any) -> Path:
    """Write ``model`` as a yolo_q float checkpoint, atomically: ``{"model": state dict (every
    floating tensor float16 with ``fp16``; it loads back as float32), "config": ``cfg`` (default
    ``model.yolo_q_config``, the config with the weights' own settings), "fused": deploy form
    or not, **meta}`` (e.g. ``source=``, ``epoch=``). Loads with :func:`yolo_q.load_model`.
    ``keep_same``: see :func:`yolo_q.io.save_checkpoint`."""
    sd = model.state_dict()
    cfg = model.yolo_q_config if cfg is None else cfg
    return save_checkpoint({"model": half_state(sd) if fp16 else sd, "config": config_to_dict(cfg),
                            "fused": model.is_fused, **meta}, path, keep_same)


# ---- settings that belong to the weights, not to the run (used by load_model, resume, teachers) --
def weight_settings(ck: Dict[str, Any], source: str = "weights") -> Dict[str, Any]:
    """``model.*`` values fixed by the weights of a :func:`yolo_q.io.read_checkpoint_any` result:
    the official modules' attributes (BN eps/momentum, DFL), or the BN settings of the config a
    yolo_q checkpoint stores (1e-5 / 0.1 when it predates them). Empty for a plain state dict."""
    if ck.get("official") is not None:
        return official_settings(ck["official"].tree, source)
    if ck.get("config"):
        m = config_from_dict(ck["config"]).model
        return {"bn_eps": float(m.bn_eps), "bn_momentum": float(m.bn_momentum)}
    return {}


def with_settings(cfg, settings: Optional[Dict[str, Any]], source: str = "weights"):
    """A copy of ``cfg`` with ``settings`` (``model.*`` keys) applied; a value that differs from
    the one given is logged (the weights' own value wins: it is what they compute with)."""
    if not settings:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    model = cfg.model if "model" in cfg else cfg
    for key, value in settings.items():
        old = OmegaConf.select(model, key)
        if old != value:
            if old is not None:
                logger.info("%s: model.%s=%s from the weights (config had %s)", source, key,
                            value, old)
            OmegaConf.update(model, key, value, merge=False)
    return cfg
