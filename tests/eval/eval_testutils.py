"""Helpers for eval/export tests: a tiny randomized detector with sensible outputs."""
from pathlib import Path

import torch

from conftest import randomize_
from yolo_q.config import load_config
from yolo_q.models import build_model

REPO = Path(__file__).resolve().parents[2]
COCO128 = REPO.parent / "shared" / "datasets" / "coco128"


def tiny_detector(nc: int = 3, seed: int = 0) -> torch.nn.Module:
    """Tiny YOLOv6-N (width 1/8, one block per stage) with random weights and BN statistics;
    prediction convs are set so boxes have positive sizes and scores spread over (0, 1)."""
    cfg = load_config(str(REPO / "configs" / "yolov6n.yaml"),
                      ["model.width_multiple=0.125", f"model.nc={nc}", "model.depth_multiple=0.1"])
    model = randomize_(build_model(cfg), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    preds = list(model.detect.cls_preds) + list(model.detect.reg_preds)
    stds = {}
    hooks = [c.register_forward_hook(lambda m, i, o: stds.__setitem__(m, i[0].std().item()))
             for c in preds]
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64, generator=g))
        for h in hooks:
            h.remove()
        for conv in preds:  # output std ~0.5 whatever the (random) feature scale is
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g)
                              * 0.5 / (max(stds[conv], 1e-6) * fan_in ** 0.5))
        for conv in model.detect.cls_preds:
            conv.bias.copy_(torch.rand(conv.bias.shape, generator=g) * 4 - 4)
        for conv in model.detect.reg_preds:
            conv.bias.copy_(torch.rand(conv.bias.shape, generator=g) * 2 + 1.5)
    return model
