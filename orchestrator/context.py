"""Where `train_loop` runs: the one small interface that differs between a plain process, a Ray
Tune trial and a Ray Train worker.

RunContext answers: which rank am I, on which device, which checkpoint do I resume from, where
do reports and checkpoints go, and which test faults fire (`faults`, see orchestrator.faults;
`Faults()`, nothing, unless the launcher was given some). All three live here: `LocalContext` (a plain process),
`TuneContext` (a Tune function trainable) and `RayTrainContext` (a worker of a TorchTrainer). Ray
is imported inside their methods only, so `model/`, `orchestrator.train` and this module import
in a process that has no Ray (gpu-check runs there).

What a run records (params, metric curves, tables, plots) goes to a tracker, not a context: see
`observe/trackers.py`.

`best_checkpoint` is the one place a run's best checkpoint is chosen, whatever shape its launcher
holds the candidates in.

`all_gather` and `step_check` are the collectives `train_loop` makes across the ranks of a context
(no-ops in a single process): whatever a rank holds from every rank, and the per-step loss check.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from model.config import ConfigError

from .checkpoint import META_FILE, list_checkpoints, load_checkpoint, save_checkpoint
from .faults import Faults

log = logging.getLogger(__name__)


def best_checkpoint(candidates: Iterable[tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any]] | None:
    """The (checkpoint, metrics) pair with the highest validation cosine, or None if no candidate
    has a score. A checkpoint is whatever the launcher holds: a folder path, a Ray `Checkpoint`."""
    scored = [(checkpoint, metrics) for checkpoint, metrics in candidates
              if isinstance(metrics.get("val_cosine"), (int, float)) and not math.isnan(metrics["val_cosine"])]
    return max(scored, key=lambda pair: pair[1]["val_cosine"]) if scored else None


class RunContext:
    """The plain-process defaults: rank 0 of 1, nothing to resume, reports dropped."""
    rank: int = 0
    world_size: int = 1
    faults: Faults = Faults()  # test faults for train_loop to fire; a launcher may hand some in

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
        """Called by every rank at each validation (every checkpoint step validates) with its
        metrics, and once more when the run ends with the run's summary and no checkpoint.
        `checkpoint` is the state to persist (rank 0 only, at checkpoint steps). Returns the folder
        the checkpoint went to where the context can name one locally (LocalContext), else None."""
        return None

    def fault_marker_dir(self) -> Path | None:
        """A folder that survives a worker restart, for the once-only crash fault."""
        return None


def choose_device(requested: str, gpu_assigned: bool, why_none: str) -> torch.device:
    """TrainConfig.device resolved against whether this process has a GPU to use: auto takes it if
    there is one; cuda without one is refused here, not at the first CUDA call."""
    if requested == "cuda" and not gpu_assigned:
        raise ConfigError(f"device=cuda, but {why_none}")
    return torch.device("cuda" if gpu_assigned and requested != "cpu" else "cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (`[obj]` in a single process). Pickles through the host:
    for what is gathered once per validation or checkpoint, not every step."""
    if _distributed():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def step_check(loss_sum: torch.Tensor) -> tuple[float, bool]:
    """(this rank's loss, whether the loss of any rank is non-finite), read in one host sync.

    A tensor all_reduce rather than all_gather_object, which pickles through the host every step."""
    bad = (~torch.isfinite(loss_sum)).float()
    if _distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    loss_value, any_bad = torch.stack([loss_sum.float(), bad]).tolist()
    return loss_value, any_bad > 0


class LocalContext(RunContext):
    """A plain process writing checkpoints to `out_dir/checkpoints/step_NNNNNNNN/`.

    Resumes from `resume_from` if given, else from the newest checkpoint already in `out_dir`.
    Keeps the best checkpoint by validation cosine plus the `keep` newest.
    """

    def __init__(self, out_dir: str | Path, *, resume_from: str | Path | None = None, keep: int = 2,
                 faults: Faults | None = None):
        self.out_dir = Path(out_dir)
        self.faults = faults or Faults()
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

    def checkpoints(self) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, the metrics it was saved with) of every checkpoint in the run folder, oldest first."""
        return [(path, _saved_metrics(path)) for path in list_checkpoints(self.checkpoint_dir)]

    def _prune(self) -> None:
        found = self.checkpoints()
        best = best_checkpoint(found)
        keep = {path for path, _ in found[-self.keep:]} | ({best[0]} if best else set())
        for path, _ in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def fault_marker_dir(self) -> Path:
        return self.out_dir


def _saved_metrics(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_FILE).read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return {}


class RayContext(RunContext):
    """Reports and checkpoints through a Ray session: Ray Train's or Ray Tune's (`api`).

    A checkpoint is written to a temporary folder and handed to `report`, which persists it in
    Ray's storage; after a restart, `get_checkpoint` returns the newest one reported.
    """
    api = None  # the module with report / get_checkpoint / Checkpoint: ray.train or ray.tune

    def __init__(self, fault_dir: str | None = None, extra_metrics: dict[str, Any] | None = None,
                 faults: Faults | None = None):
        self._fault_dir = fault_dir
        self.extra_metrics = extra_metrics or {}
        self.faults = faults or Faults()

    def resume_state(self):
        checkpoint = self.api.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(folder, map_location="cpu"), checkpoint.path

    def report(self, step, metrics, checkpoint):
        metrics = {**metrics, **self.extra_metrics, "step": step}
        if checkpoint is None:
            self.api.report(metrics)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, checkpoint, meta={"step": step, "metrics": metrics})
            self.api.report(metrics, checkpoint=self.api.Checkpoint.from_directory(tmp),
                            **self.checkpoint_kwargs(step))
        return None

    def checkpoint_kwargs(self, step: int) -> dict[str, Any]:
        return {}

    def device(self, requested: str) -> torch.device:
        # What Ray assigned, not torch.cuda.is_available(): a CPU trial on a GPU node sees the GPU
        # too (and Ray narrows CUDA_VISIBLE_DEVICES to the GPUs it assigned, so cuda:0 is ours).
        import ray
        return choose_device(requested, bool(ray.get_gpu_ids()),
                             "Ray assigned this trial no GPU (ask for one with --gpus-per-trial)")

    def fault_marker_dir(self):
        return Path(self._fault_dir) if self._fault_dir else None


class TuneContext(RayContext):
    """A Tune function trainable: one process, checkpoints reported to the trial's storage.

    Every report carries the trial's wall time so far (`wall_time_s`, carried over from the
    checkpoint it resumed from: a PBT exploit inherits its donor's time with its weights) and, given
    the identity baseline's cosine, `val_cosine_per_hour`: the cosine gained over that baseline per
    hour. A trial that resumed reports `resumed_from`, the history of its weights: one entry per
    resume, the checkpoint's step and folder, which trial resumed and which saved it (another one:
    a PBT exploit), and the step of the first report after it. The history
    travels in the checkpoints, so a trial that copies another inherits the donor's."""

    def __init__(self, extra_metrics: dict[str, Any], baseline_cosine: float | None = None,
                 faults: Faults | None = None):
        import ray.tune
        super().__init__(ray.tune.get_context().get_trial_dir(), extra_metrics, faults)
        self.api = ray.tune
        self.trial_id = ray.tune.get_context().get_trial_id()
        self.baseline_cosine = baseline_cosine
        self.started, self.time_before = time.perf_counter(), 0.0
        self.lineage: list[dict[str, Any]] = []

    def resume_state(self):
        resumed = super().resume_state()
        if resumed is not None:
            state, source = resumed
            self.time_before = float(state.get("wall_time_s", 0.0))
            self.lineage = list(state.get("lineage", [])) + [{
                "step": int(state["step"]), "checkpoint": str(source), "trial": self.trial_id,
                "saved_by": state.get("trial_id", self.trial_id)}]
        return resumed

    def report(self, step, metrics, checkpoint):
        wall = self.time_before + time.perf_counter() - self.started
        extra: dict[str, Any] = {"wall_time_s": wall}
        cosine = metrics.get("val_cosine")
        if self.baseline_cosine is not None and isinstance(cosine, (int, float)):
            extra["val_cosine_per_hour"] = (cosine - self.baseline_cosine) / max(wall / 3600, 1e-9)
        if self.lineage:
            self.lineage[-1].setdefault("next_report_step", step)
            extra["resumed_from"] = self.lineage
        if checkpoint is not None:
            checkpoint = {**checkpoint, "wall_time_s": wall, "lineage": self.lineage, "trial_id": self.trial_id}
        return super().report(step, {**metrics, **extra}, checkpoint)


class RayTrainContext(RayContext):
    """A Ray Train worker: rank and device from Ray, DDP wrapping by Ray."""

    def __init__(self, fault_dir: str | None = None, faults: Faults | None = None):
        import ray.train
        super().__init__(fault_dir, faults=faults)
        self.api = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def device(self, requested: str) -> torch.device:
        # Ray's device for this worker whatever was requested: with GPUs the process group is NCCL,
        # which needs the worker's own GPU.
        import ray.train.torch
        device = ray.train.torch.get_device()
        if requested == "cuda" and device.type != "cuda":
            raise ConfigError("device=cuda, but Ray assigned this worker no GPU (ask for one with --gpus-per-worker)")
        return device

    def wrap_model(self, model):
        import ray.train.torch
        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world_size > 1 else model

    def checkpoint_kwargs(self, step):
        return {"checkpoint_dir_name": f"step_{step:08d}"}
