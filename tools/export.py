"""Export a checkpoint to ONNX: float, or QDQ INT8 for TensorRT / ONNX Runtime.

    python tools/export.py --weights runs/train/demo/weights/best.pt                 # float ONNX
    python tools/export.py --weights runs/ptq/exp/ptq.pt                            # QDQ, its flavour
    python tools/export.py --weights runs/ptq/exp/ptq.pt --flavour float           # no Q/DQ
    python tools/export.py --weights best.pt --flavour onnxruntime --calib-images data/synthetic/images/train
    python tools/export.py --config configs/demo.yaml --weights best.pt --dynamic --end2end --out m.onnx
    python tools/export.py --weights runs/ptq/exp/ptq.pt --dynamic --fp16     # TensorRT INT8+FP16 ONNX

A float checkpoint exports as the fused (deploy-form) float graph. A quantized checkpoint (from
tools/ptq.py or tools/qat.py) exports as QDQ ONNX of the flavour it was quantized for; layers it
kept float have no Q/DQ. A QDQ flavour for a float checkpoint needs --calib-images (a quick
max-calibration PTQ on those images; tools/ptq.py does the real thing). --end2end appends NMS
(ONNX NonMaxSuppression, which TensorRT maps to its NMS layer; --nms efficient_nms for the
deprecated EfficientNMS_TRT plugin). --fp16 writes FP16 for every tensor that is not INT8: the
ONNX a strongly typed TensorRT build needs for FP16 (float checkpoint) or INT8+FP16 (QDQ).
"""
import argparse

from yolo_q.cli import config_from_args, run_tool
from yolo_q.export.api import EXPORT_FLAVOURS, ExportError, export_model


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None,
                   help="experiment YAML (default: the config stored in --weights)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--weights", "-w", required=True,
                   help="checkpoint: float (train), quantized (ptq/qat) or official YOLOv6")
    p.add_argument("--flavour", choices=EXPORT_FLAVOURS, default=None,
                   help="float | tensorrt | onnxruntime (default: the checkpoint's quant "
                        "flavour, else float)")
    p.add_argument("--imgsz", type=int, default=None, help="input size (default: data.img_size)")
    p.add_argument("--batch", type=int, default=1, help="static batch (example batch if --dynamic)")
    p.add_argument("--dynamic", action="store_true", default=None, help="dynamic batch axis")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: export.opset)")
    p.add_argument("--simplify", action="store_true", default=None,
                   help="run onnxslim/onnxsim when installed (float: default export.simplify)")
    p.add_argument("--end2end", action="store_true", default=None,
                   help="append NMS (outputs num_dets, det_boxes, det_scores, det_classes)")
    p.add_argument("--nms", choices=("onnx", "efficient_nms", "onnxruntime", "tensorrt"),
                   default=None, help="end-to-end NMS: onnx (NonMaxSuppression, default; "
                   "alias onnxruntime) or efficient_nms (EfficientNMS_TRT plugin; alias tensorrt)")
    p.add_argument("--fp16", action="store_true",
                   help="FP16 for every non-INT8 tensor (for strongly typed TensorRT builds)")
    p.add_argument("--calib-images", default=None, metavar="DIR|GLOB|LIST",
                   help="float checkpoint + QDQ flavour: quick PTQ calibrated on these images")
    p.add_argument("--calib-num", type=int, default=64, help="images used by --calib-images")
    p.add_argument("--calib-method", default="max", choices=("max", "percentile", "mse", "entropy"))
    p.add_argument("--out", "-o", default=None,
                   help="output .onnx (default: next to the weights, <stem>[_int8_<flavour>]_<imgsz>.onnx)")
    return p


def main(argv=None):
    from yolo_q.export.qdq import QDQExportError
    args = get_args_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    try:
        res = export_model(cfg, args.weights, flavour=args.flavour, out=args.out,
                           img_size=args.imgsz, batch=args.batch, dynamic=args.dynamic,
                           opset=args.opset, simplify=args.simplify, end2end=args.end2end,
                           nms=args.nms, calib_images=args.calib_images,
                           calib_num=args.calib_num, calib_method=args.calib_method,
                           fp16=args.fp16)
    except QDQExportError as e:
        raise ExportError(str(e)) from e
    info = res["info"]
    shape = next(iter(info["inputs"].values()))
    q = (f", {info['num_quantize']} QuantizeLinear / {info['num_dequantize']} DequantizeLinear"
         if res["quantized"] else "")
    how = " (quick max-calibration PTQ)" if res["calibrated_here"] else ""
    print(f"{res['flavour']}{how}: {res['path']}  input {shape}, outputs "
          f"{', '.join(info['outputs'])}, opset {info['opset']}{q}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
