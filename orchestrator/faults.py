"""Fault injection, for tests of the failure paths: a non-finite loss at one step, a worker process
killed once at one step, a sweep interrupted (as by Ctrl-C) once a number of its trials completed.

Faults are no part of a run's configuration (they are never logged, swept or saved). A launcher
hands a `Faults` to the run context it builds (`LocalContext(..., faults=)`,
`run_ray_train(..., faults=)`, `TuneContext(..., faults=)`), and `train_loop` asks the context.
`Faults()`, every context's default, fires nothing.

`only_for` narrows the faults to runs whose config has the given values at the given dotted paths,
e.g. `Faults(nan_loss_at_step=6, only_for={"seed": 0})`: in a sweep over seeds, only the trial with
seed 0 diverges.

A test that drives the CLI in a subprocess hands it faults through the environment variable
ENERGY_LATTICE_TEST_FAULTS (the JSON of `Faults.to_dict()`): `Faults.from_environment()`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from model.config import ConfigError, field_spec


@dataclass(frozen=True)
class Faults:
    nan_loss_at_step: int | None = None    # the loss of this optimizer step becomes NaN
    crash_at_step: int | None = None       # rank 0 kills its process once at this step (needs a marker folder)
    only_for: dict[str, Any] | None = None  # {dotted config path: value} a run must have for the faults to fire
    # A sweep's driver sends itself SIGINT, what Ctrl-C does, once this many of its trials completed:
    # an interrupt at a known point, whatever the machine's speed.
    interrupt_sweep_after_trials: int | None = None

    def __post_init__(self):
        for name in ("nan_loss_at_step", "crash_at_step", "interrupt_sweep_after_trials"):
            count = getattr(self, name)
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise ConfigError(f"Faults.{name}={count!r} must be a whole number; allowed range [1, 100000000]")

    def active_for(self, cfg: Any) -> bool:
        """Whether these faults fire in a run of `cfg` (a TrainConfig): True unless `only_for` names
        a value `cfg` does not have. ConfigError for a path that is no field of the config."""
        for key, wanted in (self.only_for or {}).items():
            field_spec(type(cfg), key)  # an unknown path is a mistake in the test, not a miss
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            if value != wanted:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, for where faults travel to other processes (Ray Train's worker config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Faults:
        return cls(**data) if data else cls()

    @classmethod
    def from_environment(cls) -> Faults:
        """The faults a test put in ENERGY_LATTICE_TEST_FAULTS; none when it is unset."""
        text = os.environ.get("ENERGY_LATTICE_TEST_FAULTS")
        return cls.from_dict(json.loads(text)) if text else cls()
