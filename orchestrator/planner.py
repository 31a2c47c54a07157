"""Memory planner: predicts the peak memory of a training step and picks the largest batch that fits.

    estimate_peak_bytes(model_cfg, batch)          -> bytes
    plan_batch(model_cfg, budget_bytes)            -> Plan(batch, estimate_bytes, budget_bytes, ...)
    check_batch(model_cfg, batch, budget_bytes)    -> Plan, or MemoryBudgetError naming estimate and budget
    available_memory_bytes(device)                 -> what this machine (or GPU) has free now

What the estimate assumes, and why. Activation memory is set by how many flows the dense step runs
on at every step, summed over the steps (the flow-steps), and that is data-dependent twice over:
spawning adds flows (at most `max_flows_per_sample` per sample) and adaptive convergence stops early
(at most `max_steps`). A plan must hold for every batch a run will see, so by default the estimate
takes the worst case both allow: every flow spawns up to the cap right after the first step and no
flow arrives before `max_steps`, i.e. per sample

    flow_steps = S + (max_steps - 1) * max_flows_per_sample       (S = width * height)

Trained models use far fewer (bench reports the real steps used), so pass `flows_per_sample` and
`steps` where the typical case is known and the occasional bigger batch is allowed to fail.

The formula (see `_terms` for the itemised bytes and where each constant comes from):

    kept = batch * flow_steps * kept_bytes_per_flow_step     what backward keeps from every step
    peak = 16 * parameters + working                         fp32 weights, grads, AdamW's two moments
         + kept * (1 + heap_overhead) + base                 (CPU: glibc's heap holes; process RSS)
         + batch * flows_per_sample * step_bytes_per_flow    one checkpointed step recomputed

The tensor part (everything but base and heap_overhead) is what torch.cuda.max_memory_allocated
would count; on CPU it was checked against the peak RSS of processes that return every freed block
to the OS (MALLOC_MMAP_THRESHOLD_=65536): within 3-7% on debug, experiment, scale-50 and scale-150.
A training process does not do that (page faults cost too much here), so the CPU estimate adds the
process base and the heap's holes, both calibrated on this project's CPU machine (2-core AMD EPYC,
torch 2.13, glibc 2.36) with

    python -m orchestrator plan --preset P --batch B --measure

which trains MEASURE_STEPS (4) steps forced into the assumed worst case (min_steps = max_steps,
spawning switched to reach the cap at the first step) in a fresh subprocess and reads its peak RSS
(VmHWM). "Measured peak" in this module always means that number. The heap's holes are the least
predictable part: the same run measured up to 20% apart, and longer runs were seen to creep a
further 10-40% over 12 steps, so leave headroom in budgets for long CPU runs. The CUDA path is not
calibrated: no GPU was available when this was written.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig

GiB = 2**30

# Calibrated on the CPU machine described above (see the module docstring and README, Benchmarks).
CPU_BASE_BYTES = int(0.33 * GiB)   # RSS of a fresh process holding torch and the training code's libraries
WORKING_BYTES = 32 * 2**20         # allocator and autograd bookkeeping that does not grow with the model
KEPT_VALUES_PER_UNIT = 6           # per flow-step and carrier unit, without checkpointing (see _terms)
STEP_VALUES_PER_UNIT = 11          # per active flow and carrier unit: one checkpointed step recomputed
HEAP_OVERHEAD = 0.8                # glibc heap holes per byte of kept activations (CPU only; see _terms)
MEASURE_STEPS = 4                  # training steps a measurement runs; glibc's heap settles after 2-3


class MemoryBudgetError(ValueError):
    """A config and batch whose estimated peak memory exceeds the budget; the message names both."""


@dataclass(frozen=True)
class Plan:
    batch: int
    estimate_bytes: int
    budget_bytes: int
    device_type: str
    flows_per_sample: int   # the flow count the estimate assumed (default: the cap)
    steps: int              # the flow steps the estimate assumed (default: max_steps)

    def describe(self) -> str:
        return (f"batch {self.batch}: estimated peak {self.estimate_bytes / GiB:.2f} GiB of a "
                f"{self.budget_bytes / GiB:.2f} GiB budget ({self.device_type}; assumes "
                f"{self.flows_per_sample} flows per sample for {self.steps} flow steps)")


def _dtype_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(bytes of a carrier activation, bytes of the carried state)."""
    compute = 4 if cfg.precision == "fp32" else 2
    return compute, 2 if cfg.saved_state_dtype == "bf16" else 4


def _carrier_parameters(cfg: ModelConfig) -> int:
    hc, inputs = cfg.carrier_hidden, cfg.neuron_features + 1
    gru = sum(3 * hc * ((inputs if layer == 0 else hc) + hc) + 6 * hc for layer in range(cfg.carrier_layers))
    return gru + 4 * hc + 4


def _parameters(cfg: ModelConfig) -> int:
    """Parameter count of EnergyLattice(cfg), from the config alone (no model is built)."""
    mapper = cfg.embed_dim * cfg.mapper_rank + cfg.mapper_rank * (1 + cfg.height + cfg.width) + cfg.surface
    neuron = 5 * cfg.neuron_hidden + (cfg.neuron_hidden + 1) * cfg.neuron_features
    collector = 2 * cfg.mapper_rank * (cfg.height + cfg.width) + 4 * cfg.mapper_rank + \
        (2 * cfg.mapper_rank + 1) * cfg.embed_dim
    return mapper + neuron + _carrier_parameters(cfg) + collector


def _terms(cfg: ModelConfig) -> dict[str, int]:
    """Bytes per flow-step that backward keeps, and bytes per active flow of one step's working set.

    Without checkpointing, autograd keeps 5.75 values per carrier unit per flow-step (counted with
    saved_tensors_hooks: StepGRU's r/z gates (2), n gate, state-side n pre-activation, layer
    output, and the stacked state); with backward's own working memory the measured peak comes to 6.
    The state is stored in `saved_state_dtype`, the rest in the autocast dtype. With checkpointing
    only the step's inputs are kept (the state, position, energy, gather index), and backward
    recomputes one step at a time: its activations and their gradients, 11 values per unit.

    On CPU, glibc's heap keeps the holes that freed temporaries leave between kept activations:
    peak RSS over the kept bytes measured 1.3x-2.4x, median 1.8x (HEAP_OVERHEAD = 0.8).
    """
    compute, state = _dtype_bytes(cfg)
    units = cfg.carrier_hidden * cfg.carrier_layers
    # Per flow outside the carrier: the neuron's input, hidden layers and features, position,
    # move, energy, path and the flow processor's masks and indices.
    small = 4 * (2 * cfg.neuron_hidden + 2 * cfg.neuron_features + 40)
    if cfg.activation_checkpointing:
        kept, step = state * units + 4 * (3 + 1) + 8, 4 * STEP_VALUES_PER_UNIT * units + small
    else:
        kept, step = compute * (KEPT_VALUES_PER_UNIT - 1) * units + state * units + small, 0
    return {"kept_per_flow_step": kept, "step_per_flow": step}


def _load(cfg: ModelConfig, flows_per_sample: int | None, steps: int | None) -> tuple[int, int, int]:
    """(flows per sample, steps, flow-steps per sample) the estimate assumes; see the module docstring."""
    flows = flows_per_sample or cfg.max_flows_per_sample
    steps = steps or cfg.max_steps
    if not cfg.surface <= flows <= cfg.max_flows_per_sample:
        raise ValueError(f"flows_per_sample={flows} must lie in [{cfg.surface}, {cfg.max_flows_per_sample}] "
                         f"(width x height .. max_flows_per_sample)")
    if not 1 <= steps <= cfg.max_steps:
        raise ValueError(f"steps={steps} must lie in [1, {cfg.max_steps}] (max_steps)")
    return flows, steps, cfg.surface + (steps - 1) * flows


def estimate_peak_bytes(model_cfg: ModelConfig, batch: int, *, device_type: str = "cpu",
                        flows_per_sample: int | None = None, steps: int | None = None) -> int:
    """Predicted peak memory of training: peak RSS on CPU, max_memory_allocated on CUDA.

    Defaults assume the worst case the config allows (see the module docstring)."""
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    cfg = model_cfg.resolved()
    flows, steps, flow_steps = _load(cfg, flows_per_sample, steps)
    terms = _terms(cfg)
    kept = batch * flow_steps * terms["kept_per_flow_step"]
    if cfg.precision != "fp32":  # autocast's low-precision copy of the carrier weights, per step
        kept += 2 * _carrier_parameters(cfg) * (1 if cfg.activation_checkpointing else steps)
    fixed = 16 * _parameters(cfg) + WORKING_BYTES  # fp32 weights, grads and AdamW's two moments
    if device_type == "cpu":
        fixed += CPU_BASE_BYTES
        kept *= 1 + HEAP_OVERHEAD
    return int(fixed + kept + batch * flows * terms["step_per_flow"])


def check_batch(model_cfg: ModelConfig, batch: int, budget_bytes: int, *, device_type: str = "cpu",
                flows_per_sample: int | None = None, steps: int | None = None) -> Plan:
    """The plan for this batch, or MemoryBudgetError when its estimate exceeds the budget."""
    cfg = model_cfg.resolved()
    flows, steps, _ = _load(cfg, flows_per_sample, steps)
    estimate = estimate_peak_bytes(cfg, batch, device_type=device_type, flows_per_sample=flows, steps=steps)
    plan = Plan(batch, estimate, int(budget_bytes), device_type, flows, steps)
    if estimate > budget_bytes:
        raise MemoryBudgetError(
            f"{cfg.width}x{cfg.height}x{cfg.depth} (carrier {cfg.carrier_hidden}x{cfg.carrier_layers}) at "
            f"batch {batch} needs an estimated {estimate / GiB:.2f} GiB, over the budget of "
            f"{budget_bytes / GiB:.2f} GiB ({device_type}; assumes {flows} flows per sample for {steps} "
            f"flow steps; activation_checkpointing and saved_state_dtype=bf16 cut it)")
    return plan


def plan_batch(model_cfg: ModelConfig, budget_bytes: int, *, device_type: str = "cpu", max_batch: int = 4096,
               flows_per_sample: int | None = None, steps: int | None = None) -> Plan:
    """The largest batch in [1, max_batch] whose estimated peak fits the budget.

    Raises MemoryBudgetError (naming estimate and budget) when not even batch 1 fits."""
    kwargs = dict(device_type=device_type, flows_per_sample=flows_per_sample, steps=steps)
    check_batch(model_cfg, 1, budget_bytes, **kwargs)
    lo, hi = 1, max_batch  # the estimate grows with the batch: bisect for the last batch that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_peak_bytes(model_cfg, mid, **kwargs) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return check_batch(model_cfg, lo, budget_bytes, **kwargs)


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory a new training step could use now: free GPU memory, or on CPU MemAvailable (capped by
    the cgroup limit where one is set)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_bytes("MemAvailable")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(available)


def _meminfo_bytes(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ------------------------------------------------------------------------------------------------
# Process memory: what the planner is calibrated against, and what bench reports.

def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory counter again from what is in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # hand freed heap back first, so the peak starts from live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset: max_memory_allocated on CUDA, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------
# Measurement: one training step forced into the case the estimate assumes, in a fresh process.

def worst_case_config(cfg: ModelConfig) -> ModelConfig:
    """The config with its data-dependent choices forced to the estimate's default worst case:
    no early stop, and every flow spawning right away until its sample reaches the cap.

    An untrained carrier moves flows far too slowly to reach a plane in max_steps, so none arrive."""
    cfg = cfg.resolved()
    children = math.ceil(cfg.max_flows_per_sample / cfg.surface) - 1
    return dataclasses.replace(cfg, min_steps=cfg.max_steps, spawn_threshold=1e-6,
                               max_spawn_per_step=min(64, children)).resolved()


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    flow_steps_per_sample: float   # what the measured step actually ran
    steps_used: int


def measure_peak_bytes(model_cfg: ModelConfig, batch: int, *, device: str = "cpu", timeout: float = 1800) -> Measurement:
    """Measured peak of training `worst_case_config(model_cfg)`: the peak RSS (CPU) or
    max_memory_allocated (CUDA) of a fresh subprocess over MEASURE_STEPS training steps (from the
    second on, AdamW's state is allocated and the heap's holes are there, as in every later step)."""
    spec = json.dumps({"model": dataclasses.asdict(model_cfg), "batch": batch, "device": device})
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "orchestrator.planner", spec], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {result.stderr.strip()[-2000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    from model import EnergyLattice, lattice_loss
    from model.config import from_dict

    import orchestrator.train  # noqa: F401  (hold what a training process holds: data and metric libraries)

    device = torch.device(spec["device"])
    cfg = worst_case_config(from_dict(ModelConfig, spec["model"]))
    torch.manual_seed(0)
    model = EnergyLattice(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.nn.functional.normalize(torch.randn(spec["batch"], cfg.embed_dim, device=device), dim=-1)
    for _ in range(MEASURE_STEPS):
        out = model(x)
        lattice_loss(out, x.flip(0), model.cfg).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_bytes": peak_memory_bytes(device), "steps_used": out.stats.steps_used,
            "flow_steps_per_sample": sum(out.stats.active_per_step) / spec["batch"]}


if __name__ == "__main__":  # the measuring subprocess of measure_peak_bytes
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
