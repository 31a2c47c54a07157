"""How the signal gets through the lattice: the energy the mapper gives a flow reaches the planes,
both planes receive input-dependent energy by a split that learns, and the skip and lattice
ablations are what they say they are. Checkpoints of the model as it was before are refused by name.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import EnergyLattice, lattice_loss, preset
from model.config import saved_model_config
from orchestrator.checkpoint import CheckpointError, check_compatible, load_model, save_checkpoint

SMOKE = preset("smoke")


def unit_inputs(n, dim=384, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def deposits_by_flow(out):
    """(initial energy of each deposited flow, energy it deposited), matched by flow id."""
    ids = torch.cat(out.trace.deposited_ids)
    deposited = torch.cat(out.trace.deposited_energy)
    initial = out.trace.initial_energy.reshape(-1)
    original = ids < len(initial)  # spawned children have no initial energy of their own
    return initial[ids[original]], deposited[original]


def test_at_initialisation_each_flow_delivers_the_energy_the_mapper_gave_it():
    torch.manual_seed(0)
    model = EnergyLattice(dataclasses.replace(SMOKE, max_spawn_per_step=0))  # no children: one deposit per flow
    initial, deposited = deposits_by_flow(model(unit_inputs(4), trace=True))
    torch.testing.assert_close(deposited, initial)
    # the original carrier overwrote the energy with its own head: what arrived did not depend on it
    torch.manual_seed(0)
    replacing = EnergyLattice(dataclasses.replace(SMOKE, max_spawn_per_step=0, energy_update="replace"))
    initial, deposited = deposits_by_flow(replacing(unit_inputs(4), trace=True))
    assert torch.corrcoef(torch.stack([initial, deposited]))[0, 1].abs() < 0.5


@pytest.mark.parametrize("energy_update", ["residual", "gated"])
def test_deposited_energy_follows_the_initial_energy_with_spawning_on(energy_update):
    torch.manual_seed(0)
    model = EnergyLattice(dataclasses.replace(SMOKE, spawn_threshold=0.02, energy_update=energy_update))
    out = model(unit_inputs(4), trace=True)
    assert out.stats.spawned.sum() > 0, "the case must spawn"
    initial, deposited = deposits_by_flow(out)
    assert torch.corrcoef(torch.stack([initial, deposited]))[0, 1] > 0.5


def test_at_initialisation_predictions_differ_between_inputs():
    torch.manual_seed(0)
    model = EnergyLattice(SMOKE)
    x = unit_inputs(6)
    grid = model.mapper(x)
    assert grid.std(dim=0).mean() > 0.1, "the input-dependent spread of the energy grid is O(0.1-1)"
    lattice = F.normalize(model(x).lattice_only, dim=-1)
    off_diagonal = (lattice @ lattice.T)[~torch.eye(6, dtype=torch.bool)]
    assert off_diagonal.mean() < 0.9


def test_both_planes_receive_input_dependent_energy_and_the_split_has_a_gradient():
    torch.manual_seed(0)
    model = EnergyLattice(SMOKE)  # learned split (the default)
    a, b = model(unit_inputs(3, seed=1)), model(unit_inputs(3, seed=2))
    for plane in (0, 1):
        assert a.planes[:, plane].abs().sum() > 0
        assert (a.planes[:, plane] - b.planes[:, plane]).abs().sum() > 0, "plane energy must depend on the input"
    (a.planes[:, 1] - a.planes[:, 0]).pow(2).sum().backward()
    assert model.carrier.split_head.weight.grad.abs().sum() > 0
    # with the hard split a flow's energy goes only to the plane it reached: the split head is gone
    hard = EnergyLattice(dataclasses.replace(SMOKE, plane_split="arrival"))
    assert hard.carrier.split_head is None


def test_skip_only_is_the_output_with_the_lattice_term_zeroed():
    torch.manual_seed(0)
    model = EnergyLattice(SMOKE)
    x = unit_inputs(4)
    with torch.no_grad():
        model.skip_scale.fill_(0.7)
        out = model(x)
        torch.testing.assert_close(out.skip_only, 0.7 * x)
        model.collector.out.weight.zero_()
        model.collector.out.bias.zero_()
        torch.testing.assert_close(model(x).embedding, out.skip_only)


def test_lattice_only_is_the_collectors_output_alone():
    torch.manual_seed(0)
    model = EnergyLattice(SMOKE)
    x = unit_inputs(4)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.lattice_only, model.collector(out.planes))
        torch.testing.assert_close(out.embedding, out.skip_only + out.lattice_only)
        model.skip_scale.zero_()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
    torch.testing.assert_close(a.embedding, b.lattice_only)
    no_skip = EnergyLattice(dataclasses.replace(SMOKE, skip=False))
    out = no_skip(x)
    assert out.skip_only is None and no_skip.skip_scale is None
    assert torch.equal(out.embedding, out.lattice_only)


def test_gradients_reach_the_skip_scale_and_every_head():
    torch.manual_seed(0)
    model = EnergyLattice(dataclasses.replace(SMOKE, energy_update="gated"))
    x = unit_inputs(4)
    lattice_loss(model(x), x.flip(0), model.cfg).backward()
    for name in ("skip_scale", "carrier.energy_head.weight", "carrier.gate_head.weight",
                 "carrier.split_head.weight", "carrier.move_head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def old_model_config(**changes):
    """A model config as saved before collector_rank, energy_update, plane_split, skip and
    mapper_layer_norm existed (those keys absent), with the old default rank 16."""
    saved = dataclasses.asdict(preset("smoke", mapper_rank=16))
    for key in ("collector_rank", "energy_update", "plane_split", "skip", "mapper_layer_norm"):
        del saved[key]
    return {**saved, **changes}


def test_a_checkpoint_from_before_this_model_is_refused_naming_the_fields(tmp_path):
    saved = old_model_config()
    old = EnergyLattice(saved_model_config(saved))  # the model those checkpoints hold
    assert old.skip_scale is None and old.carrier.split_head is None
    save_checkpoint(tmp_path / "old", {"model": old.state_dict(), "model_config": saved})
    from orchestrator.checkpoint import load_checkpoint
    state = load_checkpoint(tmp_path / "old")
    with pytest.raises(CheckpointError) as err:
        check_compatible(state, preset("smoke").resolved())
    for field in ("mapper_rank", "collector_rank", "energy_update", "plane_split", "skip", "mapper_layer_norm"):
        assert field in str(err.value)
    # on its own it loads as the model it is, with the original behaviour
    loaded = load_model(tmp_path / "old")
    assert loaded.cfg.energy_update == "replace" and loaded.cfg.plane_split == "arrival"
    assert loaded.mapper.row_factors.shape[0] == 16


def test_a_frozen_carrier_stays_at_its_initialisation_while_the_rest_trains():
    torch.manual_seed(0)
    model = EnergyLattice(dataclasses.replace(SMOKE, freeze_carrier=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        lattice_loss(model(unit_inputs(8)), unit_inputs(8, seed=1), model.cfg).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("neuron.", "carrier."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["mapper.row_factors"], after["mapper.row_factors"])
    assert not torch.equal(before["collector.out.weight"], after["collector.out.weight"])
