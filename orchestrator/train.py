"""`train_loop(config)`: the only training loop.

It runs unchanged in a plain process, as a Ray Tune function trainable, and in every worker of a
Ray Train TorchTrainer; the RunContext it is given decides where reports and checkpoints go, and
the Tracker records params, metrics and artifacts (rank 0 only).

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` samples per worker. AdamW,
linear warm-up then ReduceLROnPlateau-style cuts (or cosine), gradient clipping, mixed precision
(a GradScaler for fp16 only). Resume restores model, optimizer, schedule, scaler, step, RNG and
data position, so a resumed run takes exactly the steps the uninterrupted one would have.
A non-finite loss stops the run with status "diverged" before the bad update is applied; the last
good checkpoint stays where it is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import EnergyLattice, count_parameters
from model.config import flatten

from .checkpoint import check_compatible
from .config import ConfigError, TrainConfig, config_from_dict, resolved, run_tags
from .context import LocalContext, RunContext, all_gather, step_check
from .data.datasets import PairDataset, Split, validation_rows
from .evaluation import Decoded, baselines, evaluate, example_rows, finish_metrics, text_metrics
from .faults import Faults
from .memory import keep_freed_memory, peak_memory_bytes, reset_peak_memory, use_expandable_segments
from .metrics import validation_key
from .observe.plots import make_plots
from .observe.trackers import Tracker
from .observe.tracking import log_config
from .run_data import prepare_data, worker_shards
from .step import train_step

log = logging.getLogger(__name__)

class LRSchedule:
    """Linear warm-up to `lr`, then either plateau cuts (driven by validation loss) or cosine decay."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.scale, self.best, self.bad_validations = 1.0, math.inf, 0

    def lr(self, step: int) -> float:
        c = self.cfg
        if step <= c.warmup_steps:
            return c.lr * step / c.warmup_steps
        if c.lr_schedule == "cosine":
            progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
            return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(c.min_lr, c.lr * self.scale)

    def on_validation(self, step: int, val_loss: float) -> None:
        if self.cfg.lr_schedule != "plateau" or step <= self.cfg.warmup_steps:
            return
        if val_loss < self.best - 1e-4:
            self.best, self.bad_validations = val_loss, 0
        else:
            self.bad_validations += 1
            if self.bad_validations > self.cfg.plateau_patience:
                self.scale *= self.cfg.plateau_factor
                self.bad_validations = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.best, self.bad_validations = state["scale"], state["best"], int(state["bad_validations"])


class BatchStream:
    """Shuffled micro-batches over n rows; epoch e uses a permutation seeded by (seed, e).

    Its state is just (epoch, position), which is what makes resume exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        if n < batch_size:
            raise ConfigError(f"batch_size={batch_size} is larger than the {n} training rows this worker holds; "
                              f"allowed range [1, {n}] here: lower batch_size or use more data")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, torch.device(device)
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, None

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            # One copy to the device per epoch; slicing it there costs no host sync per batch.
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).to(self.device), self.epoch
        idx = self._perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's RNG state: the CPU generator, and on CUDA the generator of the one GPU it trains on.

    Only that GPU's: a restarted rank may be given another GPU (another index, or the same index
    naming another device once Ray narrows CUDA_VISIBLE_DEVICES), so the state belongs to the rank,
    not to a device index."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore a rank's RNG state onto the device this rank trains on now (see _rng_state)."""
    # Both setters take only CPU ByteTensors, wherever the checkpoint was loaded.
    torch.set_rng_state(state["torch"].cpu())
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, (list, tuple)):  # saved before: every visible GPU's, listed by index
        cuda_state = cuda_state[device.index or 0] if device.type == "cuda" and cuda_state else None
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _load_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any], saved_precision: str) -> None:
    """Restore the fp16 loss scale; a checkpoint from a bf16 or fp32 run has none to restore.

    Precision may change between checkpoint and run: the weights and AdamW's moments are fp32
    either way, and a new fp16 scale starts at GradScaler's default and finds its level within a
    few steps (it skips the steps whose gradients overflow)."""
    if scaler.is_enabled() and not saved:
        log.info("checkpoint was saved by a %s run: the fp16 loss scale starts afresh", saved_precision)
        return
    scaler.load_state_dict(saved)  # a disabled scaler ignores what it is given


def use_deterministic_algorithms() -> None:
    """Deterministic kernels for the rest of the process, so a resumed run on CUDA repeats the
    uninterrupted one: there index_add (splatting, spawning) and the backward of index_select add
    in a varying order. cuBLAS needs CUBLAS_WORKSPACE_CONFIG for it. An op with no deterministic
    kernel warns rather than stops the run (warn_only)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def _maybe_crash(faults: Faults, step: int, ctx: RunContext) -> None:
    """Test fault: kill this process once at `faults.crash_at_step` (rank 0 only)."""
    if faults.crash_at_step != step or ctx.rank != 0 or ctx.fault_marker_dir() is None:
        return
    marker = Path(ctx.fault_marker_dir()) / f".fault-crash-at-{step}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        log.warning("fault injection: killing worker process at step %d", step)
        os._exit(13)


def _validate(model: EnergyLattice, val: Split, cfg: TrainConfig, ctx: RunContext,
              device: torch.device) -> tuple[dict[str, float], list[str]]:
    """Validation metrics over all ranks: each rank evaluates its share of the rows. Returns the
    metrics (`val_*`, `lattice_gain`, `plane_difference`) and the decoded texts in row order."""
    rows = slice(ctx.rank, None, ctx.world_size)
    metrics, decoded, lattice_decoded, _ = evaluate(model, val, batch_size=cfg.batch_size, device=device,
                                                    seed=cfg.seed + 7919, rows=rows)
    n_local = len(range(*rows.indices(len(val))))
    parts = all_gather((n_local, metrics, decoded.neighbour.cpu(), lattice_decoded.neighbour.cpu()))
    n = sum(p[0] for p in parts)
    merged = finish_metrics({k: sum(p[1][k] * p[0] for p in parts) / max(n, 1) for k in metrics})

    def texts_in_row_order(which: int) -> list[str]:  # rank r held rows r, r + world, ...
        neighbour = torch.empty(len(val), dtype=torch.long)
        for r, p in enumerate(parts):
            neighbour[r::ctx.world_size] = p[which]
        return Decoded(cosine=torch.zeros(0), neighbour=neighbour).texts(val)

    texts = texts_in_row_order(2)
    merged.update(text_metrics(texts, val))
    merged["top1_lattice_only"] = text_metrics(texts_in_row_order(3), val)["top1"]
    return {validation_key(k): v for k, v in merged.items()}, texts


@dataclass
class TrainingRun:
    """What one call of train_loop holds: the steps below each read and update it."""
    cfg: TrainConfig                       # resolved
    ctx: RunContext
    tracker: Tracker                       # rank 0's, or the do-nothing Tracker()
    device: torch.device
    data: PairDataset
    train_rows: Split                      # this rank's training rows
    val: Split                             # the validation rows, on every rank
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    model: EnergyLattice
    ddp_model: nn.Module                   # the model as the context wrapped it (DDP across workers)
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    stream: BatchStream
    faults: Faults                         # the context's test faults if they apply to this config, else none
    step: int = 0
    baselines: dict[str, float] = field(default_factory=dict)  # rank 0 only
    status: str = "completed"
    last_val: dict[str, float] = field(default_factory=dict)
    validated_at: int | None = None
    last_checkpoint: Any = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    window_start: float = 0.0              # throughput since the last training-metrics line
    window_samples: int = 0


@dataclass
class StepResult:
    """One optimizer step's figures, summed over its micro-batches (steps_used, completion, spawned)."""
    loss: float
    lr: float
    grad_norm: torch.Tensor  # on the device: read on the host only when logged (a host sync per step otherwise)
    steps_used: float
    completion: float
    spawned: torch.Tensor


def train_loop(config: TrainConfig | dict[str, Any], ctx: RunContext | None = None,
               tracker: Tracker | None = None, data: PairDataset | None = None,
               init_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train one model; return the run summary (see metrics.SUMMARY_KEYS). Safe to call in any worker.

    `data`, if given, holds the training rows of this worker only (run_data.worker_shards); without
    it the loop prepares the config's data itself (run_data.prepare_data) and takes this rank's share. `init_state` holds model
    weights to start from when there is no checkpoint to resume (e.g. the previous scaling stage's).
    """
    run = _setup(config, ctx, tracker, data)
    _resume_or_init(run, init_state)
    _start(run, given_weights=init_state is not None)
    while run.step < run.cfg.max_steps:
        run.step += 1
        result = _optimizer_step(run)
        if result is None:  # a non-finite loss: stopped before the bad update
            break
        _log_training(run, result)
        _validate_and_checkpoint(run, result.loss)
    return _finish(run)


def _setup(config: TrainConfig | dict[str, Any], ctx: RunContext | None, tracker: Tracker | None,
           data: PairDataset | None) -> TrainingRun:
    """The config resolved (once: everything below takes the resolved dataclass), the process
    prepared, this rank's data on the device, the model and its optimizer, schedule and scaler."""
    cfg = resolved(config if isinstance(config, TrainConfig) else config_from_dict(config))
    ctx = ctx or LocalContext(Path("runs") / cfg.preset, keep=cfg.keep_checkpoints)
    tracker = tracker if (tracker is not None and ctx.rank == 0) else Tracker()
    device = ctx.device(cfg.device)
    if device.type == "cpu" and cfg.cpu_keep_freed_memory:
        keep_freed_memory()
    if device.type == "cuda":
        log.info("CUDA allocator: %s", use_expandable_segments())
    if cfg.deterministic:
        use_deterministic_algorithms()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    if data is None:  # a plain process prepares what a launcher would have
        _, prepared = prepare_data(cfg)
        data = worker_shards(prepared, ctx.world_size, cfg.val_max_samples, cfg.train_rows)[ctx.rank]
    train_rows = data.train

    model = EnergyLattice(cfg.model).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    return TrainingRun(
        cfg=cfg, ctx=ctx, tracker=tracker, device=device, data=data, train_rows=train_rows,
        val=validation_rows(data, cfg.val_max_samples),
        train_inputs=torch.from_numpy(train_rows.input_emb).to(device),
        train_targets=torch.from_numpy(train_rows.target_emb).to(device),
        model=model, ddp_model=model, optimizer=optimizer, schedule=LRSchedule(cfg),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.model.precision == "fp16-mixed"),
        stream=BatchStream(len(train_rows), cfg.batch_size, cfg.seed * 1009 + ctx.rank, device),
        faults=ctx.faults if ctx.faults.active_for(cfg) else Faults())


def _resume_or_init(run: TrainingRun, init_state: dict[str, torch.Tensor] | None) -> None:
    """Resume from the context's checkpoint (model, optimizer, schedule, scaler, data position, step,
    RNG), else start from `init_state` if given; then let the context wrap the model (DDP)."""
    resumed = run.ctx.resume_state()
    if resumed is not None:
        state, source = resumed
        check_compatible(state, run.cfg.model, source=f"checkpoint {source}")
        run.model.load_state_dict(state["model"])
        if "optimizer" in state:  # a weights-only checkpoint (model + config) restarts the optimizer
            rank = run.ctx.rank
            run.optimizer.load_state_dict(state["optimizer"])
            run.schedule.load_state_dict(state["schedule"])
            _load_scaler(run.scaler, state["scaler"], state["model_config"].get("precision", "fp32"))
            run.stream.load_state_dict(state["data"][rank] if rank < len(state["data"]) else state["data"][0])
            run.step = int(state["step"])
            _set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)], run.device)
        log.info("resumed from %s at step %d", source, run.step)
    elif init_state is not None:
        run.model.load_state_dict(init_state)
    run.ddp_model = run.ctx.wrap_model(run.model)


def _start(run: TrainingRun, given_weights: bool) -> None:
    """A new run records its config, tags and baselines and validates its starting point, which
    every later validation is compared with; a resumed one only says where it stands."""
    cfg, ctx, tracker, model = run.cfg, run.ctx, run.tracker, run.model
    run.baselines = (run.data.baselines or baselines(run.data.train, run.val)) if ctx.rank == 0 else {}
    # Which rows each rank trains on (count and fingerprint), so a run shows its sharding.
    shards = all_gather([ctx.rank, len(run.train_rows), _fingerprint(run.train_rows.input_texts)])
    if run.step == 0:
        tracker.log_params(flatten(cfg))
        log_config(tracker, asdict(cfg))
        tracker.set_tags({**run_tags(cfg, ctx.world_size), "data_shards": json.dumps(shards),
                          "init_weights": state_fingerprint(model.state_dict()),
                          "init_source": "given weights" if given_weights else "random"})
        tracker.log_metrics({**run.baselines, "parameters": count_parameters(model)}, step=0)
    log.info("training %s: %d parameters, %d train rows on this worker, %d validation rows, device %s",
             cfg.preset, count_parameters(model), len(run.train_rows), len(run.val), run.device)
    if run.step == 0:
        run.last_val, _ = _validate(model, run.val, cfg, ctx, run.device)
        run.validated_at = 0
        tracker.log_metrics(run.last_val, step=0)
    _start_window(run)


def _start_window(run: TrainingRun) -> None:
    """Start a new window of the training-metrics line: its throughput and its peak memory count
    from here. The peak is reset once per line, not per step, so the line reports the peak of every
    step since the previous one (on CPU, without handing freed heap back: that is the allocator's
    business, not the logger's)."""
    reset_peak_memory(run.device, return_freed_memory=False)
    run.window_start, run.window_samples = time.perf_counter(), 0


def _optimizer_step(run: TrainingRun) -> StepResult | None:
    """One optimizer step at run.step (step.train_step over grad_accum_steps micro-batches).

    Returns None, with run.status "diverged" and run.step back at the last applied step, when the
    loss of any rank is not finite; the update is not applied then."""
    cfg, step = run.cfg, run.step
    _maybe_crash(run.faults, step, run.ctx)
    lr = run.schedule.lr(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = [(run.train_inputs[idx], run.train_targets[idx])
               for idx in (run.stream.next() for _ in range(cfg.grad_accum_steps))]
    outcome = train_step(run.model, batches, run.optimizer, run.scaler, grad_clip=cfg.grad_clip,
                         forward_model=run.ddp_model, finite_check=step_check,
                         poison_loss=run.faults.nan_loss_at_step == step)
    if not outcome.applied:
        run.status = "diverged"
        run.step -= 1  # the update was not applied
        log.error("non-finite loss at step %d; stopping with status 'diverged'", step)
        return None
    run.window_samples += cfg.batch_size * cfg.grad_accum_steps * run.ctx.world_size
    # Summed on the device: a host read per micro-batch would stall the GPU each time.
    spawned = sum(s.spawned.float().mean() for s in outcome.stats)
    return StepResult(outcome.loss, lr, outcome.grad_norm, sum(s.steps_used for s in outcome.stats),
                      sum(s.completion for s in outcome.stats), spawned)


def _log_training(run: TrainingRun, result: StepResult) -> None:
    """Training metrics every log_every steps and at the last: loss, lr, flow figures per micro-batch,
    and throughput and peak memory since the last such line."""
    cfg, step, device = run.cfg, run.step, run.device
    if not (step % cfg.log_every == 0 or step == cfg.max_steps):
        return
    elapsed = time.perf_counter() - run.window_start
    n_micro = cfg.grad_accum_steps
    # The caching allocator's reserve is what the GPU's memory must hold: allocated + its slack.
    reserved = {"peak_mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30} \
        if device.type == "cuda" else {}
    run.tracker.log_metrics({
        "loss": result.loss, "lr": result.lr, "grad_norm": float(result.grad_norm),
        "steps_used": result.steps_used / n_micro, "completion": result.completion / n_micro,
        "spawned_per_sample": float(result.spawned) / n_micro,
        "samples_per_s": run.window_samples / max(elapsed, 1e-9),
        "step_time_s": elapsed / max(1, run.window_samples // (cfg.batch_size * n_micro * run.ctx.world_size)),
        "peak_mem_gb": peak_memory_bytes(device) / 2**30, **reserved}, step=step)
    run.loss_history.append((step, result.loss))
    _start_window(run)


def _validate_and_checkpoint(run: TrainingRun, loss_value: float) -> None:
    """Validation every val_every steps, a checkpoint every checkpoint_every steps, both at the last
    step; every checkpoint carries its validation score. Decoded-example tables every decode_every
    steps. Each validation or checkpoint is reported to the context (Tune, Ray Train, a folder)."""
    cfg, ctx, step, val = run.cfg, run.ctx, run.step, run.val
    final = step == cfg.max_steps
    checkpoint_now = final or step % cfg.checkpoint_every == 0
    validate_now = checkpoint_now or step % cfg.val_every == 0
    if validate_now:
        run.last_val, texts = _validate(run.model, val, cfg, ctx, run.device)
        run.validated_at = step
        run.schedule.on_validation(step, run.last_val["val_loss"])
        run.tracker.log_metrics(run.last_val, step=step)
        if final or step % cfg.decode_every == 0:
            run.tracker.log_table(example_rows(texts, val, cfg.decode_examples), f"decoded/step_{step:08d}.json")
        base = run.baselines
        log.info("step %d: loss %.4f val cosine %.4f top1 %.3f bleu %.2f, lattice alone %.4f, gain over skip "
                 "%.4f (ridge %.4f, kernel ridge %.4f, identity %.4f)",
                 step, loss_value, run.last_val["val_cosine"], run.last_val["val_top1"], run.last_val["val_bleu"],
                 run.last_val["val_cosine_lattice_only"], run.last_val["lattice_gain"],
                 base.get("baseline_ridge_cosine", float("nan")),
                 base.get("baseline_kernel_ridge_cosine", float("nan")),
                 base.get("baseline_identity_cosine", float("nan")))
    elif step % cfg.decode_every == 0 and cfg.decode_examples:
        texts = _decode_examples(run.model, val, cfg, run.device)
        run.tracker.log_table(example_rows(texts, val, cfg.decode_examples), f"decoded/step_{step:08d}.json")
    if not validate_now:
        return
    state = _checkpoint_state(run) if checkpoint_now else None
    path = ctx.report(step, {"step": step, "loss": loss_value, **run.last_val}, state)
    run.last_checkpoint = path or run.last_checkpoint


def _checkpoint_state(run: TrainingRun) -> dict[str, Any] | None:
    """Everything a resume needs, gathered from every rank (data position, RNG); None off rank 0."""
    states = all_gather((run.stream.state_dict(), _rng_state(run.device)))
    if run.ctx.rank != 0:
        return None
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(), "scaler": run.scaler.state_dict(), "step": run.step,
            "data": [s[0] for s in states], "rng": [s[1] for s in states],
            "model_config": asdict(run.cfg.model), "train_config": flatten(run.cfg)}


def _finish(run: TrainingRun) -> dict[str, Any]:
    """The run's plots and summary: to the tracker, and to the context from every rank, so the
    launcher learns how the run ended."""
    cfg, ctx, tracker, val = run.cfg, run.ctx, run.tracker, run.val
    if run.validated_at is None:  # resumed a run that had already finished: report where it stands
        run.last_val, _ = _validate(run.model, val, cfg, ctx, run.device)
    last_checkpoint = run.last_checkpoint or ctx.latest_checkpoint()  # e.g. diverged: the last good one
    if ctx.rank == 0 and len(val) and _keeps_artifacts(tracker):
        with tempfile.TemporaryDirectory() as tmp:
            sample = torch.from_numpy(val.input_emb[:1]).to(run.device)
            for path in make_plots(run.model, sample, run.loss_history, tmp):
                tracker.log_artifact(path, "plots")
    last_val = run.last_val
    summary = {
        "status": run.status, "steps": run.step,
        "val_cosine": last_val.get("val_cosine"), "val_top1": last_val.get("val_top1"),
        "val_bleu": last_val.get("val_bleu"), "val_loss": last_val.get("val_loss"),
        **{k: last_val.get(k) for k in ("lattice_gain", "val_cosine_skip_only", "val_cosine_lattice_only",
                                        "val_top1_lattice_only", "plane_difference", "plane_balance")},
        "mean_steps_used": last_val.get("val_steps_used"), "completion": last_val.get("val_completion"),
        "max_flow_steps": cfg.model.max_steps,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        **{k: v for k, v in run.baselines.items()},
    }
    tracker.finish(run.status, summary)
    ctx.report(run.step, {"step": run.step, **summary}, None)
    return summary


def _keeps_artifacts(tracker: Tracker) -> bool:
    """Plots take seconds of matplotlib; a tracker that drops artifacts needs none made."""
    return type(tracker).log_artifact is not Tracker.log_artifact


def _fingerprint(texts: list[str]) -> str:
    return hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short hash of model weights, to show which weights a run started from."""
    h = hashlib.sha1()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _decode_examples(model: EnergyLattice, val: Split, cfg: TrainConfig, device: torch.device) -> list[str]:
    rows = slice(0, cfg.decode_examples)
    decoded = evaluate(model, val, batch_size=cfg.batch_size, device=device, seed=cfg.seed + 7919, rows=rows).decoded
    return decoded.texts(val)
