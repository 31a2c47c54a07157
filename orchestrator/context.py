"""Where `train_loop` runs: the one small interface that differs between a plain process, a Ray
Tune trial and a Ray Train worker, plus the tracker that records params, metrics and artifacts.

RunContext answers: which rank am I, on which device, which checkpoint do I resume from, and where
do reports and checkpoints go. `LocalContext` is the plain-process version; the Ray versions live
in `orchestrator/ray_train.py` and `orchestrator/tune.py`.

Tracker records what a person reads later (params, metric curves, tables, plots). Only rank 0 gets a
real one; `Tracker()` itself is the do-nothing tracker other ranks use.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import META_FILE, list_checkpoints, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class RunContext:
    """The plain-process defaults: rank 0 of 1, nothing to resume, reports dropped."""
    rank: int = 0
    world_size: int = 1

    def device(self, requested: str) -> torch.device:
        return choose_device(requested, torch.cuda.is_available(), "torch sees no CUDA device here")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Data-parallel wrapping where there are several workers."""
        return model

    def resume_state(self) -> tuple[dict[str, Any], str] | None:
        """(checkpoint state, where it came from) to resume from, or None for a fresh start.

        The state is on the CPU: load_state_dict puts weights and optimizer moments on the model's
        device, and torch.set_rng_state takes only a CPU tensor (a state loaded onto the GPU made
        every resume on CUDA fail)."""
        return None

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint this context can name locally (None where storage is Ray's)."""
        return None

    def report(self, step: int, metrics: dict[str, float], checkpoint: dict[str, Any] | None) -> Path | None:
        """Called by every rank at validation and checkpoint steps. `checkpoint` is the state to
        persist (rank 0 only). Returns where the checkpoint went, if one was written."""
        return None

    def fault_marker_dir(self) -> Path | None:
        """A folder that survives a worker restart, for the once-only crash fault."""
        return None


def choose_device(requested: str, gpu_assigned: bool, why_none: str) -> torch.device:
    """TrainConfig.device resolved against whether this process has a GPU to use: auto takes it if
    there is one; cuda without one is refused here, not at the first CUDA call."""
    if requested == "cuda" and not gpu_assigned:
        raise ValueError(f"device=cuda, but {why_none}")
    return torch.device("cuda" if gpu_assigned and requested != "cpu" else "cpu")


class LocalContext(RunContext):
    """A plain process writing checkpoints to `out_dir/checkpoints/step_NNNNNNNN/`.

    Resumes from `resume_from` if given, else from the newest checkpoint already in `out_dir`.
    Keeps the best checkpoint by validation cosine plus the `keep` newest.
    """

    def __init__(self, out_dir: str | Path, *, resume_from: str | Path | None = None, keep: int = 2):
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.resume_from = Path(resume_from) if resume_from else None
        self.keep = keep

    def latest_checkpoint(self) -> Path | None:
        if self.resume_from:
            return self.resume_from
        found = list_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

    def resume_state(self):
        path = self.latest_checkpoint()
        return (load_checkpoint(path, map_location="cpu"), str(path)) if path else None

    def report(self, step, metrics, checkpoint):
        if checkpoint is None:
            return None
        path = save_checkpoint(self.checkpoint_dir / f"step_{step:08d}", checkpoint,
                               meta={"step": step, "metrics": metrics, "saved_at": time.time()})
        self._prune()
        return path

    def best_checkpoint(self) -> Path | None:
        scored = [(_val_cosine(p), p) for p in list_checkpoints(self.checkpoint_dir)]
        scored = [(s, p) for s, p in scored if s is not None]
        return max(scored)[1] if scored else None

    def _prune(self) -> None:
        found = list_checkpoints(self.checkpoint_dir)
        keep = set(found[-self.keep:]) | {self.best_checkpoint()}
        for path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def fault_marker_dir(self) -> Path:
        return self.out_dir


def _val_cosine(path: Path) -> float | None:
    try:
        return json.loads((path / META_FILE).read_text())["metrics"].get("val_cosine")
    except (OSError, ValueError, KeyError):
        return None


class Tracker:
    """Do-nothing tracker; subclasses record to a file or to MLflow."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], name: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str, summary: dict[str, Any]) -> None: ...


class FileTracker(Tracker):
    """Metrics as JSON lines in `out_dir/metrics.jsonl`; params, tables and artifacts beside it."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.out_dir / "metrics.jsonl"

    def log_params(self, params):
        (self.out_dir / "params.json").write_text(json.dumps(params, indent=2, default=str))

    def set_tags(self, tags):
        (self.out_dir / "tags.json").write_text(json.dumps(tags, indent=2))

    def log_metrics(self, metrics, step):
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_table(self, rows, name):
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2))

    def log_artifact(self, path, artifact_path=None):
        dest = self.out_dir / (artifact_path or "") / Path(path).name
        if Path(path).resolve() != dest.resolve():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)

    def finish(self, status, summary):
        from .plots import validation_plot
        rows = read_metrics(self.metrics_file) if self.metrics_file.exists() else []
        baselines = {k: v for row in rows for k, v in row.items() if k.startswith("baseline_")}
        (self.out_dir / "plots").mkdir(exist_ok=True)
        validation_plot([(r["step"], r["val_cosine"]) for r in rows if r.get("val_cosine") is not None],
                        [(r["step"], r["val_top1"]) for r in rows if r.get("val_top1") is not None],
                        baselines, self.out_dir / "plots" / "validation_vs_baselines.png")


class TrackerGroup(Tracker):
    """Sends everything to several trackers (e.g. the run folder and MLflow)."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log_params(self, params):
        for t in self.trackers:
            t.log_params(params)

    def set_tags(self, tags):
        for t in self.trackers:
            t.set_tags(tags)

    def log_metrics(self, metrics, step):
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_table(self, rows, name):
        for t in self.trackers:
            t.log_table(rows, name)

    def log_artifact(self, path, artifact_path=None):
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def finish(self, status, summary):
        for t in self.trackers:
            t.finish(status, summary)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows a FileTracker wrote, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
