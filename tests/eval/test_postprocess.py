import importlib

import numpy as np
import pytest
import torch

from yolo_q.eval.postprocess import (box_iou, e2e_to_detections, nms, nms_reference, postprocess,
                                     scale_boxes, xywh2xyxy, xyxy2xywh)


def random_boxes(n, nc, seed, spread=100.0, size=40.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * spread
    wh = torch.rand(n, 2, generator=g) * size + 1
    return (torch.cat((xy, xy + wh), 1), torch.rand(n, generator=g),
            torch.randint(0, nc, (n,), generator=g))


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [3, 3, 3, 3]])
    # overlap 50 / union 150; identical; disjoint; degenerate (zero area) box
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 3, 1.0, 0.0, 0.0]]))
    assert torch.equal(box_iou(b[3:], b[3:]), torch.zeros(1, 1))  # empty union -> 0, not nan


def test_xywh_roundtrip():
    x = torch.tensor([[10.0, 20, 4, 6]])
    assert torch.equal(xywh2xyxy(x), torch.tensor([[8.0, 17, 12, 23]]))
    assert torch.equal(xyxy2xywh(xywh2xyxy(x)), x)


def test_nms_hand_computed():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # IoU(0,1)=9/11=.82, IoU(0,2)=8/12=.67, IoU(1,2)=.82: box 1 suppressed by 0, then 2 by 0
    assert nms(boxes, scores, 0.5).tolist() == [0, 3]
    # at 0.7 box 2 (IoU .67 with box 0) survives: greedy, box 1 is gone and cannot suppress it
    assert nms(boxes, scores, 0.7).tolist() == [0, 2, 3]
    # class-aware: box 1 has its own class, nothing suppresses it
    assert nms(boxes, scores, 0.5, torch.tensor([0, 1, 0, 0])).tolist() == [0, 1, 3]
    assert nms(boxes, scores, 0.5, max_keep=1).tolist() == [0]
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0


@pytest.mark.parametrize("n,nc,block,iou", [(60, 1, 1024, 0.5), (400, 3, 64, 0.45),
                                            (700, 5, 128, 0.65), (300, 2, 7, 0.3)])
def test_nms_matches_bruteforce(n, nc, block, iou):
    boxes, scores, cls = random_boxes(n, nc, seed=n + nc)
    ref = nms_reference(boxes, scores, iou, cls)
    assert 0 < len(ref) < n  # the setting really suppresses something
    got = nms(boxes, scores, iou, cls, block=block, use_torchvision=False)
    assert got.tolist() == ref.tolist()
    # agnostic and with a cap (early stop must not change the first max_keep results)
    ref_a = nms_reference(boxes, scores, iou)
    assert nms(boxes, scores, iou, block=block, use_torchvision=False).tolist() == ref_a.tolist()
    got_k = nms(boxes, scores, iou, cls, max_keep=13, block=block, use_torchvision=False)
    assert got_k.tolist() == ref[:13].tolist()


def test_torchvision_is_optional():
    try:
        import torchvision  # noqa: F401
        from torchvision.ops import batched_nms  # noqa: F401
        usable = True
    except Exception:  # noqa: BLE001
        usable = False
    P = importlib.import_module("yolo_q.eval.postprocess")  # the module, not the function
    assert (P._torchvision_batched_nms() is not None) == usable


def _preds(rows, nc):
    """rows: (cx, cy, w, h, obj, *cls_scores) -> (1, N, 5+nc)."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(1, -1, 5 + nc)
    return t


def test_postprocess_scores_thresholds_and_labels():
    preds = _preds([
        [50, 50, 20, 20, 0.5, 0.9, 0.8],    # obj*cls: 0.45 (c0), 0.40 (c1)
        [52, 50, 20, 20, 1.0, 0.3, 0.6],    # 0.30 (c0), 0.60 (c1): overlaps box 0 (IoU .82)
        [150, 150, 10, 10, 1.0, 0.1, 0.05],  # below conf
    ], nc=2)
    single = postprocess(preds, conf_thres=0.2, iou_thres=0.5, max_det=10)[0]
    # single label: box 1 -> class 1 (0.6), box 0 -> class 0 (0.45); different classes, both kept
    assert single[:, 4].tolist() == pytest.approx([0.6, 0.45])
    assert single[:, 5].tolist() == [1, 0]
    assert single[0, :4].tolist() == [42, 40, 62, 60]
    multi = postprocess(preds, 0.2, 0.5, 10, multi_label=True)[0]
    # multi label candidates: (b1,c1).6 (b0,c0).45 (b0,c1).40 (b1,c0).30 -> per class NMS
    assert multi[:, 4].tolist() == pytest.approx([0.6, 0.45])
    agn = postprocess(preds, 0.2, 0.5, 10, agnostic=True)[0]
    assert agn[:, 4].tolist() == pytest.approx([0.6])
    only0 = postprocess(preds, 0.2, 0.5, 10, classes=[0])[0]
    assert only0[:, 5].tolist() == [0] and only0[:, 4].tolist() == pytest.approx([0.45])
    assert postprocess(preds, 0.7, 0.5, 10)[0].shape == (0, 6)
    assert postprocess(preds, 0.2, 0.5, 1)[0].shape == (1, 6)
    with pytest.raises(ValueError, match=r"\(B, N, 5\+nc\)"):
        postprocess(torch.zeros(2, 5), 0.1, 0.5, 10)


def test_postprocess_matches_reference_pipeline():
    g = torch.Generator().manual_seed(3)
    b, n, nc = 2, 500, 4
    xy = torch.rand(b, n, 2, generator=g) * 200
    wh = torch.rand(b, n, 2, generator=g) * 60 + 2
    obj = torch.rand(b, n, 1, generator=g)
    cls = torch.rand(b, n, nc, generator=g)
    preds = torch.cat((xy, wh, obj, cls), -1)
    out = postprocess(preds, 0.3, 0.5, 40, multi_label=True, max_nms=300)
    for i in range(b):
        s = cls[i] * obj[i]
        bi, ci = (s > 0.3).nonzero(as_tuple=True)
        sc = s[bi, ci]
        top = sc.argsort(descending=True)[:300]
        bi, ci, sc = bi[top], ci[top], sc[top]
        boxes = xywh2xyxy(preds[i, bi, :4])
        keep = nms_reference(boxes, sc, 0.5, ci)[:40]
        ref = torch.cat((boxes[keep], sc[keep, None], ci[keep, None].float()), 1)
        assert out[i].shape == (40, 6)
        assert torch.equal(out[i], ref)


def test_scale_boxes_inverts_letterbox_and_clips():
    h0, w0 = 300, 500
    r = 640 / 500
    pw, ph = 0.0, (640 - round(300 * r)) / 2
    info = ((h0, w0), ((round(300 * r) / 300, 640 / 500), (pw, ph)))
    orig = torch.tensor([[10.0, 20, 110, 220, 0.9, 2]])
    lb = orig.clone()
    lb[:, [0, 2]] = orig[:, [0, 2]] * info[1][0][1] + pw
    lb[:, [1, 3]] = orig[:, [1, 3]] * info[1][0][0] + ph
    back = scale_boxes(lb, info)
    assert torch.allclose(back, orig, atol=1e-4)
    assert torch.equal(lb[0, 4:], back[0, 4:])
    out = scale_boxes(torch.tensor([[-5.0, 0, 700, 639]]), info)  # beyond the image: clipped
    assert out[0].tolist() == pytest.approx([0.0, 0.0, 500.0, 300.0])
    arr = scale_boxes(lb.numpy(), info)
    assert isinstance(arr, np.ndarray) and np.allclose(arr, orig.numpy(), atol=1e-4)


def test_e2e_to_detections():
    num = torch.tensor([[2], [0]], dtype=torch.int32)
    boxes = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    scores = torch.tensor([[0.9, 0.5, 0.0], [0.0, 0.0, 0.0]])
    classes = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.int32)
    d = e2e_to_detections(num, boxes, scores, classes)
    assert d[0].tolist() == [[0, 1, 2, 3, 0.8999999761581421, 1], [4, 5, 6, 7, 0.5, 0]]
    assert d[1].shape == (0, 6)
