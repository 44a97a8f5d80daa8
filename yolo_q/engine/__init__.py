"""Training engine: the :class:`Trainer` loop, its hooks, :func:`fit` (the one training session
for float, RepOpt and QAT training) and DDP helpers; checkpoint I/O lives in :mod:`yolo_q.io`."""
from ..io import CheckpointError, load_checkpoint, save_checkpoint
from .session import build_optimizer_for, fit, start_run
from .distributed import (barrier, get_rank, get_world_size, init_distributed, is_main_process,
                          reduce_dict, resolve_device, unwrap_model, wrap_model)
from .hooks import (CheckpointHook, EMAHook, EvalHook, Hook, ModelEMA, ProgressHook,
                    ResultsCSVHook, TensorBoardHook, WarmupLRHook, default_hooks, read_results_csv)
from .trainer import NonFiniteLossError, Trainer, epoch_seed, seed_everything, set_loader_epoch

__all__ = ["CheckpointError", "CheckpointHook", "EMAHook", "EvalHook", "Hook", "ModelEMA",
           "NonFiniteLossError", "ProgressHook", "ResultsCSVHook", "TensorBoardHook", "Trainer", "WarmupLRHook",
           "barrier", "build_optimizer_for", "default_hooks", "epoch_seed", "fit", "get_rank", "get_world_size",
           "init_distributed", "is_main_process", "load_checkpoint", "read_results_csv", "reduce_dict",
           "resolve_device", "save_checkpoint", "seed_everything", "set_loader_epoch", "start_run",
           "unwrap_model", "wrap_model"]
