"""IoU family on hand-computed boxes (the arithmetic is written out next to each expectation)."""
import math

import pytest
import torch

from yolo_q.losses import IoULoss, bbox_iou, box_iou


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# Case A: pred (0,0,2,2), target (1,1,3,3).
#   inter = 1*1 = 1, union = 4 + 4 - 1 = 7, IoU = 1/7; enclosing box (0,0,3,3): C = 9.
#   centres (1,1), (2,2): dx = dy = 1, rho^2 = 2; enclosing diagonal c^2 = 3^2 + 3^2 = 18; both
#   square -> v = 0. SIoU: Lambda = 1 - 2 sin^2(asin(1/sqrt2) - pi/4) = 1, gamma = 2 - 1 = 1,
#   rho_x = rho_y = (1/3)^2, Delta = 2 - 2 exp(-1/9), equal shapes -> Omega = 0.
A_P, A_T = t(0, 0, 2, 2), t(1, 1, 3, 3)
A_IOU = 1 / 7
A_EXPECTED = {
    "iou": A_IOU,
    "giou": A_IOU - (9 - 7) / 9,
    "ciou": A_IOU - 2 / 18,
    "siou": A_IOU - 0.5 * (2 - 2 * math.exp(-1 / 9)),
}

# Case B: pred (0,0,4,2), target (0,0,2,2).
#   inter = 2*2 = 4, union = 8 + 4 - 4 = 8, IoU = 0.5; enclosing (0,0,4,2) = pred: C = 8
#   -> GIoU 0.5.
#   centres (2,1), (1,1): rho^2 = 1, c^2 = 4^2 + 2^2 = 20; v = 4/pi^2 (atan(2/2) - atan(4/2))^2,
#   a = v / (1 - 0.5 + v). SIoU: dx = 1, dy = 0 -> Lambda = 0, gamma = 2; rho_x = (1/4)^2,
#   rho_y = 0:
#   Delta = 1 - exp(-2/16); omega_w = |4-2|/4 = 0.5, omega_h = 0: Omega = (1 - exp(-0.5))^4.
B_P, B_T = t(0, 0, 4, 2), t(0, 0, 2, 2)
_v = 4 / math.pi ** 2 * (math.atan(1.0) - math.atan(2.0)) ** 2
B_EXPECTED = {
    "iou": 0.5,
    "giou": 0.5,
    "ciou": 0.5 - 1 / 20 - _v / (1 - 0.5 + _v) * _v,
    "siou": 0.5 - 0.5 * ((1 - math.exp(-2 / 16)) + (1 - math.exp(-0.5)) ** 4),
}

# Case C (disjoint, oblique): pred (0,0,2,2), target (3,1,5,3).
#   inter = 0 -> IoU 0; union = 8; enclosing (0,0,5,3): C = 15 -> GIoU = -(15 - 8)/15.
#   centres (1,1), (4,2): dx = 3, dy = 1, rho^2 = 10, c^2 = 25 + 9 = 34, same shape -> v = 0.
#   SIoU (paper form): alpha = asin(dy / sqrt(10)) < pi/4, Lambda = 1 - 2 sin^2(alpha - pi/4);
#   gamma = 2 - Lambda; rho_x = (3/5)^2, rho_y = (1/3)^2; Omega = 0.
C_P, C_T = t(0, 0, 2, 2), t(3, 1, 5, 3)
_lam = 1 - 2 * math.sin(math.asin(1 / math.sqrt(10)) - math.pi / 4) ** 2  # = 0.6
_gam = 2 - _lam
C_EXPECTED = {
    "iou": 0.0,
    "giou": -7 / 15,
    "ciou": -10 / 34,
    "siou": -0.5 * (2 - math.exp(-_gam * 0.36) - math.exp(-_gam / 9)),
}


@pytest.mark.parametrize("iou_type", ["iou", "giou", "ciou", "siou"])
@pytest.mark.parametrize("pred,target,expected", [(A_P, A_T, A_EXPECTED), (B_P, B_T, B_EXPECTED),
                                                  (C_P, C_T, C_EXPECTED)])
def test_bbox_iou_hand_computed(iou_type, pred, target, expected):
    got = bbox_iou(pred, target, iou_type, eps=1e-12)
    assert got.item() == pytest.approx(expected[iou_type], abs=1e-9)
    loss = IoULoss(iou_type)(pred.float(), target.float())
    assert loss.item() == pytest.approx(1 - expected[iou_type], abs=1e-5)


def test_siou_angle_closed_form():
    assert _lam == pytest.approx(2 * 3 * 1 / (3 ** 2 + 1 ** 2))  # 2|dx||dy| / (dx^2 + dy^2)


@pytest.mark.parametrize("iou_type", ["iou", "giou", "ciou", "siou"])
def test_identical_boxes_and_batching(iou_type):
    boxes = t([0, 0, 2, 2], [1, 1, 3, 3], [5, 2, 9, 12])
    same = bbox_iou(boxes, boxes, iou_type, eps=1e-12)
    assert torch.allclose(same, torch.ones(3, dtype=boxes.dtype))
    # elementwise over leading dims: (2, 3, 4) -> (2, 3), each entry equal to the 1-D call
    p = torch.stack([torch.stack([A_P, B_P, C_P]), torch.stack([C_P, A_P, B_P])])
    q = torch.stack([torch.stack([A_T, B_T, C_T]), torch.stack([C_T, A_T, B_T])])
    got = bbox_iou(p, q, iou_type, eps=1e-12)
    exp = [[A_EXPECTED, B_EXPECTED, C_EXPECTED], [C_EXPECTED, A_EXPECTED, B_EXPECTED]]
    assert got.shape == (2, 3)
    assert torch.allclose(got, torch.tensor([[e[iou_type] for e in row] for row in exp],
                                            dtype=got.dtype), atol=1e-9)


@pytest.mark.parametrize("iou_type", ["iou", "giou", "siou"])
def test_gradients_match_finite_differences(iou_type):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g, dtype=torch.float64) * 10
    p = torch.cat([xy, xy + 1 + torch.rand(6, 2, generator=g, dtype=torch.float64) * 5], 1)
    q = p + torch.randn(6, 4, generator=g, dtype=torch.float64)  # still valid boxes, overlapping
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: bbox_iou(a, q, iou_type, eps=1e-12), (p,))


def test_ciou_alpha_not_differentiated():
    """Autograd of CIoU equals a central difference of IoU - rho^2/c^2 - a*v with a frozen."""
    base = t(0.3, -0.2, 4.1, 2.5)  # off every kink of min/max against the target (0,0,2,2)
    p = base.clone().requires_grad_(True)
    bbox_iou(p, B_T, "ciou", eps=1e-12).backward()

    def terms(box):  # target centre (1,1), w/h = 1; enclosing box written out
        px1, py1, px2, py2 = box.tolist()
        rho2 = ((px1 + px2) / 2 - 1) ** 2 + ((py1 + py2) / 2 - 1) ** 2
        c2 = (max(px2, 2) - min(px1, 0)) ** 2 + (max(py2, 2) - min(py1, 0)) ** 2
        v = 4 / math.pi ** 2 * (math.atan(1.0) - math.atan((px2 - px1) / (py2 - py1))) ** 2
        return bbox_iou(box, B_T, "iou", eps=1e-12).item(), rho2 / c2, v

    iou0, _, v0 = terms(base)
    a_frozen = v0 / (1 - iou0 + v0)

    def f(box):
        iou, d, v = terms(box)
        return iou - d - a_frozen * v

    h = 1e-6
    for i in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[i] = h
        assert p.grad[i].item() == pytest.approx((f(base + e) - f(base - e)) / (2 * h), abs=1e-6)


def test_box_iou_pairwise():
    a = t([0, 0, 2, 2], [0, 0, 4, 2])
    b = t([1, 1, 3, 3], [0, 0, 2, 2], [10, 10, 11, 11], [1, 1, 1, 5])  # last: zero width
    # rows: a0 vs b = [1/7, 1, 0, 0]; a1 (area 8) vs b1 (1,1,3,3): inter 2*1 = 2, union 8+4-2 = 10
    exp = torch.tensor([[1 / 7, 1.0, 0.0, 0.0], [2 / 10, 4 / 8, 0.0, 0.0]], dtype=torch.float64)
    got = box_iou(a, b, eps=0.0 + 1e-12)
    assert got.shape == (2, 4)
    assert torch.allclose(got, exp, atol=1e-9)
    # batched with broadcasting: (2, 2, 4) x (4, 4) -> (2, 2, 4)
    got_b = box_iou(torch.stack([a, a.flip(0)]), b, eps=1e-12)
    assert torch.allclose(got_b[0], exp) and torch.allclose(got_b[1], exp.flip(0))
    # agrees with the elementwise IoU on the matched pairs
    assert torch.allclose(box_iou(a, a, eps=1e-12).diagonal(), bbox_iou(a, a, "iou", eps=1e-12))


def test_iou_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="train.loss.iou_type"):
        IoULoss("diou2")
