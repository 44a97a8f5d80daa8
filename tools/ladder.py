"""The accuracy ladder of shipped float checkpoints -> one JSON (issue #16, item 3).

    python tools/ladder.py --out benchmarks/reference/ladder.json \\
        --variant repvgg=configs/reference/yolov6n_repvgg.yaml:benchmarks/reference/yolov6n_repvgg.pt \\
        --variant repopt=configs/reference/yolov6n_repopt.yaml:benchmarks/reference/yolov6n_repopt.pt

Per variant: float; PTQ with each calibrator of ``pipeline.calib_methods`` (per-channel
weights); per-tensor weights; partial quantization (``pipeline.max_drop``); QAT without and with
channel-wise distillation; ONNX Runtime INT8 of the QAT+CWD model (onnxruntime flavour) and of
a PTQ model (tensorrt flavour) - the same val images for every row (the pipeline on the given
checkpoint, see ``yolo_q/ladder.py``). Overrides apply to every variant (e.g. a harsher regime:
``quant.high_precision_outputs=false quant.calib=max``). Prints one table per variant.
"""
import argparse

from yolo_q.cli import run_tool
from yolo_q.ladder import format_ladder, parse_variant, run_ladder


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, metavar="NAME=CONFIG:WEIGHTS",
                   help="a ladder variant: its name, config and float checkpoint (repeatable)")
    p.add_argument("--out", default="benchmarks/reference/ladder.json", help="ladder JSON")
    p.add_argument("--data-command", default=None,
                   help="the command that regenerates the val data (default: from the first "
                        "config's pipeline.synthetic)")
    p.add_argument("--quiet", action="store_true", help="only the final tables")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dot-list config overrides for every variant")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    variants = [parse_variant(s) for s in args.variant]
    result = run_ladder(variants, args.out, args.overrides, args.data_command,
                        verbose=not args.quiet)
    print(format_ladder(result))
    print(f"ladder written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
