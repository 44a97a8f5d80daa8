"""The whole float -> INT8 story from one config: data -> float training -> PTQ (calibration,
sensitivity, partial) -> QAT with channel-wise distillation -> export (QDQ flavours) ->
evaluation on every runtime -> latency -> ``report.md`` with plots.

Each stage records its outputs and a fingerprint of its inputs in ``pipeline.json``; a re-run
reuses a stage whose inputs are unchanged (an interrupted float training resumes from its
``last.pt``), and ``force=("ptq",)`` redoes a stage (stages that consume its outputs then see
changed inputs and run again too).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from omegaconf import OmegaConf

from .config import save_config

logger = logging.getLogger(__name__)

STAGES = ("data", "train", "ptq", "qat", "export", "eval", "speed", "report")


def _fingerprint(paths: Iterable) -> Dict[str, Any]:
    fp = {}
    for p in paths:
        p = Path(p)
        fp[str(p)] = [p.stat().st_size, round(p.stat().st_mtime, 3)] if p.exists() else None
    return fp


class Pipeline:
    def __init__(self, cfg, force: Iterable[str] = (), verbose: bool = True):
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise ValueError(f"--force: unknown stage '{unknown[0]}'; stages: {', '.join(STAGES)}")
        self.cfg = cfg
        self.force = set(force)
        self.verbose = verbose
        self.dir = Path(cfg.pipeline.output_dir) / cfg.pipeline.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "pipeline.json"
        self.state: Dict[str, Any] = (json.loads(self.state_path.read_text())
                                      if self.state_path.exists() else {})

    # -- stage bookkeeping -------------------------------------------------------------------
    def run_stage(self, name: str, fn: Callable[[], Dict[str, Any]], inputs: Iterable = ()) -> Dict:
        inputs = list(inputs)
        rec = self.state.get(name)
        fp = _fingerprint(inputs)
        outputs_ok = rec is not None and all(
            Path(p).exists() for p in rec.get("files", []))
        if name not in self.force and rec and rec.get("inputs") == fp and outputs_ok:
            logger.info("[%s] reusing results from %s", name, self.state_path)
            return rec["result"]
        logger.info("[%s] running ...", name)
        t0 = time.time()
        result = fn()
        files = [str(v) for v in _walk_paths(result)]
        self.state[name] = {"result": result, "inputs": _fingerprint(inputs), "files": files,
                            "seconds": round(time.time() - t0, 1)}
        self._save()
        logger.info("[%s] done in %.1f s", name, time.time() - t0)
        return result

    def _save(self):
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        tmp.replace(self.state_path)

    def seconds(self, name: str) -> Optional[float]:
        return (self.state.get(name) or {}).get("seconds")

    # -- the stages ----------------------------------------------------------------------------
    def stage_data(self) -> Dict[str, Any]:
        from .data import load_data_yaml
        syn = self.cfg.pipeline.synthetic
        data_yaml = Path(self.cfg.data.dataset)
        if syn is not None and not data_yaml.exists():
            from .data.synthetic import generate
            out = generate(syn.out, n_train=syn.train, n_val=syn.val, size=syn.size, seed=syn.seed)
            self.cfg.data.dataset = str(out)
            data_yaml = Path(out)
        info = load_data_yaml(str(data_yaml))
        return {"dataset": str(data_yaml), "nc": info["nc"], "names": list(info["names"])}

    def stage_train(self) -> Dict[str, Any]:
        from .engine.checkpoint import load_checkpoint
        from .engine.train import train
        cfg = self._sub_cfg(["train.output_dir=" + str(self.dir), "train.name=float",
                             "train.exist_ok=true"])
        run = self.dir / "float"
        last = run / "weights" / "last.pt"
        resume = None
        if "train" in self.force and run.exists():
            shutil.rmtree(run)
        elif last.exists():
            ck = load_checkpoint(last)
            if int(ck["epoch"]) + 1 >= int(cfg.train.epochs):
                return self._train_result(run)
            resume = str(last)
            logger.info("[train] resuming the interrupted float training from %s", last)
        train(cfg, resume=resume)
        return self._train_result(run)

    def _train_result(self, run: Path) -> Dict[str, Any]:
        from .engine.checkpoint import load_checkpoint
        best = run / "weights" / "best.pt"
        weights = best if best.exists() else run / "weights" / "last.pt"
        ck = load_checkpoint(weights)
        return {"weights": str(weights), "run_dir": str(run), "metrics": _scalars(ck.get("metrics", {})),
                "results_csv": str(run / "results.csv")}

    def _sub_cfg(self, overrides: List[str]):
        from .config import apply_overrides
        return apply_overrides(OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True)),
                               overrides)


def _walk_paths(obj) -> List[Path]:
    out = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _walk_paths(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _walk_paths(v)
    elif isinstance(obj, str) and obj.endswith((".pt", ".onnx", ".csv", ".json", ".png", ".md")):
        out.append(Path(obj))
    return out


def _scalars(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str))}
