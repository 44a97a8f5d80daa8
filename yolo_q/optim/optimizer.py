"""Optimizers with YOLOv6-style parameter groups.

Three groups, in this order (the order YOLOv6 uses; each group also carries a ``name``):

* ``norm``   - weights of normalisation layers (BatchNorm, GroupNorm, LayerNorm, ...) and any other
  1-D parameter that is neither a ``weight`` nor a ``bias`` (e.g. BottleRep's ``alpha``): no
  weight decay;
* ``weight`` - every other ``weight`` (conv / linear kernels, RepOpt scale layers): weight decay;
* ``bias``   - every ``bias``: no weight decay, and its own warm-up LR (see
  :class:`yolo_q.optim.scheduler.WarmupScheduler`).

A parameter carrying an ``optim_group`` attribute (a name) goes into a group of that name
instead, after the three, with no weight decay and the LR ``lr0 * p.lr_ratio`` (default 1; e.g.
the learned quantization ranges of QAT, :func:`yolo_q.quant.learn_activation_scales`).

Parameters with ``requires_grad=False`` (e.g. the DFL projection) are left out.
Weight decay is scaled by ``batch * world * accumulate / nominal_batch`` (YOLOv6), so the decay
applied per sample stays the same whatever the batch size and accumulation.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from .repopt import RepOptimizer

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm)
GROUP_NAMES = ("norm", "weight", "bias")


def accumulate_steps(nominal_batch: int, batch_size: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer step so that ``batch * world * accumulate ~ nominal``."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"train.batch_size ({batch_size}) and world size ({world_size}) "
                         f"must be >= 1")
    return max(round(nominal_batch / (batch_size * world_size)), 1)


def param_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Split trainable parameters into ``norm`` / ``weight`` / ``bias`` lists, plus one list per
    ``optim_group`` name (see module doc)."""
    groups: Dict[str, List[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if getattr(p, "optim_group", None):
                groups.setdefault(str(p.optim_group), []).append(p)
            elif name == "bias":
                groups["bias"].append(p)
            elif isinstance(module, NORM_TYPES) or (name != "weight" and p.ndim <= 1):
                groups["norm"].append(p)
            else:
                groups["weight"].append(p)
    return groups


def build_optimizer(model: nn.Module, cfg, world_size: int = 1,
                    grad_masks: Optional[Dict] = None, decay_offsets: Optional[Dict] = None
                    ) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov), AdamW or RepOptimizer over the three parameter groups.

    ``cfg`` is the full config or its ``train`` section; uses ``optimizer``, ``lr0``,
    ``momentum``, ``nesterov``, ``weight_decay``, ``batch_size`` (per process) and
    ``nominal_batch``. Every group gets ``initial_lr = lr0`` for the LR scheduler.
    ``grad_masks`` / ``decay_offsets`` (from :func:`yolo_q.optim.repopt.prepare_repopt`) are
    for ``optimizer=repopt`` only.
    """
    t = cfg.train if hasattr(cfg, "train") else cfg
    accumulate = accumulate_steps(t.nominal_batch, t.batch_size, world_size)
    weight_decay = t.weight_decay * t.batch_size * world_size * accumulate / t.nominal_batch
    groups = param_groups(model)
    specs = [dict(params=groups[name], name=name, initial_lr=t.lr0,
                  weight_decay=weight_decay if name == "weight" else 0.0)
             for name in GROUP_NAMES]
    for name in [n for n in groups if n not in GROUP_NAMES]:
        ratio = float(getattr(groups[name][0], "lr_ratio", 1.0))
        specs.append(dict(params=groups[name], name=name, initial_lr=t.lr0 * ratio,
                          lr=t.lr0 * ratio, weight_decay=0.0))
    kind = str(t.optimizer).lower()
    if kind != "repopt" and (grad_masks or decay_offsets):
        raise ValueError(f"grad_masks/decay_offsets need train.optimizer=repopt, got '{kind}'")
    if kind == "sgd":
        return torch.optim.SGD(specs, lr=t.lr0, momentum=t.momentum, nesterov=bool(t.nesterov))
    if kind == "adamw":
        return torch.optim.AdamW(specs, lr=t.lr0, betas=(t.momentum, 0.999))
    if kind == "repopt":
        return RepOptimizer(specs, lr=t.lr0, momentum=t.momentum, nesterov=bool(t.nesterov),
                            grad_masks=grad_masks, decay_offsets=decay_offsets)
    raise ValueError(f"train.optimizer: unknown optimizer '{t.optimizer}', expected "
                     f"sgd | adamw | repopt")
