"""The training loop (detectron2 style): a small :class:`Trainer` plus :mod:`hooks <.hooks>`.

Loop (see :meth:`Trainer.train`)::

    before_train
    for epoch:      before_epoch
        for batch:  before_step -> run_step -> after_step
                    after_epoch
    after_train

:meth:`Trainer.run_step` (one micro-batch)::

    preprocess -> forward (autocast on CUDA) -> after_forward -> loss_fn + extra_losses
    -> finite? backward : skip -> [every `accumulate` micro-batches:
       unscale -> before_optimizer_step -> clip -> optimizer step -> zero grads]

Hook points are the eight names in :attr:`Trainer.HOOK_POINTS`. Hooks read and write trainer
state: ``model`` (plain module), ``ddp_model`` (what runs the forward), ``optimizer``, ``scaler``,
``ema``, ``epoch``, ``iter`` (global iteration, 0-based), ``inner_iter``, ``accumulate``, ``inputs``,
``targets``, ``outputs``, ``extra_losses``, ``loss``, ``loss_parts``, ``step_ok``,
``optimizer_stepped``, ``metrics``, ``best_fitness``, ``storage`` (free dict).

Extra loss terms (e.g. QAT distillation): in ``after_forward`` a hook reads ``trainer.inputs`` /
``trainer.outputs`` and sets ``trainer.extra_losses[name] = scalar tensor``; each term is added to
the total and logged as a loss part. It runs inside the autocast region::

    class Distill(Hook):
        def after_forward(self):
            tr = self.trainer
            with torch.no_grad():
                t_feats = teacher.forward_features(tr.inputs)
            tr.extra_losses["distill"] = weight * cwd_loss(tr.outputs[0], t_feats)

Extra top-level checkpoint entries (e.g. QAT's ``quant`` settings) go in
``trainer.checkpoint_extras``; per-hook state goes in ``Hook.state_dict``.

Conventions (as YOLOv6): gradients of the micro-batches are summed (not averaged) over
``accumulate`` micro-batches - ``nominal_accumulate = max(round(nominal_batch / (batch_size *
world)), 1)``, which :class:`~.hooks.WarmupLRHook` ramps up from 1 during the warm-up when
``train.accumulate_warmup`` (a hook may set ``trainer.accumulate`` in ``before_step``) - and,
under DDP, the loss is multiplied by the world size (DDP averages); the weight-decay scaling in
:func:`yolo_q.optim.build_optimizer` compensates. Accumulation windows restart every epoch (a
short last window steps at the end of the epoch), so checkpoints never hold pending gradients.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..optim import accumulate_steps
from ..io import CheckpointError, flush_denormal, load_checkpoint, to_builtin
from .distributed import (all_true, get_rank, get_world_size, reduce_dict, resolve_device,
                          unwrap_model, wrap_model)
from .hooks import Hook

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, torch.Tensor, int], Tuple[torch.Tensor, Any]]
CHECKPOINT_FORMAT = "yolo_q.train/1"


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``train.max_bad_steps`` consecutive non-finite losses."""

    user_facing = True  # tools print the message as one line and exit 2


# ----------------------------------------------------------------------------- seeding / RNG
def seed_everything(seed: int, deterministic: bool = True, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices) with ``seed + rank``; deterministic cuDNN."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data order of ``epoch`` (the same on every rank)."""
    return (int(seed) * 1_000_003 + int(epoch)) % 2**63


def set_loader_epoch(loader: Iterable, epoch: int, seed: int, epochs: Optional[int] = None,
                     rank: int = 0) -> None:
    """Make the data of ``epoch`` reproducible (also after a resume): call ``set_epoch(epoch)``
    on the loader and its (batch) sampler if they have one, ``dataset.set_epoch(epoch, epochs)``
    (augmentation seed, close-mosaic) if the dataset has one, and seed the loader's
    ``generator`` (shuffling, worker seeds) from ``epoch_seed(seed, epoch) + rank``."""
    seen = set()
    bs = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), bs, getattr(bs, "sampler", None)):
        if obj is not None and id(obj) not in seen and callable(getattr(obj, "set_epoch", None)):
            seen.add(id(obj))
            obj.set_epoch(epoch)
    dataset = getattr(loader, "dataset", None)
    if callable(getattr(dataset, "set_epoch", None)):
        dataset.set_epoch(epoch, epochs)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed((epoch_seed(seed, epoch) + int(rank)) % 2**63)


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors/numbers (``weights_only``-safe)."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def config_dict(cfg) -> Dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return to_builtin(dict(cfg)) if isinstance(cfg, dict) else {}


def _loss_parts(parts: Any) -> Dict[str, torch.Tensor]:
    """Loss parts as ``{name: 0-d detached tensor}`` from a dict, 1-D tensor or sequence."""
    if isinstance(parts, dict):
        items = parts.items()
    elif parts is None:
        items = ()
    else:
        seq = parts.reshape(-1) if isinstance(parts, torch.Tensor) else parts
        items = ((f"loss{i}", v) for i, v in enumerate(seq))
    return {str(k): torch.as_tensor(v).detach().float().reshape(()) for k, v in items}


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Runs ``loss_fn(model(inputs), targets, epoch) -> (total, parts)`` over ``train_loader``.

    Args:
        model: the (plain) model; moved to ``device`` and wrapped in DDP when distributed.
        optimizer: built over ``model``'s parameters (see :func:`yolo_q.optim.build_optimizer`).
        train_loader: yields ``(imgs uint8 (B,3,H,W), targets (M,6), ...)``; ``len()`` needed.
        loss_fn: ``(outputs, targets, epoch) -> (total, parts)``; parts a dict of scalars or a
            1-D tensor.
        cfg: the full config (``train`` section used; stored resolved in checkpoints).
        hooks: :class:`Hook` objects, called in list order (see :func:`default_hooks`).
        device: overrides ``cfg.train.device`` (``auto`` -> CUDA when available).
        work_dir: run directory (checkpoints, TensorBoard); hooks may use it.
    """

    HOOK_POINTS = ("before_train", "before_epoch", "before_step", "after_forward",
                   "before_optimizer_step", "after_step", "after_epoch", "after_train")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable,
                 loss_fn: LossFn, cfg, hooks: Sequence[Hook] = (), device=None,
                 work_dir=None):
        t = cfg.train
        self.cfg = cfg
        self.rank, self.world_size = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        self.device = device if isinstance(device, torch.device) else \
            resolve_device(t.device if device is None else device)
        self.channels_last = bool(t.channels_last)
        if self.channels_last and self.device.type == "cpu":
            # measured (torch 2.13 CPU, AMD EPYC AVX-512): a channels_last YOLOv6-N train step
            # corrupts the heap in oneDNN's backward and kills the process; without oneDNN it
            # is slower than the default contiguous layout
            logger.warning("train.channels_last is ignored on CPU (crashes in oneDNN backward)")
            self.channels_last = False
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = unwrap_model(model).to(self.device, memory_format=fmt)
        self.ddp_model = wrap_model(self.model, self.device, sync_bn=bool(t.sync_bn))
        self.optimizer, self.train_loader, self.loss_fn = optimizer, train_loader, loss_fn
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.epochs = int(t.epochs)
        self.iters_per_epoch = len(train_loader)
        if self.iters_per_epoch == 0:
            raise ValueError("train loader is empty (no batches): check data.dataset and "
                             "train.batch_size")
        self.nominal_accumulate = accumulate_steps(t.nominal_batch, t.batch_size, self.world_size)
        self.accumulate = self.nominal_accumulate  # micro-batches per step now (hooks may ramp it)
        self.amp = bool(t.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.grad_clip, self.max_bad_steps = float(t.grad_clip), int(t.max_bad_steps)
        self.seed = int(t.seed)
        # loop state (saved in checkpoints: epoch, iter, best_fitness, metrics, bad-step counts)
        self.start_epoch, self.epoch, self.iter, self.inner_iter = 0, 0, 0, 0
        self.batch = self.inputs = self.targets = self.outputs = None
        self.extra_losses: Dict[str, torch.Tensor] = {}
        self.loss, self.loss_parts, self.step_ok = float("nan"), {}, True
        self.optimizer_stepped = False
        self.ema = None  # a ModelEMA, set by EMAHook
        self.metrics: Dict[str, Any] = {}
        self.metrics_epoch, self.best_fitness, self.best_epoch = -1, -math.inf, -1
        self.epoch_losses: Dict[str, float] = {}
        self.storage: Dict[str, Any] = {}
        self.checkpoint_extras: Dict[str, Any] = {}  # extra top-level checkpoint entries
        self.bad_steps = self.total_bad_steps = 0
        self._since_step = self._pending = 0
        self._sums: Dict[str, float] = {}
        self._good = 0
        self._buf_src: Tuple = ()
        self._buf_backup: list = []
        self.hooks: list = []
        self.register_hooks(hooks)

    # -- hooks -------------------------------------------------------------------------------
    def register_hooks(self, hooks: Iterable[Hook]) -> None:
        for h in hooks:
            if h is None:
                continue
            if not isinstance(h, Hook):
                raise TypeError(f"hooks: {type(h).__name__} is not a yolo_q.engine.Hook")
            h.register(weakref.proxy(self))
            self.hooks.append(h)

    def call(self, point: str) -> None:
        for h in self.hooks:
            getattr(h, point)()

    def _hook_keys(self):
        """Stable unique names for hook states in checkpoints (class name, numbered if repeated)."""
        counts: Dict[str, int] = {}
        for h in self.hooks:
            name = type(h).__name__
            counts[name] = counts.get(name, 0) + 1
            yield (name if counts[name] == 1 else f"{name}.{counts[name] - 1}"), h

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        """Train epochs ``start_epoch .. epochs - 1`` (``start_epoch`` > 0 after :meth:`resume`).
        On CPU, denormals are flushed to zero meanwhile (see :func:`flush_denormal`)."""
        with flush_denormal(self.device.type == "cpu"):
            self.call("before_train")
            try:
                for self.epoch in range(self.start_epoch, self.epochs):
                    self.begin_epoch()
                    self.call("before_epoch")
                    for self.inner_iter, self.batch in enumerate(self.train_loader):
                        self.call("before_step")
                        self.run_step()
                        self.call("after_step")
                        self.iter += 1
                    self.end_epoch()
                    self.call("after_epoch")
            finally:
                self.call("after_train")

    def begin_epoch(self) -> None:
        self.model.train()
        set_loader_epoch(self.train_loader, self.epoch, self.seed, self.epochs, self.rank)
        self._sums, self._good = {}, 0
        self._since_step = self._pending = 0

    def end_epoch(self) -> None:
        if self._pending:  # only when the last micro-batch was non-finite: drop, never carry
            self.optimizer.zero_grad(set_to_none=True)
            self._pending = 0
        self.epoch_losses = reduce_dict(self.running_losses(), self.device)

    def running_losses(self) -> Dict[str, float]:
        """Mean of each loss part over this epoch's good steps so far (this rank)."""
        return {k: v / max(self._good, 1) for k, v in self._sums.items()}

    @property
    def lr(self) -> float:
        """LR of the ``weight`` group (group 0 if unnamed)."""
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("name") == "weight"), groups[0]["lr"])

    # -- one micro-batch ---------------------------------------------------------------------
    def preprocess(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(imgs uint8, targets, ...)`` -> (float inputs in [0, 1] on the device, targets).
        Targets stay where the loader put them (CPU): the loss moves what it needs, and
        :class:`yolo_q.losses.DetectionLoss` pads them without a device sync there."""
        imgs, targets = batch[0], batch[1]
        imgs = imgs.to(self.device, non_blocking=True)
        imgs = imgs.float().div_(255.0) if imgs.dtype == torch.uint8 else imgs.float()
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return imgs, targets

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def run_step(self) -> None:
        self.inputs, self.targets = self.preprocess(self.batch)
        self._since_step += 1
        due = self._since_step >= self.accumulate or self.inner_iter == self.iters_per_epoch - 1
        no_sync = getattr(self.ddp_model, "no_sync", None)
        sync = contextlib.nullcontext() if (due or no_sync is None) else no_sync()
        self.optimizer_stepped = False
        with sync:
            self._snapshot_buffers()
            with self.autocast():
                self.outputs = self.ddp_model(self.inputs)
                self.extra_losses = {}
                self.call("after_forward")
                total, parts = self.loss_fn(self.outputs, self.targets, self.epoch)
                parts = _loss_parts(parts)
                for name, term in self.extra_losses.items():
                    total = total + term
                    parts[name] = term.detach().float().reshape(())
            self.step_ok = all_true(bool(torch.isfinite(total).all()), self.device)
            if self.step_ok:
                self.scaler.scale(total * self.world_size).backward()
                self._pending += 1
        self._record(total, parts)
        if not self.step_ok:
            self._skip_bad_step()
        elif due:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)  # no-op without AMP
        self.call("before_optimizer_step")
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        scale = self.scaler.get_scale() if self.amp else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # with AMP, a step with inf/nan grads is skipped and the scale decreases
        self.optimizer_stepped = not self.amp or self.scaler.get_scale() >= scale
        self._since_step = self._pending = 0

    def _record(self, total: torch.Tensor, parts: Dict[str, torch.Tensor]) -> None:
        vals = torch.stack([total.detach().float().reshape(())] + list(parts.values())).tolist()
        self.loss, self.loss_parts = vals[0], dict(zip(parts, vals[1:]))
        if self.step_ok:
            self.bad_steps = 0
            self._good += 1
            for k, v in self.loss_parts.items():
                self._sums[k] = self._sums.get(k, 0.0) + v

    def _skip_bad_step(self) -> None:
        self._restore_buffers()  # BN running stats of the bad forward are discarded
        self.bad_steps += 1
        self.total_bad_steps += 1
        where = (f"epoch {self.epoch + 1}/{self.epochs} iter {self.inner_iter + 1}/"
                 f"{self.iters_per_epoch} (global {self.iter})")
        parts = ", ".join(f"{k}={v:.4g}" for k, v in self.loss_parts.items())
        logger.warning("non-finite loss at %s [%s]: step skipped (%d in a row, %d in total)",
                       where, parts, self.bad_steps, self.total_bad_steps)
        if 0 < self.max_bad_steps <= self.bad_steps:
            last = self.storage.get("last_checkpoint", "none written yet")
            raise NonFiniteLossError(
                f"training stopped: {self.bad_steps} consecutive non-finite losses "
                f"(train.max_bad_steps={self.max_bad_steps}) at {where}, last parts [{parts}]; "
                f"the last good checkpoint ({last}) is untouched. Lower train.lr0, set "
                f"train.grad_clip, or check the data.")

    def _snapshot_buffers(self) -> None:
        bufs = list(self.model.buffers())
        key = tuple(id(b) for b in bufs)
        if key != self._buf_src:
            self._buf_src, self._buf_backup = key, [b.detach().clone() for b in bufs]
        elif bufs:
            torch._foreach_copy_(self._buf_backup, [b.detach() for b in bufs])

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        bufs = list(self.model.buffers())
        if bufs and tuple(id(b) for b in bufs) == self._buf_src:
            torch._foreach_copy_(bufs, self._buf_backup)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume, ``torch.load(weights_only=True)``-safe; meant for the end
        of an epoch: ``epoch`` is the last completed epoch (0-based), ``iteration`` the number of
        iterations done. ``model``/``ema`` are state dicts (``ema`` None without EMA)."""
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "ema": self.ema.ema.state_dict() if self.ema is not None else None,
            "ema_updates": int(self.ema.updates) if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "hooks": {k: to_builtin(st) for k, h in self._hook_keys() if (st := h.state_dict())},
            "epoch": int(self.epoch),
            "iteration": int(self.iter),
            "best_fitness": float(self.best_fitness),
            "best_epoch": int(self.best_epoch),
            "metrics": to_builtin(self.metrics),
            "metrics_epoch": int(self.metrics_epoch),
            "bad_steps": int(self.bad_steps),
            "total_bad_steps": int(self.total_bad_steps),
            "rng": get_rng_state(),
            "config": config_dict(self.cfg),
        }
        clash = set(self.checkpoint_extras) & set(ckpt)
        if clash:
            raise KeyError(f"checkpoint_extras may not replace {sorted(clash)}")
        ckpt.update(to_builtin(self.checkpoint_extras))
        return ckpt

    REQUIRED_KEYS = ("model", "optimizer", "epoch", "iteration", "rng")

    def load_state_dict(self, ckpt: Dict[str, Any], source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict`; training continues at ``ckpt['epoch'] + 1``."""
        missing = [k for k in self.REQUIRED_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{source}: not a yolo_q training checkpoint (missing "
                                  f"{', '.join(missing)}); to start from weights only, load them "
                                  f"into the model instead of resuming")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{source}: does not match this model/optimizer: "
                                  f"{str(e).splitlines()[0]}") from None
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict({"ema": ckpt["ema"],
                                          "updates": ckpt.get("ema_updates", 0)})
            else:  # e.g. resuming a run trained without EMA: restart the average here
                self.ema.reset(self.model)
        states = ckpt.get("hooks", {})
        for key, hook in self._hook_keys():
            if key in states:
                hook.load_state_dict(states[key])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.epoch, self.iter = self.start_epoch, int(ckpt["iteration"])
        self.best_fitness = float(ckpt.get("best_fitness", -math.inf))
        self.best_epoch = int(ckpt.get("best_epoch", -1))
        self.metrics = dict(ckpt.get("metrics", {}))
        self.metrics_epoch = int(ckpt.get("metrics_epoch", -1))
        self.bad_steps = int(ckpt.get("bad_steps", 0))
        self.total_bad_steps = int(ckpt.get("total_bad_steps", 0))
        set_rng_state(ckpt["rng"])

    def resume(self, path, ckpt: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Load ``path`` (e.g. ``<work_dir>/weights/last.pt``; ``ckpt``: its contents, already
        read by the caller) and restore model, EMA, optimizer, scaler, hook states, counters
        and RNG states; returns the checkpoint."""
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        self.load_state_dict(ckpt, source=str(path))
        logger.info("resumed from %s: next epoch %d/%d (iteration %d)", path,
                    self.start_epoch + 1, self.epochs, self.iter)
        return ckpt
