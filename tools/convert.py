"""Convert an official YOLOv6 (or plain state-dict) checkpoint into a yolo_q checkpoint
(tensors + resolved config) that loads with ``torch.load(weights_only=True)``.

    python tools/convert.py yolov6s.pt yolov6s_yoloq.pt
    python tools/convert.py yolov6s.pt out.pt --config configs/yolov6s.yaml model.nc=80
    python tools/convert.py runs/train/exp/weights/last.pt small.pt --fp16   # float16 storage
"""
import argparse

from yolo_q.cli import run_tool
from yolo_q.config import load_config
from yolo_q import load_model
from yolo_q.io import check_output_file
from yolo_q.models.loading import write_float_checkpoint


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="official YOLOv6 checkpoint or state dict")
    p.add_argument("dst", help="output yolo_q checkpoint (.pt)")
    p.add_argument("--config", "-c", default=None, help="config of the model (default: inferred)")
    p.add_argument("--fp16", action="store_true",
                   help="store the floating tensors as float16 (half the size; loads as float32)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    check_output_file(args.dst, [args.src], what="output checkpoint")
    cfg = load_config(args.config, args.overrides) if args.config else None
    model = load_model(args.src, cfg=cfg)
    cfg = model.yolo_q_config
    write_float_checkpoint(model, args.dst, fp16=args.fp16, source=str(args.src))
    print(f"wrote {args.dst}: {cfg.model.name}, nc={cfg.model.nc}, "
          f"{'fused' if model.is_fused else 'training'} form, {len(model.state_dict())} tensors"
          f"{', float16' if args.fp16 else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
