"""Carry a trained model over to another lattice size (progressive scaling).

The neuron, the carrier and its heads do not depend on the lattice shape and are copied as they are.
The mapper and the collector are separable maps whose per-axis factors are sampled at cell centres
spanning [-1, 1] (U over y, V over x) plus a per-cell bias; resizing interpolates each factor
linearly along its own axis (align_corners, since the end cells sit at -1 and +1) and the bias
bilinearly. Because the collector averages over cells, a smooth input gives the same features at
either size up to interpolation error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .lattice import EnergyLattice

# The lattice's own size is what transfer changes; every other field that fixes the model's
# parameters must agree between the two models.
LATTICE_SIZE_FIELDS = ("width", "height", "depth")


def _resize_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """Linear interpolation of the last axis to `size` samples, end points kept."""
    if t.shape[-1] == size:
        return t.clone()
    flat = t.reshape(-1, 1, t.shape[-1])
    return F.interpolate(flat, size=size, mode="linear", align_corners=True).reshape(*t.shape[:-1], size)


def resize_state_dict(state: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """A model state dict with the mapper's and collector's spatial factors resized to height x width."""
    out = dict(state)
    for prefix in ("mapper.", "collector."):
        out[prefix + "row_factors"] = _resize_last(state[prefix + "row_factors"], height)
        out[prefix + "col_factors"] = _resize_last(state[prefix + "col_factors"], width)
    bias = state["mapper.bias"]
    if bias.shape != (height, width):
        out["mapper.bias"] = F.interpolate(bias[None, None], size=(height, width), mode="bilinear",
                                           align_corners=True)[0, 0]
    return out


def transfer(source: EnergyLattice, target_cfg: ModelConfig) -> EnergyLattice:
    """A new model for `target_cfg` starting from `source`'s weights (resized where shape-bound)."""
    source_fields, target_fields = source.cfg.shape_fields(), target_cfg.shape_fields()
    mismatched = [f"{k}: source {v} vs target {target_fields[k]}" for k, v in source_fields.items()
                  if k not in LATTICE_SIZE_FIELDS and v != target_fields[k]]
    if mismatched:
        raise ValueError("cannot carry weights between these models: " + "; ".join(mismatched))
    target = EnergyLattice(target_cfg)
    target.load_state_dict(resize_state_dict(source.state_dict(), target.cfg.height, target.cfg.width))
    return target
