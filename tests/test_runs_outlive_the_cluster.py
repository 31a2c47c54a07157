"""Runs outlive the cluster: an `mlflow server` as ray_cluster.yaml starts it on the head, with its
backend store and artifacts destination outside the head, is stopped, its working folder deleted
(what `ray down` does to the head's disk), and started again elsewhere on the same stores: the runs,
their plots and the registered versions of a small job are all still there."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.observe.tracking import load_registered_model

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(head: Path, backend: str, artifacts: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with the flags the yaml's head gives it (the stores here stand for the database
    and the bucket), from the head's own folder, as `nohup mlflow server ...` runs from its home."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
                             "--workers", "1"], cwd=head, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:  # /health: a client call retries a refused connection with backoff (2, 4, 8 s)
            urllib.request.urlopen(f"{uri}/health", timeout=5)
            return proc, uri
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.25)
    proc.terminate()
    pytest.fail("mlflow server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def snapshot(uri: str, run_id: str, version: str) -> dict:
    """What a person would look for after the cluster is gone."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    plots = sorted(a.path for a in client.list_artifacts(run_id, "plots"))
    model_version = client.get_model_version("energy-lattice", version)
    return {"status": run.info.status, "params": run.data.params, "tags": run.data.tags,
            "cosine": [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/cosine")],
            "plots": plots, "version_source": model_version.source, "version_run": model_version.run_id}


@pytest.mark.timeout(900)
def test_runs_plots_and_registered_versions_survive_a_server_restart_on_the_same_stores(tmp_path, corpus_path):
    outside = tmp_path / "outside-the-cluster"
    (outside / "database").mkdir(parents=True)
    backend, artifacts = f"sqlite:///{outside / 'database' / 'mlflow.db'}", outside / "bucket"
    head, client_dir = tmp_path / "head", tmp_path / "laptop"
    head.mkdir()
    client_dir.mkdir()

    server, uri = start_server(head, backend, artifacts)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", "train", "--local", "--preset", "smoke", "--max-steps", "3",
             "--data", str(corpus_path), "--set", "max_rows=400", "--set", "val_max_samples=32",
             "--set", "batch_size=8", "--out", str(client_dir / "run"), "--mlflow-uri", uri,
             "--experiment", "outlives", "--summary-json", str(client_dir / "summary.json")],
            cwd=client_dir, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((client_dir / "summary.json").read_text())
        before = snapshot(uri, summary["mlflow_run_id"], summary["model_version"])
        with open(MlflowClient(uri).download_artifacts(summary["mlflow_run_id"], "plots/loss_curve.png",
                                                       str(client_dir)), "rb") as f:
            plot_bytes = f.read()
    finally:
        stop_server(server)
    assert before["status"] == "FINISHED" and "plots/validation_vs_baselines.png" in before["plots"]
    assert before["cosine"] and before["tags"].get("source_digest")
    assert not list(head.iterdir()), "the server kept something on the head's disk"
    shutil.rmtree(head)  # ray down

    new_head = tmp_path / "next-cluster-head"
    new_head.mkdir()
    server, uri = start_server(new_head, backend, artifacts)
    try:
        after = snapshot(uri, summary["mlflow_run_id"], summary["model_version"])
        assert after == before
        fetched = MlflowClient(uri).download_artifacts(summary["mlflow_run_id"], "plots/loss_curve.png",
                                                       str(tmp_path / "fetched"))
        assert Path(fetched).read_bytes() == plot_bytes
        model = load_registered_model(f"models:/energy-lattice/{summary['model_version']}", uri)
        assert model.cfg.width == 8
    finally:
        stop_server(server)
