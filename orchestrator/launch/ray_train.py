"""Ray Train: `train_loop` in every worker of a `TorchTrainer` (Ray 2.60, Train V2).

The driver (this process) connects to Ray, opens the run's `TrackedRun`, and launches the workers;
rank 0 logs into that run by id. DDP runs over gloo on CPU and NCCL on GPU (Ray sets up the process
group), each worker trains on its own shard of the training rows, Ray restarts the worker group
from the latest reported checkpoint after a failure (`FailureConfig(max_failures)`), and keeps the
best k checkpoints by validation cosine (`CheckpointConfig`). When training ends, the driver closes
the run, which registers the best of them as a new version of the MLflow model `energy-lattice`.

Also here, for every launcher that starts Ray workers (Ray Train, Tune, the scaling job): joining
Ray, the GPU-share check, and the memory a worker has, from which its batch is planned.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ConfigError

from ..config import TrainConfig, flatten, run_tags
from ..context import RayTrainContext, best_checkpoint
from ..data.datasets import PairDataset, validation_rows
from ..faults import Faults
from ..observe.console import ProgressChannel
from ..observe.trackers import TrackerGroup
from ..observe.tracking import EXAMPLE_ROWS, TrackedRun, check_tracking_uri, resolve_tracking_uri
from ..run_data import prepare_data, worker_shards
from ..train import train_loop

log = logging.getLogger(__name__)


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """Join the cluster at `address` / RAY_ADDRESS (as `ray job submit` sets it), else start an
    embedded local Ray whose dashboard listens on 127.0.0.1 only. Token auth is left as Ray sets
    it: on by default for a new local instance, and whatever the cluster uses when joining one.

    What Ray's workers print (Ray Train's report lines, library warnings, their own logs) stays in
    Ray's log files instead of the console; the console gets orchestrator.observe.console's lines."""
    import ray
    if ray.is_initialized():
        return
    init_kwargs.setdefault("log_to_driver", False)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **init_kwargs)
    else:
        ray.init(dashboard_host="127.0.0.1", **init_kwargs)


def ray_logs_dir() -> str:
    """Where this Ray session keeps its processes' logs (session_latest may be another user's session)."""
    import ray._private.worker
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else "/tmp/ray/session_latest/logs"


def alive_node_count() -> int:
    import ray
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (again, after a restart)."""
    import ray
    import ray.train
    run = config["run"]
    ctx = RayTrainContext(run["fault_dir"], Faults.from_dict(run.get("faults")))
    data = ray.get(run["data_shards"][ctx.rank])  # this worker's rows only, from the object store
    # Arrays from the object store are read-only views; torch.from_numpy on them warns on every
    # worker. The shard is small, so the worker takes its own writable copy.
    data = dataclasses.replace(data, train=data.train.take(range(len(data.train))))
    tracker = None
    if ctx.rank == 0:
        tracker = run["tracked_run"].tracker()
        if run.get("progress") is not None:
            train = config["train"]
            console = run["progress"].tracker(train["max_steps"], data.baselines,
                                              validates_every=(train["val_every"], train["checkpoint_every"]))
            tracker = TrackerGroup(tracker, console)
    init_state = ray.get(run["init_state"]) if run.get("init_state") is not None else None
    context = ray.train.get_context()
    # MLflow's system metrics once per node (they measure the whole machine), by its first worker;
    # named by node when the run has several workers, which may sit on several nodes.
    node_id = f"node_{context.get_node_rank()}" if ctx.world_size > 1 else None
    with run["tracked_run"].system_metrics(node_id) if context.get_local_rank() == 0 else contextlib.nullcontext():
        train_loop(config["train"], ctx, tracker, data=data, init_state=init_state)


def check_gpu_share(workers: int, gpus_per_worker: float) -> None:
    """Refuse GPU requests that fail only once the workers start."""
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker={gpus_per_worker} must be at least 0")
    if workers > 1 and gpus_per_worker != int(gpus_per_worker):
        raise ConfigError(f"--gpus-per-worker={gpus_per_worker} with {workers} workers would put two DDP ranks on "
                          f"one GPU, which NCCL refuses; give each worker whole GPUs (e.g. 1)")


def _free_memory_here(device_type: str) -> int:
    from ..memory import available_memory_bytes
    return available_memory_bytes(device_type)


def memory_share(free_bytes: int, device_type: str, gpus_per_worker: float, sharing: int) -> int:
    """One worker's share of the free memory its probe found: on a GPU, the fraction of it the worker
    holds (the rest belongs to the trials Ray packs beside it; a worker uses one GPU however many it
    holds); on a CPU node, an equal share among the `sharing` workers that may run there at once."""
    if device_type == "cuda":
        return int(free_bytes * min(1.0, gpus_per_worker))
    return free_bytes // max(1, sharing)


def worker_memory_budget(cpus_per_worker: float, gpus_per_worker: float, sharing: int) -> int:
    """Memory one training worker can use, measured by a task holding a worker's resources: the
    driver may run on a head node that has no GPU, or other memory than the workers' nodes."""
    import ray
    device_type = "cuda" if gpus_per_worker else "cpu"
    probe = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_free_memory_here)
    return memory_share(ray.get(probe.remote(device_type)), device_type, gpus_per_worker, sharing)


@dataclass(frozen=True)
class WorkerBudget:
    """The memory one training worker may use, and on which device type. The launcher measures it
    once (`probe`) and hands it to wherever a batch is picked, a Tune trial included: a probe from
    inside a trial would wait for the resources the trials themselves hold."""
    budget_bytes: int
    device_type: str

    @classmethod
    def probe(cls, cpus_per_worker: float, gpus_per_worker: float, sharing: int) -> WorkerBudget:
        return cls(worker_memory_budget(cpus_per_worker, gpus_per_worker, sharing),
                   "cuda" if gpus_per_worker else "cpu")


def with_planned_batch(cfg: TrainConfig, budget: WorkerBudget) -> TrainConfig:
    """`cfg` with the largest batch (at most its own batch_size) that the memory planner fits into
    the budget; MemoryBudgetError, naming estimate and budget, if not even batch 1 fits. Tune
    trials and scaling stages both pick their batch here."""
    from ..planner import plan_batch
    plan = plan_batch(cfg.model.resolved(), budget.budget_bytes, device_type=budget.device_type,
                      max_batch=cfg.batch_size)
    return dataclasses.replace(cfg, batch_size=plan.batch)


def put_shards(data: PairDataset, cfg: TrainConfig, workers: int) -> list:
    """Object-store references to each worker's dataset: workers need no shared filesystem."""
    import ray
    return [ray.put(part) for part in worker_shards(data, workers, cfg.val_max_samples, cfg.train_rows)]


@dataclass(kw_only=True)
class Placement:
    """Where a job runs and what it records into: the same for `train`, `tune` and `scale` (the CLI's
    shared launch flags, `cli._add_launch_flags`)."""
    address: str | None = None          # Ray cluster to join (default RAY_ADDRESS, else an embedded local Ray)
    storage: str | None = None          # local folder or URI for Ray's checkpoints (default ./ray_results)
    tracking_uri: str | None = None     # MLflow; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "energy-lattice"  # MLflow experiment (and the Ray run's folder for sweeps and jobs)
    max_failures: int = 2               # restarts Ray may make: of a worker group, or of a trial


@dataclass(kw_only=True)
class WorkerGroup:
    """The Ray Train workers of one training run (one per GPU with GPUs)."""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        check_gpu_share(self.workers, self.gpus_per_worker)


def fields_of(base: type, obj: Any) -> dict[str, Any]:
    """`obj`'s values of the fields `base` declares: a Placement or WorkerGroup handed on as is."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(base)}


@dataclass(kw_only=True)
class Launch(WorkerGroup, Placement):
    """How and where to run one training job: everything about it that is not the model or optimizer."""
    run_name: str | None = None
    parent_run_id: str | None = None    # nest the MLflow run under this one (sweeps, scaling jobs)
    model_alias: str | None = None      # registry alias for the registered version
    mlflow_run_id: str | None = None    # log into this existing run (a restarted job) instead of a new one
    run_tags: dict[str, str] | None = None  # extra tags for the MLflow run


def storage_path(storage: str | None) -> str:
    """--storage, else ENERGY_LATTICE_STORAGE (how a cluster names its shared storage), else ./ray_results."""
    storage = storage or os.environ.get("ENERGY_LATTICE_STORAGE")
    if storage and "://" in storage:
        return storage
    return str(Path(storage or "ray_results").resolve())


def build_trainer(cfg: TrainConfig, launch: Launch, data: PairDataset, *, run: TrackedRun, run_name: str,
                  callbacks: list | None = None, init_state: dict | None = None,
                  progress: ProgressChannel | None = None, faults: Faults | None = None):
    """The TorchTrainer that runs `train_loop` on `launch.workers` workers, rank 0 logging into `run`
    (and, given a ProgressChannel, sending the console's progress lines through it). `faults`, for
    tests, travel in the workers' config as a plain dict, so restarted workers get them too."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = storage_path(launch.storage)
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": launch.gpus_per_worker} if launch.gpus_per_worker else {})}
    return TorchTrainer(
        _train_worker,
        train_loop_config={"train": dataclasses.asdict(cfg),
                           "run": {"tracked_run": run,
                                   "data_shards": put_shards(data, cfg, launch.workers),
                                   "init_state": ray.put(init_state) if init_state is not None else None,
                                   "progress": progress,
                                   "faults": faults.to_dict() if faults is not None else None,
                                   "fault_dir": str(Path(storage) / run_name) if "://" not in storage else None}},
        scaling_config=ScalingConfig(num_workers=launch.workers, use_gpu=launch.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage, callbacks=callbacks,
            # Ray Train logs every report at INFO; the console, our log and MLflow already say what happened.
            logging_config=LoggingConfig(log_level="WARNING"),
            failure_config=FailureConfig(max_failures=launch.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute="val_cosine",
                                               checkpoint_score_order="max")))


def run_ray_train(cfg: TrainConfig, launch: Launch, init_state: dict | None = None,
                  faults: Faults | None = None) -> dict[str, Any]:
    """Train with a TorchTrainer; return the run's summary (TrackedRun.close) with `ray_run_path`.

    `init_state`: model weights to start from unless the run resumes from its own checkpoint.
    `faults`: test faults for the workers to fire (orchestrator.faults)."""
    connect(launch.address)
    uri = resolve_tracking_uri(launch.tracking_uri)
    check_tracking_uri(uri, alive_node_count())
    cfg, data = prepare_data(cfg)
    run_name = launch.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_path(launch.storage)
    run = TrackedRun.open(uri, launch.experiment, run_name, params=flatten(cfg),
                          tags={**run_tags(cfg, launch.workers), "ray_train_run": run_name, **(launch.run_tags or {})},
                          parent_run_id=launch.parent_run_id, run_id=launch.mlflow_run_id, alias=launch.model_alias)
    log.info("MLflow run %s in experiment %r at %s", run.run_id, launch.experiment, uri)

    validation = validation_rows(data, cfg.val_max_samples)
    run.log_datasets(data, validation, cfg.data_path)  # the workers shard these
    progress = ProgressChannel()
    trainer = build_trainer(cfg, launch, data, run=run, run_name=run_name, init_state=init_state,
                            progress=progress, faults=faults)
    try:
        with progress.printing():
            result, error = trainer.fit(), None
    except Exception as e:  # Ray raises once max_failures restarts are used up
        result, error = None, e
        log.error("training failed: %s", e)
    finally:
        progress.close()
    best = best_checkpoint(result.best_checkpoints) if result is not None else None
    summary = run.close(best, status="failed" if error else None, input_example=validation.input_emb[:EXAMPLE_ROWS])
    summary["ray_run_path"] = str(Path(storage) / run_name) if "://" not in storage else f"{storage}/{run_name}"
    if error is not None:
        summary["error"] = str(error).splitlines()[0]
    return summary
