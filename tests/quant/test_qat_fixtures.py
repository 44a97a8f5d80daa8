"""Shared assets for the QAT tests (no tests here): tiny synthetic data, a briefly trained tiny
float model and PTQ-calibrated checkpoints in the agreed format.

Built once per process into a per-process temp folder (a marker file per asset), so the tool test,
which imports this module under another name, reuses them too."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[2]
IMG = 64
_TMP = Path(tempfile.gettempdir()) / f"yolo_q_qat_tests_{os.getpid()}"
if not _TMP.exists():
    _TMP.mkdir(parents=True)
    atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def _once(name: str, build: Callable[[], Path]) -> Path:
    marker = _TMP / f".{name}.done"
    if marker.exists() and Path(marker.read_text()).exists():
        return Path(marker.read_text())
    path = build()
    marker.write_text(str(path))
    return path


def overrides(data_yaml, out_dir, *extra):
    """Tiny-run overrides: width 1/8 YOLOv6-N at 64 px, 16 images, CPU, no bars/TensorBoard."""
    return ["model.width_multiple=0.125", "model.nc=8", f"data.dataset={data_yaml}",
            f"data.img_size={IMG}", "data.workers=0", "data.cache_labels=false",
            "data.augment.mosaic=0.0", "train.batch_size=8", "train.nominal_batch=8",
            "train.device=cpu", "train.progress_bar=false", "train.tensorboard=false",
            "train.eval_interval=1", f"train.output_dir={out_dir}/train", "train.epochs=20",
            "train.lr0=0.02", "eval.batch_size=8", f"quant.qat.output_dir={out_dir}/qat",
            # 40 training steps: with the official BN momentum (0.03) the running statistics
            # would still be ~30 % their initial values; PyTorch's 0.1 lets them follow
            "model.bn_momentum=0.1",
            *extra]


def tiny_cfg(data_yaml, out_dir, *extra):
    from yolo_q.config import load_config
    return load_config(REPO / "configs" / "yolov6n.yaml", overrides(data_yaml, out_dir, *extra))


def data_yaml() -> Path:
    """16 easy 64 px training images (1-2 large objects, 8 classes); the val split holds copies
    of the same images (their labels are replaced, see :func:`float_checkpoint`), so
    calibration, QAT and evaluation all see one image distribution."""
    return _once("data", _make_data)


def _make_data() -> Path:
    from yolo_q.data.synthetic import generate
    yaml_path = generate(_TMP / "data", n_train=16, n_val=1, size=IMG, seed=5, workers=1,
                         min_objects=1, max_objects=2, min_size=0.3, max_size=0.5, small_size=0.35,
                         small_fraction=0.0, max_distractors=0, noise_sigma=2.0, blur_prob=0.0,
                         max_rotation=0.0)
    root = yaml_path.parent
    for split in ("images", "labels"):
        shutil.rmtree(root / split / "val")
        shutil.copytree(root / split / "train", root / split / "val")
    text = yaml_path.read_text()  # no val_json: GT comes from the label files
    yaml_path.write_text("\n".join(l for l in text.splitlines() if not l.startswith("val_json"))
                         + "\n")
    return yaml_path


def float_checkpoint() -> Path:
    """A float training checkpoint (train() for 20 short epochs, ~10 s). Afterwards the val
    labels are replaced by this model's own most confident detections ("pseudo GT"): a tiny
    model trained for seconds has a near-zero mAP on real labels, against its own predictions
    the float mAP is high, so quantized-vs-float and ONNX Runtime-vs-torch mAP differences on
    the val set are meaningful."""
    return _once("float", _make_float)


def _make_float() -> Path:
    from yolo_q.training import train
    cfg = tiny_cfg(data_yaml(), _TMP, "train.name=float", "train.eval_interval=100",
                   "train.warmup_epochs=0", "train.ema=false")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same model whether the suite runs serially or with xdist
    try:
        summary = train(cfg, verbose=False)
        _pseudo_label_val(Path(summary["last"]))
    finally:
        torch.set_num_threads(threads)
    return Path(summary["last"])


@torch.no_grad()
def _pseudo_label_val(weights: Path, per_image: int = 3) -> None:
    """Val labels := the model's detections above one global score threshold (chosen so there
    are ``per_image`` boxes per image on average), post-processed as the evaluation does: the
    float model then ranks exactly its GT boxes first (mAP ~1)."""
    import cv2
    from yolo_q import load_model
    from yolo_q.eval.postprocess import postprocess
    model = load_model(weights)
    files = sorted((data_yaml().parent / "images" / "val").iterdir())
    dets = []
    for f in files:
        img = cv2.imread(str(f))[:, :, ::-1].copy()  # RGB, IMG x IMG: no letterbox
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        dets.append(postprocess(model(x), conf_thres=0.001, iou_thres=0.65, max_det=300,
                                multi_label=True)[0])
    side = 2.0  # pixels: smaller (clipped) boxes would be dropped as degenerate labels
    dets = [d[((d[:, 2].clamp(0, IMG) - d[:, 0].clamp(0, IMG)) >= side) &
              ((d[:, 3].clamp(0, IMG) - d[:, 1].clamp(0, IMG)) >= side)] for d in dets]
    scores = torch.cat([d[:, 4] for d in dets]).sort(descending=True).values
    thr = float(scores[min(per_image * len(files), len(scores)) - 1])
    for f, det in zip(files, dets):
        rows = []
        for x1, y1, x2, y2, _, c in det[det[:, 4] >= thr].tolist():
            x1, x2 = (min(max(v, 0.0), IMG) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), IMG) for v in (y1, y2))
            rows.append(f"{int(c)} {(x1 + x2) / 2 / IMG:.6f} {(y1 + y2) / 2 / IMG:.6f} "
                        f"{(x2 - x1) / IMG:.6f} {(y2 - y1) / IMG:.6f}")
        (data_yaml().parent / "labels" / "val" / f"{f.stem}.txt").write_text(
            "".join(r + "\n" for r in rows))


def calibrated_checkpoint(flavour: str = "tensorrt", skip: tuple = ()) -> Path:
    """PTQ: fuse -> convert -> calibrate (2 batches of training images, percentile) ->
    ``{"model", "config", "quant"}`` (the agreed quantized-checkpoint format)."""
    name = f"calibrated_{flavour}_{'_'.join(skip) or 'all'}"
    return _once(name, lambda: _make_calibrated(flavour, skip, _TMP / f"{name}.pt"))


def _make_calibrated(flavour: str, skip: tuple, path: Path) -> Path:
    from omegaconf import OmegaConf
    from yolo_q import load_model
    from yolo_q.io import save_checkpoint
    from yolo_q.quant import calibrate, convert, quant_state
    from yolo_q.quant.ptq import calibration_batches

    model = load_model(float_checkpoint())
    cfg = model.yolo_q_config
    qmodel = convert(model.fuse(), cfg, flavour=flavour, skip_layers=list(skip))
    batches = calibration_batches(cfg, num_batches=2, batch_size=8)
    calibrate(qmodel, batches, method="percentile", num_batches=2, progress=False)
    save_checkpoint({"model": qmodel.state_dict(), "config": OmegaConf.to_container(cfg),
                     "quant": quant_state(qmodel)}, path)
    return path


def amax_of(model) -> dict:
    from yolo_q.quant import all_quantizers
    return {n: q.amax.detach().clone() for n, q in all_quantizers(model).items()}


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_amax")}


