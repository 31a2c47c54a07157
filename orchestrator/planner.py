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

    peak = 16 * parameters + working                          fp32 weights, grads, AdamW's two moments
         + batch * flow_steps * kept_bytes_per_flow_step      what backward keeps from every step
         + batch * flows_per_sample * step_bytes_per_flow     one checkpointed step, recomputed
         + base                                               CPU only: the process (torch, libraries)

It predicts the memory a training step needs: on CUDA what torch.cuda.max_memory_allocated counts;
on CPU the peak RSS of a process whose allocator hands freed memory straight back. "Measured peak"
means exactly that here:

    python -m orchestrator plan --preset P --batch B --measure

trains MEASURE_STEPS steps forced into the assumed worst case (min_steps = max_steps, spawning
switched to reach the cap at the first step) in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536,
so glibc returns every freed block to the OS and RSS follows live memory, and reads its peak RSS
(VmHWM). Calibrated on this project's CPU machine (2-core AMD EPYC, torch 2.13, glibc 2.36), the
estimate is 3-7% above it on debug, experiment, scale-50 and scale-150 (README, Benchmarks).

A real CPU training process keeps freed memory in glibc's heap for reuse (returning it costs a page
fault per 4 KiB, which here made training 1.8x slower), and the heap's holes come on top: the same
worst-case runs under default glibc settings measured 1.3x-2.5x the live peak, in clusters that
moved with address-space randomisation. So plans leave that room: a batch fits when its
`required_bytes` = base + (estimate - base) * (1 + headroom) is within the budget, with headroom 1.7
on CPU (the worst ratio seen of what the step allocates, 2.66x on debug, rounded up) and 0.2 on
CUDA, whose caching allocator was not measured (no GPU was available here).
TrainConfig.cpu_keep_freed_memory makes the heap bigger still; see `keep_freed_memory`.
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
MEASURE_STEPS = 3                  # training steps a measurement runs (from the 2nd on, AdamW's state exists)
HEADROOM = {"cpu": 1.7, "cuda": 0.2}  # room plans leave for allocator slack (see the module docstring)


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
    headroom: float         # room left for the allocator, on top of what the step allocates
    required_bytes: int     # the estimate with that room: what must fit the budget


def _dtype_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(bytes of a carrier activation, bytes of the carried state)."""
    compute = 4 if cfg.precision == "fp32" else 2
    return compute, 2 if cfg.saved_state_dtype == "bf16" else 4


def _carrier_parameters(cfg: ModelConfig) -> int:
    hc, inputs = cfg.carrier_hidden, cfg.neuron_features + 1
    gru = sum(3 * hc * ((inputs if layer == 0 else hc) + hc) + 6 * hc for layer in range(cfg.carrier_layers))
    head_outputs = 1 + 3 + (cfg.energy_update == "gated") + (cfg.plane_split == "learned")
    split_gain = int(cfg.plane_split == "learned" and cfg.split_energy_gain != 0)
    return gru + (hc + 1) * head_outputs + split_gain


def _parameters(cfg: ModelConfig) -> int:
    """Parameter count of EnergyLattice(cfg), from the config alone (no model is built)."""
    mapper = cfg.embed_dim * cfg.mapper_rank + cfg.mapper_rank * (1 + cfg.height + cfg.width) + cfg.surface
    neuron = 5 * cfg.neuron_hidden + (cfg.neuron_hidden + 1) * cfg.neuron_features
    rank = cfg.collector_rank
    collector = 2 * rank * (cfg.height + cfg.width) + 4 * rank + (2 * rank + 1) * cfg.embed_dim
    return mapper + neuron + _carrier_parameters(cfg) + collector + int(cfg.skip)


def _terms(cfg: ModelConfig) -> dict[str, int]:
    """Bytes per flow-step that backward keeps, and bytes per active flow of one step's working set.

    Without checkpointing, autograd keeps 5.75 values per carrier unit per flow-step (counted with
    saved_tensors_hooks: StepGRU's r/z gates (2), n gate, state-side n pre-activation, layer
    output, and the stacked state); with backward's own working memory the measured peak comes to 6.
    The state is stored in `saved_state_dtype`, the rest in the autocast dtype. With checkpointing
    only the step's inputs are kept (the state, position, energy, gather index), and backward
    recomputes one step at a time: its activations and their gradients, 11 values per unit.
    Both constants were read off measured peaks (see the module docstring).
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
    """Predicted peak memory of a training step: max_memory_allocated on CUDA; on CPU, peak RSS with
    no allocator slack (see the module docstring; plans add HEADROOM for it).

    Defaults assume the worst case the config allows."""
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
    return int(fixed + kept + batch * flows * terms["step_per_flow"])


def check_batch(model_cfg: ModelConfig, batch: int, budget_bytes: int, *, device_type: str = "cpu",
                headroom: float | None = None, flows_per_sample: int | None = None,
                steps: int | None = None) -> Plan:
    """The plan for this batch, or MemoryBudgetError when its required bytes exceed the budget.

    headroom (default HEADROOM[device_type]) is the allocator's slack, as a fraction of what the step
    allocates (the estimate less the CPU process base, which does not fragment)."""
    headroom = HEADROOM.get(device_type, HEADROOM["cuda"]) if headroom is None else headroom
    if headroom < 0:
        raise ValueError(f"headroom={headroom} must be at least 0")
    cfg = model_cfg.resolved()
    flows, steps, _ = _load(cfg, flows_per_sample, steps)
    estimate = estimate_peak_bytes(cfg, batch, device_type=device_type, flows_per_sample=flows, steps=steps)
    base = CPU_BASE_BYTES if device_type == "cpu" else 0
    required = int(base + (estimate - base) * (1 + headroom))
    plan = Plan(batch, estimate, int(budget_bytes), device_type, flows, steps, headroom, required)
    if required > budget_bytes:
        raise MemoryBudgetError(
            f"{cfg.width}x{cfg.height}x{cfg.depth} (carrier {cfg.carrier_hidden}x{cfg.carrier_layers}) at "
            f"batch {batch} needs an estimated {estimate / GiB:.2f} GiB ({required / GiB:.2f} GiB with "
            f"{headroom:.0%} allocator headroom), over the budget of {budget_bytes / GiB:.2f} GiB ({device_type}; "
            f"assumes {flows} flows per sample for {steps} flow steps); {_savings_hint(cfg, batch)}")
    return plan


def _savings_hint(cfg: ModelConfig, batch: int) -> str:
    knobs = [] if batch == 1 else ["a smaller batch"]
    if not cfg.activation_checkpointing:
        knobs.append("model.activation_checkpointing=true")
    if cfg.saved_state_dtype != "bf16":
        knobs.append("model.saved_state_dtype=bf16")
    knobs.append("a lower model.max_flows_per_sample or model.max_steps")
    return "try " + ", ".join(knobs)


def plan_batch(model_cfg: ModelConfig, budget_bytes: int, *, device_type: str = "cpu", max_batch: int = 4096,
               headroom: float | None = None, flows_per_sample: int | None = None,
               steps: int | None = None) -> Plan:
    """The largest batch in [1, max_batch] whose estimated peak plus headroom fits the budget.

    Raises MemoryBudgetError (naming estimate and budget) when not even batch 1 fits."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    kwargs = dict(device_type=device_type, headroom=headroom, flows_per_sample=flows_per_sample, steps=steps)
    check_batch(model_cfg, 1, budget_bytes, **kwargs)
    lo, hi = 1, max_batch  # the estimate grows with the batch: bisect for the last batch that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            check_batch(model_cfg, mid, budget_bytes, **kwargs)
            lo = mid
        except MemoryBudgetError:
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

def keep_freed_memory() -> bool:
    """Keep memory PyTorch frees in this process for reuse instead of handing it back to the OS.

    glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mmap and
    unmaps it on free, so on large lattices every activation of every flow step is born in
    untouched pages and pays a page fault per 4 KiB, which on this project's CPU machine costs about
    as much as the matmuls: scale-300 at batch 1 trains a step in 23 s with this instead of 40 s.
    The price is fragmentation: freed blocks stay in the heap, and peak RSS grows (scale-300: 6.5 GB
    instead of 3.0 GB), beyond what the planner's headroom was measured for.
    Process-wide and for the rest of the process; glibc only (returns False elsewhere).
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second: newer torch's name
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def use_expandable_segments() -> str:
    """Let the CUDA caching allocator grow segments in place, unless the user configured it.

    Flow tensors change size every step (arrivals, spawning), and with fixed-size segments the
    freed blocks of one step rarely fit the next, so max_memory_reserved climbs far above
    max_memory_allocated. The environment variable only counts before CUDA initialises; after
    that, the allocator's settings are changed in place. Returns what was done, for the log."""
    if any(os.environ.get(name) for name in ALLOC_CONF_VARS):
        return "kept the user's allocator settings"
    if not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
        return "PYTORCH_CUDA_ALLOC_CONF=" + EXPANDABLE_SEGMENTS
    # Private APIs (the first is newer torch's name for the second); the run goes on without them.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
        getattr(torch.cuda.memory, "_set_allocator_settings", None)
    try:
        setter(EXPANDABLE_SEGMENTS)
        return "allocator settings: " + EXPANDABLE_SEGMENTS
    except (TypeError, RuntimeError) as e:
        return f"expandable segments unavailable ({e})"


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
    peak_bytes: int                # peak RSS (CPU) or max_memory_allocated (CUDA)
    flow_steps_per_sample: float   # what the measured step actually ran
    steps_used: int
    reserved_bytes: int | None = None   # CUDA: max_memory_reserved, what the GPU must really hold
    device_name: str = "cpu"
    allocator_settings: str | None = None  # CUDA: the caching allocator's configuration in force


def measure_peak_bytes(model_cfg: ModelConfig, batch: int, *, device: str = "cpu", live_only: bool = True,
                       alloc_conf: str | None = None, timeout: float = 1800) -> Measurement:
    """Measured peak of training `worst_case_config(model_cfg)`: the peak RSS (CPU) or
    max_memory_allocated and max_memory_reserved (CUDA) of a fresh subprocess over MEASURE_STEPS
    training steps.

    live_only (CPU): glibc returns every freed block to the OS, so RSS follows live memory; this is
    what the estimate predicts. False: default allocator settings, as a training process runs.
    alloc_conf (CUDA): PYTORCH_CUDA_ALLOC_CONF for the subprocess ("" for torch's defaults); the
    allocator reads it once, when CUDA starts, hence a fresh process per setting."""
    spec = json.dumps({"model": dataclasses.asdict(model_cfg), "batch": batch, "device": device})
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if live_only and device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if alloc_conf is not None:
        for name in ALLOC_CONF_VARS:
            env.pop(name, None)
        if alloc_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
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
    measured = {"peak_bytes": peak_memory_bytes(device), "steps_used": out.stats.steps_used,
                "flow_steps_per_sample": sum(out.stats.active_per_step) / spec["batch"]}
    if device.type == "cuda":
        getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
        measured.update(reserved_bytes=torch.cuda.max_memory_reserved(device),
                        device_name=torch.cuda.get_device_name(device),
                        allocator_settings=getter() if getter else os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    return measured


if __name__ == "__main__":  # the measuring subprocess of measure_peak_bytes
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
