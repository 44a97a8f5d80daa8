"""Generate the synthetic shapes detection benchmark (deterministic: same seed -> identical
files), in both layouts (YOLO txt + COCO JSON), plus its data YAML ``<out>/synthetic.yaml``.

    python datasets/synthetic.py --out data/synthetic --train 2000 --val 200 --size 320 --seed 0
    python datasets/synthetic.py --out data/ref160 --train 4000 --val 100 --size 160 --seed 0 \
        --spec min_size=0.1 small_size=0.15 small_fraction=0.1 max_size=0.45 max_objects=8
    python tools/train.py --config configs/<recipe>.yaml data.dataset=data/synthetic/synthetic.yaml
"""
import argparse
import dataclasses

from yolo_q.cli import run_tool
from yolo_q.data.synthetic import CLASSES, SyntheticSpec, generate


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/synthetic", help="output folder (default data/synthetic)")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=320, help="square image side, multiple of 32 (default 320)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--ext", default=".jpg", choices=[".jpg", ".png"], help="image format")
    p.add_argument("--spec", nargs="*", default=[], metavar="KEY=VALUE",
                   help="difficulty knobs of SyntheticSpec, e.g. --spec min_size=0.1 "
                        "max_objects=8 (as pipeline.synthetic.spec in a config)")
    return p


def parse_spec(items):
    """``["min_size=0.1", "max_objects=8"]`` -> ``{"min_size": 0.1, "max_objects": 8}``, typed
    by :class:`SyntheticSpec`; an unknown key or a bad value stops with one line."""
    fields = {f.name: f.type for f in dataclasses.fields(SyntheticSpec)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "ext":
            raise ValueError(f"--spec {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(k for k in fields if k != 'ext')}")
        kind = int if fields[key] in (int, "int") else float
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"--spec {item!r}: {value!r} is not a{'n int' if kind is int else ' number'}") from None
    return out


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    yaml_path = generate(args.out, args.train, args.val, args.size, args.seed, workers=args.workers,
                         ext=args.ext, **parse_spec(args.spec))
    print(f"wrote {args.train} train + {args.val} val images ({len(CLASSES)} classes) -> {yaml_path}")


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
