"""Population Based Training as sweeps use it (imported only for `--scheduler pbt`: it needs Ray)."""
from __future__ import annotations

from ray.tune.schedulers import PopulationBasedTraining


class PBTBeforeTheLastStep(PopulationBasedTraining):
    """PBT that leaves a trial alone at its last step: copying another trial's final checkpoint there
    would only make it a duplicate of that trial (and restart it to report its summary)."""

    def __init__(self, last_step: int, **kwargs):
        super().__init__(**kwargs)
        self.last_step = last_step

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) >= self.last_step:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
