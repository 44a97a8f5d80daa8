"""BatchNorm running statistics: re-estimate them for fixed weights.

``recompute_bn_stats(model, batches)`` resets every BatchNorm's running mean/variance and runs
the model in train mode (no gradients, nothing else changes) over ``batches``, with cumulative
averaging (``momentum=None``): the statistics become the plain average over those batches, i.e.
the statistics that belong to the model's *current* weights. Used to diagnose (and repair) BN
statistics that do not match the weights - e.g. an EMA model whose buffers were copied from the
live model, or running stats dominated by the last few small batches (momentum 0.1).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["bn_layers", "recompute_bn_stats"]


def bn_layers(model: nn.Module):
    """Every BatchNorm layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, num_batches: Optional[int] = None,
                       device=None) -> int:
    """Replace the running statistics of ``model``'s BatchNorm layers by their average over
    ``batches`` (uint8 or float image tensors, or tuples whose first item is one; at most
    ``num_batches`` of them). Weights are untouched; the model's train/eval mode and the BN
    momenta are restored. Returns the number of batches used (0: nothing changed)."""
    layers = bn_layers(model)
    if not layers:
        return 0
    device = device or next(model.parameters()).device
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches
    model.train()
    n = 0
    try:
        for batch in batches:
            if num_batches is not None and n >= num_batches:
                break
            imgs = batch[0] if isinstance(batch, (tuple, list)) else batch
            imgs = imgs.to(device)
            imgs = imgs.float().div_(255.0) if imgs.dtype == torch.uint8 else imgs.float()
            model(imgs)
            n += 1
    finally:
        model.train(was_training)
        for m, (mom, mean, var, count) in zip(layers, saved):
            m.momentum = mom
            if n == 0:  # nothing seen: keep the old statistics
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    return n
