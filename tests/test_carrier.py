"""The carrier runs in as few kernels as it can (model/lattice.py: StepGRU, EnergyCarrier); these
check it still computes the textbook model: nn.GRU's step, and each head applied on its own."""
import itertools

import pytest
import torch
from torch import nn

from model.lattice import EnergyCarrier, StepGRU


def test_step_gru_is_one_step_of_nn_gru_with_the_same_weights():
    torch.manual_seed(0)
    step, reference = StepGRU(17, 32, 2), nn.GRU(17, 32, 2)
    reference.load_state_dict(step.state_dict())  # same names and shapes, so checkpoints load either way
    x, h = torch.randn(50, 17, requires_grad=True), torch.randn(2, 50, 32, requires_grad=True)
    state, top = step(x, h)
    _, expected = reference(x[None], h)
    torch.testing.assert_close(state, expected)
    assert torch.equal(top, state[-1])
    weights = torch.randn_like(expected)
    new = torch.autograd.grad((state * weights).sum(), [x, h, *step.parameters()])
    old = torch.autograd.grad((expected * weights).sum(), [x, h, *reference.parameters()])
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("energy_update, plane_split", list(itertools.product(("residual", "gated", "replace"),
                                                                              ("learned", "arrival"))))
@pytest.mark.parametrize("channels, field", [(1, 0), (3, 4)])
def test_heads_in_one_matmul_equal_each_head_on_its_own(energy_update, plane_split, channels, field):
    torch.manual_seed(0)
    carrier = EnergyCarrier(8, 32, 2, energy_update, plane_split, split_energy_gain=2.0, energy_channels=channels,
                            field_channels=field)
    nn.init.normal_(carrier.energy_head.weight)  # the residual head starts at zero: make it count
    features, energy = torch.randn(40, 8), torch.randn(40, channels, requires_grad=True)
    context = torch.randn(40, 2 * field, requires_grad=True) if field else None
    hidden = torch.randn(2, 40, 32)
    state, new_energy, move, split, message = carrier(features, energy, hidden, context)

    h = state[-1]
    head = torch.tanh(carrier.energy_head(h))
    expected_energy = {"residual": energy + head, "replace": head,
                       "gated": torch.lerp(energy, head, torch.sigmoid(carrier.gate_head(h)))
                       if carrier.gate_head is not None else None}[energy_update]
    torch.testing.assert_close(new_energy, expected_energy)
    assert new_energy.shape == (40, channels)
    torch.testing.assert_close(move, torch.tanh(carrier.move_head(h)))
    expected_message = torch.tanh(carrier.message_head(h)) if field else None
    if field:
        torch.testing.assert_close(message, expected_message)
        # what a flow reads from the field reaches its state
        assert torch.autograd.grad(state.sum(), context, retain_graph=True)[0].abs().sum() > 0
    else:
        assert message is None and carrier.message_head is None
    if plane_split == "arrival":
        assert split is None
        return
    expected_split = torch.sigmoid(carrier.split_head(h) + carrier.split_energy_gain * expected_energy)
    torch.testing.assert_close(split, expected_split)
    parameters = [energy, *carrier.parameters()]
    extra = (lambda m: m.sum()) if field else (lambda m: 0)
    new = torch.autograd.grad((new_energy * 3 + split * 2).sum() + move.sum() + extra(message), parameters,
                              retain_graph=True)
    old = torch.autograd.grad((expected_energy * 3 + expected_split * 2).sum() + torch.tanh(carrier.move_head(h)).sum()
                              + extra(expected_message), parameters)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b)
