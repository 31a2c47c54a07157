"""Memory planner: predicts the peak memory of a training step and picks the largest batch that fits.

    estimate_peak_bytes(model_cfg, batch)          -> bytes
    plan_batch(model_cfg, budget_bytes)            -> Plan(batch, estimate_bytes, budget_bytes, ...)
    check_batch(model_cfg, batch, budget_bytes)    -> Plan, or MemoryBudgetError naming estimate and budget

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
means exactly that here: `memory_measure.measure_peak_bytes` (`plan --measure`) trains a few steps
forced into the assumed worst case in a fresh subprocess and reads that peak. Calibrated on this
project's CPU machine (2-core AMD EPYC, torch 2.13, glibc 2.36), the estimate is 3-7% above it on
debug, experiment, scale-50 and scale-150 (README, Benchmarks).

A real CPU training process keeps freed memory in glibc's heap for reuse (returning it costs a page
fault per 4 KiB, which here made training 1.8x slower), and the heap's holes come on top: the same
worst-case runs under default glibc settings measured 1.3x-2.5x the live peak, in clusters that
moved with address-space randomisation. So plans leave that room: a batch fits when its
`required_bytes` = base + (estimate - base) * (1 + headroom) is within the budget, with headroom 1.7
on CPU (the worst ratio seen of what the step allocates, 2.66x on debug, rounded up) and 0.2 on
CUDA, whose caching allocator was not measured (no GPU was available here).
TrainConfig.cpu_keep_freed_memory makes the heap bigger still; see `memory.keep_freed_memory`.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError, ModelConfig

GiB = 2**30

# Calibrated on the CPU machine described above (see the module docstring and README, Benchmarks).
CPU_BASE_BYTES = int(0.33 * GiB)   # RSS of a fresh process holding torch and the training code's libraries
WORKING_BYTES = 32 * 2**20         # allocator and autograd bookkeeping that does not grow with the model
KEPT_VALUES_PER_UNIT = 6           # per flow-step and carrier unit, without checkpointing (see _terms)
STEP_VALUES_PER_UNIT = 11          # per active flow and carrier unit: one checkpointed step recomputed
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


def _field_channels(cfg: ModelConfig) -> int:
    return cfg.field_channels if cfg.interaction == "field" else 0


def carrier_parameter_count(cfg: ModelConfig) -> int:
    e, field = cfg.energy_channels, _field_channels(cfg)
    hc, inputs = cfg.carrier_hidden, cfg.neuron_features + e + 2 * field
    gru = sum(3 * hc * ((inputs if layer == 0 else hc) + hc) + 6 * hc for layer in range(cfg.carrier_layers))
    head_outputs = e + 3 + e * (cfg.energy_update == "gated") + e * (cfg.plane_split == "learned") + field
    split_gain = int(cfg.plane_split == "learned" and cfg.split_energy_gain != 0)
    return gru + (hc + 1) * head_outputs + split_gain


def parameter_count(cfg: ModelConfig) -> int:
    """Parameter count of EnergyLattice(cfg), from the config alone (no model is built)."""
    e, rank = cfg.energy_channels, cfg.mapper_rank
    mapper = (cfg.embed_dim + 1) * e * rank + rank * (cfg.height + cfg.width) + cfg.surface
    neuron = (4 + e) * cfg.neuron_hidden + (cfg.neuron_hidden + 1) * cfg.neuron_features
    planes, rank = 2 * e, cfg.collector_rank
    collector = planes * rank * (cfg.height + cfg.width) + 2 * planes * rank + (planes * rank + 1) * cfg.embed_dim
    return mapper + neuron + carrier_parameter_count(cfg) + collector + int(cfg.skip)


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
    # move, energy, path and the flow processor's masks and indices; each energy channel past the
    # first adds its value, update, split and deposits; a field adds what the flow reads (2C), its
    # message (C) and its cell index. Not calibrated by a measured peak: counted from the tensors.
    field = _field_channels(cfg)
    small = 4 * (2 * cfg.neuron_hidden + 2 * cfg.neuron_features + 40 + 8 * (cfg.energy_channels - 1) + 3 * field
                 + (2 if field else 0))
    if cfg.activation_checkpointing:
        kept, step = state * units + 4 * (3 + 1) + 8, 4 * STEP_VALUES_PER_UNIT * units + small
    else:
        kept, step = compute * (KEPT_VALUES_PER_UNIT - 1) * units + state * units + small, 0
    # Per sample and step, a field keeps its state, the mixed and the written field and their sums:
    # four (C, R^3) float tensors.
    per_sample_step = 4 * 4 * field * cfg.field_resolution ** 3
    return {"kept_per_flow_step": kept, "step_per_flow": step, "field_per_sample_step": per_sample_step}


def _load(cfg: ModelConfig, flows_per_sample: int | None, steps: int | None) -> tuple[int, int, int]:
    """(flows per sample, steps, flow-steps per sample) the estimate assumes; see the module docstring."""
    flows = flows_per_sample or cfg.max_flows_per_sample
    steps = steps or cfg.max_steps
    if not cfg.surface <= flows <= cfg.max_flows_per_sample:
        raise ConfigError(f"flows_per_sample={flows} (--flows-per-sample) is out of range; allowed range "
                          f"[{cfg.surface}, {cfg.max_flows_per_sample}] (width x height to model.max_flows_per_sample)")
    if not 1 <= steps <= cfg.max_steps:
        raise ConfigError(f"steps={steps} (--steps) is out of range; allowed range [1, {cfg.max_steps}] "
                          f"(1 to model.max_steps)")
    return flows, steps, cfg.surface + (steps - 1) * flows


def estimate_peak_bytes(model_cfg: ModelConfig, batch: int, *, device_type: str = "cpu",
                        flows_per_sample: int | None = None, steps: int | None = None) -> int:
    """Predicted peak memory of a training step: max_memory_allocated on CUDA; on CPU, peak RSS with
    no allocator slack (see the module docstring; plans add HEADROOM for it).

    Defaults assume the worst case the config allows."""
    return _estimate(model_cfg.resolved(), batch, device_type, flows_per_sample, steps)


def _estimate(cfg: ModelConfig, batch: int, device_type: str, flows_per_sample: int | None,
              steps: int | None) -> int:
    """estimate_peak_bytes of a resolved config."""
    if batch < 1:
        raise ConfigError(f"batch={batch} is out of range; it must be at least 1")
    flows, steps, flow_steps = _load(cfg, flows_per_sample, steps)
    terms = _terms(cfg)
    kept = batch * flow_steps * terms["kept_per_flow_step"] + batch * steps * terms["field_per_sample_step"]
    if cfg.precision != "fp32":  # autocast's low-precision copy of the carrier weights, per step
        kept += 2 * carrier_parameter_count(cfg) * (1 if cfg.activation_checkpointing else steps)
    fixed = 16 * parameter_count(cfg) + WORKING_BYTES  # fp32 weights, grads and AdamW's two moments
    if device_type == "cpu":
        fixed += CPU_BASE_BYTES
    return int(fixed + kept + batch * flows * terms["step_per_flow"])


def check_batch(model_cfg: ModelConfig, batch: int, budget_bytes: int, *, device_type: str = "cpu",
                headroom: float | None = None, flows_per_sample: int | None = None,
                steps: int | None = None) -> Plan:
    """The plan for this batch, or MemoryBudgetError when its required bytes exceed the budget.

    headroom (default HEADROOM[device_type]) is the allocator's slack, as a fraction of what the step
    allocates (the estimate less the CPU process base, which does not fragment)."""
    return _check(model_cfg.resolved(), batch, budget_bytes, device_type, headroom, flows_per_sample, steps)


def _check(cfg: ModelConfig, batch: int, budget_bytes: int, device_type: str, headroom: float | None,
           flows_per_sample: int | None, steps: int | None) -> Plan:
    """check_batch of a resolved config."""
    headroom = HEADROOM.get(device_type, HEADROOM["cuda"]) if headroom is None else headroom
    if headroom < 0:
        raise ConfigError(f"headroom={headroom} is out of range; it must be at least 0")
    flows, steps, _ = _load(cfg, flows_per_sample, steps)
    estimate = _estimate(cfg, batch, device_type, flows, steps)
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
        raise ConfigError(f"max_batch={max_batch} is out of range; it must be at least 1")
    cfg = model_cfg.resolved()

    def check(batch: int) -> Plan:
        return _check(cfg, batch, budget_bytes, device_type, headroom, flows_per_sample, steps)

    check(1)
    lo, hi = 1, max_batch  # the estimate grows with the batch: bisect for the last batch that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            check(mid)
            lo = mid
        except MemoryBudgetError:
            hi = mid - 1
    return check(lo)
