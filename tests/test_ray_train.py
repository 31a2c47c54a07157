"""Ray Train + MLflow with real parts: the shared local Ray instance, SQLite MLflow stores, and one
real `mlflow server` process."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from orchestrator.checkpoint import load_model
from orchestrator.data.datasets import validation_rows
from orchestrator.faults import Faults
from orchestrator.launch.ray_train import Launch, run_ray_train
from orchestrator.observe.mlflow_model import predict_embeddings
from orchestrator.observe.tracking import TrackingConfigError, check_tracking_uri, load_registered_model, rows_digest
from orchestrator.run_data import load_data

pytestmark = pytest.mark.ray


def launch(tmp_path, **kw):
    return Launch(storage=str(tmp_path / "ray"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                  experiment="tests", **kw)


def history_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_workers_train_on_their_own_shards_and_rank0_logs_a_complete_run(tmp_path, ray_instance,
                                                                             quick_config, monkeypatch):
    cfg = quick_config(max_steps=8)
    summary = run_ray_train(cfg, launch(tmp_path, workers=2))
    assert summary["status"] == "completed" and summary["steps"] == 8

    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    shards = json.loads(run.data.tags["data_shards"])
    assert [s[0] for s in shards] == [0, 1]
    assert shards[0][2] != shards[1][2], "both workers got the same rows"
    assert abs(shards[0][1] - shards[1][1]) <= 1
    # one logger: every logged step appears exactly once
    assert history_steps(client, run.info.run_id, "train/loss") == list(range(1, 9))
    assert history_steps(client, run.info.run_id, "eval/cosine") == [0, 4, 8]
    # MLflow groups metrics by section; the constant baselines' section sorts last
    sections = {key.split("/")[0] for key in run.data.metrics}
    assert sections == {"train", "eval", "flow", "system", "val_baseline"}, sorted(run.data.metrics)
    assert {"flow/steps_used", "system/peak_mem_gb", "val_baseline/ridge_cosine", "eval/top1"} <= set(run.data.metrics)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.params["model.width"] == "8" and run.data.params["lr"] == str(cfg.lr)
    assert {"preset", "lattice", "workers", "precision", "mlflow.source.git.commit", "git_dirty",
            "source_digest"} <= set(run.data.tags)
    assert run.data.tags["workers"] == "2" and run.data.tags["lattice"] == "8x8x8"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "decoded"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {f"plots/{n}.png" for n in ("output_surfaces", "flow_paths_xz", "completion_curve", "loss_curve",
                                                 "validation_vs_baselines")}

    # MLflow's own system metrics, one series per node (both workers share this one: node_0), beside ours
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= \
        set(run.data.metrics), sorted(run.data.metrics)
    assert run.data.metrics["system/node_0/system_memory_usage_megabytes"] > 0
    assert not any(key.startswith("system/node_1/") for key in run.data.metrics)
    # the data it trained and validated on, as MLflow dataset inputs with a digest of every row
    data = load_data(cfg)
    validation = validation_rows(data, cfg.val_max_samples)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    for context, split in (("training", data.train), ("validation", validation)):
        assert inputs[context].digest == rows_digest(split) and inputs[context].name == "stdlib_pairs"
        assert json.loads(inputs[context].source)["uri"] == cfg.data_path
        assert json.loads(inputs[context].profile)["features_shape"] == [len(split), 384]

    version = client.get_model_version("energy-lattice", summary["model_version"])
    assert version.run_id == run.info.run_id and version.tags["lattice"] == "8x8x8"
    assert version.tags["preset"] == "smoke"
    (logged,) = run.outputs.model_outputs
    assert logged.model_id in version.source and logged.step == 8
    uri = f"models:/energy-lattice/{summary['model_version']}"
    registered = load_registered_model(uri, summary["tracking_uri"])
    trained = load_model(summary["checkpoint"])
    x = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = trained(x).embedding
        torch.manual_seed(0)
        torch.testing.assert_close(registered(x).embedding, expected, rtol=0, atol=0)
    # The version is an MLflow model: pyfunc loads it and predicts what the project's loader does
    monkeypatch.setenv("MLFLOW_TRACKING_URI", summary["tracking_uri"])
    pyfunc = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(pyfunc.predict(x.numpy()), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict(x.numpy(), params={"seed": 3}), predict_embeddings(registered, x, seed=3),
                               rtol=1e-5, atol=1e-6)
    signature = pyfunc.metadata.signature
    assert [(s.type, s.shape) for s in signature.inputs.inputs] == [(np.dtype("float32"), (-1, 384))]
    assert [(s.type, s.shape) for s in signature.outputs.inputs] == [(np.dtype("float32"), (-1, 384))]
    example = pyfunc.metadata.load_input_example(mlflow.artifacts.download_artifacts(uri))
    np.testing.assert_array_equal(example, validation.input_emb[:2])


def test_a_worker_killed_mid_run_is_restarted_without_losing_or_repeating_steps(tmp_path, ray_instance,
                                                                               quick_config):
    cfg = quick_config(max_steps=10)
    summary = run_ray_train(cfg, launch(tmp_path, workers=2, max_failures=2), faults=Faults(crash_at_step=7))
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert list((tmp_path / "ray").rglob(".fault-crash-at-7")), "the fault never fired"
    client = MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert history_steps(client, summary["mlflow_run_id"], "train/loss") == list(range(1, 11))
    assert history_steps(client, summary["mlflow_run_id"], "eval/cosine") == [0, 4, 8, 10]


def test_non_finite_loss_ends_the_run_as_diverged_with_the_last_good_checkpoint(tmp_path, ray_instance,
                                                                                quick_config):
    cfg = quick_config(max_steps=12)
    summary = run_ray_train(cfg, launch(tmp_path, workers=1), faults=Faults(nan_loss_at_step=6))
    assert summary["status"] == "diverged" and summary["steps"] == 5
    state = torch.load(f"{summary['checkpoint']}/state.pt", weights_only=True)
    assert state["step"] == 4
    client = MlflowClient(summary["tracking_uri"])
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FAILED"


def test_a_datasets_digest_changes_with_any_of_its_rows(small_data):
    split = small_data.train
    assert rows_digest(split) == rows_digest(split.take(range(len(split))))
    last = len(split) - 1  # past the rows MLflow's own numpy digest looks at
    texts = list(split.target_texts)
    texts[last] += "."
    emb = split.target_emb.copy()
    emb[last, 7] += 1e-3
    changed = [dataclasses.replace(split, target_texts=texts), dataclasses.replace(split, target_emb=emb),
               split.take(range(last))]
    digests = {rows_digest(s) for s in changed} | {rows_digest(split)}
    assert len(digests) == 4


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"])
def test_single_machine_tracking_store_is_refused_on_a_multi_node_cluster(uri):
    check_tracking_uri(uri, node_count=1)
    with pytest.raises(TrackingConfigError, match="2 nodes; start an MLflow server"):
        check_tracking_uri(uri, node_count=2)
    check_tracking_uri("http://mlflow.internal:5000", node_count=2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            # /health, not a client call: MlflowClient retries a refused connection with backoff
            # (2, 4, 8 s), which adds seconds to every start
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.25)
        else:
            pytest.fail("mlflow server did not come up")
        yield uri
    finally:
        proc.terminate()
        proc.wait(30)


def test_training_against_a_real_mlflow_server(tmp_path, mlflow_server, corpus_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "--local", "--preset", "smoke", "--max-steps", "3",
         "--data", str(corpus_path), "--set", "max_rows=400", "--set", "val_max_samples=32",
         "--set", "batch_size=8", "--out", str(out), "--mlflow-uri", mlflow_server, "--experiment", "served",
         "--summary-json", str(tmp_path / "summary.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.width"] == "8"
    assert history_steps(client, run.info.run_id, "eval/cosine") == [0, 3]
    assert "plots" in {a.path for a in client.list_artifacts(run.info.run_id)}
    model = load_registered_model(f"models:/energy-lattice/{summary['model_version']}", mlflow_server)
    assert model.cfg.width == 8
    assert not (tmp_path / "mlflow.db").exists(), "nothing may fall back to the local store"


def test_the_progress_channel_reaches_workers_after_ray_patches_print(ray_instance, monkeypatch):
    """Ray Train patches builtins.print in the driver; the channel must still pickle to its workers."""
    import builtins

    import cloudpickle
    from orchestrator.observe.console import ProgressChannel
    channel = ProgressChannel()
    try:
        monkeypatch.setattr(builtins, "print", lambda *a, **k: None)
        copy = cloudpickle.loads(cloudpickle.dumps(channel))
        copy.tracker(10).emit("a line")
        assert channel.queue.get(timeout=10) == "a line"
    finally:
        channel.close()
