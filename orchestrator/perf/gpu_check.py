"""`python -m orchestrator gpu-check`: prove the GPU paths in one short run (its parts' time limits add up
to 8 minutes; no GPU run of it is on record yet: docs/results/ keeps every one that is made).

Built for a bare GPU machine with torch, numpy, pyarrow, pyyaml, sacrebleu and matplotlib, and no
Ray, MLflow, teacher package or network: it imports only `model/` and the parts of `orchestrator/`
that need none of them, and trains on the embedded Parquet given with `--data` (the corpus cache
holds the `input_emb` / `target_emb` columns it needs) or on synthetic unit vectors.

Six parts, each under its own time limit and try/except, so one failure does not hide the others:

    precision     {fp32, bf16-mixed, fp16-mixed} x checkpointing {off, on} x saved state {fp32, bf16}:
                  forward + backward; planes, energy and move are fp32; every gradient is finite;
                  fp32 gradients are the same with and without checkpointing
    host_syncs    host syncs per forward = flow steps used (torch.cuda.set_sync_debug_mode; CUDA only)
    train_resume  train_loop in bf16 and fp16, 8 steps, checkpoint at 4, resumed from 4: the same
                  losses within RESUME_TOLERANCE (deterministic mode); fp16 resumed from a bf16
                  checkpoint; a NaN loss ends `diverged`
    ddp           DDP as Ray Train wraps it: over NCCL on GPUs (two ranks on two GPUs; with one GPU,
                  NCCL in a one-rank group plus two ranks sharing it over gloo), over gloo on the CPU:
                  no reducer error, a correct all_reduce, identical parameters after 3 steps
    planner       the planner's estimate against max_memory_allocated / max_memory_reserved for
                  scale-150 and scale-300 at the batch it picks for 22 GiB, with and without
                  expandable segments (CPU: the smoke preset against peak RSS)
    bench         debug, experiment and scale-300 at batch 1 in bf16-mixed: step time, peak memory,
                  MFU against the bf16 matmul peak; targets: scale-300 step < 5 s in < 24 GB

It prints one table and writes one JSON (`--json`) with every figure, the machine, the date and the
code version, rewritten after every part, so a check stopped from outside keeps what it found.
`--device cpu --quick` runs the CI-sized version of every part a CPU can run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from model import EnergyLattice, lattice_loss, preset
from model.config import ConfigError

from ..data.datasets import PairDataset, Split, load_dataset
from ..faults import Faults
from ..observe.trackers import Tracker

GiB = 2**30
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
# Per-step training loss of a run resumed from a checkpoint against the uninterrupted run, with
# TrainConfig.deterministic on. On the CPU the two are bit-identical; on CUDA deterministic kernels
# make them so too, and the margin only covers cuBLAS picking another kernel for a differently
# aligned buffer. Without deterministic mode, CUDA's atomic adds drift far past it (reported).
RESUME_TOLERANCE = 1e-5
# fp32 gradients with and without activation checkpointing: the largest difference, relative to
# the parameter's largest gradient. Autograd sums the steps' contributions to the shared carrier
# weights in another order when steps are recomputed, and CUDA's index_add adds atomically.
CHECKPOINT_GRAD_TOLERANCE = 1e-4
PLANNER_BUDGET = 22 * GiB
TARGET_STEP_S, TARGET_MEMORY_GB = 5.0, 24.0  # scale-300 at batch 1 on one GPU
# Seconds each part may take on a GPU; together under 8 minutes with the start-up.
TIME_LIMITS_S = {"precision": 45, "host_syncs": 25, "train_resume": 75, "ddp": 90, "planner": 150, "bench": 95}
PARTS = tuple(TIME_LIMITS_S)
# --quick on a CPU takes seconds per part; its limits only stop a hang, on a machine that may be busy.
QUICK_TIME_LIMIT_S = 300


class SkipPart(Exception):
    """This part cannot run here; the message says why."""


class PartTimeout(Exception):
    pass


@dataclass
class PartResult:
    name: str
    status: str                 # pass | fail | skip | error | timeout
    seconds: float
    cpu_seconds: float          # this process and the subprocesses it waited for
    summary: str                # one line for the table
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckEnv:
    device: torch.device
    quick: bool
    data: PairDataset
    workdir: Path
    deadline: float = 0.0       # time.monotonic() when the running part's limit ends
    one_worker_data: PairDataset | None = None  # `data` with its baselines, computed once for every run

    def seconds_left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())


# ------------------------------------------------------------------------------------------------
# Data: the corpus's embeddings, or synthetic pairs that need no teacher

def synthetic_pairs(rows: int = 1200, dim: int = 384, seed: int = 0) -> PairDataset:
    """Unit vectors and a fixed noisy linear map of them: learnable, and no teacher is needed."""
    g = torch.Generator().manual_seed(seed)
    inputs = F.normalize(torch.randn(rows, dim, generator=g), dim=-1)
    targets = F.normalize(inputs @ (torch.randn(dim, dim, generator=g) / dim ** 0.5) + 0.5 * inputs, dim=-1)
    texts_in = [f"input {i}" for i in range(rows)]
    texts_out = [f"target {i} " + " ".join(f"w{(i * k) % 97}" for k in range(1, 6)) for i in range(rows)]
    cut = rows * 9 // 10

    def split(rows_: slice) -> Split:
        return Split(texts_in[rows_], texts_out[rows_], np.ascontiguousarray(inputs[rows_].numpy()),
                     np.ascontiguousarray(targets[rows_].numpy()))
    return PairDataset(train=split(slice(0, cut)), val=split(slice(cut, rows)), teacher="synthetic", embed_dim=dim)


def check_data(path: str | None, quick: bool) -> PairDataset:
    if path is None:
        return synthetic_pairs(rows=600 if quick else 2000)
    return load_dataset(path, embed_dim=384, max_rows=600 if quick else 2000)


# ------------------------------------------------------------------------------------------------
# Part 1: precision x checkpointing x saved state

def _watch_step_dtypes(model: EnergyLattice, seen: dict[str, torch.dtype]) -> bool:
    """Record the dtypes the dense step hands to the flow processor (metadata only: no sync).

    EnergyLattice.forward looks `_step` up on the instance, so a wrapper set there sees every step.
    Returns False where the model has no such hook (then only the planes' dtype is checked)."""
    step = getattr(model, "_step", None)
    if step is None:
        return False

    def watched(pos, energy, hidden, context):
        new_hidden, new_energy, move, split, message = step(pos, energy, hidden, context)
        seen.update(hidden=new_hidden.dtype, energy=new_energy.dtype, move=move.dtype)
        if split is not None:
            seen.update(split=split.dtype)
        return new_hidden, new_energy, move, split, message
    model._step = watched
    return True


def _unit_batch(batch: int, dim: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    y = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return x.to(device), y.to(device)


def part_precision(env: CheckEnv, figures: dict[str, Any]) -> tuple[bool, str]:
    # Deterministic kernels, so the fp32 gradients with and without checkpointing are compared
    # without CUDA's atomic adds reordering the splat sums (that drift measured 3.3e-4 on debug).
    from ..train import use_deterministic_algorithms
    use_deterministic_algorithms()
    try:
        return _precision_cases(env, figures)
    finally:
        torch.use_deterministic_algorithms(False)


def _precision_cases(env: CheckEnv, figures: dict[str, Any]) -> tuple[bool, str]:
    presets, batch = (("smoke",), 1) if env.quick else (("smoke", "debug"), 4)
    cases, problems, worst_grad_gap = [], [], 0.0
    figures.update(cases=cases, problems=problems, grad_tolerance=CHECKPOINT_GRAD_TOLERANCE)
    for name in presets:
        for saved in ("fp32", "bf16"):
            fp32_grads: dict[bool, dict[str, torch.Tensor]] = {}
            for precision in PRECISIONS:
                for checkpointing in (False, True):
                    cfg = preset(name, precision=precision, activation_checkpointing=checkpointing,
                                 saved_state_dtype=saved)
                    torch.manual_seed(0)
                    model = EnergyLattice(cfg).to(env.device).train()
                    seen: dict[str, torch.dtype] = {}
                    observable = _watch_step_dtypes(model, seen)
                    x, y = _unit_batch(batch, cfg.embed_dim, env.device, seed=1)
                    torch.manual_seed(2)  # the same flow noise for every variant
                    out = model(x)
                    loss = lattice_loss(out, y, model.cfg)
                    loss.backward()
                    label = f"{name} {precision} ckpt={'on' if checkpointing else 'off'} state={saved}"
                    wrong = {k: str(v) for k, v in {"planes": out.planes.dtype, **seen}.items()
                             if k != "hidden" and v != torch.float32}
                    want_hidden = torch.bfloat16 if saved == "bf16" else torch.float32
                    if observable and seen.get("hidden") != want_hidden:
                        wrong["hidden"] = str(seen.get("hidden"))
                    missing = [n for n, p in model.named_parameters() if p.grad is None]
                    bad = [n for n, p in model.named_parameters() if p.grad is not None
                           and not bool(torch.isfinite(p.grad).all())]
                    for what, items in (("dtypes", wrong), ("no gradient", missing), ("non-finite gradient", bad)):
                        if items:
                            problems.append(f"{label}: {what} {items}")
                    cases.append({"case": label, "loss": float(loss),
                                  "steps_used": out.stats.steps_used, "step_dtypes_observed": observable,
                                  **{f"{k}_dtype": str(v) for k, v in seen.items()}})
                    if precision == "fp32":
                        fp32_grads[checkpointing] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}
                    del model, out, loss
            for param, plain in fp32_grads[False].items():
                recomputed = fp32_grads[True].get(param)
                if recomputed is None:
                    continue
                gap = float((plain - recomputed).abs().max() / plain.abs().max().clamp(min=1e-30))
                worst_grad_gap = max(worst_grad_gap, gap)
                if gap > CHECKPOINT_GRAD_TOLERANCE:
                    problems.append(f"{name} state={saved}: fp32 gradient of {param} differs with checkpointing "
                                    f"(relative gap {gap:.2e} > {CHECKPOINT_GRAD_TOLERANCE:g})")
    figures["fp32_checkpointing_grad_gap"] = worst_grad_gap
    observed = all(c["step_dtypes_observed"] for c in cases)
    summary = (f"{len(cases)} cases fwd+bwd; checkpointing fp32 grad gap {worst_grad_gap:.1e}"
               + ("" if observed else "; energy/move dtypes not observable (no EnergyLattice._step)")
               + (f"; {problems[0]}" if problems else ""))
    return not problems, summary


# ------------------------------------------------------------------------------------------------
# Part 2: host syncs per forward

def count_host_syncs(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn's result, host syncs it made): CUDA's sync debug mode warns once per synchronizing call."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


def part_host_syncs(env: CheckEnv, figures: dict[str, Any]) -> tuple[bool, str]:
    if env.device.type != "cuda":
        raise SkipPart("host syncs are counted with torch.cuda.set_sync_debug_mode, which only CUDA has")
    rows, problems = [], []
    figures.update(forwards=rows, problems=problems)
    for name in ("smoke", "debug"):
        for precision in ("fp32", "bf16-mixed"):
            full = preset(name, precision=precision).resolved()
            torch.manual_seed(0)
            model = EnergyLattice(full).to(env.device).train()
            x, _ = _unit_batch(4, full.embed_dim, env.device, seed=1)
            model(x)  # first use: cuBLAS handles, autocast caches
            extras = []
            # Two forced lengths separate the syncs of the step loop from the ones outside it.
            for steps in (max(1, full.max_steps // 2), full.max_steps):
                forced = EnergyLattice(dataclasses.replace(full, min_steps=steps, max_steps=steps)).to(env.device)
                forced.load_state_dict(model.state_dict())
                torch.manual_seed(2)
                out, syncs = count_host_syncs(lambda: forced(x))
                extras.append(syncs - out.stats.steps_used)
                rows.append({"preset": name, "precision": precision, "steps_used": out.stats.steps_used,
                             "host_syncs": syncs})
            # One sync per flow step (its sizes and stopping rule) is the design; one outside the
            # loop is allowed for the step limits' host-to-device copy.
            if extras[0] != extras[1] or not 0 <= extras[0] <= 1:
                problems.append(f"{name} {precision}: {rows[-2]['host_syncs']} and {rows[-1]['host_syncs']} syncs "
                                f"for {rows[-2]['steps_used']} and {rows[-1]['steps_used']} steps")
    extra = rows[0]["host_syncs"] - rows[0]["steps_used"]
    summary = f"syncs per forward = steps used + {extra} outside the loop" + (f"; {problems[0]}" if problems else "")
    return not problems, summary


# ------------------------------------------------------------------------------------------------
# Part 3: train_loop on the device: resume, precision change, divergence

class LossRecorder(Tracker):
    """Keeps only each step's training loss; it takes no artifacts, so train_loop makes no plots."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def log_metrics(self, metrics, step):
        if "loss" in metrics:
            self.losses[step] = metrics["loss"]


def _train_run(env: CheckEnv, name: str, precision: str, *, resume_from: Path | None = None,
               faults: Faults | None = None, **overrides: Any) -> tuple[dict[str, Any], dict[int, float], Path]:
    from ..config import make_config
    from ..context import LocalContext
    from ..run_data import worker_shards
    from ..train import train_loop

    settings = {"device": env.device.type, "batch_size": 4 if env.quick else 16,
                "val_max_samples": 16 if env.quick else 64, "warmup_steps": 2, "log_every": 1, "val_every": 4,
                "checkpoint_every": 4, "decode_every": 4, "decode_examples": 2, "max_steps": 8,
                "deterministic": True, "model.precision": precision, **overrides}
    cfg = make_config("smoke" if env.quick else "debug", settings)
    if env.one_worker_data is None:
        (env.one_worker_data,) = worker_shards(env.data, 1, cfg.val_max_samples)
    out = env.workdir / "train" / name
    recorder = LossRecorder()
    try:
        summary = train_loop(cfg, LocalContext(out, resume_from=resume_from, faults=faults), recorder,
                             data=env.one_worker_data)
    finally:
        torch.use_deterministic_algorithms(False)
    return summary, recorder.losses, out


def _loss_gap(straight: dict[int, float], resumed: dict[int, float]) -> float:
    return max((abs(straight[s] - resumed[s]) for s in resumed if s in straight), default=float("inf"))


def _weights_moved(before: Path, after: Path) -> float:
    """The largest change of any model weight between two checkpoints: 0 means no update was applied
    between them (an fp16 GradScaler that skipped every step, say), so equal losses prove nothing."""
    from ..checkpoint import load_checkpoint
    a, b = load_checkpoint(before)["model"], load_checkpoint(after)["model"]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def _check_cuda_rng_restore(problems: list[str]) -> dict[str, Any]:
    """A rank's CUDA RNG state goes back onto the GPU the rank trains on after a restart, which may
    be another GPU than the one that saved it (with two GPUs here, it is restored onto the other)."""
    from ..train import _rng_state, _set_rng_state
    saved_on = torch.device("cuda", torch.cuda.current_device())
    saved = _rng_state(saved_on)
    torch.rand(4, device=saved_on)  # the generator moves on, as training would
    others = [torch.device("cuda", i) for i in range(torch.cuda.device_count()) if i != saved_on.index]
    restored_on = others[0] if others else saved_on
    left_alone = torch.cuda.get_rng_state(saved_on) if others else None
    _set_rng_state(saved, restored_on)
    ok = torch.equal(torch.cuda.get_rng_state(restored_on), saved["cuda"]) and (
        left_alone is None or torch.equal(torch.cuda.get_rng_state(saved_on), left_alone))
    if not ok:
        problems.append(f"CUDA RNG state saved on {saved_on} was not restored onto {restored_on} alone")
    return {"saved_on": str(saved_on), "restored_on": str(restored_on), "ok": ok}


def part_train_resume(env: CheckEnv, figures: dict[str, Any]) -> tuple[bool, str]:
    problems: list[str] = []
    figures.update(tolerance=RESUME_TOLERANCE, deterministic=True, problems=problems)
    middle, final = Path("checkpoints") / "step_00000004", Path("checkpoints") / "step_00000008"
    # CI-sized: fp16's own resume is left to the GPU; the fp16 run resumed from bf16 below still runs.
    for precision in ("bf16-mixed",) if env.quick else ("bf16-mixed", "fp16-mixed"):
        short = precision.split("-")[0]
        straight, straight_losses, straight_out = _train_run(env, f"{short}-straight", precision)
        resumed, resumed_losses, resumed_out = _train_run(env, f"{short}-resumed", precision,
                                                          resume_from=straight_out / middle)
        gap = _loss_gap(straight_losses, resumed_losses)
        figures[short] = {"status": straight["status"], "resumed_status": resumed["status"],
                          "losses": straight_losses, "resumed_losses": resumed_losses, "max_loss_gap": gap}
        if straight["status"] != "completed" or resumed["status"] != "completed":
            problems.append(f"{short}: status {straight['status']} / resumed {resumed['status']}")
            continue
        if sorted(resumed_losses) != [5, 6, 7, 8] or gap > RESUME_TOLERANCE:
            problems.append(f"{short}: resumed losses differ by {gap:.2e} (tolerance {RESUME_TOLERANCE:g})")
        # Equal losses prove an exact resume only if the steps after the checkpoint changed the weights.
        moved = _weights_moved(straight_out / middle, resumed_out / final)
        figures[short]["weights_moved_after_resume"] = moved
        if moved == 0:
            problems.append(f"{short}: no update was applied in steps 5-8 after the resume (weights unchanged)")

    bf16_middle = env.workdir / "train" / "bf16-straight" / middle
    changed, _, changed_out = _train_run(env, "fp16-from-bf16", "fp16-mixed", resume_from=bf16_middle)
    figures["fp16_resumed_from_bf16"] = changed["status"]
    if changed["status"] != "completed":
        problems.append(f"fp16 resumed from a bf16 checkpoint ended {changed['status']}")
    else:  # the fresh loss scale may skip the first steps; by step 8 an update must have gone through
        figures["fp16_from_bf16_weights_moved"] = _weights_moved(bf16_middle, changed_out / final)
        if figures["fp16_from_bf16_weights_moved"] == 0:
            problems.append("fp16 resumed from a bf16 checkpoint applied no update in steps 5-8")

    diverged, _, _ = _train_run(env, "nan", "bf16-mixed", max_steps=6, faults=Faults(nan_loss_at_step=3))
    figures["nan_injection"] = {"status": diverged["status"], "steps": diverged["steps"]}
    if diverged["status"] != "diverged" or diverged["steps"] != 2:
        problems.append(f"NaN at step 3 ended {diverged['status']} after {diverged['steps']} steps")

    if env.device.type == "cuda":
        figures["cuda_rng_restore"] = _check_cuda_rng_restore(problems)

    if env.device.type == "cuda":  # what deterministic mode buys: the drift without it (not judged)
        _, loose_losses, loose_out = _train_run(env, "bf16-loose", "bf16-mixed", deterministic=False)
        _, loose_resumed, _ = _train_run(env, "bf16-loose-resumed", "bf16-mixed", deterministic=False,
                                         resume_from=loose_out / middle)
        figures["nondeterministic_max_loss_gap"] = _loss_gap(loose_losses, loose_resumed)

    gaps = ", ".join(f"{p} resume gap {figures[p]['max_loss_gap']:.1e}" for p in ("bf16", "fp16") if p in figures)
    summary = (f"{gaps} (tol {RESUME_TOLERANCE:g}); fp16<-bf16 {changed['status']}; NaN -> {diverged['status']}"
               + (f"; without deterministic mode {figures['nondeterministic_max_loss_gap']:.1e}"
                  if "nondeterministic_max_loss_gap" in figures else "")
               + (f"; {problems[0]}" if problems else ""))
    return not problems, summary


# ------------------------------------------------------------------------------------------------
# Part 4: DDP as Ray Train runs it: NCCL on GPUs, gloo on the CPU

DDP_STEPS = 3


def _ddp_config(device_type: str) -> dict[str, Any]:
    from ..config import make_config
    precision = "bf16-mixed" if device_type == "cuda" else "fp32"
    cfg = make_config("smoke", {"device": device_type, "batch_size": 8, "val_max_samples": 16, "warmup_steps": 1,
                                "log_every": 1, "val_every": DDP_STEPS, "checkpoint_every": DDP_STEPS,
                                "decode_examples": 0, "max_steps": DDP_STEPS, "model.precision": precision,
                                "model.activation_checkpointing": True, "model.saved_state_dtype": "bf16"})
    return dataclasses.asdict(cfg)


def ddp_runs(device_type: str, gpus: int) -> list[tuple[str, int, bool]]:
    """The DDP runs the part makes: (backend, ranks, one GPU per rank).

    Ray Train's workers on GPUs talk over NCCL, one GPU each; that is the run to make where there
    are two GPUs. NCCL refuses two ranks on one GPU, so on a one-GPU machine NCCL runs in a one-rank
    group (its communicator, an all_reduce and DDP's NCCL reducer), and two ranks sharing the GPU
    over gloo check that the ranks stay identical. On the CPU: gloo, as Ray Train uses there."""
    if device_type != "cuda":
        return [("gloo", 2, False)]
    if gpus >= 2:
        return [("nccl", 2, True)]
    return [("nccl", 1, True), ("gloo", 2, False)]


def _ddp_worker(rank: int, world_size: int, rendezvous: str, device_type: str, backend: str, gpu_per_rank: bool,
                config: dict[str, Any], shards: list[PairDataset], out_dir: str) -> None:
    """One rank: train_loop with DDP wrapped as Ray Train wraps it, then its parameters to a file."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ..context import RunContext
    from ..train import train_loop

    torch.set_num_threads(1)
    device = torch.device("cuda", rank if gpu_per_rank else 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds each rank to the current device
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)

    class SpawnContext(RunContext):
        model = None

        def device(self, requested):
            return device

        def wrap_model(self, model):
            self.model = model
            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    ctx = SpawnContext()
    ctx.rank, ctx.world_size = rank, world_size
    try:
        reduced = torch.full((1,), float(rank + 1), device=device)
        dist.all_reduce(reduced)  # a collective of the backend itself, besides DDP's gradient all_reduce
        summary = train_loop(config, ctx, None, data=shards[rank])
        params = torch.cat([p.detach().float().cpu().reshape(-1) for p in ctx.model.parameters()])
        torch.save({"params": params, "status": summary["status"], "steps": summary["steps"],
                    "all_reduce": float(reduced.item())}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_run(env: CheckEnv, backend: str, world_size: int, gpu_per_rank: bool, out: Path) -> dict[str, Any]:
    """One DDP run of DDP_STEPS steps; what each rank ended with."""
    import torch.multiprocessing as mp

    from ..config import config_from_dict
    from ..run_data import worker_shards

    out.mkdir(parents=True, exist_ok=True)
    config = _ddp_config(env.device.type)
    shards = worker_shards(env.data, world_size, config["val_max_samples"])
    processes = mp.spawn(_ddp_worker, args=(world_size, str(out / "rendezvous"), env.device.type, backend,
                                            gpu_per_rank, config, shards, str(out)), nprocs=world_size, join=False)
    try:
        while not processes.join(timeout=1):  # short waits, so the part's time limit can interrupt
            pass
    except mp.ProcessRaisedException as e:  # its message is the rank's whole traceback: keep the error
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise RuntimeError(f"a DDP rank ({backend}) failed: {lines[-1] if lines else e}") from None
    finally:
        for p in processes.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    torch.manual_seed(config_from_dict(config).seed)
    initial = torch.cat([p.detach().reshape(-1) for p in EnergyLattice(config_from_dict(config).model).parameters()])
    gap = max(float((r["params"] - ranks[0]["params"]).abs().max()) for r in ranks)
    moved = float((ranks[0]["params"] - initial).abs().max())
    expected_sum = world_size * (world_size + 1) / 2
    run = {"backend": backend, "ranks": world_size, "gpu_per_rank": gpu_per_rank,
           "statuses": [r["status"] for r in ranks], "steps": [r["steps"] for r in ranks],
           "identical_parameters": gap == 0, "max_rank_difference": gap, "max_change_from_init": moved,
           "all_reduce_correct": all(r["all_reduce"] == expected_sum for r in ranks)}
    run["ok"] = (run["identical_parameters"] and moved > 0 and run["all_reduce_correct"]
                 and all(r["status"] == "completed" and r["steps"] == DDP_STEPS for r in ranks))
    return run


def part_ddp(env: CheckEnv, figures: dict[str, Any]) -> tuple[bool, str]:
    gpus = torch.cuda.device_count() if env.device.type == "cuda" else 0
    runs: list[dict[str, Any]] = []
    figures.update(gpus=gpus, runs=runs)
    for backend, world_size, gpu_per_rank in ddp_runs(env.device.type, gpus):
        runs.append(_ddp_run(env, backend, world_size, gpu_per_rank, env.workdir / f"ddp-{backend}-{world_size}"))
    if runs and runs[-1]["ranks"] > 1:  # the figures the two-rank check is read by
        figures.update(identical_parameters=runs[-1]["identical_parameters"],
                       max_change_from_init=runs[-1]["max_change_from_init"])
    summary = "; ".join(
        f"{r['backend']} {r['ranks']} rank{'s' if r['ranks'] > 1 else ''}"
        f"{' (one GPU each)' if r['gpu_per_rank'] and r['ranks'] > 1 else ''}, {DDP_STEPS} steps: "
        + ("parameters " + ("identical" if r["identical_parameters"] else "DIFFER")
           + f" (rank gap {r['max_rank_difference']:.1e}), " if r["ranks"] > 1 else "")
        + f"moved {r['max_change_from_init']:.1e} from init, all_reduce {'ok' if r['all_reduce_correct'] else 'WRONG'}"
        for r in runs)
    return all(r["ok"] for r in runs), summary


# ------------------------------------------------------------------------------------------------
# Part 5: planner against the allocator

def part_planner(env: CheckEnv, figures: dict[str, Any]) -> tuple[bool, str]:
    from ..memory import EXPANDABLE_SEGMENTS
    from ..planner import plan_batch
    from .memory_measure import measure_peak_bytes

    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    figures.update(budget_gib=PLANNER_BUDGET / GiB, measurements=rows, problems=problems)
    if env.device.type != "cuda":
        cfg = preset("smoke")
        plan = plan_batch(cfg, 1 * GiB, device_type="cpu", max_batch=4)
        measured = measure_peak_bytes(cfg, plan.batch, device="cpu", live_only=True, timeout=env.seconds_left())
        rows.append({"preset": "smoke", "batch": plan.batch, "estimate_gib": plan.estimate_bytes / GiB,
                     "required_gib": plan.required_bytes / GiB, "peak_rss_gib": measured.peak_bytes / GiB})
        figures["skipped"] = "max_memory_allocated / max_memory_reserved and expandable segments need CUDA"
        return measured.peak_bytes <= plan.required_bytes, (
            f"smoke batch {plan.batch}: estimate {plan.estimate_bytes / GiB:.2f} GiB vs live peak RSS "
            f"{measured.peak_bytes / GiB:.2f} GiB; CUDA allocator figures skipped (CPU)")

    plans = {}
    for name in ("scale-150", "scale-300"):
        cfg = preset(name, precision="bf16-mixed", activation_checkpointing=True, saved_state_dtype="bf16")
        plans[name] = (cfg, plan_batch(cfg, PLANNER_BUDGET, device_type="cuda"))
    # Expandable segments first: that is how workers run, and what the plan must hold for.
    for alloc_conf in (EXPANDABLE_SEGMENTS, ""):
        for name, (cfg, plan) in plans.items():
            row: dict[str, Any] = {"preset": name, "batch": plan.batch, "alloc_conf": alloc_conf or "(torch default)",
                                   "estimate_gib": plan.estimate_bytes / GiB, "required_gib": plan.required_bytes / GiB}
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()  # this process's cache would shrink what the subprocess can have
            try:
                m = measure_peak_bytes(cfg, plan.batch, device="cuda", alloc_conf=alloc_conf,
                                       timeout=env.seconds_left())
            except RuntimeError as e:  # e.g. out of memory at the planned batch: a finding, not a crash
                row["error"] = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                problems.append(f"{name} batch {plan.batch} ({row['alloc_conf']}): {row['error']}")
                continue
            row.update(allocator_settings=m.allocator_settings, max_allocated_gib=m.peak_bytes / GiB,
                       max_reserved_gib=m.reserved_bytes / GiB,
                       estimate_over_allocated=plan.estimate_bytes / m.peak_bytes,
                       reserved_over_allocated=m.reserved_bytes / m.peak_bytes, steps_used=m.steps_used,
                       flow_steps_per_sample=m.flow_steps_per_sample)
            if alloc_conf and m.reserved_bytes > PLANNER_BUDGET:
                problems.append(f"{name} batch {plan.batch}: reserved {row['max_reserved_gib']:.1f} GiB, over the "
                                f"{PLANNER_BUDGET / GiB:.0f} GiB budget")
    summary = "; ".join(
        f"{r['preset']} b{r['batch']} {'expandable' if r['alloc_conf'] == EXPANDABLE_SEGMENTS else 'default'}: "
        + (f"est {r['estimate_gib']:.1f} / alloc {r['max_allocated_gib']:.1f} / resv {r['max_reserved_gib']:.1f} GiB"
           if "error" not in r else "failed") for r in rows)
    return not problems, summary + (f"; {problems[0]}" if problems else "")


# ------------------------------------------------------------------------------------------------
# Part 6: bench on the device

def part_bench(env: CheckEnv, figures: dict[str, Any]) -> tuple[bool, str]:
    from .bench import bench_preset, matmul_peak

    presets, batch, repeats = (("smoke",), 2, 1) if env.quick else (("debug", "experiment", "scale-300"), 1, 3)
    peak = matmul_peak(env.device, torch.bfloat16, max_size=256 if env.quick else None,
                       repeats=2 if env.quick else None)
    results: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    figures.update(bf16_peak=dataclasses.asdict(peak), presets=results, problems=problems)
    for name in presets:
        gc.collect()
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        f = bench_preset(name, batch, env.device, env.data, repeats=repeats, overrides={"precision": "bf16-mixed"},
                         peak=peak)
        results[name] = f
        if f["mfu_train"] is None:
            problems.append(f"{name}: MFU unknown, {f['mfu_unknown_why']}")
        elif f["matmul_peak_dtype"] != "bfloat16" or not (0 < f["mfu_forward"] <= 1 and 0 < f["mfu_train"] <= 1):
            problems.append(f"{name}: MFU {f['mfu_forward']:.2f} / {f['mfu_train']:.2f} against a "
                            f"{f['matmul_peak_dtype']} peak")
    if "scale-300" in results:
        f = results["scale-300"]
        memory_gb = f["peak_mem_reserved_gb"] if f["peak_mem_reserved_gb"] is not None else f["peak_mem_gb"]
        f["targets"] = {"train_step_s": TARGET_STEP_S, "memory_gb": TARGET_MEMORY_GB,
                        "met": f["train_step_s"] < TARGET_STEP_S and memory_gb < TARGET_MEMORY_GB}
        if not f["targets"]["met"]:
            problems.append(f"scale-300 target missed: step {f['train_step_s']:.2f} s (< {TARGET_STEP_S:g}), "
                            f"{memory_gb:.1f} GB reserved (< {TARGET_MEMORY_GB:g})")
    summary = "; ".join(f"{n} {f['train_step_s']:.3g} s/step, {f['peak_mem_gb']:.2f} GB, MFU "
                        + (f"{f['mfu_train']:.3f}" if f["mfu_train"] is not None else "unknown")
                        for n, f in results.items()) + f" (bf16 peak {peak.gflops:.3g} GFLOP/s)"
    return not problems, summary + (f"; {problems[0]}" if problems else "")


# ------------------------------------------------------------------------------------------------
# Running the parts

PART_FUNCTIONS: dict[str, Callable[[CheckEnv, dict[str, Any]], tuple[bool, str]]] = {
    "precision": part_precision, "host_syncs": part_host_syncs, "train_resume": part_train_resume,
    "ddp": part_ddp, "planner": part_planner, "bench": part_bench}


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`; Python code and waits are interrupted."""
    def expire(signum, frame):
        raise PartTimeout(f"over its {seconds:g} s time limit")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, env: CheckEnv, limit_s: float) -> PartResult:
    start, cpu_start = time.monotonic(), _cpu_seconds()
    env.deadline = start + limit_s
    figures: dict[str, Any] = {}  # filled as the part goes, so a part that stops early keeps what it found
    try:
        with time_limit(limit_s):
            passed, summary = PART_FUNCTIONS[name](env, figures)
        status = "pass" if passed else "fail"
    except SkipPart as e:
        status, summary = "skip", str(e)
    except PartTimeout as e:
        status, summary = "timeout", str(e)
    except Exception as e:  # one broken part must not hide the others
        status, figures["traceback"] = "error", traceback.format_exc()
        summary = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        gc.collect()
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return PartResult(name, status, time.monotonic() - start, _cpu_seconds() - cpu_start, summary, figures)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_info(device: torch.device) -> dict[str, Any]:
    from .bench import machine_info as bench_machine_info
    info = {**bench_machine_info(device), "cuda_runtime": torch.version.cuda,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    return info


def run_gpu_check(device: str = "cuda", *, quick: bool = False, data_path: str | None = None,
                  parts: list[str] | None = None, workdir: str | Path | None = None,
                  progress: Callable[[str], None] = print, json_path: str | Path | None = None) -> dict[str, Any]:
    """Run the parts (all by default) and return {"machine", "device", "quick", "parts", "passed",
    "complete", ...}. With `json_path`, the result so far is written there after every part, so an
    outer time limit that stops the check keeps every part that finished ("complete": false)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device here; run with --device cpu for the CPU "
                              "version")
        # Both are read when CUDA starts, which nothing here has done yet.
        from ..memory import use_expandable_segments
        use_expandable_segments()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    data = check_data(data_path, quick)
    started = time.monotonic()
    wanted = list(parts or PARTS)
    results: list[PartResult] = []
    machine, started_at = machine_info(dev), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    from ..code_version import code_version_tags
    code = code_version_tags()  # which code these figures are of

    def report() -> dict[str, Any]:
        done = [r.name for r in results]
        return {"machine": machine, "code": code, "device": str(dev), "quick": quick, "started_at": started_at,
                "data": data_path or "synthetic unit vectors", "wall_s": time.monotonic() - started,
                "passed": all(r.status in ("pass", "skip") for r in results) and done == wanted,
                "complete": done == wanted, "parts_pending": wanted[len(done):],
                "parts": {r.name: dataclasses.asdict(r) for r in results}}

    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        env = CheckEnv(dev, quick, data, root)
        if json_path:
            write_report(json_path, report())
        for name in wanted:
            limit = QUICK_TIME_LIMIT_S if quick else TIME_LIMITS_S[name]
            progress(f"gpu-check: {name} (limit {limit} s) ...")
            result = run_part(name, env, limit)
            progress(f"gpu-check: {name} {result.status} in {result.seconds:.1f} s")
            results.append(result)
            if json_path:
                write_report(json_path, report())
    return report()


def write_report(path: str | Path, result: dict[str, Any]) -> Path:
    """The check's result as JSON, replaced whole (a reader never sees half a file)."""
    import json

    from ..files import atomic_write
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2, default=str) + "\n"))


def format_table(result: dict[str, Any]) -> str:
    parts = list(result["parts"].values())
    width = max(len(p["name"]) for p in parts)
    lines = [f"gpu-check on {result['machine'].get('gpu', result['machine'].get('cpu'))} ({result['device']}, "
             f"torch {result['machine']['torch']}): {'PASSED' if result['passed'] else 'FAILED'} in "
             f"{result['wall_s']:.0f} s",
             f"  {'part'.ljust(width)}  status   seconds  figures"]
    lines += [f"  {p['name'].ljust(width)}  {p['status'].ljust(7)}  {p['seconds']:7.1f}  {p['summary']}" for p in parts]
    return "\n".join(lines)


__all__ = ["PARTS", "RESUME_TOLERANCE", "CHECKPOINT_GRAD_TOLERANCE", "count_host_syncs", "format_table",
           "run_gpu_check", "synthetic_pairs"]
