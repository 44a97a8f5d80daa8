"""Ship a finished reference training (issue #16): float16 EMA weights, curve CSV + PNG, sha256,
recorded mAP (full val and the test's check subset) -> benchmarks/reference/models.json.

    python benchmarks/reference/ship.py --run runs/train/ref_repvgg --name yolov6n_repvgg \
        --config configs/reference/yolov6n_repvgg.yaml
    # a run continued in a second stage (configs/reference/*_ft.yaml): one --run per stage
    python benchmarks/reference/ship.py --run runs/train/ref_repvgg --run runs/train/ref_repvgg_ft \
        --name yolov6n_repvgg --config configs/reference/yolov6n_repvgg.yaml
"""
import argparse
import json

from yolo_q.cli import run_tool
from yolo_q.reference import ship_reference


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, action="append",
                   help="training run directory (weights/, results.csv); repeat for the stages "
                        "of a continued run, in order (weights from the last)")
    p.add_argument("--name", required=True, help="stem of the shipped files, e.g. yolov6n_repvgg")
    p.add_argument("--config", required=True, help="the reference config it was trained with")
    p.add_argument("--weights", default="last.pt", help="checkpoint in <run>/weights (last.pt)")
    p.add_argument("--out-dir", default="benchmarks/reference")
    p.add_argument("--check-images", type=int, default=25, help="val images of the test subset")
    a = p.parse_args(argv)
    entry = ship_reference(a.run, a.name, a.config, a.out_dir, a.weights, a.check_images)
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
