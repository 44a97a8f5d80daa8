"""Quantization-aware training: fine-tune a PTQ-calibrated fake-quant student with the float
Trainer, its default hooks and (optionally) channel-wise distillation from the float teacher.

Recipe (``quant.qat``; defaults follow the YOLOv6 QAT seed), applied by :func:`qat_train_config`
to a copy of the float config:

* ``train.epochs = quant.qat.epochs`` or ``max(1, round(epochs_ratio * train.epochs))`` (10 %);
* ``train.lr0 = lr_ratio * train.lr0`` (1 %), cosine per epoch down to ``lrf`` (1 %) of that
  over the QAT epochs (half a period), no warm-up, EMA on (``quant.qat.ema``) with its buffers
  copied (``train.ema_buffers=copy``, see below);
* RepOptimizer runs become plain SGD (the student is fused: the RepOpt masks no longer apply);
* ``quant.qat.close_mosaic`` (default): mosaic and mixup off, the augmentation the float recipe
  ends with (its last ``close_mosaic_epochs``); QAT epochs with mosaic pull the model back
  from what those epochs gave it;
* outputs under ``quant.qat.output_dir/train.name`` (``runs/qat/<name>``), same files as float
  training (``config.yaml``, ``weights/{last,best}.pt``, ``tensorboard/``, ``results.json``).

The student is the converted, FUSED model of the calibrated checkpoint (BN already folded, so no
statistics can drift; the structure is the deploy structure that export writes; layers left in
float by partial quantization stay float). Activation scales stay at their calibrated values
(amax buffers are not parameters: nothing changes them) unless ``quant.qat.freeze_scales=false``:
then every activation range follows an EMA of the batch max (:func:`~yolo_q.quant.enable_range_ema`)
and shared (concat) scales are re-tied before each optimizer step and at the end of every epoch,
so every checkpoint exports consistently. ``quant.qat.learn_scales=true``: every activation range
is a parameter trained with the weights (LSQ, :func:`~yolo_q.quant.learn_activation_scales`; a
shared group is one parameter, no weight decay, ``scale_lr_ratio`` x the weights' LR), averaged
by the model EMA like the weights. Weight scales (per-channel max from calibration) stay
fixed, except that the int32 bias floor is re-applied after every epoch for the trained biases
(only channels whose bias would leave int32 change, see :class:`QATHook`).

EMA of a fake-quant model (:class:`yolo_q.engine.ModelEMA`, ``copy_buffers=True``): weights are
averaged, quantizer ``_amax`` buffers are COPIED from the model - averaged ranges would not be the
ranges the weights were trained with, and shared scales would drift apart.

Checkpoints: :meth:`Trainer.state_dict` plus ``quant`` (the quant state) and ``qat`` (source
files, base config, baseline metrics) via ``trainer.checkpoint_extras``, so ``last.pt`` /
``best.pt`` resume like float training and load with :func:`yolo_q.load_model`, tools/eval.py
and the QDQ export.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ..config import config_from_dict, copy_config, save_config
from ..config.loader import validate_choices, validate_values
from ..data import build_datasets_from_config, check_model_nc
from ..engine.distributed import cleanup, init_distributed, resolve_device
from ..engine.session import fit, start_run, sync_nc_with_data
from ..engine.hooks import Hook, WarmupLRHook, default_hooks
from ..engine.rundir import discard_unused_run_dirs
from ..engine.trainer import seed_everything
from ..eval.backends import OrtBackend
from ..eval.runner import make_evaluate_fn, val_loader
from ..export.qdq import export_qdq
from ..io import (CheckpointError, check_output_dir, flush_denormal, load_checkpoint,
                  read_checkpoint_any)
from ..models.loading import float_model_from_state, weight_settings, with_settings
from .convert import (QuantStateError, all_quantizers, apply_shared_scales,
                      enable_range_ema, floor_learned_scales, floor_weight_scales,
                      is_quantized, learn_activation_scales, quant_state,
                      quantized_layers)
from .distill import ChannelDistillHook
from .integer import bias_overflow_lines, int32_bias_overflow
from .integer import integer_check as run_integer_check
from .load import load_quantized
from .ptq import selection_val_set
from .qat_partial import run_qat_partial

logger = logging.getLogger(__name__)

# model-config keys that do not change the network (ignored when comparing teacher/student)
# not the network's structure: BN settings are folded away in the fused/quantized model
NON_STRUCTURAL_KEYS = ("name", "scales", "head.prior_prob", "bn_eps", "bn_momentum")


class QATError(ValueError):
    """QAT cannot start: the inputs do not fit together; the message names the file(s)."""


# ----------------------------------------------------------------------------- recipe
def qat_epochs(cfg) -> int:
    q = cfg.quant.qat
    if q.epochs is not None:
        if int(q.epochs) < 1:
            raise QATError(f"quant.qat.epochs must be >= 1, got {q.epochs}")
        return int(q.epochs)
    return max(1, int(round(float(q.epochs_ratio) * int(cfg.train.epochs))))


def qat_train_config(cfg) -> DictConfig:
    """The config the QAT Trainer runs with (a copy; see the module docstring)."""
    out = copy_config(cfg, struct=True)
    q, t = cfg.quant.qat, out.train
    t.epochs = qat_epochs(cfg)
    t.lr0 = float(q.lr_ratio) * float(cfg.train.lr0)
    t.lrf = float(q.lrf)
    t.scheduler = "cosine"
    t.warmup_epochs = 0.0
    t.ema = bool(q.ema)
    t.ema_buffers = "copy"  # quantizer ranges: the ones the weights are trained with
    t.output_dir = str(q.output_dir)
    if t.optimizer == "repopt":
        t.optimizer = "sgd"
    if q.close_mosaic:  # the augmentation the float recipe ends with
        out.data.augment.mosaic = 0.0
        out.data.augment.mixup = 0.0
    return out


# ----------------------------------------------------------------------------- loading
def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, DictConfig):
        d = OmegaConf.to_container(d, resolve=True)
    out: Dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def model_config_diff(a, b) -> List[str]:
    """Structural differences between two ``model`` sections: ``['model.nc: 8 vs 3', ...]``."""
    fa, fb = _flatten(a), _flatten(b)
    keys = [k for k in dict.fromkeys(list(fa) + list(fb)) if k not in NON_STRUCTURAL_KEYS]
    return [f"model.{k}: {fa.get(k, '<unset>')} vs {fb.get(k, '<unset>')}" for k in keys
            if fa.get(k) != fb.get(k)]


def build_quantized(cfg, state_dict: Dict[str, torch.Tensor], state: dict,
                    source: str = "checkpoint") -> nn.Module:
    """The quantized model of a checkpoint (:func:`~yolo_q.quant.load.load_quantized`), with
    QAT's error messages."""
    try:
        return load_quantized(cfg, state_dict, state, source)
    except CheckpointError as e:
        raise QATError(str(e) if source in str(e) else f"{source}: {e}") from None
    except (QuantStateError, RuntimeError, KeyError) as e:
        raise QATError(f"{source}: does not match the model of the config: "
                       f"{str(e).splitlines()[0]}") from None


def check_calibrated(model: nn.Module, source: str) -> None:
    """Fail when ``model`` is not quantized or an enabled quantizer has no range."""
    if not is_quantized(model):
        raise QATError(f"{source}: not a quantized model")
    if not quantized_layers(model):
        raise QATError(f"{source}: quantizes no layer (every layer is skipped)")
    bad = [n for n, q in all_quantizers(model).items() if q.enabled and not q.is_calibrated]
    if bad:
        raise QATError(f"{source}: {len(bad)} quantizer(s) are not calibrated (e.g. "
                       f"{', '.join(bad[:3])}): calibrate it first (tools/ptq.py)")


def read_student(path) -> Dict[str, Any]:
    """Read a PTQ-calibrated checkpoint (``model``/``config``/``quant``); fail if not quantized."""
    ck = read_checkpoint_any(path)
    if not ck.get("quant"):
        raise QATError(f"{path}: not a quantized checkpoint (no 'quant' entry): QAT starts from "
                       f"a PTQ-calibrated checkpoint (tools/ptq.py), not from float weights")
    return ck


def read_teacher(path) -> Dict[str, Any]:
    ck = read_checkpoint_any(path)
    if ck.get("quant"):
        raise QATError(f"{path}: the teacher must be the float model, but this checkpoint is "
                       f"quantized (pass the float training checkpoint, e.g. .../best.pt)")
    return ck


def check_model_configs(run_cfg, student: tuple, teacher: Optional[tuple] = None) -> None:
    """``student`` / ``teacher``: ``(path, stored config dict or None)``. The student must have
    the run's ``model`` section (structural keys) and the teacher the student's; the message
    names the files and the differing keys. Checkpoints without a config (plain state dicts)
    are checked by the strict weight loads instead."""
    s_path, s_cfg = student
    if s_cfg and "model" in s_cfg:
        diff = model_config_diff(s_cfg["model"], run_cfg.model)
        if diff:
            raise QATError(f"student {s_path} does not match the QAT config (checkpoint vs "
                           f"config+data): {_join(diff)}")
    if teacher is not None:
        t_path, t_cfg = teacher
        if t_cfg and "model" in t_cfg:
            diff = model_config_diff(t_cfg["model"], (s_cfg or {}).get("model") or run_cfg.model)
            if diff:
                raise QATError(f"teacher {t_path} and student {s_path} are different networks "
                               f"(teacher vs student): {_join(diff)}")


def _join(diff: List[str], n: int = 6) -> str:
    return "; ".join(diff[:n]) + (f" (+{len(diff) - n} more)" if len(diff) > n else "")


def load_teacher(path, ck: Dict[str, Any], cfg, device="cpu") -> nn.Module:
    """The float teacher, fused, in eval mode, without gradients."""
    try:
        model = float_model_from_state(
            with_settings(cfg, weight_settings(ck, str(path)), f"teacher {path}"), ck["model"],
            f"teacher {path}", fuse=True)
    except CheckpointError as e:
        raise QATError(f"{e} (teacher and student must be the same network)") from None
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- hooks
class QATHook(Hook):
    """Scale handling of a QAT run + the checkpoint entries that make checkpoints quantized.

    ``freeze_scales=True``: activation amax buffers never change. ``False``: EMA range
    updates are enabled on the student at registration (before the EMA copy is made) and
    shared scales are re-tied before each optimizer step (so the EMA copy, made after the step,
    gets consistent ranges) and after each epoch on the model and the EMA (place this hook
    before the eval and checkpoint hooks). Either way, at registration and after each epoch
    the weight scales get the int32 bias floor for the current biases and input scales
    (:func:`~yolo_q.quant.floor_weight_scales`; biases train, so a dead channel's bias may
    outgrow its weight scale), on the model and the EMA: every checkpoint exports to integer
    engines as it computes. ``extras`` go into ``trainer.checkpoint_extras``.
    """

    def __init__(self, freeze_scales: bool = True, range_ema: float = 0.99,
                 extras: Optional[Dict[str, Any]] = None):
        self.freeze_scales, self.range_ema = bool(freeze_scales), float(range_ema)
        self.extras = dict(extras or {})

    def register(self, trainer) -> None:
        super().register(trainer)
        model = trainer.model
        if not is_quantized(model):
            raise QATError("QATHook: the trainer's model is not quantized")
        if not self.freeze_scales:
            enable_range_ema(model, self.range_ema)
        floor_weight_scales(model)
        trainer.checkpoint_extras["quant"] = quant_state(model)
        trainer.checkpoint_extras.update(self.extras)

    def before_optimizer_step(self) -> None:
        if not self.freeze_scales:
            apply_shared_scales(self.trainer.model)

    def after_epoch(self) -> None:
        ema = self.trainer.ema
        models = [self.trainer.model] + ([ema.ema] if ema is not None else [])
        for model in models:
            if not self.freeze_scales:
                apply_shared_scales(model)
            floor_learned_scales(model)
            floor_weight_scales(model)


def insert_after(hooks: List[Hook], hook: Hook, kind: type = WarmupLRHook) -> List[Hook]:
    """Insert ``hook`` right after the first hook of type ``kind`` (else at the front)."""
    idx = next((i + 1 for i, h in enumerate(hooks) if isinstance(h, kind)), 0)
    hooks.insert(idx, hook)
    return hooks


# ----------------------------------------------------------------------------- run
def _first_val_batch(cfg, val_ds):
    return next(iter(val_loader(cfg, val_ds, workers=0)))[0]


def _scalars(metrics: Optional[Dict[str, Any]]) -> Dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate_ort(model: nn.Module, cfg, val_ds, path) -> Dict[str, float]:
    """Export ``model`` to QDQ ONNX at ``path`` (its own flavour) and evaluate it with ONNX
    Runtime on ``val_ds`` (the evaluation settings of ``cfg.eval``)."""
    export_qdq(model, path, img_size=int(cfg.data.img_size), batch=1, dynamic_batch=True,
               ort_weights=str(cfg.export.ort_weights))
    out = _scalars(make_evaluate_fn(cfg, val_ds, backend=OrtBackend)(path))
    out["onnx"] = str(path)
    return out


def _read_inputs(cfg, weights, teacher, resume, overrides):
    """Checkpoints first (cheap checks, clear messages), then the run config:
    ``(cfg, student ck, teacher ck or None, weights, resume ck or None)``."""
    resume_ck = load_checkpoint(resume) if resume else None
    if resume_ck is not None:
        if not resume_ck.get("quant") or "qat" not in resume_ck:
            raise QATError(f"{resume}: not a QAT checkpoint (no 'quant'/'qat' entries)")
        weights = weights or resume_ck["qat"].get("weights")
        teacher = teacher or resume_ck["qat"].get("teacher")
        student = {"model": resume_ck["model"], "quant": resume_ck["quant"],
                   "config": resume_ck.get("config"), "source": str(resume)}
    elif not weights:
        raise QATError("QAT needs --weights: a PTQ-calibrated checkpoint (tools/ptq.py)")
    else:
        student = dict(read_student(weights), source=str(weights))
    if cfg is None:
        base = (resume_ck or {}).get("qat", {}).get("base_config") or student.get("config")
        if not base:
            raise QATError(f"{student['source']}: stores no config; pass --config")
        cfg = config_from_dict(base)
    cfg = copy_config(cfg, overrides)
    validate_choices(cfg, "QAT config")
    validate_values(cfg, "QAT config")
    if cfg.quant.qat.learn_scales and not cfg.quant.qat.freeze_scales:
        raise QATError("quant.qat.learn_scales=true and quant.qat.freeze_scales=false both move "
                       "the activation ranges (gradient vs EMA of the batch max): choose one")
    if cfg.quant.qat.learn_scales and not float(cfg.quant.qat.scale_lr_ratio) > 0:
        raise QATError(f"quant.qat.scale_lr_ratio must be > 0, got {cfg.quant.qat.scale_lr_ratio}")
    if cfg.quant.qat.max_drop is not None and not float(cfg.quant.qat.max_drop) >= 0:
        raise QATError(f"quant.qat.max_drop must be >= 0 (mAP points) or null, got "
                       f"{cfg.quant.qat.max_drop}")
    if cfg.quant.qat.max_drop is not None and not teacher:
        raise QATError("quant.qat.max_drop (QAT-aware partial quantization) needs --teacher, "
                       "the float checkpoint it is measured against")
    if cfg.quant.distill.enabled and not teacher:
        raise QATError("quant.distill.enabled=true needs --teacher (the float checkpoint); "
                       "or set quant.distill.enabled=false")
    teacher_ck = dict(read_teacher(teacher), source=str(teacher)) if teacher else None
    if not resume:  # the run directory is made later, after the data and models are checked
        check_output_dir(cfg.quant.qat.output_dir, what="QAT output directory")
    return cfg, student, teacher_ck, weights, resume_ck


def run_qat(cfg=None, weights: Optional[str] = None, teacher: Optional[str] = None,
            resume: Optional[str] = None, overrides: Sequence[str] = (),
            extra_hooks: Iterable[Hook] = (), evaluate_start: bool = True,
            integer_check: bool = False, ort_check: bool = False,
            verbose: bool = True, baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Quantization-aware training of the calibrated ``weights`` (a PTQ checkpoint) with the
    float ``teacher`` (required when ``quant.distill.enabled``; otherwise only used for the
    report's float mAP). Returns a summary dict (``run_dir``, ``last``, ``best``, ``float``,
    ``ptq``, ``qat``, optional ``integer_check``/``ort``, ``report`` text...).

    ``cfg``: the float training config (QAT settings in ``cfg.quant``); None: the config stored
    in ``resume`` (base config) or ``weights``. ``overrides``: dot-list overrides on top.
    ``resume``: a QAT ``last.pt``; ``weights``/``teacher`` then default to the ones it records.
    ``extra_hooks``: appended to the trainer's hooks.
    ``evaluate_start``: evaluate teacher and student before training (float / PTQ rows).
    ``baseline``: ``{"float": metrics, "ptq": metrics}`` already measured by the caller on the
    same val set (e.g. the pipeline's PTQ stage): used for those rows instead of evaluating.
    ``integer_check``: per-layer max deviation of integer arithmetic on one val batch.
    ``ort_check``: export the best model to QDQ ONNX and evaluate it with ONNX Runtime.
    All inputs are checked before anything is trained or written (:class:`QATError`).
    """
    cfg, student_ck, teacher_ck, weights, resume_ck = _read_inputs(cfg, weights, teacher,
                                                                   resume, overrides)
    run = QATRun(cfg, student_ck, teacher_ck, weights, resume, resume_ck, list(extra_hooks),
                 verbose, baseline=dict(baseline or {}))
    dist_info = init_distributed()
    try:
        # CPU: denormals made eval/training steps ~60x slower
        with flush_denormal(True), discard_unused_run_dirs():
            run.rank, run.world = dist_info.rank, dist_info.world_size
            return _train_qat(run, evaluate_start, integer_check, ort_check)
    finally:
        cleanup()


@dataclass
class QATRun:
    """The inputs of one QAT run (checked by :func:`run_qat`)."""
    cfg: Any
    student_ck: Dict[str, Any]
    teacher_ck: Optional[Dict[str, Any]]
    weights: Optional[str]
    resume: Optional[str]
    resume_ck: Optional[Dict[str, Any]]
    extra_hooks: List[Hook]
    verbose: bool = True
    baseline: Dict[str, Any] = field(default_factory=dict)  # given float / PTQ metrics
    rank: int = 0
    world: int = 1


def _build_models(run: QATRun, qcfg):
    """The fused fake-quant student (checked calibrated) and the fused float teacher."""
    src = run.student_ck["source"]
    student = build_quantized(qcfg, run.student_ck["model"], run.student_ck["quant"], src)
    check_calibrated(student, src)
    device = resolve_device(qcfg.train.device)
    student.to(device)
    if qcfg.quant.qat.learn_scales:  # before the optimizer is built (it holds the parameters)
        learn_activation_scales(student, float(qcfg.quant.qat.scale_lr_ratio))
    tck = run.teacher_ck
    teacher = load_teacher(tck["source"], tck, qcfg, device) if tck else None
    state = quant_state(student)
    if run.cfg.quant.flavour and run.cfg.quant.flavour != state["flavour"]:
        logger.warning("quant.flavour=%s ignored: %s was converted for %s", run.cfg.quant.flavour,
                       src, state["flavour"])
    return student, teacher, device, state


def _qat_hooks(run: QATRun, qcfg, base_cfg, teacher, evaluate_fn, run_dir, baseline):
    """The float training's default hooks, the QAT hook (scales, checkpoint extras), channel-wise
    distillation when enabled, then the caller's hooks."""
    distill, qat = run.cfg.quant.distill, run.cfg.quant.qat
    extras = {"qat": {"weights": str(run.weights),
                      "teacher": run.teacher_ck["source"] if run.teacher_ck else None,
                      "base_config": OmegaConf.to_container(base_cfg, resolve=True),
                      "baseline": baseline}}
    hooks = insert_after(default_hooks(qcfg, evaluate_fn, run_dir),
                         QATHook(qat.freeze_scales, qat.range_ema, extras))
    if distill.enabled:
        hooks.append(ChannelDistillHook(teacher, list(distill.layers), distill.tau,
                                        distill.weight))
    return hooks + run.extra_hooks


def _train_qat(run: QATRun, evaluate_start, integer_check, ort_check) -> Dict[str, Any]:
    """Build the student, its config and its hooks; :func:`yolo_q.engine.fit`; the report."""
    base_cfg = copy_config(run.cfg)  # the float config (a resumed run rebuilds QAT's from it)
    qcfg = qat_train_config(base_cfg)
    # the data as QAT trains on it: its augmentation (quant.qat.close_mosaic), not the float run's
    train_ds, val_ds, info = build_datasets_from_config(qcfg, verbose=run.verbose and run.rank == 0)
    student_nc = ((run.student_ck.get("config") or {}).get("model") or {}).get("nc")
    check_model_nc(student_nc, info["nc"], run.student_ck["source"], info["yaml_file"])
    for c in (base_cfg, qcfg):
        sync_nc_with_data(c, info)
    tck = run.teacher_ck
    check_model_configs(qcfg, (run.student_ck["source"], run.student_ck.get("config")),
                        (tck["source"], tck.get("config")) if tck else None)
    seed_everything(qcfg.train.seed, qcfg.train.deterministic, run.rank)
    student, teacher, device, state = _build_models(run, qcfg)
    run_dir = start_run(qcfg, run.resume)
    if run.rank == 0:
        save_config(qcfg, run_dir / "config.yaml")
        if run.verbose:
            _log_start(run_dir, qcfg, run.cfg, state)
    report_fn, select_fn = _evaluate_fns(run, qcfg, val_ds)
    baseline = dict((run.resume_ck or {}).get("qat", {}).get("baseline") or run.baseline)
    baseline = {k: _scalars(v) for k, v in baseline.items() if v}
    if run.rank == 0 and evaluate_start:
        if teacher is not None and "float" not in baseline:
            baseline["float"] = _scalars(report_fn(teacher))
        if "ptq" not in baseline:
            baseline["ptq"] = _scalars(report_fn(student))
    hooks = _qat_hooks(run, qcfg, base_cfg, teacher, select_fn, run_dir, baseline)
    summary = fit(qcfg, student, train_ds, hooks, run_dir, resume=run.resume, device=device,
                  rank=run.rank, world=run.world, reinit=False, resume_ck=run.resume_ck)
    summary.update(_summary_extras(run.cfg, qcfg, summary, baseline, state))
    if run.rank != 0:
        return summary
    teacher_path = tck["source"] if tck else None
    return _finish(summary, qcfg, val_ds, state, integer_check, ort_check, run.verbose,
                   report_fn if select_fn is not report_fn else None, teacher_path)


def _evaluate_fns(run: QATRun, qcfg, val_ds):
    """``(report_fn, select_fn)``: mAP on the val set (the summary's rows) and on the set the
    best epoch is chosen on (``quant.select_data``; the same function when unset)."""
    if run.rank != 0:
        return (lambda m: {}), (lambda m: {})
    report_fn = make_evaluate_fn(qcfg, val_ds)
    sel_ds = selection_val_set(qcfg, val_ds)
    if sel_ds is val_ds:
        return report_fn, report_fn
    if run.verbose:
        logger.info("QAT: best epoch chosen on the val split of %s (%d images), reported on "
                    "data.dataset's", qcfg.quant.select_data, len(sel_ds))
    return report_fn, make_evaluate_fn(qcfg, sel_ds)


def _log_start(run_dir, qcfg, cfg, state) -> None:
    t, distill, qat = qcfg.train, cfg.quant.distill, cfg.quant.qat
    logger.info("QAT run directory: %s (%d epochs, lr0 %.3g -> x%.3g, mosaic %s, scales %s, "
                "distillation %s, %d quantized layers, %d float)", run_dir, t.epochs,
                t.lr0, t.lrf, "on" if qcfg.data.augment.mosaic > 0 else "off",
                _scales_mode(qat),
                "on" if distill.enabled else "off", len(state["layers"]), len(state["skip"]))


def _scales_mode(qat) -> str:
    return "learned" if qat.learn_scales else ("frozen" if qat.freeze_scales else "EMA")


def _summary_extras(cfg, qcfg, summary, baseline, state) -> Dict[str, Any]:
    t, distill, qat = qcfg.train, cfg.quant.distill, cfg.quant.qat
    return {
        "metrics": _scalars(summary["metrics"]),
        "float": baseline.get("float"), "ptq": baseline.get("ptq"),
        "flavour": state["flavour"], "quantized_layers": len(state["layers"]),
        "float_layers": list(state["skip"]),
        "recipe": {"epochs": int(t.epochs), "lr0": float(t.lr0), "lrf": float(t.lrf),
                   "freeze_scales": bool(qat.freeze_scales), "scales": _scales_mode(qat),
                   "distill": bool(distill.enabled),
                   "distill_weight": float(distill.weight), "tau": float(distill.tau),
                   "layers": list(distill.layers)},
    }


def _finish(summary, qcfg, val_ds, state, integer_check, ort_check, verbose,
            report_fn=None, teacher=None) -> Dict[str, Any]:
    """QAT mAP of the final checkpoint, the optional integer / ONNX Runtime checks, QAT-aware
    partial quantization (``quant.qat.max_drop``), the report. ``report_fn``: the val evaluator
    when the best epoch was chosen on another set (the checkpoint's own metrics are that set's;
    kept as ``qat_select``)."""
    weights_dir = Path(summary["run_dir"]) / "weights"
    final_path = Path(summary["best"]) if summary["best"] else weights_dir / "last.pt"
    summary["qat"] = _scalars(load_checkpoint(final_path).get("metrics")) or None
    summary["qat_checkpoint"] = str(final_path)
    final = None
    if integer_check or ort_check or report_fn is not None:
        rd = read_checkpoint_any(final_path)  # EMA weights when present
        final = build_quantized(qcfg, rd["model"], rd["quant"], str(final_path))
    if report_fn is not None:
        summary["qat_select"], summary["qat"] = summary["qat"], _scalars(report_fn(final))
    if integer_check:
        summary["integer_check"] = run_integer_check(final, _first_val_batch(qcfg, val_ds))
        summary["integer_bias_saturated"] = int32_bias_overflow(final)
    if ort_check:
        onnx_path = weights_dir / f"{final_path.stem}_{state['flavour']}.onnx"
        summary["ort"] = evaluate_ort(final, qcfg, val_ds, onnx_path)
    q = qcfg.quant.qat
    if q.max_drop is not None:
        summary["partial"] = run_qat_partial(
            qcfg, final_path, teacher, float(q.max_drop), weights_dir / "partial.pt",
            int(q.max_search_steps), say=print if verbose else (lambda *a, **k: None))
    summary["report"] = format_report(summary)
    if verbose:
        print(summary["report"], flush=True)
    return summary


# ----------------------------------------------------------------------------- report
def _fmt(v: Optional[float]) -> str:
    return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def format_report(summary: Dict[str, Any], top: int = 10) -> str:
    """Float (teacher) vs PTQ (start) vs QAT mAP, with ONNX Runtime INT8 and the integer check
    when present. mAP in percentage points."""
    rows = [("float (teacher)", summary.get("float")), ("PTQ (start)", summary.get("ptq")),
            (f"QAT ({Path(summary.get('qat_checkpoint') or 'best.pt').name})", summary.get("qat"))]
    part = summary.get("partial")
    if part:
        rows.append((f"QAT partial ({len(part['float_layers'])} float)", part["metrics"]))
    if summary.get("ort"):
        rows.append((f"QAT ONNX Runtime INT8 ({summary['flavour']} QDQ)", summary["ort"]))
    ref = (summary.get("float") or {}).get("map50_95")
    lines = [f"QAT report: {summary.get('run_dir', '')}  ({summary.get('flavour')} flavour, "
             f"{summary.get('quantized_layers')} quantized layers, "
             f"{len(summary.get('float_layers') or [])} float)",
             f"{'':<40}{'mAP50-95':>9}{'mAP50':>8}{'vs float':>10}"]
    for label, m in rows:
        m = m or {}
        a = m.get("map50_95")
        delta = f"{100 * (a - ref):+9.2f}" if a is not None and ref is not None else "        -"
        lines.append(f"{label:<40}{_fmt(a):>9}{_fmt(m.get('map50')):>8}{delta:>10}")
    if summary.get("ort") and summary.get("qat"):
        d = summary["ort"]["map50_95"] - summary["qat"]["map50_95"]
        lines.append(f"ONNX Runtime vs torch fake-quant: {100 * d:+.2f} mAP50-95 points")
    if part:
        lines.append(f"QAT partial: float layers {', '.join(part['float_layers']) or 'none'} "
                     f"(max_drop {part['max_drop']:g} {'met' if part['reached'] else 'not met'} "
                     f"on {part['select']['images']} selection images) -> {part['weights']}")
    dev = summary.get("integer_check")
    if dev:
        worst = sorted(dev.items(), key=lambda kv: -kv[1])
        lines.append(f"integer arithmetic vs fake-quant, max deviation per layer (steps of the "
                     f"output grid): max {worst[0][1]:.3f} over {len(dev)} layers, "
                     f"{sum(v <= 1.0 + 1e-6 for v in dev.values())}/{len(dev)} within 1 step")
        for name, v in worst[:top]:
            lines.append(f"  {name:<52}{v:7.3f}")
        if len(worst) > top:
            lines.append(f"  ... {len(worst) - top} more (all in results.json)")
    lines += bias_overflow_lines(summary.get("integer_bias_saturated") or {})
    return "\n".join(lines)


__all__ = ["QATError", "QATHook", "build_quantized", "check_calibrated", "format_report",
           "model_config_diff", "qat_epochs", "qat_train_config", "run_qat"]
