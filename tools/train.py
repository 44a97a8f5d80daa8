"""Train a detector from a config.

    python tools/train.py --config configs/demo.yaml
    python tools/train.py --config configs/yolov6n.yaml data.dataset=datasets/coco128.yaml train.epochs=3
    python tools/train.py --config configs/demo.yaml --resume runs/train/demo/weights/last.pt
    torchrun --nproc_per_node 2 tools/train.py --config configs/demo.yaml   # DDP (gloo on CPU)

Hyper-search / RepOpt (see README, "RepOptimizer"):
    python tools/train.py --config configs/repopt/yolov6n_hs.yaml      # writes <run>/scales.pt
    python tools/train.py --config configs/repopt/yolov6n_opt.yaml model.scales=<run>/scales.pt

Outputs go to ``train.output_dir/train.name`` (``exp``, ``exp2``, ... never overwritten unless
``train.exist_ok=true``): ``config.yaml``, ``weights/last.pt``, ``weights/best.pt``,
``tensorboard/``, ``results.json``.
"""
import argparse
import json
from pathlib import Path

from yolo_q.cli import add_config_args, config_from_args, run_tool
from yolo_q.training import train


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", default=None, help="continue from a last.pt (same run directory)")
    p.add_argument("--weights", default=None,
                   help="initial weights (yolo_q, official YOLOv6 or state-dict checkpoint)")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume, weights=args.weights)
    out = Path(summary["run_dir"]) / "results.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    m = summary["metrics"]
    print(f"done: {summary['epochs']} epochs -> {summary['run_dir']}")
    if m:
        print(f"final mAP50-95 {m.get('map50_95', float('nan')):.4f}  mAP50 {m.get('map50', float('nan')):.4f}"
              f"  (best mAP50-95 {summary['best_fitness']:.4f} at epoch {summary['best_epoch']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
