"""``train(cfg)``: float training (and the hyper-search / RepOpt variants) from one config."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from ..config import save_config
from ..data import build_dataloader, build_datasets_from_config
from ..losses import DetectionLoss
from ..models import build_model
from .checkpoint import (load_checkpoint, load_model, load_state_into, weight_settings,
                         with_settings)
from .distributed import cleanup, init_distributed
from .hooks import Hook, default_hooks
from .rundir import make_run_dir
from .trainer import Trainer, seed_everything

logger = logging.getLogger(__name__)


def make_evaluate_fn(cfg, val_ds, batch_size: Optional[int] = None, max_images: Optional[int] = None):
    """``evaluate_fn(model) -> metrics`` on the validation set (COCO mAP via yolo_q.eval)."""
    from ..eval import COCOEvaluator, TorchBackend, evaluate
    loader = build_dataloader(val_ds, batch_size or cfg.eval.batch_size, shuffle=False,
                              workers=min(cfg.data.workers, 2), seed=cfg.train.seed)
    max_batches = None if not max_images else max(1, max_images // (batch_size or cfg.eval.batch_size))

    def evaluate_fn(model) -> Dict[str, Any]:
        evaluator = COCOEvaluator.from_dataset(val_ds)
        res = evaluate(TorchBackend(model), loader, evaluator, conf_thres=cfg.eval.conf_thres,
                       iou_thres=cfg.eval.iou_thres, max_det=cfg.eval.max_det, progress=False,
                       max_batches=max_batches)
        return {k: v for k, v in res.items() if isinstance(v, (int, float))}
    return evaluate_fn


class RepOptScalesHook(Hook):
    """After hyper-search training, write the learned branch scales to ``<run>/scales.pt``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def after_train(self) -> None:
        from ..optim.repopt import save_scales
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


def train(cfg, resume: Optional[str] = None, weights: Optional[str] = None,
          extra_hooks=(), verbose: bool = True) -> Dict[str, Any]:
    """Train a detector as ``cfg`` says; returns a summary (run dir, best/last paths, metrics).

    ``resume``: a ``last.pt`` to continue exactly where it stopped. ``weights``: initial weights
    (yolo_q / official / state dict) to fine-tune from.
    """
    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # private copy
        OmegaConf.set_struct(cfg, True)
        t = cfg.train
        run_dir = make_run_dir(t.output_dir, t.name, t.exist_ok, Path(resume) if resume else None)
        if rank == 0 and verbose:
            logger.info("run directory: %s", run_dir)
        seed_everything(t.seed, t.deterministic, rank)
        train_ds, val_ds, info = build_datasets_from_config(cfg, verbose=verbose and rank == 0)
        sync_nc_with_data(cfg, info)
        if resume:  # continue with the BN settings the run was trained with
            cfg = with_settings(cfg, weight_settings(
                {"config": load_checkpoint(resume).get("config")}, str(resume)), str(resume))
            OmegaConf.set_struct(cfg, True)
        if rank == 0:
            save_config(cfg, run_dir / "config.yaml")

        model = build_model(cfg)
        if weights:
            src = load_model(weights, cfg=cfg)
            load_state_into(model, src.state_dict(), str(weights))
        optimizer = build_optimizer_for(model, cfg, world, reinit=not (resume or weights))
        loader = build_dataloader(train_ds, t.batch_size, shuffle=True, workers=cfg.data.workers,
                                  seed=t.seed, rank=rank, world_size=world, drop_last=False)
        evaluate_fn = make_evaluate_fn(cfg, val_ds) if rank == 0 else (lambda m: {})
        hooks = default_hooks(cfg, evaluate_fn, run_dir)
        if cfg.model.block == "linearadd":
            hooks.append(RepOptScalesHook(run_dir / "scales.pt"))
        hooks.extend(extra_hooks)
        trainer = Trainer(model, optimizer, loader, DetectionLoss.from_config(cfg), cfg, hooks,
                          work_dir=run_dir)
        if resume:
            trainer.resume(resume)
        trainer.train()
        weights_dir = run_dir / "weights"
        return {"run_dir": str(run_dir), "last": str(weights_dir / "last.pt"),
                "best": str(weights_dir / "best.pt") if (weights_dir / "best.pt").exists() else None,
                "metrics": dict(trainer.metrics), "best_fitness": trainer.best_fitness,
                "best_epoch": trainer.best_epoch + 1, "epochs": trainer.epochs,
                "total_bad_steps": trainer.total_bad_steps,
                "bad_data": getattr(train_ds, "bad_report", {})}
    finally:
        cleanup()


def build_optimizer_for(model, cfg, world_size: int = 1, reinit: bool = True):
    """``build_optimizer`` plus, for ``train.optimizer=repopt``, the RepOpt masks (and the
    re-initialisation from the scales at the start of training)."""
    from ..optim import build_optimizer
    if cfg.train.optimizer != "repopt":
        return build_optimizer(model, cfg, world_size)
    from ..optim.repopt import ScalesError, load_scales, prepare_repopt
    if not cfg.model.scales:
        raise ScalesError("train.optimizer=repopt needs model.scales (the hyper-search scales "
                          "file, e.g. runs/train/yolov6n_hs/scales.pt)")
    scales = load_scales(cfg.model.scales)
    masks, offsets = prepare_repopt(model, scales, cfg.model.scales, reinit=reinit)
    return build_optimizer(model, cfg, world_size, grad_masks=masks, decay_offsets=offsets)
