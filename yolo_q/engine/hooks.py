"""Trainer hooks: LR schedule, EMA, evaluation, checkpoints, TensorBoard, progress.

A hook overrides any of the :attr:`Trainer.HOOK_POINTS` (no arguments; the trainer is
``self.trainer``) and may keep state for checkpoints via ``state_dict``/``load_state_dict``.
``register(trainer)`` runs once when the trainer is built (before any :meth:`Trainer.resume`).
Every rank runs the same hooks; rank-0-only work (files, bars) is decided inside the hook.
"""
from __future__ import annotations

import copy
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..optim import WarmupScheduler, warmup_accumulate
from ..io import atomic_path, save_checkpoint
from .distributed import broadcast_object, unwrap_model

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[nn.Module], Dict[str, float]]


class Hook:
    """Base class: every hook point is a no-op; override the ones you need."""

    trainer: Any = None

    def register(self, trainer) -> None:
        self.trainer = trainer

    def before_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def before_step(self) -> None: ...

    def after_forward(self) -> None:
        """Inside autocast, after the forward and before the loss: may fill
        ``trainer.extra_losses``."""

    def before_optimizer_step(self) -> None:
        """Gradients are complete and unscaled; called only on micro-batches that step."""

    def after_step(self) -> None: ...

    def after_epoch(self) -> None: ...

    def after_train(self) -> None:
        """Always called, also when training raised (close files here, don't save)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------- LR schedule
class WarmupLRHook(Hook):
    """Sets LR/momentum before every step: linear warm-up, then the per-epoch schedule
    (see :class:`yolo_q.optim.WarmupScheduler`; built from ``cfg.train``). With
    ``accumulate_warmup`` (default ``cfg.train.accumulate_warmup``) it also ramps
    ``trainer.accumulate`` from 1 to ``nominal_batch / batch`` over the same warm-up
    (:func:`yolo_q.optim.warmup_accumulate`, as YOLOv6): a pure function of the global
    iteration and the (checkpointed) warm-up length, so resume stays exact."""

    def __init__(self, scheduler: Optional[WarmupScheduler] = None,
                 accumulate_warmup: Optional[bool] = None):
        self.scheduler = scheduler
        self.accumulate_warmup = accumulate_warmup
        self.target = 1.0

    def register(self, trainer) -> None:
        super().register(trainer)
        t = trainer.cfg.train
        if self.scheduler is None:
            self.scheduler = WarmupScheduler.from_config(trainer.optimizer, trainer.cfg,
                                                         trainer.iters_per_epoch)
        if self.accumulate_warmup is None:
            self.accumulate_warmup = bool(t.get("accumulate_warmup", False))
        self.target = float(t.nominal_batch) / (float(t.batch_size) * trainer.world_size)

    def before_step(self) -> None:
        tr = self.trainer
        self.scheduler.step(tr.iter, tr.epoch)
        if self.accumulate_warmup:
            tr.accumulate = warmup_accumulate(tr.iter, self.scheduler.warmup_iters, self.target,
                                              tr.nominal_accumulate)

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


# ----------------------------------------------------------------------------- EMA
class ModelEMA:
    """Exponential moving average of a model's parameters (YOLOv6 ramp).

    After update ``n`` the decay is ``decay * (1 - exp(-n / tau))``, so early updates follow the
    model closely. Floating-point buffers (BN running stats) are averaged like the parameters
    (``copy_buffers=False``, as YOLOv6 and Ultralytics do: the statistics then belong to the
    averaged weights) or copied from the live model (``True``: what QAT needs for its quantizer
    ranges). Integer buffers (``num_batches_tracked``) are always copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0,
                 updates: int = 0, copy_buffers: bool = False):
        self.decay, self.tau, self.updates = float(decay), float(tau), int(updates)
        self.copy_buffers = copy_buffers
        self.ema = copy.deepcopy(unwrap_model(model)).eval()
        self.ema.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        src_p = dict(unwrap_model(model).named_parameters())
        src_b = dict(unwrap_model(model).named_buffers())
        ema_p, mod_p = [], []
        for k, v in self.ema.named_parameters():
            ema_p.append(v)
            mod_p.append(src_p[k].detach())
        avg_b, copy_b = [], []
        for k, v in self.ema.named_buffers():
            (avg_b if v.is_floating_point() and not self.copy_buffers else copy_b).append(
                (v, src_b[k].detach()))
        if avg_b:
            ema_p += [e for e, _ in avg_b]
            mod_p += [m for _, m in avg_b]
        if ema_p:  # ema <- d * ema + (1 - d) * model
            torch._foreach_mul_(ema_p, d)
            torch._foreach_add_(ema_p, mod_p, alpha=1.0 - d)
        for e, m in copy_b:
            e.copy_(m)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average from ``model``'s current weights."""
        self.ema.load_state_dict(unwrap_model(model).state_dict())
        self.updates = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"ema": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self.updates = int(state["updates"])


class EMAHook(Hook):
    """Keeps ``trainer.ema`` (a :class:`ModelEMA`), updated after every optimizer step.
    Its weights are checkpointed by the trainer (``ema``, ``ema_updates``). ``copy_buffers``:
    see :class:`ModelEMA` (config: ``train.ema_buffers`` average | copy)."""

    def __init__(self, decay: float = 0.9999, tau: float = 2000.0, copy_buffers: bool = False):
        self.decay, self.tau, self.copy_buffers = decay, tau, copy_buffers

    def register(self, trainer) -> None:
        super().register(trainer)
        if trainer.ema is None:
            trainer.ema = ModelEMA(trainer.model, self.decay, self.tau,
                                   copy_buffers=self.copy_buffers)

    def after_step(self) -> None:
        if self.trainer.optimizer_stepped:
            self.trainer.ema.update(self.trainer.model)


# ----------------------------------------------------------------------------- evaluation
class EvalHook(Hook):
    """Calls ``evaluate_fn(model) -> {'map50_95': ..., 'map50': ..., ...}`` on the EMA model
    (else the model) in eval mode, on rank 0, every ``interval`` epochs, in the last epoch and
    in each of the last ``final_epochs`` epochs. Sets ``trainer.metrics`` (same on all ranks)
    and ``best_fitness`` / ``best_epoch`` by ``metric``."""

    def __init__(self, evaluate_fn: EvaluateFn, interval: int = 1, final_epochs: int = 0,
                 metric: str = "map50_95"):
        if not callable(evaluate_fn):
            raise TypeError("EvalHook: evaluate_fn must be callable(model) -> dict")
        self.evaluate_fn, self.metric = evaluate_fn, metric
        self.interval, self.final_epochs = max(int(interval), 1), int(final_epochs)

    def should_eval(self, epoch: int) -> bool:
        done, total = epoch + 1, self.trainer.epochs
        return done == total or done % self.interval == 0 or done > total - self.final_epochs

    def after_epoch(self) -> None:
        tr = self.trainer
        if not self.should_eval(tr.epoch):
            return
        metrics = None
        if tr.is_main:
            model = tr.ema.ema if tr.ema is not None else tr.model
            was_training = model.training
            model.eval()
            t0 = time.time()
            with torch.no_grad():
                metrics = dict(self.evaluate_fn(model))
            model.train(was_training)
            if self.metric not in metrics:
                raise KeyError(f"evaluate_fn returned {sorted(metrics)}, without '{self.metric}'")
            metrics = {k: (float(v) if isinstance(v, (int, float)) or
                           (hasattr(v, "ndim") and v.ndim == 0) else v)
                       for k, v in metrics.items()}
            logger.info("epoch %d eval (%.1fs): %s", tr.epoch + 1, time.time() - t0,
                        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                  if isinstance(v, float)))
        metrics = broadcast_object(metrics)
        tr.metrics, tr.metrics_epoch = metrics, tr.epoch
        if metrics[self.metric] > tr.best_fitness:
            tr.best_fitness, tr.best_epoch = float(metrics[self.metric]), tr.epoch


# ----------------------------------------------------------------------------- checkpoints
class CheckpointHook(Hook):
    """Rank 0, after every epoch: ``<dirname>/last.pt`` (atomic) with :meth:`Trainer.state_dict`,
    and ``best.pt`` (atomic copy) when this epoch set ``trainer.best_epoch``. Place it after
    :class:`EvalHook`."""

    def __init__(self, dirname, save_best: bool = True):
        self.dirname, self.save_best = Path(dirname), save_best

    @property
    def last_path(self) -> Path:
        return self.dirname / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.dirname / "best.pt"

    def after_epoch(self) -> None:
        tr = self.trainer
        if not tr.is_main:
            return
        save_checkpoint(tr.state_dict(), self.last_path)
        tr.storage["last_checkpoint"] = str(self.last_path)
        if self.save_best and tr.best_epoch == tr.epoch:
            _atomic_copy(self.last_path, self.best_path)
            tr.storage["best_checkpoint"] = str(self.best_path)


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


# ----------------------------------------------------------------------------- logging
class TensorBoardHook(Hook):
    """Rank 0: ``train/<loss part>`` and ``lr/<group>`` every ``interval`` iterations,
    ``epoch/<loss part>`` (mean over ranks) and ``val/<metric>`` every epoch."""

    def __init__(self, log_dir, interval: int = 10):
        self.log_dir, self.interval = Path(log_dir), max(int(interval), 1)
        self.writer = None

    def before_train(self) -> None:
        if self.trainer.is_main and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used
            self.writer = SummaryWriter(str(self.log_dir))

    def after_step(self) -> None:
        tr = self.trainer
        if self.writer is None or not tr.step_ok or tr.iter % self.interval:
            return
        self.writer.add_scalar("train/loss", tr.loss, tr.iter)
        for k, v in tr.loss_parts.items():
            self.writer.add_scalar(f"train/{k}", v, tr.iter)
        for i, g in enumerate(tr.optimizer.param_groups):
            self.writer.add_scalar(f"lr/{g.get('name', i)}", g["lr"], tr.iter)

    def after_epoch(self) -> None:
        tr = self.trainer
        if self.writer is None:
            return
        step = tr.epoch + 1
        for k, v in tr.epoch_losses.items():
            self.writer.add_scalar(f"epoch/{k}", v, step)
        self.writer.add_scalar("epoch/lr", tr.lr, step)
        self.writer.add_scalar("epoch/bad_steps", tr.total_bad_steps, step)
        if tr.metrics_epoch == tr.epoch:
            for k, v in tr.metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"val/{k}", v, step)
        self.writer.flush()

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ResultsCSVHook(Hook):
    """Rank 0: one row per epoch in ``<path>`` (epoch, mean loss parts, lr, bad steps, seconds,
    and the validation metrics of epochs that were evaluated). Appends on resume."""

    FIELDS_METRICS = ("map50_95", "map50")

    def __init__(self, path):
        self.path = Path(path)
        self.t0 = time.time()

    def before_epoch(self) -> None:
        self.t0 = time.time()

    def after_epoch(self) -> None:
        tr = self.trainer
        if not tr.is_main:
            return
        row = {"epoch": tr.epoch + 1, **{k: round(float(v), 6) for k, v in tr.epoch_losses.items()},
               "lr": round(tr.lr, 8), "bad_steps": tr.total_bad_steps,
               "seconds": round(time.time() - self.t0, 2)}
        evaluated = tr.metrics_epoch == tr.epoch
        for k in self.FIELDS_METRICS:
            row[k] = round(float(tr.metrics[k]), 6) if evaluated and k in tr.metrics else ""
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with open(self.path, encoding="utf-8") as f:
                header = f.readline().strip().split(",")
            if header != list(row):
                new = True  # columns changed (e.g. an extra loss part): start a fresh header
        with open(self.path, "w" if new else "a", encoding="utf-8") as f:
            if new:
                f.write(",".join(row) + "\n")
            f.write(",".join(str(v) for v in row.values()) + "\n")


def read_results_csv(path) -> List[Dict[str, Any]]:
    """Rows of a :class:`ResultsCSVHook` file as dicts of floats (empty cells -> None)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().strip().split(",")
        for line in f:
            vals = line.strip().split(",")
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in zip(header, vals)})
    return rows


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressHook(Hook):
    """Rank 0: a tqdm bar per epoch with the epoch's mean loss parts, LR and the ETA of the
    whole run; when disabled or stderr is not a terminal, a log line every ``interval``
    iterations instead. Put it first in the hook list (closes its bar before eval logs)."""

    def __init__(self, enabled: bool = True, interval: int = 10):
        self.enabled, self.interval = enabled, max(int(interval), 1)
        self.bar = None
        self.use_bar = False
        self._t0, self._it0 = 0.0, 0

    def before_train(self) -> None:
        self.use_bar = bool(self.enabled and self.trainer.is_main and sys.stderr.isatty())
        self._t0, self._it0 = time.time(), self.trainer.iter

    def eta(self) -> float:
        tr = self.trainer
        done = tr.iter + 1 - self._it0
        left = (tr.epochs - tr.epoch) * tr.iters_per_epoch - tr.inner_iter - 1
        return (time.time() - self._t0) / max(done, 1) * left

    def status(self) -> Dict[str, str]:
        tr = self.trainer
        out = {k: f"{v:.4g}" for k, v in tr.running_losses().items()}
        out["lr"] = f"{tr.lr:.3g}"
        if tr.total_bad_steps:
            out["bad"] = str(tr.total_bad_steps)
        out["eta"] = format_seconds(self.eta())
        return out

    def before_epoch(self) -> None:
        tr = self.trainer
        if self.use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=tr.iters_per_epoch, desc=f"epoch {tr.epoch + 1}/{tr.epochs}",
                            dynamic_ncols=True, leave=True)

    def after_step(self) -> None:
        tr = self.trainer
        if not tr.is_main:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self.status(), refresh=False)
        elif (tr.inner_iter + 1) % self.interval == 0:
            logger.info("epoch %d/%d iter %d/%d %s", tr.epoch + 1, tr.epochs, tr.inner_iter + 1,
                        tr.iters_per_epoch,
                        " ".join(f"{k}={v}" for k, v in self.status().items()))

    def after_epoch(self) -> None:
        tr = self.trainer
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if tr.is_main:
            losses = " ".join(f"{k}={v:.4g}" for k, v in tr.epoch_losses.items())
            logger.info("epoch %d/%d done: %s lr=%.3g bad_steps=%d elapsed=%s", tr.epoch + 1,
                        tr.epochs, losses, tr.lr, tr.total_bad_steps,
                        format_seconds(time.time() - self._t0))

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- defaults
def default_hooks(cfg, evaluate_fn: Optional[EvaluateFn] = None, work_dir=None) -> List[Hook]:
    """The standard float-training hooks, in order: progress, LR schedule, EMA (``train.ema``),
    eval (when ``evaluate_fn`` is given), checkpoints (``<work_dir>/weights``) and TensorBoard
    (``<work_dir>/tensorboard``, ``train.tensorboard``); the last two need ``work_dir``.
    Append extra hooks (e.g. distillation) to the returned list."""
    t = cfg.train
    hooks: List[Hook] = [ProgressHook(bool(t.progress_bar), t.log_interval), WarmupLRHook()]
    if t.ema:
        hooks.append(EMAHook(t.ema_decay, t.ema_tau, copy_buffers=t.ema_buffers == "copy"))
    if evaluate_fn is not None:
        hooks.append(EvalHook(evaluate_fn, t.eval_interval, t.eval_final_epochs))
    if work_dir is not None:
        hooks.append(CheckpointHook(Path(work_dir) / "weights"))
        hooks.append(ResultsCSVHook(Path(work_dir) / "results.csv"))
        if t.tensorboard:
            hooks.append(TensorBoardHook(Path(work_dir) / "tensorboard", t.log_interval))
    return hooks
