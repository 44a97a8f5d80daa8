"""Speed benchmarks (recorded under benchmarks/; never asserted in tests).

Inference latency/throughput of every runtime (torch, ONNX Runtime with our session options and
with its defaults, OpenVINO, NNCF, quantize_static, TensorRT where present), round-robin in one
run, speed-ups vs ONNX Runtime FP32 and vs the fastest FP32 row, mAP with --val
(CPU INT8 comparison: see benchmarks/cpu_int8.md):
    python tools/benchmark.py speed --config configs/yolov6n.yaml --imgsz 640 --batch 1 32 --threads 2
    python tools/benchmark.py speed --config configs/demo.yaml --weights runs/train/demo/weights/best.pt \
        --quant-weights runs/ptq/exp/ptq.pt --calib data/synthetic/images/val --json speed.json
    python tools/benchmark.py speed --config configs/yolov6n.yaml --rows ort_fp32 ort_int8_onnxruntime ort_quantize_static

Training step (forward + DetectionLoss + backward + SGD step) images/s on random data:
    python tools/benchmark.py train --config configs/yolov6n.yaml --batch 8 --imgsz 320 --threads 2

Where OpenVINO spends the time, layer by layer (minimum of each layer over the runs: steady
even on a shared machine), for model files such as those --work-dir keeps:
    python tools/benchmark.py ov-layers runs/bench/int8_onnxruntime_s8.onnx \
        runs/bench/int8_nncf.xml --batch 32 --iters 20

Without --weights the model has random weights (biases randomized: see the export pitfall in
benchmarks/README.md). INT8 rows without --quant-weights come from a quick max-calibration PTQ of
the float model on --calib images (default: random images).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep (interleaved runs)
import argparse  # noqa: E402

from yolo_q.benchmark import (DEFAULT_ROWS, format_ov_layer_times, format_speed_markdown,
                              format_speed_table, format_train_table, ov_layer_times,
                              parse_extra_onnx, speed_benchmark, train_benchmark)  # noqa: E402
from yolo_q.cli import config_from_args, run_tool  # noqa: E402
from yolo_q.io import check_output_dir, check_output_file, write_json  # noqa: E402


def _common(p, batch_default, imgsz_default):
    p.add_argument("--config", "-c", default="configs/yolov6n.yaml",
                   help="model config (default: configs/yolov6n.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--imgsz", type=int, default=imgsz_default)
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime intra-op threads")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{speed,train,ov-layers}")
    s = sub.add_parser("speed", help="inference latency / throughput of every runtime",
                       description="Inference latency (median, p90) and throughput per runtime.")
    _common(s, 1, 640)
    s.add_argument("--weights", default=None, help="float checkpoint (default: random weights)")
    s.add_argument("--quant-weights", nargs="*", default=[],
                   help="quantized checkpoints (PTQ/QAT) for the INT8 rows of their flavour")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    s.add_argument("--iters", type=int, default=20, help="timed rounds at batch 1")
    s.add_argument("--iters-large", type=int, default=5, help="timed rounds at larger batches")
    s.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=DEFAULT_ROWS,
                   metavar="ROW", help=f"backends to time (default all: {' '.join(DEFAULT_ROWS)})")
    s.add_argument("--calib", default=None, metavar="DIR|GLOB|LIST",
                   help="calibration images for quick PTQ and quantize_static (default random)")
    s.add_argument("--calib-num", type=int, default=16)
    s.add_argument("--calib-method", default="max", choices=("max", "percentile", "mse", "entropy"))
    s.add_argument("--ort-spin", action="store_true",
                   help="let ONNX Runtime's idle threads busy-wait (ORT default; off here so they "
                        "do not slow the torch rows interleaved with them)")
    s.add_argument("--work-dir", default=None, help="keep the exported ONNX files here")
    s.add_argument("--extra-onnx", nargs="*", default=[], metavar="NAME=PATH",
                   help="ONNX files quantized elsewhere (e.g. benchmarks/modelopt_int8.py), "
                        "timed in ONNX Runtime and OpenVINO")
    s.add_argument("--val", nargs="?", const=True, default=None, metavar="DATA_YAML",
                   help="also measure each row's COCO mAP50-95 on this data YAML's val images "
                        "(no value: the config's data.dataset)")
    s.add_argument("--val-images", type=int, default=None, help="first N val images only")
    s.add_argument("--markdown", action="store_true", help="also print a markdown table")
    t = sub.add_parser("train", help="training-step images/s",
                       description="Training step (forward + loss + backward + SGD) images/s.")
    _common(t, 8, 320)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    o = sub.add_parser("ov-layers", help="OpenVINO per-layer times of model files",
                       description="OpenVINO CPU per-layer times (minimum per layer over the "
                                   "runs, round-robin over the files), grouped.")
    o.add_argument("files", nargs="+", help="ONNX or OpenVINO IR (.xml) files")
    o.add_argument("--batch", type=int, default=1)
    o.add_argument("--iters", type=int, default=10)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--imgsz", type=int, default=640, help="input size of a dynamic-shape model")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.subparsers = {"speed": s, "train": t, "ov-layers": o}
    return p


def parse_args(argv=None):
    """Subcommand, then its flags and key=value overrides in any order (argparse's intermixed
    parsing does not support subparsers, so the subcommand's own parser does it)."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    p = get_args_parser()
    if not argv or argv[0] not in p.subparsers:
        p.parse_args(argv)  # --help, or the usage error naming the choices
        p.error("the first argument must be a subcommand: speed, train or ov-layers")
    args = p.subparsers[argv[0]].parse_intermixed_args(argv[1:])
    args.cmd = argv[0]
    return args


def _ov_layers(args):
    from pathlib import Path
    for f in args.files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: model file not found")
    if args.json:
        check_output_file(args.json, args.files, what="--json file")
    res = ov_layer_times(args.files, batch=args.batch, iters=args.iters, threads=args.threads,
                         img_size=args.imgsz, seed=args.seed)
    print(format_ov_layer_times(res))
    if args.json:
        write_json(args.json, res)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "ov-layers":
        return _ov_layers(args)
    cfg = config_from_args(args)
    inputs = [getattr(args, "weights", None), *getattr(args, "quant_weights", [])]
    if args.json:
        check_output_file(args.json, inputs, what="--json file")
    if getattr(args, "work_dir", None):
        check_output_dir(args.work_dir, inputs, what="--work-dir directory")
    if args.cmd == "speed":
        res = speed_benchmark(cfg, weights=args.weights, quant_weights=args.quant_weights,
                              img_size=args.imgsz, batches=args.batch, threads=args.threads,
                              warmup=args.warmup, iters=args.iters, iters_large=args.iters_large,
                              rows=args.rows, calib=args.calib, calib_num=args.calib_num,
                              calib_method=args.calib_method, work_dir=args.work_dir,
                              seed=args.seed, ort_spin=args.ort_spin,
                              extra_onnx=parse_extra_onnx(args.extra_onnx), val=args.val,
                              val_images=args.val_images)
        print(format_speed_table(res))
        if args.markdown:
            print(format_speed_markdown(res))
    else:
        res = train_benchmark(cfg, batch=args.batch, img_size=args.imgsz, threads=args.threads,
                              warmup=args.warmup, steps=args.steps, seed=args.seed)
        print(format_train_table(res))
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
