"""Warm-up + per-epoch LR schedule, checked against hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from yolo_q.optim import WarmupScheduler, lr_factor, warmup_iterations


def _opt(kind="sgd", lr=0.01):
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    groups = [dict(params=[p], name=n) for p, n in zip(params, ("norm", "weight", "bias"))]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.937, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def _sched(opt, kind="cosine", epochs=10, warmup=10):
    return WarmupScheduler(opt, kind, epochs, lrf=0.01, warmup_iters=warmup, warmup_bias_lr=0.1,
                           warmup_momentum=0.8, momentum=0.937)


def test_epoch_factors_by_hand():
    cos, lin, const = (lr_factor(k, 10, 0.01) for k in ("cosine", "linear", "constant"))
    assert cos(0) == pytest.approx(1.0) and cos(10) == pytest.approx(0.01)
    assert cos(5) == pytest.approx(0.505)
    assert cos(2) == pytest.approx(1 - 0.99 * (1 - math.cos(0.2 * math.pi)) / 2)  # 0.905463
    assert cos(2) == pytest.approx(0.9054634, abs=1e-7)
    assert lin(2) == pytest.approx(0.802) and lin(10) == pytest.approx(0.01)
    assert const(7) == 1.0
    with pytest.raises(ValueError, match="train.scheduler"):
        lr_factor("step", 10, 0.01)


def test_warmup_iterations():
    assert warmup_iterations(3.0, 100, 1000) == 1000
    assert warmup_iterations(3.0, 500, 1000) == 1500
    assert warmup_iterations(0.5, 7, 0) == 4  # round(3.5) (banker's) -> 4
    assert warmup_iterations(0.0, 500, 1000) == 0  # 0 epochs disables warm-up


def test_warmup_values_by_hand():
    opt = _opt()
    s = _sched(opt)
    s.step(0, 0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.1]
    assert all(g["momentum"] == pytest.approx(0.8) for g in opt.param_groups)
    s.step(5, 0)  # half-way: bias 0.1 -> 0.01, others 0 -> 0.01
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.005, 0.005, 0.055])
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8685)
    s.step(5, 2)  # warm-up targets follow the epoch factor
    f2 = lr_factor("cosine", 10, 0.01)(2)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * 0.01 * f2)
    assert opt.param_groups[2]["lr"] == pytest.approx(0.1 + (0.01 * f2 - 0.1) * 0.5)
    s.step(10, 3)  # after warm-up: lr0 * factor(epoch), final momentum
    f3 = lr_factor("cosine", 10, 0.01)(3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * f3] * 3)
    assert all(g["momentum"] == pytest.approx(0.937) for g in opt.param_groups)


def test_no_warmup_and_adamw():
    opt = _opt("adamw")
    s = _sched(opt, "linear", warmup=0)
    s.step(0, 4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * (1 - 0.99 * 0.4)] * 3)
    assert "momentum" not in opt.param_groups[0]  # AdamW: only the LR is scheduled


def test_state_dict_round_trip():
    opt = _opt()
    s = _sched(opt, warmup=17)
    s.step(3, 1)
    s2 = _sched(_opt(), warmup=5)
    s2.load_state_dict(s.state_dict())
    assert s2.warmup_iters == 17 and s2.last == (3, 1)
    assert s2.values(3, 1) == s.values(3, 1)


def test_warmup_accumulate_ramps_like_yolov6():
    """The accumulation count is round(interp(it, [0, W], [1, nominal/batch])), >= 1, and the
    nominal count from the end of the warm-up on (W = 8, nominal 16 / batch 4)."""
    from yolo_q.optim import warmup_accumulate
    got = [warmup_accumulate(i, 8, 4.0, 4) for i in range(12)]
    want = [max(1, int(np.interp(i, [0, 8], [1, 4]).round())) if i < 8 else 4 for i in range(12)]
    assert got == want == [1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4, 4]
    assert [warmup_accumulate(i, 0, 4.0, 4) for i in range(3)] == [4, 4, 4]  # no warm-up
    assert warmup_accumulate(5, 10, 1.5, 2) == 1 and warmup_accumulate(10, 10, 1.5, 2) == 2
