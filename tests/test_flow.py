"""Flow invariants, each in a case built for it.

Most tests drive `run_flows` with a hand-written step function (a plain function of the flow
tensors), so the motion is known exactly; the rest run the real model.
"""
import dataclasses

import pytest
import torch

from model import EnergyLattice, ModelConfig, preset, run_flows
from model.flow import _plane_values, _splat

SMALL = preset("smoke")  # 8x8x8


def resolved(**overrides) -> ModelConfig:
    """The smoke lattice with spawning off unless a test turns it on."""
    return dataclasses.replace(SMALL, **{"max_spawn_per_step": 0, **overrides}).resolved()


def mover(move_fn, energy_fn=None):
    """A step function moving flows by move_fn(pos) (in [-1, 1] per axis, scaled by the processor);
    energy passes through unchanged unless energy_fn is given."""
    def step(pos, energy, hidden, context):
        new_energy = energy if energy_fn is None else energy_fn(pos, energy)
        return hidden, new_energy, move_fn(pos), None, None  # no split: all energy to the plane reached
    return step


def full_speed_z(sign=1.0):
    return mover(lambda pos: torch.tensor([0.0, 0.0, sign]).expand(len(pos), 3))


def run(cfg, step, B=2, energy=None, trace=True):
    if energy is None:
        energy = torch.rand(B, cfg.height, cfg.width) + 0.5
    return run_flows(energy, step, cfg, hidden_dtype=torch.float32, trace=trace)


def diagonal_spawner(pos):
    # full speed on every axis: |move| ~ 0.49 normalized on smoke, far above the spawn threshold
    return torch.ones(len(pos), 3)


def test_every_created_flow_is_deposited_exactly_once():
    cfg = resolved(spawn_threshold=0.1, max_spawn_per_step=3, max_flows_per_sample=400)
    planes, stats, tr = run(cfg, mover(lambda p: torch.stack(
        [torch.sin(7 * p[:, 1]), torch.cos(5 * p[:, 0]), 0.4 * torch.ones(len(p))], 1)))
    ids = torch.cat(tr.deposited_ids)
    assert stats.spawned.sum() > 0, "the case must spawn to test anything"
    assert tr.created_total == int(stats.created.sum())
    assert sorted(ids.tolist()) == list(range(tr.created_total))
    assert torch.equal(stats.arrived + stats.projected, stats.created)


def test_spawning_conserves_energy():
    cfg = resolved(spawn_threshold=0.1, max_spawn_per_step=3, max_flows_per_sample=10_000)
    energy = torch.randn(3, cfg.height, cfg.width)
    planes, stats, _ = run(cfg, mover(diagonal_spawner), B=3, energy=energy)
    assert stats.spawned.sum() > 3 * cfg.surface  # most flows split, several times
    torch.testing.assert_close(planes.sum(dim=(1, 2, 3)), energy.sum(dim=(1, 2)), rtol=1e-5, atol=1e-4)


def test_flow_cap_holds_per_sample():
    cap = cfg_cap = SMALL.surface + 37
    cfg = resolved(spawn_threshold=0.05, max_spawn_per_step=8, max_flows_per_sample=cfg_cap)
    _, stats, tr = run(cfg, mover(diagonal_spawner), B=4)
    assert (stats.created <= cap).all()
    assert (stats.created == cap).all(), "the case asks for far more children than the cap allows"
    assert tr.created_total == 4 * cap


def test_stop_when_every_flow_arrived():
    cfg = resolved(min_steps=1)
    _, stats, _ = run(cfg, full_speed_z())
    assert stats.stop_reason == "all_arrived"
    assert stats.steps_used == cfg.straight_path_steps()
    assert stats.completion == 1.0 and stats.projected.sum() == 0


def test_stop_on_convergence_threshold_but_not_before_min_steps():
    # flows with x < 0 head for a plane at full speed; the rest stand still: completion is 0.5
    half = mover(lambda p: torch.stack([0 * p[:, 0], 0 * p[:, 0], (p[:, 0] < 0).float()], 1))
    cfg = resolved(convergence_threshold=0.5, min_steps=1, convergence_patience=100)
    _, stats, _ = run(cfg, half)
    assert stats.stop_reason == "converged" and stats.steps_used == cfg.straight_path_steps()
    late = resolved(convergence_threshold=0.5, min_steps=cfg.straight_path_steps() + 3, convergence_patience=100)
    _, stats, _ = run(late, half)
    assert stats.stop_reason == "converged" and stats.steps_used == late.min_steps


def test_stop_when_completion_stalls_for_patience_steps():
    cfg = resolved(min_steps=2, convergence_patience=3, max_steps=40)
    _, stats, _ = run(cfg, mover(lambda p: torch.zeros(len(p), 3)))
    assert stats.stop_reason == "patience"
    assert stats.steps_used == cfg.min_steps + cfg.convergence_patience
    assert stats.completion == 0.0


def test_stop_at_max_steps_and_project_unfinished_flows():
    cfg = resolved(min_steps=1, max_steps=5, convergence_patience=100)
    crawl = mover(lambda p: torch.tensor([0.0, 0.0, 0.01]).expand(len(p), 3))
    planes, stats, _ = run(cfg, crawl)
    assert stats.stop_reason == "max_steps" and stats.steps_used == 5
    assert stats.arrived.sum() == 0 and torch.equal(stats.projected, stats.created)
    assert planes[:, 1].sum() > 0 and planes[:, 0].abs().sum() == 0  # all projected onto the nearer plane, z=+1


def test_positions_stay_in_the_lattice_with_and_without_reflection():
    wild = mover(lambda p: torch.stack([torch.sign(p[:, 0] + 1e-3), -torch.sign(p[:, 1] + 1e-3),
                                        0.05 * torch.ones(len(p))], 1))
    for reflect in (True, False):
        cfg = resolved(reflect_walls=reflect, max_steps=12, min_steps=12)
        _, _, tr = run(cfg, wild)
        positions = torch.cat([p for _, p in tr.sample0_paths])
        assert positions.abs().max() <= 1.0


def test_reflection_mirrors_at_the_wall():
    cfg = resolved(reflect_walls=True, min_steps=1, max_steps=1)
    step_x = cfg.step_limits()[0]
    _, _, tr = run(cfg, mover(lambda p: torch.tensor([1.0, 0.0, 0.0]).expand(len(p), 3)))
    ids, pos = tr.sample0_paths[0]
    at_wall = ids == cfg.width - 1  # the first row's last cell starts at x = +1
    assert torch.allclose(pos[at_wall, 0], torch.tensor(1.0 - step_x))


def test_both_planes_receive_energy_in_their_own_half():
    split = mover(lambda p: torch.stack([0 * p[:, 0], 0 * p[:, 0], torch.where(p[:, 0] < 0, -1.0, 1.0)], 1))
    cfg = resolved(min_steps=1)
    planes, stats, _ = run(cfg, split, B=2)
    assert stats.stop_reason == "all_arrived"
    left, right = planes[..., : cfg.width // 2], planes[..., cfg.width // 2:]
    assert (left[:, 0].sum((1, 2)) > 0).all() and (right[:, 1].sum((1, 2)) > 0).all()
    # flows sit exactly on cell centres, so bilinear weights spill only rounding error across
    assert left[:, 1].abs().sum() < 1e-4 and right[:, 0].abs().sum() < 1e-4


def test_real_model_deposits_everything_it_creates():
    cfg = dataclasses.replace(SMALL, spawn_threshold=0.05)
    torch.manual_seed(0)
    model = EnergyLattice(cfg)
    out = model(torch.nn.functional.normalize(torch.randn(3, cfg.embed_dim), dim=-1), trace=True)
    ids = torch.cat(out.trace.deposited_ids)
    assert sorted(ids.tolist()) == list(range(out.trace.created_total))
    assert out.planes.shape == (3, 2, cfg.height, cfg.width)
    assert 1 <= out.stats.steps_used <= model.cfg.max_steps


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_gradients_reach_every_parameter(precision):
    cfg = dataclasses.replace(SMALL, precision=precision, travel_loss_weight=0.1)
    torch.manual_seed(0)
    model = EnergyLattice(cfg)
    from model import lattice_loss
    x = torch.nn.functional.normalize(torch.randn(4, cfg.embed_dim), dim=-1)
    out = model(x)
    lattice_loss(out, x.flip(0), model.cfg).backward()
    for part in ("mapper", "neuron", "carrier", "collector"):
        for name, p in getattr(model, part).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {part}.{name}"
    move_grad = model.carrier.move_head.weight.grad
    assert (move_grad.abs().sum(dim=1) > 0).all(), "every axis of the move head must get a gradient"


def _one_splat_per_plane(sample, xy, upper, energy, split, height, width):
    """The deposit as it was before both planes went into one splat: a bilinear splat per plane,
    each with its own indices into a flat (B, 2, H, W) tensor. The reference for the one below."""
    def splat(plane, value):
        gx = (xy[:, 0] + 1) * (0.5 * (width - 1))
        gy = (xy[:, 1] + 1) * (0.5 * (height - 1))
        x0 = gx.detach().floor().clamp(0, width - 2)
        y0 = gy.detach().floor().clamp(0, height - 2)
        fx, fy = gx - x0, gy - y0
        base = ((sample * 2 + plane) * height + y0.long()) * width + x0.long()
        v = value.reshape(-1)
        return (torch.cat([base, base + 1, base + width, base + width + 1]),
                torch.cat([v * (1 - fx) * (1 - fy), v * fx * (1 - fy), v * (1 - fx) * fy, v * fx * fy]))
    if split is None:
        return splat(upper.long(), energy)
    up, up_value = splat(torch.ones_like(sample), energy * split)
    low, low_value = splat(torch.zeros_like(sample), energy * (1 - split))
    return torch.cat([up, low]), torch.cat([up_value, low_value])


def random_flows(n=300, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 2 - 1
    xy[:8] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]).repeat(2, 1)  # the walls
    return (torch.randint(0, batch, (n,), generator=g), xy.requires_grad_(),
            torch.rand(n, generator=g) > 0.5, torch.randn(n, 1, generator=g).requires_grad_(),
            torch.rand(n, 1, generator=g).requires_grad_())


@pytest.mark.parametrize("learned_split", [True, False])
def test_one_splat_for_both_planes_equals_one_splat_per_plane(learned_split):
    B, H, W = 3, 7, 5
    sample, xy, upper, energy, split = random_flows(batch=B)
    split = split if learned_split else None
    weights = torch.randn(B * 2 * H * W)  # a loss that weighs every cell differently
    planes, grads = [], []
    for index, value in (_splat(sample, xy, _plane_values(energy, split, upper), H, W),
                         _one_splat_per_plane(sample, xy, upper, energy, split, H, W)):
        deposited = torch.zeros(B * 2 * H * W).index_add(0, index, value)
        inputs = [xy, energy] + ([split] if learned_split else [])
        grads.append(torch.autograd.grad((deposited * weights).sum(), inputs))
        planes.append(deposited.detach())
    # Bit-identical planes: the same products, added into each cell in the same order.
    assert torch.equal(planes[0], planes[1])
    assert planes[0].view(B, 2, H, W).abs().sum() > 0
    for new, old in zip(*grads):  # the energy's gradient sums its two planes' in another order
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_a_splat_of_p_channels_puts_channel_p_on_plane_p(channels):
    # what a flow carrying more than one value per plane will deposit: still one index_add
    B, H, W = 2, 6, 9
    sample, xy, _, _, _ = random_flows(n=200, batch=B, seed=1)
    values = torch.randn(len(sample), channels)
    index, value = _splat(sample, xy.detach(), values, H, W)
    assert index.shape == value.shape == (4 * len(sample) * channels,)
    together = torch.zeros(B * channels * H * W).index_add(0, index, value).view(B, channels, H, W)
    for p in range(channels):
        alone = torch.zeros(B * H * W).index_add(0, *_splat(sample, xy.detach(), values[:, p:p + 1], H, W))
        assert torch.equal(together[:, p], alone.view(B, H, W))
    torch.testing.assert_close(together.sum((0, 2, 3)), values.sum(0))  # bilinear weights sum to 1


# ---- energy channels and flows that meet --------------------------------------------------------

def test_every_energy_channel_is_conserved_through_spawning_onto_its_own_planes():
    cfg = resolved(spawn_threshold=0.1, max_spawn_per_step=3, max_flows_per_sample=10_000, energy_channels=3)
    energy = torch.randn(2, 3, cfg.height, cfg.width)
    planes, stats, _ = run(cfg, mover(diagonal_spawner), B=2, energy=energy)
    assert stats.spawned.sum() > 0 and planes.shape == (2, 6, cfg.height, cfg.width)
    per_channel = planes.view(2, 2, 3, cfg.height, cfg.width).sum(dim=(1, 3, 4))  # both planes of each channel
    torch.testing.assert_close(per_channel, energy.sum(dim=(2, 3)), rtol=1e-5, atol=1e-4)


def field_mover(cfg, seen):
    """Moves like diagonal_spawner, passes energy through, writes 1 into the field and records what
    each step read from it."""
    def step(pos, energy, hidden, context):
        seen.append(context)
        return hidden, energy, diagonal_spawner(pos), None, torch.ones(len(pos), cfg.field_channels)
    return step


def test_with_flows_that_meet_every_flow_is_still_deposited_once_and_energy_is_conserved():
    cfg = resolved(spawn_threshold=0.1, max_spawn_per_step=3, max_flows_per_sample=10_000, interaction="field",
                   field_channels=4, field_resolution=4)
    energy, seen = torch.randn(3, cfg.height, cfg.width), []
    planes, stats, tr = run(cfg, field_mover(cfg, seen), B=3, energy=energy)
    ids = torch.cat(tr.deposited_ids)
    assert stats.spawned.sum() > 0
    assert sorted(ids.tolist()) == list(range(tr.created_total))
    torch.testing.assert_close(planes.sum(dim=(1, 2, 3)), energy.sum(dim=(1, 2)), rtol=1e-5, atol=1e-4)
    # the field is empty before anyone wrote; then each flow reads its cell and the sample's mean
    assert seen[0].shape == (3 * cfg.surface, 8) and seen[0].abs().sum() == 0
    assert len(seen) > 1 and (seen[1][:, :4] > 0).all(), "every flow wrote 1 into the cell it reads at the next step"
    assert (seen[1][:, 4:] > 0).all() and (seen[1][:, 4:] <= 1).all(), "the sample's mean of a field of mean messages"


def test_gradients_reach_the_field_and_the_energy_channels():
    torch.manual_seed(0)
    model = EnergyLattice(preset("smoke", interaction="field", energy_channels=2, field_channels=4))
    out = model(torch.nn.functional.normalize(torch.randn(4, 384), dim=-1))
    assert out.planes.shape == (4, 4, 8, 8)
    out.embedding.pow(2).sum().backward()
    message = model.carrier.message_head.weight.grad
    assert message is not None and message.abs().sum() > 0, "what flows write reaches the loss"
    reads = model.carrier.gru.weight_ih_l0.grad[:, -8:]  # the GRU's columns for what a flow reads
    assert reads.abs().sum() > 0
    assert model.carrier.energy_head.weight.grad.shape == (2, 32)
