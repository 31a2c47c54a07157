"""Ray Tune sweeps: one trial per sampled config, ASHA, MLflow runs.

The search spaces come from YAML files (orchestrator/search_space.py: `load_space`).

Trials with one worker run `train_loop` directly as a function trainable; trials with several
workers launch a TorchTrainer inside the trial, whose reports reach Tune through
`TuneReportCallback`. Before a trial trains, the memory planner checks its sampled lattice against
the per-trial memory budget and picks its batch size (at most the configured one); a trial that
cannot fit ends `infeasible` with the planner's reason and the sweep goes on, as it does past a
diverged trial.

MLflow: the sweep is a parent run, each trial a nested child run (created by the trial, found
again by its `trial_id` tag after a restore). When the sweep ends, the driver registers each
trial's best checkpoint, closes the child runs, and gives the parent the best trial's config and
metrics plus a parallel-coordinates plot of sampled params against validation cosine.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig, flatten, make_config, run_tags
from .context import TuneContext, best_checkpoint
from .data import PairDataset, validation_rows
from .evaluation import baselines
from .ray_train import (Launch, WorkerBudget, alive_node_count, build_trainer, check_gpu_share, connect,
                        prepare_config, storage_path, with_planned_batch)
from .search_space import SearchSpace, SpaceError, load_space
from .tracking import TrackedRun, check_tracking_uri, child_runs, client_for, log_params, resolve_tracking_uri
from .train import load_data, train_loop, worker_shards

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"


# ------------------------------------------------------------------------------------------------
# One trial

def trial_config(config: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """The TrainConfig of a trial and the values sampled for it."""
    sampled = dict(config["sampled"])
    preset = sampled.pop("preset", config["preset"])
    cfg = make_config(preset, {**config["set"], **sampled})
    return cfg, dict(config["sampled"])


def _trial_tags(sweep: dict[str, Any], trial_id: str, cfg: TrainConfig, sampled: dict[str, Any]) -> dict[str, str]:
    """What a trial's run (and its registered version) is tagged with: lattice, preset, trial, sampled values."""
    return {**run_tags(cfg, sweep["workers_per_trial"]), "trial_id": trial_id,
            "sampled": json.dumps(sampled, default=str), "sweep": sweep["name"]}


def _open_trial_run(sweep: dict[str, Any], trial_id: str, cfg: TrainConfig, sampled: dict[str, Any]) -> TrackedRun:
    """The trial's MLflow child run: found again by its trial_id tag after a restore, else created."""
    found = child_runs(sweep["tracking_uri"], sweep["experiment"], sweep["parent_run_id"], "trial_id")
    return TrackedRun.open(sweep["tracking_uri"], sweep["experiment"], trial_id, params=flatten(cfg),
                           tags={**_trial_tags(sweep, trial_id, cfg, sampled), "status": "running"},
                           parent_run_id=sweep["parent_run_id"],
                           run_id=found[trial_id].info.run_id if trial_id in found else None)


def run_trial(config: dict[str, Any], data: PairDataset, sweep: dict[str, Any]) -> None:
    """The function every Tune trial runs; `data` and the sweep's settings come through the object store."""
    import ray.tune

    from .planner import MemoryBudgetError

    trial_id = ray.tune.get_context().get_trial_id()
    cfg, sampled = trial_config(config)
    run = _open_trial_run(sweep, trial_id, cfg, sampled)
    extra = {"trial_id": trial_id, "mlflow_run_id": run.run_id}
    try:
        cfg = with_planned_batch(cfg, WorkerBudget(sweep["trial_memory_bytes"], sweep["device_type"]))
    except MemoryBudgetError as e:
        log.warning("trial %s is infeasible: %s", trial_id, e)
        run.close(status="infeasible", reason=str(e))  # nothing trained: the trial ends its run itself
        # val_cosine -1 (the worst cosine) only keeps the scheduler's bookkeeping whole; the sweep
        # summary reports an infeasible trial without a score.
        ray.tune.report({**extra, "status": "infeasible", "reason": str(e), "val_cosine": -1.0, "step": 0})
        return
    if sweep["workers_per_trial"] == 1:
        (worker_data,) = worker_shards(data, 1, cfg.val_max_samples)
        train_loop(cfg, TuneContext(extra), run.tracker(), data=worker_data)
        return
    from ray.tune.integration.ray_train import TuneReportCallback
    launch = Launch(workers=sweep["workers_per_trial"], gpus_per_worker=sweep["gpus_per_trial"],
                    storage=str(Path(sweep["storage"]) / sweep["name"] / "trainers"),
                    max_failures=sweep["max_failures"])
    trainer = build_trainer(prepare_config(cfg), launch, data, run=run, run_name=trial_id,
                            callbacks=[TuneReportCallback()])
    trainer.fit()


# ------------------------------------------------------------------------------------------------
# The sweep

@dataclass
class Sweep:
    """A sweep request, as the CLI takes it."""
    spaces: list[str]
    preset: str = "smoke"
    sets: dict[str, Any] = field(default_factory=dict)  # --set overrides for every trial
    num_samples: int = 4
    max_steps: int | None = None
    workers_per_trial: int = 1
    gpus_per_trial: float = 0.0
    concurrency: int | None = None
    scheduler: str = "asha"
    resume: bool = False
    experiment: str = "energy-lattice-sweep"
    storage: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    trial_memory_gb: float | None = None  # default: a worker node's free memory / concurrent trials
    max_failures: int = 1

    def __post_init__(self):
        check_gpu_share(self.workers_per_trial, self.gpus_per_trial)


# Config fields that decide when a trial reports its validation cosine; ASHA's rungs are set from them.
REPORT_SCHEDULE_FIELDS = ("max_steps", "val_every", "checkpoint_every")


def asha_limits(cfg: TrainConfig, space: SearchSpace) -> tuple[int, int]:
    """(grace_period, max_t) for ASHA in optimizer steps, for a scheduler with stop_last_trials=False.

    A trial reports its validation cosine at every validation, every checkpoint and at max_steps;
    ASHA judges it at the first report at or after each rung (grace_period * 2^k, up to max_t).
    The first rung is no earlier than the first report, so no trial is judged before its first
    validation (and, past that, not before a quarter of the run); the last is before max_steps,
    since a trial at its last step has nothing left to save and stopping it there would only cut
    its final summary and plots. When no report comes before the last step there is nothing to
    stop early, and the rungs lie past max_steps. Any max_steps >= 1 works.
    """
    sampled = [key for key in REPORT_SCHEDULE_FIELDS if key in space.entries]
    if sampled:
        raise SpaceError(f"the space samples {', '.join(sampled)}, which ASHA's schedule is derived from; fix "
                         f"{'it' if len(sampled) == 1 else 'them'} with --set or --max-steps, or use --scheduler fifo")
    first_report = min(cfg.val_every, cfg.checkpoint_every, cfg.max_steps)
    grace, last_rung = max(first_report, cfg.max_steps // 4), cfg.max_steps - 1
    if grace > last_rung:
        return cfg.max_steps + 1, cfg.max_steps + 1
    return grace, last_rung


def _trial_resources(sweep: Sweep) -> dict[str, float]:
    if sweep.workers_per_trial > 1:
        # The trial only waits on its TorchTrainer, whose workers hold the real resources; Tune
        # needs a non-empty request, hence a token share.
        return {"CPU": 0.01}
    return {"CPU": 1, **({"GPU": sweep.gpus_per_trial} if sweep.gpus_per_trial else {})}


def _trial_checkpoints(result, workers_per_trial: int) -> list[tuple[Any, dict[str, Any]]]:
    """A trial's checkpoints with their metrics: Tune's own for a function trainable; for a trial on
    a TorchTrainer, the paths TuneReportCallback put into the reports it forwarded."""
    if workers_per_trial == 1:
        return list(result.best_checkpoints or [])
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df:
        return []
    return [(row["checkpoint_path"], row.to_dict()) for _, row in df.iterrows()
            if isinstance(row["checkpoint_path"], str)]


def _finish_trial(result, sweep: dict[str, Any], trial_id: str, run_id: str | None) -> dict[str, Any]:
    """Close a trial's child run (its best checkpoint registered once) and return its row of the sweep summary."""
    metrics = result.metrics or {}
    best = best_checkpoint(_trial_checkpoints(result, sweep["workers_per_trial"]))
    error = "error" if result.error is not None else None
    if run_id is None:  # the trial never got as far as its run
        summary = {"status": error or "stopped", "model_version": None, "checkpoint": None}
    else:
        run = TrackedRun(sweep["tracking_uri"], run_id, _trial_tags(sweep, trial_id, *trial_config(result.config)))
        # A trial that did not finish its loop was stopped by the scheduler before max_steps.
        summary = run.close(best, status=error, unfinished="stopped")
    best_metrics = best[1] if best else {}
    status = summary["status"]
    return {"trial_id": trial_id, "status": status, "mlflow_run_id": run_id, "model_version": summary["model_version"],
            "val_cosine": best_metrics.get("val_cosine") if status != "infeasible" else None,
            "val_top1": best_metrics.get("val_top1"), "steps": metrics.get("step"), "reason": summary.get("reason"),
            "train_time_s": metrics.get("time_total_s"), "checkpoint": summary["checkpoint"]}


def run_sweep(sweep: Sweep) -> dict[str, Any]:
    """Run (or, with `resume`, continue) a sweep; return its summary."""
    from ray import tune

    started = time.perf_counter()
    space = load_space(sweep.spaces)
    sets = dict(sweep.sets)
    if sweep.max_steps is not None:
        sets["max_steps"] = sweep.max_steps
    uri = resolve_tracking_uri(sweep.tracking_uri)
    base = make_config(sweep.preset, sets)
    grace_period, max_t = asha_limits(base, space) if sweep.scheduler == "asha" else (None, None)
    base = prepare_config(base)  # builds the corpus once
    sets["data_path"] = base.data_path

    connect(sweep.address)
    check_tracking_uri(uri, alive_node_count())
    storage = storage_path(sweep.storage)
    sweep_dir = Path(storage) / sweep.experiment
    concurrent = sweep.concurrency or max(1, int(_cluster_cpus() // max(1, sweep.workers_per_trial)))
    budget = (WorkerBudget(int(sweep.trial_memory_gb * 2**30), "cuda" if sweep.gpus_per_trial else "cpu")
              if sweep.trial_memory_gb else WorkerBudget.probe(1, sweep.gpus_per_trial, concurrent))
    # The dataset is loaded (and embedded) once here, with its baselines, and reaches every trial
    # through the object store.
    data = load_data(base)
    data = dataclasses.replace(data, baselines=baselines(data.train, validation_rows(data, base.val_max_samples)))

    def settings_for_trials(parent_run_id: str) -> dict[str, Any]:
        return {"tracking_uri": uri, "experiment": sweep.experiment, "parent_run_id": parent_run_id,
                "name": sweep.experiment, "storage": storage, "workers_per_trial": sweep.workers_per_trial,
                "gpus_per_trial": sweep.gpus_per_trial, "trial_memory_bytes": budget.budget_bytes,
                "device_type": budget.device_type, "max_failures": sweep.max_failures}

    if sweep.resume:
        if not (sweep_dir / SWEEP_FILE).exists():
            raise SpaceError(f"no sweep to resume at {sweep_dir}")
        saved = json.loads((sweep_dir / SWEEP_FILE).read_text())
        info = {**settings_for_trials(saved["parent_run_id"]), **saved}  # a resumed sweep keeps its settings
        parent = TrackedRun(uri, info["parent_run_id"])
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=_trainable(data, info, sweep), resume_unfinished=True,
                                   resume_errored=True)
        log.info("resuming sweep %s (MLflow parent run %s)", sweep_dir, parent.run_id)
    else:
        if (sweep_dir / SWEEP_FILE).exists():
            raise SpaceError(f"a sweep named {sweep.experiment!r} already exists at {sweep_dir}; pass --resume to "
                             f"continue it or choose another --experiment")
        settings = {k: v for k, v in dataclasses.asdict(sweep).items() if k not in ("spaces", "sets", "resume")}
        params = {**{f"sweep.{k}": v for k, v in settings.items()},
                  **{f"space.{k}": v for k, v in space.describe().items()},
                  **{f"set.{k}": v for k, v in sets.items()}, "sweep.trial_memory_bytes": budget.budget_bytes}
        parent = TrackedRun.open(uri, sweep.experiment, f"sweep-{sweep.experiment}", params=params,
                                 tags={"sweep": sweep.experiment, "preset": sweep.preset, "kind": "sweep"})
        client = client_for(uri)
        for name, text in space.files.items():
            client.log_text(parent.run_id, text, f"spaces/{name}")
        info = settings_for_trials(parent.run_id)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info))
        scheduler = None
        if sweep.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler
            scheduler = ASHAScheduler(time_attr="step", max_t=max_t, reduction_factor=2, grace_period=grace_period,
                                      stop_last_trials=False)  # a trial ends itself, after its summary
        tuner = tune.Tuner(
            _trainable(data, info, sweep),
            param_space={"preset": sweep.preset, "set": sets, "sampled": space.param_space()},
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples, metric="val_cosine", mode="max",
                                        scheduler=scheduler, max_concurrent_trials=sweep.concurrency),
            run_config=tune.RunConfig(
                name=sweep.experiment, storage_path=storage,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_cosine",
                                                        checkpoint_score_order="max")))
    grid = tuner.fit()
    if _interrupted(sweep_dir, expected_trials=sweep.num_samples * space.grid_size()):
        log.warning("sweep %s was interrupted; continue it with --resume", sweep.experiment)
        return {"status": "interrupted", "trials": [], "best": None, "parent_run_id": parent.run_id,
                "tracking_uri": uri, "sweep_path": str(sweep_dir), "wall_time_s": time.perf_counter() - started,
                "trial_train_time_s": 0.0}

    run_ids = {trial: run.info.run_id for trial, run in child_runs(uri, sweep.experiment, parent.run_id,
                                                                     "trial_id").items()}
    trials = []
    for n, result in enumerate(grid):
        trial_id = (result.metrics or {}).get("trial_id") or f"unreported-{n}"  # never reached a report
        row = _finish_trial(result, info, trial_id, run_ids.get(trial_id))
        row["params"] = {k: v for k, v in ((result.config or {}).get("sampled") or {}).items()}
        trials.append(row)
    trials.sort(key=lambda t: t["trial_id"])
    scored = [t for t in trials if isinstance(t["val_cosine"], (int, float)) and math.isfinite(t["val_cosine"])]
    best = max(scored, key=lambda t: t["val_cosine"]) if scored else None
    _finish_parent(parent, trials, best, space)
    wall = time.perf_counter() - started
    return {"status": "completed", "trials": trials, "best": best["trial_id"] if best else None,
            "parent_run_id": parent.run_id,
            "tracking_uri": uri, "sweep_path": str(sweep_dir), "wall_time_s": wall,
            "trial_train_time_s": sum(t["train_time_s"] or 0.0 for t in trials)}


def _trainable(data: PairDataset, info: dict[str, Any], sweep: Sweep):
    """run_trial with the data and the sweep's settings as parameters: kept out of the trials' config,
    Tune's tables of each trial show the values that vary, not the plumbing."""
    from ray import tune
    return tune.with_resources(tune.with_parameters(run_trial, data=data, sweep=info), _trial_resources(sweep))


def _interrupted(sweep_dir: Path, expected_trials: int) -> bool:
    """After Ctrl-C, Tune saves its state and returns normally; the saved trial statuses (and, with
    trials created lazily, their count) tell an interrupted sweep from a finished one."""
    from ray.tune import ExperimentAnalysis
    trials = ExperimentAnalysis(str(sweep_dir)).trials
    return len(trials) < expected_trials or any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _cluster_cpus() -> float:
    import ray
    return ray.cluster_resources().get("CPU", 1.0)


def _finish_parent(parent: TrackedRun, trials: list[dict[str, Any]], best: dict[str, Any] | None,
                   space: SearchSpace) -> None:
    import tempfile

    from .plots import parallel_coordinates
    client, run_id = client_for(parent.uri), parent.run_id
    client.log_dict(run_id, {"trials": trials}, "trials.json")
    if best:
        client.set_tag(run_id, "best_trial", best["trial_id"])
        for key, value in (("best_val_cosine", best["val_cosine"]), ("best_val_top1", best["val_top1"])):
            if value is not None:
                client.log_metric(run_id, key, value)
        best_run = client.get_run(best["mlflow_run_id"])
        client.log_dict(run_id, best_run.data.params, "best_config.json")
        logged = client.get_run(run_id).data.params
        log_params(client, run_id, {f"best.{k}": v for k, v in best["params"].items() if f"best.{k}" not in logged})
    with tempfile.TemporaryDirectory() as tmp:
        path = parallel_coordinates(trials, list(space.entries), Path(tmp) / "params_vs_val_cosine.png")
        client.log_artifact(run_id, str(path))
    parent.end("completed")
