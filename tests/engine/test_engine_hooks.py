"""Hooks: EMA ramp, eval schedule, checkpoints (keys, weights_only, best), TensorBoard, progress."""
import io
import logging
import math
import sys

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from engine_testutils import TinyDetector, detection_loss, make_cfg, make_loader
from yolo_q.engine import (CheckpointHook, EMAHook, EvalHook, Hook, ModelEMA, ProgressHook,
                           TensorBoardHook, Trainer, WarmupLRHook, default_hooks, seed_everything)
from yolo_q.optim import build_optimizer


def make_trainer(cfg, hooks, n=16, work_dir=None):
    seed_everything(0)
    model = TinyDetector()
    return Trainer(model, build_optimizer(model, cfg), make_loader(n, cfg.train.batch_size),
                   detection_loss(), cfg, hooks=hooks, work_dir=work_dir)


# ----------------------------------------------------------------------------- EMA
def test_ema_decay_ramp():
    ema = ModelEMA(nn.Linear(2, 2), decay=0.9999, tau=2000)
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))  # ~5.0e-4
    assert ema.decay_at(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))  # ~0.632
    assert ema.decay_at(10 ** 6) == pytest.approx(0.9999)


@pytest.mark.parametrize("copy_buffers", [True, False])
def test_ema_update_by_hand(copy_buffers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, tau=1.0, copy_buffers=copy_buffers)
    w0, rm0 = model[0].weight.detach().clone(), model[1].running_mean.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the BN running stats
    w1, rm1 = model[0].weight.detach().clone(), model[1].running_mean.clone()
    for n in (1, 2):
        ema.update(model)
        d = 0.9 * (1 - math.exp(-n))
        w_exp = d * (w0 if n == 1 else w_prev) + (1 - d) * w1
        assert torch.allclose(ema.ema[0].weight, w_exp, atol=1e-6)
        w_prev = w_exp
        rm_exp = rm1 if copy_buffers else d * (rm0 if n == 1 else rm_prev) + (1 - d) * rm1
        assert torch.allclose(ema.ema[1].running_mean, rm_exp, atol=1e-6)
        rm_prev = rm_exp
    assert ema.updates == 2
    assert ema.ema[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 1
    assert not any(p.requires_grad for p in ema.ema.parameters())


def test_ema_hook_updates_once_per_optimizer_step():
    cfg = make_cfg(epochs=1, nominal_batch=8)  # accumulate 2 -> 2 steps for 4 iterations
    tr = make_trainer(cfg, [EMAHook(0.9999, 2000)])
    tr.train()
    assert tr.ema.updates == 2
    assert not torch.equal(tr.ema.ema.cls[0].weight, tr.model.cls[0].weight)


# ----------------------------------------------------------------------------- eval
def test_eval_schedule():
    hook = EvalHook(lambda m: {"map50_95": 0.0}, interval=3, final_epochs=3)
    hook.trainer = type("T", (), {"epochs": 10})()
    assert [e + 1 for e in range(10) if hook.should_eval(e)] == [3, 6, 8, 9, 10]
    hook.final_epochs = 0
    assert [e + 1 for e in range(10) if hook.should_eval(e)] == [3, 6, 9, 10]


def test_eval_hook_uses_ema_in_eval_mode_and_tracks_best():
    seen = []
    scores = iter([0.2, 0.5, 0.3])

    def evaluate(model):
        seen.append((model, model.training))
        return {"map50_95": next(scores), "map50": torch.tensor(0.7)}

    cfg = make_cfg(epochs=3)
    tr = make_trainer(cfg, [EMAHook(), EvalHook(evaluate, interval=1)])
    tr.train()
    assert all(m is tr.ema.ema and not training for m, training in seen) and len(seen) == 3
    assert tr.model.training  # the live model is back in train mode
    assert tr.best_fitness == 0.5 and tr.best_epoch == 1 and tr.metrics_epoch == 2
    assert tr.metrics == {"map50_95": 0.3, "map50": pytest.approx(0.7)}
    with pytest.raises(KeyError, match="map50_95"):
        make_trainer(make_cfg(epochs=1), [EvalHook(lambda m: {"map": 1.0})]).train()


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_contents_weights_only_and_best(tmp_path):
    scores = iter([0.2, 0.5, 0.3])
    cfg = make_cfg(epochs=3)
    hooks = default_hooks(cfg, lambda m: {"map50_95": next(scores), "map50": 0.9}, tmp_path)
    tr = make_trainer(cfg, hooks, work_dir=tmp_path)
    tr.train()
    last, best = tmp_path / "weights" / "last.pt", tmp_path / "weights" / "best.pt"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    for key in ("model", "ema", "ema_updates", "optimizer", "scaler", "hooks", "epoch",
                "iteration", "best_fitness", "metrics", "rng", "config"):
        assert key in ck, key
    assert ck["epoch"] == 2 and ck["iteration"] == 12 and ck["ema_updates"] == 12
    assert ck["best_fitness"] == 0.5 and ck["metrics"]["map50_95"] == 0.3
    assert set(ck["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert ck["config"] == OmegaConf.to_container(cfg, resolve=True)
    assert "WarmupLRHook" in ck["hooks"]
    for k, v in tr.model.state_dict().items():
        assert torch.equal(ck["model"][k], v), k
    for k, v in tr.ema.ema.state_dict().items():
        assert torch.equal(ck["ema"][k], v), k
    assert len(ck["optimizer"]["param_groups"]) == 3
    tr.checkpoint_extras["quant"] = {"num_bits": 8, "scales": (1, 2)}
    assert tr.state_dict()["quant"] == {"num_bits": 8, "scales": [1, 2]}
    tr.checkpoint_extras["model"] = {}
    with pytest.raises(KeyError, match="model"):
        tr.state_dict()
    b = torch.load(best, map_location="cpu", weights_only=True)
    assert b["epoch"] == 1 and b["metrics"]["map50_95"] == 0.5
    assert not list((tmp_path / "weights").glob(".*tmp"))  # no temp files left behind


def test_metrics_with_numpy_values_stay_weights_only(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = make_cfg(epochs=1)
    ev = EvalHook(lambda m: {"map50_95": np.float32(0.25), "per_class": np.array([0.1, 0.4])})
    tr = make_trainer(cfg, [ev, CheckpointHook(tmp_path)])
    tr.train()
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["metrics"]["map50_95"] == pytest.approx(0.25)
    assert torch.allclose(ck["metrics"]["per_class"], torch.tensor([0.1, 0.4], dtype=torch.float64))


# ----------------------------------------------------------------------------- logging
def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = make_cfg(epochs=2, log_interval=1)
    hooks = [WarmupLRHook(), EvalHook(lambda m: {"map50_95": 0.1, "map50": 0.3}),
             TensorBoardHook(tmp_path, interval=1)]
    make_trainer(cfg, hooks).train()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/cls", "train/iou", "lr/weight", "lr/bias", "epoch/cls",
                "val/map50", "val/map50_95"):
        assert tag in tags, tag
    lrs = [e.value for e in acc.Scalars("lr/bias")]
    assert lrs[0] == pytest.approx(0.1) and len(lrs) == 8  # warm-up starts at warmup_bias_lr
    assert [e.value for e in acc.Scalars("val/map50")] == pytest.approx([0.3, 0.3])


def test_progress_logs_when_not_a_tty(caplog):
    cfg = make_cfg(epochs=1)
    with caplog.at_level(logging.INFO, logger="yolo_q.engine"):
        make_trainer(cfg, [ProgressHook(enabled=True, interval=2), WarmupLRHook()]).train()
    text = caplog.text
    assert "epoch 1/1 iter 2/4" in text and "eta=" in text and "lr=" in text
    assert "epoch 1/1 done: cls=" in text


def test_progress_bar_on_a_terminal(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    make_trainer(make_cfg(epochs=1), [ProgressHook(enabled=True), WarmupLRHook()]).train()
    out = err.getvalue()
    assert "epoch 1/1" in out and "4/4" in out and "cls=" in out and "eta=" in out
    err2 = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err2)
    make_trainer(make_cfg(epochs=1), [ProgressHook(enabled=False)]).train()
    assert err2.getvalue() == ""  # the flag turns the bar off


def test_default_hooks_composition(tmp_path):
    names = lambda hs: [type(h).__name__ for h in hs]  # noqa: E731
    cfg = make_cfg(ema=True, tensorboard=True)
    assert names(default_hooks(cfg, lambda m: {}, tmp_path)) == [
        "ProgressHook", "WarmupLRHook", "EMAHook", "EvalHook", "CheckpointHook", "ResultsCSVHook",
        "TensorBoardHook"]
    assert names(default_hooks(make_cfg(ema=False), None, None)) == ["ProgressHook", "WarmupLRHook"]
    with pytest.raises(TypeError, match="Hook"):
        make_trainer(cfg, [object()])
    assert isinstance(default_hooks(cfg)[0], Hook)


def test_results_csv_rows_and_resume_append(tmp_path):
    from types import SimpleNamespace

    from yolo_q.engine.hooks import ResultsCSVHook, read_results_csv
    hook = ResultsCSVHook(tmp_path / "results.csv")
    tr = SimpleNamespace(is_main=True, epoch=0, epoch_losses={"cls": 1.5, "iou": 0.5}, lr=0.01,
                         total_bad_steps=0, metrics={}, metrics_epoch=-1)
    hook.trainer = tr
    hook.before_epoch()
    hook.after_epoch()
    tr.epoch, tr.metrics, tr.metrics_epoch = 1, {"map50_95": 0.25, "map50": 0.5}, 1
    ResultsCSVHook.__init__(hook, tmp_path / "results.csv")  # as after a resume: same file
    hook.after_epoch()
    rows = read_results_csv(tmp_path / "results.csv")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert rows[0]["map50_95"] is None and rows[1]["map50_95"] == 0.25
    assert rows[0]["cls"] == 1.5 and rows[1]["lr"] == 0.01
