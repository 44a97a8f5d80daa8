"""Channel-wise distillation (Shu et al., ICCV 2021) for QAT: the float teacher's feature maps
teach the fake-quant student.

For a pair of maps ``S``, ``T`` of shape (B, C, H, W) and temperature ``tau``, each channel is
turned into a distribution over its ``H*W`` positions::

    p_T[b, c] = softmax(T[b, c, :] / tau)        p_S[b, c] = softmax(S[b, c, :] / tau)
    loss = tau^2 * mean over (b, c) of KL(p_T[b, c] || p_S[b, c])

and the terms of several layers are summed (the paper's form; ``quant.distill.weight`` scales
the total). :class:`ChannelDistillHook` adds ``weight * loss`` to the training loss as the part
``cwd`` (logged like every loss part, e.g. TensorBoard ``train/cwd``).

Layers (``quant.distill.layers``): ``neck`` (default) = the three neck outputs, i.e. what
``model.forward_features`` returns; ``backbone`` = the backbone outputs; or any module path of
the float model such as ``neck.Rep_p4`` or ``backbone.ERBlock_5``. The output of the named
module (a tensor, or a list/tuple of tensors) is captured with forward hooks on the student and
on the teacher; the models are not changed. Quantized convolutions that absorbed their
activation (see :func:`yolo_q.quant.convert`) compute something else than the float conv of the
same name, so name the enclosing block instead (this is checked).
"""
from __future__ import annotations

import difflib
import logging
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.hooks import Hook
from .convert import is_quantized, quant_state

logger = logging.getLogger(__name__)

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(x: Features) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    out: List[torch.Tensor] = []
    for v in x:
        out.extend(_as_list(v))
    return out


def cwd_loss(student: Features, teacher: Features, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation loss (see the module docstring) summed over paired maps.

    ``student`` / ``teacher``: a (B, C, H, W) tensor or equally long sequences of them with
    equal shapes. Computed in float32; the teacher is detached.
    """
    s_list, t_list = _as_list(student), _as_list(teacher)
    if len(s_list) != len(t_list):
        raise ValueError(f"cwd_loss: {len(s_list)} student maps vs {len(t_list)} teacher maps")
    if not s_list:
        raise ValueError("cwd_loss: no feature maps")
    if tau <= 0:
        raise ValueError(f"quant.distill.tau must be > 0, got {tau}")
    total = s_list[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        if s.shape != t.shape or s.dim() < 3:
            raise ValueError(f"cwd_loss: map {i}: student {tuple(s.shape)} vs teacher "
                             f"{tuple(t.shape)} (need equal (B, C, H, W) shapes)")
        b, c = s.shape[:2]
        s = s.float().reshape(b * c, -1) / tau
        t = t.detach().float().reshape(b * c, -1) / tau
        log_ps = F.log_softmax(s, dim=1)
        log_pt = F.log_softmax(t, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # (B*C,)
        total = total + kl.mean() * tau ** 2
    return total


# ----------------------------------------------------------------------------- feature capture
SPECIAL_LAYERS = ("neck", "backbone")


def check_layers(teacher: nn.Module, student: nn.Module, layers: Sequence[str]) -> List[str]:
    """Validate ``quant.distill.layers`` against both models; returns the list."""
    layers = [str(n) for n in layers]
    if not layers:
        raise ValueError("quant.distill.layers is empty (use [neck] or module names, or set "
                         "quant.distill.enabled=false)")
    t_names = dict(teacher.named_modules())
    s_names = dict(student.named_modules())
    absorbed = set()
    try:  # quantized layers whose activation moved into them (import here: no cycle at load)
        if is_quantized(student):
            for spec in quant_state(student)["layers"]:
                if spec.get("act"):
                    absorbed |= {spec["name"], spec["act"]}
    except ImportError:  # pragma: no cover
        pass
    for n in layers:
        if n not in t_names or n not in s_names:
            close = difflib.get_close_matches(n, [k for k in t_names if k], n=1)
            raise ValueError(f"quant.distill.layers: '{n}' is not a module of the model"
                             + (f" (did you mean '{close[0]}'?)" if close else ""))
        if n in absorbed:
            raise ValueError(f"quant.distill.layers: '{n}' is a convolution/activation that the "
                             f"quantized student fuses (conv+act); name its enclosing block "
                             f"(e.g. '{n.rsplit('.', 1)[0]}') instead")
    return layers


class FeatureCapture:
    """Forward hooks that keep the latest output of the named modules (while installed)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], only_training: bool = False):
        self.model, self.layers, self.only_training = model, list(layers), only_training
        self.store: Dict[str, Features] = {}
        self._handles = []

    def install(self) -> "FeatureCapture":
        self.remove()
        for n in self.layers:
            mod = self.model.get_submodule(n)

            def hook(m, _inp, out, n=n):
                if not self.only_training or m.training:
                    self.store[n] = out
            self._handles.append(mod.register_forward_hook(hook))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.store = {}

    def pop(self) -> List[Features]:
        """Outputs in ``layers`` order (cleared afterwards); raises if a layer did not run."""
        missing = [n for n in self.layers if n not in self.store]
        if missing:
            raise RuntimeError(f"distillation: layer(s) {missing} did not run in the forward pass")
        out = [self.store[n] for n in self.layers]
        self.store = {}
        return out

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()


class ChannelDistillHook(Hook):
    """Trainer hook: ``trainer.extra_losses['cwd'] = weight * cwd_loss(student, teacher, tau)``.

    ``teacher``: the float model (fused; put in eval mode, frozen and moved to the trainer's
    device here). Student features are captured with forward hooks on ``trainer.model`` (in
    training mode only, so evaluation forwards are ignored) installed in ``before_train``, i.e.
    after the EMA copy was made, and removed in ``after_train``. The teacher runs on the same
    ``trainer.inputs`` under ``torch.no_grad`` (only ``forward_features`` when all layers are in
    the backbone/neck).
    """

    def __init__(self, teacher: nn.Module, layers: Sequence[str] = ("neck",), tau: float = 1.0,
                 weight: float = 1.0, name: str = "cwd"):
        if tau <= 0:
            raise ValueError(f"quant.distill.tau must be > 0, got {tau}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.layers, self.tau, self.weight = list(layers), float(tau), float(weight)
        self.name = name
        self.student_capture: Optional[FeatureCapture] = None
        self.teacher_capture: Optional[FeatureCapture] = None

    def register(self, trainer) -> None:
        super().register(trainer)
        check_layers(self.teacher, trainer.model, self.layers)

    def before_train(self) -> None:
        tr = self.trainer
        self.teacher.to(tr.device).eval()
        self.student_capture = FeatureCapture(tr.model, self.layers, only_training=True).install()
        self.teacher_capture = FeatureCapture(self.teacher, self.layers).install()

    def before_step(self) -> None:
        self.student_capture.store = {}  # only this step's forward counts

    def _teacher_forward(self, x: torch.Tensor) -> None:
        features_only = all(n.split(".")[0] in SPECIAL_LAYERS for n in self.layers) and \
            callable(getattr(self.teacher, "forward_features", None))
        with torch.no_grad():
            if features_only:
                self.teacher.forward_features(x)
            else:
                self.teacher(x)

    def after_forward(self) -> None:
        tr = self.trainer
        student = self.student_capture.pop()
        self._teacher_forward(tr.inputs)
        teacher = self.teacher_capture.pop()
        tr.extra_losses[self.name] = self.weight * cwd_loss(student, teacher, self.tau)

    def after_train(self) -> None:
        for cap in (self.student_capture, self.teacher_capture):
            if cap is not None:
                cap.remove()


__all__ = ["ChannelDistillHook", "FeatureCapture", "check_layers", "cwd_loss"]
