"""Model summary: parameters, FLOPs (2 x MACs from torch.utils.flop_counter), output shapes."""
from __future__ import annotations

import copy
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gflops(model: torch.nn.Module, img_size: int = 640) -> float:
    x = torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 1e9


@torch.no_grad()
def model_info(model: torch.nn.Module, img_size: int = 640) -> Dict:
    """Counts for the training form and the fused (deploy) form of ``model``."""
    model = copy.deepcopy(model).eval()
    x = torch.zeros(1, 3, img_size, img_size)
    feats = model.forward_features(x)
    out = model.forward_head(feats)
    info = {
        "params": count_params(model),
        "gflops": round(count_gflops(model, img_size), 3),
        "img_size": img_size,
        "levels": [{"stride": int(s), "shape": list(f.shape)} for s, f in
                   zip(model.detect.strides, feats)],
        "output_shape": list(out.shape),
    }
    model.fuse()
    info["fused_params"] = count_params(model)
    info["fused_gflops"] = round(count_gflops(model, img_size), 3)
    return info
