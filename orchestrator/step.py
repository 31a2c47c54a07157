"""`train_step`: one optimizer step of the lattice, the only one there is.

The training loop, the benchmark (`bench`, `bench --compare`), the memory planner's measurement
and gpu-check's benchmark all run this function, so the step they time and measure is the step
that trains: the same loss scaling over micro-batches, the same non-finite check before the
update, the same gradient clipping and GradScaler handling.

It imports torch and `model` only. `bench --compare REF` runs it against another commit's `model/`
(see perf/bench_step.py), so it uses nothing of the model beyond calling it, `lattice_loss` and
the output's `stats`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model import lattice_loss

# The profile's record_function labels, in the order the step runs them.
PHASES = ("forward", "loss", "backward", "optimizer")
# Training's gradient clipping (TrainConfig.grad_clip's default), which bench and the memory
# measurement take too, so they run the step as a default run trains.
DEFAULT_GRAD_CLIP = 1.0


@dataclass
class StepOutcome:
    """What one optimizer step did. Tensors stay on the device: reading them is a host sync."""
    loss: float                      # summed over the micro-batches (each scaled by 1/micro-batches)
    applied: bool                    # False: a non-finite loss; gradients dropped, weights untouched
    grad_norm: torch.Tensor | None   # before clipping; None when not applied
    stats: list[Any]                 # each micro-batch's FlowStats


def local_finite_check(loss_sum: torch.Tensor) -> tuple[float, bool]:
    """(loss, whether it is non-finite) for one process; a distributed run passes one that agrees
    across ranks (context.step_check), so every rank skips the same update."""
    value = float(loss_sum)
    return value, not math.isfinite(value)


def train_step(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None, *,
               grad_clip: float = DEFAULT_GRAD_CLIP, forward_model: nn.Module | None = None,
               finite_check: Callable[[torch.Tensor], tuple[float, bool]] = local_finite_check,
               after_forward: Callable[[], None] | None = None, poison_loss: bool = False) -> StepOutcome:
    """Forward and backward over `batches` (micro-batches of (inputs, targets), gradients
    accumulated), then clipping and the update, unless the loss is not finite.

    forward_model: the model as a launcher wrapped it (DDP); gradients are all-reduced on the last
        micro-batch only. Clipping and the optimizer work on `model`'s parameters.
    grad_clip: max global gradient norm (0: none; the norm is still computed and returned).
    finite_check: reads the loss on the host and says whether any rank's was non-finite.
    after_forward: called once the last micro-batch's loss is computed (bench times the forward).
    poison_loss: a test fault: the loss becomes NaN, to exercise the divergence path.
    """
    forward_model = forward_model or model
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)  # disabled: scale and unscale do nothing

    loss_sum, stats = None, []
    for i, (inputs, targets) in enumerate(batches):
        last = i == len(batches) - 1
        no_sync = getattr(forward_model, "no_sync", None)
        with (contextlib.nullcontext() if last or no_sync is None else no_sync()):
            with torch.profiler.record_function("forward"):
                out = forward_model(inputs)
            with torch.profiler.record_function("loss"):
                loss = lattice_loss(out, targets, model.cfg) / len(batches)
                if poison_loss:
                    loss = loss * float("nan")
            if last and after_forward is not None:
                after_forward()
            with torch.profiler.record_function("backward"):
                scaler.scale(loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        stats.append(out.stats)

    loss_value, non_finite = finite_check(loss_sum)
    with torch.profiler.record_function("optimizer"):
        if non_finite:  # drop this step's gradients: the weights stay those of the last good step
            optimizer.zero_grad(set_to_none=True)
            return StepOutcome(loss_value, False, None, stats)
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss_value, True, grad_norm.detach(), stats)
