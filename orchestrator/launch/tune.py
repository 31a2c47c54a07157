"""Ray Tune sweeps: one trial per sampled config; random or Optuna (TPE) search; ASHA, FIFO or PBT
scheduling; MLflow runs; a report that says which sampled parameters mattered.

The search spaces come from YAML files (orchestrator/launch/search_space.py: `load_space`).

What a sweep optimises (`--metric`, see metrics.SWEEP_METRICS): validation cosine, the lattice's gain over its own
skip path, or cosine gained per hour of training. Every trial records the steps it ran and its wall
time whatever the metric, so the quality/time trade-off is visible in the report.

Schedulers: ASHA stops weak trials early at rungs derived from the validation schedule
(`asha_limits`); PBT (`pbt_scheduler`) lets a weak trial copy a strong one's latest checkpoint and
perturb the fields that may change mid-training (PBT_MUTABLE); the copying trial resumes from
exactly that checkpoint through the loop's own resume path.

Trials with one worker run `train_loop` directly as a function trainable; trials with several
workers launch a TorchTrainer inside the trial, whose reports reach Tune through
`TuneReportCallback`. Before a trial trains, the memory planner checks its sampled lattice against
the per-trial memory budget and picks its batch size (at most the configured one); a trial that
cannot fit ends `infeasible` with the planner's reason and the sweep goes on, as it does past a
diverged trial. A trial whose process dies is retried from its last checkpoint (`max_failures`,
Tune's FailureConfig; the loop resumes through `TuneContext.resume_state`), and `time_budget_s`
ends the whole sweep at that wall time (Tune's own budget), its unfinished trials reported as
stopped. Optuna's first trial is the preset's own values of the sampled fields (`defaults_point`).

MLflow: the sweep is a parent run, each trial a nested child run (created by the trial, found
again by its `trial_id` tag after a restore). When the sweep ends, the driver registers each
trial's best checkpoint, closes the child runs, and gives the parent the best trial's config and
metrics plus a parallel-coordinates plot of sampled params against validation cosine.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig, flatten, make_config, resolved, run_tags, with_epochs
from ..context import TuneContext, best_checkpoint
from ..data.datasets import PairDataset, training_rows, validation_rows
from ..faults import Faults
from ..metrics import FINAL_METRICS, SWEEP_METRICS, TRIAL_METRICS
from ..observe.plots import parallel_coordinates
from ..observe.tracking import (EXAMPLE_ROWS, TrackedRun, check_tracking_uri, child_runs, client_for, log_params,
                                resolve_tracking_uri)
from ..run_data import prepare_config, prepare_data, worker_shards
from ..train import train_loop
from .ray_train import (Launch, Placement, WorkerBudget, alive_node_count, build_trainer, check_gpu_share, connect,
                        storage_path, with_planned_batch)
from .search_space import SearchSpace, SpaceError, load_space
from .sweep_report import best_trial, sampled_params, write_report

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha", "fifo", "pbt")
# Fields PBT may change while a trial trains: each is read afresh at every step (lr by the schedule,
# the thresholds by the flow processor) and none changes the model's shape or the optimizer's state,
# so a trial can continue from another's checkpoint with new values. Everything else a trial
# sampled is copied from the trial it exploits, with the weights.
PBT_MUTABLE = ("lr", "min_lr", "model.spawn_threshold", "model.convergence_threshold")


# ------------------------------------------------------------------------------------------------
# One trial

@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep needs besides its config. Saved as sweep.json, so a resumed sweep
    keeps the settings it started with."""
    tracking_uri: str
    experiment: str
    parent_run_id: str
    storage: str
    workers_per_trial: int
    gpus_per_trial: float
    trial_memory_bytes: int
    device_type: str
    max_failures: int
    metric: str = "val_cosine"
    identity_cosine: float | None = None  # the baseline val_cosine_per_hour counts from
    epochs: float | None = None           # train each trial this many passes over its rows (else max_steps)
    time_budget_s: float | None = None    # Tune restores it with the sweep, and counts it again from the restore

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: Path) -> TrialSettings:
        saved = json.loads(path.read_text())  # a sweep saved before this dataclass also has "name"
        return cls(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cls)}})


def trial_config(config: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """The TrainConfig of a trial and the values sampled for it."""
    sampled = dict(config["sampled"])
    preset = sampled.pop("preset", config["preset"])
    cfg = make_config(preset, {**config["set"], **sampled})
    return cfg, dict(config["sampled"])


def _trial_tags(settings: TrialSettings, trial_id: str, cfg: TrainConfig, sampled: dict[str, Any]) -> dict[str, str]:
    """What a trial's run (and its registered version) is tagged with: lattice, preset, trial, sampled values."""
    return {**run_tags(cfg, settings.workers_per_trial), "trial_id": trial_id,
            "sampled": json.dumps(sampled, default=str), "sweep": settings.experiment}


def _open_trial_run(settings: TrialSettings, trial_id: str, cfg: TrainConfig, sampled: dict[str, Any]) -> TrackedRun:
    """The trial's MLflow child run: found again by its trial_id tag after a restore (or a PBT
    exploit, which restarts the trial with new values: its tags then show them), else created."""
    found = child_runs(settings.tracking_uri, settings.experiment, settings.parent_run_id, "trial_id")
    tags = _trial_tags(settings, trial_id, cfg, sampled)
    if trial_id in found:
        run = TrackedRun(settings.tracking_uri, found[trial_id].info.run_id, tags)
        client_for(settings.tracking_uri).set_tag(run.run_id, "sampled", tags["sampled"])
        return run
    return TrackedRun.open(settings.tracking_uri, settings.experiment, trial_id, params=flatten(cfg),
                           tags={**tags, "status": "running"}, parent_run_id=settings.parent_run_id)


def run_trial(config: dict[str, Any], data: PairDataset, settings: TrialSettings, faults: Faults | None = None) -> None:
    """The function every Tune trial runs; `data`, the sweep's settings and the faults a test
    switched on come through the object store."""
    import ray.tune

    from ..planner import MemoryBudgetError

    trial_id = ray.tune.get_context().get_trial_id()
    cfg, sampled = trial_config(config)
    try:
        cfg = with_planned_batch(cfg, WorkerBudget(settings.trial_memory_bytes, settings.device_type))
    except MemoryBudgetError as e:
        log.warning("trial %s is infeasible: %s", trial_id, e)
        run = _open_trial_run(settings, trial_id, cfg, sampled)
        run.close(status="infeasible", reason=str(e))  # nothing trained: the trial ends its run itself
        # The worst value of each metric only keeps the scheduler's and the searcher's bookkeeping
        # whole (the searcher learns the region is infeasible); the summary reports no score.
        ray.tune.report({"trial_id": trial_id, "mlflow_run_id": run.run_id, "status": "infeasible",
                         "reason": str(e), "step": 0, **{metric: -1.0 for metric in SWEEP_METRICS}})
        return
    if settings.epochs is not None:  # the batch is known now, and with it the steps of an epoch
        cfg = with_epochs(cfg, settings.epochs, cfg.train_rows or len(data.train), settings.workers_per_trial)
    run = _open_trial_run(settings, trial_id, cfg, sampled)
    extra = {"trial_id": trial_id, "mlflow_run_id": run.run_id}
    run.log_datasets(training_rows(data, cfg.train_rows), validation_rows(data, cfg.val_max_samples), cfg.data_path)
    if settings.workers_per_trial == 1:
        (worker_data,) = worker_shards(data, 1, cfg.val_max_samples, cfg.train_rows)
        with run.system_metrics():
            train_loop(cfg, TuneContext(extra, baseline_cosine=settings.identity_cosine, faults=faults),
                       run.tracker(), data=worker_data)
        return
    from ray.tune.integration.ray_train import TuneReportCallback
    launch = Launch(workers=settings.workers_per_trial, gpus_per_worker=settings.gpus_per_trial,
                    storage=str(Path(settings.storage) / settings.experiment / "trainers"),
                    max_failures=settings.max_failures)
    trainer = build_trainer(prepare_config(cfg), launch, data, run=run, run_name=trial_id,
                            callbacks=[TuneReportCallback()], faults=faults)
    trainer.fit()


# ------------------------------------------------------------------------------------------------
# The sweep

@dataclass
class Sweep(Placement):
    """A sweep request, as the CLI takes it; where it runs and records is a `Placement`, as for train and scale."""
    spaces: list[str]
    preset: str = "smoke"
    sets: dict[str, Any] = field(default_factory=dict)  # --set overrides for every trial
    num_samples: int = 4
    max_steps: int | None = None
    search: str = "random"          # random sampling, or Optuna's TPE (model-based; learns from finished trials)
    scheduler: str = "asha"         # asha: stop weak trials early; fifo: run all to the end; pbt: exploit/explore
    metric: str = "val_cosine"      # what the search, the scheduler and the report maximise (SWEEP_METRICS)
    pbt_interval: int | None = None  # PBT: steps between exploits (default: the trials' checkpoint_every)
    pbt_sync: bool = False  # PBT: trials wait for each other at every interval, so exploits repeat run to run
    seed: int | None = None          # the Optuna sampler's seed (random search: Tune's own)
    workers_per_trial: int = 1
    gpus_per_trial: float = 0.0
    concurrency: int | None = None
    resume: bool = False
    trial_memory_gb: float | None = None  # default: a worker node's free memory / concurrent trials
    experiment: str = field(default="energy-lattice-sweep", kw_only=True)
    # Retries of a crashed trial from its last checkpoint (Tune's FailureConfig); a multi-worker
    # trial's TorchTrainer also restarts its worker group that often.
    max_failures: int = field(default=1, kw_only=True)
    time_budget_s: float | None = field(default=None, kw_only=True)  # wall time after which Tune ends the sweep

    def __post_init__(self):
        check_gpu_share(self.workers_per_trial, self.gpus_per_trial)
        if self.max_failures < 0:
            raise SpaceError(f"--max-failures={self.max_failures} must be at least 0")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise SpaceError(f"--time-budget={self.time_budget_s:g}s must be more than 0 seconds")
        for name, value, allowed in (("--search", self.search, SEARCHES), ("--scheduler", self.scheduler, SCHEDULERS),
                                     ("--metric", self.metric, tuple(SWEEP_METRICS))):
            if value not in allowed:
                raise SpaceError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.search == "optuna" and self.scheduler == "pbt":
            raise SpaceError("--scheduler pbt explores by perturbing the trials it runs; it takes no searcher, "
                             "use --search random with it")
        if self.pbt_interval is not None and self.pbt_interval < 1:
            raise SpaceError(f"--pbt-interval={self.pbt_interval} must be at least 1 step")
        if self.pbt_sync and self.scheduler != "pbt":
            raise SpaceError(f"--pbt-sync paces Population Based Training; --scheduler {self.scheduler} has no exploits")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `90s`, `30m`, `2h`, `1h30m` or `45` (seconds)."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if match is None or not any(match.groups()):
        raise SpaceError(f"--time-budget {text!r} is not a duration; write e.g. 90s, 30m, 2h or 1h30m")
    return sum(float(value) * unit for value, unit in zip(match.groups(), (3600, 60, 1)) if value)


def check_sweep(sweep: Sweep, base: TrainConfig, space: SearchSpace) -> tuple[Any, Any]:
    """Refuse a space the chosen search or scheduler cannot use, before Ray starts; return the
    (scheduler, searcher) Tune is given (None for Tune's defaults)."""
    searcher = None
    if sweep.search == "optuna":
        grids = [key for key, (dist, _) in space.entries.items() if dist == "grid"]
        if grids:
            raise SpaceError(f"--search optuna samples every value, so it cannot take the grid form "
                             f"({', '.join(grids)}); write {{choice: [...]}} instead")
        from ray.tune.search.optuna import OptunaSearch
        first = defaults_point(base, space)
        # TPE; metric and mode come from TuneConfig
        searcher = OptunaSearch(seed=sweep.seed, points_to_evaluate=[first] if first else None)
    if sweep.scheduler == "asha":
        grace_period, max_t = asha_limits(base, space)
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, reduction_factor=2, grace_period=grace_period,
                                  stop_last_trials=False)  # a trial ends itself, after its summary
    elif sweep.scheduler == "pbt":
        scheduler = pbt_scheduler(base, space, sweep.pbt_interval, sweep.pbt_sync)
    else:
        scheduler = None
    return scheduler, searcher


def defaults_point(base: TrainConfig, space: SearchSpace) -> dict[str, Any] | None:
    """Optuna's first trial: the value every sampled field has without a sweep (the preset's, with
    the sweep's --set overrides), keyed as Tune hands the space to Optuna. A sweep that starts there
    can only improve on what a user gets without one. None, with a warning naming the fields, when
    a default lies outside the space: Optuna takes a whole point or none."""
    defaults = flatten(resolved(base))
    point, outside = {}, []
    for key, (dist, args) in space.entries.items():
        value = base.preset if key == "preset" else defaults[key]
        point[f"sampled/{key}"] = value
        if not _in_space(value, dist, args):
            outside.append(f"{key}={value!r} (space: {dist}{args})")
    if outside:
        log.warning("the first Optuna trial is sampled, not the defaults: %s outside the space", "; ".join(outside))
        return None
    return point


def _in_space(value: Any, dist: str, args: list) -> bool:
    """Whether Optuna's distribution for a space entry holds `value` (randint's high is exclusive)."""
    if dist in ("choice", "grid"):
        return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in args)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    low, high = args[0], args[1] - 1 if dist == "randint" else args[1]
    if dist == "randint" and not isinstance(value, int):
        return False
    if dist == "quniform":  # Optuna's stepped distribution counts steps from low
        steps = (value - low) / args[2]
        return low <= value <= high and abs(steps - round(steps)) < 1e-8
    return low <= value <= high


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
    _refuse_sampled_schedule(space, "ASHA")
    first_report = min(cfg.val_every, cfg.checkpoint_every, cfg.max_steps)
    grace, last_rung = max(first_report, cfg.max_steps // 4), cfg.max_steps - 1
    if grace > last_rung:
        return cfg.max_steps + 1, cfg.max_steps + 1
    return grace, last_rung


def _refuse_sampled_schedule(space: SearchSpace, scheduler: str) -> None:
    sampled = [key for key in REPORT_SCHEDULE_FIELDS if key in space.entries]
    if sampled:
        raise SpaceError(f"the space samples {', '.join(sampled)}, which {scheduler}'s schedule is derived from; fix "
                         f"{'it' if len(sampled) == 1 else 'them'} with --set or --max-steps, or use --scheduler fifo")


def pbt_scheduler(cfg: TrainConfig, space: SearchSpace, interval: int | None, sync: bool = False):
    """Population Based Training over the space's PBT_MUTABLE fields, in optimizer steps.

    An exploit restores the donor's latest *reported* checkpoint, so exploits happen only at steps
    that report one: the interval defaults to checkpoint_every and must be a multiple of it.
    Perturbed values are clipped to the space's bounds (a threshold pushed past its allowed range
    would fail the trial instead of exploring).

    Asynchronous by default (Ray's PBT): a trial is judged against the others' latest scores when it
    reaches an interval, so which trial copies which depends on the order they report in. `sync`
    pauses each trial at every interval until the whole population is there (the paper's
    synchronous PBT): the same trials exploit at the same steps in every run, at the cost of fast
    trials waiting for slow ones."""
    from .pbt import PBTBeforeTheLastStep
    _refuse_sampled_schedule(space, "PBT")
    mutable = {key: spec for key, spec in space.entries.items() if key in PBT_MUTABLE}
    if not mutable:
        raise SpaceError(f"--scheduler pbt needs the space to sample at least one field that may change during "
                         f"training ({', '.join(PBT_MUTABLE)}); this one samples {', '.join(space.entries)}")
    interval = interval or cfg.checkpoint_every
    if interval % cfg.checkpoint_every:
        raise SpaceError(f"--pbt-interval={interval} must be a multiple of checkpoint_every={cfg.checkpoint_every}: "
                         f"a trial can only copy a checkpoint its donor reported")
    domains = space.param_space()
    return PBTBeforeTheLastStep(
        last_step=cfg.max_steps, time_attr="step", perturbation_interval=interval, synch=sync,
        hyperparam_mutations={"sampled": {key: domains[key] for key in mutable}},
        custom_explore_fn=functools.partial(clip_to_space, bounds={
            key: (args[0], args[1] - 1 if dist == "randint" else args[1])  # randint's upper bound is exclusive
            for key, (dist, args) in mutable.items() if dist in ("uniform", "loguniform", "randint", "quniform")}))


def clip_to_space(config: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    sampled = config["sampled"]
    for key, (low, high) in bounds.items():
        if key in sampled:
            sampled[key] = type(sampled[key])(min(max(sampled[key], low), high))
    return config


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


def finish_trial(result, settings: TrialSettings, trial_id: str, run_id: str | None, *, out_of_time: bool = False,
                 input_example: Any = None) -> dict[str, Any]:
    """Close a trial's child run (its best checkpoint registered once, `input_example` its model's
    example rows) and return its row of the sweep summary, which is also its record for the sweep
    report (`params`, `metrics`, `status`). `out_of_time`: the sweep ended at its time budget, which
    stopped this trial if it had not finished."""
    last = result.metrics or {}
    # Each time the trial started again from its own checkpoint: a retry after a crash, or a resumed sweep
    restarts = [r["step"] for r in last.get("resumed_from") or [] if r["trial"] == r["saved_by"] == trial_id]
    best = best_checkpoint(_trial_checkpoints(result, settings.workers_per_trial))
    error = "error" if result.error is not None else None
    cfg, sampled = trial_config(result.config) if result.config else (None, {})
    if run_id is None:  # the trial never got as far as its run
        summary = {"status": error or "stopped", "model_version": None, "checkpoint": None}
    else:
        run = TrackedRun(settings.tracking_uri, run_id, _trial_tags(settings, trial_id, cfg, sampled))
        # A trial that did not finish its loop was stopped before max_steps (the scheduler, the time budget).
        summary = run.close(best, status=error, unfinished="stopped", input_example=input_example)
        if restarts:
            client_for(settings.tracking_uri).set_tag(run_id, "restarted_from_steps", ",".join(map(str, restarts)))
    status = summary["status"]
    scored = status != "infeasible"
    best_metrics = best[1] if best and scored else {}
    reason = summary.get("reason")
    if status == "stopped":
        # ASHA ended it at a rung, or the time budget ended the sweep: say where, and what its last validation measured
        by = "the sweep's time budget" if out_of_time else "the scheduler"
        reason = (f"ended by {by} before its first report" if last.get("step") is None else
                  f"stopped by {by} at step {last['step']}; last validation: val_cosine "
                  f"{_fmt_metric(last.get('val_cosine'))}, lattice_gain {_fmt_metric(last.get('lattice_gain'))}")
    metrics = {key: best_metrics.get(key) for key in TRIAL_METRICS}  # every one of SWEEP_METRICS among them
    metrics.update(steps=last.get("step"), wall_time_s=last.get("wall_time_s") or last.get("time_total_s"),
                   mean_steps_used=last.get("mean_steps_used") or last.get("val_steps_used"),
                   max_flow_steps=cfg.model.resolved().max_steps if cfg else None,
                   exploits=sum(1 for r in last.get("resumed_from") or [] if r["trial"] == trial_id
                                and r["saved_by"] != trial_id),
                   restarts=len(restarts))
    # The last report of a trial that ran to the end is its summary: the model as trained, chosen by
    # no validation score (a study compares these with baselines fitted without validation rows).
    final = {key: last.get(key) for key in FINAL_METRICS} if status == "completed" else {}
    return {"trial_id": trial_id, "status": status, "mlflow_run_id": run_id, "model_version": summary["model_version"],
            "val_cosine": metrics["val_cosine"], "val_top1": metrics["val_top1"], "steps": metrics["steps"],
            "wall_time_s": metrics["wall_time_s"], "reason": reason, "checkpoint": summary["checkpoint"],
            "params": sampled, "metrics": metrics, "final": final, "restarted_from_steps": restarts,
            "resumed_from": last.get("resumed_from") or []}


def _fmt_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "none"


def run_sweep(sweep: Sweep, faults: Faults | None = None, space: SearchSpace | None = None,
              epochs: float | None = None) -> dict[str, Any]:
    """Run (or, with `resume`, continue) a sweep; return its summary. `space` replaces the sweep's
    space files (a study builds its grid in code); `epochs` trains each trial that many passes over
    its training rows instead of max_steps. `faults` is for tests of the failure paths
    (`Faults.only_for` picks the trials they fire in)."""
    from ray import tune

    started = time.perf_counter()
    space = space or load_space(sweep.spaces)
    sets = dict(sweep.sets)
    if sweep.max_steps is not None:
        sets["max_steps"] = sweep.max_steps
    uri = resolve_tracking_uri(sweep.tracking_uri)
    base = make_config(sweep.preset, sets)
    scheduler, searcher = check_sweep(sweep, base, space)
    # The data is prepared once here (the corpus built and embedded, the baselines fitted) and
    # reaches every trial through the object store.
    base, data = prepare_data(base)
    sets["data_path"] = base.data_path

    connect(sweep.address)
    check_tracking_uri(uri, alive_node_count())
    storage = storage_path(sweep.storage)
    sweep_dir = Path(storage) / sweep.experiment
    concurrent = sweep.concurrency or max(1, int(_cluster_cpus() // max(1, sweep.workers_per_trial)))
    budget = (WorkerBudget(int(sweep.trial_memory_gb * 2**30), "cuda" if sweep.gpus_per_trial else "cpu")
              if sweep.trial_memory_gb else WorkerBudget.probe(1, sweep.gpus_per_trial, concurrent))

    if sweep.resume:
        if not (sweep_dir / SWEEP_FILE).exists():
            raise SpaceError(f"no sweep to resume at {sweep_dir}")
        settings = TrialSettings.load(sweep_dir / SWEEP_FILE)  # a resumed sweep keeps its settings
        parent = TrackedRun(uri, settings.parent_run_id)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=_trainable(data, settings, sweep, faults), resume_unfinished=True,
                                   resume_errored=True)
        log.info("resuming sweep %s (MLflow parent run %s)", sweep_dir, parent.run_id)
    else:
        if (sweep_dir / SWEEP_FILE).exists():
            raise SpaceError(f"a sweep named {sweep.experiment!r} already exists at {sweep_dir}; pass --resume to "
                             f"continue it or choose another --experiment")
        request = {k: v for k, v in dataclasses.asdict(sweep).items() if k not in ("spaces", "sets", "resume")}
        params = {**{f"sweep.{k}": v for k, v in request.items()},
                  **{f"space.{k}": v for k, v in space.describe().items()},
                  **{f"set.{k}": v for k, v in sets.items()}, "sweep.trial_memory_bytes": budget.budget_bytes}
        parent = TrackedRun.open(uri, sweep.experiment, f"sweep-{sweep.experiment}", params=params,
                                 tags={"sweep": sweep.experiment, "preset": sweep.preset, "kind": "sweep"})
        client = client_for(uri)
        for name, text in space.files.items():
            client.log_text(parent.run_id, text, f"spaces/{name}")
        settings = TrialSettings(
            tracking_uri=uri, experiment=sweep.experiment, parent_run_id=parent.run_id, storage=storage,
            workers_per_trial=sweep.workers_per_trial, gpus_per_trial=sweep.gpus_per_trial,
            trial_memory_bytes=budget.budget_bytes, device_type=budget.device_type, max_failures=sweep.max_failures,
            metric=sweep.metric, identity_cosine=data.baselines.get("baseline_identity_cosine"), epochs=epochs,
            time_budget_s=sweep.time_budget_s)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        settings.save(sweep_dir / SWEEP_FILE)
        tuner = tune.Tuner(
            _trainable(data, settings, sweep, faults),
            param_space={"preset": sweep.preset, "set": sets, "sampled": space.param_space()},
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples, metric=sweep.metric, mode="max",
                                        scheduler=scheduler, search_alg=searcher,
                                        max_concurrent_trials=sweep.concurrency, time_budget_s=sweep.time_budget_s),
            run_config=tune.RunConfig(
                name=sweep.experiment, storage_path=storage,
                # a crashed trial starts again from its last checkpoint (TuneContext.resume_state)
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                # PBT needs the checkpoint each donor reported last, whatever its score
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=None if sweep.scheduler == "pbt" else 2,
                    checkpoint_score_attribute="val_cosine", checkpoint_score_order="max"),
                callbacks=_fault_callbacks(faults, sweep_dir)))
    fit_started = time.perf_counter()
    grid = tuner.fit()
    tune_time = time.perf_counter() - fit_started
    # Tune ends a sweep at its time budget without saying so: trials it stopped end TERMINATED, as
    # finished ones do, and trials it never started are left unfinished, as after Ctrl-C. The clock tells.
    out_of_time = settings.time_budget_s is not None and tune_time >= settings.time_budget_s
    if not out_of_time and _interrupted(sweep_dir, expected_trials=sweep.num_samples * space.grid_size()):
        log.warning("sweep %s was interrupted; continue it with --resume", sweep.experiment)
        return {"status": "interrupted", "trials": [], "best": None, "parent_run_id": parent.run_id,
                "tracking_uri": uri, "sweep_path": str(sweep_dir), "wall_time_s": time.perf_counter() - started,
                "trial_train_time_s": 0.0, "report": None, "tune_time_s": tune_time,
                "time_budget_s": settings.time_budget_s, "out_of_time": False}

    run_ids = {trial: run.info.run_id for trial, run in child_runs(uri, settings.experiment, parent.run_id,
                                                                     "trial_id").items()}
    example = validation_rows(data, base.val_max_samples).input_emb[:EXAMPLE_ROWS]
    trials = []
    for n, result in enumerate(grid):
        trial_id = (result.metrics or {}).get("trial_id") or f"unreported-{n}"  # never reached a report
        trials.append(finish_trial(result, settings, trial_id, run_ids.get(trial_id), out_of_time=out_of_time,
                                   input_example=example))
    trials.sort(key=lambda t: t["trial_id"])
    best = best_trial(trials, settings.metric)
    report = _finish_parent(parent, trials, best, settings.metric, out_of_time=out_of_time)
    wall = time.perf_counter() - started
    return {"status": "completed", "trials": trials, "best": best["trial_id"] if best else None,
            "metric": settings.metric, "parent_run_id": parent.run_id,
            "tracking_uri": uri, "sweep_path": str(sweep_dir), "wall_time_s": wall,
            "trial_train_time_s": sum(t["wall_time_s"] or 0.0 for t in trials), "report": report,
            "tune_time_s": tune_time, "time_budget_s": settings.time_budget_s, "out_of_time": out_of_time}


def _fault_callbacks(faults: Faults | None, sweep_dir: Path) -> list:
    """Faults.interrupt_sweep_after_trials as a Tune callback: once that many trials completed, the
    driver sends itself SIGINT, which Tune handles as Ctrl-C (saves the sweep's state and stops).
    Once per sweep: Tune restores its callbacks with the sweep, and a marker file keeps the resumed
    sweep from being interrupted again."""
    if faults is None or faults.interrupt_sweep_after_trials is None:
        return []
    from ray.tune import Callback
    marker = sweep_dir / ".fault-interrupted"

    class InterruptAfterTrials(Callback):
        completed = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed += 1
            if self.completed == faults.interrupt_sweep_after_trials and not marker.exists():
                marker.write_text(str(os.getpid()))
                log.warning("fault injection: interrupting the sweep after %d completed trials", self.completed)
                os.kill(os.getpid(), signal.SIGINT)

    return [InterruptAfterTrials()]


def _trainable(data: PairDataset, settings: TrialSettings, sweep: Sweep, faults: Faults | None):
    """run_trial with the data and the sweep's settings as parameters: kept out of the trials' config,
    Tune's tables of each trial show the values that vary, not the plumbing."""
    from ray import tune
    return tune.with_resources(tune.with_parameters(run_trial, data=data, settings=settings, faults=faults), _trial_resources(sweep))


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
                   metric: str, out_of_time: bool = False) -> dict[str, Any]:
    """The parent run gets the trials, the best trial's config and metrics, and the sweep report
    (importance, parallel coordinates, quality vs time with its Pareto front, the summary lines,
    which are also the run's MLflow description); return the report."""
    import tempfile

    client, run_id = client_for(parent.uri), parent.run_id
    client.log_dict(run_id, {"trials": trials}, "trials.json")
    if out_of_time:
        client.set_tag(run_id, "ended_by", "time budget")
    if best:
        client.set_tag(run_id, "best_trial", best["trial_id"])
        for key in dict.fromkeys(("val_cosine", "val_top1", metric)):
            value = best["metrics"].get(key)
            if isinstance(value, (int, float)):
                client.log_metric(run_id, f"best_{key}", value)
        best_run = client.get_run(best["mlflow_run_id"])
        client.log_dict(run_id, best_run.data.params, "best_config.json")
        logged = client.get_run(run_id).data.params
        log_params(client, run_id, {f"best.{k}": v for k, v in best["params"].items() if f"best.{k}" not in logged})
    with tempfile.TemporaryDirectory() as tmp:
        report = write_report(trials, metric, tmp)
        client.log_artifacts(run_id, tmp, "report")
        # the first figure the sweep had, kept where earlier sweeps put it
        client.log_artifact(run_id, str(parallel_coordinates(trials, sampled_params(trials),
                                                             Path(tmp) / "params_vs_val_cosine.png")))
    for name, share in report["importance"].items():
        client.log_metric(run_id, f"importance/{name}", share)
    client.set_tag(run_id, "mlflow.note.content", report["summary"])  # the run page's description
    parent.end("completed")
    return report
