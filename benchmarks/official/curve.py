"""The side-by-side curves (issue #16, item 1): the official trainer's per-epoch validation mAP
and training losses (read from its TensorBoard event files; every sitting of a resumed run
writes its own file) next to ours (a results.csv), as one CSV and one plot.

    python benchmarks/official/curve.py --official ../official_runs/ref160_30ep \
        --ours benchmarks/reference/yolov6n_repvgg.csv --out benchmarks/official/ref160_30ep

``--out`` is a stem: ``<stem>.csv`` (epoch, official_map50_95, ours_map50_95, official_map50,
ours_map50; %) and ``<stem>.png``. Our curve is cut at the official run's last epoch (the
shipped curve may continue in a second stage). Both trainers' in-training evaluations use
their own scorers; the final checkpoints are scored by one code afterwards (README).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List

from yolo_q.engine.hooks import read_results_csv
from yolo_q.report import plot_curves

# official TensorBoard tag -> our results.csv column
TAGS = {"val/mAP@0.50:0.95": "map50_95", "val/mAP@0.5": "map50", "train/cls_loss": "cls",
        "train/iou_loss": "iou", "train/dist_focalloss": "dfl"}


def official_rows(run_dir: Path) -> List[Dict[str, float]]:
    """One row per epoch (1-based, the official trainer's TensorBoard step) from every event
    file in ``run_dir``; a later file wins where sittings overlap (a resumed epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = sorted(run_dir.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"error: no TensorBoard event files in {run_dir}")
    by_epoch: Dict[int, Dict[str, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag, key in TAGS.items():
            if tag in acc.Tags()["scalars"]:
                for e in acc.Scalars(tag):
                    by_epoch.setdefault(int(e.step), {"epoch": float(e.step)})[key] = e.value
    return [by_epoch[k] for k in sorted(by_epoch)]


def _pct(v):
    return "" if v is None else f"{100 * v:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="the official run directory (save_dir)")
    p.add_argument("--ours", required=True, help="our results.csv (or a shipped <model>.csv)")
    p.add_argument("--out", required=True, help="output stem (<stem>.csv, <stem>.png)")
    a = p.parse_args(argv)
    if not Path(a.ours).is_file():
        raise SystemExit(f"error: {a.ours} does not exist")
    off = official_rows(Path(a.official))
    last = max(int(r["epoch"]) for r in off)
    ours = [r for r in read_results_csv(a.ours) if r["epoch"] <= last]
    mine = {int(r["epoch"]): r for r in ours}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,official_map50_95,ours_map50_95,official_map50,ours_map50"]
    for r in off:
        o = mine.get(int(r["epoch"]), {})
        lines.append(f"{int(r['epoch'])},{_pct(r.get('map50_95'))},{_pct(o.get('map50_95'))},"
                     f"{_pct(r.get('map50'))},{_pct(o.get('map50'))}")
    out.with_suffix(".csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_curves({"official YOLOv6": off, "yolo_q": ours}, out.with_suffix(".png"))
    print(f"{len(off)} official epochs, {len(ours)} of ours -> {out.with_suffix('.csv')}, "
          f"{out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
