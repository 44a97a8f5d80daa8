"""COCO mAP of a model through any runtime; all share the data, post-processing and evaluation.

    python tools/eval.py --config configs/demo.yaml --weights runs/train/demo/weights/best.pt
    python tools/eval.py --config configs/demo.yaml --onnx model_int8.onnx          # ONNX Runtime
    python tools/eval.py --config configs/demo.yaml --openvino model_int8.onnx      # OpenVINO (CPU)
    python tools/eval.py --config configs/demo.yaml --trt model_int8.onnx           # TensorRT (GPU)
    python tools/eval.py --weights yolov6s.pt --data datasets/coco.yaml --imgsz 640 --save-json m.json
"""
import argparse

from yolo_q.cli import config_from_args, run_tool
from yolo_q.eval.api import backend_from_args, run_eval


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None,
                   help="experiment YAML (default: the config stored in --weights)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="torch checkpoint: float, PTQ/QAT (fake-quant) or official")
    src.add_argument("--onnx", help="ONNX file run by ONNX Runtime (FP32 or QDQ INT8)")
    src.add_argument("--openvino", metavar="ONNX",
                     help="ONNX file run by OpenVINO on CPU (FP32 or QDQ INT8; pip install openvino)")
    src.add_argument("--trt", nargs="?", const="", metavar="ENGINE|ONNX",
                     help="TensorRT: an engine, or an ONNX built into a strongly typed engine "
                          "(float ONNX -> FP16, QDQ ONNX -> INT8 + FP16; see deploy/README.md)")
    p.add_argument("--data", default=None, help="data YAML (default: data.dataset of the config)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--imgsz", type=int, default=None, help="input size (default: data.img_size)")
    p.add_argument("--conf", type=float, default=None, help="confidence threshold (eval.conf_thres)")
    p.add_argument("--iou", type=float, default=None, help="NMS IoU threshold (eval.iou_thres)")
    p.add_argument("--max-det", type=int, default=None)
    p.add_argument("--half", action="store_true", help="FP16 torch model (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime / OpenVINO threads")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--per-class", action="store_true", help="print per-class AP")
    p.add_argument("--save-json", default=None, help="write the metrics as JSON here")
    p.add_argument("--save-dir", default=None, help="write predictions.json and PR curves here")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    if not (args.weights or args.onnx or args.openvino or args.trt):
        raise ValueError("--trt needs an engine or ONNX path here (e.g. --trt model_int8.onnx)")
    backend, source, kw = backend_from_args(args.weights, args.onnx, args.trt, args.threads,
                                            args.openvino)
    res = run_eval(cfg, backend, source, batch_size=args.batch, img_size=args.imgsz,
                   data=args.data, conf=args.conf, iou=args.iou, max_det=args.max_det,
                   half=args.half, save_json=args.save_json, save_dir=args.save_dir,
                   max_images=args.max_images, per_class=args.per_class, **kw)
    print(f"{backend}: mAP50-95 {res['map50_95']:.4f}  mAP50 {res['map50']:.4f}  "
          f"({res['images']} images, {res['seconds']:.1f} s, {res['ms_per_image']:.1f} ms/img)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
