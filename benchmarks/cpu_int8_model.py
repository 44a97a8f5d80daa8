"""The CPU INT8 comparison's model and val set when no trained 640 px checkpoint is at hand
(benchmarks/cpu_int8.md): a deterministic YOLOv6-N (8 classes) with random weights rescaled like
a trained network (every conv output to unit std on two of the images, class logits of std 2
with negative biases, positive box distances), and a val set labelled by that float model: its
confident detections on the synthetic 640 px images, jittered (3 % of the box side), 20 %
dropped, plus one spurious box per image. mAP50-95 then sits well inside (0, 1) and measures how
far each runtime / quantizer moves the float model's detections, which is what the comparison
needs (fidelity to the float model and to torch fake-quant), not how good a detector it is.

    python datasets/synthetic.py --out data/bench640 --train 1 --val 100 --size 640 --seed 1
    python benchmarks/cpu_int8_model.py --images data/bench640/images/val --out data/selflabel640

writes ``<out>/yolov6n_selflabel.pt`` (deploy-form weights + config) and ``<out>/data.yaml``.
"""
import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch

from yolo_q.benchmark import normalize_activations_, randomize_weights
from yolo_q.config import config_to_dict, load_config
from yolo_q.eval import TorchBackend
from yolo_q.eval.infer import detect
from yolo_q.io import save_checkpoint
from yolo_q.models import build_model

NAMES = [f"class{i}" for i in range(8)]


@torch.no_grad()
def well_scaled(model, x, seed=0):
    """Every conv output of the fused model to unit std on ``x``; prediction convs to class
    logits of std 2 (biases -4..0) and box distances of std 0.5 (biases 1.5..3.5)."""
    preds = list(model.detect.cls_preds) + list(model.detect.reg_preds)
    g = torch.Generator().manual_seed(seed)

    def prediction(mod, inp):
        if not any(mod is p for p in preds):
            return False
        cls = any(mod is c for c in model.detect.cls_preds)
        fan_in = mod.weight[0].numel()
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 if cls else 0.5)
                         / (inp.std().clamp(min=1e-6) * fan_in ** 0.5))
        mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) * 4 - 4 if cls else
                       torch.rand(mod.bias.shape, generator=g) * 2 + 1.5)
        return True
    return normalize_activations_(model, x, special=prediction)


def label(model, files, out: Path, img_size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    n = 0
    backend = TorchBackend(model)
    for f in files:
        img = cv2.imread(str(f))
        h, w = img.shape[:2]
        det = detect(backend, [img], img_size, conf_thres=0.3, iou_thres=0.45)[0].numpy()
        det = det[rng.random(len(det)) > 0.2]
        boxes = det[:, :4].copy()
        size = np.repeat(boxes[:, 2:4] - boxes[:, :2], 2, 0).reshape(-1, 4)
        boxes += rng.normal(0, 0.03, boxes.shape) * size
        spurious = np.sort((rng.random((1, 4)) * [w, h, w, h]).reshape(2, 2), 0).reshape(1, 4)
        boxes = np.concatenate((boxes, spurious)).clip(0, [w, h, w, h])
        cls = np.concatenate((det[:, 5], rng.integers(0, len(NAMES), 1)))
        ok = ((boxes[:, 2] - boxes[:, 0]) > 2) & ((boxes[:, 3] - boxes[:, 1]) > 2)
        boxes, cls = boxes[ok], cls[ok]
        n += len(cls)
        xywh = np.stack(((boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                         (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h), 1)
        shutil.copy(f, out / "images" / f.name)
        (out / "labels" / f"{f.stem}.txt").write_text(
            "".join(f"{int(c)} {' '.join(f'{v:.6f}' for v in b)}\n" for c, b in zip(cls, xywh)))
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of val images (640 px)")
    p.add_argument("--out", required=True)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = sorted(f for f in Path(args.images).iterdir() if f.suffix in (".jpg", ".png"))
    if not files:
        raise SystemExit(f"--images {args.images}: no .jpg/.png images")
    out = Path(args.out)
    cfg = load_config("configs/yolov6n.yaml", [f"model.nc={len(NAMES)}",
                                               f"data.img_size={args.imgsz}"])
    torch.manual_seed(args.seed)
    model = randomize_weights(build_model(cfg), args.seed).eval().fuse()
    x = torch.stack([torch.from_numpy(cv2.resize(cv2.imread(str(f)), (args.imgsz, args.imgsz))
                                      [..., ::-1].copy()).permute(2, 0, 1) for f in files[:2]])
    well_scaled(model, x.float() / 255, args.seed)
    n = label(model, files, out, args.imgsz, args.seed)
    (out / "data.yaml").write_text(f"path: {out.resolve()}\ntrain: images\nval: images\n"
                                   f"nc: {len(NAMES)}\nnames: {NAMES}\n")
    cfg.data.dataset = str((out / "data.yaml").resolve())
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg)},
                    out / "yolov6n_selflabel.pt")
    print(f"{len(files)} images, {n} labels -> {out / 'data.yaml'}; "
          f"weights {out / 'yolov6n_selflabel.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
