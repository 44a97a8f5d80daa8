"""``train(resume=last.pt)`` reads ``last.pt`` once (the safety check before the run directory,
the BN settings of the run and the trainer's state all come from that one read) and still
continues exactly where the run stopped. QAT: tests/quant/test_qat_run.py."""
import sys
from pathlib import Path

import pytest
import torch

from conftest import StopAfterEpoch
from yolo_q.io import load_checkpoint
from yolo_q.training import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from reliability_utils import tiny_cfg, tiny_dataset  # noqa: E402


def test_resume_reads_last_pt_once_and_continues_exactly(tmp_path, torch_load_calls):
    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    runs = tmp_path / "runs"
    full = train(tiny_cfg(data, runs, "full", epochs=2), verbose=False)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(data, runs, "cut", epochs=2), extra_hooks=[StopAfterEpoch(0)],
              verbose=False)
    last = runs / "cut" / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 0
    torch_load_calls.clear()
    resumed = train(tiny_cfg(data, runs, "cut", epochs=2), resume=str(last), verbose=False)
    assert torch_load_calls.count(last.resolve()) == 1
    a, b = load_checkpoint(full["last"]), load_checkpoint(resumed["last"])
    assert a["epoch"] == b["epoch"] == 1 and a["iteration"] == b["iteration"]
    for which in ("model", "ema"):
        assert a[which].keys() == b[which].keys()
        for k in a[which]:
            assert torch.allclose(a[which][k], b[which][k], rtol=1e-5, atol=1e-7), (which, k)
