"""Pipeline report: markdown tables and PNG plots (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from .benchmark import cpu_line, format_speed_markdown
from .engine.hooks import read_results_csv


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


def stage_deltas(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What the stage plot shows: for each evaluated (stage, runtime) pair once, the change of
    mAP50-95 and mAP50 vs the float torch row, in mAP points (%); ``float`` holds that row's
    absolute values (None when there is no float torch row: then nothing to plot)."""
    ref = next((r for r in rows if r["stage"] == "float" and r["runtime"].startswith("torch")
                and r.get("map50_95") is not None), None)
    out: Dict[str, Any] = {"float": None, "stages": []}
    if ref is None:
        return out
    out["float"] = {"map50_95": 100 * ref["map50_95"], "map50": 100 * (ref.get("map50") or 0)}
    seen = set()
    for r in rows:
        label = f"{r['stage']} / {r['runtime']}"
        if r.get("skipped") or r.get("map50_95") is None or label in seen or r is ref:
            continue
        seen.add(label)
        out["stages"].append({"stage": label,
                              "d_map50_95": 100 * (r["map50_95"] - ref["map50_95"]),
                              "d_map50": 100 * ((r.get("map50") or 0) - (ref.get("map50") or 0))})
    return out


def plot_map_per_stage(deltas: Dict[str, Any], path: Path) -> Optional[Path]:
    """Bars of Δ mAP50-95 / Δ mAP50 vs float (points) per stage and runtime, each labelled with
    its value; float's absolute mAP in the title. None when there is no float row."""
    if deltas["float"] is None:
        return None
    plt = _plt()
    rows = deltas["stages"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    x = np.arange(len(rows))
    for off, key, label in ((-0.2, "d_map50_95", "Δ mAP50-95"), (0.2, "d_map50", "Δ mAP50")):
        vals = [r[key] for r in rows]
        bars = ax.bar(x + off, vals, 0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:+.2f}" for v in vals], fontsize=7, padding=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [r["stage"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("Δ mAP vs float (points)")
    f = deltas["float"]
    ax.set_title(f"mAP change vs float (float: mAP50-95 {f['map50_95']:.2f}, "
                 f"mAP50 {f['map50']:.2f})")
    lim = max([abs(r[k]) for r in rows for k in ("d_map50_95", "d_map50")] + [0.1]) * 1.3
    ax.set_ylim(-lim, lim)
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


def plot_curves(runs: Dict[str, List[Dict[str, Any]]], path: Path,
                offsets: Optional[Dict[str, float]] = None) -> Path:
    """Loss and mAP per epoch for each run (rows from results.csv); ``offsets`` shifts a run's
    epochs (QAT continues after the float epochs)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    offsets = offsets or {}
    for name, rows in runs.items():
        if not rows:
            continue
        off = offsets.get(name, 0)
        rows = [dict(r, epoch=r["epoch"] + off) for r in rows]
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


# ------------------------------------------------------------------------------ pipeline report
def _read_csv(path) -> List[Dict[str, Any]]:
    """A CSV with text and number columns (sensitivity.csv) as dicts; [] when absent."""
    import csv
    p = Path(path) if path else None
    if p is None or not p.exists():
        return []
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v if v not in ("", None) else None
    return [{k: num(v) for k, v in r.items()} for r in rows]


def _curve(path) -> List[Dict[str, Any]]:
    """A trainer's results.csv (:func:`yolo_q.engine.hooks.read_results_csv`); [] when absent
    (e.g. ``pipeline.float_weights``: no float training)."""
    return read_results_csv(path) if path and Path(path).exists() else []


def _pct(v: Optional[float]) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _delta(v: Optional[float], ref: Optional[float]) -> str:
    return "" if v is None or ref is None else f"{100 * (v - ref):+.2f}"


def map_table(rows: List[Dict[str, Any]]) -> str:
    """The per-stage x runtime mAP table (markdown; mAP in %, change vs float torch)."""
    ref = next((r.get("map50_95") for r in rows
                if r["stage"] == "float" and r["runtime"].startswith("torch")), None)
    out = ["| stage | runtime | mAP50-95 | mAP50 | Δ mAP50-95 vs float |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            out.append(f"| {r['stage']} | {r['runtime']} | skipped: {r['skipped']} | | |")
            continue
        out.append(f"| {r['stage']} | {r['runtime']} | {_pct(r.get('map50_95'))} | "
                   f"{_pct(r.get('map50'))} | {_delta(r.get('map50_95'), ref)} |")
    return "\n".join(out)


def summary_rows(results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per variant: float / PTQ / partial / QAT mAP (torch) and ORT INT8 mAP, plus
    ORT FP32 vs INT8 latency at the first batch size."""
    out = []
    for variant, res in results.items():
        ev = res["eval"]["rows"]

        def get(stage, runtime_prefix):
            """mAP50-95 of the eval row of ``stage`` ("partial": its "partial (k float)" row)."""
            for r in ev:
                name = "partial" if r["stage"].startswith("partial") else r["stage"]
                if name == stage and r["runtime"].startswith(runtime_prefix) and not r.get("skipped"):
                    return r.get("map50_95")
            return None
        own = next(iter(res["export"]["int8_source"]))
        sp = {r["row"]: r for r in res["speed"]["rows"]
              if r["batch"] == res["speed"]["rows"][0]["batch"]}
        fp32 = sp.get("ort_fp32", {}).get("median_ms")
        int8 = sp.get(f"ort_int8_{own}", {}).get("median_ms")
        out.append({
            "variant": variant, "float": get("float", "torch"), "ptq": get("ptq", "torch"),
            "partial": get("partial", "torch"),
            "partial_float_layers": len(res["ptq"].get("skip_layers") or []),
            "qat": get("qat", "torch"),
            "qat_cwd": get("qat+cwd", "torch"),
            "ort_fp32": get("float", "ORT FP32"), "ort_int8": get("qat+cwd", f"ORT INT8 ({own}")
            or get("qat", f"ORT INT8 ({own}") or get("ptq", f"ORT INT8 ({own}"),
            "ort_fp32_ms": fp32, "ort_int8_ms": int8,
            "speedup": (fp32 / int8) if fp32 and int8 else None,
            "batch": res["speed"]["rows"][0]["batch"] if res["speed"]["rows"] else None,
            "img_size": res["speed"]["rows"][0]["img_size"] if res["speed"]["rows"] else None,
        })
    return out


def format_summary(rows: List[Dict[str, Any]], markdown: bool = True) -> str:
    """The headline table: mAP50-95 (%) per stage and ORT latency, one row per variant."""
    heads = ["variant", "float", "PTQ", "partial PTQ", "QAT", "QAT+CWD", "ORT FP32",
             "ORT INT8", "FP32 ms", "INT8 ms", "speed-up"]
    body = []
    for r in rows:
        part = _pct(r["partial"])
        if part:
            part += f" ({r['partial_float_layers']} float)"
        body.append([r["variant"], _pct(r["float"]), _pct(r["ptq"]), part, _pct(r["qat"]),
                     _pct(r["qat_cwd"]), _pct(r["ort_fp32"]), _pct(r["ort_int8"]),
                     "" if r["ort_fp32_ms"] is None else f"{r['ort_fp32_ms']:.1f}",
                     "" if r["ort_int8_ms"] is None else f"{r['ort_int8_ms']:.1f}",
                     "" if r["speedup"] is None else f"{r['speedup']:.2f}x"])
    if markdown:
        return "\n".join(["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"] +
                         ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(heads)] + [line(b) for b in body])


def write_report(out_dir, cfg, results: Dict[str, Dict[str, Any]], state: Dict[str, Any]
                 ) -> Dict[str, Any]:
    """``report.md`` + PNG plots in ``out_dir`` from the pipeline's recorded stage results."""
    import datetime

    from omegaconf import OmegaConf

    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    srows = summary_rows(results)
    md = [f"# yolo_q pipeline report: {cfg.pipeline.name}", "",
          f"Written {datetime.datetime.now().isoformat(timespec='seconds')}; model "
          f"`{cfg.model.name}` ({cfg.model.block} blocks), data `{cfg.data.dataset}`, "
          f"{cfg.data.img_size} px, {cfg.train.epochs} float epochs. mAP in %, on the "
          f"validation set{'' if not cfg.pipeline.eval_images else f' (first {cfg.pipeline.eval_images} images)'}.",
          "", "## Summary", "", format_summary(srows), ""]
    first_speed = next(iter(results.values()))["speed"]
    if first_speed.get("cpu"):
        md += [f"Latency: ONNX Runtime, batch {srows[0]['batch']}, {srows[0]['img_size']} px, "
               f"{cfg.pipeline.threads} threads, {cpu_line(first_speed['cpu'])}.", ""]
    figs: Dict[str, str] = {}
    plot_data: Dict[str, Any] = {}  # the numbers behind the plots (for tests and callers)
    for variant, res in results.items():
        md += [f"## Variant `{variant}`", ""]
        tr, ptq, qat = res["train"], res["ptq"], res.get("qat")
        if tr.get("scales"):
            md += [f"RepOpt: plain RealVGG blocks trained with RepOptimizer; branch scales from "
                   f"the hyper-search run (`{tr['scales']}`).", ""]
        md += ["### mAP per stage and runtime", "", map_table(res["eval"]["rows"]), ""]
        ev_rows = [r for r in res["eval"]["rows"] if not r.get("skipped")]
        deltas = plot_data[f"map_{variant}"] = stage_deltas(ev_rows)
        p = plot_map_per_stage(deltas, plots / f"map_per_stage_{variant}.png")
        if p:
            figs[f"map_{variant}"] = str(p)
        md += _ptq_section(variant, ptq, cfg, plots, figs, plot_data)
        _curve_and_pr_plots(variant, tr, qat, ev_rows, plots, figs, plot_data)
        md += ["### Latency", "", format_speed_markdown(res["speed"]), ""]
        md += [f"- note: {n}" for n in res["speed"].get("notes", [])] + [""]
        md += ["### Plots", ""]
        for k in ("map", "sens", "curves", "pr"):
            f = figs.get(f"{k}_{variant}")
            if f:
                md.append(f"![{k}]({Path(f).relative_to(out_dir).as_posix()})")
        md.append("")
    md += ["## Stage times", "", md_table(["stage", "seconds"],
                                          [[k, v.get("seconds")] for k, v in state.items()]), "",
           "## Resolved config", "", "```yaml", OmegaConf.to_yaml(cfg).rstrip(), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return {"report": str(path), "summary": srows, "table": format_summary(srows, markdown=False),
            "plots": figs, "plot_data": plot_data}


def _ptq_section(variant, ptq, cfg, plots: Path, figs, plot_data) -> List[str]:
    """Calibrators, partial quantization and the most sensitive layers (with their plot)."""
    md: List[str] = []
    md += ["### PTQ", "", f"{ptq['quantized_layers']} quantized layers. Calibrators "
           f"(all layers INT8, torch fake-quant):", "",
           md_table(["calibrator", "mAP50-95", "mAP50"],
                    [[c["calib"], _pct(c.get("map50_95")), _pct(c.get("map50"))]
                     for c in ptq.get("calib_rows", [])]), ""]
    if ptq.get("skip_layers") is not None and ptq.get("partial") is not None:
        md += [f"Partial quantization (`max_drop` {cfg.pipeline.max_drop} points / "
               f"`skip_top` {cfg.pipeline.skip_top}): {len(ptq['skip_layers'])} layer(s) "
               f"kept float: {', '.join(f'`{s}`' for s in ptq['skip_layers']) or 'none'}.", ""]
    sens = _read_csv(ptq.get("sensitivity_csv"))
    if sens:
        key = "exact_drop" if sens[0].get("exact_drop") not in (None, "") else "proxy_score"
        md += [f"Most sensitive layers (`{key}`; full ranking in `{ptq['sensitivity_csv']}`):",
               "", md_table(["rank", "layer", "proxy score", "exact drop"],
                            [[int(r["rank"]), r["layer"], r.get("proxy_score"),
                              r.get("exact_drop")] for r in sens[:10]]), ""]
        s = ptq.get("sensitivity") or {}
        if s.get("spearman") is not None:
            md += [f"Proxy vs exact: Spearman {s['spearman']:.3f}, proxy "
                   f"{s.get('speedup') or 0:.1f}x faster.", ""]
        plot_data[f"sens_{variant}"] = [float(r.get(key) or 0) for r in sens[:30]]
        figs[f"sens_{variant}"] = str(plot_sensitivity(
            [{"layer": r["layer"], key: r.get(key)} for r in sens],
            plots / f"sensitivity_{variant}.png", key=key, top=30))
    return md


def _curve_and_pr_plots(variant, tr, qat, ev_rows, plots: Path, figs, plot_data) -> None:
    """Training curves (float, hyper-search, QAT) and the PR curves of every evaluation."""
    curves = {"float": _curve(tr.get("results_csv"))}
    if tr.get("hs_results_csv"):
        curves["hyper-search"] = _curve(tr["hs_results_csv"])
    if qat:
        curves["QAT" + ("+CWD" if qat.get("distill") else "")] = _curve(qat["results_csv"])
        if qat.get("no_distill"):
            curves["QAT"] = _curve(qat["no_distill"]["results_csv"])
    n_float = len(curves["float"])
    offsets = {k: n_float for k in curves if k.startswith("QAT")}
    figs[f"curves_{variant}"] = str(plot_curves(curves, plots / f"curves_{variant}.png",
                                                offsets))
    plot_data[f"curves_{variant}"] = {k: [r["epoch"] + offsets.get(k, 0) for r in v]
                                      for k, v in curves.items()}
    pr = {}
    for r in ev_rows:
        if r.get("pr") and Path(r["pr"]).exists():
            z = np.load(r["pr"])
            pr[f"{r['stage']} / {r['runtime']}"] = {"recall": z["recall"], "mean": z["mean"]}
    p = plot_pr(pr, plots / f"pr_{variant}.png")
    if p:
        figs[f"pr_{variant}"] = str(p)
