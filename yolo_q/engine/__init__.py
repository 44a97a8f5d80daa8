"""Training engine: the :class:`Trainer` loop, its hooks, checkpoint I/O and DDP helpers."""
from ..io import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import (barrier, get_rank, get_world_size, init_distributed, is_main_process,
                          reduce_dict, resolve_device, unwrap_model, wrap_model)
from .hooks import (CheckpointHook, EMAHook, EvalHook, Hook, ModelEMA, ProgressHook,
                    ResultsCSVHook, TensorBoardHook, WarmupLRHook, default_hooks, read_results_csv)
from .trainer import NonFiniteLossError, Trainer, epoch_seed, seed_everything, set_loader_epoch

__all__ = ["CheckpointError", "CheckpointHook", "EMAHook", "EvalHook", "Hook", "ModelEMA",
           "NonFiniteLossError", "ProgressHook", "ResultsCSVHook", "TensorBoardHook", "Trainer", "WarmupLRHook",
           "barrier", "default_hooks", "epoch_seed", "get_rank", "get_world_size",
           "init_distributed", "is_main_process", "load_checkpoint", "read_results_csv", "reduce_dict",
           "resolve_device", "save_checkpoint", "seed_everything", "set_loader_epoch",
           "unwrap_model", "wrap_model"]
