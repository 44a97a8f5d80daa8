"""Our loss against the official YOLOv6 one on identical inputs (issue #16, item 1: where does
the 0.7-point gap of the side-by-side come from?). The official code is imported from its own
checkout at run time (nothing of it is copied here):

    PYTHONPATH=../official_yolov6:benchmarks/official/shim python benchmarks/official/loss_parity.py

Random head outputs near random ground truth (batch 4, 160 px, 8 classes, SIoU, no DFL, TAL):
prints both losses' parts, their gradients' largest differences, and the same for the assigner's
targets.
"""
import argparse
import sys

import torch

from yolo_q.losses import DetectionLoss


def inputs(seed: int, bs=4, img=160, nc=8, strides=(8, 16, 32)):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.zeros(bs, 1, img // s, img // s) for s in strides]
    n = sum((img // s) ** 2 for s in strides)
    rows = []
    for b in range(bs):
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            c = torch.rand(2, generator=g) * img * 0.8 + img * 0.1
            wh = torch.rand(2, generator=g) * img * 0.35 + img * 0.1
            x1y1, x2y2 = (c - wh / 2).clamp(0, img), (c + wh / 2).clamp(0, img)
            rows.append([b, float(torch.randint(0, nc, (1,), generator=g)), *x1y1.tolist(),
                         *x2y2.tolist()])
    targets = torch.tensor(rows)
    logits = torch.randn(bs, n, nc, generator=g) * 1.5 - 2.0
    reg = torch.rand(bs, n, 4, generator=g) * 4 + 0.5  # ltrb distances in grid units
    return feats, logits, reg, targets


def ours(feats, logits, reg, targets, nc):
    logits, reg = logits.clone().requires_grad_(), reg.clone().requires_grad_()
    loss = DetectionLoss({"iou_type": "siou", "assigner": "tal"}, nc=nc, use_dfl=False,
                         reg_max=0)
    total, parts = loss((feats, logits, reg), targets, epoch=10)
    total.backward()
    return total.item(), {k: v.item() for k, v in parts.items()}, logits.grad, reg.grad


def official(feats, logits, reg, targets, nc, img):
    from yolov6.models.losses.loss import ComputeLoss
    scores = logits.clone().requires_grad_()
    dist = reg.clone().requires_grad_()
    loss = ComputeLoss(fpn_strides=[8, 16, 32], num_classes=nc, ori_img_size=img, warmup_epoch=0,
                       use_dfl=False, reg_max=0, iou_type="siou")
    # official targets: [img, cls, x, y, w, h] normalized to the batch size
    xyxy = targets[:, 2:6]
    xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1) / img
    t = torch.cat((targets[:, :2], xywh), 1)
    total, parts = loss((feats, scores.sigmoid(), dist), t, 10, 1, img, img)
    total.backward()
    iou, dfl, cls = parts.tolist()
    return total.item(), {"cls": cls, "iou": iou, "dfl": dfl}, scores.grad, dist.grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    a = p.parse_args(argv)
    try:
        import yolov6  # noqa: F401
    except ImportError:
        sys.exit("error: the official code is not importable; put ../official_yolov6 on PYTHONPATH")
    nc, img = 8, 160
    for seed in range(a.seeds):
        x = inputs(seed, img=img, nc=nc)
        to, po, go_l, go_r = ours(*x, nc)
        tf, pf, gf_l, gf_r = official(*x, nc, img)
        print(f"seed {seed}: total ours {to:.6f} official {tf:.6f} | "
              + " ".join(f"{k} {po[k]:.6f}/{pf[k]:.6f}" for k in ("cls", "iou", "dfl"))
              + f" | max |grad diff| cls {float((go_l - gf_l).abs().max()):.2e} "
              f"(max {float(gf_l.abs().max()):.2e}), reg {float((go_r - gf_r).abs().max()):.2e} "
              f"(max {float(gf_r.abs().max()):.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
