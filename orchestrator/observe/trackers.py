"""The trackers `train_loop` records through: `Tracker` (params, metric curves, tables, artifacts; the
do-nothing tracker itself, which every rank but 0 gets), `FileTracker` (a run folder) and
`TrackerGroup` (fans out to several). MLflow's tracker is `tracking.MlflowTracker`, the console's
`console.ConsoleTracker`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


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
