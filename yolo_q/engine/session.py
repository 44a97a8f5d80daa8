"""One training session, used by float training, RepOpt training and QAT:
:func:`start_run` (the run directory) and :func:`fit` (optimizer, loader, loss,
:class:`Trainer` with the caller's hooks, resume, train, summary). What differs between them is
the model and the hooks the caller hands in."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config.loader import validate_values
from ..data import build_dataloader
from ..losses import DetectionLoss
from ..optim import build_optimizer
from ..optim.repopt import ScalesError, load_scales, prepare_repopt, save_scales
from .hooks import Hook
from .rundir import make_run_dir
from .trainer import Trainer

logger = logging.getLogger(__name__)

__all__ = ["RepOptScalesHook", "build_optimizer_for", "fit", "start_run", "sync_nc_with_data"]


class RepOptScalesHook(Hook):
    """After hyper-search training, write the learned branch scales to ``<run>/scales.pt``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def after_train(self) -> None:
        tr = self.trainer
        if tr.is_main and tr.epoch >= 0:
            model = tr.ema.ema if tr.ema is not None else tr.model
            save_scales(model, self.path)
            logger.info("hyper-search branch scales written to %s", self.path)


def sync_nc_with_data(cfg, info: Dict[str, Any]) -> None:
    """Take ``model.nc`` from the data YAML (the data defines the classes)."""
    if info.get("nc") is not None and cfg.model.nc != info["nc"]:
        logger.info("model.nc=%d -> %d from %s", cfg.model.nc, info["nc"], cfg.data.dataset)
        cfg.model.nc = int(info["nc"])


def build_optimizer_for(model, cfg, world_size: int = 1, reinit: bool = True):
    """``build_optimizer`` plus, for ``train.optimizer=repopt``, the RepOpt masks (and the
    re-initialisation from the scales at the start of training)."""
    if cfg.train.optimizer != "repopt":
        return build_optimizer(model, cfg, world_size)
    if not cfg.model.scales:
        raise ScalesError("train.optimizer=repopt needs model.scales (the hyper-search scales "
                          "file, e.g. runs/train/yolov6n_hs/scales.pt)")
    scales = load_scales(cfg.model.scales)
    masks, offsets = prepare_repopt(model, scales, cfg.model.scales, reinit=reinit)
    return build_optimizer(model, cfg, world_size, grad_masks=masks, decay_offsets=offsets)


def start_run(cfg, resume: Optional[str] = None) -> Path:
    """The run directory of ``cfg.train`` (``resume``: the one of that ``last.pt``), after the
    config's values are checked (e.g. ``data.img_size`` vs the stride): nothing is created for
    a run that cannot start. A caller that resumes reads ``resume`` once, before this
    (:func:`yolo_q.io.load_checkpoint`: readable and safe), and hands the dict to :func:`fit`.
    Run inside :func:`~yolo_q.engine.rundir.discard_unused_run_dirs` to remove the directory
    again when the run fails before writing anything there."""
    validate_values(cfg, "training config")
    t = cfg.train
    return make_run_dir(t.output_dir, t.name, t.exist_ok, Path(resume) if resume else None)


def fit(cfg, model, train_ds, hooks: List[Hook], run_dir: Path, resume: Optional[str] = None,
        device=None, rank: int = 0, world: int = 1, reinit: bool = True,
        resume_ck: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train ``model`` on ``train_ds`` as ``cfg.train`` says with ``hooks``; ``resume``: a
    ``last.pt`` to continue exactly where it stopped (``resume_ck``: its contents when the
    caller has read it already, so that it is read once); ``reinit``: RepOpt re-initialises the
    weights from the scales (fresh runs only). Returns the summary (run dir, last/best paths,
    metrics, best fitness/epoch, epochs, bad steps)."""
    t = cfg.train
    optimizer = build_optimizer_for(model, cfg, world, reinit=reinit)
    loader = build_dataloader(train_ds, t.batch_size, shuffle=True, workers=cfg.data.workers,
                              seed=t.seed, rank=rank, world_size=world, drop_last=False)
    trainer = Trainer(model, optimizer, loader, DetectionLoss.from_config(cfg), cfg, hooks,
                      device=device, work_dir=run_dir)
    if resume:
        trainer.resume(resume, resume_ck)
    trainer.train()
    weights_dir = Path(run_dir) / "weights"
    best = weights_dir / "best.pt"
    return {"run_dir": str(run_dir), "last": str(weights_dir / "last.pt"),
            "best": str(best) if best.exists() else None,
            "metrics": dict(trainer.metrics), "best_fitness": trainer.best_fitness,
            "best_epoch": trainer.best_epoch + 1, "epochs": trainer.epochs,
            "total_bad_steps": trainer.total_bad_steps}
