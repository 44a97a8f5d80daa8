"""VFL and DFL against hand formulas; DetectionLoss on hand-built outputs and on real models."""
import math

import pytest
import torch
from conftest import randomize_
from omegaconf import OmegaConf

from yolo_q.config import load_config
from yolo_q.losses import DetectionLoss, dfl_loss, varifocal_loss
from yolo_q.models import build_model, make_anchors


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- VFL / DFL
def test_varifocal_loss_hand_formula():
    logits = [[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]]  # anchor 0: positive of class 0, score 0.8
    scores = [[0.8, 0.0, 0.0], [0.0, 0.0, 0.0]]  # anchor 1: background
    labels = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    alpha, gamma = 0.75, 2.0
    expected = 0.0
    for xr, qr, lr in zip(logits, scores, labels):
        for x, q, lab in zip(xr, qr, lr):
            p = sigmoid(x)
            bce = -(q * math.log(p) + (1 - q) * math.log(1 - p))
            weight = alpha * p ** gamma * (1 - lab) + q * lab
            expected += bce * weight
    got = varifocal_loss(torch.tensor([logits]), torch.tensor([scores]), torch.tensor([labels]),
                         alpha, gamma)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_varifocal_loss_stable_for_large_logits():
    # bg logit +60 (p ~ 1): bce = 60 (+ log(1 + e^-60)), weight 0.75 * 1 -> 45
    # positive logit -60 with score 1: bce = 60, weight 1 -> 60
    got = varifocal_loss(torch.tensor([[60.0, -60.0]]), torch.tensor([[0.0, 1.0]]),
                         torch.tensor([[0.0, 1.0]]))
    assert got.item() == pytest.approx(45.0 + 60.0, rel=1e-6)


def test_dfl_hand_computation():
    bins = [0.1, 0.5, -0.3, 1.2, 0.0]  # reg_max = 4
    z = sum(math.exp(b) for b in bins)
    logp = [b - math.log(z) for b in bins]
    log_probs = torch.tensor([bins, bins]).log_softmax(-1)
    # target 2.3: left bin 2 with weight 3 - 2.3 = 0.7, right bin 3 with weight 0.3
    # target 1.0: left bin 1 with weight 1, right bin 2 with weight 0
    got = dfl_loss(log_probs, torch.tensor([2.3, 1.0]))
    assert got[0].item() == pytest.approx(-(0.7 * logp[2] + 0.3 * logp[3]), rel=1e-5)
    assert got[1].item() == pytest.approx(-logp[1], rel=1e-5)


# ----------------------------------------------------------------------------- hand-built outputs
def toy_outputs(use_dfl=False, reg_max=16):
    """One level, 4x4 grid, stride 8 (32x32 image), nc = 2, one gt (0,0,16,16) of class 0.

    Every anchor predicts exactly the gt (grid units: (0,0,2,2)), all logits 0 (p = 0.5). The
    positives are the anchors inside the gt, {0,1,4,5}, for TAL (IoU 1 everywhere -> equal
    alignment, normalized score 1) and for ATSS (all 9 candidates have anchor IoU 0.16 -> all pass,
    4 inside; target score = IoU(pred, gt) = 1). Hence S = 4 and
      cls = (4 positives * log 2 * weight 1 + 28 negatives * log 2 * 0.75 * 0.5^2) / 4
          = log 2 * (1 + 28 * 0.1875 / 4) = 2.3125 log 2;   iou = 0.
    With DFL, every positive distance is 0.5 or 1.5 grid units; two equal bins around it give
    that expectation, and DFL per side = -(0.5 log 0.5 + 0.5 log 0.5) = log 2 -> dfl = log 2.
    """
    points, _ = make_anchors([(4, 4)], [8])
    dist = torch.cat([points - 0.0, 2.0 - points], 1)  # (16, 4) distances to (0,0,2,2)
    if use_dfl:
        reg = torch.full((16, 4, reg_max + 1), -1e4)
        left = dist.clamp(0, reg_max - 1).floor().long()  # 0.5 -> bins 0,1; 1.5 -> bins 1,2
        reg.scatter_(-1, left[..., None], 0.0)
        reg.scatter_(-1, left[..., None] + 1, 0.0)
        reg = reg.reshape(1, 16, 4 * (reg_max + 1))
    else:
        reg = dist[None]
    feats = [torch.zeros(1, 1, 4, 4)]
    targets = torch.tensor([[0, 0, 0.0, 0.0, 16.0, 16.0]])
    return (feats, torch.zeros(1, 16, 2), reg), targets


@pytest.mark.parametrize("assigner", ["tal", "atss"])
@pytest.mark.parametrize("iou_type", ["giou", "ciou", "siou"])
def test_detection_loss_hand_case(assigner, iou_type):
    outputs, targets = toy_outputs()
    loss = DetectionLoss(dict(assigner=assigner, iou_type=iou_type), nc=2, strides=(8,))
    total, parts = loss(outputs, targets)
    assert parts["cls"].item() == pytest.approx(2.3125 * math.log(2), rel=1e-5)
    assert abs(parts["iou"].item()) < 1e-5 and parts["dfl"].item() == 0.0
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)


def test_detection_loss_hand_case_dfl():
    outputs, targets = toy_outputs(use_dfl=True)
    loss = DetectionLoss(None, nc=2, strides=(8,), use_dfl=True, reg_max=16)
    total, parts = loss(outputs, targets)
    assert parts["cls"].item() == pytest.approx(2.3125 * math.log(2), rel=1e-5)
    assert abs(parts["iou"].item()) < 1e-5
    assert parts["dfl"].item() == pytest.approx(0.5 * math.log(2), rel=1e-5)  # dfl_weight 0.5


def random_outputs(bs=2, nc=3, img=64, seed=0, use_dfl=False, reg_max=16):
    g = torch.Generator().manual_seed(seed)
    shapes = [(img // s, img // s) for s in (8, 16, 32)]
    n = sum(h * w for h, w in shapes)
    feats = [torch.zeros(bs, 1, h, w) for h, w in shapes]
    cls = torch.randn(bs, n, nc, generator=g) - 2
    reg = torch.rand(bs, n, 4, generator=g) * 3 + 0.5  # distances, grid units
    if use_dfl:  # bin logits peaked around those distances
        bins = torch.arange(reg_max + 1, dtype=torch.float32)
        reg = (-2 * (bins - reg[..., None]).square()).reshape(bs, n, 4 * (reg_max + 1))
    return feats, cls, reg


TARGETS = torch.tensor([[0, 1, 4.0, 6.0, 40.0, 30.0], [0, 2, 30.0, 20.0, 60.0, 62.0],
                        [1, 0, 10.0, 10.0, 26.0, 50.0]])


@pytest.mark.parametrize("use_dfl", [False, True])
def test_invariant_to_target_order_and_batch_duplication(use_dfl):
    feats, cls, reg = random_outputs(use_dfl=use_dfl)
    loss = DetectionLoss(None, nc=3, use_dfl=use_dfl)
    total, parts = loss((feats, cls, reg), TARGETS)
    shuffled, _ = loss((feats, cls, reg), TARGETS[[2, 0, 1]])
    assert torch.allclose(total, shuffled)
    # per-batch normalization: the same batch twice (targets duplicated) gives the same loss
    # (holds while the total target score S exceeds 1, below which S is clamped to 1)
    feats2 = [torch.cat([f, f]) for f in feats]
    t2 = torch.cat([TARGETS, TARGETS + torch.tensor([2.0, 0, 0, 0, 0, 0])])
    total2, parts2 = loss((feats2, torch.cat([cls, cls]), torch.cat([reg, reg])), t2)
    assert torch.allclose(total, total2, rtol=1e-5)
    for k in parts:
        assert torch.allclose(parts[k], parts2[k], rtol=1e-5, atol=1e-7)


def test_atss_warmup_then_tal():
    feats, cls, reg = random_outputs()
    warm = DetectionLoss(dict(atss_warmup_epochs=2), nc=3)
    atss = DetectionLoss(dict(assigner="atss"), nc=3)
    tal = DetectionLoss(dict(assigner="tal"), nc=3)
    out = (feats, cls, reg)
    assert torch.equal(warm(out, TARGETS, epoch=1)[0], atss(out, TARGETS, epoch=1)[0])
    assert torch.equal(warm(out, TARGETS, epoch=2)[0], tal(out, TARGETS, epoch=2)[0])
    assert not torch.equal(atss(out, TARGETS)[0], tal(out, TARGETS)[0])
    assert torch.equal(atss(out, TARGETS, epoch=5)[0], atss(out, TARGETS, epoch=0)[0])


def test_autocast_bf16_runs_in_float32():
    feats, cls, reg = random_outputs()
    loss = DetectionLoss(None, nc=3)
    ref, _ = loss((feats, cls.bfloat16().float(), reg.bfloat16().float()), TARGETS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, parts = loss((feats, cls.bfloat16(), reg.bfloat16()), TARGETS)
    assert got.dtype == torch.float32 and parts["cls"].dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-6)


def test_bad_inputs_name_the_problem():
    feats, cls, reg = random_outputs()
    loss = DetectionLoss(None, nc=3)
    with pytest.raises(ValueError, match="class ids"):
        loss((feats, cls, reg), torch.tensor([[0, 3, 0.0, 0.0, 8.0, 8.0]]))
    with pytest.raises(ValueError, match="batch_idx"):
        loss((feats, cls, reg), torch.tensor([[2, 0, 0.0, 0.0, 8.0, 8.0]]))
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        loss((feats, cls, reg), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="use_dfl"):
        DetectionLoss(None, nc=3, use_dfl=True)((feats, cls, reg), TARGETS)
    with pytest.raises(ValueError, match="train.loss.assigner"):
        DetectionLoss(dict(assigner="simota"), nc=3)
    with pytest.raises(ValueError, match="train.loss.iou_type"):
        DetectionLoss(dict(iou_type="eiou"), nc=3)


def test_from_config_follows_head_use_dfl():
    cfg = load_config("configs/yolov6m.yaml", ["model.nc=7"])
    loss = DetectionLoss.from_config(cfg)
    assert loss.use_dfl and loss.reg_max == 16 and loss.nc == 7 and loss.iou_type == "giou"
    assert (loss.cls_weight, loss.iou_weight, loss.dfl_weight) == (1.0, 2.5, 0.5)
    cfg.train.loss.use_dfl = False
    assert not DetectionLoss.from_config(cfg).use_dfl
    cfg_n = load_config("configs/yolov6n.yaml", ["train.loss.assigner=atss"])
    loss_n = DetectionLoss.from_config(cfg_n)
    assert not loss_n.use_dfl and loss_n.iou_type == "siou" and loss_n.assigner == "atss"
    assert OmegaConf.is_config(cfg_n.train.loss)


# ----------------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def n_model():
    torch.manual_seed(0)
    cfg = load_config("configs/yolov6n.yaml", ["model.nc=4", "model.width_multiple=0.25"])
    # random weights everywhere: a fresh head has zero prediction weights, which would stop the
    # gradient from reaching the backbone
    return cfg, randomize_(build_model(cfg)).train()


IMG_TARGETS = torch.tensor([[0, 1, 10.0, 20.0, 60.0, 90.0], [0, 2, 70.0, 70.0, 120.0, 110.0],
                            [1, 3, 30.0, 30.0, 50.0, 60.0]])


def test_real_model_loss_finite_and_backward(n_model):
    cfg, model = n_model
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    outputs = model(x)
    losses = {}
    for assigner in ("tal", "atss"):
        for iou_type in ("giou", "ciou", "siou"):
            fn = DetectionLoss(dict(assigner=assigner, iou_type=iou_type), nc=4)
            total, parts = fn(outputs, IMG_TARGETS)
            assert torch.isfinite(total) and total.item() > 0 and total.ndim == 0
            assert all(not v.requires_grad for v in parts.values()) and parts["dfl"].item() == 0
            losses[assigner, iou_type] = total
    losses["tal", "siou"].backward()
    params = dict(model.named_parameters())
    first_backbone = next(n for n, _ in model.named_parameters() if n.startswith("backbone."))
    for name in ("detect.cls_preds.2.weight", "detect.reg_preds.0.weight", first_backbone):
        g = params[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_real_model_empty_targets(n_model):
    cfg, model = n_model
    model.zero_grad()
    outputs = model(torch.rand(2, 3, 128, 128))
    for assigner in ("tal", "atss"):
        total, parts = DetectionLoss.from_config(
            load_config("configs/yolov6n.yaml", ["model.nc=4", f"train.loss.assigner={assigner}"])
        )(outputs, torch.zeros(0, 6))
        assert torch.isfinite(total) and parts["iou"].item() == 0 and parts["dfl"].item() == 0
        assert total.item() == pytest.approx(parts["cls"].item())
    total.backward()
    g = model.detect.cls_preds[0].weight.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_overfit_one_image_reduces_loss(n_model):
    """30 SGD steps on one fixed image and box. The backbone and neck run once (fixed features);
    the head is trained, so the test checks that the loss gradients teach the head to detect."""
    cfg, model = n_model
    torch.manual_seed(0)
    head = build_model(cfg).detect.train()  # fresh head (the fixture's model is shared)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 0.2
    x[:, :, 40:100, 30:90] = 0.8
    targets = torch.tensor([[0, 2, 30.0, 40.0, 90.0, 100.0], [1, 2, 30.0, 40.0, 90.0, 100.0]])
    with torch.no_grad():
        feats = [f.detach() for f in model.forward_features(x)]
    loss_fn = DetectionLoss.from_config(cfg)
    opt = torch.optim.SGD(head.parameters(), lr=0.005, momentum=0.9)
    history = []
    for _ in range(30):
        total, _ = loss_fn(head(feats), targets)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    first, last = history[0], sum(history[-5:]) / 5  # measured: last ~ 0.17 * first
    assert last < 0.4 * first, history


def test_dfl_head_model_trains():
    """yolov6m-style head (CSP backbone/neck, DFL with reg_max 16) at small width."""
    torch.manual_seed(0)
    cfg = load_config("configs/yolov6m.yaml", ["model.nc=4", "model.width_multiple=0.125",
                                               "model.depth_multiple=0.33"])
    model = build_model(cfg).train()
    loss_fn = DetectionLoss.from_config(cfg)
    assert loss_fn.use_dfl
    outputs = model(torch.rand(2, 3, 128, 128))
    assert outputs[2].shape[-1] == 4 * 17
    total, parts = loss_fn(outputs, IMG_TARGETS)
    assert torch.isfinite(total) and parts["dfl"].item() > 0
    total.backward()
    g = model.detect.reg_preds[0].weight.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    total0, parts0 = loss_fn(outputs, torch.zeros(0, 6))
    assert torch.isfinite(total0) and parts0["dfl"].item() == 0
