"""Resume: a run resumed from last.pt ends with exactly the weights of an uninterrupted run."""
import shutil

import pytest
import torch

from engine_testutils import TinyDetector, detection_loss, make_cfg, make_loader
from yolo_q.engine import CheckpointError, Hook, Trainer, default_hooks, seed_everything
from yolo_q.io import save_checkpoint
from yolo_q.optim import build_optimizer

# warm-up ends inside epoch 2; 5 iterations/epoch with accumulate 2 (a short window per epoch);
# dropout, EMA and evaluation on; lr high enough for the weights to move visibly
CFG = dict(epochs=3, nominal_batch=8, warmup_epochs=1.4, lr0=0.05, eval_interval=1)


class KeepEpochCheckpoints(Hook):
    """After CheckpointHook: copy last.pt to e<epoch>.pt (the 'interruption points')."""

    def __init__(self, weights_dir):
        self.dir = weights_dir

    def after_epoch(self):
        shutil.copyfile(self.dir / "last.pt", self.dir / f"e{self.trainer.epoch}.pt")


def build(tmp, seed, extra_hooks=()):
    cfg = make_cfg(**CFG)
    seed_everything(seed)
    model = TinyDetector(dropout=0.2)
    evaluate = lambda m: {"map50_95": float(m.cls[0].bias.sum()), "map50": 0.0}  # noqa: E731
    hooks = default_hooks(cfg, evaluate, tmp) + list(extra_hooks)
    return Trainer(model, build_optimizer(model, cfg), make_loader(20, 4), detection_loss(), cfg,
                   hooks=hooks, work_dir=tmp)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    tr = build(tmp, seed=0, extra_hooks=[KeepEpochCheckpoints(tmp / "weights")])
    assert tr.accumulate == 2 and tr.iters_per_epoch == 5
    tr.train()
    return tmp, tr


@pytest.mark.parametrize("from_epoch", [0, 1])
def test_resume_equals_uninterrupted(uninterrupted, tmp_path, from_epoch):
    full_dir, full = uninterrupted
    resumed = build(tmp_path, seed=123)  # different init: everything must come from the file
    ck = resumed.resume(full_dir / "weights" / f"e{from_epoch}.pt")
    assert resumed.start_epoch == from_epoch + 1 and resumed.iter == 5 * (from_epoch + 1)
    assert not torch.equal(ck["model"]["cls.0.weight"], full.model.cls[0].weight)  # it moved
    resumed.train()
    _assert_same(full.model.state_dict(), resumed.model.state_dict())
    _assert_same(full.ema.ema.state_dict(), resumed.ema.ema.state_dict())
    assert full.ema.updates == resumed.ema.updates
    s_full, s_res = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert s_full["param_groups"] == s_res["param_groups"]
    for i, st in s_full["state"].items():
        assert torch.equal(st["momentum_buffer"], s_res["state"][i]["momentum_buffer"])
    assert (full.best_fitness, full.best_epoch) == (resumed.best_fitness, resumed.best_epoch)
    assert full.epoch_losses == resumed.epoch_losses


def test_resume_rejects_foreign_files(tmp_path):
    tr = build(tmp_path, seed=0)
    save_checkpoint({"model": tr.model.state_dict()}, tmp_path / "weights_only.pt")
    with pytest.raises(CheckpointError, match="weights_only.pt.*not a yolo_q training checkpoint"):
        tr.resume(tmp_path / "weights_only.pt")
    with pytest.raises(CheckpointError, match="missing.pt"):
        tr.resume(tmp_path / "missing.pt")
    other = tr.state_dict()
    other["model"] = {"cls.0.weight": torch.zeros(1)}
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt.*does not match"):
        tr.resume(tmp_path / "other.pt")


def test_real_model_loss_and_loader_resume(tmp_path):
    """YOLOv6-N (64 px), DetectionLoss and yolo_q.data.build_dataloader (seeded sampler): a run
    resumed after epoch 1 matches the uninterrupted one."""
    from yolo_q.data.loader import build_dataloader
    from yolo_q.losses.loss import DetectionLoss
    from yolo_q.models import build_model

    from engine_testutils import SyntheticBoxes

    def run(work_dir, resume_from=None, keep=False):
        cfg = make_cfg(["model.depth_multiple=0.2", "model.width_multiple=0.125"], epochs=2,
                       batch_size=2, nominal_batch=2, warmup_epochs=1)
        seed_everything(7 if resume_from else 0)
        model = build_model(cfg)
        loader = build_dataloader(SyntheticBoxes(4), batch_size=2, shuffle=True, workers=0, seed=3)
        hooks = default_hooks(cfg, None, work_dir)
        if keep:
            hooks.append(KeepEpochCheckpoints(work_dir / "weights"))
        tr = Trainer(model, build_optimizer(model, cfg), loader, DetectionLoss.from_config(cfg),
                     cfg, hooks=hooks, work_dir=work_dir)
        if resume_from:
            tr.resume(resume_from)
        tr.train()
        return tr

    full = run(tmp_path / "a", keep=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in full.epoch_losses.values())
    resumed = run(tmp_path / "b", resume_from=tmp_path / "a" / "weights" / "e0.pt")
    _assert_same(full.model.state_dict(), resumed.model.state_dict())
    _assert_same(full.ema.ema.state_dict(), resumed.ema.ema.state_dict())
