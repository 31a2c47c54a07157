"""The sweep report on result tables built here: planted effects must be found, constants and noise
must not be credited, the Pareto front must match one reasoned out by hand. No Ray, no MLflow."""
import json
import math

import numpy as np
import pytest

from orchestrator.launch.sweep_report import (parameter_importance, pareto_front, summary_text, variance_explained,
                                              write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(trial_id, params, status="completed", **metrics):
    return {"trial_id": trial_id, "params": params, "metrics": metrics, "status": status}


def planted_table(rng, n=40, kind="uniform", noise=0.005):
    """`n` trials whose val_cosine depends on `informative` alone (how depends on `kind`), plus two
    numeric noise parameters, a categorical and a bool one, and one held constant."""
    rows = []
    for i in range(n):
        if kind == "uniform":
            informative = float(rng.uniform(0, 1))
            effect = 0.1 * informative
        elif kind == "loguniform":  # the effect is in decades, as a learning rate's would be
            informative = float(10 ** rng.uniform(-5, -1))
            effect = 0.02 * math.log10(informative)
        elif kind == "categorical":
            informative = str(rng.choice(["residual", "gated", "replace"]))
            effect = {"residual": 0.1, "gated": 0.05, "replace": 0.0}[informative]
        else:  # bool
            informative = bool(rng.integers(2))
            effect = 0.1 * informative
        params = {"informative": informative, "noise_uniform": float(rng.uniform(0.05, 0.3)),
                  "noise_int": int(rng.integers(1, 6)), "noise_choice": str(rng.choice(["a", "b", "c"])),
                  "noise_bool": bool(rng.integers(2)), "constant": 0.3}
        rows.append(record(f"t{i:02d}", params, val_cosine=0.5 + effect + float(rng.normal(0, noise)),
                           steps=1000, wall_time_s=float(rng.uniform(20, 80)),
                           mean_steps_used=float(rng.uniform(4, 16)), max_flow_steps=16))
    return rows


@pytest.mark.parametrize("kind", ["uniform", "loguniform", "categorical", "bool"])
def test_importance_ranks_the_planted_parameter_first(kind):
    trials = planted_table(np.random.default_rng(7), kind=kind)
    importance = parameter_importance(trials, "val_cosine")
    ranked = sorted(importance, key=importance.get, reverse=True)
    assert ranked[0] == "informative", importance
    assert importance["informative"] > 0.5, importance
    assert sum(importance.values()) == pytest.approx(1.0)
    # val_cosine depends on nothing else, so the planted parameter alone explains nearly all of it;
    # equal-width bins over a log-uniform parameter would lump most trials into one bin and fail this
    assert variance_explained(trials, "val_cosine")["informative"] > 0.8


def test_a_parameter_held_constant_gets_nothing():
    trials = planted_table(np.random.default_rng(1))
    for t in trials:
        t["params"]["preset"] = "smoke"
    importance = parameter_importance(trials, "val_cosine")
    assert importance["constant"] == 0.0 and importance["preset"] == 0.0


def test_trials_without_the_metric_are_left_out():
    trials = planted_table(np.random.default_rng(2))
    # infeasible trials carry a misleading parameter value; if they counted, noise_choice="z" would explain them
    trials += [record(f"x{i}", {**trials[0]["params"], "noise_choice": "z"}, status="infeasible", val_cosine=None)
               for i in range(6)]
    trials.append(record("nan", trials[0]["params"], status="diverged", val_cosine=float("nan")))
    importance = parameter_importance(trials, "val_cosine")
    assert max(importance, key=importance.get) == "informative"
    assert importance == parameter_importance(trials[:40], "val_cosine")


def test_pareto_front_of_a_hand_built_table():
    trials = [
        record("a", {}, val_cosine=0.60, wall_time_s=100.0),  # the best quality: on the front
        record("b", {}, val_cosine=0.55, wall_time_s=50.0),   # nothing both better and cheaper: on the front
        record("i", {}, val_cosine=0.55, wall_time_s=50.0),   # b's twin: twins do not dominate each other
        record("c", {}, val_cosine=0.50, wall_time_s=60.0),   # b is better and cheaper
        record("e", {}, val_cosine=0.55, wall_time_s=80.0),   # b is as good and cheaper
        record("d", {}, val_cosine=0.40, wall_time_s=10.0),   # the cheapest: on the front
        record("g", {}, val_cosine=0.39, wall_time_s=10.0),   # d is better at the same cost
        record("f", {}, val_cosine=None, wall_time_s=5.0, status="infeasible"),  # no quality: left out
        record("h", {}, val_cosine=0.70, wall_time_s=None),  # no cost: cannot be placed, left out
    ]
    assert pareto_front(trials) == ["d", "b", "i", "a"]  # cheapest first
    # on another pair of axes: the highest lattice_gain at the fewest flow steps
    other = [record("p", {}, lattice_gain=0.1, mean_steps_used=8.0), record("q", {}, lattice_gain=0.2,
                                                                               mean_steps_used=8.0)]
    assert pareto_front(other, quality="lattice_gain", cost="mean_steps_used") == ["q"]


def test_write_report_writes_the_json_the_plots_and_a_summary_naming_the_best_trial(tmp_path):
    trials = planted_table(np.random.default_rng(3))
    trials.append(record("inf", trials[0]["params"], status="infeasible", val_cosine=None, steps=0))
    report = write_report(trials, "val_cosine", tmp_path / "report")

    saved = json.loads((tmp_path / "report" / "sweep_report.json").read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    for name in ("quality_vs_time.png", "parameter_importance.png", "parallel_coordinates.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_MAGIC, name

    best = max(trials[:40], key=lambda t: t["metrics"]["val_cosine"])
    assert saved["best_trial"]["trial_id"] == best["trial_id"]
    assert saved["scored_trials"] == 40 and saved["trials"] == 41
    assert set(saved["pareto_front"]) <= {t["trial_id"] for t in trials[:40]}
    assert best["trial_id"] in saved["pareto_front"]  # nothing beats the best quality
    assert max(saved["importance"], key=saved["importance"].get) == "informative"
    summary = saved["summary"]
    assert summary.splitlines()[1].startswith("informative explains ")
    assert f"best trial {best['trial_id']} (val_cosine {best['metrics']['val_cosine']:.4f}; informative=" in summary
    assert f"used {best['metrics']['mean_steps_used']:.1f} of 16 flow steps" in summary
    assert "40 completed, 1 infeasible" in summary


@pytest.mark.parametrize("cosines, reason", [
    ([0.5, 0.6, None], "only 2 of 3 trials have a val_cosine"),
    ([], "only 0 of 0 trials"),
    ([0.5, 0.5, 0.5, 0.5], "val_cosine is the same in all 4 trials"),
])
def test_too_little_to_go_on_gives_no_importance_and_says_why(tmp_path, cosines, reason):
    trials = [record(f"t{i}", {"lr": 10.0 ** -i}, val_cosine=c, wall_time_s=10.0 * (i + 1))
              for i, c in enumerate(cosines)]
    importance = parameter_importance(trials, "val_cosine")
    assert importance == {} and reason in importance.reason
    report = write_report(trials, "val_cosine", tmp_path)
    assert report["importance"] == {} and reason in report["importance_reason"]
    assert reason in summary_text(trials, "val_cosine", importance)
    assert (tmp_path / "parameter_importance.png").read_bytes()[:8] == PNG_MAGIC
