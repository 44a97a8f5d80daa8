"""Shared helpers of the fault-injection tests: tiny synthetic data, tiny-model configs and
subprocesses that run the code under test (this checkout, one thread, so runs are bitwise
reproducible on CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
# eval timing fields differ between runs; everything else in the metrics must match exactly
TIMING_KEYS = ("seconds", "infer_seconds", "post_seconds", "ms_per_image")

_DATA: Dict[tuple, Path] = {}


def tiny_dataset(root: Path, n_train: int = 16, n_val: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Synthetic shapes data under ``root`` (generated once per process and ``root``)."""
    key = (str(root), n_train, n_val, size, seed)
    if key not in _DATA:
        from yolo_q.data.synthetic import generate
        _DATA[key] = generate(root, n_train=n_train, n_val=n_val, size=size, seed=seed, workers=1)
    return _DATA[key]


def train_overrides(data_yaml, output_dir, name: str = "exp", epochs: int = 1,
                    extra: Sequence[str] = ()) -> List[str]:
    """Tiny YOLOv6 (width 0.125, depth 0.33) at 64 px, batch 4, CPU, no TensorBoard/bar."""
    return [f"data.dataset={data_yaml}", "data.img_size=64", "data.workers=0",
            "model.width_multiple=0.125", "model.depth_multiple=0.33", "model.nc=8",
            f"train.epochs={epochs}", "train.batch_size=4", "train.nominal_batch=4",
            "train.warmup_epochs=1", "train.warmup_min_iters=0", "train.lr0=0.02",
            "train.device=cpu", "train.tensorboard=false", "train.progress_bar=false",
            "train.log_interval=1", f"train.output_dir={output_dir}", f"train.name={name}",
            *extra]


def tiny_cfg(data_yaml, output_dir, name: str = "exp", epochs: int = 1, extra: Sequence[str] = ()):
    from yolo_q.config import load_config
    return load_config(None, train_overrides(data_yaml, output_dir, name, epochs, extra))


def subprocess_env(**extra: str) -> Dict[str, str]:
    """Environment for child processes: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               OMP_WAIT_POLICY="PASSIVE")
    env.update(extra)
    return env


def run_tool(tool: str, *args, cwd: Optional[Path] = None, timeout: float = 300):
    """``python tools/<tool> args...`` to completion; returns the CompletedProcess."""
    return subprocess.run([PY, str(REPO / "tools" / tool), *map(str, args)], cwd=cwd or REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def start_tool(tool: str, *args, cwd: Optional[Path] = None) -> subprocess.Popen:
    """Start ``python tools/<tool> args...``; stdout+stderr merged into a text pipe."""
    return subprocess.Popen([PY, str(REPO / "tools" / tool), *map(str, args)], cwd=cwd or REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
