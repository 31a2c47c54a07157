"""Ray Tune sweeps on the shared Ray instance, with MLflow parent/child runs in SQLite."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.checkpoint import META_FILE
from orchestrator.config import make_config
from orchestrator.faults import Faults
from orchestrator.observe.tracking import compare_runs
from orchestrator.launch.search_space import SpaceError, load_space
from orchestrator.launch.tune import (PBT_MUTABLE, Sweep, TrialSettings, clip_to_space, defaults_point, finish_trial,
                                      asha_limits, check_sweep, parse_duration, pbt_scheduler, run_sweep)

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "tune_spaces"
# What Tune takes to stop running trials and return once a sweep is out of time: it waits for each to
# end itself, at its next report, then for its process to exit.
STOP_TIME_S = 15.0


# ---- search-space files (no Ray) ----------------------------------------------------------------

def test_shipped_space_files_load():
    space = load_space(sorted(SPACES.glob("*.yaml")))
    assert {"model.spawn_threshold", "model.convergence_patience", "preset", "lr", "model.skip",
            "model.plane_split", "model.energy_update", "model.mapper_rank"} <= set(space.entries)
    assert space.describe()["model.convergence_patience"] == "randint(1, 6)"


@pytest.mark.parametrize("text, problem", [
    ("model.no_such_knob: {uniform: [0, 1]}", "model.no_such_knob: unknown config field"),
    ("spawn_threshold: {uniform: [0.1, 0.2]}", "spawn_threshold: unknown config field"),
    ("model.spawn_threshold: {uniform: [0.3, 0.1]}", "model.spawn_threshold: bad bounds: low 0.3 must be below high 0.1"),
    ("model.spawn_threshold: {uniform: [0.1, 0.1]}", "bad bounds: low 0.1 must be below high 0.1"),
    ("lr: {loguniform: [0, 0.1]}", "lr: bad bounds: loguniform needs low > 0, got 0"),
    ("lr: {lognormal: [0.1, 1]}", "lr: unknown distribution 'lognormal'; use one of choice, grid"),
    ("lr: {uniform: [0.1]}", "lr: uniform needs [low, high] numbers"),
    ("model.width: {uniform: [8, 16]}", "model.width is an integer field"),
    ("model.width: {choice: [8, 1]}", "model.width: bad value: model.width=1 is out of range; allowed range [2, 4096]"),
    ("model.spawn_threshold: {uniform: [0, 0.3]}", "bad value: model.spawn_threshold=0.0 is out of range"),
    ("preset: {choice: [smoke, enormous]}", "preset: unknown preset(s) ['enormous']"),
    ("model.precision: {choice: [fp32, fp8]}", "model.precision='fp8' is not allowed"),
    ("lr: 0.01", "lr: expected one distribution such as {uniform: [low, high]}"),
])
def test_bad_space_files_are_refused_naming_file_key_and_problem(tmp_path, text, problem):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SpaceError) as err:
        load_space([path])
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value), str(err.value)


def test_a_key_defined_in_two_space_files_is_refused(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    b.write_text("lr: {choice: [0.001]}\n")
    with pytest.raises(SpaceError, match=f"{b}: lr: also defined in {a}"):
        load_space([a, b])


# ---- ASHA's schedule (no Ray) -------------------------------------------------------------------

@pytest.mark.parametrize("max_steps", [1, 2, 3, 7, 10, 49, 50, 51, 100, 301, 10_000])
@pytest.mark.parametrize("val_every, checkpoint_every", [(50, 100), (4, 4), (1, 1000), (200, 30)])
def test_asha_judges_trials_only_between_their_first_validation_and_their_last_step(max_steps, val_every,
                                                                                   checkpoint_every):
    from ray.tune.schedulers import ASHAScheduler
    cfg = make_config("smoke", {"max_steps": max_steps, "val_every": val_every, "checkpoint_every": checkpoint_every})
    grace, max_t = asha_limits(cfg, load_space([SPACES / "spawn_convergence.yaml"]))
    scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=2,
                              stop_last_trials=False)  # Ray's own checks of the two numbers pass
    reports = [step for step in range(1, max_steps + 1)
               if step % val_every == 0 or step % checkpoint_every == 0 or step == max_steps]
    rungs = [milestone for bracket in scheduler._brackets for milestone, _ in bracket._rungs]
    judged_at = {min(r for r in reports if r >= rung) for rung in rungs if rung <= max_steps}
    assert all(reports[0] <= step < max_steps for step in judged_at), (rungs, reports)
    if any(reports[0] <= r < max_steps and r >= max_steps // 4 for r in reports):
        assert judged_at, "a run with validations before its last step gets judged"


def test_asha_refuses_a_space_that_samples_its_schedule(tmp_path):
    space = tmp_path / "steps.yaml"
    space.write_text("max_steps: {choice: [10, 20]}\ncheckpoint_every: {choice: [5, 10]}\n")
    with pytest.raises(SpaceError, match="the space samples max_steps, checkpoint_every, which ASHA's schedule"):
        asha_limits(make_config("smoke"), load_space([space]))


# ---- search and scheduler choices (no Ray started) ----------------------------------------------

def test_optuna_refuses_the_grid_form_naming_the_keys(tmp_path):
    space = tmp_path / "grid.yaml"
    space.write_text("model.max_spawn_per_step: {grid: [0, 2]}\nlr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    with pytest.raises(SpaceError, match=r"--search optuna .* grid form \(model.max_spawn_per_step\); write \{choice"):
        check_sweep(Sweep(spaces=[str(space)], search="optuna", scheduler="fifo"), make_config("smoke"),
                    load_space([space]))


@pytest.mark.parametrize("kw, problem", [
    (dict(search="optuna", scheduler="pbt"), "--scheduler pbt explores by perturbing"),
    (dict(search="bayes"), "--search 'bayes' is not one of random, optuna"),
    (dict(metric="val_loss"), "--metric 'val_loss' is not one of val_cosine, lattice_gain, val_cosine_lattice_only, val_cosine_per_hour"),
    (dict(scheduler="pbt", pbt_interval=0), "--pbt-interval=0 must be at least 1 step"),
    (dict(scheduler="asha", pbt_sync=True), "--pbt-sync paces Population Based Training; --scheduler asha has no"),
    (dict(max_failures=-1), "--max-failures=-1 must be at least 0"),
    (dict(time_budget_s=0.0), "--time-budget=0s must be more than 0 seconds"),
])
def test_sweep_settings_that_cannot_work_are_refused(kw, problem):
    with pytest.raises(SpaceError, match=re.escape(problem)):
        Sweep(spaces=[], **kw)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45", 45),
                                           ("1.5h", 5400)])
def test_a_time_budget_reads_as_a_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "-3s", "1d", "soon"])
def test_a_time_budget_that_is_no_duration_is_refused(text):
    with pytest.raises(SpaceError, match=re.escape(f"--time-budget {text!r} is not a duration; write e.g. 90s")):
        parse_duration(text)


def test_optunas_first_trial_is_the_presets_own_values_when_the_space_holds_them(tmp_path, caplog):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\nmodel.convergence_patience: {randint: [1, 6]}\n"
                     "model.mapper_rank: {quniform: [8, 32, 8]}\nmodel.skip: {choice: [true, false]}\n")
    base = make_config("smoke", {"lr": 0.002})  # a --set counts as the user's own value
    assert defaults_point(base, load_space([space])) == {
        "sampled/lr": 0.002, "sampled/model.convergence_patience": base.model.convergence_patience,
        "sampled/model.mapper_rank": base.model.mapper_rank, "sampled/model.skip": base.model.skip}
    # randint's high is exclusive: a default of 6 lies outside {randint: [1, 6]}
    base = make_config("smoke", {"model.convergence_patience": 6})
    assert defaults_point(base, load_space([space])) is None
    assert "model.convergence_patience=6 (space: randint[1, 6])" in caplog.text


def test_pbt_varies_only_fields_that_may_change_while_training(tmp_path):
    with pytest.raises(SpaceError, match="--scheduler pbt needs the space to sample at least one field that may "
                                         "change during training"):
        pbt_scheduler(make_config("smoke"), load_space([SPACES / "architecture.yaml"]), None)
    space = tmp_path / "pbt.yaml"
    space.write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\nmodel.spawn_threshold: {uniform: [0.05, 0.3]}\n"
                     "model.skip: {choice: [true, false]}\n")
    cfg = make_config("smoke", {"checkpoint_every": 4})
    with pytest.raises(SpaceError, match="--pbt-interval=6 must be a multiple of checkpoint_every=4"):
        pbt_scheduler(cfg, load_space([space]), 6)
    scheduler = pbt_scheduler(cfg, load_space([space]), None)
    assert scheduler._perturbation_interval == 4
    assert set(scheduler._hyperparam_mutations["sampled"]) == {"lr", "model.spawn_threshold"} <= set(PBT_MUTABLE)
    # a perturbation (x1.2, x0.8) past the space's bounds is pulled back inside them
    clipped = clip_to_space({"sampled": {"lr": 0.05, "model.spawn_threshold": 0.01, "model.skip": True}},
                             {"lr": (1e-4, 1e-2), "model.spawn_threshold": (0.05, 0.3)})
    assert clipped["sampled"] == {"lr": 1e-2, "model.spawn_threshold": 0.05, "model.skip": True}


def test_a_stopped_trial_says_at_which_step_and_what_it_last_measured(tmp_path):
    from ray.tune import Result
    settings = TrialSettings(tracking_uri="sqlite:///unused.db", experiment="e", parent_run_id="p", storage="s",
                             workers_per_trial=1, gpus_per_trial=0.0, trial_memory_bytes=1, device_type="cpu",
                             max_failures=1)
    config = {"preset": "smoke", "set": {}, "sampled": {"model.spawn_threshold": 0.2}}
    result = Result(metrics={"step": 8, "val_cosine": 0.38, "lattice_gain": -0.03, "wall_time_s": 3.5,
                             "val_steps_used": 5.0, "config": config},
                    checkpoint=None, error=None, path=str(tmp_path))
    row = finish_trial(result, settings, "t1", run_id=None)
    assert row["status"] == "stopped"
    assert row["reason"] == "stopped by the scheduler at step 8; last validation: val_cosine 0.3800, lattice_gain -0.0300"
    assert row["metrics"]["steps"] == 8 and row["metrics"]["wall_time_s"] == 3.5
    assert row["metrics"]["mean_steps_used"] == 5.0 and row["metrics"]["max_flow_steps"] > 0
    assert row["params"] == {"model.spawn_threshold": 0.2}


# ---- sweeps -------------------------------------------------------------------------------------

def sweep(tmp_path, corpus_path, **kw):
    base = dict(spaces=[str(SPACES / "spawn_convergence.yaml")], preset="smoke", num_samples=4, max_steps=8,
                sets={"data_path": str(corpus_path), "max_rows": 400, "val_max_samples": 32, "batch_size": 8,
                      "val_every": 4, "checkpoint_every": 4, "warmup_steps": 2},
                storage=str(tmp_path / "ray"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                experiment="sweep-test", concurrency=2)
    return Sweep(**{**base, **kw})


def children_of(client, experiment, parent_run_id):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


@pytest.mark.ray
def test_sweep_of_four_trials_nests_one_child_run_per_trial_under_the_parent(tmp_path, ray_instance,
                                                                             corpus_path):
    # The README's quick sweep at --max-steps 10, validation and checkpoint intervals left at their
    # defaults (50, 100): ASHA's grace period used to exceed max_t here and the sweep crashed.
    # Searched by Optuna over every kind of distribution, for the lattice's gain.
    defaults = {k: v for k, v in sweep(tmp_path, corpus_path).sets.items() if k not in ("val_every", "checkpoint_every")}
    space = tmp_path / "mixed.yaml"
    space.write_text("model.spawn_threshold: {uniform: [0.05, 0.3]}\nlr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                     "model.convergence_patience: {randint: [1, 6]}\nmodel.max_spawn_per_step: {choice: [0, 2]}\n")
    summary = run_sweep(sweep(tmp_path, corpus_path, max_steps=10, sets=defaults, spaces=[str(space)], search="optuna",
                              seed=0, metric="lattice_gain"))
    client = MlflowClient(summary["tracking_uri"])
    trials = summary["trials"]
    assert len(trials) == 4 and all(t["status"] == "completed" for t in trials), trials
    # the first trial Tune created (its experiment tag counts them) is what a user gets without a
    # sweep: the preset's own values
    from ray.tune import ExperimentAnalysis
    first = min(ExperimentAnalysis(summary["sweep_path"]).trials, key=lambda t: int(t.experiment_tag.split("_")[0]))
    smoke = make_config("smoke")
    assert next(t for t in trials if t["trial_id"] == first.trial_id)["params"] == {
        "model.spawn_threshold": smoke.model.spawn_threshold, "lr": smoke.lr,
        "model.convergence_patience": smoke.model.convergence_patience,
        "model.max_spawn_per_step": smoke.model.max_spawn_per_step}
    for t in trials:  # Optuna's samples follow the space: types and bounds
        p, m = t["params"], t["metrics"]
        assert isinstance(p["model.spawn_threshold"], float) and 0.05 <= p["model.spawn_threshold"] <= 0.3
        assert isinstance(p["lr"], float) and 1e-4 <= p["lr"] <= 1e-2
        assert isinstance(p["model.convergence_patience"], int) and 1 <= p["model.convergence_patience"] <= 5
        assert p["model.max_spawn_per_step"] in (0, 2)
        assert m["steps"] == 10 and m["wall_time_s"] > 0 and isinstance(m["val_cosine_per_hour"], float)
    # every trial has a skip path, so the lattice's gain ranks them as their cosine does
    assert summary["metric"] == "lattice_gain"
    assert summary["best"] == max(trials, key=lambda t: t["metrics"]["lattice_gain"])["trial_id"]
    children = children_of(client, "sweep-test", summary["parent_run_id"])
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(t["trial_id"] for t in trials)
    sampled = {c.data.params["model.spawn_threshold"] for c in children}
    assert len(sampled) == 4, "each child carries its own sampled params"
    for child, trial in zip(sorted(children, key=lambda c: c.data.tags["trial_id"]), trials):
        assert child.data.params["model.spawn_threshold"] == str(trial["params"]["model.spawn_threshold"])
        assert child.data.tags["status"] == trial["status"] and trial["model_version"]
    best = max(trials, key=lambda t: t["val_cosine"])
    assert summary["best"] == best["trial_id"]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["best_trial"] == best["trial_id"]
    assert parent.data.metrics["best_val_cosine"] == pytest.approx(best["val_cosine"])
    assert parent.data.params["space.model.spawn_threshold"] == "uniform(0.05, 0.3)"
    assert "params_vs_val_cosine.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/sweep_report.json", "report/parallel_coordinates.png", "report/quality_vs_time.png",
            "report/parameter_importance.png"} <= report_files
    report = summary["report"]
    assert report["metric"] == "lattice_gain" and set(report["pareto_front"]) <= {t["trial_id"] for t in trials}
    assert parent.data.tags["mlflow.note.content"] == report["summary"]
    assert f"best trial {summary['best']} (lattice_gain" in report["summary"]
    assert parent.data.params["sweep.search"] == "optuna"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert all(t["steps"] == 10 for t in trials)

    table = compare_runs("sweep-test", summary["tracking_uri"], top=3, csv_path=tmp_path / "compare.csv")
    assert table.count("\n") >= 3 and "model.spawn_threshold=" in table and best["trial_id"] in table
    header, first = table.splitlines()[:2]
    assert header.split()[3:5] == ["eval/cosine", "eval/top1"]
    assert first.split()[3] == f"{best['val_cosine']:.4f}"
    assert report["summary"] in table.replace("\n  ", "\n"), "compare prints the sweep's report summary"
    # compare --csv: the table's rows, one per run, with the params that differ
    with open(tmp_path / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    printed = [line.split() for line in table.splitlines()[1:4]]
    assert [[r[k] for k in header.split()[:3]] for r in rows] == [p[:3] for p in printed]
    assert [[f"{float(r[k]):.4f}" for k in header.split()[3:5]] for r in rows] == [p[3:5] for p in printed]
    by_trial = {t["trial_id"]: t for t in trials}
    for r in rows:
        assert r["model.spawn_threshold"] == str(by_trial[r["run"]]["params"]["model.spawn_threshold"])
        assert client.get_run(r["run_id"]).info.run_name == r["run"]


@pytest.mark.ray
def test_infeasible_trial_ends_with_its_reason_and_the_sweep_goes_on(tmp_path, ray_instance, corpus_path):
    # ... and a trial whose process is killed once goes on from its last checkpoint (step 4 of 8)
    space = tmp_path / "sizes.yaml"
    space.write_text("preset: {grid: [smoke, scale-300]}\n")
    summary = run_sweep(sweep(tmp_path, corpus_path, spaces=[str(space)], num_samples=1, scheduler="fifo",
                              trial_memory_gb=3.0), faults=Faults(crash_at_step=6))
    by_preset = {t["params"]["preset"]: t for t in summary["trials"]}
    retried = by_preset["smoke"]
    assert retried["status"] == "completed" and retried["steps"] == 8 and retried["model_version"]
    assert list((tmp_path / "ray").rglob(".fault-crash-at-6")), "the fault never fired"
    assert retried["restarted_from_steps"] == [4] and retried["metrics"]["restarts"] == 1
    client = MlflowClient(summary["tracking_uri"])
    retried_run = client.get_run(retried["mlflow_run_id"])
    assert retried_run.data.tags["restarted_from_steps"] == "4"
    # the retry logged on into the same run: every validation once, none lost
    assert [m.step for m in client.get_metric_history(retried_run.info.run_id, "eval/cosine")] == [0, 4, 8]
    infeasible = by_preset["scale-300"]
    assert infeasible["status"] == "infeasible" and infeasible["val_cosine"] is None
    assert "needs an estimated" in infeasible["reason"] and "over the budget of 3.00 GiB" in infeasible["reason"]
    run = client.get_run(infeasible["mlflow_run_id"])
    assert run.data.tags["status"] == "infeasible" and run.data.tags["reason"] == infeasible["reason"]
    assert summary["best"] == by_preset["smoke"]["trial_id"]


@pytest.mark.ray
def test_a_sweep_ends_at_its_time_budget_with_every_trial_reported(tmp_path, ray_instance, corpus_path):
    from ray.tune import ExperimentAnalysis
    budget = 30.0
    summary = run_sweep(sweep(tmp_path, corpus_path, num_samples=2, scheduler="fifo", max_steps=100_000,
                              time_budget_s=budget))
    assert summary["status"] == "completed" and summary["out_of_time"]
    trials = summary["trials"]
    assert len(trials) == 2 and all(t["status"] == "stopped" for t in trials), trials
    for t in trials:
        assert t["reason"].startswith("stopped by the sweep's time budget at step "), t["reason"]
        assert 4 <= t["steps"] < 100_000 and t["model_version"], t
    # Tune stops a trial at its next report: the sweep ends within its budget plus one validation
    # interval (the longest a trial took between two reports), and the time Tune takes to stop the trials
    reports = ExperimentAnalysis(summary["sweep_path"]).trial_dataframes.values()
    interval = max(frame["wall_time_s"].diff().max() for frame in reports)
    assert budget <= summary["tune_time_s"] <= budget + interval + STOP_TIME_S, (summary["tune_time_s"], interval)
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["ended_by"] == "time budget" and parent.info.status == "FINISHED"
    assert "report/sweep_report.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert parent.data.tags["mlflow.note.content"] == summary["report"]["summary"]


@pytest.mark.ray
def test_a_diverged_trial_does_not_stop_the_sweep(tmp_path, ray_instance, corpus_path):
    space = tmp_path / "seeds.yaml"
    space.write_text("seed: {grid: [0, 1]}\n")
    summary = run_sweep(sweep(tmp_path, corpus_path, spaces=[str(space)], num_samples=1, scheduler="fifo"),
                        faults=Faults(nan_loss_at_step=6, only_for={"seed": 0}))  # the seed-1 trial stays healthy
    by_seed = {t["params"]["seed"]: t for t in summary["trials"]}
    assert by_seed[0]["status"] == "diverged" and by_seed[1]["status"] == "completed"
    assert summary["status"] == "completed" and summary["best"] == by_seed[1]["trial_id"]
    run = MlflowClient(summary["tracking_uri"]).get_run(by_seed[0]["mlflow_run_id"])
    assert run.data.tags["status"] == "diverged"


@pytest.mark.ray
def test_multi_worker_trials_run_on_a_torch_trainer(tmp_path, ray_instance, corpus_path):
    summary = run_sweep(sweep(tmp_path, corpus_path, num_samples=1, workers_per_trial=2, scheduler="fifo",
                              concurrency=1))
    (trial,) = summary["trials"]
    assert trial["status"] == "completed" and trial["model_version"], trial
    run = MlflowClient(summary["tracking_uri"]).get_run(trial["mlflow_run_id"])
    assert run.data.tags["workers"] == "2" and len(json.loads(run.data.tags["data_shards"])) == 2
    assert list((tmp_path / "ray" / "sweep-test" / "trainers" / trial["trial_id"]).glob("step_*"))


@pytest.mark.ray
def test_an_interrupted_optuna_sweep_resumes_without_rerunning_finished_trials(tmp_path, ray_instance, corpus_path):
    import ray
    # with Optuna's TPE, whose state (the trials it was told of) Tune saves and restores with the sweep
    cfg = sweep(tmp_path, corpus_path, num_samples=3, concurrency=1, scheduler="fifo", max_steps=12, search="optuna")
    cmd = [sys.executable, "-m", "orchestrator", "tune", "--space", cfg.spaces[0], "--preset", "smoke",
           "--num-samples", "3", "--max-steps", "12", "--concurrency", "1", "--scheduler", "fifo", "--search", "optuna",
           "--experiment", cfg.experiment, "--storage", cfg.storage, "--mlflow-uri", cfg.tracking_uri,
           "--address", ray.get_runtime_context().gcs_address]
    for key, value in cfg.sets.items():
        cmd += ["--set", f"{key}={value}"]
    # Interrupted at a known point, whatever the machine's speed: the driver sends itself SIGINT (what
    # Ctrl-C does) once its first trial completed, through the fault hook.
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "ENERGY_LATTICE_TEST_FAULTS": json.dumps(Faults(interrupt_sweep_after_trials=1).to_dict())}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "--resume" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-2000:])
    sweep_dir = tmp_path / "ray" / cfg.experiment
    finished = [f for f in sweep_dir.glob("*/result.json") if f.read_text().splitlines()
                and json.loads(f.read_text().splitlines()[-1]).get("status") == "completed"]
    assert len(finished) >= 1, "the interrupt came before a trial completed"
    # A trial run again appends new results (new timestamps); Tune may rewrite the file unchanged.
    snapshot = {f: f.read_text() for f in finished}

    summary = run_sweep(Sweep(**{**cfg.__dict__, "resume": True}))
    assert len(summary["trials"]) == 3
    assert all(t["status"] == "completed" for t in summary["trials"]), summary["trials"]
    for f, text in snapshot.items():
        assert f.read_text() == text, f"{f.parent.name} was run again"
    client = MlflowClient(summary["tracking_uri"])
    children = children_of(client, cfg.experiment, summary["parent_run_id"])
    assert len(children) == 3, "a restored trial must log into its own child run, not a new one"


@pytest.mark.ray
def test_a_pbt_exploit_continues_from_the_donors_checkpoint(tmp_path, ray_instance, corpus_path):
    # Synchronous PBT, so not a race: both trials wait at step 4 until the other is there,
    # then the lower one copies the upper one, whichever order they reported in.
    space = tmp_path / "pbt.yaml"
    space.write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\nmodel.spawn_threshold: {uniform: [0.05, 0.3]}\n")
    summary = run_sweep(sweep(tmp_path, corpus_path, spaces=[str(space)], num_samples=2, scheduler="pbt",
                              max_steps=8, concurrency=2, pbt_sync=True))
    assert all(t["status"] == "completed" and t["steps"] == 8 for t in summary["trials"]), summary["trials"]
    exploits = [(t, entry) for t in summary["trials"] for entry in t["resumed_from"]
                if entry["trial"] == t["trial_id"] and entry["saved_by"] != t["trial_id"]]
    assert exploits, "no trial exploited another in 8 steps with an interval of 4"
    for trial, entry in exploits:
        donor_checkpoint = Path(entry["checkpoint"])
        assert entry["saved_by"] != trial["trial_id"] and entry["saved_by"] in donor_checkpoint.parent.name
        donor_step = json.loads((donor_checkpoint / META_FILE).read_text())["step"]
        assert entry["step"] == donor_step < 8, "no exploit at the last step"
        assert entry["next_report_step"] == donor_step + 4, "the next report continues from the donor's step"
        assert trial["metrics"]["exploits"] >= 1
        explored = trial["params"]
        assert 1e-4 <= explored["lr"] <= 1e-2 and 0.05 <= explored["model.spawn_threshold"] <= 0.3
