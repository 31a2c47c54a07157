"""The progressive scaling job the way its users run it: `ray job submit` against a cluster started
with `ray start --head` (token auth on), and restarted after an interruption."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import make_config
from orchestrator.progressive import ScalingJob, run_job
from orchestrator.tracking import load_registered_model
from orchestrator.train import state_fingerprint
from model.transfer import transfer

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
STAGES = ["scale-12", "scale-24"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quick_sets(corpus_path):
    return {"data_path": str(corpus_path), "max_rows": 400, "val_max_samples": 32, "val_every": 3,
            "checkpoint_every": 3, "warmup_steps": 1, "log_every": 1}


def job_args(tmp_path, corpus_path, experiment):
    args = ["--stages", ",".join(STAGES), "--steps-per-stage", "6", "--batch", "8", "--experiment", experiment,
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "ray"),
            "--summary-json", str(tmp_path / "summary.json")]
    for key, value in quick_sets(corpus_path).items():
        args += ["--set", f"{key}={value}"]
    return args


def stage_runs(client, experiment, parent_run_id):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags["stage"]: r for r in runs}


def started_from_previous_stage(uri, first_version, second_run):
    """Did the second stage start from the first stage's registered weights, resized?"""
    source = load_registered_model(f"models:/energy-lattice/{first_version}", uri)
    expected = transfer(source, make_config(STAGES[1]).model.resolved())
    return second_run.data.tags["init_weights"] == state_fingerprint(expected.state_dict())


@pytest.fixture
def head_node(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with token auth, in its own process group so that only this
    cluster is stopped afterwards (`ray stop` would also stop the tests' shared instance)."""
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayhead-")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    ray_bin = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={free_port()}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(2)
        yield address, env, ray_bin
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_two_stages_each_starting_from_the_last(tmp_path, head_node, corpus_path):
    address, env, ray_bin = head_node
    runtime_env = json.dumps({"env_vars": {"ENERGY_LATTICE_CACHE": os.environ["ENERGY_LATTICE_CACHE"]}})
    result = subprocess.run(
        [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env-json", runtime_env, "--", "python", "jobs/progressive_scaling.py",
         *job_args(tmp_path, corpus_path, "e2e")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "succeeded" in result.stdout, (result.stdout[-3000:], result.stderr[-2000:])

    summary = json.loads((tmp_path / "summary.json").read_text())
    uri = summary["tracking_uri"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'progressive_scaling'")
    assert [p.info.run_id for p in parents] == [summary["parent_run_id"]]
    stages = stage_runs(client, "e2e", summary["parent_run_id"])
    assert sorted(stages) == sorted(STAGES)
    versions = {}
    for preset in STAGES:
        alias = client.get_model_version_by_alias("energy-lattice", f"stage-{preset}")
        assert alias.run_id == stages[preset].info.run_id
        versions[preset] = alias.version
    assert versions[STAGES[0]] != versions[STAGES[1]]
    assert stages[STAGES[0]].data.tags["init_source"] == "random"
    assert stages[STAGES[1]].data.tags["init_from"] == f"models:/energy-lattice/{versions[STAGES[0]]}"
    assert started_from_previous_stage(uri, versions[STAGES[0]], stages[STAGES[1]])
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"


def test_a_job_interrupted_after_stage_one_does_not_retrain_it(tmp_path, ray_instance, corpus_path):
    import ray
    args = job_args(tmp_path, corpus_path, "resume") + ["--address", ray.get_runtime_context().gcs_address]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "jobs/progressive_scaling.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = None
    deadline = time.time() + 600
    while first is None:  # wait for stage 1 to finish, then kill the job mid-way through stage 2
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:] if proc.poll() else "timeout"
        time.sleep(1)
        exp = client.get_experiment_by_name("resume")
        runs = client.search_runs([exp.experiment_id], "tags.stage = 'scale-12'") if exp else []
        done = [r for r in runs if r.data.tags.get("status") == "completed" and r.data.tags.get("model_version")]
        first = done[0] if done else None
    proc.kill()
    proc.wait(60)

    summary = run_job(ScalingJob(stages=STAGES, steps_per_stage=6, batch=8, sets=quick_sets(corpus_path),
                                 experiment="resume", storage=str(tmp_path / "ray"),
                                 tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert summary["status"] == "completed" and summary["resumed"]
    rows = {r["preset"]: r for r in summary["stages"]}
    assert rows["scale-12"]["skipped"] and rows["scale-12"]["mlflow_run_id"] == first.info.run_id
    assert not rows["scale-24"]["skipped"] and rows["scale-24"]["status"] == "completed"
    stages = stage_runs(client, "resume", summary["parent_run_id"])
    assert sorted(stages) == sorted(STAGES), "no second run for stage 1"
    loss_steps = [m.step for m in client.get_metric_history(first.info.run_id, "train/loss")]
    assert loss_steps == list(range(1, 7)), "stage 1 was not trained again"
    second = stages["scale-24"]
    assert [m.step for m in client.get_metric_history(second.info.run_id, "train/loss")] == list(range(1, 7))
    assert started_from_previous_stage(summary["tracking_uri"], rows["scale-12"]["model_version"], second)


def test_stages_that_cannot_share_weights_are_refused_before_anything_starts(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "progressive_scaling.py"), "--stages", "smoke,debug"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: stage smoke -> debug: ") and "carrier_hidden: source 32 vs target 256" in line
    assert "--fresh-start-incompatible" in line
    assert not list(tmp_path.iterdir()), "nothing may start (no MLflow store, no Ray results) before the refusal"


def test_with_the_flag_an_incompatible_stage_starts_from_random_weights(tmp_path, ray_instance, corpus_path):
    summary = run_job(ScalingJob(stages=["smoke", "debug"], steps_per_stage=2, batch=4, fresh_start_incompatible=True,
                                 sets={**quick_sets(corpus_path), "val_max_samples": 8}, experiment="fresh",
                                 storage=str(tmp_path / "ray"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert summary["status"] == "completed"
    rows = {r["preset"]: r for r in summary["stages"]}
    assert rows["smoke"]["init_from"] == "random" and rows["debug"]["init_from"].startswith("random")
    client = MlflowClient(summary["tracking_uri"])
    assert client.get_run(rows["debug"]["mlflow_run_id"]).data.tags["init_source"] == "random"
