"""The search-space language of `python -m orchestrator tune`: YAML files that map config field
paths to one distribution each.

    model.spawn_threshold: {uniform: [0.05, 0.3]}
    model.convergence_patience: {randint: [1, 6]}   # upper bound exclusive, as in Ray Tune
    lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.mapper_rank: {quniform: [8, 32, 8]}
    model.max_spawn_per_step: {grid: [0, 2]}        # every value, each num_samples times
    preset: {choice: [smoke, debug]}                # the lattice preset itself

`load_space` checks every key against TrainConfig and every value against the field's type and
range before anything starts, so a bad file fails in a line that names the file and key.
Ray is imported only when the space is turned into Tune's form (`SearchSpace.param_space`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model import PRESETS
from model.config import ConfigError, base_type, check_field, field_spec

from ..config import TrainConfig

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file, the key and the problem."""


@dataclass
class SearchSpace:
    entries: dict[str, tuple[str, list]] = field(default_factory=dict)  # key -> (distribution, args)
    files: dict[str, str] = field(default_factory=dict)                 # file name -> its text

    def param_space(self) -> dict[str, Any]:
        from ray import tune
        make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a),
                "quniform": lambda a: tune.quniform(*a)}
        return {key: make[dist](args) for key, (dist, args) in self.entries.items()}

    def grid_size(self) -> int:
        """Trials per sample: the product of the grid axes' lengths."""
        return math.prod(len(args) for dist, args in self.entries.values() if dist == "grid")

    def describe(self) -> dict[str, str]:
        return {key: f"{dist}({', '.join(map(str, args))})" for key, (dist, args) in self.entries.items()}


def _check_entry(where: str, key: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}: expected one distribution such as {{uniform: [low, high]}}, got {spec!r}")
    dist, args = next(iter(spec.items()))
    if dist not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if key == "preset":
        if dist not in ("choice", "grid") or not isinstance(args, list) or not args:
            raise SpaceError(f"{where}: preset takes choice or grid over a list of preset names")
        unknown = [a for a in args if a not in PRESETS]
        if unknown:
            raise SpaceError(f"{where}: unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
        return dist, args
    try:
        tp, _ = field_spec(TrainConfig, key)
    except ConfigError:
        raise SpaceError(f"{where}: unknown config field (use dotted paths such as lr or "
                         f"model.spawn_threshold)") from None
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{where}: {dist} needs a non-empty list of values")
        for value in args:
            _check_value(where, key, value)
        return dist, args
    n = 3 if dist == "quniform" else 2
    if not isinstance(args, list) or len(args) != n or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        shape = "[low, high, q]" if n == 3 else "[low, high]"
        raise SpaceError(f"{where}: {dist} needs {shape} numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise SpaceError(f"{where}: bad bounds: low {low} must be below high {high}")
    if dist == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: bad bounds: loguniform needs low > 0, got {low}")
    if dist == "quniform" and args[2] <= 0:
        raise SpaceError(f"{where}: bad bounds: quniform needs q > 0, got {args[2]}")
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}: randint needs integer bounds, got {args!r}")
    integer_field = base_type(tp)[0] is int
    integral = dist == "randint" or (dist == "quniform" and all(float(a).is_integer() for a in args))
    if integer_field and not integral:
        raise SpaceError(f"{where}: {key} is an integer field; use randint, choice or grid, or quniform "
                         f"with integer bounds and step")
    top = high - 1 if dist == "randint" else high  # randint's upper bound is exclusive
    for value in (low, top):
        _check_value(where, key, int(value) if integer_field else float(value))
    return dist, args


def _check_value(where: str, key: str, value: Any) -> None:
    try:
        check_field(TrainConfig, key, value)
    except ConfigError as e:
        raise SpaceError(f"{where}: bad value: {e}") from None


def load_space(paths: list[str | Path]) -> SearchSpace:
    """Merge space files into one search space; a key may appear in only one file."""
    space, origin = SearchSpace(), {}
    for path in map(Path, paths):
        if not path.exists():
            raise SpaceError(f"{path}: no such search-space file")
        text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise SpaceError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise SpaceError(f"{path}: expected a mapping of config field -> distribution")
        for key, spec in data.items():
            where = f"{path}: {key}"
            if key in origin:
                raise SpaceError(f"{where}: also defined in {origin[key]}")
            space.entries[key] = _check_entry(where, str(key), spec)
            origin[key] = path
        space.files[path.name] = text
    if not space.entries:
        raise SpaceError(f"{', '.join(map(str, paths))}: the search space is empty")
    return space
