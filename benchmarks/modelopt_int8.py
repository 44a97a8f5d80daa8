"""NVIDIA ModelOpt's ONNX INT8 post-training quantization of our float ONNX, for the CPU INT8
comparison (benchmarks/cpu_int8.md). ``nvidia-modelopt[onnx]`` 0.47 needs onnx 1.21 and
onnxruntime-gpu 1.24 (which also runs on CPU), which conflict with our pins, so it runs in its own
virtual environment that this script builds (torch pinned to our CPU build: an unpinned torch
pulls GBs of CUDA wheels):

    # 1. float ONNX + calibration images of the benchmark (our venv; --work-dir keeps the files)
    python tools/benchmark.py speed --weights W.pt --rows ort_fp32 --batch 1 --iters 1 \\
        --work-dir runs/cpu_int8 ...
    # 2. ModelOpt INT8 (builds .venv-modelopt on first use, ~1-2 min)
    python benchmarks/modelopt_int8.py --onnx runs/cpu_int8/fp32.onnx \\
        --calib data/demo/images/train --calib-num 16 --imgsz 640 --out runs/cpu_int8/modelopt_int8.onnx
    # 3. the benchmark loads it as an extra row, in ONNX Runtime and OpenVINO
    python tools/benchmark.py speed ... --extra-onnx modelopt=runs/cpu_int8/modelopt_int8.onnx

Calibration images are letterboxed exactly like the benchmark's (``yolo_q.data.images``) in our
environment, saved as one .npy, and handed to ``modelopt.onnx.quantization.quantize(...,
quantize_mode="int8", calibration_eps=["cpu"])`` in the ModelOpt environment.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
VENV = REPO / ".venv-modelopt"
PACKAGES = ["nvidia-modelopt[onnx]==0.47.*", "onnx==1.21.*", "onnxruntime-gpu==1.24.*"]


def build_venv(venv: Path) -> Path:
    """The ModelOpt environment (created once): python of ``venv``."""
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([py, "-c", "import modelopt.onnx.quantization"],
                                       capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [ln for ln in (REPO / "constraints.txt").read_text().splitlines()
            if ln.startswith(("torch==", "numpy=="))]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "-c", f.name, *PACKAGES], check=True)
    os.unlink(f.name)
    return py


def write_calib(calib: str, num: int, img_size: int, out: Path) -> Path:
    """Letterboxed float calibration images (N, 3, S, S) in [0, 1], as the benchmark's."""
    import numpy as np

    from yolo_q.data.images import image_batches
    arrays = [(b.float() / 255).numpy() for b in image_batches(calib, img_size, 4, limit=num)]
    if not arrays:
        raise ValueError(f"--calib {calib}: no images found")
    np.save(out, np.concatenate(arrays))
    return out


def quantize(onnx_path: str, calib_npy: str, out: str) -> None:
    """Runs inside the ModelOpt environment."""
    import numpy as np
    from modelopt.onnx.quantization import quantize as mo_quantize
    data = np.load(calib_npy)
    mo_quantize(onnx_path, quantize_mode="int8", calibration_data=data,
                calibration_method="max", calibration_eps=["cpu"], output_path=out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="float ONNX (the benchmark's fp32.onnx)")
    p.add_argument("--out", required=True, help="quantized ONNX to write")
    p.add_argument("--calib", help="calibration images (folder/glob/list)")
    p.add_argument("--calib-num", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--venv", default=str(VENV), help=f"ModelOpt environment (default {VENV})")
    p.add_argument("--inner-calib-npy", help=argparse.SUPPRESS)  # set by the outer call
    args = p.parse_args(argv)
    if args.inner_calib_npy:
        quantize(args.onnx, args.inner_calib_npy, args.out)
        return 0
    if not Path(args.onnx).is_file():
        raise SystemExit(f"--onnx {args.onnx}: file not found")
    if not args.calib:
        raise SystemExit("--calib: calibration images are needed")
    with tempfile.TemporaryDirectory() as tmp:
        npy = write_calib(args.calib, args.calib_num, args.imgsz, Path(tmp) / "calib.npy")
        py = build_venv(Path(args.venv))
        subprocess.run([py, str(HERE), "--onnx", args.onnx, "--out", args.out,
                        "--inner-calib-npy", str(npy)], check=True)
    print(f"ModelOpt INT8 -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
