"""GPU check: strongly typed FP16 and INT8 (tensorrt-flavour QDQ) engines for YOLOv6-N and -S,
COCO mAP through TensorRT vs ONNX Runtime on the same images, throughput at batch 1 and 32.

    python deploy/gpu_check.py                                   # random weights, COCO128
    python deploy/gpu_check.py --weights-n yolov6n.pt --weights-s yolov6s.pt --imgsz 640

Per model: fused float ONNX (dynamic batch) and a quick-PTQ QDQ ONNX (max calibration on
--calib-num images of the data set, tensorrt flavour), both rewritten to FP16 for every non-INT8
tensor; engines built and cached (deploy/trt.cached_engine) in --work-dir. mAP: ORT runs the
FP32 float ONNX and the QDQ ONNX; TensorRT the FP16 and INT8 engines; same loader, same
post-processing (yolo_q.eval.evaluate). With random weights mAP is ~0 and only the TRT-vs-ORT
agreement means something; pass official checkpoints for real numbers. Needs TensorRT >= 10.8
and a CUDA GPU: without them it stops with one line (exit 2); so does a bad input (weights, data
YAML, calibration images, work dir), checked before any work (yolo_q.cli.run_tool). Data:
datasets/coco128.yaml (set YOLOQ_DATA_ROOT to the folder that holds coco128/ when it is not at
../shared/datasets). Budget: under 8 minutes on one H100 (engine builds dominate; the timing
cache in --work-dir makes reruns faster).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

from yolo_q.cli import run_tool

REPO = Path(__file__).resolve().parents[1]


def _load_trt_module():
    sys.path.insert(0, str(REPO))
    from deploy import trt as dtrt
    return dtrt


def _model(name: str, weights, seed: int):
    import yolo_q
    from yolo_q.benchmark import randomize_weights
    from yolo_q.models import build_model
    cfg = yolo_q.load_config(str(REPO / "configs" / f"{name}.yaml"))
    if weights:
        model = yolo_q.load_model(weights, cfg=cfg)
    else:
        model = randomize_weights(build_model(cfg), seed)
    model = copy.deepcopy(model).eval()
    if any(m.__class__.__name__ == "BatchNorm2d" for m in model.modules()):
        model.fuse()
    return cfg, model.eval()


def _onnx_files(name, cfg, model, args, work: Path):
    from yolo_q.eval.infer import image_batches
    from yolo_q.export.api import quick_ptq
    from yolo_q.export.onnx import export_onnx
    from yolo_q.export.qdq import export_qdq
    f32 = export_onnx(model, work / f"{name}_fp32.onnx", img_size=args.imgsz,
                      dynamic_batch=True, simplify=False)
    calib = list(image_batches(args.images, args.imgsz, 8, limit=args.calib_num))
    q = quick_ptq(model, cfg, "tensorrt", calib, method="max")
    qdq = export_qdq(q, work / f"{name}_int8_tensorrt.onnx", flavour="tensorrt",
                     img_size=args.imgsz, dynamic_batch=True)
    return f32, qdq


def _map(backend, cfg, args):
    from yolo_q.eval import COCOEvaluator, evaluate
    from yolo_q.eval.api import val_loader_for
    val_ds, loader, _ = val_loader_for(cfg, args.eval_batch, args.imgsz, args.data, workers=2)
    ev = COCOEvaluator.from_dataset(val_ds)
    res = evaluate(backend, loader, ev, conf_thres=0.001, iou_thres=0.65, max_det=300,
                   progress=False, max_batches=-(-args.max_images // args.eval_batch))
    return res["map50_95"], res["map50"]


def _default_images() -> str:
    root = os.environ.get("YOLOQ_DATA_ROOT") or str(REPO.parent / "shared" / "datasets")
    return str(Path(root) / "coco128" / "images" / "train2017")


def _check_inputs(args) -> None:
    """Every input, before the first engine build (minutes): an error names the file."""
    from yolo_q.data import load_data_yaml
    from yolo_q.data.images import list_images
    from yolo_q.io import check_checkpoint_file, check_output_dir
    for w in (args.weights_n, args.weights_s):
        if w:
            check_checkpoint_file(w)
    load_data_yaml(args.data)
    list_images(args.images)
    check_output_dir(args.work_dir, [w for w in (args.weights_n, args.weights_s) if w],
                     what="--work-dir")


def run(args) -> int:
    args.images = args.images or _default_images()
    dtrt = _load_trt_module()
    try:
        trt = dtrt.require_tensorrt()
    except dtrt.TensorRTUnavailable as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    _check_inputs(args)
    import torch
    from yolo_q.eval import OrtBackend, TrtBackend
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"TensorRT {trt.__version__}, torch {torch.__version__}, "
          f"GPU {torch.cuda.get_device_name(0)}, {args.imgsz} px")
    rows = []
    for name, weights in (("yolov6n", args.weights_n), ("yolov6s", args.weights_s)):
        cfg, model = _model(name, weights, args.seed)
        f32, qdq = _onnx_files(name, cfg, model, args, work)
        for label, onnx_path in (("FP16", f32), ("INT8", qdq)):
            t0 = time.time()
            be = TrtBackend(onnx_path, fp16=True, int8=label == "INT8", max_batch=32,
                            cache_dir=work)
            build_s = time.time() - t0
            ort = OrtBackend(onnx_path)
            m_trt, m_ort = _map(be, cfg, args), _map(ort, cfg, args)
            speed = {b: dtrt.bench(be.runner, b, args.iters if b == 1 else max(10, args.iters // 4))
                     for b in (1, 32)}
            rows.append((name, label, m_trt[0], m_ort[0], speed[1][1], speed[32][1], build_s))
            print(f"{name} {label}: mAP50-95 TRT {m_trt[0]:.4f} vs ORT {m_ort[0]:.4f}; "
                  f"b1 {speed[1][1]:.0f} img/s, b32 {speed[32][1]:.0f} img/s "
                  f"(build/cache {build_s:.0f}s, {time.time() - t_start:.0f}s so far)", flush=True)
    print("\n| model | engine | mAP50-95 TRT | mAP50-95 ORT | img/s b1 | img/s b32 |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.0f} | {r[5]:.0f} |")
    for name in ("yolov6n", "yolov6s"):
        fp16 = next(r for r in rows if r[0] == name and r[1] == "FP16")
        int8 = next(r for r in rows if r[0] == name and r[1] == "INT8")
        print(f"{name}: INT8 / FP16 throughput at batch 32 = {int8[5] / fp16[5]:.2f}x, "
              f"|mAP TRT - ORT| INT8 {abs(int8[2] - int8[3]):.4f}")
    print(f"total {time.time() - t_start:.0f}s")
    return 0


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-n", default=None, help="YOLOv6-N checkpoint (default: random)")
    p.add_argument("--weights-s", default=None, help="YOLOv6-S checkpoint (default: random)")
    p.add_argument("--data", default=str(REPO / "datasets" / "coco128.yaml"))
    p.add_argument("--images", default=None, help="calibration images (folder/glob/list; "
                   "default: the COCO128 images, $YOLOQ_DATA_ROOT/coco128/images/train2017)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--calib-num", type=int, default=64)
    p.add_argument("--max-images", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=100, help="timed runs at batch 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="runs/gpu_check")
    return p


def main(argv=None) -> int:
    return run(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
