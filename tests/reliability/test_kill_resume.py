"""Kill and resume: tools/train.py (and tools/qat.py) SIGKILLed at a random step, then
``--resume last.pt``, end with exactly the weights (model, EMA, optimizer state) and metrics of
an uninterrupted run with the same seed (bitwise, CPU, one thread)."""
import json
import os
import random
import re
import signal

import torch
from omegaconf import OmegaConf

from reliability_utils import TIMING_KEYS, start_tool, tiny_dataset, train_overrides
from yolo_q.io import load_checkpoint

EPOCHS, ITERS = 3, 4  # 16 images, batch 4
# the kill points come from this seed; every value must pass (YOLOQ_FAULT_SEED=... to explore)
SEED = int(os.environ.get("YOLOQ_FAULT_SEED", "20240611"))


def _config(tmp_path, data_yaml, *extra):
    """A config file with the tiny settings (the resumed run rebuilds the same run from it).
    Mosaic/flip/HSV augmentation and the shuffled loader make each epoch depend on the
    restored epoch seeds; evaluation every epoch makes best.pt/best_fitness depend on the
    restored best-so-far."""
    cfg = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(train_overrides(
        data_yaml, tmp_path / "runs", epochs=EPOCHS, extra=["train.eval_interval=1", *extra])), cfg)
    return cfg


def _kill_at(proc, epoch: int, it: int, log: list) -> None:
    """Read the run's log until it reports step ``it`` of ``epoch`` (1-based), then SIGKILL."""
    marker = re.compile(rf"^epoch {epoch}/{EPOCHS} iter {it}/{ITERS}\b")
    for line in proc.stdout:
        log.append(line)
        if marker.match(line):
            os.kill(proc.pid, signal.SIGKILL)
            break
    log.append(proc.stdout.read())
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(log)[-3000:]


def _finish(proc, log: list) -> None:
    log.append(proc.stdout.read())
    assert proc.wait(timeout=300) == 0, "".join(log)[-3000:]


def _metrics(run_dir):
    m = json.loads((run_dir / "results.json").read_text())
    return ({k: v for k, v in m["metrics"].items() if k not in TIMING_KEYS},
            m["best_fitness"], m["best_epoch"], m["epochs"])


def _same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys() and a, what
    for k, t in a.items():
        assert torch.equal(t, b[k]), (what, k)


def kill_and_resume(tool: str, cfg, runs, start_args=(), resume_args=()):
    """Run ``tool`` uninterrupted (``train.name=full``) alongside a run (``killed``) that is
    SIGKILLed at a random step after its first checkpoint and resumed to the end; assert
    both end identical. Returns ``(kill point, epoch resumed at)``."""
    rng = random.Random(f"{SEED}-{tool}")
    step = rng.randint(ITERS + 1, EPOCHS * ITERS - 1)  # 1-based global step, epoch 2 or 3
    kill = (1 + (step - 1) // ITERS, 1 + (step - 1) % ITERS)
    full = start_tool(tool, "--config", cfg, *start_args, "train.name=full")
    log, full_log = [], []
    killed = start_tool(tool, "--config", cfg, *start_args, "train.name=killed")
    _kill_at(killed, *kill, log)
    last = runs / "killed" / "weights" / "last.pt"
    resume_epoch = load_checkpoint(last)["epoch"] + 1  # never an unreadable last.pt
    _finish(start_tool(tool, "--config", cfg, "--resume", last, *resume_args), log)
    _finish(full, full_log)
    assert any("resumed from" in chunk for chunk in log), "".join(log)[-3000:]

    a, b = load_checkpoint(runs / "full" / "weights" / "last.pt"), load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    assert a["iteration"] == b["iteration"] == EPOCHS * ITERS
    _same_tensors(a["model"], b["model"], "model")
    _same_tensors(a["ema"], b["ema"], "ema")
    assert a["ema_updates"] == b["ema_updates"] == EPOCHS * ITERS
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        _same_tensors(sa[i], sb[i], f"optimizer state {i}")
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    ma, mb = _metrics(runs / "full"), _metrics(runs / "killed")
    assert ma == mb and "map50_95" in ma[0]  # final metrics, best fitness and best epoch
    best_a = load_checkpoint(runs / "full" / "weights" / "best.pt")
    best_b = load_checkpoint(runs / "killed" / "weights" / "best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    _same_tensors(best_a["ema"], best_b["ema"], "best.pt ema")
    return kill, resume_epoch, a


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path, tiny_dataset(tmp_path / "data"))
    kill, resume_epoch, ck = kill_and_resume("train.py", cfg, tmp_path / "runs")
    assert resume_epoch in (1, 2), (kill, resume_epoch)
    # weights moved away from the EMA: training happened (not two untouched initialisations)
    assert not torch.equal(ck["model"]["detect.cls_preds.0.weight"],
                           ck["ema"]["detect.cls_preds.0.weight"])


def _qat_inputs(tmp_path, cfg_path):
    """A float (teacher) checkpoint and a max-calibrated PTQ checkpoint of the tiny model, in
    the agreed formats (the weights need not be trained for an equality test)."""
    from yolo_q.config import config_to_dict, load_config
    from yolo_q import load_model
    from yolo_q.io import save_checkpoint
    from yolo_q.models import build_model
    from yolo_q.quant import calibrate, convert, quant_state
    from yolo_q.quant.ptq import calibration_batches

    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    teacher = save_checkpoint({"model": build_model(cfg).state_dict(),
                               "config": config_to_dict(cfg)}, tmp_path / "float.pt")
    qmodel = convert(load_model(teacher).fuse(), cfg, flavour="tensorrt")
    calibrate(qmodel, calibration_batches(cfg, num_batches=1, batch_size=4), method="max",
              num_batches=1, progress=False)
    calib = save_checkpoint({"model": qmodel.state_dict(), "config": config_to_dict(cfg),
                             "quant": quant_state(qmodel)}, tmp_path / "calibrated.pt")
    return teacher, calib


def test_qat_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path, tiny_dataset(tmp_path / "data"), f"quant.qat.epochs={EPOCHS}",
                  f"quant.qat.output_dir={tmp_path / 'qat'}")
    teacher, calib = _qat_inputs(tmp_path, cfg)
    kill, resume_epoch, ck = kill_and_resume(
        "qat.py", cfg, tmp_path / "qat",
        start_args=["--weights", calib, "--teacher", teacher, "--no-baseline"],
        resume_args=["--no-baseline"])
    assert resume_epoch in (1, 2), (kill, resume_epoch)
    assert ck["quant"] and any(k.endswith("_amax") for k in ck["model"])  # a QAT checkpoint
