"""RepOptimizer (Ding et al., "Re-parameterizing Your Optimizers rather than Architectures").

Hyper-search trains a model of :class:`~yolo_q.models.blocks.LinearAddBlock` s, whose per-channel
branch scales (``s3`` for the 3x3 conv, ``s1`` for the 1x1 conv, ``sid`` for the identity) are
learned. RepOpt training then trains a *plain* model (:class:`~yolo_q.models.blocks.RealVGGBlock`:
one 3x3 conv + BN) so that it follows exactly the trajectory of the multi-branch block with those
scales held constant, trained by SGD:

* initialisation: ``W = s3 * W3 + s1 * pad(W1) + sid * I`` (``W3``, ``W1`` freshly initialised);
* gradient mask: SGD on the branches moves ``W`` by ``-lr * (s3^2 * g + s1^2 * g_centre)``, so
  the plain conv's gradient is multiplied by ``M = s3^2`` everywhere plus ``s1^2`` at the centre;
* weight decay: L2 on ``W3`` and ``W1`` decays ``s3 W3 + s1 pad(W1) = W - sid * I``, so the decay
  term is ``wd * (W - sid * I)``: the constant identity part is not decayed.

Momentum and Nesterov are linear in these terms, so the equivalence is exact (tested).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..models.blocks import LinearAddBlock, RealVGGBlock, _identity_kernel
from ..io import CheckpointError, load_checkpoint, save_checkpoint

Scales = Dict[str, Dict[str, Optional[torch.Tensor]]]


class ScalesError(ValueError):
    """The scales file is missing, malformed or does not match the model; names the layer."""


def extract_scales(model: torch.nn.Module) -> Scales:
    """Learned branch scales of every LinearAddBlock, keyed by module path."""
    out: Scales = {}
    for name, m in model.named_modules():
        if isinstance(m, LinearAddBlock) and not hasattr(m, "rbr_reparam"):
            out[name] = {
                "scale_conv": m.scale_conv.weight.detach().float().cpu().clone(),
                "scale_1x1": m.scale_1x1.weight.detach().float().cpu().clone(),
                "scale_identity": (m.scale_identity.weight.detach().float().cpu().clone()
                                   if m.scale_identity is not None else None),
            }
    return out


def save_scales(model: torch.nn.Module, path: Union[str, Path]) -> Path:
    scales = extract_scales(model)
    if not scales:
        raise ScalesError("the model has no LinearAddBlock (hyper-search) layers to extract")
    return save_checkpoint({"repopt_scales": scales}, path)


def load_scales(path: Union[str, Path]) -> Scales:
    try:
        obj = load_checkpoint(path)
    except CheckpointError as e:
        raise ScalesError(str(e)) from None
    if isinstance(obj, dict) and "repopt_scales" in obj:
        obj = obj["repopt_scales"]
    if not isinstance(obj, dict) or not obj:
        raise ScalesError(f"{path}: not a scales file (expected {{'repopt_scales': {{layer: ...}}}})")
    for name, entry in obj.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("scale_conv"), torch.Tensor) \
                or not isinstance(entry.get("scale_1x1"), torch.Tensor):
            raise ScalesError(f"{path}: layer '{name}': needs tensors 'scale_conv' and 'scale_1x1'")
    return obj


def _plain_blocks(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RealVGGBlock)]


def _check(path, name: str, block: RealVGGBlock, entry) -> None:
    c_out, c_in = block.conv.out_channels, block.conv.in_channels
    if entry is None:
        raise ScalesError(f"{path}: no scales for layer '{name}'")
    for key in ("scale_conv", "scale_1x1"):
        if tuple(entry[key].shape) != (c_out,):
            raise ScalesError(f"{path}: layer '{name}': {key} has shape {tuple(entry[key].shape)}, "
                              f"the model needs ({c_out},)")
    has_id = c_in == c_out and block.conv.stride == (1, 1)
    sid = entry.get("scale_identity")
    if has_id != (sid is not None):
        raise ScalesError(f"{path}: layer '{name}': identity scale "
                          f"{'missing' if has_id else 'given'} but the layer "
                          f"{'has' if has_id else 'has no'} identity branch")
    if sid is not None and tuple(sid.shape) != (c_out,):
        raise ScalesError(f"{path}: layer '{name}': scale_identity has shape {tuple(sid.shape)}, "
                          f"the model needs ({c_out},)")


def prepare_repopt(model: torch.nn.Module, scales: Scales, path="scales", reinit: bool = True,
                   ) -> Tuple[Dict[torch.nn.Parameter, torch.Tensor], Dict[torch.nn.Parameter, torch.Tensor]]:
    """Validate ``scales`` against every RealVGGBlock, optionally re-initialise their convs from
    the scales, and return ``(grad_masks, decay_offsets)`` keyed by conv weight parameter."""
    blocks = _plain_blocks(model)
    if not blocks:
        raise ScalesError("RepOptimizer needs a model of RealVGG blocks (model.block=realvgg)")
    names = {n for n, _ in blocks}
    extra = sorted(set(scales) - names)
    if extra:
        raise ScalesError(f"{path}: scales for layer '{extra[0]}' which the model does not have "
                          f"({len(extra)} unmatched)")
    masks, offsets = {}, {}
    for name, block in blocks:
        entry = scales.get(name)
        _check(path, name, block, entry)
        w = block.conv.weight
        s3 = entry["scale_conv"].to(w).view(-1, 1, 1, 1)
        s1 = entry["scale_1x1"].to(w).view(-1, 1, 1, 1)
        mask = (s3 ** 2).expand_as(w).clone()
        mask[:, :, 1, 1] += (s1 ** 2).view(-1, 1)
        ident = None
        if entry.get("scale_identity") is not None:
            ident = _identity_kernel(w.shape[0], 1, w) * entry["scale_identity"].to(w).view(-1, 1, 1, 1)
        if reinit:
            with torch.no_grad():
                w3 = torch.empty_like(w)
                torch.nn.init.kaiming_uniform_(w3, a=5 ** 0.5)
                w1 = torch.empty(w.shape[0], w.shape[1], 1, 1, dtype=w.dtype, device=w.device)
                torch.nn.init.kaiming_uniform_(w1, a=5 ** 0.5)
                w.copy_(w3 * s3 + F.pad(w1, [1, 1, 1, 1]) * s1 + (ident if ident is not None else 0))
        masks[w] = mask
        if ident is not None:
            offsets[w] = ident
    return masks, offsets


class RepOptimizer(torch.optim.Optimizer):
    """SGD (momentum, Nesterov, weight decay) whose update for each masked conv weight uses
    ``mask * grad + weight_decay * (W - offset)``; other parameters get plain SGD. Same update
    rule and state layout as ``torch.optim.SGD`` (dampening 0)."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, grad_masks=None, decay_offsets=None):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))
        self.grad_masks = dict(grad_masks or {})
        self.decay_offsets = dict(decay_offsets or {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                mask = self.grad_masks.get(p)
                if mask is not None:
                    d_p = d_p * mask
                if wd != 0:
                    off = self.decay_offsets.get(p)
                    d_p = d_p.add(p if off is None else p - off, alpha=wd)
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(mom).add_(d_p)
                    d_p = d_p.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d_p, alpha=-lr)
        return loss
