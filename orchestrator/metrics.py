"""Every metric name in one place: the flat keys the loop, the reports and the summaries use, and the
sectioned names MLflow stores them under.

Flat keys everywhere but in MLflow (the loop, Ray and Tune reports, summaries, metrics.jsonl):

    val_<score>                  a validation score: val_cosine, val_top1, val_bleu, val_loss,
                                 val_cosine_lattice_only, val_cosine_skip_only, val_steps_used, ...
    lattice_gain, plane_*        measured at a validation, named without `val_` (VALIDATION_KEYS)
    baseline_<name>_<score>      a baseline's score on the same rows (BASELINES x cosine, top1, bleu),
                                 and its fit: baseline_<name>_fit_s, baseline_train_rows, ...
    loss, lr, grad_norm          training; steps_used, completion, spawned_per_sample: the flows;
                                 samples_per_s, step_time_s, peak_mem_gb, parameters: the cost

MLflow's run page groups metrics into sections by the part of the name before "/": sections in
alphabetical order (seen in MLflow 3.17), then ungrouped metrics; `system/` metrics go to the
System metrics tab. Validation is what a run page should open on, so its section is `eval`
(first: eval < flow < train); the baselines are constants (one bar chart each), so theirs is named
to sort last (`val_baseline`). `mlflow_metric_name` is the rule.

This module imports nothing of the project: the loop, the trackers, the console, the launchers'
tables and the sweeps all read their names from here.
"""
from __future__ import annotations

from typing import Any

# --- validation ---------------------------------------------------------------------------------
# Measured at a validation but named without `val_`, as they read in summaries and the scaling table.
VALIDATION_KEYS = ("lattice_gain", "plane_difference", "plane_balance")


def validation_key(name: str) -> str:
    """The flat key of a figure evaluation computed: `cosine` -> `val_cosine`; VALIDATION_KEYS stay."""
    return name if name in VALIDATION_KEYS else f"val_{name}"


# --- baselines ----------------------------------------------------------------------------------
BASELINES = ("identity", "mean_target", "ridge", "kernel_ridge")  # what evaluation.baselines fits


def baseline_key(name: str, score: str) -> str:
    """`baseline_key("ridge", "cosine")` -> `baseline_ridge_cosine`."""
    return f"baseline_{name}_{score}"


def baseline_scores(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{"ridge": {"cosine": .., "top1": ..}, ...} from flat `baseline_<name>_cosine/_top1` keys, in the
    order they were logged, so a baseline added to evaluation shows up without a change here."""
    scores: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for score in ("cosine", "top1"):
            if key.startswith("baseline_") and key.endswith(f"_{score}") and value is not None:
                scores.setdefault(key[len("baseline_"):-len(score) - 1], {})[score] = float(value)
    return scores


# --- a run's summary ----------------------------------------------------------------------------
# What train_loop returns and every launcher's summary holds (besides its own fields).
SUMMARY_KEYS = ("status", "steps", "val_cosine", "val_top1", "val_bleu", "lattice_gain", "val_cosine_skip_only",
                "val_cosine_lattice_only", "val_top1_lattice_only", "plane_difference", "plane_balance",
                "baseline_identity_cosine", "baseline_ridge_cosine", "baseline_kernel_ridge_cosine",
                "baseline_kernel_ridge_top1", "baseline_kernel_ridge_bleu", "mean_steps_used", "completion",
                "checkpoint")
# The figures `train` prints after a run: the summary without its status, steps and checkpoint lines.
SUMMARY_FIGURES = tuple(k for k in SUMMARY_KEYS if k not in ("status", "steps", "checkpoint")) + (
    "baseline_ridge_top1",)
# Each stage's line of the scaling job's table.
STAGE_METRICS = ("val_cosine", "val_top1", "val_cosine_lattice_only", "lattice_gain")
# What a study's cell holds of its trial's final validation (its baselines come from the driver).
CELL_METRICS = ("val_cosine", "val_top1", "val_cosine_lattice_only", "val_top1_lattice_only", "lattice_gain",
                "steps", "wall_time_s", "mean_steps_used")
# `compare`'s columns.
COMPARE_METRICS = ("val_cosine", "val_top1", "val_bleu", "baseline_ridge_cosine", "baseline_identity_cosine")

# --- sweeps -------------------------------------------------------------------------------------
# What a sweep can maximise (`tune --metric`); each is in every validation report of a trial.
SWEEP_METRICS = {
    "val_cosine": "validation cosine of the prediction with the target embedding",
    "lattice_gain": "validation cosine minus that of the shortcut (the skip path alone, or without one the input "
                    "copied unchanged): what the model adds over copying its input. Cosine ignores the skip "
                    "path's scale, so across trials on one dataset this ranks as val_cosine does; it reads as a "
                    "gain, and dropping the skip path cannot inflate it",
    "val_cosine_lattice_only": "validation cosine of the lattice path decoded alone, without the skip path: what "
                               "the lattice itself computes, the objective no shortcut can win",
    "val_cosine_per_hour": "validation cosine gained over the identity baseline (the skip path's starting point) "
                           "per hour of the trial's training: quality for the time spent",
}
# What a trial row's `metrics` (the sweep report's record) holds: every sweep metric and the rest.
TRIAL_METRICS = ("val_cosine", "val_top1", "lattice_gain", "val_cosine_lattice_only", "val_cosine_skip_only",
                 "val_cosine_per_hour")
# What a trial row's `final` holds: its last validation, when it ran to the end.
FINAL_METRICS = TRIAL_METRICS[:-1] + ("val_top1_lattice_only", "steps", "wall_time_s", "mean_steps_used")

# --- MLflow -------------------------------------------------------------------------------------
PREFIX_SECTIONS = {"val_": "eval", "baseline_": "val_baseline", "train_": "train", "flow_": "flow",
                   "system_": "system"}
FLOW_WORDS = ("steps_used", "completion", "spawned")                      # how the flows behaved
SYSTEM_WORDS = ("samples_per_s", "step_time", "mem_gb", "parameters")     # what the run costs


def mlflow_metric_name(key: str, *, with_validation: bool = False) -> str:
    """The MLflow name of a flat metric key, by rule:

    - a known prefix becomes a section: `val_cosine` -> `eval/cosine`, `baseline_ridge_top1` ->
      `val_baseline/ridge_top1`, `val_cosine_skip_only` -> `eval/cosine_skip_only`;
    - an unprefixed key logged together with validation metrics was measured at that validation:
      `lattice_gain` -> `eval/lattice_gain`, `plane_difference` -> `eval/plane_difference`;
    - otherwise flow statistics go to `flow/`, throughput, memory and size to `system/`, and the
      rest (loss, lr, grad_norm) to `train/`.
    A name that already has a section is kept.
    """
    if "/" in key:
        return key
    for prefix, section in PREFIX_SECTIONS.items():
        if key.startswith(prefix):
            return f"{section}/{key[len(prefix):]}"
    if with_validation or key in VALIDATION_KEYS:
        return f"eval/{key}"
    if any(word in key for word in FLOW_WORDS):
        return f"flow/{key}"
    if any(word in key for word in SYSTEM_WORDS):
        return f"system/{key}"
    return f"train/{key}"


def mlflow_metric_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """A batch of flat metrics under their MLflow names (see mlflow_metric_name)."""
    with_validation = any(k.startswith("val_") for k in metrics)
    return {mlflow_metric_name(k, with_validation=with_validation): v for k, v in metrics.items()}


def logged_baselines(metrics: dict[str, float]) -> dict[str, float]:
    """The flat `baseline_*` metrics among a run's logged metrics (MLflow names), every baseline
    that was logged, e.g. {"baseline_ridge_cosine": 0.59, ...}."""
    section = PREFIX_SECTIONS["baseline_"] + "/"
    return {"baseline_" + k[len(section):]: v for k, v in metrics.items() if k.startswith(section)}
