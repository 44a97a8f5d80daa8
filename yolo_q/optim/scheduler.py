"""Learning-rate schedule: linear warm-up per iteration, then a per-epoch factor (YOLOv6).

For iteration ``it`` (global, 0-based) of epoch ``e`` (0-based), with ``base = initial_lr *
factor(e)``:

* warm-up (``it < warmup_iters``): ``lr`` goes linearly from ``warmup_bias_lr`` (``bias`` group)
  or 0 (other groups) to ``base``; ``momentum`` from ``warmup_momentum`` to ``momentum``;
* afterwards ``lr = base`` and ``momentum = momentum``.

``factor(e)``: ``cosine`` ``1 + (lrf - 1) * (1 - cos(pi * e / epochs)) / 2``, ``linear``
``1 - (1 - lrf) * e / epochs``, ``constant`` 1. The schedule is a pure function of
``(it, e)``, so a resumed run gets exactly the LRs of an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(kind: str, epochs: int, lrf: float) -> Callable[[int], float]:
    """Per-epoch LR multiplier; 1 at epoch 0, approaching ``lrf`` at ``epochs``."""
    kind = str(kind).lower()
    if epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {epochs}")
    if kind == "cosine":
        return lambda e: 1.0 + (lrf - 1.0) * (1.0 - math.cos(math.pi * e / epochs)) / 2.0
    if kind == "linear":
        return lambda e: 1.0 - (1.0 - lrf) * e / epochs
    if kind == "constant":
        return lambda e: 1.0
    raise ValueError(f"train.scheduler: unknown schedule '{kind}', expected one of "
                     f"{', '.join(SCHEDULES)}")


def warmup_iterations(warmup_epochs: float, iters_per_epoch: int, min_iters: int) -> int:
    """``max(round(warmup_epochs * iters_per_epoch), min_iters)``; 0 (no warm-up) when
    ``warmup_epochs <= 0``."""
    if warmup_epochs <= 0:
        return 0
    return max(round(warmup_epochs * iters_per_epoch), int(min_iters))


def warmup_accumulate(iteration: int, warmup_iters: int, target: float, nominal: int) -> int:
    """Micro-batches per optimizer step at ``iteration`` when accumulation ramps up over the
    warm-up (YOLOv6): ``round`` of the line from 1 (iteration 0) to ``target`` =
    ``nominal_batch / (batch * world)`` (iteration ``warmup_iters``), at least 1; ``nominal``
    (:func:`yolo_q.optim.accumulate_steps`) from the end of the warm-up on. A pure function of
    the iteration, so a resumed run steps exactly where an uninterrupted one does."""
    if iteration >= warmup_iters or warmup_iters <= 0:
        return int(nominal)
    return max(1, round(1.0 + (float(target) - 1.0) * iteration / warmup_iters))


class WarmupScheduler:
    """Sets ``lr`` (and ``momentum`` where the group has one) of every param group.

    The group named ``bias`` (see :func:`yolo_q.optim.build_optimizer`) warms up from
    ``warmup_bias_lr``; each group's target is its ``initial_lr`` times the epoch factor.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, epochs: int, lrf: float,
                 warmup_iters: int = 0, warmup_bias_lr: float = 0.0, warmup_momentum: float = 0.8,
                 momentum: float = 0.937):
        self.optimizer = optimizer
        self.kind, self.epochs, self.lrf = str(kind).lower(), int(epochs), float(lrf)
        self.factor = lr_factor(self.kind, self.epochs, self.lrf)
        self.warmup_iters = int(warmup_iters)
        self.warmup_bias_lr, self.warmup_momentum = float(warmup_bias_lr), float(warmup_momentum)
        self.momentum = float(momentum)
        self.last: Tuple[int, int] = (-1, -1)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])

    @classmethod
    def from_config(cls, optimizer, cfg, iters_per_epoch: int) -> "WarmupScheduler":
        """Build from the full config or its ``train`` section."""
        t = cfg.train if hasattr(cfg, "train") else cfg
        return cls(optimizer, t.scheduler, t.epochs, t.lrf,
                   warmup_iterations(t.warmup_epochs, iters_per_epoch, t.warmup_min_iters),
                   t.warmup_bias_lr, t.warmup_momentum, t.momentum)

    def values(self, iteration: int, epoch: int) -> List[Tuple[float, float]]:
        """``(lr, momentum)`` of each param group at ``(iteration, epoch)``."""
        out = []
        for g in self.optimizer.param_groups:
            base = g["initial_lr"] * self.factor(epoch)
            if iteration < self.warmup_iters:
                a = iteration / self.warmup_iters
                start = self.warmup_bias_lr if g.get("name") == "bias" else 0.0
                lr = start + (base - start) * a
                mom = self.warmup_momentum + (self.momentum - self.warmup_momentum) * a
            else:
                lr, mom = base, self.momentum
            out.append((lr, mom))
        return out

    def step(self, iteration: int, epoch: int) -> None:
        for g, (lr, mom) in zip(self.optimizer.param_groups, self.values(iteration, epoch)):
            g["lr"] = lr
            if "momentum" in g:
                g["momentum"] = mom
        self.last = (int(iteration), int(epoch))

    def state_dict(self) -> Dict:
        return dict(kind=self.kind, epochs=self.epochs, lrf=self.lrf,
                    warmup_iters=self.warmup_iters, warmup_bias_lr=self.warmup_bias_lr,
                    warmup_momentum=self.warmup_momentum, momentum=self.momentum,
                    last=list(self.last))

    def load_state_dict(self, state: Dict) -> None:
        """Restore the warm-up length and position. The schedule's kind/epochs/lrf/momentum come
        from the current config, so a resumed run may extend ``train.epochs``."""
        self.warmup_iters = int(state["warmup_iters"])
        self.last = tuple(int(v) for v in state.get("last", (-1, -1)))
