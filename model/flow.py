"""The flow processor: carries energy from the input surface to the two output planes.

A flow is one row in a set of flat tensors: position (N, 3) in [-1, 1], energy (N, e) (e =
energy_channels, 1 by default), carrier state (L, N, Hc), sample index (N,), path length (N,). Rows
stay sorted by sample: the initial
flows are laid out sample-major and every later gather preserves order, which is what lets the
per-sample flow cap be enforced with one cumulative sum instead of a loop.

Each step:
  1. the dense step (neuron + carrier, supplied by the model) gives a new state, energy, move and
     plane split; with `interaction="field"` it also reads what the field holds at the flow's cell
     (and the sample's mean of it), and gives what the flow writes there after its move;
  2. positions move; x and y reflect (or clamp) at the walls; z beyond -1 or +1 means arrived;
  3. flows that moved farther than `spawn_threshold` ask for children, capped per sample;
  4. ONE host sync fetches the sizes of the next step (kept, arrived, spawned counts);
  5. arrived flows splat their energy bilinearly at their continuous (x, y), so gradients reach the
     move head, onto both planes by the carrier's split (or all onto the plane reached); every other
     flow is gathered into the next step's tensors, each parent followed by its children (spawned
     at the parent's previous position, sharing its energy).
When the loop stops, flows still active are projected onto the nearer plane (split as on arrival)
and deposited there.

The interaction field (B, C, R, R, R) spans the lattice at R cells per axis. After each step every
flow's message is averaged into its cell, on top of the previous field mixed with its neighbouring
cells (a 3x3x3 mean) and halved: local connections reach farther step by step, older messages fade,
and the sample's mean over all cells is a distant connection every flow reads. Scatter, mix and
gather are each one tensor op per step whatever the number of flows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig

# (pos, energy, hidden, context) -> (hidden, energy, move, split, message); pos/energy/move fp32,
# hidden in the state dtype; split (N, e) is the share of each flow's energy that goes to plane
# z = +1, or None to put all of it on the plane the flow reached. context (N, 2C) is what the flow
# reads from the interaction field and message (N, C) what it writes; both None without a field.
StepFn = Callable[[Tensor, Tensor, Tensor, Tensor | None],
                  tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]]
# What the field keeps of its previous (neighbour-mixed) state each step: older messages fade.
FIELD_KEEP = 0.5


@dataclass
class FlowStats:
    """What one forward pass of the flow processor did (per-sample counts are (B,) tensors)."""
    steps_used: int
    stop_reason: str                 # all_arrived | converged | patience | max_steps
    completion: float                # arrived / created when the loop stopped
    completion_curve: list[float]    # completion after each step
    active_per_step: list[int]       # flows the dense step ran on at each step (known from the step's sync)
    created: Tensor                  # flows ever created per sample (initial + spawned)
    arrived: Tensor                  # flows that reached a plane on their own
    projected: Tensor                # flows deposited by projection when the loop stopped
    path_length_sum: Tensor          # total distance travelled by all deposited flows
    # Distance the projected flows still had to go to their plane, per created flow. It keeps its
    # graph: arrival itself is discrete, so this is the only signal that reaches the z-move.
    remaining_distance: Tensor
    surface: int

    @property
    def spawned(self) -> Tensor:
        return self.created - self.surface

    @property
    def mean_path_length(self) -> float:
        deposited = (self.arrived + self.projected).sum().clamp(min=1)
        return float(self.path_length_sum / deposited)


@dataclass
class FlowTrace:
    """Per-flow bookkeeping for tests and plots; only collected with `trace=True` (slower)."""
    deposited_ids: list[Tensor] = field(default_factory=list)   # flow id of every deposit
    deposited_energy: list[Tensor] = field(default_factory=list)  # summed over energy channels
    initial_energy: Tensor | None = None                           # each flow's, summed over channels
    # (flow ids, positions) of sample 0's flows after each step, for flow-path plots
    sample0_paths: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    created_total: int = 0


def _move(pos: Tensor, move: Tensor, reflect: bool) -> Tensor:
    new = pos + move
    xy, z = new[:, :2], new[:, 2:]
    if reflect:  # a step is shorter than the lattice, so one reflection per wall is enough
        xy = torch.where(xy > 1, 2 - xy, xy)
        xy = torch.where(xy < -1, -2 - xy, xy)
    return torch.cat([xy, z], dim=1).clamp(-1, 1)  # z at +-1 means arrived


def _splat(sample: Tensor, xy: Tensor, values: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Bilinear splat of per-flow values (N, P) at continuous (x, y) in [-1, 1], channel p onto
    plane p: (flat indices, weighted values), both (4 N P,), addressing a flat (B, P, H, W) tensor.

    One index per corner and channel, so every plane of every deposit goes into a single index_add;
    the weights are differentiable in x and y.
    """
    planes = values.shape[1]
    gx = (xy[:, 0] + 1) * (0.5 * (width - 1))
    gy = (xy[:, 1] + 1) * (0.5 * (height - 1))
    x0 = gx.detach().floor().clamp(0, width - 2)
    y0 = gy.detach().floor().clamp(0, height - 2)
    fx, fy = (gx - x0)[:, None], (gy - y0)[:, None]
    corner = (sample * (planes * height) + y0.long()) * width + x0.long()  # plane 0's (y0, x0)
    base = corner[:, None] + torch.arange(planes, device=sample.device) * (height * width)
    index = torch.cat([base, base + 1, base + width, base + width + 1])
    weighted = torch.cat([values * (1 - fx) * (1 - fy), values * fx * (1 - fy), values * (1 - fx) * fy,
                          values * fx * fy])
    return index.reshape(-1), weighted.reshape(-1)


def _plane_values(energy: Tensor, split: Tensor | None, upper: Tensor) -> Tensor:
    """(N, 2e): what each flow deposits on the planes z = -1 (its e channels first) and z = +1. Each
    energy channel is shared by `split` (its share for plane z = +1) when there is one, else all of
    it goes to its own side's plane (`upper`), which is the same as a split of exactly 0 or 1."""
    share = split if split is not None else upper.to(energy.dtype)[:, None]
    return torch.cat([energy * (1 - share), energy * share], dim=1)


def _field_cells(pos: Tensor, sample: Tensor, resolution: int) -> Tensor:
    """Each flow's cell of the field, as an index into its flat (B * R^3) cells."""
    cell = ((pos.detach() + 1) * (0.5 * (resolution - 1))).round().long().clamp(0, resolution - 1)
    return ((sample * resolution + cell[:, 2]) * resolution + cell[:, 1]) * resolution + cell[:, 0]


def _read_field(field: Tensor, cells: Tensor, sample: Tensor) -> Tensor:
    """(N, 2C): the field at each flow's cell, and its sample's mean over every cell."""
    channels = field.shape[1]
    local = field.permute(0, 2, 3, 4, 1).reshape(-1, channels).index_select(0, cells)
    return torch.cat([local, field.mean(dim=(2, 3, 4)).index_select(0, sample)], dim=1)


def _write_field(field: Tensor, cells: Tensor, message: Tensor) -> Tensor:
    """The next field: the mean message of the flows in each cell, on top of FIELD_KEEP x the
    previous field mixed with its neighbours."""
    B, C, R = field.shape[0], field.shape[1], field.shape[2]
    sums = torch.zeros(B * R**3, C, device=field.device).index_add(0, cells, message.float())
    counts = torch.zeros(B * R**3, device=field.device).index_add(0, cells, torch.ones_like(cells, dtype=torch.float))
    written = (sums / counts.clamp(min=1)[:, None]).view(B, R, R, R, C).permute(0, 4, 1, 2, 3)
    mixed = F.avg_pool3d(field, 3, stride=1, padding=1, count_include_pad=False)
    return FIELD_KEEP * mixed + written


def _positions_of(mask: Tensor, count: int) -> Tensor:
    """Indices where `mask` is true, given the count already fetched (no extra host sync)."""
    return torch.repeat_interleave(torch.arange(mask.numel(), device=mask.device), mask.long(),
                                   output_size=count)


def run_flows(energy_grid: Tensor, step_fn: StepFn, cfg: ModelConfig, *, hidden_dtype: torch.dtype,
              trace: bool = False) -> tuple[Tensor, FlowStats, FlowTrace | None]:
    """Run every flow of a batch to the planes. Returns (planes (B, 2e, H, W) fp32, stats, trace).

    `energy_grid` is (B, e, H, W), or (B, H, W) for one channel. `cfg` must be resolved (no None
    defaults). Planes 0..e-1 are the channels deposited on z = -1, planes e..2e-1 those on z = +1.
    """
    if energy_grid.dim() == 3:
        energy_grid = energy_grid[:, None]
    B, E, H, W = energy_grid.shape
    dev = energy_grid.device
    S, N = H * W, B * H * W
    P = 2 * E  # planes the deposits fill: the columns of _plane_values
    # Filled on the device: torch.tensor(..., device=cuda) copies from host memory, a host sync.
    limits = torch.stack([torch.full((), limit, device=dev) for limit in cfg.step_limits()])

    # Step 0: one flow per (sample, surface cell) on the centre plane z = 0.
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=dev), torch.linspace(-1, 1, W, device=dev),
                            indexing="ij")
    surface_xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
    pos = torch.cat([surface_xy.repeat(B, 1), torch.zeros(N, 1, device=dev)], dim=1)
    energy = energy_grid.float().flatten(2).transpose(1, 2).reshape(N, E)  # sample-major, then cell
    sample = torch.arange(B, device=dev)[:, None].expand(B, S).reshape(-1)  # repeat_interleave would sync
    hidden = (torch.randn(cfg.carrier_layers, N, cfg.carrier_hidden, device=dev)
              * cfg.hidden_noise_std).to(hidden_dtype)
    path = torch.zeros(N, device=dev)
    created = torch.full((B,), S, device=dev, dtype=torch.long)
    arrived_per_sample = torch.zeros(B, device=dev, dtype=torch.long)
    zeros_b = torch.zeros(B, device=dev, dtype=torch.long)
    path_sum = torch.zeros((), device=dev)
    R = cfg.field_resolution
    flow_field = torch.zeros(B, cfg.field_channels, R, R, R, device=dev) if cfg.interaction == "field" else None

    tr = FlowTrace(initial_energy=energy.detach().sum(1), created_total=N) if trace else None
    flow_id = torch.arange(N, device=dev) if trace else None

    deposit_index: list[Tensor] = []
    deposit_value: list[Tensor] = []
    arrived_total, created_total = 0, N
    curve: list[float] = []
    active = [N]
    best, stale, stop_reason = None, 0, "max_steps"

    for step in range(1, cfg.max_steps + 1):
        context = None if flow_field is None else _read_field(flow_field, _field_cells(pos, sample, R), sample)
        hidden_new, energy_new, move, split, message = step_fn(pos, energy, hidden, context)
        move = move * limits  # the carrier's move head is in [-1, 1] per axis
        new_pos = _move(pos, move, cfg.reflect_walls)
        if flow_field is not None:  # every flow of this step writes, arrived ones at the cell they arrived in
            flow_field = _write_field(flow_field, _field_cells(new_pos, sample, R), message)
        z = new_pos[:, 2]
        arrived = (z <= -1) | (z >= 1)
        keep = ~arrived
        step_len = move.detach().norm(dim=1)
        path_before, path = path, path + step_len

        # Movement spawning, capped per sample. Rows are sorted by sample, so "children asked for
        # by earlier flows of the same sample" is a global exclusive cumsum minus the sample's offset.
        asked = ((step_len / cfg.spawn_threshold).floor() - 1).clamp(0, cfg.max_spawn_per_step).long()
        asked = asked * keep
        asked_per_sample = zeros_b.index_add(0, sample, asked)
        sample_offset = torch.cumsum(asked_per_sample, 0) - asked_per_sample
        asked_before = torch.cumsum(asked, 0) - asked - sample_offset[sample]
        room = (cfg.max_flows_per_sample - created)[sample] - asked_before
        children = torch.minimum(asked, room.clamp(min=0))
        created = created + zeros_b.index_add(0, sample, children)
        arrived_per_sample = arrived_per_sample + zeros_b.index_add(0, sample, arrived.long())
        path_sum = path_sum + (path * arrived).sum()
        copies = keep * (1 + children)

        # The one host sync of the step: sizes for the gathers below and the stopping rule.
        n_next, n_arrived, n_children = torch.stack([copies.sum(), arrived.sum(), children.sum()]).tolist()

        if n_arrived:
            at = _positions_of(arrived, n_arrived)
            values = _plane_values(energy_new[at], None if split is None else split[at], z[at] > 0)
            index, value = _splat(sample[at], new_pos[at, :2], values, H, W)
            deposit_index.append(index)
            deposit_value.append(value)
            if tr is not None:
                tr.deposited_ids.append(flow_id[at])
                tr.deposited_energy.append(energy_new[at].detach().sum(1))
        if tr is not None:
            in0 = sample == 0
            tr.sample0_paths.append((flow_id[in0].cpu(), new_pos[in0].detach().cpu()))

        # Compaction and spawning in one gather: each kept flow, then its children. A step in which
        # no flow arrived and none spawned keeps every row in place, so it needs no gather (the
        # common case early in a pass, and the gather of the carrier state is the costly one).
        if n_arrived == 0 and n_children == 0:
            pos, energy, hidden = new_pos, energy_new, hidden_new
        else:
            src = torch.repeat_interleave(torch.arange(copies.numel(), device=dev), copies, output_size=n_next)
            first_of_group = (torch.cumsum(copies, 0) - copies)[src]
            is_child = torch.arange(n_next, device=dev) > first_of_group
            pos = torch.where(is_child[:, None], pos.index_select(0, src), new_pos.index_select(0, src))
            energy = (energy_new / (1 + children)[:, None]).index_select(0, src)  # parent, children share
            if split is not None:
                split = split.index_select(0, src)
            hidden = hidden_new.index_select(1, src)
            path = torch.where(is_child, path_before.index_select(0, src), path.index_select(0, src))
            sample = sample.index_select(0, src)
            if tr is not None:
                child_rank = torch.cumsum(is_child.long(), 0) - 1
                flow_id = torch.where(is_child, created_total + child_rank, flow_id.index_select(0, src))
        if tr is not None:
            tr.created_total = created_total + n_children

        arrived_total += n_arrived
        created_total += n_children
        active.append(n_next)
        completion = arrived_total / created_total
        curve.append(completion)
        if n_next == 0:
            stop_reason = "all_arrived"
            break
        if step >= cfg.min_steps:
            if completion >= cfg.convergence_threshold:
                stop_reason = "converged"
                break
            if best is None or completion >= best + cfg.min_improvement:
                best, stale = completion, 0
            else:
                stale += 1
                if stale >= cfg.convergence_patience:
                    stop_reason = "patience"
                    break

    # Flows still moving are projected onto the nearer plane, never dropped.
    projected = zeros_b.index_add(0, sample, torch.ones_like(sample))
    path_sum = path_sum + path.sum()
    remaining_distance = (1 - pos[:, 2].abs()).clamp(min=0).sum() / created_total
    if pos.shape[0]:
        index, value = _splat(sample, pos[:, :2], _plane_values(energy, split, pos[:, 2] >= 0), H, W)
        deposit_index.append(index)
        deposit_value.append(value)
        if tr is not None:
            tr.deposited_ids.append(flow_id)
            tr.deposited_energy.append(energy.detach().sum(1))

    planes = torch.zeros(B * P * H * W, device=dev).index_add(
        0, torch.cat(deposit_index), torch.cat(deposit_value)).view(B, P, H, W)
    stats = FlowStats(
        steps_used=len(curve), stop_reason=stop_reason, completion=curve[-1] if curve else 0.0,
        completion_curve=curve, active_per_step=active[:len(curve)], created=created,
        arrived=arrived_per_sample, projected=projected, path_length_sum=path_sum, remaining_distance=remaining_distance, surface=S)
    return planes, stats, tr
