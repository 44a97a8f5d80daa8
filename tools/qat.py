"""Quantization-aware training of a PTQ-calibrated checkpoint, with channel-wise distillation from
the float teacher.

    python tools/qat.py --config configs/demo.yaml --weights runs/ptq/exp/ptq.pt \\
        --teacher runs/train/demo/weights/best.pt
    python tools/qat.py --config configs/demo.yaml --weights ptq.pt --teacher best.pt \\
        quant.qat.epochs=3 quant.distill.weight=0.5 --integer-check --ort-check
    python tools/qat.py --config configs/demo.yaml --weights ptq.pt --teacher best.pt \\
        quant.distill.enabled=false quant.qat.freeze_scales=false      # no CWD, EMA ranges
    python tools/qat.py --resume runs/qat/demo/weights/last.pt          # continue a run

Recipe (``quant.qat``): ``epochs_ratio`` (0.1) of ``train.epochs`` unless ``quant.qat.epochs``,
LR ``lr_ratio`` (0.01) x ``train.lr0`` with a cosine half period down to ``lrf`` (0.01) of it,
no warm-up, EMA, activation scales frozen at the calibrated values (``freeze_scales``).
Distillation: ``quant.distill.{enabled,weight,tau,layers}`` (default: the neck outputs).
Outputs go to ``quant.qat.output_dir/train.name`` (``runs/qat/<name>``, never overwritten):
``config.yaml``, ``weights/{last,best}.pt`` (quantized checkpoints: tools/eval.py, tools/export.py,
yolo_q.load_model), ``tensorboard/`` (loss part ``cwd``), ``results.json``; with ``--ort-check``
also ``weights/best_<flavour>.onnx``. The report compares float (teacher), PTQ (start) and QAT mAP.
"""
import argparse
import json
from pathlib import Path

from yolo_q.cli import run_tool


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None,
                   help="experiment YAML (default: the config stored in --resume / --weights)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. quant.qat.epochs=3 quant.distill.weight=0.5")
    p.add_argument("--weights", default=None,
                   help="PTQ-calibrated checkpoint (tools/ptq.py); not needed with --resume")
    p.add_argument("--teacher", default=None,
                   help="float checkpoint (the PTQ source); needed for distillation")
    p.add_argument("--resume", default=None, help="continue from a QAT last.pt (same run directory)")
    p.add_argument("--integer-check", action="store_true",
                   help="print each layer's max deviation of integer-only arithmetic (in steps)")
    p.add_argument("--ort-check", action="store_true",
                   help="export the result to QDQ ONNX and report its ONNX Runtime INT8 mAP")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip evaluating teacher and student before training (float/PTQ rows)")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    from yolo_q.config import load_config
    from yolo_q.quant.qat import run_qat

    cfg = load_config(args.config) if args.config else None
    summary = run_qat(cfg, weights=args.weights, teacher=args.teacher, resume=args.resume,
                      overrides=args.overrides, evaluate_start=not args.no_baseline,
                      integer_check=args.integer_check, ort_check=args.ort_check)
    out = Path(summary["run_dir"]) / "results.json"
    out.write_text(json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=2,
                              default=str))
    print(f"done: {summary['epochs']} QAT epochs -> {summary['run_dir']} (best: {summary['best']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
