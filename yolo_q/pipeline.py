"""The whole float -> INT8 story from one config: data -> float training -> PTQ (calibration,
sensitivity, partial) -> QAT with channel-wise distillation -> export (QDQ flavours) ->
evaluation on every runtime -> latency -> ``report.md`` with plots.

Each stage records its result and a fingerprint of its input files in ``pipeline.json``; a re-run
reuses a stage whose inputs are unchanged and whose outputs still exist (an interrupted float or
QAT training resumes from its ``last.pt``), and ``force=("ptq",)`` redoes a stage (stages that
consume its outputs then see changed inputs and run again too).

``pipeline.variants``: ``base`` is the config as written; ``repopt`` is the same network built
from plain RealVGG blocks and trained with RepOptimizer, whose branch scales come from a
hyper-search run (LinearAdd blocks) that the pipeline trains first. Every later stage runs for
each variant; the report puts them side by side.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from omegaconf import OmegaConf

from .config import copy_config, save_config
from .io import write_json
from .benchmark import BenchmarkProcessError, format_speed_table, speed_benchmark_isolated
from .data import load_data_yaml
from .data.synthetic import generate
from .engine.rundir import discard_unused_run_dirs, make_run_dir
from .eval.api import run_eval
from .eval.backends import openvino_missing
from .export.api import export_model
from .io import load_checkpoint
from .models.loading import write_float_checkpoint
from .quant.load import load_model
from .quant.ptq import run_ptq
from .quant.qat import qat_epochs, run_qat
from .quant.qat_partial import run_qat_partial
from .report import write_report
from .training import train

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ stage records
@dataclass
class _Record:
    """A stage result with named fields; ``pipeline.json`` (and the report) hold its dict."""
    OPTIONAL = ()  # keys left out of the dict when None (as before the records existed)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (v.to_dict() if isinstance(v, _Record) else v)
                for f in fields(self) for v in [getattr(self, f.name)]
                if not (v is None and f.name in self.OPTIONAL)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainRecord(_Record):
    weights: str
    run_dir: str
    metrics: Dict[str, Any]
    results_csv: str
    source: Optional[str] = None  # pipeline.float_weights: the given checkpoint
    scales: Optional[str] = None  # repopt: the hyper-search scales and its results
    hs_results_csv: Optional[str] = None
    OPTIONAL = ("source", "scales", "hs_results_csv")


@dataclass
class PTQRecord(_Record):
    full: str  # every layer quantized (the QAT starting point)
    summary: str
    calib: str
    float: Dict[str, Any]
    ptq: Dict[str, Any]
    partial: Optional[Dict[str, Any]]
    skip_layers: List[str]
    quantized_layers: int
    sensitivity: Optional[Dict[str, Any]]
    times: Dict[str, float]
    calib_rows: List[Dict[str, Any]]
    partial_weights: Optional[str] = None
    sensitivity_csv: Optional[str] = None
    OPTIONAL = ("partial_weights", "sensitivity_csv")


@dataclass
class QATRunRecord(_Record):
    weights: str
    run_dir: str
    distill: bool
    metrics: Optional[Dict[str, Any]]
    results_csv: str


@dataclass
class QATRecord(QATRunRecord):
    no_distill: Optional[QATRunRecord] = None  # the comparison run without distillation
    OPTIONAL = ("no_distill",)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        rec = super().from_dict(d)
        if isinstance(rec.no_distill, dict):
            rec.no_distill = QATRunRecord.from_dict(rec.no_distill)
        return rec


STAGES = ("data", "train", "ptq", "qat", "qat_partial", "export", "eval", "speed", "report")

# The config a stage's result depends on (besides its input files): a change there re-runs the
# stage (and, through its outputs, the stages after it). ``-key``: an entry of a section named
# before that the stage does not read (QAT's recipe is no input of PTQ, nor of the stages that
# read QAT's checkpoints: those see its changes through the files).
_NOT_QAT = ("-quant.qat", "-quant.distill")
# read by PTQ's search and QAT-aware partial quantization, not by QAT's training
_NOT_QAT_TRAINING = ("-quant.qat.max_drop", "-quant.qat.max_search_steps",
                     "-quant.sensitivity_images", "-quant.sensitivity_proxy_images",
                     "-quant.sensitivity_proxy", "-quant.sensitivity_gain")
STAGE_CONFIG = {
    "data": ("data.dataset", "data.root", "pipeline.synthetic"),
    "train": ("model", "data", "train", "eval", "pipeline.float_weights",
              "pipeline.repopt_hs_epochs"),
    "ptq": ("model", "data", "eval", "quant", *_NOT_QAT, "pipeline.calib_methods",
            "pipeline.sensitivity", "pipeline.sensitivity_mode", "pipeline.max_drop",
            "pipeline.skip_top", "pipeline.eval_images"),
    "qat": ("model", "data", "train", "eval", "quant", *_NOT_QAT_TRAINING,
            "pipeline.qat_distill", "pipeline.qat_compare_no_distill"),
    "qat_partial": ("model", "data", "eval", "quant.select_data", "quant.sensitivity_images",
                    "quant.qat.max_drop", "quant.qat.max_search_steps"),
    "export": ("model", "data.img_size", "quant", *_NOT_QAT, "export", "pipeline.flavours"),
    "eval": ("model", "data", "eval", "quant", *_NOT_QAT, "export", "pipeline"),
    "speed": ("model", "data.img_size", "quant", *_NOT_QAT, "export", "pipeline"),
}


# A stage's result version: bumped when a fix changes what the stage computes from the same
# inputs and config, so that recorded results of the old code are not reused (a stage without
# an entry keeps its old fingerprints). qat 2: QAT's train set gets QAT's augmentation (before,
# quant.qat.close_mosaic reached the saved config but not the data: QAT trained with mosaic).
STAGE_VERSION = {"qat": 2}


def _config_digest(cfg, keys: Iterable[str], version: Optional[int] = None) -> str:
    """A short hash of the config entries ``keys`` (dotted paths; missing ones count as null;
    ``-path``: drop that entry from a section picked before it) and of the stage's result
    ``version`` (:data:`STAGE_VERSION`) when it has one."""
    keys = list(keys)
    picked = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
              for k in keys if not k.startswith("-")
              for v in [OmegaConf.select(cfg, k, default=None)]}
    for k in (k[1:] for k in keys if k.startswith("-")):
        head = next(h for h in picked if k.startswith(h + "."))  # the section it is taken from
        node = picked[head]
        *parents, leaf = k[len(head) + 1:].split(".")
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    if version is not None:
        picked["stage_version"] = version
    return hashlib.sha1(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _free_name(path: Path, suffix: str) -> Path:
    """The first of ``<path><suffix>``, ``<path><suffix>2``, ... that does not exist."""
    i = 1
    while path.with_name(f"{path.name}{suffix}{i if i > 1 else ''}").exists():
        i += 1
    return path.with_name(f"{path.name}{suffix}{i if i > 1 else ''}")


def _files_only(fp: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in fp.items() if k != "config"}


def _made_for_other_inputs(started: Optional[Dict[str, Any]], recorded: Optional[Dict[str, Any]],
                           fp: Dict[str, Any]) -> bool:
    """Whether what a stage left in its run directories belongs to other inputs than ``fp``:
    it was last started with others, or (no start recorded: an older pipeline.json) its last
    completed result was."""
    if started is not None:
        return started != fp
    return recorded is not None and _files_only(recorded) != _files_only(fp)


def _fingerprint(paths: Iterable, config: Optional[str] = None) -> Dict[str, Any]:
    fp = {}
    for p in paths:
        p = Path(p)
        fp[str(p)] = [p.stat().st_size, round(p.stat().st_mtime, 3)] if p.exists() else None
    if config is not None:
        fp["config"] = config
    return fp


class Pipeline:
    def __init__(self, cfg, force: Iterable[str] = (), verbose: bool = True):
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise ValueError(f"--force: unknown stage '{unknown[0]}'; stages: {', '.join(STAGES)}")
        self.cfg = cfg
        self.force = set(force)
        self.verbose = verbose
        self.dir = make_run_dir(cfg.pipeline.output_dir, cfg.pipeline.name, exist_ok=True)
        self.state_path = self.dir / "pipeline.json"
        self.state: Dict[str, Any] = (json.loads(self.state_path.read_text())
                                      if self.state_path.exists() else {})
        self.results: Dict[str, Any] = {}
        self._cleared: set = set()  # run dirs removed by --force train in this invocation
        self._restart: set = set()  # stage keys whose leftover run dirs were made for other inputs
        # the fingerprint each stage was last started with (its run dirs were made for it)
        self.started_path = self.dir / "pipeline_started.json"
        self.started: Dict[str, Any] = (json.loads(self.started_path.read_text())
                                        if self.started_path.exists() else {})

    def say(self, *args, **kwargs):
        if self.verbose:
            print(*args, **kwargs, flush=True)

    # -- stage bookkeeping -------------------------------------------------------------------
    def run_stage(self, key: str, fn: Callable[[], Any], inputs: Iterable = (),
                  record: Optional[type] = None):
        """Run ``fn`` (stage ``key``, e.g. ``ptq`` or ``ptq:repopt``) unless its recorded
        result is still valid: same input fingerprint (files and the stage's config entries,
        :data:`STAGE_CONFIG`), outputs present, stage not forced. ``record``: the stage's record
        type (``pipeline.json`` holds its dict). A training or QAT run left in the stage's
        directory is resumed only when nothing says it was made for other inputs."""
        inputs = list(inputs)
        stage = key.split(":")[0]
        rec = self.state.get(key)
        fp = _fingerprint(inputs, _config_digest(self.cfg, STAGE_CONFIG.get(stage, ()),
                                                 STAGE_VERSION.get(stage)))
        outputs_ok = rec is not None and all(Path(p).exists() for p in rec.get("files", []))
        recorded = (rec or {}).get("inputs")
        if recorded is not None and "config" not in recorded and recorded == _files_only(fp):
            rec["inputs"] = recorded = fp  # recorded before config entries counted: trusted
        if stage not in self.force and rec and recorded == fp and outputs_ok:
            self.say(f"[{key}] up to date (recorded in {self.state_path}); reusing")
            return record.from_dict(rec["result"]) if record else rec["result"]
        if _made_for_other_inputs(self.started.get(key), recorded, fp):
            self._restart.add(key)
        self.started[key] = fp
        write_json(self.started_path, self.started, default=str)
        self.say(f"[{key}] running ...")
        t0 = time.time()
        out = fn()
        result = out.to_dict() if isinstance(out, _Record) else out
        files = [str(v) for v in _walk_paths(result)]
        self.state[key] = {"result": result, "inputs": fp, "files": files,
                           "seconds": round(time.time() - t0, 1)}
        self._save()
        self.say(f"[{key}] done in {time.time() - t0:.1f} s")
        return out

    def _fresh_run_dir(self, run: Path, stage_key: str) -> None:
        """Clear ``run`` before its stage trains into it: removed when the stage is forced;
        moved aside to ``<run>.old`` (``.old2``, ...; its checkpoints kept) when it was made
        for other inputs. Once per invocation."""
        stage = stage_key.split(":")[0]
        if not run.exists() or run in self._cleared:
            return
        if stage in self.force:
            shutil.rmtree(run)
        elif stage_key in self._restart:
            old = _free_name(run, ".old")
            run.rename(old)
            self.say(f"[{stage_key}] {run} was made for other inputs: moved to {old}, starting "
                     f"afresh")
        else:
            return
        self._cleared.add(run)

    def _save(self):
        write_json(self.state_path, self.state, default=str)

    def seconds(self, key: str) -> Optional[float]:
        return (self.state.get(key) or {}).get("seconds")

    # -- driver ----------------------------------------------------------------------------------
    @property
    def variants(self) -> List[str]:
        return [str(v) for v in self.cfg.pipeline.variants] or ["base"]

    def run(self) -> Dict[str, Any]:
        p = self.cfg.pipeline
        t0 = time.time()
        save_config(self.cfg, self.dir / "config.yaml")
        data = self.run_stage("data", self.stage_data)
        self.cfg.data.dataset = data["dataset"]
        for v in self.variants:
            k = _key
            tr = self.run_stage(k("train", v), lambda: self.stage_train(v),
                                [data["dataset"]] + ([p.float_weights] if p.float_weights else []),
                                TrainRecord)
            ptq = self.run_stage(k("ptq", v), lambda: self.stage_ptq(v, tr), [tr.weights],
                                 PTQRecord)
            qat = None
            if p.qat:
                qat = self.run_stage(k("qat", v), lambda: self.stage_qat(v, tr, ptq),
                                     [tr.weights, ptq.full], QATRecord)
            part = None
            if qat and self.cfg.quant.qat.max_drop is not None:
                part = self.run_stage(k("qat_partial", v),
                                      lambda: self.stage_qat_partial(v, tr, qat),
                                      [tr.weights, qat.weights])
            exp = self.run_stage(k("export", v),
                                 lambda: self.stage_export(v, tr, ptq, qat, part),
                                 [tr.weights, ptq.full] + ([qat.weights] if qat else [])
                                 + ([part["weights"]] if part else []))
            ev = self.run_stage(k("eval", v),
                                lambda: self.stage_eval(v, tr, ptq, qat, exp, part),
                                _eval_inputs(tr, ptq, qat, exp, part))
            sp = self.run_stage(k("speed", v), lambda: self.stage_speed(v, tr, ptq, qat),
                                [tr.weights] + ([qat.weights] if qat else [ptq.full]))
            self.results[v] = {"train": tr.to_dict(), "ptq": ptq.to_dict(),
                               "qat": qat.to_dict() if qat else None, "qat_partial": part,
                               "export": exp,
                               "eval": ev, "speed": sp}
        report = self.stage_report()  # cheap: always rewritten from the recorded results
        self.say(f"\npipeline finished in {time.time() - t0:.0f} s -> {report['report']}")
        return {"dir": str(self.dir), "results": self.results, **report}

    # -- configs -----------------------------------------------------------------------------
    def _sub_cfg(self, overrides: List[str]):
        return copy_config(self.cfg, overrides)

    def vdir(self, variant: str) -> Path:
        return self.dir if variant == "base" else self.dir / variant

    def variant_cfg(self, variant: str):
        if variant == "base":
            return self._sub_cfg([])
        return self._sub_cfg(["model.block=realvgg", "train.optimizer=repopt",
                              f"model.scales={self.vdir(variant) / 'hs' / 'scales.pt'}"])

    # -- the stages ----------------------------------------------------------------------------
    def stage_data(self) -> Dict[str, Any]:
        syn = self.cfg.pipeline.synthetic
        data_yaml = Path(self.cfg.data.dataset)
        if syn is not None and not data_yaml.exists():
            self.say(f"[data] generating synthetic data: {syn.train} train + {syn.val} val "
                     f"images, {syn.size} px -> {syn.out}")
            spec = OmegaConf.to_container(syn.spec) if syn.spec else {}
            out = generate(syn.out, n_train=syn.train, n_val=syn.val, size=syn.size,
                           seed=syn.seed, **spec)
            data_yaml = Path(out)
        info = load_data_yaml(str(data_yaml))
        return {"dataset": str(data_yaml), "nc": info["nc"], "names": list(info["names"])}

    def _train_run(self, cfg, run: Path, label: str, stage_key: str) -> None:
        """Train ``cfg`` into ``run`` (resuming an interrupted run; nothing when complete)."""
        last = run / "weights" / "last.pt"
        resume = None
        self._fresh_run_dir(run, stage_key)
        if last.exists():
            ck = load_checkpoint(last)
            if int(ck["epoch"]) + 1 >= int(cfg.train.epochs):
                return
            resume = str(last)
            self.say(f"[{label}] resuming the interrupted training from {last}")
        cfg = _with(cfg, [f"train.output_dir={run.parent}", f"train.name={run.name}",
                          "train.exist_ok=true"])
        train(cfg, resume=resume)

    def stage_train(self, variant: str) -> Dict[str, Any]:
        vd = self.vdir(variant)
        given = self.cfg.pipeline.float_weights
        if given and variant == "base":
            return self._given_weights(Path(given))
        extra: Dict[str, Any] = {}
        if variant == "repopt":
            hs_epochs = self.cfg.pipeline.repopt_hs_epochs or self.cfg.train.epochs
            hs_cfg = self._sub_cfg(["model.block=linearadd", f"train.epochs={hs_epochs}"])
            self._train_run(hs_cfg, vd / "hs", "train:repopt hyper-search",
                            _key("train", variant))
            scales = vd / "hs" / "scales.pt"
            if not scales.exists():
                raise RuntimeError(f"{scales}: the hyper-search run wrote no scales file")
            extra = {"scales": str(scales), "hs_results_csv": str(vd / "hs" / "results.csv")}
        run = vd / "float"
        self._train_run(self.variant_cfg(variant), run, _key("train", variant),
                        _key("train", variant))
        return TrainRecord(**self._train_result(run), **extra)

    def _given_weights(self, path: Path) -> Dict[str, Any]:
        """``pipeline.float_weights``: no training; an official or foreign checkpoint is
        converted once into a yolo_q float checkpoint (what the later stages read)."""
        if not path.is_file():
            raise FileNotFoundError(f"pipeline.float_weights: {path} does not exist")
        model = load_model(path, cfg=self.cfg)
        out = self.dir / "float" / "weights" / "float.pt"
        # unchanged bytes keep float.pt's mtime, which the later stages' fingerprints hold
        write_float_checkpoint(model, out, keep_same=True, epoch=-1, source=str(path))
        self.say(f"[train] pipeline.float_weights: using {path} (no float training)")
        curve = path.with_suffix(".csv")  # the curve shipped beside a reference checkpoint
        return TrainRecord(weights=str(out), run_dir=str(out.parent.parent), metrics={},
                           results_csv=str(curve) if curve.is_file() else "", source=str(path))

    def _train_result(self, run: Path) -> Dict[str, Any]:
        best = run / "weights" / "best.pt"
        weights = best if best.exists() else run / "weights" / "last.pt"
        ck = load_checkpoint(weights)
        return {"weights": str(weights), "run_dir": str(run), "metrics": _scalars(ck.get("metrics", {})),
                "results_csv": str(run / "results.csv")}

    def stage_ptq(self, variant: str, tr: TrainRecord) -> PTQRecord:
        p = self.cfg.pipeline
        cfg = self.variant_cfg(variant)
        out = self.vdir(variant) / "ptq"
        methods = calibrators(cfg)
        main = run_ptq(cfg, tr.weights, calib=methods[0], sensitivity=bool(p.sensitivity),
                       sensitivity_mode=str(p.sensitivity_mode), skip_top=p.skip_top,
                       max_drop=None if p.skip_top is not None else p.max_drop,
                       run_dir=out, out=out / "ptq_partial.pt", out_full=out / "ptq.pt",
                       eval_images=p.eval_images, progress=self.verbose, verbose=self.verbose)
        res = PTQRecord(
            full=str(out / "ptq.pt"), summary=str(out / "summary.json"), calib=methods[0],
            float=main["float"], ptq=main["ptq"], partial=main["partial"],
            skip_layers=main["skip_layers"], quantized_layers=main["quantized_layers"],
            sensitivity=main.get("sensitivity"), times=main["times"],
            calib_rows=[{"calib": methods[0], **_map(main["ptq"])}],
            partial_weights=str(out / "ptq_partial.pt") if main["partial"] is not None else None,
            sensitivity_csv=(str(out / "sensitivity.csv") if (out / "sensitivity.csv").exists()
                             else None))
        for m in methods[1:]:  # other calibrators: mAP only
            s = run_ptq(cfg, tr.weights, calib=m, eval_images=p.eval_images,
                        progress=False, verbose=False)
            res.calib_rows.append({"calib": m, **_map(s["ptq"])})
            self.say(f"[ptq] calibrator {m}: mAP50-95 {s['ptq']['map50_95']:.4f}")
        return res

    def stage_qat(self, variant: str, tr: TrainRecord, ptq: PTQRecord) -> QATRecord:
        p = self.cfg.pipeline
        runs = [("qat", bool(p.qat_distill))]
        if p.qat_compare_no_distill and p.qat_distill:
            runs.append(("qat_nocwd", False))
        entries = {}
        for name, distill in runs:
            s = self._qat_run(variant, tr, ptq, name, distill)
            entries[name] = dict(weights=s["best"], run_dir=s["run_dir"], distill=distill,
                                 metrics=s.get("qat"),
                                 results_csv=str(Path(s["run_dir"]) / "results.csv"))
        nocwd = entries.get("qat_nocwd")
        return QATRecord(**entries["qat"], no_distill=QATRunRecord(**nocwd) if nocwd else None)

    def _qat_run(self, variant, tr, ptq, name: str, distill: bool) -> Dict[str, Any]:
        run = self.vdir(variant) / name
        cfg = self.variant_cfg(variant)
        ov = [f"quant.qat.output_dir={run.parent}", f"train.name={run.name}",
              "train.exist_ok=true", f"quant.distill.enabled={str(distill).lower()}",
              "quant.qat.max_drop=null"]  # QAT-aware partial: its own stage
        last = run / "weights" / "last.pt"
        self._fresh_run_dir(run, _key("qat", variant))
        if last.exists():
            ck = load_checkpoint(last)
            epochs = qat_epochs(_with(cfg, ov))
            if int(ck["epoch"]) + 1 < epochs:
                self.say(f"[{name}] resuming the interrupted QAT from {last}")
                return run_qat(resume=str(last), overrides=ov, verbose=self.verbose)
            best = run / "weights" / "best.pt"
            best = best if best.exists() else last
            # a checkpoint's metrics are on quant.select_data's val split when that is set
            return {"run_dir": str(run), "best": str(best),
                    "qat": None if cfg.quant.get("select_data") else
                    _scalars(load_checkpoint(best).get("metrics", {}))}
        # the float / PTQ rows of the QAT summary: the PTQ stage's numbers when it evaluated
        # the same (whole) val set, else QAT evaluates teacher and student itself
        same_val = not self.cfg.pipeline.eval_images
        baseline = {"float": ptq.float, "ptq": ptq.ptq} if same_val else None
        return run_qat(cfg, weights=ptq.full, teacher=tr.weights, overrides=ov,
                       evaluate_start=not same_val, baseline=baseline, verbose=self.verbose)

    def stage_qat_partial(self, variant: str, tr: TrainRecord, qat: QATRecord) -> Dict[str, Any]:
        """QAT-aware partial quantization of the QAT(+CWD) model (``quant.qat.max_drop``,
        :mod:`yolo_q.quant.qat_partial`): ``qat_partial/partial.pt`` and its search."""
        cfg = self.variant_cfg(variant)
        out = self.vdir(variant) / "qat_partial"
        out.mkdir(parents=True, exist_ok=True)
        q = cfg.quant.qat
        info = run_qat_partial(cfg, qat.weights, tr.weights, float(q.max_drop),
                               out / "partial.pt", int(q.max_search_steps),
                               say=self.say if self.verbose else (lambda *a, **k: None))
        write_json(out / "summary.json", info)
        return {k: v for k, v in info.items() if k not in ("gain", "steps")}

    def stage_export(self, variant, tr, ptq, qat, part=None) -> Dict[str, Any]:
        """Float ONNX; QDQ ONNX of the final INT8 model (QAT, else PTQ) in its own flavour, and
        of its QAT-aware partial model (``part``: ``int8_partial``);
        the other flavours from a PTQ of the float model calibrated for that flavour; the
        onnxruntime flavour once more with ``export.act_storage=int8`` for OpenVINO (the same
        values; OpenVINO folds its Q/DQ without requantize passes, ``deploy/cpu.md``)."""
        cfg = self.variant_cfg(variant)
        out = self.vdir(variant) / "export"
        out.mkdir(parents=True, exist_ok=True)
        size = int(cfg.data.img_size)
        res = {"float": export_model(cfg, tr.weights, flavour="float",
                                     out=out / "float.onnx", img_size=size)["path"]}
        final = qat.weights if qat else ptq.full
        own = str(load_checkpoint(final)["quant"].get("flavour") or "onnxruntime")
        res[f"int8_{own}"] = export_model(cfg, final, out=out / f"int8_{own}.onnx",
                                          img_size=size)["path"]
        res["int8_source"] = {own: "qat" if qat else "ptq"}
        if part:
            res["int8_partial"] = export_model(cfg, part["weights"], out=out / "int8_partial.onnx",
                                               img_size=size)["path"]
        for fl in [str(f) for f in self.cfg.pipeline.flavours]:
            if fl == own:
                continue
            ck = out / f"ptq_{fl}.pt"
            run_ptq(cfg, tr.weights, flavour=fl, out=ck, eval_images=1, progress=False,
                    verbose=False)
            res[f"int8_{fl}"] = export_model(cfg, str(ck), out=out / f"int8_{fl}.onnx",
                                             img_size=size)["path"]
            res["int8_source"][fl] = "ptq"
        if "onnxruntime" in res["int8_source"]:  # OpenVINO's copy: int8 signed activations
            src = final if own == "onnxruntime" else out / "ptq_onnxruntime.pt"
            res["int8_onnxruntime_openvino"] = export_model(
                copy_config(cfg, ["export.act_storage=int8"]), str(src),
                out=out / "int8_onnxruntime_openvino.onnx", img_size=size)["path"]
        return res

    def stage_eval(self, variant, tr, ptq, qat, exp, part=None) -> Dict[str, Any]:
        """mAP of every stage's model through every runtime on the same val images."""
        p = self.cfg.pipeline
        cfg = self.variant_cfg(variant)
        out = self.vdir(variant) / "eval"
        rows: List[Dict[str, Any]] = []
        jobs = [("float", "torch FP32", "torch", tr.weights),
                ("ptq", "torch fake-quant", "torch", ptq.full)]
        if ptq.partial_weights:
            jobs.append((f"partial ({len(ptq.skip_layers)} float)", "torch fake-quant",
                         "torch", ptq.partial_weights))
        if qat and qat.no_distill:
            jobs.append(("qat", "torch fake-quant", "torch", qat.no_distill.weights))
        if qat:
            jobs.append(("qat+cwd" if qat.distill else "qat", "torch fake-quant", "torch",
                         qat.weights))
        if part:
            part_stage = (f"{'qat+cwd' if qat.distill else 'qat'} partial "
                          f"({len(part['float_layers'])} float)")
            jobs.append((part_stage, "torch fake-quant", "torch", part["weights"]))
        jobs.append(("float", "ORT FP32", "onnxruntime", exp["float"]))
        for fl, src in exp["int8_source"].items():
            stage = "qat+cwd" if src == "qat" and qat and qat.distill else src
            jobs.append((stage, f"ORT INT8 ({fl} flavour)", "onnxruntime", exp[f"int8_{fl}"]))
        if part and exp.get("int8_partial"):  # its flavour: the QAT model's (the first one)
            own = next(iter(exp["int8_source"]))
            jobs.append((part_stage, f"ORT INT8 ({own} flavour)", "onnxruntime",
                         exp["int8_partial"]))
        jobs.append(("float", "OpenVINO FP32", "openvino", exp["float"]))
        for fl, src in exp["int8_source"].items():
            stage = "qat+cwd" if src == "qat" and qat and qat.distill else src
            jobs.append((stage, f"OpenVINO INT8 ({fl} flavour)", "openvino",
                         exp.get(f"int8_{fl}_openvino", exp[f"int8_{fl}"])))
        jobs.append(("float", "TensorRT FP16", "tensorrt", exp["float"]))
        if "tensorrt" in exp["int8_source"]:
            jobs.append((exp["int8_source"]["tensorrt"], "TensorRT INT8", "tensorrt",
                         exp["int8_tensorrt"]))
        for i, (stage, runtime, backend, src) in enumerate(jobs):
            row = {"stage": stage, "runtime": runtime, "source": str(src)}
            try:
                kw = {"threads": int(p.threads)} if backend in ("onnxruntime", "openvino") else {}
                if backend == "tensorrt":  # INT8 from the QDQ ONNX, FP16 for the rest
                    kw = {"int8": runtime.endswith("INT8"), "fp16": True}
                m = run_eval(cfg, backend, src, batch_size=int(p.eval_batch),
                             max_images=p.eval_images, verbose=False,
                             save_dir=str(out / f"{i:02d}_{_slug(stage)}_{_slug(runtime)}"), **kw)
            except Exception as e:  # noqa: BLE001 - TensorRT / OpenVINO missing: a reported skip
                optional = backend == "tensorrt" or (backend == "openvino" and openvino_missing())
                if not optional:
                    raise
                row["skipped"] = str(e).splitlines()[0] if str(e) else type(e).__name__
                rows.append(row)
                continue
            row.update(_map(m), images=m.get("images"), seconds=m.get("seconds"),
                       pr=str(out / f"{i:02d}_{_slug(stage)}_{_slug(runtime)}" / "pr_curves.npz"))
            if not Path(row["pr"]).exists():
                row.pop("pr")
            rows.append(row)
            self.say(f"[eval] {stage:<22} {runtime:<28} mAP50-95 {row['map50_95']:.4f}  "
                     f"mAP50 {row['map50']:.4f}")
        return {"rows": rows}

    def stage_speed(self, variant, tr, ptq, qat) -> Dict[str, Any]:
        p = self.cfg.pipeline
        cfg = self.variant_cfg(variant)
        final = qat.weights if qat else ptq.full
        size = int(p.speed_img_size or cfg.data.img_size)
        data_dir = Path(self.cfg.data.dataset).parent
        calib = next((str(d) for d in (data_dir / "images" / "train", data_dir / "images")
                      if d.is_dir()), None)
        try:  # its own process: clean runtimes, and a native crash cannot end the pipeline
            res = speed_benchmark_isolated(
                cfg, log_prefix="[speed] " if self.verbose else None, weights=tr.weights,
                quant_weights=[final], img_size=size, batches=[int(b) for b in p.speed_batches],
                threads=int(p.threads), iters=int(p.speed_iters),
                iters_large=max(3, int(p.speed_iters) // 4), calib=calib, calib_num=16)
        except BenchmarkProcessError as e:
            self.say(f"[speed] skipped: {e}")
            return {"json": None, "rows": [], "notes": [f"speed stage skipped: {e}"],
                    "cpu": None}
        self.say(format_speed_table(res))
        path = self.vdir(variant) / "speed.json"
        path.write_text(json.dumps(res, indent=2, default=str))
        return {"json": str(path), "rows": res["rows"], "notes": res.get("notes", []),
                "cpu": res.get("cpu")}

    def recorded_results(self) -> Dict[str, Dict[str, Any]]:
        """The per-variant stage results recorded in ``pipeline.json`` (what the report reads)."""
        out: Dict[str, Dict[str, Any]] = {}
        for v in self.variants:
            rec = {s: (self.state.get(_key(s, v)) or {}).get("result")
                   for s in ("train", "ptq", "qat", "export", "eval", "speed")}
            if all(rec[s] is not None for s in ("train", "ptq", "export", "eval", "speed")):
                out[v] = rec
        return out

    def stage_report(self) -> Dict[str, Any]:
        return write_report(self.dir, self.cfg, self.results, self.state)


def _key(stage: str, variant: str) -> str:
    return stage if variant == "base" else f"{stage}:{variant}"


def _with(cfg, overrides: List[str]):
    return copy_config(cfg, overrides)


def _eval_inputs(tr, ptq, qat, exp, part=None) -> List[str]:
    files = [tr.weights, ptq.full] + ([ptq.partial_weights] if ptq.partial_weights else [])
    files += [part["weights"]] if part else []
    if qat:
        files.append(qat.weights)
        if qat.no_distill:
            files.append(qat.no_distill.weights)
    files += [v for k, v in exp.items() if isinstance(v, str) and v.endswith(".onnx")]
    return files


def _map(m: Optional[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    m = m or {}
    return {"map50_95": m.get("map50_95"), "map50": m.get("map50")}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")


def _walk_paths(obj) -> List[Path]:
    out = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _walk_paths(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _walk_paths(v)
    elif isinstance(obj, str) and " " not in obj and obj.endswith(
            (".pt", ".onnx", ".csv", ".json", ".png", ".md", ".npz")):
        out.append(Path(obj))
    return out


def calibrators(cfg) -> List[str]:
    """The calibrators the PTQ stage runs, main first: ``quant.calib`` (the PTQ that sensitivity,
    partial quantization, QAT and export build on), then the others of
    ``pipeline.calib_methods`` (mAP rows for comparison)."""
    main = str(cfg.quant.calib)
    return [main] + [m for m in dict.fromkeys(str(m) for m in cfg.pipeline.calib_methods)
                     if m != main]


def _scalars(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float, str))}


def run_pipeline(cfg, force: Iterable[str] = (), verbose: bool = True) -> Dict[str, Any]:
    with discard_unused_run_dirs():  # a pipeline that cannot start leaves no empty folder
        return Pipeline(cfg, force=force, verbose=verbose).run()
