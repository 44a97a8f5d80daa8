"""SGD/AdamW parameter groups: no weight decay on norm weights and biases, YOLOv6 decay scaling."""
import pytest
import torch
import torch.nn as nn

from yolo_q.config import load_config
from yolo_q.models import build_model
from yolo_q.optim import accumulate_steps, build_optimizer, param_groups


@pytest.fixture(scope="module")
def yolov6n():
    return build_model(load_config("configs/yolov6n.yaml"))


def _ids(params):
    return {id(p) for p in params}


def test_groups_partition_yolov6n(yolov6n):
    g = param_groups(yolov6n)
    trainable = [p for p in yolov6n.parameters() if p.requires_grad]
    ids = [id(p) for grp in g.values() for p in grp]
    assert len(ids) == len(set(ids)) == len(trainable)  # every trainable param exactly once
    assert id(yolov6n.detect.proj) not in set(ids)  # frozen DFL projection is left out
    bns = [m for m in yolov6n.modules() if isinstance(m, nn.BatchNorm2d)]
    assert _ids(g["norm"]) == _ids(m.weight for m in bns)
    biases = _ids(m.bias for m in yolov6n.modules()
                  if isinstance(getattr(m, "bias", None), nn.Parameter) and m.bias.requires_grad)
    assert _ids(g["bias"]) == biases
    assert all(p.ndim == 4 for p in g["weight"])  # conv kernels only in this model


def test_other_1d_params_get_no_decay():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.alpha = nn.Parameter(torch.ones(1))  # like BottleRep.alpha
            self.ln = nn.LayerNorm(4)

    m = M()
    g = param_groups(m)
    assert _ids(g["norm"]) == {id(m.alpha), id(m.ln.weight)}
    assert _ids(g["bias"]) == {id(m.conv.bias), id(m.ln.bias)}
    assert _ids(g["weight"]) == {id(m.conv.weight)}


@pytest.mark.parametrize("nominal,batch,world,acc", [(64, 16, 1, 4), (64, 24, 1, 3), (64, 16, 2, 2),
                                                     (64, 128, 1, 1), (64, 64, 4, 1)])
def test_accumulate_steps(nominal, batch, world, acc):
    assert accumulate_steps(nominal, batch, world) == acc


@pytest.mark.parametrize("batch,world,factor", [(16, 1, 1.0), (24, 1, 72 / 64), (128, 1, 2.0),
                                                (16, 2, 1.0)])
def test_weight_decay_scaling(yolov6n, batch, world, factor):
    cfg = load_config(None, [f"train.batch_size={batch}", "train.nominal_batch=64",
                             "train.weight_decay=0.0005"])
    opt = build_optimizer(yolov6n, cfg, world_size=world)
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd["norm"] == 0.0 and wd["bias"] == 0.0
    assert wd["weight"] == pytest.approx(0.0005 * factor, rel=1e-12)
    assert [g["name"] for g in opt.param_groups] == ["norm", "weight", "bias"]
    assert all(g["initial_lr"] == cfg.train.lr0 for g in opt.param_groups)


def test_sgd_step_decays_only_weights():
    """With zero gradients one nesterov SGD step changes only decayed weights:
    w <- w * (1 - lr * (1 + momentum) * wd); BN weights and biases stay exactly put."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
    nn.init.uniform_(m[1].weight, 0.5, 1.5)
    nn.init.uniform_(m[1].bias, -0.5, 0.5)
    cfg = load_config(None, ["train.batch_size=16", "train.nominal_batch=64", "train.lr0=0.1",
                             "train.momentum=0.9", "train.weight_decay=0.01"])
    opt = build_optimizer(m, cfg)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, v in m.named_parameters():
        if k == "0.weight":
            assert torch.allclose(v, before[k] * (1 - 0.1 * 1.9 * 0.01), rtol=0, atol=1e-7)
            assert not torch.equal(v, before[k])
        else:
            assert torch.equal(v, before[k]), k


def test_optim_group_attribute_makes_its_own_group():
    """A parameter with ``optim_group`` (QAT's learned ranges) leaves the three groups for its
    own, with lr0 * lr_ratio through the scheduler and no weight decay; a step with a unit
    gradient moves it by exactly that LR."""
    from yolo_q.optim import WarmupScheduler
    m = nn.Sequential(nn.Conv2d(3, 4, 3))
    m.s = nn.Parameter(torch.tensor(2.0))
    m.s.optim_group, m.s.lr_ratio = "quant_scale", 50.0
    cfg = load_config(None, ["train.lr0=0.001", "train.momentum=0.0", "train.nesterov=false",
                             "train.weight_decay=0.1"])
    opt = build_optimizer(m, cfg)
    g = {x["name"]: x for x in opt.param_groups}
    assert list(g) == ["norm", "weight", "bias", "quant_scale"] and g["quant_scale"]["params"] == [m.s]
    assert g["quant_scale"]["initial_lr"] == pytest.approx(0.05) and g["quant_scale"]["weight_decay"] == 0
    WarmupScheduler(opt, "cosine", 10, 0.01).step(0, 0)
    assert g["quant_scale"]["lr"] == pytest.approx(0.05) and g["weight"]["lr"] == pytest.approx(0.001)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert m.s.item() == pytest.approx(2.0 - 0.05)


def test_adamw_and_errors():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(m, load_config(None, ["train.optimizer=adamw", "train.momentum=0.9"]))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] > 0 for g in opt.param_groups] == [False, True, False]
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(m, load_config(None, ["train.optimizer=lion"]))
    with pytest.raises(ValueError, match="repopt"):
        build_optimizer(m, load_config(None, ["train.optimizer=sgd"]), grad_masks={1: 2})


def test_repopt_gets_groups_and_masks():
    from yolo_q.optim.repopt import RepOptimizer
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    cfg = load_config(None, ["train.optimizer=repopt", "train.weight_decay=0.0"])
    conv_w = m[0].weight
    opt = build_optimizer(m, cfg, grad_masks={conv_w: torch.zeros_like(conv_w)})
    assert isinstance(opt, RepOptimizer)
    assert [g["name"] for g in opt.param_groups] == ["norm", "weight", "bias"]
    before, bias_before = conv_w.detach().clone(), m[0].bias.detach().clone()
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(conv_w, before)  # masked to zero: the conv weight does not move
    t = cfg.train  # unmasked bias: one plain nesterov step, lr * (1 + momentum) * grad
    assert torch.allclose(m[0].bias, bias_before - t.lr0 * (1 + t.momentum))
