"""Evaluate one checkpoint's (EMA) weights with BatchNorm statistics from different sources:
as stored, and re-estimated (``yolo_q.engine.bn_stats.recompute_bn_stats``) over N training
batches with mosaic on, with mosaic off (the close-mosaic epochs' distribution), and without any
augmentation. Shows whether the stored statistics (momentum-0.1 average of the last batches)
fit the weights, and how much the close-mosaic distribution shift moves them.

    python benchmarks/recipe/bn_reestimate.py --weights runs/train/d1/weights/last.pt --batches 40
"""
import argparse
import copy
import json

from yolo_q.cli import run_tool
from yolo_q.config import config_from_dict
from yolo_q.data import build_dataloader, build_datasets_from_config
from yolo_q.engine.bn_stats import recompute_bn_stats
from yolo_q.eval.runner import make_evaluate_fn
from yolo_q.io import load_state_into, read_checkpoint_any
from yolo_q.models import build_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    ck = read_checkpoint_any(a.weights)  # EMA weights when present
    cfg = config_from_dict(ck["config"])
    model = build_model(cfg)
    load_state_into(model, ck["model"], a.weights)
    train_ds, val_ds, _ = build_datasets_from_config(cfg, verbose=False)
    evaluate = make_evaluate_fn(cfg, val_ds)

    def score(m):
        return round(100 * evaluate(m.eval())["map50_95"], 2)

    def reest(mosaic, augment=True):
        train_ds.augment = augment
        train_ds.set_epoch(0, None)
        train_ds.mosaic_enabled = mosaic
        loader = build_dataloader(train_ds, int(cfg.train.batch_size), True, 0, seed=1)
        m = copy.deepcopy(model)
        recompute_bn_stats(m, loader, a.batches)
        return score(m)

    res = {"weights": a.weights, "batches": a.batches, "stored": score(model),
           "reest_mosaic": reest(True), "reest_no_mosaic": reest(False),
           "reest_no_augment": reest(False, augment=False)}
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
