"""Channel-wise distillation: the loss against a hand-written formula, and the trainer hook."""
import copy
import math

import numpy as np
import pytest
import torch

from yolo_q.config import load_config
from yolo_q.engine import Hook, Trainer
from yolo_q.quant.distill import ChannelDistillHook, check_layers, cwd_loss


def reference_cwd(students, teachers, tau):
    """Literal formula in float64 loops: per (b, c) a softmax over positions of x / tau,
    KL(teacher || student) * tau^2, mean over (b, c), summed over maps."""
    total = 0.0
    for s, t in zip(students, teachers):
        s, t = s.detach().double().numpy(), t.detach().double().numpy()
        b, c = s.shape[:2]
        kls = []
        for i in range(b):
            for j in range(c):
                zs, zt = s[i, j].ravel() / tau, t[i, j].ravel() / tau
                ps = np.exp(zs - zs.max()) / np.exp(zs - zs.max()).sum()
                pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
                kls.append(sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps)))
        total += tau ** 2 * sum(kls) / len(kls)
    return total


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_cwd_loss_matches_formula(tau):
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 2, 3, 3, generator=g) * 3]
    t = [torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 2, 3, 3, generator=g) * 3]
    got = cwd_loss(s, t, tau)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(reference_cwd(s, t, tau), rel=1e-5)
    # one map = a plain tensor; the maps' terms add up
    assert (cwd_loss(s[0], t[0], tau) + cwd_loss(s[1], t[1], tau)).item() == \
        pytest.approx(got.item(), rel=1e-6)


def test_cwd_loss_zero_for_equal_maps_and_per_channel_shift_invariant():
    x = torch.randn(2, 4, 6, 6)
    assert cwd_loss(x, x.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # a per-channel constant does not change a softmax over positions
    shift = torch.randn(1, 4, 1, 1) * 10
    assert cwd_loss(x + shift, x, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    assert cwd_loss(x * 2, x, 1.0).item() > 1e-3


def test_cwd_loss_gradient_reaches_student_only():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    cwd_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    # gradient check of the student side in float64 (float32 compute path)
    s64 = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    num = torch.zeros_like(s64)
    eps = 1e-3
    with torch.no_grad():
        for idx in np.ndindex(*s64.shape):
            d = torch.zeros_like(s64)
            d[idx] = eps
            num[idx] = (cwd_loss(s64 + d, t64, 1.5) - cwd_loss(s64 - d, t64, 1.5)) / (2 * eps)
    cwd_loss(s64, t64, 1.5).backward()
    assert torch.allclose(s64.grad, num, atol=2e-4)


def test_cwd_loss_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="student"):
        cwd_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 2))
    with pytest.raises(ValueError, match="maps"):
        cwd_loss([torch.zeros(1, 2, 4, 4)], [])


# ----------------------------------------------------------------------------- the hook
def _tiny(seed=0):
    """Tiny fused float YOLOv6-N (width 1/8, nc=3) with random, unit-scaled activations."""
    from quant_testutils import tiny_fused
    return tiny_fused(seed)


def _trainer(student, hooks):
    cfg = load_config(None, ["model.nc=3", "train.epochs=1", "train.batch_size=2",
                             "train.nominal_batch=2", "train.warmup_epochs=0", "train.ema=false",
                             "train.device=cpu", "train.progress_bar=false",
                             "train.tensorboard=false", "train.lr0=0.001"])
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 255, (2, 3, 64, 64), generator=g, dtype=torch.uint8),
             torch.zeros(0, 6), ["a", "b"], None)
    batches = [batch, batch]  # the same images twice: the second step sees the first's effect

    def zero_detection_loss(outputs, targets, epoch):  # only the distillation term trains
        return outputs[1].sum() * 0.0, {"det": torch.zeros(())}

    opt = torch.optim.SGD(student.parameters(), lr=0.001)
    return Trainer(student, opt, batches, zero_detection_loss, cfg, hooks=hooks)


class Probe(Hook):
    """After the distillation hook (neck layers): record the term, its expected value from
    ``forward_features`` of both models, and the student's gradients."""

    def __init__(self, teacher, tau, weight):
        self.teacher, self.tau, self.weight = teacher, tau, weight
        self.records, self.grads = [], []

    def after_forward(self):
        tr = self.trainer
        with torch.no_grad():
            s = tr.model.forward_features(tr.inputs)
            t = self.teacher.forward_features(tr.inputs)
        term = tr.extra_losses["cwd"]
        self.records.append((term.item(), self.weight * cwd_loss(s, t, self.tau).item(),
                             term.requires_grad))

    def before_optimizer_step(self):
        self.grads.append({n: (p.grad.abs().sum().item() if p.grad is not None else None)
                           for n, p in self.trainer.model.named_parameters()})


def test_hook_adds_weighted_term_and_trains_the_student_only():
    teacher = _tiny(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    probe = Probe(teacher, 2.0, 0.5)
    tr = _trainer(student, [ChannelDistillHook(teacher, ["neck"], tau=2.0, weight=0.5), probe])
    tr.train()
    assert len(probe.records) == 2
    got, expected, needs_grad = probe.records[0]
    assert got > 0 and needs_grad and got == pytest.approx(expected, rel=1e-4)
    assert "cwd" in tr.loss_parts and tr.loss_parts["cwd"] == pytest.approx(probe.records[-1][0])
    grads = probe.grads[0]
    assert any(v for n, v in grads.items() if n.startswith(("backbone.", "neck.")))
    # the head is not part of the neck features: no gradient from distillation
    assert all(not v for n, v in grads.items() if n.startswith("detect."))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert probe.records[-1][0] < probe.records[0][0]  # the student moves toward the teacher
    # hooks are removed after training: a forward no longer records anything
    hook = tr.hooks[0]
    student.train()(torch.rand(1, 3, 64, 64))
    assert hook.student_capture.store == {}


def test_hook_on_named_modules():
    teacher = _tiny(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.neck.Rep_p4.conv1.rbr_reparam.weight.mul_(1.5)
    layers = ["neck.Rep_p4", "backbone.ERBlock_5"]
    hook = ChannelDistillHook(teacher, layers, tau=1.0, weight=1.0)
    tr = _trainer(student, [hook])
    x = torch.rand(2, 3, 64, 64)
    outs = {}
    handles = [m.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, key=(tag, n): outs.__setitem__(key, o))
        for tag, m in (("s", student), ("t", teacher)) for n in layers]
    with torch.no_grad():
        student.train()(x)
        teacher(x)
    for h in handles:
        h.remove()
    expected = cwd_loss([outs[("s", n)] for n in layers], [outs[("t", n)] for n in layers])
    assert expected.item() > 0
    hook.before_train()
    student.train()(x)
    tr.inputs, tr.extra_losses = x, {}
    hook.after_forward()
    hook.after_train()
    assert tr.extra_losses["cwd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_layer_names_are_checked():
    from quant_testutils import calibrated
    q = calibrated("tensorrt")
    t = _tiny(0)
    with pytest.raises(ValueError, match="did you mean 'neck.Rep_p4'"):
        check_layers(t, q, ["neck.Rep_p5"])
    with pytest.raises(ValueError, match="enclosing block"):
        check_layers(t, q, ["neck.Rep_p4.conv1.rbr_reparam"])
    with pytest.raises(ValueError, match="empty"):
        check_layers(t, q, [])
    assert check_layers(t, q, ["neck", "neck.Rep_p4.conv1"]) == ["neck", "neck.Rep_p4.conv1"]
