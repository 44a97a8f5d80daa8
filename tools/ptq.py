"""Post-training quantization: calibrate, compare float vs PTQ mAP, rank layer sensitivity,
keep the most sensitive layers float.

    python tools/ptq.py --config configs/demo.yaml --weights runs/train/demo/weights/best.pt
    python tools/ptq.py --config configs/demo.yaml --weights best.pt --calib entropy --per-tensor-weights
    python tools/ptq.py --config configs/demo.yaml --weights best.pt --sensitivity --sensitivity-mode both
    python tools/ptq.py --config configs/demo.yaml --weights best.pt --sensitivity --sensitivity-mode both --sensitivity-gain 16
    python tools/ptq.py --config configs/demo.yaml --weights best.pt --skip-top 3
    python tools/ptq.py --config configs/demo.yaml --weights best.pt --max-drop 0.3 quant.sensitivity_images=100

``--max-drop D`` is in mAP50-95 percentage points (0.3: at most 0.003 below float on the
``quant.sensitivity_images`` validation subset). Outputs go to ``--project/--name``
(``runs/ptq/exp``, ``exp2``, ...): ``config.yaml`` (resolved; quant.skip_layers includes the float
layers), ``ptq.pt`` (loads with ``yolo_q.load_model`` / ``tools/eval.py --weights``),
``sensitivity.csv``/``.json``, ``summary.json``. Export the result with ``tools/export.py``.
"""
import argparse

from yolo_q.cli import config_from_args, run_tool
from yolo_q.engine.rundir import discard_unused_run_dirs, make_run_dir
from yolo_q.io import check_checkpoint_file, check_output_file
from yolo_q.quant.ptq import run_ptq


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None,
                   help="experiment YAML (default: the config stored in --weights)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. quant.calib_batches=8 quant.sensitivity_images=100")
    p.add_argument("--weights", required=True, help="float checkpoint (EMA weights are used)")
    p.add_argument("--calib", choices=("max", "percentile", "mse", "entropy"), default=None,
                   help="activation calibrator (default: quant.calib)")
    p.add_argument("--per-tensor-weights", action="store_true",
                   help="one weight scale per layer instead of per output channel")
    p.add_argument("--flavour", choices=("tensorrt", "onnxruntime"), default=None,
                   help="Q/DQ placement (default: quant.flavour, else export.flavour)")
    p.add_argument("--sensitivity", action="store_true", help="per-layer sensitivity analysis")
    p.add_argument("--sensitivity-mode", choices=("proxy", "exact", "both"), default="proxy",
                   help="proxy: output error on calibration images (fast); exact: COCO mAP on "
                        "quant.sensitivity_images val images; both: also speed-up and Spearman")
    p.add_argument("--sensitivity-gain", type=float, default=None, metavar="G",
                   help="multiply the probed layer's INT8 error by G during the analysis "
                        "(default quant.sensitivity_gain, 1): lifts single-layer effects above "
                        "the mAP noise of a small val subset; partial search stays real INT8")
    p.add_argument("--all-but", action="store_true",
                   help="exact mode: also measure 'all layers but this one quantized'")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--skip-top", type=int, default=None, metavar="K",
                      help="keep the K most sensitive layers float")
    part.add_argument("--max-drop", type=float, default=None, metavar="D",
                      help="fewest float layers keeping mAP50-95 within D percentage points of "
                           "float (0.3 = 0.003 mAP)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="--max-drop: evaluate at most this many candidate sets (default: all)")
    p.add_argument("--integer-check", action="store_true",
                   help="print each layer's max deviation of integer-only arithmetic (in steps)")
    p.add_argument("--out", default=None, help="checkpoint path (default: <run dir>/ptq.pt)")
    p.add_argument("--project", default="runs/ptq", help="parent folder of the run directory")
    p.add_argument("--name", default="exp", help="run directory name (exp, exp2, ...)")
    p.add_argument("--exist-ok", action="store_true", help="reuse an existing run directory")
    p.add_argument("--eval-images", type=int, default=None,
                   help="evaluate on the first N validation images only (default: all)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = get_args_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    check_checkpoint_file(args.weights)
    if args.out:
        check_output_file(args.out, [args.weights], what="--out checkpoint")
    with discard_unused_run_dirs():
        run_dir = make_run_dir(args.project, args.name, args.exist_ok)
        print(f"run directory: {run_dir}")
        summary = _run(cfg, args, run_dir)
    print(f"checkpoint: {summary['files']['checkpoint']}  (summary: {summary['files']['summary']})")
    return 0


def _run(cfg, args, run_dir):
    return run_ptq(cfg, args.weights, calib=args.calib,
                   per_tensor_weights=args.per_tensor_weights, sensitivity=args.sensitivity,
                   sensitivity_mode=args.sensitivity_mode, all_but=args.all_but,
                   skip_top=args.skip_top, max_drop=args.max_drop,
                   max_search_steps=args.max_steps, out=args.out,
                   run_dir=run_dir, flavour=args.flavour, integer_check=args.integer_check,
                   eval_images=args.eval_images, device=args.device,
                   sensitivity_gain=args.sensitivity_gain, progress=not args.no_progress)


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
