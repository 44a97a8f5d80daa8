"""Where does the late-epoch instability come from? Train once and, after every epoch, evaluate
the SAME EMA weights with three kinds of BatchNorm statistics (plus the live model):

* ``ema_copy``    - buffers copied from the live model (yolo_q before #16: ``ema_buffers=copy``);
* ``ema_avg``     - buffers averaged like the weights (official YOLOv6 / Ultralytics; a second
                    ModelEMA kept beside the trainer's; its weights are bit-identical);
* ``ema_reest``   - the EMA weights with BN statistics re-estimated over ``--reest-batches``
                    training batches (``yolo_q.engine.bn_stats.recompute_bn_stats``);
* ``live``        - the model being trained, its own running statistics;
* ``live_reest``  - the live weights, statistics re-estimated.

The training itself is the normal one (``yolo_q.training.train``); this only adds a hook.

    python benchmarks/recipe/bn_diagnostics.py --config configs/demo.yaml --out diag.json \
        train.name=diag train.nominal_batch=32

Writes one JSON object: ``{"config": ..., "epochs": [{"epoch": 1, "ema_copy": mAP, ...}, ...]}``
(mAP50-95 in %) and prints a table.
"""
import argparse
import copy
import json
import time
from pathlib import Path

from yolo_q.cli import add_config_args, config_from_args, run_tool
from yolo_q.data import build_datasets_from_config
from yolo_q.engine import Hook, ModelEMA
from yolo_q.engine.bn_stats import recompute_bn_stats
from yolo_q.eval.runner import make_evaluate_fn
from yolo_q.training import train

VARIANTS = ("ema_copy", "ema_avg", "ema_reest", "live", "live_reest")


class BNDiagnosticsHook(Hook):
    def __init__(self, reest_batches: int, out: Path):
        self.reest_batches, self.out, self.rows = int(reest_batches), Path(out), []
        self.copy_ema = self.avg_ema = self.evaluate_fn = None

    def register(self, trainer) -> None:
        super().register(trainer)
        m = trainer.model
        d, tau = float(trainer.cfg.train.ema_decay), float(trainer.cfg.train.ema_tau)
        self.copy_ema = ModelEMA(m, d, tau, copy_buffers=True)
        self.avg_ema = ModelEMA(m, d, tau, copy_buffers=False)
        _, val_ds, _ = build_datasets_from_config(trainer.cfg, splits=("val",), verbose=False)
        self.evaluate_fn = make_evaluate_fn(trainer.cfg, val_ds)

    def after_step(self) -> None:
        if self.trainer.optimizer_stepped:
            self.copy_ema.update(self.trainer.model)
            self.avg_ema.update(self.trainer.model)

    def _map(self, model) -> float:
        model.eval()
        return round(100 * float(self.evaluate_fn(model)["map50_95"]), 2)

    def _reest(self, model):
        m = copy.deepcopy(model)
        recompute_bn_stats(m, self.trainer.train_loader, self.reest_batches)
        return m

    def after_epoch(self) -> None:
        tr = self.trainer
        t0 = time.time()
        live = copy.deepcopy(tr.model)
        row = {"epoch": tr.epoch + 1, "ema_updates": self.copy_ema.updates,
               "ema_decay": round(self.copy_ema.decay_at(self.copy_ema.updates), 4),
               "ema_copy": self._map(self.copy_ema.ema), "ema_avg": self._map(self.avg_ema.ema),
               "ema_reest": self._map(self._reest(self.avg_ema.ema)),
               "live": self._map(live), "live_reest": self._map(self._reest(live))}
        row["seconds"] = round(time.time() - t0, 1)
        self.rows.append(row)
        print("bn-diag", json.dumps(row), flush=True)
        self.out.write_text(json.dumps({"epochs": self.rows}, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="JSON file for the per-epoch table")
    p.add_argument("--reest-batches", type=int, default=50,
                   help="training batches for the BN re-estimation (default 50)")
    args = p.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    hook = BNDiagnosticsHook(args.reest_batches, Path(args.out))
    summary = train(cfg, extra_hooks=[hook])
    result = {"command_overrides": list(args.overrides or []), "config": args.config,
              "run_dir": summary["run_dir"], "epochs": hook.rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| epoch | " + " | ".join(VARIANTS) + " |")
    for r in hook.rows:
        print(f"| {r['epoch']} | " + " | ".join(f"{r[k]:.2f}" for k in VARIANTS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
