"""Generate the synthetic shapes detection benchmark (deterministic: same seed -> identical
files), in both layouts (YOLO txt + COCO JSON), plus its data YAML ``<out>/synthetic.yaml``.

    python datasets/synthetic.py --out data/synthetic --train 2000 --val 200 --size 320 --seed 0
    python tools/train.py --config configs/<recipe>.yaml data.dataset=data/synthetic/synthetic.yaml
"""
import argparse

from yolo_q.cli import run_tool
from yolo_q.data.synthetic import CLASSES, generate


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/synthetic", help="output folder (default data/synthetic)")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=320, help="square image side, multiple of 32 (default 320)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--ext", default=".jpg", choices=[".jpg", ".png"], help="image format")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    yaml_path = generate(args.out, args.train, args.val, args.size, args.seed, workers=args.workers,
                         ext=args.ext)
    print(f"wrote {args.train} train + {args.val} val images ({len(CLASSES)} classes) -> {yaml_path}")


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
