"""``train(cfg)``: float training (and the hyper-search / RepOpt variants) from one config:
the model, the evaluation hook's evaluator and the default hooks, handed to
:func:`yolo_q.engine.fit`."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from .config import copy_config, save_config
from .data import build_datasets_from_config
from .engine.distributed import cleanup, init_distributed
from .engine.session import RepOptScalesHook, fit, start_run, sync_nc_with_data
from .engine.hooks import default_hooks
from .engine.rundir import discard_unused_run_dirs
from .engine.trainer import seed_everything
from .eval.runner import make_evaluate_fn
from .io import check_checkpoint_file, load_checkpoint, load_state_into, read_checkpoint_any
from .models import build_model
from .models.loading import float_model_from_state, weight_settings, with_settings

logger = logging.getLogger(__name__)

__all__ = ["train"]


def train(cfg, resume: Optional[str] = None, weights: Optional[str] = None,
          extra_hooks=(), verbose: bool = True) -> Dict[str, Any]:
    """Train a detector as ``cfg`` says; returns a summary (run dir, best/last paths, metrics).

    ``resume``: a ``last.pt`` to continue exactly where it stopped. ``weights``: initial weights
    (yolo_q / official / state dict) to fine-tune from.
    """
    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    try:
        cfg = copy_config(cfg, struct=True)
        if weights:
            check_checkpoint_file(weights)
        # read once, before anything is created: BN settings here, the trainer's state in fit
        resume_ck = load_checkpoint(resume) if resume else None
        with discard_unused_run_dirs():
            run_dir = start_run(cfg, resume)
            if rank == 0 and verbose:
                logger.info("run directory: %s", run_dir)
            seed_everything(cfg.train.seed, cfg.train.deterministic, rank)
            train_ds, val_ds, info = build_datasets_from_config(cfg, verbose=verbose and rank == 0)
            sync_nc_with_data(cfg, info)
            if resume:  # continue with the BN settings the run was trained with
                cfg = copy_config(with_settings(cfg, weight_settings(
                    {"config": resume_ck.get("config")}, str(resume)),
                    str(resume)), struct=True)
            if rank == 0:
                save_config(cfg, run_dir / "config.yaml")

            model = build_model(cfg)
            if weights:
                src = float_model_from_state(cfg, read_checkpoint_any(weights)["model"],
                                             str(weights))
                load_state_into(model, src.state_dict(), str(weights))
            evaluate_fn = make_evaluate_fn(cfg, val_ds) if rank == 0 else (lambda m: {})
            hooks = default_hooks(cfg, evaluate_fn, run_dir)
            if cfg.model.block == "linearadd":
                hooks.append(RepOptScalesHook(run_dir / "scales.pt"))
            hooks.extend(extra_hooks)
            summary = fit(cfg, model, train_ds, hooks, run_dir, resume=resume, rank=rank,
                          world=world, reinit=not (resume or weights), resume_ck=resume_ck)
            summary["bad_data"] = getattr(train_ds, "bad_report", {})
            return summary
    finally:
        cleanup()
