"""Pipeline report: markdown tables and PNG plots (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def plot_map_per_stage(rows: List[Dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    names = [r["stage"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r.get("map50_95") or 0 for r in rows], 0.4, label="mAP50-95")
    ax.bar(x + 0.2, [r.get("map50") or 0 for r in rows], 0.4, label="mAP50")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("mAP")
    ax.set_title("mAP per stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sensitivity(rows: List[Dict[str, Any]], path: Path, key: str = "score", top: int = 40) -> Path:
    plt = _plt()
    rows = rows[:top]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(rows))))
    ax.barh(range(len(rows))[::-1], [float(r.get(key) or 0) for r in rows])
    ax.set_yticks(range(len(rows))[::-1], [r["layer"] for r in rows], fontsize=7)
    ax.set_xlabel(key)
    ax.set_title(f"Per-layer quantization sensitivity (top {len(rows)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: Dict[str, List[Dict[str, Any]]], path: Path) -> Path:
    """Loss and mAP per epoch for each run (rows from results.csv)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        if not rows:
            continue
        ep = [r["epoch"] for r in rows]
        loss_keys = [k for k in rows[0] if k not in ("epoch", "lr", "bad_steps", "seconds",
                                                      "map50_95", "map50")]
        total = [sum((r.get(k) or 0) for k in loss_keys) for r in rows]
        a1.plot(ep, total, marker=".", label=f"{name} ({'+'.join(loss_keys)})")
        pts = [(r["epoch"], r["map50_95"]) for r in rows if r.get("map50_95") is not None]
        if pts:
            a2.plot(*zip(*pts), marker="o", label=name)
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.set_title("training loss")
    a2.set_xlabel("epoch"), a2.set_ylabel("mAP50-95"), a2.set_title("validation mAP50-95")
    for a in (a1, a2):
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pr(curves: Dict[str, Dict[str, Any]], path: Path) -> Optional[Path]:
    """Mean precision-recall curve at IoU 0.5 for each evaluated stage."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    drawn = 0
    for name, pr in curves.items():
        if not pr or pr.get("recall") is None:
            continue
        ax.plot(np.asarray(pr["recall"]), np.asarray(pr["mean"]), label=name)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.set_title("PR curve @ IoU 0.5 (mean over classes)")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.02), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
