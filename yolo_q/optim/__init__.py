"""Optimizers (YOLOv6 parameter groups) and the warm-up + per-epoch LR schedule."""
from .optimizer import GROUP_NAMES, accumulate_steps, build_optimizer, param_groups
from .scheduler import WarmupScheduler, lr_factor, warmup_accumulate, warmup_iterations

__all__ = ["GROUP_NAMES", "WarmupScheduler", "accumulate_steps", "build_optimizer", "lr_factor",
           "param_groups", "warmup_accumulate", "warmup_iterations"]
