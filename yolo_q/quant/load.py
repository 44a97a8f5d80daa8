"""The one model loader: yolo_q / official / plain-state-dict / quantized checkpoints
(:func:`load_model`, re-exported as :func:`yolo_q.load_model`)."""
from __future__ import annotations

import logging
from typing import Any, Dict

import torch
import torch.nn as nn

from ..config import config_from_dict
from ..io import PathLike, check_official_function, load_state_into, read_checkpoint_any
from ..models import build_model
from ..models.loading import float_model_from_state, infer_config, weight_settings, with_settings
from .convert import convert, floor_weight_scales

logger = logging.getLogger(__name__)


def load_quantized(cfg, state_dict: Dict[str, torch.Tensor], quant_state: dict,
                   source: str = "quantized checkpoint") -> nn.Module:
    """Rebuild a fake-quant model: ``build_model(cfg).fuse()`` -> ``convert(state=quant_state)``
    -> strict ``load_state_dict`` (mismatches are named) -> the int32 bias floor of the weight
    scales (:func:`~yolo_q.quant.floor_weight_scales`: a no-op for checkpoints written since
    it exists; older ones with a dead channel are corrected, with a warning). Returns the
    model in eval mode."""
    if not isinstance(quant_state, dict) or "layers" not in quant_state:
        raise ValueError(f"{source}: 'quant' entry is not a yolo_q quant state")
    model = convert(build_model(cfg).fuse(), state=quant_state)
    load_state_into(model, state_dict, source)
    raised = floor_weight_scales(model)
    if raised:
        logger.warning("%s: weight scales of %d channel(s) raised so that their biases fit "
                       "int32 (%s)", source, sum(raised.values()), ", ".join(raised))
    return model.eval()


def model_from_checkpoint(ck: Dict[str, Any], cfg=None, source: str = "weights",
                          fuse: bool = False, stored_config_first: bool = False) -> nn.Module:
    """A checkpoint already read by :func:`yolo_q.io.read_checkpoint_any` -> model (eval mode).

    The config is ``cfg``, else the checkpoint's, else inferred from the weights' shapes; with
    ``stored_config_first`` the checkpoint's own config (or the inferred one for official
    checkpoints) wins and ``cfg`` serves only a plain state dict. Settings that belong to the
    weights (BN eps/momentum, the official head's DFL) override ``cfg``; an official checkpoint
    whose modules would compute something else than yolo_q's model is refused, naming the
    attribute (:func:`yolo_q.io.check_official_function`)."""
    sd = ck["model"]
    settings = weight_settings(ck, source)
    own = ck.get("config") is not None or ck.get("source") == "official"
    if cfg is None or (stored_config_first and own):
        cfg = config_from_dict(ck["config"]) if ck.get("config") else infer_config(sd, settings)
    cfg = with_settings(cfg, settings, source)
    if ck.get("quant"):
        model = load_quantized(cfg, sd, ck["quant"], source)
    else:
        model = float_model_from_state(cfg, sd, source)
        if ck.get("official") is not None:
            check_official_function(ck["official"].tree, model, source)
        if fuse:
            model.fuse()
    model.yolo_q_config = cfg
    return model.eval()


def load_model(weights: PathLike, cfg=None, device="cpu", fuse: bool = False,
               stored_config_first: bool = False) -> nn.Module:
    """yolo_q / official / plain-state-dict / quantized checkpoint -> model in eval mode.

    The config comes from ``cfg`` if given, else from the checkpoint, else it is inferred from the
    weights' shapes (official checkpoints). Deploy-form (fused) weights load into a fused model;
    quantized checkpoints are rebuilt as fake-quant models (:func:`load_quantized`)."""
    model = model_from_checkpoint(read_checkpoint_any(weights), cfg, str(weights), fuse,
                                  stored_config_first)
    return model.to(device).eval()
