"""What a researcher sees while a model trains: one line per validation (step, loss, validation
cosine and top-1, every baseline) and, between validations, a progress line with an ETA.

The lines come from a Tracker, so the training loop stays as it is: a local run prints them itself;
in a Ray Train run, rank 0 sends them through a Ray queue to the driver, which prints them without
Ray's per-process prefix. Everything else Ray's processes write stays in Ray's log files (the
driver joins Ray with `log_to_driver=False`); sweeps show Ray Tune's own progress table instead.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..metrics import baseline_scores
from .trackers import Tracker

PROGRESS_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@dataclass
class ConsoleTracker(Tracker):
    """Formats a run's metrics as console lines and hands each one to `emit`."""
    total_steps: int
    emit: Callable[[str], None] = print
    baselines: dict[str, Any] = field(default_factory=dict)   # flat baseline_* metrics, if known up front
    validates_every: tuple[int, ...] = ()  # val_every, checkpoint_every: a validation line follows those steps
    progress_every_s: float = PROGRESS_EVERY_S
    clock: Callable[[], float] = time.monotonic
    indent: str = "  "
    _loss: float | None = None
    _started: tuple[float, int] | None = None    # (time, step) the ETA counts from
    _last_line_at: float | None = None

    def log_metrics(self, metrics, step):
        now = self.clock()
        if self._started is None:
            self._started = (now, step)
        self.baselines.update({k: v for k, v in metrics.items() if k.startswith("baseline_")})
        if metrics.get("loss") is not None:
            self._loss = float(metrics["loss"])
        if metrics.get("val_cosine") is not None:
            self._say(now, self._validation_line(metrics, step, now))
        elif "loss" in metrics and not self._validates_at(step) and (
                self._last_line_at is None or now - self._last_line_at >= self.progress_every_s):
            self._say(now, f"{self._position(step)}  loss {self._loss:.4f}{self._eta(step, now)}")

    def _validates_at(self, step: int) -> bool:
        return step >= self.total_steps or any(step % every == 0 for every in self.validates_every)

    def _say(self, now: float, line: str) -> None:
        self._last_line_at = now
        self.emit(self.indent + line)

    def _position(self, step: int) -> str:
        return f"step {step:>{len(str(self.total_steps))}d}/{self.total_steps}"

    def _eta(self, step: int, now: float) -> str:
        start_time, start_step = self._started
        if step >= self.total_steps or step <= start_step:
            return ""
        per_step = (now - start_time) / (step - start_step)
        return f"  ETA {format_duration(per_step * (self.total_steps - step))}"

    def _validation_line(self, metrics: dict[str, Any], step: int, now: float) -> str:
        loss = f"loss {self._loss:.4f}" if self._loss is not None and step > 0 else "start      "
        line = f"{self._position(step)}  {loss}  val cosine {metrics['val_cosine']:.4f}"
        if metrics.get("val_top1") is not None:
            line += f" top1 {metrics['val_top1']:.3f}"
        if metrics.get("val_cosine_lattice_only") is not None and metrics.get("lattice_gain") is not None:
            # Whether the lattice, not only its skip path, carries the prediction.
            line += f" (lattice alone {metrics['val_cosine_lattice_only']:.4f}, gain {metrics['lattice_gain']:+.4f})"
        scores = baseline_scores(self.baselines)
        if scores:
            line += "  | baselines " + ", ".join(
                f"{name} {s.get('cosine', float('nan')):.4f}" + (f"/{s['top1']:.3f}" if "top1" in s else "")
                for name, s in scores.items())
        return line + self._eta(step, now)


class ProgressChannel:
    """Carries ConsoleTracker lines from a Ray worker to the driver, which prints them as they come."""

    def __init__(self, emit: Callable[[str], None] = print):
        from ray.util.queue import Queue
        # No CPU: the queue must never wait for, or take a slot from, the training workers.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.emit = emit

    def __getstate__(self):
        # Workers only put lines on the queue. `emit` stays with the driver: pickling the builtin
        # print fails once Ray has patched builtins.print in the driver (it does for its progress bars).
        return {"queue": self.queue, "emit": None}

    def tracker(self, total_steps: int, baselines: dict[str, Any] | None = None,
                validates_every: tuple[int, ...] = ()) -> ConsoleTracker:
        """The tracker rank 0 uses (call it in the worker; the queue handle travels with the config)."""
        return ConsoleTracker(total_steps, emit=self.queue.put, baselines=dict(baselines or {}),
                              validates_every=validates_every)

    def printing(self):
        """A context manager that prints lines from the queue until it exits (and then the rest)."""
        return _Printing(self)

    def close(self) -> None:
        import ray
        ray.kill(self.queue.actor)


class _Printing:
    def __init__(self, channel: ProgressChannel):
        self.channel, self.stop = channel, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="progress-printer")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False

    def _run(self) -> None:
        from ray.util.queue import Empty
        queue = self.channel.queue
        while True:
            try:
                self.channel.emit(queue.get(timeout=1.0))
            except Empty:
                if self.stop.is_set():
                    return


class _ConsoleFilter(logging.Filter):
    """The console shows the orchestrator's own INFO lines and everyone's warnings. The training
    loop's per-step lines are detail for the log file: ConsoleTracker prints the console's version."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name.startswith("orchestrator.") and record.name != "orchestrator.train"


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()} ({record.name})"
        return record.getMessage()


def setup_logging(log_file: Path | None = None) -> None:
    """Console: short lines (see _ConsoleFilter); the log file, if any, keeps every INFO line."""
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormatter())
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        detail = logging.FileHandler(log_file)
        detail.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(detail)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    # MLflow logs through its own handler (database set-up, registry) and draws a progress bar for
    # every artifact download; neither tells a researcher anything. It reads these when imported and
    # at each download; a user's own setting wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])


def tool_command(name: str) -> str:
    """How to call a tool of this environment (mlflow, python) so that the command works when pasted:
    the bare name where it is on PATH, else its path (e.g. `.venv/bin/mlflow` after `make run`)."""
    here = Path(sys.executable).parent / name
    found = shutil.which(name)
    # Compare folders, not files: a venv's python is a symlink to the system's.
    if not here.exists() or (found and Path(found).parent.resolve() == here.parent.resolve()):
        return name
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)
