"""Float models from state dicts: the yolov6 n/s/m/l config that fits a state dict, and a strict
load into training or deploy (fused) form. The one public loader is :func:`yolo_q.load_model`."""
from __future__ import annotations

from typing import Dict

import torch

from ..config import load_config
from ..io import CheckpointError, is_deploy_form, load_state_into
from .yolo import build_model


def infer_config(sd: Dict[str, torch.Tensor]):
    """Pick the yolov6 n/s/m/l config whose structure matches the state dict (nc from its shapes)."""
    nc = sd["detect.cls_preds.0.weight"].shape[0] if "detect.cls_preds.0.weight" in sd else 80
    deploy = is_deploy_form(sd)
    for name in ("yolov6n", "yolov6s", "yolov6m", "yolov6l"):
        cfg = load_config(f"configs/{name}.yaml", [f"model.nc={nc}"])
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
