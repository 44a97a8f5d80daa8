"""TAL and ATSS on toy grids with the expected positive anchors worked out by hand.

Toy grid: one level, 4x4, stride 8 (a 32x32 image). Anchor centres (pixels) are (4 + 8j, 4 + 8i)
and anchor index = 4*i + j (row-major, y then x):

     idx:  0  1  2  3        x = 4, 12, 20, 28
           4  5  6  7        y = 4 (row 0), 12, 20, 28
           8  9 10 11
          12 13 14 15
"""
import statistics

import pytest
import torch

from yolo_q.losses import ATSSAssigner, TaskAlignedAssigner
from yolo_q.models import make_anchors

POINTS = make_anchors([(4, 4)], [8])[0] * 8  # (16, 2) pixels


def centred_boxes(size: float) -> torch.Tensor:
    """A size x size box centred on every anchor, (16, 4)."""
    return torch.cat([POINTS - size / 2, POINTS + size / 2], 1)


def fg_set(mask_row):
    return set(torch.nonzero(mask_row).flatten().tolist())


# gt A = (0,0,16,16) contains centres x in {4,12}, y in {4,12}   -> anchors {0, 1, 4, 5}
# gt B = (8,0,24,16) contains centres x in {12,20}, y in {4,12}  -> anchors {1, 2, 5, 6}
GT_A, GT_B = [0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0]
R = 144 / 368  # IoU of a 16x16 box centred on an inside anchor with A (or B), see below


def tal_inputs():
    """pd boxes: anchors 1 and 5 predict B exactly; anchor 8 (centre (4,20), outside A) predicts A
    exactly; every other anchor predicts a 16x16 box centred on itself.

    IoUs: anchor 0 box (-4,-4,12,12) vs A: inter 12*12 = 144, union 256+256-144 = 368 -> R;
    anchor 4 (-4,4,12,20) vs A: 12*12 -> R; anchors 2 (12,-4,28,12) and 6 (12,4,28,20) vs B -> R;
    anchors 1, 5 (box = B) vs B: 1, vs A: inter 8*16 = 128, union 384 -> 1/3.
    """
    pd = centred_boxes(16.0)
    pd[[1, 5]] = torch.tensor(GT_B)
    pd[8] = torch.tensor(GT_A)
    scores = torch.full((1, 16, 3), 0.5)
    scores[0, 8] = 0.99
    gt_boxes = torch.tensor([[GT_A, GT_B]])
    gt_labels = torch.tensor([[1, 2]])
    mask = torch.tensor([[True, True]])
    return scores, pd[None], gt_labels, gt_boxes, mask


def test_tal_toy_grid_assignment_and_normalization():
    scores, pd, gt_labels, gt_boxes, mask = tal_inputs()
    res = TaskAlignedAssigner(nc=3, topk=13)(scores, pd, POINTS, gt_labels, gt_boxes, mask)
    # topk (13) exceeds the 4 anchors inside each gt -> A claims {0,1,4,5}, B claims {1,2,5,6};
    # 1 and 5 are claimed twice and go to B (IoU 1 > 1/3). Anchor 8 (outside A) is never used.
    assert fg_set(res.fg_mask[0]) == {0, 1, 2, 4, 5, 6}
    exp_labels = torch.full((16,), 3)
    exp_labels[[0, 4]] = 1
    exp_labels[[1, 2, 5, 6]] = 2
    assert torch.equal(res.labels[0], exp_labels)
    assert torch.equal(res.gt_idx[0][[0, 4, 1, 2, 5, 6]], torch.tensor([0, 0, 1, 1, 1, 1]))
    assert torch.equal(res.boxes[0, 0], torch.tensor(GT_A))
    assert torch.equal(res.boxes[0, 6], torch.tensor(GT_B))
    assert torch.all(res.boxes[0, 3] == 0)
    # normalized alignment t * max_iou / max_t with t = 0.5 * IoU^6 (scores 0.5):
    #   gt A, positives {0, 4}: both t = 0.5 R^6 -> norm = R
    #   gt B, positives {1,2,5,6}: max_t = 0.5 (IoU 1), max_iou = 1 -> anchors 1, 5: 1; 2, 6: R^6
    exp = torch.zeros(16, 3)
    exp[[0, 4], 1] = R
    exp[[1, 5], 2] = 1.0
    exp[[2, 6], 2] = R ** 6
    assert torch.allclose(res.scores[0], exp, atol=1e-6)


def test_tal_topk_picks_best_aligned_anchor_inside_gt():
    scores, pd, gt_labels, gt_boxes, mask = tal_inputs()
    scores[0, 4, 1] = 0.9  # A: anchors 0 and 4 tie on IoU (R); the higher score decides -> 4
    scores[0, 5, 2] = 0.9  # B: anchors 1 and 5 tie on IoU (1) -> 5
    # anchor 8 has score 0.99 and a perfect box for A but its centre (4,20) is outside A
    res = TaskAlignedAssigner(nc=3, topk=1)(scores, pd, POINTS, gt_labels, gt_boxes, mask)
    assert fg_set(res.fg_mask[0]) == {4, 5}
    assert res.labels[0, 4] == 1 and res.labels[0, 5] == 2
    # a single positive per gt: norm = t * max_iou / t = its IoU
    assert res.scores[0, 4, 1].item() == pytest.approx(R, abs=1e-6)
    assert res.scores[0, 5, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert res.scores[0].sum().item() == pytest.approx(R + 1.0, abs=1e-6)


def test_tal_padding_empty_images_and_empty_batch():
    scores, pd, gt_labels, gt_boxes, mask = tal_inputs()
    # image 1: same predictions, no gt (one padded row with a garbage box, masked out)
    scores2, pd2 = torch.cat([scores, scores]), torch.cat([pd, pd])
    gt_labels2 = torch.tensor([[1, 2], [2, 0]])
    gt_boxes2 = torch.tensor([[GT_A, GT_B], [GT_A, [0.0, 0.0, 0.0, 0.0]]])
    mask2 = torch.tensor([[True, True], [False, False]])
    tal = TaskAlignedAssigner(nc=3, topk=13)
    res = tal(scores2, pd2, POINTS, gt_labels2, gt_boxes2, mask2)
    single = tal(scores, pd, POINTS, gt_labels, gt_boxes, mask)
    assert torch.equal(res.fg_mask[0], single.fg_mask[0])
    assert torch.allclose(res.scores[0], single.scores[0])
    assert not res.fg_mask[1].any()
    assert torch.all(res.labels[1] == 3) and torch.all(res.scores[1] == 0)
    # no gt in the whole batch: G = 0
    res0 = tal(scores2, pd2, POINTS, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4),
               torch.zeros(2, 0, dtype=torch.bool))
    assert res0.scores.shape == (2, 16, 3) and not res0.fg_mask.any()
    assert torch.all(res0.labels == 3)


def test_atss_toy_grid_threshold():
    """Anchor boxes 16x16 (grid_cell_size 2) on the 4x4 grid; gt (0,0,30,14), class 0, topk 6.

    Centre (15,7); squared distances: a1 (12,4): 18, a2 (20,4): 34, a5 (12,12): 34,
    a6 (20,12): 50, a0 (4,4): 130, a4 (4,12): 146, next a3/a9: 178 -> candidates {1,2,5,6,0,4}.
    IoUs with the gt (area 30*14 = 420, anchor area 256):
      a1 (4,-4,20,12): inter 16*12 = 192, union 484     a2 (12,-4,28,12): 192 / 484
      a5 (4,4,20,20):  inter 16*10 = 160, union 516     a6 (12,4,28,20):  160 / 516
      a0 (-4,-4,12,12): inter 12*12 = 144, union 532    a4 (-4,4,12,20):  12*10 = 120 / 556
    threshold = mean + stdev (unbiased) ~ 0.3166 + 0.0710 = 0.3876 -> only a1, a2 pass; both
    centres lie inside the gt.
    """
    ious = [192 / 484, 192 / 484, 160 / 516, 160 / 516, 144 / 532, 120 / 556]
    thr = statistics.mean(ious) + statistics.stdev(ious)
    assert 160 / 516 < thr < 192 / 484
    anchors = centred_boxes(16.0)
    gt_boxes = torch.tensor([[[0.0, 0.0, 30.0, 14.0]]])
    pd = centred_boxes(16.0)[None].clone()
    pd[0, 1] = gt_boxes[0, 0]  # IoU 1
    pd[0, 2] = torch.tensor([0.0, 0.0, 15.0, 14.0])  # inter 15*14 = 210, union 420 -> 0.5
    atss = ATSSAssigner(nc=2, topk=6)
    res = atss(anchors, [16], torch.tensor([[0]]), gt_boxes, torch.tensor([[True]]), pd)
    assert fg_set(res.fg_mask[0]) == {1, 2}
    assert res.labels[0, 1] == 0 and res.labels[0, 2] == 0 and res.labels[0, 0] == 2
    exp = torch.zeros(16, 2)
    exp[1, 0], exp[2, 0] = 1.0, 0.5
    assert torch.allclose(res.scores[0], exp, atol=1e-6)
    hard = atss(anchors, [16], torch.tensor([[0]]), gt_boxes, torch.tensor([[True]]), None)
    assert torch.equal(hard.fg_mask, res.fg_mask) and hard.scores[0, 2, 0] == 1.0


def test_atss_two_levels_tied_candidates():
    """Level 0: 4x4 stride 8 (anchor boxes 40x40), level 1: 2x2 stride 16 (80x80); gt = the whole
    32x32 image, topk 9 (level 1 has only 4 anchors -> all 4 taken).

    Level 0 distances from (16,16): the 4 central anchors (d^2 32), then 8 anchors tied at d^2 160
    of which 5 are taken; by symmetry all 8 have the same IoU, so the result does not depend on the
    tie. IoUs (gt area 1024, anchor 1600):
      central, e.g. (12,12): box (-8,-8,32,32) contains the gt -> 1024/1600 = 0.64
      ring, e.g. (12,4): box (-8,-16,32,24): inter 32*24 = 768, union 1856 -> 0.41379
      level 1, e.g. (8,8): box (-32,-32,48,48) contains the gt -> 1024/6400 = 0.16
    threshold ~ 0.4053 + 0.1961 = 0.6014 -> positives: the 4 central level-0 anchors {5,6,9,10}.
    """
    ious = [0.64] * 4 + [768 / 1856] * 5 + [0.16] * 4
    thr = statistics.mean(ious) + statistics.stdev(ious)
    assert 768 / 1856 < thr < 0.64
    points, strides = make_anchors([(4, 4), (2, 2)], [8, 16])
    px = points * strides
    anchors = torch.cat([px - 2.5 * strides, px + 2.5 * strides], 1)
    gt_boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0]], [[0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True], [False]])
    res = ATSSAssigner(nc=1, topk=9)(anchors, [16, 4], torch.zeros(2, 1, dtype=torch.long),
                                     gt_boxes, mask, None)
    assert fg_set(res.fg_mask[0]) == {5, 6, 9, 10}
    assert not res.fg_mask[1].any()
    empty = ATSSAssigner(nc=1)(anchors, [16, 4], torch.zeros(2, 0, dtype=torch.long),
                               torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), None)
    assert empty.scores.shape == (2, 20, 1) and not empty.fg_mask.any()


def test_atss_overlapping_gts_resolved_by_anchor_iou():
    """Two gts over the same anchors: each shared anchor goes to the gt its anchor box overlaps
    most. gt0 = (0,0,16,16), gt1 = (0,0,20,20) (a superset); 16x16 anchor boxes:
    anchor 0 box (-4,-4,12,12): gt0 inter 144/union 368 = 0.391, gt1 144/(256+400-144) = 0.281
    -> gt0; anchor 5 box (4,4,20,20): gt0 inter 144 -> 0.391, gt1 inter 256/400 = 0.64 -> gt1."""
    anchors = centred_boxes(16.0)
    gt_boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 20.0, 20.0]]])
    res = ATSSAssigner(nc=2, topk=16)(anchors, [16], torch.tensor([[0, 1]]), gt_boxes,
                                      torch.tensor([[True, True]]), None)
    fg = fg_set(res.fg_mask[0])
    assert {0, 5} <= fg
    assert res.gt_idx[0, 0] == 0 and res.labels[0, 0] == 0
    assert res.gt_idx[0, 5] == 1 and res.labels[0, 5] == 1
    # every positive lies inside the gt it was given
    c = POINTS[res.fg_mask[0]]
    b = res.boxes[0][res.fg_mask[0]]
    assert torch.all((c > b[:, :2]) & (c < b[:, 2:]))


def test_tal_conflict_never_goes_to_a_gt_not_containing_the_anchor():
    """Anchor 1 (centre (12,4)) lies in A and B. Its predicted box is exactly gt C = (14,0,30,16),
    which does not contain (12,4): IoU with C is 1, with B inter 10*16 = 160 / union 352 = 0.45,
    with A inter 2*16 = 32 / union 480 = 0.07. It must go to B, not to C."""
    pd = centred_boxes(16.0)[None].clone()
    gt_c = [14.0, 0.0, 30.0, 16.0]
    pd[0, 1] = torch.tensor(gt_c)
    gt_boxes = torch.tensor([[GT_A, GT_B, gt_c]])
    res = TaskAlignedAssigner(nc=3, topk=13)(torch.full((1, 16, 3), 0.5), pd, POINTS,
                                             torch.tensor([[0, 1, 2]]), gt_boxes,
                                             torch.ones(1, 3, dtype=torch.bool))
    assert res.fg_mask[0, 1] and res.gt_idx[0, 1] == 1 and res.labels[0, 1] == 1
