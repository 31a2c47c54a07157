"""MLflow: where runs, metrics, artifacts and versioned checkpoints go.

The embedded default is `sqlite:///mlflow.db` in the working directory (artifacts in `./mlruns`);
any `http://` server works by flag or `MLFLOW_TRACKING_URI`. A file or SQLite store lives on one
machine, so on a cluster of more than one node it is refused: workers elsewhere could not write it.

Every run goes through one lifecycle, `TrackedRun`: the launcher (the process that starts
training: the CLI, Ray Train's driver, a Tune trial and the sweep's driver, the scaling job) opens
it and logs the data it trains on as dataset inputs, rank 0 logs into it by id through
`TrackedRun.tracker()`, one process per node samples MLflow's system metrics into it
(`TrackedRun.system_metrics`), and the launcher closes it, which registers its best checkpoint as a
new version of the model `energy-lattice`, an MLflow model (orchestrator.observe.mlflow_model; loadable with
`mlflow.pyfunc.load_model` and with `load_registered_model("models:/energy-lattice/<version>")`),
sets its status and returns its summary.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..code_version import code_version_tags
from ..metrics import COMPARE_METRICS, logged_baselines, mlflow_metric_name, mlflow_metric_names
from .trackers import Tracker

log = logging.getLogger(__name__)

REGISTERED_MODEL = "energy-lattice"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The tracking stores MLflow can open (a plain folder path works too; SQL schemes may name a driver,
# as in postgresql+psycopg2://).
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
# MLflow 3 has a GenAI view (traces) and a model-training view (runs) of every experiment. The tag
# records which one an experiment is for; the links this project prints also ask for the runs view
# in the URL, which MLflow 3.17's UI follows even in a browser that has never opened it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MLFLOW_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
SUMMARY_FILE = "summary.json"  # the run summary rank 0 logs at the end of training
EXAMPLE_ROWS = 2  # validation rows a registered model shows as its input example


class TrackingConfigError(ValueError):
    """A tracking URI that cannot work where the job runs."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Flag, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; local paths made absolute so that
    workers with another working directory write to the same store. A scheme MLflow cannot store
    runs in is refused here, before anything slow starts."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme and scheme not in TRACKING_SCHEMES:
        source = "" if uri != os.environ.get("MLFLOW_TRACKING_URI") else " (from MLFLOW_TRACKING_URI)"
        raise TrackingConfigError(f"MLflow tracking URI {uri}{source} has an unsupported scheme {scheme!r}; use "
                                  f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} or a folder path")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain folder is MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def runs_view_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI page listing an experiment's runs, in the view for model training (not GenAI)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def browse_lines(uri: str, experiment_id: str | None = None) -> list[str]:
    """How to see this store's runs in the MLflow UI: the command that serves a local store, then the
    page to open (the experiment's runs view when the experiment is known)."""
    from .console import tool_command
    base = MLFLOW_UI_URL if is_local_store(uri) else uri
    page = runs_view_url(base, experiment_id) if experiment_id else base
    if not is_local_store(uri):
        return [page]
    return [f"{tool_command('mlflow')} ui --backend-store-uri {uri}", f"then open {page}"]


def experiment_id(uri: str, name: str) -> str | None:
    exp = client_for(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def check_tracking_uri(uri: str, node_count: int) -> None:
    """Refuse a single-machine store (file or SQLite) when the cluster has more than one node."""
    if node_count > 1 and is_local_store(uri):
        raise TrackingConfigError(
            f"MLflow tracking URI {uri} is a file/SQLite store on one machine, but the Ray cluster has "
            f"{node_count} nodes; start an MLflow server the workers can reach (mlflow server --host 0.0.0.0 "
            f"--port 5000 --backend-store-uri sqlite:///mlflow.db) and pass --mlflow-uri http://HOST:5000")


def client_for(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def start_run(uri: str, experiment: str, run_name: str, *, params: dict[str, Any], tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    """Create a run (nested under `parent_run_id` if given) with its params and tags; return its id."""
    client = client_for(uri)
    experiment_id = ensure_experiment(client, experiment, artifact_location=default_artifact_location(uri))
    all_tags = {**code_version_tags(), **tags}  # the commit, dirty flag and source digest: code_version.py
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, `mlruns/` beside the database file. MLflow's own default is ./mlruns in
    the working directory of whichever process creates the experiment; under `ray job submit` that
    is Ray's temporary copy of the project, so plots and registered checkpoints would vanish with it."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if needed, tagged as a model-training experiment (also
    when it was created before the tag was, so the UI opens its runs view)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:  # an explicit choice someone made in the UI stays
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def child_runs(uri: str, experiment: str, parent_run_id: str, key_tag: str) -> dict[str, Any]:
    """The runs nested under a parent run, keyed by the value of their `key_tag` tag
    (a sweep's trials by `trial_id`, a scaling job's stages by `stage`)."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags[key_tag]: r for r in runs if key_tag in r.data.tags}


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


def end_run(uri: str, run_id: str, status: str) -> None:
    """Close a run, mapping our statuses onto MLflow's run states."""
    state = {"completed": "FINISHED", "stopped": "FINISHED", "infeasible": "KILLED"}.get(status, "FAILED")
    client_for(uri).set_terminated(run_id, state)


def run_metric(run, key: str) -> float | None:
    """A flat metric's latest value in an MLflow run."""
    return run.data.metrics.get(mlflow_metric_name(key))


class MlflowTracker(Tracker):
    """Logs into an existing run by id (rank 0 of a job).

    After a restart the loop replays steps since the last checkpoint; resume is exact, so those
    steps would log the same values again. Steps already in the run's history are skipped per
    metric, which keeps the history free of gaps and duplicates.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = client_for(uri)
        self._last_logged: dict[str, int] = {}
        run = self.client.get_run(run_id)
        for key in run.data.metrics:
            history = self.client.get_metric_history(run_id, key)
            self._last_logged[key] = max((m.step for m in history), default=-1)

    def log_params(self, params):
        existing = self.client.get_run(self.run_id).data.params
        log_params(self.client, self.run_id, {k: v for k, v in params.items() if k not in existing})

    def set_tags(self, tags):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_metrics(self, metrics, step):
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in mlflow_metric_names(metrics).items()
                 if v is not None and step > self._last_logged.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            for m in fresh:
                self._last_logged[m.key] = step

    def log_table(self, rows, name):
        if rows:
            self.client.log_table(self.run_id, {k: [r[k] for r in rows] for k in rows[0]}, name)

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status, summary):
        # The run's summary travels to its launcher from here (see TrackedRun.close); the status
        # tag is the launcher's to set, since only it knows how the run ended (stopped, failed).
        self.client.log_dict(self.run_id, summary, SUMMARY_FILE)
        self._log_validation_plot()

    def _log_validation_plot(self) -> None:
        """Validation cosine and top-1 over steps against the baselines, read back from the run so
        that steps logged before a worker restart are in it too."""
        from .plots import validation_plot

        def history(key):
            return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, mlflow_metric_name(key))]

        baselines = logged_baselines(self.client.get_run(self.run_id).data.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = validation_plot(history("val_cosine"), history("val_top1"), baselines,
                                   Path(tmp) / "validation_vs_baselines.png")
            self.client.log_artifact(self.run_id, str(path), "plots")


def log_config(tracker: Tracker, config: dict[str, Any]) -> None:
    """The resolved config as `config.yaml` artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        tracker.log_artifact(path)


def register_checkpoint(uri: str, run_id: str, checkpoint_dir: str | Path, *, tags: dict[str, str],
                        alias: str | None = None, input_example: Any = None, step: int = 0) -> str:
    """Log a checkpoint folder into the run as an MLflow model (orchestrator.observe.mlflow_model: pyfunc,
    with signature, input example and pinned requirements, the checkpoint inside) and register it
    as a new version of `energy-lattice`."""
    from mlflow.exceptions import MlflowException

    from .mlflow_model import log_model
    client = client_for(uri)
    logged = log_model(client, run_id, checkpoint_dir, input_example=input_example, step=step)
    try:
        client.create_registered_model(REGISTERED_MODEL, description="energy-flow lattice models")
    except MlflowException:
        pass  # already registered
    # The source is the model's artifact location, not its models:/<id> URI: a SQL registry looks a
    # models:/ source up in the process's global tracking store, which need not be this one.
    version = client.create_model_version(REGISTERED_MODEL, source=logged.artifact_location, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()}, model_id=logged.model_id)
    if alias:
        client.set_registered_model_alias(REGISTERED_MODEL, alias, version.version)
    client.set_tag(run_id, "model_version", version.version)
    log.debug("registered %s version %s from run %s", REGISTERED_MODEL, version.version, run_id)  # callers print it
    return str(version.version)


@dataclass
class TrackedRun:
    """One MLflow run from open to close, the same for every launcher: a local run, a Ray Train run,
    a Tune trial and a scaling stage (and, with `end` only, a sweep's or a job's parent run).

    Open it (or reattach to the run a restarted job already has), hand `tracker()` to rank 0, and
    close it with the run's best checkpoint. It is plain data, so it travels to Ray workers as is.
    """
    uri: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)  # what the run is; its registered version carries them too
    alias: str | None = None                            # registry alias for the registered version

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, *, params: dict[str, Any], tags: dict[str, str],
             parent_run_id: str | None = None, run_id: str | None = None, alias: str | None = None) -> TrackedRun:
        """A new run with its params and tags (nested under `parent_run_id` if given), or, given
        `run_id`, that existing run: a restarted job logs on where it stopped."""
        if run_id is None:
            run_id = start_run(uri, experiment, run_name, params=params, tags=tags, parent_run_id=parent_run_id)
        return cls(uri, run_id, dict(tags), alias)

    def tracker(self) -> MlflowTracker:
        """Rank 0's tracker: logs into this run by id, from whichever node rank 0 runs on."""
        return MlflowTracker(self.uri, self.run_id)

    @contextlib.contextmanager
    def system_metrics(self, node_id: str | None = None):
        """MLflow's own system metrics of this machine while the block runs: CPU utilisation, memory,
        disk and network, and on an NVIDIA node (with nvidia-ml-py, the `gpu` extra) each GPU's
        utilisation, memory and power, as `system/<name>` or, given a node id, `system/<node_id>/<name>`.

        MLflow samples every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10) and logs
        only whole sampling windows; the window open when the block ends is logged here, so a run
        shorter than one window still has its figures."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, node_id=node_id, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

    def log_datasets(self, data: Any, validation: Any, source: str | Path) -> None:
        """The run's training and validation rows as MLflow dataset inputs (the runs table's Datasets
        column): named after the file, with a digest of every row (see `rows_digest`), the file as
        source and the row count in the profile (`features_shape`). Logging the same rows again (a
        restarted job) adds nothing."""
        from mlflow.data import from_numpy
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        # The source built as a local file's, not resolved from a bare path: MLflow 3.17 registers
        # that kind twice and warns about the ambiguity at every resolution.
        file = get_dataset_source_from_json(json.dumps({"uri": str(source)}), "local")
        inputs = []
        for context, split in (("training", data.train), ("validation", validation)):
            dataset = from_numpy(split.input_emb, targets=split.target_emb, source=file, name=Path(source).stem,
                                 digest=rows_digest(split))
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        client_for(self.uri).log_inputs(self.run_id, inputs)

    def close(self, best: tuple[Any, dict[str, Any]] | None = None, *, status: str | None = None,
              unfinished: str = "failed", reason: str | None = None, input_example: Any = None) -> dict[str, Any]:
        """Register the run's best checkpoint, set its status tag and MLflow state, and return its summary.

        `best` is the (checkpoint, metrics) pair `context.best_checkpoint` chose, the checkpoint a
        folder or a Ray Checkpoint, or None when the run left none. `input_example`: a few rows of
        teacher embeddings the registered model shows as its input example.

        The status is `status` if given (the launcher saw the run fail or stop), else the one the
        training loop recorded, else `unfinished` (the loop never got to its summary). A run that is
        closed already (by a Tune trial that could not start, or before a restart) is left as it is.

        The summary comes by one channel: the summary.json rank 0 logs into the run. It is the only
        one every launcher has: rank 0 may run on another node than the launcher, Ray Train's result
        holds the metrics of its latest checkpoint rather than the final report, Tune drops a
        trial's return value, and MLflow keeps it across a restart of the launcher.
        """
        client = client_for(self.uri)
        run = client.get_run(self.run_id)
        summary = self._logged_summary()
        if run.info.status != "RUNNING":
            tags = run.data.tags
            status, version = tags.get("status", run.info.status.lower()), tags.get("model_version")
            reason = reason or tags.get("reason")
        else:
            status, version = status or summary.get("status") or unfinished, None
            if best is not None:
                checkpoint, metrics = best
                with _local_folder(checkpoint) as folder:
                    version = register_checkpoint(
                        self.uri, self.run_id, folder, alias=self.alias, input_example=input_example,
                        step=int(metrics.get("step") or 0), tags={
                            **{k: v for k, v in self.tags.items() if k != "status"}, "run_id": self.run_id,
                            "step": str(metrics.get("step")), "val_cosine": f"{metrics['val_cosine']:.4f}"})
            client.set_tag(self.run_id, "status", status)
            if reason:
                client.set_tag(self.run_id, "reason", reason)
            self.end(status)
        # A local loop names its own last checkpoint; Ray's checkpoints are in Ray's storage, which
        # only the launcher sees, so there the summary names the best one kept.
        checkpoint_path = summary.get("checkpoint") or (str(getattr(best[0], "path", best[0])) if best else None)
        return {**summary, "status": status, "mlflow_run_id": self.run_id, "model_version": version,
                "checkpoint": checkpoint_path, "tracking_uri": self.uri, **({"reason": reason} if reason else {})}

    def end(self, status: str) -> None:
        """Set the run's MLflow state from our status (parent runs end with this alone)."""
        end_run(self.uri, self.run_id, status)

    def _logged_summary(self) -> dict[str, Any]:
        """The summary.json rank 0 logged, or {} if training never got that far."""
        from mlflow.exceptions import MlflowException
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return json.loads(Path(client_for(self.uri).download_artifacts(self.run_id, SUMMARY_FILE, tmp))
                                  .read_text())
        except (MlflowException, OSError):
            return {}


def rows_digest(split: Any) -> str:
    """A digest of every row of a data split: both texts and both embeddings, in row order. MLflow's
    own digest of numpy data hashes only the first 10,000 values (26 rows of 384-d embeddings), so
    datasets that differ only after those rows would share one."""
    import numpy as np
    h = hashlib.sha256("\0".join(split.input_texts + split.target_texts).encode())
    for emb in (split.input_emb, split.target_emb):
        h.update(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _local_folder(checkpoint):
    """A folder holding the checkpoint: a Ray Checkpoint is downloaded if its storage is remote."""
    return checkpoint.as_directory() if hasattr(checkpoint, "as_directory") else contextlib.nullcontext(checkpoint)


def download_checkpoint(model_uri: str, tracking_uri: str | None = None) -> Path:
    """The checkpoint folder behind `models:/<name>/<version>` or `models:/<name>@<alias>`, downloaded
    (the one inside the registered MLflow model)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .mlflow_model import checkpoint_in
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise TrackingConfigError(f"cannot load {model_uri}: no MLflow store at {uri}")
    ref = model_uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client_for(uri).get_model_version_by_alias(name, alias).version
        else:
            name, _, version = ref.partition("/")
        source = client_for(uri).get_model_version_download_uri(name, version)
        return checkpoint_in(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri))
    except MlflowException as e:
        raise TrackingConfigError(f"cannot load {model_uri} from {uri}: {e.message.splitlines()[0]}") from None


def load_registered_model(model_uri: str, tracking_uri: str | None = None):
    """An EnergyLattice (eval mode) from `models:/energy-lattice/<version>` or a checkpoint folder."""
    from ..checkpoint import load_model
    path = download_checkpoint(model_uri, tracking_uri) if model_uri.startswith("models:/") else Path(model_uri)
    return load_model(path)


COMPARE_COLUMNS = tuple(mlflow_metric_name(k) for k in COMPARE_METRICS)


def compare_runs(experiment: str, tracking_uri: str | None = None, top: int = 10, csv_path: str | Path | None = None) -> str:
    """A text table of an experiment's best runs by validation cosine: key metrics and the params
    that differ between them (sweep parent runs left out of the table); then each sweep's report summary.
    Given `csv_path`, the table's rows are also written there, one per run: its columns, the run id
    and each differing param."""
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingConfigError(f"no MLflow experiment named {experiment!r} at {uri}")
    val_cosine = mlflow_metric_name("val_cosine")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=[f"metrics.`{val_cosine}` DESC"],
                                          max_results=max(top * 3, 50))
            if r.data.tags.get("kind") != "sweep" and val_cosine in r.data.metrics][:top]
    sweeps = [r for r in client.search_runs([exp.experiment_id], filter_string="tags.kind = 'sweep'")
              if r.data.tags.get("mlflow.note.content")]
    # A sweep's report summary is its parent run's description: the same lines `tune` printed.
    report = "".join(f"\n\nsweep {r.info.run_name} ({r.data.tags.get('status', r.info.status.lower())}):\n"
                     + "\n".join(f"  {line}" for line in r.data.tags["mlflow.note.content"].splitlines())
                     for r in sweeps)
    if not runs:
        if csv_path:
            raise TrackingConfigError(f"experiment {experiment!r} has no runs with a validation cosine yet; "
                                      f"nothing to write to {csv_path}")
        return f"experiment {experiment!r} has no runs with a validation cosine yet" + report
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1 and k != "data_path"]
    header = ["run", "status", "lattice"] + list(COMPARE_COLUMNS)
    values = [[r.info.run_name or r.info.run_id[:8], r.data.tags.get("status", r.info.status.lower()),
               r.data.tags.get("lattice")] + [r.data.metrics.get(m) for m in COMPARE_COLUMNS] for r in runs]
    if csv_path:  # full precision, an empty cell where the table shows "-"
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header + ["run_id"] + differing)
            writer.writerows(row + [r.info.run_id] + [r.data.params.get(k) for k in differing]
                             for row, r in zip(values, runs))
    rows = [["-" if x is None else f"{x:.4f}" if isinstance(x, float) else x for x in row] for row in values]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header] + rows]
    if differing:
        lines.append("\nparams that differ:")
        for r in runs:
            name = r.info.run_name or r.info.run_id[:8]
            lines.append(f"  {name}: " + ", ".join(f"{k}={r.data.params.get(k, '-')}" for k in differing))
    return "\n".join(lines) + report
