"""Where a quantized model (PTQ or QAT checkpoint) loses against float: its val mAP with groups
of quantizers switched off, one group at a time (the weights stay as trained).

    python benchmarks/reference/qat_gap.py --config configs/reference/yolov6n_repvgg.yaml \
        --weights runs/pipeline/ladder_repvgg/qat/weights/best.pt \
        data.dataset=data/ref160_v1000/synthetic.yaml

Rows: every quantizer on; weights only / activations only quantized; none (the trained weights
in float); then the activations of one part float at a time: backbone, neck, and each level of
the detection head (``detect.*.<level>.*``). mAP50-95 in %.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from yolo_q import load_model  # noqa: E402
from yolo_q.config import load_config  # noqa: E402
from yolo_q.data import build_datasets_from_config  # noqa: E402
from yolo_q.eval.runner import make_evaluate_fn  # noqa: E402
from yolo_q.quant import activation_quantizers, weight_quantizers  # noqa: E402

PARTS = (("backbone", r"^backbone\."), ("neck", r"^neck\."))


def _switch(quantizers: Iterable, on: bool) -> None:
    for q in quantizers:
        q.enable() if on else q.disable()


def breakdown(model, evaluate: Callable[[object], float], levels: int = 3) -> Dict[str, float]:
    """``{row: evaluate(model)}`` for the rows of the module doc; ``model`` is left as given
    (every quantizer that was on is on again)."""
    acts, ws = activation_quantizers(model), weight_quantizers(model)
    on = [q for q in list(acts.values()) + list(ws.values()) if q.enabled]
    acts_on = {n: q for n, q in acts.items() if q.enabled}
    ws_on = [q for q in ws.values() if q.enabled]
    groups: List[tuple] = [(f"{p} activations float", r) for p, r in PARTS]
    groups += [(f"head level {i} activations float", rf"^detect\.[^.]+\.{i}\.")
               for i in range(levels)]
    rows = {"all quantized": evaluate(model)}
    try:
        _switch(acts_on.values(), False)
        rows["weights only"] = evaluate(model)
        _switch(ws_on, False)
        rows["none (trained weights, float)"] = evaluate(model)
        _switch(acts_on.values(), True)
        rows["activations only"] = evaluate(model)
        _switch(ws_on, True)
        for name, pattern in groups:
            off = [q for n, q in acts_on.items() if re.search(pattern, n)]
            _switch(off, False)
            rows[name] = evaluate(model)
            _switch(off, True)
    finally:
        _switch(on, True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights", required=True, help="a PTQ or QAT checkpoint")
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    _, val, _ = build_datasets_from_config(cfg, splits=("val",), verbose=False)
    evaluate_fn = make_evaluate_fn(cfg, val)
    model = load_model(args.weights).eval()
    rows = breakdown(model, lambda m: 100 * evaluate_fn(m)["map50_95"])
    print(f"{args.weights} ({len(val)} val images)")
    for name, v in rows.items():
        print(f"  {name:<36} {v:6.2f}  {v - rows['all quantized']:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
