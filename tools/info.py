"""Print a model summary: parameters, GFLOPs and output shapes, training and fused form.

    python tools/info.py --config configs/yolov6s.yaml
    python tools/info.py --config configs/yolov6n.yaml --json
"""
import argparse
import json

from yolo_q import build_model
from yolo_q.cli import add_config_args, config_from_args, run_tool
from yolo_q.models.info import model_info


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--imgsz", type=int, default=640, help="square input size for FLOPs (default 640)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    info = model_info(build_model(cfg), args.imgsz)
    info["name"] = cfg.model.name
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model {cfg.model.name}  ({cfg.model.block} blocks, nc={cfg.model.nc}, input {args.imgsz}x{args.imgsz})")
    print(f"{'form':<10}{'params':>14}{'GFLOPs':>10}")
    print(f"{'training':<10}{info['params']:>14,}{info['gflops']:>10.2f}")
    print(f"{'fused':<10}{info['fused_params']:>14,}{info['fused_gflops']:>10.2f}")
    for lv in info["levels"]:
        print(f"  P{lv['stride'].bit_length() - 1} stride {lv['stride']:>2}: {tuple(lv['shape'])}")
    print(f"  output (eval): {tuple(info['output_shape'])}  = (batch, anchors, 5 + nc)")
    print("GFLOPs = 2 x MACs (torch.utils.flop_counter); thop-based figures (e.g. the YOLOv6 README)"
          " over-count the transposed-conv upsamplers.")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
