"""The progressive scaling job the way its users run it: README tour step 4 as printed (`ray start
--head` with token auth, `ray job submit`), restarted after an interruption, and refused before it
trains when two stages cannot share weights."""
import contextlib
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

from orchestrator.code_version import source_digest
from orchestrator.config import make_config
from orchestrator.launch.progressive import ScalingJob, run_job
from orchestrator.observe.tracking import load_registered_model
from orchestrator.train import state_fingerprint
from model.transfer import transfer
from readme_commands import SYSTEM_PATH, readme_commands, tour_block

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


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def copy_of_working_tree(dest: Path) -> Path:
    """The checkout as a reader has it: a clone at this checkout's HEAD (so the README's `git describe`
    answers as it would here) with this checkout's files over it (tracked and new ones, nothing
    ignored: uncommitted changes show as they do here), and the venv `make run` made, so the README's
    relative paths and its `$PWD` resolve as they would for a reader."""
    git("clone", "-q", "--no-checkout", "--shared", str(REPO), str(dest))
    git("checkout", "-q", "--detach", git("rev-parse", "HEAD"), cwd=dest)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def processes_mentioning(text: str) -> list[int]:
    """Ids of this machine's processes whose command line contains `text` (a head node's own temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def stop_head_node(temp_dir: str) -> None:
    """What the README's `ray stop` does, but only to the head node this test started: `ray stop`
    stops every Ray instance on the machine, the test session's shared one included."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_mentioning(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 15
        while processes_mentioning(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


def run_readme_block(block, workdir: Path, env: dict[str, str], job_flags: list[str]) -> subprocess.CompletedProcess:
    """Run the commands of a README block in bash against a head node of its own (see the test)."""
    dashboard, temp_dir = free_port(), tempfile.mkdtemp(prefix="rayhead-")  # short: socket paths < 108 bytes
    lines = []
    for command in block:
        line = command.text.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard}")
        if command.words[:3] == ["ray", "start", "--head"]:
            agent = free_port()
            line += (f" --port={free_port()} --dashboard-port={dashboard} --ray-client-server-port={free_port()}"
                     f" --dashboard-agent-listen-port={agent} --node-ip-address=127.0.0.1 --num-cpus=2"
                     f" --disable-usage-stats --temp-dir={temp_dir}")
            line += f"\nfor i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/{agent}) 2>/dev/null && break; sleep 1; done"
        if "jobs/progressive_scaling.py" in line:
            line += " " + " ".join(job_flags)
        lines.append(line)
    try:
        return subprocess.run(["bash", "-e", "-c", "\n".join(lines)], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=1500)
    finally:
        stop_head_node(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(1800)  # a minute or two on a quiet machine; a shared one has taken 15
def test_readme_tour_step_4_runs_as_printed_on_a_system_path(tmp_path, corpus_path):
    """README tour step 4, line by line, in bash, on the system PATH plus what the README adds, in a
    fresh HOME (no Ray token yet). Changes to the printed lines, each for a reason: ports and a temp
    dir of this head node's own (other Ray instances may hold the defaults); a wait, as a person
    typing would, until the head node's job agent listens (Ray refuses a submission after 10 s
    without one, which a busy 2-core machine can exceed); flags appended to the job so that it takes
    seconds (argparse keeps the last value given). `ray stop` is left out: it stops every Ray
    instance on the machine, the test session's own included; the head node is stopped by its pids."""
    block = tour_block(readme_commands(), "ray start --head")
    assert [c.program for c in block][:2] == ["source", "ray"] and block[-1].text == "ray stop"
    quick = ["--steps-per-stage", "6", "--batch", "8", "--experiment", "readme"]
    for key, value in quick_sets(corpus_path).items():
        quick += ["--set", f"{key}={value}"]
    workdir = copy_of_working_tree(tmp_path / "checkout")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": SYSTEM_PATH, "HOME": str(home), "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1",
           "ENERGY_LATTICE_CACHE": os.environ["ENERGY_LATTICE_CACHE"]}
    result = run_readme_block(block[:-1], workdir, env, quick)
    if result.returncode != 0 and "timed out during startup" in result.stderr:
        # `ray start` gives its raylet a fixed 30 s to register; a machine busy enough can exceed
        # that. Someone at a terminal would run the block again; so does the test, once.
        result = run_readme_block(block[:-1], workdir, env, quick)
    assert result.returncode == 0 and "succeeded" in result.stdout, (result.stdout[-3000:], result.stderr[-3000:])

    # The runs went where the README says: this folder's mlflow.db, which step 2's `mlflow ui` reads.
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("readme")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'progressive_scaling'")
    assert parent.info.status == "FINISHED"

    # Every run knows its code, though the job ran in Ray's unpacked copy, which has no .git: the
    # commit the submit line passed, and the digest of the files the job ran.
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 + len(STAGES)
    dirty = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    for run in runs:
        assert run.data.tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD"), run.info.run_name
        assert run.data.tags["git_dirty"] == dirty, run.info.run_name
        assert run.data.tags["source_digest"] == source_digest(workdir), run.info.run_name
    stages = stage_runs(client, "readme", parent.info.run_id)
    assert sorted(stages) == sorted(STAGES)
    versions = {p: client.get_model_version_by_alias("energy-lattice", f"stage-{p}").version for p in STAGES}
    assert stages[STAGES[0]].data.tags["init_source"] == "random"
    assert stages[STAGES[1]].data.tags["init_from"] == f"models:/energy-lattice/{versions[STAGES[0]]}"
    assert started_from_previous_stage(client.tracking_uri, versions[STAGES[0]], stages[STAGES[1]])
    assert list((workdir / "ray_results").glob(f"{STAGES[1]}-*/step_*"))

    # The job's console: a line per validation with the baselines, Ray's detail kept out of it.
    job_output = result.stdout
    for preset in STAGES:
        assert f"stage {STAGES.index(preset) + 1}/2 {preset}" in job_output
    validations = [line for line in job_output.splitlines() if "val cosine" in line]
    assert len(validations) == 2 * 3, validations  # steps 0, 3 and 6 of each stage
    assert all("baselines identity" in line and "ridge" in line and "nan" not in line for line in validations)
    for noise in ("Reporting training result", "UserWarning", "RayTrainWorker pid", "Traceback"):
        assert noise not in job_output, noise
    browse = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert browse in job_output and "mlflow ui --backend-store-uri sqlite:///" in job_output


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
    # smoke's carrier (32 wide) cannot seed scale-12's (64): the smallest incompatible pair
    summary = run_job(ScalingJob(stages=["smoke", "scale-12"], steps_per_stage=2, batch=4, fresh_start_incompatible=True,
                                 sets={**quick_sets(corpus_path), "val_max_samples": 8}, experiment="fresh",
                                 storage=str(tmp_path / "ray"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert summary["status"] == "completed"
    rows = {r["preset"]: r for r in summary["stages"]}
    assert rows["smoke"]["init_from"] == "random" and rows["scale-12"]["init_from"].startswith("random")
    client = MlflowClient(summary["tracking_uri"])
    assert client.get_run(rows["scale-12"]["mlflow_run_id"]).data.tags["init_source"] == "random"


def test_the_stage_table_lists_every_baseline_the_stage_logged(monkeypatch, capsys):
    from types import SimpleNamespace

    from orchestrator.launch import progressive
    metrics = {"eval/cosine": 0.61, "eval/top1": 0.2, "val_baseline/identity_cosine": 0.46,
               "val_baseline/identity_top1": 0.09, "val_baseline/ridge_cosine": 0.59, "val_baseline/ridge_top1": 0.18,
               "val_baseline/ridge_lambda": 10.0, "val_baseline/nearest_input_cosine": 0.5,
               "val_baseline/nearest_input_top1": 0.1}
    run = SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={"lattice": "12x12x8", "model_version": "3"},
                                               params={"max_steps": "6", "batch_size": "8"}),
                          info=SimpleNamespace(run_id="r1"))
    row = progressive._row("scale-12", run, skipped=False)
    assert row["baseline_nearest_input_cosine"] == 0.5 and row["baseline_ridge_top1"] == 0.18
    monkeypatch.setattr(progressive, "experiment_id", lambda uri, name: "1")
    monkeypatch.setattr(progressive, "browse_lines", lambda uri, exp: ["mlflow ui"])
    monkeypatch.setattr(progressive, "ray_logs_dir", lambda: "/tmp/ray")
    progressive.print_table({"status": "completed", "experiment": "e", "parent_run_id": "p", "tracking_uri": "u",
                             "stages": [row]})
    out = capsys.readouterr().out
    assert ("baselines on the same rows (cosine / top-1): identity 0.4600 / 0.090, ridge 0.5900 / 0.180, "
            "nearest input 0.5000 / 0.100") in out
