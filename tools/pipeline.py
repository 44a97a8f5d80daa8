"""The whole float -> INT8 story in one command: synthetic data (when missing) -> float training
-> PTQ (calibration, sensitivity, partial quantization) -> QAT with channel-wise distillation ->
QDQ export (both flavours) -> mAP through torch, ONNX Runtime (FP32, INT8) and TensorRT when
present -> latency table -> ``runs/pipeline/<name>/report.md`` with plots.

    python tools/pipeline.py --config configs/demo.yaml                 # ~5 min on 2 CPU cores
    python tools/pipeline.py --config configs/benchmark.yaml            # RepVGG + RepOpt, <= 60 min
    python tools/pipeline.py --config configs/coco128.yaml              # real images
    python tools/pipeline.py --config configs/demo.yaml --force ptq     # redo PTQ and what follows
    python tools/pipeline.py --config configs/demo.yaml pipeline.qat_distill=false

Re-running continues: a stage whose inputs (files, and the config entries it depends on) are
unchanged is reused (``pipeline.json`` records each stage's result, inputs and time); an
interrupted training or QAT resumes from its ``last.pt`` when it was started for the same
inputs, and starts afresh otherwise. ``--force STAGE`` (repeatable) redoes a stage; stages that consume its outputs
then run again as well. Settings: the ``pipeline`` section of the config.
"""
import argparse

from yolo_q.cli import add_config_args, config_from_args, run_tool
from yolo_q.pipeline import STAGES, run_pipeline


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--force", action="append", default=[], choices=STAGES, metavar="STAGE",
                   help=f"redo this stage ({', '.join(STAGES)}); repeatable")
    p.add_argument("--quiet", action="store_true", help="only the final table")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    res = run_pipeline(cfg, force=args.force, verbose=not args.quiet)
    print("\nmAP50-95 (%) per stage, ONNX Runtime latency (ms):")
    print(res["table"])
    print(f"report: {res['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
