"""Optimizer (= EMA) steps of a run under yolo_q's stepping rule, with and without the
accumulation ramp, and under the official YOLOv6 rule (re-derived from its trainer's behaviour:
accumulate = round(interp(step, [0, W], [1, 64 / batch])) during warm-up; step when
``step - last_opt_step >= accumulate`` with a global ``last_opt_step``; gradients zeroed at every
epoch start). No training: the counts are a pure function of the schedule.

    python benchmarks/recipe/step_counts.py --images 2000 --batch 16 --nominal 64 --epochs 10 \
        --warmup-epochs 3 --warmup-min 1000
"""
import argparse
import math

import numpy as np

from yolo_q.optim import accumulate_steps, warmup_accumulate, warmup_iterations


def ours(iters, epochs, warmup, batch, nominal, ramp):
    nom = accumulate_steps(nominal, batch)
    steps, it = 0, 0
    for _ in range(epochs):
        since = 0
        for inner in range(iters):
            acc = warmup_accumulate(it, warmup, nominal / batch, nom) if ramp else nom
            since += 1
            if since >= acc or inner == iters - 1:
                steps, since = steps + 1, 0
            it += 1
    return steps


def official(iters, epochs, warmup, batch, nominal):
    steps, last = 0, -1
    for e in range(epochs):
        for s in range(iters):
            cur = s + iters * e
            acc = max(1, round(nominal / batch))
            if cur <= warmup:
                acc = max(1, np.interp(cur, [0, warmup], [1, nominal / batch]).round())
            if cur - last >= acc:
                steps, last = steps + 1, cur
    return steps


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--nominal", type=int, default=64)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--warmup-min", type=int, default=1000)
    a = p.parse_args()
    iters = math.ceil(a.images / a.batch)
    w = warmup_iterations(a.warmup_epochs, iters, a.warmup_min)
    args = (iters, a.epochs, w, a.batch, a.nominal)
    print(f"{iters} iterations/epoch, warm-up {w} iterations, {iters * a.epochs} in all")
    print(f"yolo_q fixed accumulate : {ours(*args, ramp=False)} optimizer/EMA steps")
    print(f"yolo_q ramp (default)   : {ours(*args, ramp=True)} optimizer/EMA steps")
    print(f"official YOLOv6 rule    : {official(*args)} optimizer/EMA steps")


if __name__ == "__main__":
    main()
