"""What each trainer's data pipeline feeds the model (issue #16, item 1): augmented training
samples of both loaders on the same images (the reference recipe: mosaic, HSV, flips, affine
scale 0.5 / translate 0.1) — boxes per image, box sizes, thin boxes, pixel statistics. The
official loader is imported from its own checkout at run time (nothing of it is copied here):

    PYTHONPATH=../official_yolov6:benchmarks/official/shim python benchmarks/official/aug_stats.py \
        --config configs/reference/yolov6n_repvgg.yaml --official-data ../official_data/ref160/data.yaml
"""
import argparse
import random
import sys

import numpy as np

from yolo_q.config import resolve_config
from yolo_q.data import build_datasets_from_config


def summary(samples) -> str:
    """``samples``: (CHW uint8 image, (n, 2) box widths/heights in px) pairs."""
    nb = [len(wh) for _, wh in samples]
    wh = np.concatenate([b for _, b in samples if len(b)])
    side = np.sqrt(wh[:, 0] * wh[:, 1])
    px = np.stack([im for im, _ in samples]).astype(np.float32)
    q = " ".join(f"{v:.1f}" for v in np.percentile(side, [5, 25, 50, 75, 95]))
    return (f"boxes/img {np.mean(nb):.2f} | sqrt(area) px q05/25/50/75/95 {q} | "
            f"min side < 4 px {np.mean(wh.min(1) < 4):.3f} | aspect > 4 "
            f"{np.mean(wh.max(1) / np.maximum(wh.min(1), 1e-6) > 4):.3f} | "
            f"pixels mean {px.mean():.1f} std {px.std():.1f}")


def ours(config, n):
    cfg = resolve_config(config, ["data.workers=0"])
    ds, _, _ = build_datasets_from_config(cfg, splits=("train",), verbose=False)
    out = []
    for i in range(n):
        img, lab, _, _ = ds[i * 7 % len(ds)]  # rows [cls, x1, y1, x2, y2] px
        lab = lab.numpy()
        out.append((img.numpy(), lab[:, 3:5] - lab[:, 1:3]))
    return out, cfg


def official(data_yaml, cfg, n):
    import yaml
    from yolov6.data.datasets import TrainValDataset
    a = cfg.data.augment
    hyp = {k: float(a[k]) for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale",
                                    "shear", "flipud", "fliplr", "mosaic", "mixup")}
    dd = yaml.safe_load(open(data_yaml))
    ds = TrainValDataset(dd["train"], img_size=int(cfg.data.img_size), batch_size=16,
                         augment=True, hyp=hyp, rect=False, stride=32, data_dict=dd, task="train")
    random.seed(0)
    np.random.seed(0)
    out = []
    for i in range(n):
        img, lab, _, _ = ds[i * 7 % len(ds)]  # rows [0, cls, xc, yc, w, h] normalized
        out.append((img.numpy(), lab.numpy()[:, 4:6] * int(cfg.data.img_size)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="our training config (data and augmentation)")
    p.add_argument("--official-data", required=True, help="the official trainer's data YAML")
    p.add_argument("--samples", type=int, default=600)
    a = p.parse_args(argv)
    try:
        import yolov6  # noqa: F401
    except ImportError:
        sys.exit("error: the official code is not importable; put ../official_yolov6 on PYTHONPATH")
    mine, cfg = ours(a.config, a.samples)
    print(f"yolo_q   : {summary(mine)}")
    print(f"official : {summary(official(a.official_data, cfg, a.samples))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
