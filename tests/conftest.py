import os
import signal
import sys

# idle OpenMP threads sleep instead of spinning (serial runs on 2 shared cores were 5x slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest
import torch

from yolo_q.benchmark import randomize_weights
from yolo_q.engine import Hook

REPO = Path(__file__).resolve().parents[1]
# one thread per xdist worker (the suite runs with -n 2 on 2 cores)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


_SIGCHLD_AT_START = signal.getsignal(signal.SIGCHLD)


@pytest.fixture(autouse=True)
def _restore_sigchld():
    """torch's multi-worker DataLoader installs a process-wide SIGCHLD handler (once per
    process) that inspects its registered worker pids whenever any child exits. In a long-lived
    xdist worker it outlived its loaders and killed the worker natively when a later test
    SIGKILLed a child of its own (tests/reliability/test_atomic_checkpoints.py after the data,
    engine, eval and quant tests). Every test ends with the disposition the session began with."""
    yield
    if signal.getsignal(signal.SIGCHLD) is not _SIGCHLD_AT_START:
        signal.signal(signal.SIGCHLD, _SIGCHLD_AT_START)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and every weight/bias random values, so that fusion
    and export tests exercise real numbers (fresh models have identical zero biases)."""
    return randomize_weights(model, seed, gain=2.0, gamma_min=0.75)


@pytest.fixture
def randomize():
    return randomize_


class StopAfterEpoch(Hook):
    """Simulates a crash after the checkpoint of epoch ``epoch`` was written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def after_epoch(self):
        if self.trainer.epoch == self.epoch:
            raise KeyboardInterrupt("simulated interruption")


@pytest.fixture
def torch_load_calls(monkeypatch):
    """The files every ``torch.load`` of the test reads (resolved paths, in order): how many
    times a checkpoint is read."""
    calls = []
    real = torch.load

    def load(f, *args, **kwargs):
        name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
        calls.append(Path(name).resolve() if name is not None else None)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def pytest_configure(config):
    sys.path.insert(0, str(REPO / "tests"))  # so tests can `from conftest import randomize_`


# a 1-epoch YOLOv6-N at width 1/8 on 64-px synthetic images, with every pipeline stage cheap
# (tools/ladder.py and the reference-shipping tests); format with repo= and tmp=
TINY = """\
_base_: {repo}/configs/yolov6n.yaml
model: {{nc: 8, width_multiple: 0.125}}
data: {{dataset: {tmp}/data/synthetic.yaml, img_size: 64, workers: 0, cache_labels: false,
       augment: {{mosaic: 0.0}}}}
train: {{epochs: 1, batch_size: 8, nominal_batch: 8, device: cpu, progress_bar: false,
        tensorboard: false, lr0: 0.02, warmup_epochs: 0, output_dir: {tmp}/runs/train,
        name: float}}
eval: {{batch_size: 8}}
quant: {{calib: max, calib_batches: 1, sensitivity_images: 8, sensitivity_proxy_images: 4, qat: {{epochs: 1}}}}
pipeline:
  output_dir: {tmp}/runs/pipeline
  synthetic: {{out: {tmp}/data, train: 16, val: 8, size: 64, seed: 1}}
  calib_methods: [max, percentile]
  sensitivity_mode: proxy
  max_drop: 0.3
  speed_iters: 1
  speed_batches: [1]
  eval_batch: 8
"""
