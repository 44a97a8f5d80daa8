"""Detect objects in images, a folder or a video with any backend; draw the boxes and save a JSON.

    python tools/infer.py --weights runs/train/demo/weights/best.pt --source data/synthetic/images/val
    python tools/infer.py --onnx best_int8_onnxruntime_320.onnx --source clip.mp4 --out runs/infer/clip
    python tools/infer.py --openvino best_int8_onnxruntime_320.onnx --source data/synthetic/images/val
    python tools/infer.py --trt model_int8.onnx --source img.jpg --conf 0.4

Writes to --out (default runs/infer/<source stem>): the images with boxes (same file names) or
<video stem>.mp4, and detections.json: one entry per image/frame with "file", "frame" (videos),
"width", "height" and "detections" [{"box": [x1, y1, x2, y2] in original pixels, "score",
"class", "name"}]. Pre- and post-processing are the evaluation's (letterbox, NMS, box mapping).
"""
import argparse
from pathlib import Path

from yolo_q.cli import config_from_args, run_tool
from yolo_q.eval.api import backend_from_args
from yolo_q.eval.infer import run_inference


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None,
                   help="experiment YAML (default: the config stored in --weights; gives names)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="torch checkpoint: float, PTQ/QAT (fake-quant) or official")
    src.add_argument("--onnx", help="ONNX file run by ONNX Runtime (FP32 or QDQ INT8)")
    src.add_argument("--openvino", metavar="ONNX",
                     help="ONNX file run by OpenVINO on CPU (FP32 or QDQ INT8; pip install openvino)")
    src.add_argument("--trt", metavar="ENGINE|ONNX", help="TensorRT engine, or ONNX to build one")
    p.add_argument("--source", "-s", required=True,
                   help="image, folder, .txt list, glob or video file")
    p.add_argument("--out", "-o", default=None, help="output folder (default runs/infer/<stem>)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="input size (default: the ONNX/engine input, else data.img_size)")
    p.add_argument("--conf", type=float, default=0.25, help="confidence threshold")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--classes", type=int, nargs="+", default=None, help="keep these class ids")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime / OpenVINO threads")
    p.add_argument("--max-frames", type=int, default=None, help="video: stop after N frames")
    p.add_argument("--no-save", action="store_true", help="only write detections.json")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    backend, source, kw = backend_from_args(args.weights, args.onnx, args.trt, args.threads,
                                            args.openvino)
    out = args.out or str(Path("runs/infer") / (Path(args.source).stem or "source"))
    res = run_inference(cfg, backend, source, args.source, out, img_size=args.imgsz,
                        conf_thres=args.conf, iou_thres=args.iou, max_det=args.max_det,
                        batch_size=args.batch, classes=args.classes,
                        save_images=not args.no_save, max_frames=args.max_frames, **kw)
    print(f"{backend}: {res['detections']} detections in {res['images']} images/frames -> "
          f"{res['out_dir']} ({Path(res['json']).name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
