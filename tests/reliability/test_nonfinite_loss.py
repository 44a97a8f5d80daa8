"""Non-finite loss through the real ``train()`` path (YOLOv6 model, DetectionLoss, data loader,
default hooks): a NaN/inf loss skips the step (weights and BN statistics untouched) and is
reported; after ``train.max_bad_steps`` in a row training stops with a clear message and the
last good checkpoint intact."""
import hashlib
import logging

import pytest
import torch

from reliability_utils import tiny_cfg, tiny_dataset
from yolo_q.engine import Hook
from yolo_q.io import load_checkpoint
from yolo_q.training import train
from yolo_q.engine.trainer import NonFiniteLossError

ITERS = 4  # 16 images, batch 4


class Poison(Hook):
    """Adds ``value`` to the loss (an extra loss term) at the given global iterations; records
    the weights around those steps and the hash of last.pt after each epoch."""

    def __init__(self, poisoned):
        self.poisoned = poisoned  # {global iter: value}
        self.before, self.after, self.ckpt_hash = {}, {}, {}

    def _state(self):
        return {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}

    def before_step(self):
        if self.trainer.iter in self.poisoned:
            self.before[self.trainer.iter] = self._state()

    def after_forward(self):
        tr = self.trainer
        if tr.iter in self.poisoned:
            tr.extra_losses["poison"] = torch.tensor(self.poisoned[tr.iter])

    def after_step(self):
        if self.trainer.iter in self.poisoned:
            self.after[self.trainer.iter] = self._state()

    def after_epoch(self):  # runs after CheckpointHook (extra hooks come last)
        last = self.trainer.work_dir / "weights" / "last.pt"
        self.ckpt_hash[self.trainer.epoch] = hashlib.sha256(last.read_bytes()).hexdigest()


def test_nonfinite_steps_are_skipped_reported_and_training_stops(tmp_path, caplog):
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_cfg(data, tmp_path / "runs", epochs=3, extra=["train.max_bad_steps=3"])
    # epoch 1: an inf and a NaN step, isolated (skipped, training goes on); from epoch 3 every
    # step is NaN: stop after 3 in a row, last.pt must still be the one written after epoch 2
    poisoned = {1: float("inf"), 2: float("nan")}
    poisoned.update({i: float("nan") for i in range(2 * ITERS, 3 * ITERS)})
    hook = Poison(poisoned)
    caplog.set_level(logging.INFO)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, extra_hooks=[hook], verbose=False)
    msg = str(e.value)
    last = tmp_path / "runs" / "exp" / "weights" / "last.pt"
    assert "3 consecutive non-finite losses" in msg and "train.max_bad_steps=3" in msg
    assert "epoch 3/3 iter 3/4" in msg and str(last) in msg and "untouched" in msg

    # skipped steps changed nothing: parameters and BN running statistics
    for it in (1, 2, 8, 9):
        for k, v in hook.before[it].items():
            assert torch.equal(v, hook.after[it][k]), (it, k)
    # ... while good steps did train
    assert not torch.equal(hook.after[2]["detect.cls_preds.0.weight"],
                           hook.before[8]["detect.cls_preds.0.weight"])

    # every bad step reported, with where it happened
    warnings = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(warnings) == 5
    assert "epoch 1/3 iter 2/4" in warnings[0] and "poison=inf" in warnings[0]
    assert "epoch 1/3 iter 3/4" in warnings[1] and "poison=nan" in warnings[1]
    assert "(3 in a row, 5 in total)" in warnings[-1]
    assert any("epoch 1/3 done" in r.getMessage() and "bad_steps=2" in r.getMessage()
               for r in caplog.records)

    # the last good checkpoint is intact: same bytes as written after epoch 2, loadable, finite
    assert hashlib.sha256(last.read_bytes()).hexdigest() == hook.ckpt_hash[1]
    ck = load_checkpoint(last)
    assert ck["epoch"] == 1 and ck["iteration"] == 2 * ITERS and ck["total_bad_steps"] == 2
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in ck[key].values() if v.is_floating_point())
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_isolated_bad_steps_are_counted_in_the_summary(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_cfg(data, tmp_path / "runs", epochs=1, extra=["train.max_bad_steps=2"])
    # 2 bad steps, never 2 in a row: training completes
    s = train(cfg, extra_hooks=[Poison({0: float("nan"), 2: float("-inf")})], verbose=False)
    assert s["total_bad_steps"] == 2 and s["epochs"] == 1
    ck = load_checkpoint(s["last"])
    assert ck["total_bad_steps"] == 2 and ck["bad_steps"] == 0
