"""Progressive scaling: train stage after stage on growing lattices, each stage starting from the
previous stage's best weights (neuron and carrier copied, mapper and collector interpolated).

    python -m orchestrator scale                                         # scale-50 -> scale-150 -> scale-300
    python jobs/progressive_scaling.py --stages scale-12,scale-24        # the same command: the CPU demo
    ray job submit --working-dir . -- python jobs/progressive_scaling.py --workers 4 --gpus-per-worker 1

(`cli.cmd_scale` takes the flags and prints the table; this module runs the job.)

Each stage is a Ray Train run, logged as a nested MLflow child run of the job's parent run and
registered as a version of `energy-lattice` with the alias `stage-<preset>`. Its batch size comes
from the memory planner for the memory a worker actually has (or `--batch`).

The job keeps its state in MLflow: restarted with the same `--experiment` and stages, it finds its
unfinished parent run, skips stages whose child run completed, and resumes the unfinished stage in
the same child run and the same Ray run, which Ray Train restores from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from model import PRESETS, EnergyLattice
from model.config import ConfigError
from model.transfer import transfer

from ..config import TrainConfig, make_config
from ..metrics import STAGE_METRICS, baseline_key, baseline_scores, logged_baselines
from ..observe.console import tool_command
from ..observe.tracking import (REGISTERED_MODEL, TrackedRun, browse_lines, check_tracking_uri, child_runs, client_for,
                                experiment_id, load_registered_model, resolve_tracking_uri, run_metric)
from .ray_train import (Launch, Placement, WorkerBudget, WorkerGroup, alive_node_count, connect, fields_of, ray_logs_dir,
                        run_ray_train, with_planned_batch)

log = logging.getLogger(__name__)

DEFAULT_STAGES = ["scale-50", "scale-150", "scale-300"]
JOB_KIND = "progressive_scaling"


@dataclass
class ScalingJob(WorkerGroup, Placement):
    """A progressive-scaling request: the stages, their steps, and where each stage's Ray Train
    workers run (`Placement`, `WorkerGroup`: the same flags as `train`)."""
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    steps_per_stage: list[int] | int = field(default_factory=lambda: [300])  # one for all stages, or one per stage
    batch: int | None = None               # None: the memory planner decides per stage
    sets: dict[str, Any] = field(default_factory=dict)
    experiment: str = field(default="energy-lattice-scaling", kw_only=True)
    # A stage that starts from the previous stage's weights fine-tunes them: its peak lr is the
    # configured lr times this (on the CPU ladder, 1.0 first lost 0.02 cosine to the new optimizer
    # state and recovered more slowly than 0.3).
    carried_lr_scale: float = 0.3
    fresh_start_incompatible: bool = False  # a stage that cannot take the previous weights starts from random ones

    def __post_init__(self):
        if isinstance(self.steps_per_stage, int):
            self.steps_per_stage = [self.steps_per_stage]
        super().__post_init__()


class IncompatibleStagesError(ConfigError):
    """A stage whose model cannot start from the previous stage's weights."""


def incompatible_stages(configs: dict[str, TrainConfig], stages: list[str]) -> dict[str, str]:
    """{stage: why it cannot start from the previous stage's weights}, found by carrying untrained
    weights over exactly as the job will carry trained ones, so nothing trains before a refusal."""
    problems = {}
    for previous, stage in zip(stages, stages[1:]):
        try:
            transfer(EnergyLattice(configs[previous].model.resolved()), configs[stage].model.resolved())
        except ValueError as e:
            problems[stage] = f"{previous} -> {stage}: {e}"
    return problems


def _find_or_open_parent(uri: str, job: ScalingJob) -> tuple[TrackedRun, bool]:
    """The job's parent run: the unfinished one of these stages if there is one (a restart), else a new one."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(job.experiment)
    stages = ",".join(job.stages)
    if exp is not None:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], filter_string=(
            f"tags.kind = '{JOB_KIND}' and tags.stages = '{stages}' and attributes.status = 'RUNNING'"))
        if runs:
            return TrackedRun(uri, runs[0].info.run_id), True
    settings = {k: v for k, v in dataclasses.asdict(job).items() if k != "sets"}
    params = {**{f"job.{k}": v for k, v in settings.items()}, **{f"set.{k}": v for k, v in job.sets.items()}}
    return TrackedRun.open(uri, job.experiment, f"progressive-{stages}", params=params,
                           tags={"kind": JOB_KIND, "stages": stages}), False


def _row(preset: str, run, *, skipped: bool, checkpoint: str | None = None) -> dict[str, Any]:
    """A stage's line of the job summary, from its MLflow run; every baseline the run logged."""
    t = run.data.tags
    scores = baseline_scores(logged_baselines(run.data.metrics))
    return {"preset": preset, "lattice": t.get("lattice"), "steps": int(float(run.data.params.get("max_steps", 0))),
            "batch": int(float(run.data.params.get("batch_size", 0))),
            **{key: run_metric(run, key) for key in STAGE_METRICS},
            **{baseline_key(name, score): value
               for name, values in scores.items() for score, value in values.items()},
            "model_version": t.get("model_version"),
            "mlflow_run_id": run.info.run_id, "status": t.get("status"), "skipped": skipped,
            "init_from": t.get("init_from"), "checkpoint": checkpoint}


def run_job(job: ScalingJob) -> dict[str, Any]:
    """Run (or resume) the job; return its summary with one row per stage."""
    unknown = [s for s in job.stages if s not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown stage preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    if len(job.steps_per_stage) not in (1, len(job.stages)):
        raise ConfigError(f"--steps-per-stage takes one number or one per stage ({len(job.stages)}), "
                          f"got {len(job.steps_per_stage)}")
    steps = job.steps_per_stage * len(job.stages) if len(job.steps_per_stage) == 1 else job.steps_per_stage
    configs = {p: make_config(p, {**job.sets, "max_steps": n}) for p, n in zip(job.stages, steps)}  # validate all
    incompatible = incompatible_stages(configs, job.stages)
    if incompatible and not job.fresh_start_incompatible:
        raise IncompatibleStagesError(
            f"stage {next(iter(incompatible.values()))}; pick stages that agree on these sizes, or pass "
            f"--fresh-start-incompatible to train such a stage from random weights")
    uri = resolve_tracking_uri(job.tracking_uri)

    connect(job.address)
    check_tracking_uri(uri, alive_node_count())
    parent, resumed = _find_or_open_parent(uri, job)
    parent_id = parent.run_id
    print(f"{'resuming' if resumed else 'starting'} progressive scaling {' -> '.join(job.stages)}, "
          f"{','.join(map(str, job.steps_per_stage))} steps per stage (MLflow experiment {job.experiment}, "
          f"parent run {parent_id})", flush=True)
    done = child_runs(uri, job.experiment, parent_id, "stage")
    client = client_for(uri)

    rows, previous_version, status, budget = [], None, "completed", None
    for index, preset in enumerate(job.stages):
        run = done.get(preset)
        if run is not None and run.data.tags.get("status") == "completed" and run.data.tags.get("model_version"):
            print(f"stage {index + 1}/{len(job.stages)} {preset}: finished earlier (energy-lattice version "
                  f"{run.data.tags['model_version']}); skipping it", flush=True)
            rows.append(_row(preset, run, skipped=True))
            previous_version = run.data.tags["model_version"]
            continue
        if job.batch:
            cfg = dataclasses.replace(configs[preset], batch_size=job.batch)
        else:
            budget = budget or WorkerBudget.probe(job.cpus_per_worker, job.gpus_per_worker, job.workers)
            cfg = with_planned_batch(configs[preset], budget)
        batch = cfg.batch_size
        init_state, init_from = None, "random"
        if preset in incompatible:
            init_from = "random (cannot carry weights over)"
        elif previous_version is not None:
            init_from = f"models:/{REGISTERED_MODEL}/{previous_version}"
            source = load_registered_model(init_from, uri)
            init_state = transfer(source, cfg.model.resolved()).state_dict()
            cfg = dataclasses.replace(cfg, lr=cfg.lr * job.carried_lr_scale)
        launch = Launch(**fields_of(WorkerGroup, job), **{**fields_of(Placement, job), "tracking_uri": uri},
                        run_name=f"{preset}-{parent_id[:12]}",  # stable across restarts of this job only
                        parent_run_id=parent_id,
                        model_alias=f"stage-{preset}", mlflow_run_id=run.info.run_id if run else None,
                        run_tags={"stage": preset, "stage_index": str(index), "init_from": init_from,
                                  "batch_from": "--batch" if job.batch else "planner"})
        m = cfg.model
        print(f"\nstage {index + 1}/{len(job.stages)} {preset}: lattice {m.width}x{m.height}x{m.depth}, batch {batch}, "
              f"{cfg.max_steps} steps, from {init_from}", flush=True)
        summary = run_ray_train(cfg, launch, init_state=init_state)
        rows.append(_row(preset, client.get_run(summary["mlflow_run_id"]), skipped=False,
                         checkpoint=summary.get("checkpoint")))
        if summary["status"] != "completed":
            status = summary["status"]
            log.error("stage %s ended %s; the job stops here (rerun to resume)", preset, status)
            break
        previous_version = summary["model_version"]
        client.log_metric(parent_id, "stage_val_cosine", summary.get("val_cosine") or float("nan"), step=index)

    client.log_dict(parent_id, {"stages": rows}, "stages.json")
    if status == "completed":
        parent.end("completed")
    return {"status": status, "stages": rows, "parent_run_id": parent_id, "tracking_uri": uri,
            "experiment": job.experiment, "resumed": resumed}


def print_table(summary: dict[str, Any]) -> None:
    print(f"\nprogressive scaling: {summary['status']} (MLflow experiment {summary['experiment']}, "
          f"parent run {summary['parent_run_id']})")
    def fmt(value, digits):
        return f"{value:.{digits}f}" if value is not None else "-"

    print(f"  {'stage':10s} {'lattice':12s} {'steps':>6s} {'batch':>6s} {'val_cos':>8s} {'top1':>6s} "
          f"{'alone':>6s} {'gain':>6s} {'version':>8s}  started from")
    for r in summary["stages"]:
        print(f"  {r['preset']:10s} {r['lattice'] or '-':12s} {r['steps']:>6d} {r['batch']:>6d} "
              f"{fmt(r['val_cosine'], 4):>8s} {fmt(r['val_top1'], 3):>6s} {fmt(r.get('val_cosine_lattice_only'), 3):>6s} "
              f"{fmt(r.get('lattice_gain'), 3):>6s} {str(r['model_version']):>8s}  {r['init_from'] or '-'}"
              + ("  (finished earlier)" if r["skipped"] else ""))
    scores = baseline_scores(summary["stages"][-1]) if summary["stages"] else {}
    if scores:
        print("  alone: the lattice path without the skip path; gain: val_cos minus the skip path alone "
              "(without one, minus identity).\n"
              "  baselines on the same rows (cosine / top-1): " + ", ".join(
                  f"{name.replace('_', ' ')} {fmt(values.get('cosine'), 4)} / {fmt(values.get('top1'), 3)}"
                  for name, values in scores.items()))
    browse = browse_lines(summary["tracking_uri"], experiment_id(summary["tracking_uri"], summary["experiment"]))
    print(f"\n  browse the runs:  {browse[0]}")
    for line in browse[1:]:
        print(f"                    {line}")
    versions = [r for r in summary["stages"] if r["model_version"]]
    if versions:
        last = versions[-1]
        print(f"  checkpoints:      registered in MLflow, e.g.  "
              f"{tool_command('python')} -m orchestrator load models:/{REGISTERED_MODEL}@stage-{last['preset']}")
    for r in summary["stages"]:
        if r.get("checkpoint"):
            print(f"                    {r['preset']}, Ray Train's copy: {r['checkpoint']}")
    if summary.get("summary_json"):
        print(f"  summary:          {summary['summary_json']}")
    print(f"  logs:             this output; Ray's own (its workers' output included) under {ray_logs_dir()}")
