"""Evaluate the models of finished ladders again on more val images (issue #16): the ladder's
100 val images resolve differences of ~0.3 mAP at best (see README.md), so the torch and ONNX
Runtime rows of each ladder's pipelines are scored again on a larger val set from the same
generator (its first 100 images are the ladder's), torch rows also with PyTorch's native
convolution instead of oneDNN (the same INT8 model under another float summation order).

    python datasets/synthetic.py --out data/ref160_val1000 --train 8 --val 1000 --size 160 --seed 0 \\
        --spec min_size=0.1 small_size=0.15 small_fraction=0.1 max_size=0.45 max_objects=8
    python benchmarks/reference/reeval.py --val-data data/ref160_val1000/synthetic.yaml \\
        --ladder benchmarks/reference/ladder.json benchmarks/reference/ladder_harsh.json \\
        --out benchmarks/reference/ladder_val1000.json
"""
import argparse
from pathlib import Path

from yolo_q.cli import run_tool
from yolo_q.io import write_json
from yolo_q.ladder import reevaluate_ladder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val-data", required=True, help="data YAML whose val split is scored")
    p.add_argument("--ladder", nargs="+", required=True, help="ladder JSONs already run")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--output-dir", default="runs/pipeline", help="the ladders' pipeline.output_dir")
    p.add_argument("--no-native-conv", action="store_true", help="skip the native-conv column")
    a = p.parse_args(argv)
    for f in [a.val_data, *a.ladder]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f} does not exist")
    result = {"val_data": a.val_data, "ladders": {}}
    for lad in a.ladder:
        res = reevaluate_ladder(lad, a.val_data, a.output_dir, native_conv=not a.no_native_conv)
        result["ladders"][Path(lad).stem] = res
        write_json(a.out, result)  # after every ladder
        for name, rows in res.items():
            print(f"\n### {Path(lad).stem} / {name}\n\n| stage | runtime | ladder (100) | "
                  f"val set | native conv |\n|---|---|---:|---:|---:|")
            for r in rows:
                print(f"| {r['stage']} | {r['runtime']} | {r['ladder']} | {r['map50_95']} | "
                      f"{r.get('native_conv', '')} |")
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
