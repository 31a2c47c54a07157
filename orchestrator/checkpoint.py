"""Checkpoints: one directory per checkpoint holding `state.pt` (and `meta.json` for humans).

`state.pt` holds the model, optimizer, lr schedule, grad scaler, step, RNG states, the data
position and the resolved configs, and loads with `torch.load(weights_only=True)`: nothing in it
needs pickled code. Files are written to a temporary name and renamed, so a crash mid-write
leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model import EnergyLattice, ModelConfig
from model.config import saved_model_config

from .files import atomic_write

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, or from another model shape."""


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Write `state` (a dict of tensors, numbers, strings, lists and dicts) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / STATE_FILE, lambda p: torch.save({"format": FORMAT_VERSION, **state}, p))
    if meta is not None:
        atomic_write(directory / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
    return directory


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory (or its state.pt) safely, with a clear error when it is bad."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"no checkpoint at {path} (expected {file})")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a cut-off zip archive
        raise CheckpointError(f"checkpoint {file} is truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise CheckpointError(f"{file} is not an energy-lattice checkpoint (format {FORMAT_VERSION})")
    return state


def check_compatible(state: dict[str, Any], cfg: ModelConfig, source: str = "checkpoint") -> None:
    """Refuse a checkpoint whose parameter shapes differ from `cfg`, naming every mismatching field."""
    saved = saved_model_config(state["model_config"]).shape_fields()
    wanted = cfg.shape_fields()
    diff = [f"{k}: {source} {saved[k]} vs config {wanted[k]}" for k in wanted if saved[k] != wanted[k]]
    if diff:
        raise CheckpointError(f"{source} is from another lattice or model size: " + "; ".join(diff))


def model_config_of(state: dict[str, Any]) -> ModelConfig:
    return saved_model_config(state["model_config"])


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> EnergyLattice:
    """An EnergyLattice rebuilt from a checkpoint, in eval mode."""
    state = load_checkpoint(path, map_location)
    model = EnergyLattice(model_config_of(state))
    model.load_state_dict(state["model"])
    return model.eval()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under `root` named step_NNNNNNNN, oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists())
