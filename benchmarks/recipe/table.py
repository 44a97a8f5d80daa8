"""Markdown table of a bn_diagnostics.py JSON: ``python benchmarks/recipe/table.py d2.json``."""
import json
import sys

COLS = ("ema_copy", "ema_avg", "ema_reest", "live", "live_reest")

rows = json.load(open(sys.argv[1]))["epochs"]
print("| epoch | EMA updates | EMA decay | " + " | ".join(COLS) + " |")
print("|---:|---:|---:|" + "---:|" * len(COLS))
for r in rows:
    print(f"| {r['epoch']} | {r['ema_updates']} | {r['ema_decay']:.3f} | "
          + " | ".join(f"{r[c]:.2f}" for c in COLS) + " |")
