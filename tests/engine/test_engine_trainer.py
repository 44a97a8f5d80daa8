"""The Trainer loop: hook order, extra loss terms, gradient accumulation, non-finite guard."""
import copy
import math

import pytest
import torch

from engine_testutils import TinyDetector, detection_loss, make_cfg, make_loader, weights
from yolo_q.engine import (CheckpointHook, Hook, NonFiniteLossError, Trainer, WarmupLRHook,
                           load_checkpoint, resolve_device, seed_everything)
from yolo_q.optim import build_optimizer


class Recorder(Hook):
    """Records (point, epoch, iter) for every hook point."""

    def __init__(self):
        self.events = []


for _point in Trainer.HOOK_POINTS:
    setattr(Recorder, _point, lambda self, _p=_point: self.events.append(
        (_p, self.trainer.epoch, self.trainer.iter)))


def make_trainer(cfg, hooks=(), loss_fn=None, n=16, model=None, work_dir=None):
    seed_everything(0)
    model = model if model is not None else TinyDetector()
    return Trainer(model, build_optimizer(model, cfg), make_loader(n, cfg.train.batch_size),
                   loss_fn or detection_loss(), cfg, hooks=list(hooks), work_dir=work_dir)


def test_hook_order():
    rec = Recorder()
    tr = make_trainer(make_cfg(epochs=2), [rec], n=8)  # 2 iterations per epoch, accumulate 1
    tr.train()
    step = ["before_step", "after_forward", "before_optimizer_step", "after_step"]
    expected = [("before_train", 0, 0)]
    for epoch in range(2):
        expected.append(("before_epoch", epoch, 2 * epoch))
        for it in (2 * epoch, 2 * epoch + 1):
            expected += [(p, epoch, it) for p in step]
        expected.append(("after_epoch", epoch, 2 * epoch + 2))
    expected.append(("after_train", 1, 4))
    assert rec.events == expected


def test_after_train_runs_when_training_fails():
    rec = Recorder()

    def broken_loss(outputs, targets, epoch):
        raise RuntimeError("boom")

    tr = make_trainer(make_cfg(), [rec], loss_fn=broken_loss)
    with pytest.raises(RuntimeError, match="boom"):
        tr.train()
    assert rec.events[-1][0] == "after_train"


def test_extra_losses_from_a_hook():
    """A hook adds 0.5*|w|^2 of the first cls conv in after_forward; the task loss is zeroed,
    so at the optimizer step that conv's gradient must equal its weights exactly."""
    class L2Hook(Hook):
        def after_forward(self):
            assert self.trainer.outputs is not None and self.trainer.inputs.dtype == torch.float32
            w = self.trainer.model.cls[0].weight
            self.trainer.extra_losses["l2"] = 0.5 * w.pow(2).sum()

    class GradProbe(Hook):
        def before_optimizer_step(self):
            w = self.trainer.model.cls[0].weight
            self.grad, self.w = w.grad.clone(), w.detach().clone()

    def zero_loss(outputs, targets, epoch):
        return outputs[1].sum() * 0.0, {"task": torch.tensor(0.0)}

    probe = GradProbe()
    tr = make_trainer(make_cfg(epochs=1), [L2Hook(), probe], loss_fn=zero_loss, n=4)
    tr.train()
    assert torch.equal(probe.grad, probe.w)
    assert tr.loss_parts["l2"] == pytest.approx(0.5 * probe.w.pow(2).sum().item(), rel=1e-6)
    assert tr.loss == pytest.approx(tr.loss_parts["l2"], rel=1e-6)


def test_gradient_accumulation():
    """nominal 12 / batch 4 -> accumulate 3: with 7 iterations the optimizer steps after
    iterations 2, 5 and 6 (short last window), each time with the SUM of the window's gradients;
    weights do not move in between."""
    cfg = make_cfg(epochs=1, nominal_batch=12, warmup_epochs=0)

    class Probe(Hook):
        def __init__(self):
            self.batches, self.steps, self.grads, self.after = [], [], [], []

        def before_step(self):
            self.batches.append(self.trainer.batch)

        def before_optimizer_step(self):
            self.steps.append(self.trainer.iter)
            self.grads.append({k: p.grad.clone() for k, p in
                               self.trainer.model.named_parameters()})

        def after_step(self):
            self.after.append(weights(self.trainer.model))

    model = TinyDetector(dropout=0.0)
    model0 = copy.deepcopy(model)
    probe = Probe()
    loss = detection_loss()
    tr = make_trainer(cfg, [probe], loss_fn=loss, n=28, model=model)
    assert tr.accumulate == 3
    tr.train()
    assert probe.steps == [2, 5, 6]
    p = [k for k, _ in model.named_parameters()]
    for i in (0, 1):
        assert all(torch.equal(probe.after[i][k], model0.state_dict()[k]) for k in p)
    assert not torch.equal(probe.after[2]["cls.0.weight"], model0.state_dict()["cls.0.weight"])
    # expected gradient of the first window: sum over its 3 micro-batches, same initial weights
    ref = copy.deepcopy(model0).train()
    for batch in probe.batches[:3]:
        total, _ = loss(ref(batch[0].float() / 255), batch[1], 0)
        total.backward()
    for k, q in ref.named_parameters():
        assert torch.allclose(probe.grads[0][k], q.grad, rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("ramp, steps, accs", [
    (True, [0, 1, 3, 6, 10, 11], [1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4, 4]),
    (False, [3, 7, 11], [4] * 12)])
def test_accumulation_ramps_over_the_warmup(ramp, steps, accs):
    """nominal 16 / batch 4 (accumulate 4), warm-up 8 iterations, 12 iterations in one epoch:
    with train.accumulate_warmup the count ramps 1 -> 4 (YOLOv6) and the optimizer steps when a
    window reaches the count of its current iteration (plus the short last window); without it
    every window has 4 micro-batches from the start."""
    cfg = make_cfg(epochs=1, nominal_batch=16, warmup_epochs=0.5, warmup_min_iters=8,
                   accumulate_warmup=ramp)

    class Probe(Hook):
        def __init__(self):
            self.steps, self.accs = [], []

        def before_step(self):
            self.accs.append(self.trainer.accumulate)

        def before_optimizer_step(self):
            self.steps.append(self.trainer.iter)

    probe = Probe()
    tr = make_trainer(cfg, [WarmupLRHook(), probe], n=48)
    assert tr.iters_per_epoch == 12 and tr.nominal_accumulate == 4
    tr.train()
    assert probe.accs == accs and probe.steps == steps


def _nan_at(bad_iters, trainer_ref):
    loss = detection_loss()

    def loss_fn(outputs, targets, epoch):
        total, parts = loss(outputs, targets, epoch)
        if trainer_ref[0].iter in bad_iters:
            total = total * float("nan")
        return total, parts
    return loss_fn


def test_nonfinite_loss_skips_the_step():
    ref = [None]

    class Probe(Hook):
        def __init__(self):
            self.before, self.after, self.opt_steps = {}, {}, []

        def before_step(self):
            self.before[self.trainer.iter] = weights(self.trainer.model)

        def after_step(self):
            self.after[self.trainer.iter] = weights(self.trainer.model)

        def before_optimizer_step(self):
            self.opt_steps.append(self.trainer.iter)

    probe = Probe()
    tr = make_trainer(make_cfg(epochs=1), [probe], loss_fn=_nan_at({1, 2}, ref))
    ref[0] = tr
    tr.train()
    assert probe.opt_steps == [0, 3]
    for it in (1, 2):  # parameters AND BN running stats untouched by the bad steps
        for k, v in probe.before[it].items():
            assert torch.equal(v, probe.after[it][k]), (it, k)
    assert not torch.equal(probe.before[3]["cls.0.weight"], probe.after[3]["cls.0.weight"])
    assert tr.total_bad_steps == 2 and tr.bad_steps == 0
    assert tr.optimizer.state_dict()["state"][0]["momentum_buffer"] is not None
    assert all(math.isfinite(v) for v in tr.epoch_losses.values())


def test_stops_after_max_bad_steps_keeping_last_checkpoint(tmp_path):
    """NaN from the second epoch on: stop after 3 in a row; last.pt still holds epoch 1."""
    ref = [None]
    cfg = make_cfg(epochs=3, max_bad_steps=3)
    ckpt_hook = CheckpointHook(tmp_path / "weights")
    tr = make_trainer(cfg, [ckpt_hook], loss_fn=_nan_at(set(range(4, 100)), ref))
    ref[0] = tr
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite.*max_bad_steps=3"
                                                 r".*last\.pt"):
        tr.train()
    assert tr.iter == 6  # 4 good + 3 bad (the raising one is not counted as done)
    ck = load_checkpoint(tmp_path / "weights" / "last.pt")
    assert ck["epoch"] == 0 and ck["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(torch.equal(ck["model"][k], v) for k, v in tr.model.state_dict().items())


def test_denormals_flushed_on_cpu_during_training_only():
    tiny = torch.tensor([1e-39])

    class Probe(Hook):
        def after_step(self):
            self.inside = (tiny * 1.0).item()

    probe = Probe()
    make_trainer(make_cfg(epochs=1), [probe], n=4).train()
    assert probe.inside == 0.0  # flushed during training (early CPU steps are ~60x faster)
    assert (tiny * 1.0).item() > 0.0  # previous mode restored


def test_device_and_amp_resolution():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device"):
            resolve_device("cuda")
        tr = make_trainer(make_cfg(amp=True, device="auto"), n=4)
        assert tr.device.type == "cpu" and not tr.amp and not tr.scaler.is_enabled()
    with pytest.raises(ValueError, match="train loader is empty"):
        make_trainer(make_cfg(), n=2)  # 2 images, batch 4, drop_last -> no batches
