"""The CLI as users run it: `python -m orchestrator ...` in a subprocess."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.metrics import SUMMARY_KEYS

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd, timeout=300):
    """Run the CLI in `cwd` (local runs write mlflow.db there) with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_train_local_writes_the_summary_json(tmp_path, corpus_path):
    summary_file = tmp_path / "summary.json"
    result = cli("train", "--local", "--preset", "smoke", "--max-steps", "3", "--data", str(corpus_path),
                 "--set", "max_rows=400", "--set", "val_max_samples=32", "--set", "batch_size=8",
                 "--out", str(tmp_path / "run"), "--summary-json", str(summary_file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(summary_file.read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt").exists()
    assert str(summary_file) in result.stdout and "checkpoint" in result.stdout
    assert summary["mlflow_run_id"] and summary["model_version"]  # local runs are tracked too
    assert (tmp_path / "mlflow.db").exists() and "mlflow ui --backend-store-uri sqlite:///" in result.stdout
    assert {p.name for p in (tmp_path / "run" / "plots").iterdir()} >= {"loss_curve.png", "output_surfaces.png",
                                                                        "validation_vs_baselines.png"}

    from mlflow import MlflowClient
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" \
        in result.stdout
    assert {"train/loss", "eval/cosine", "val_baseline/ridge_cosine", "flow/steps_used"} <= set(run.data.metrics)
    assert "plots/validation_vs_baselines.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    # the console: one line per validation (steps 0 and 3 here), with the baselines
    validations = [line for line in result.stdout.splitlines() if "val cosine" in line]
    assert [line.split()[1] for line in validations] == ["0/3", "3/3"]
    assert all("baselines identity" in line for line in validations)
    assert "INFO" not in result.stderr and "step 3: loss" not in result.stderr  # the loop's detail: train.log
    assert "step 3: loss" in (tmp_path / "run" / "train.log").read_text()
    # MLflow's own system metrics of this machine, and the rows it trained and validated on
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert {i.tags[0].value: json.loads(i.dataset.source)["uri"] for i in run.inputs.dataset_inputs} == \
        {"training": str(corpus_path), "validation": str(corpus_path)}

    # the registered version's prediction, decoded to the corpus's nearest target texts
    result = cli("load", f"models:/energy-lattice/{summary['model_version']}", "--mlflow-uri", summary["tracking_uri"],
                 "--text", "os.path.join(a, *p)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "the model predicts" in line)
    assert "identity baseline" in lines[header] and str(corpus_path) in lines[header - 1]
    assert len(lines) == header + 6
    # rank, then cosine and text for the prediction, then for the input itself (texts cut to 52 characters)
    rows = [re.fullmatch(r"  (\d)  (.{6})  (.{52})  (.{6})  (.+)", line) for line in lines[header + 1:]]
    assert all(rows) and [r[1] for r in rows] == ["1", "2", "3", "4", "5"], lines[header:]
    for column in (2, 4):
        cosines = [float(r[column]) for r in rows]
        assert cosines == sorted(cosines, reverse=True) and all(-1 <= c <= 1 for c in cosines)
    assert all(r[3].strip() and r[5].strip() for r in rows)


@pytest.mark.parametrize("args, needle", [
    (["--set", "model.width=1"], "model.width=1 is out of range; allowed range [2, 4096]"),
    (["--set", "lr=-1"], "lr=-1.0 is out of range; allowed range (0, 10]"),
    (["--set", "lr=fast"], "lr='fast' is not a valid float"),
    (["--set", "spawn_threshold=0.2"], "did you mean model.spawn_threshold?"),
    (["--set", "model.precision=fp8"], "model.precision='fp8' is not allowed"),
    (["--set", "no_such_field=3"], "unknown config field 'no_such_field'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--data", "/nonexistent/pairs.parquet"], "dataset /nonexistent/pairs.parquet does not exist"),
    (["--workers", "0"], "--workers=0 must be at least 1"),
    (["--mlflow-uri", "ftp://x"], "MLflow tracking URI ftp://x has an unsupported scheme 'ftp'; use http://"),
])
def test_bad_input_exits_2_with_one_line_naming_the_problem(args, needle, tmp_path):
    result = cli("train", "--local", "--preset", "smoke", *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not list(tmp_path.iterdir()), "a refused command must not leave anything behind"



def test_load_reports_a_missing_store_or_version_in_one_line(tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    result = cli("load", "models:/energy-lattice/999", "--mlflow-uri", store, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and not (tmp_path / "m.db").exists()
    assert result.stderr.strip() == f"error: cannot load models:/energy-lattice/999: no MLflow store at {store}"

    from mlflow import MlflowClient
    MlflowClient(store).search_experiments()  # creates the (empty) store
    result = cli("load", "models:/energy-lattice/999", "--mlflow-uri", store, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load models:/energy-lattice/999")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [
    ["train", "--workers", "1", "--mlflow-uri", "ftp://x"],
    ["tune", "--space", str(REPO / "tune_spaces" / "spawn_convergence.yaml"), "--mlflow-uri", "ftp://x"],
    ["compare", "--experiment", "any", "--mlflow-uri", "ftp://x"],
])
def test_a_tracking_uri_mlflow_cannot_use_is_one_line_naming_it_and_the_schemes(command, tmp_path):
    result = cli(*command, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: MLflow tracking URI ftp://x has an unsupported scheme 'ftp'")
    assert "http://, https://, sqlite://, file://" in line
    assert not list(tmp_path.iterdir())


def test_a_time_budget_that_is_no_duration_is_one_line(tmp_path):
    result = cli("tune", "--space", str(REPO / "tune_spaces" / "spawn_convergence.yaml"), "--time-budget", "2 hours",
                 cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --time-budget '2 hours' is not a duration; write e.g. 90s, 30m, 2h or 1h30m"
    assert not list(tmp_path.iterdir())


def test_a_sweep_whose_space_samples_the_report_schedule_is_refused_under_asha(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("val_every: {choice: [2, 4]}\n")
    result = cli("tune", "--space", str(space), cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: the space samples val_every, which ASHA's schedule is derived from; fix it "
                                     "with --set or --max-steps, or use --scheduler fifo")


def test_train_for_epochs_counts_the_steps_from_the_rows_it_trains_on(tmp_path, corpus_path):
    from orchestrator.cli import main
    summary_file = tmp_path / "summary.json"
    # 40 training rows, batch 8: half an epoch is 20 samples, 3 optimizer steps, a validation at each
    assert main(["train", "--local", "--no-mlflow", "--preset", "smoke", "--epochs", "0.5", "--data", str(corpus_path),
                 "--set", "max_rows=400", "--set", "train_rows=40", "--set", "val_max_samples=16",
                 "--set", "batch_size=8", "--out", str(tmp_path / "run"), "--summary-json", str(summary_file)]) == 0
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({m["step"] for m in metrics if "val_cosine" in m}) == [0, 1, 2, 3]
