"""The report of a finished sweep: which sampled parameters mattered, which trials are worth their
cost, and a few lines that say so. Plain functions over a list of trial records, so the sweep driver
(or a notebook reading a parent run's trials.json) can call them after the sweep; no Ray, no MLflow.

A trial record:

    {"trial_id": "abc123",
     "params": {"model.spawn_threshold": 0.12, "preset": "smoke", ...},   # the sampled values only
     "metrics": {"val_cosine": 0.61 | None,       # None: never validated (e.g. infeasible)
                 "lattice_gain": 0.05 | None,
                 "steps": 1000,                   # optimizer steps the trial ran
                 "mean_steps_used": 7.2 | None,   # flow steps per forward pass at its last validation
                 "max_flow_steps": 16 | None,     # optional: the flow step limit, for the convergence line
                 "wall_time_s": 56.0 | None, ...},
     "status": "completed" | "stopped" | "diverged" | "infeasible" | "error"}

A trial counts for a metric when that metric is a finite number; its status does not decide it,
since an ASHA-stopped or diverged trial's best validation is still a measurement of its config.
Higher is better for the quality metric, lower for the cost.

Parameter importance is a first-order variance decomposition (the main effects of fANOVA, without
its random forest): each parameter's values split the trials into groups (a categorical's values,
a numeric's distinct values when few, otherwise quantile bins), and the parameter explains the
between-group share of the metric's variance. Why this rather than permutation importance of a
fitted regression: it needs no model choice, treats categoricals and numerics alike, and stays
readable with a dozen trials; what it cannot see is interactions, which a sweep of tens of trials
could not estimate anyway. Small groups make even a useless parameter explain some variance by
chance, so each share is chance-corrected (epsilon squared of a one-way ANOVA) and clipped at 0.
Quantile bins depend only on the order of values, so a log-uniformly sampled parameter (all
positive, spanning > 10x) is binned exactly as its logarithm would be: equal-width bins would put
most such trials into the first bin.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the sweep driver runs where there is no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..observe.plots import parallel_coordinates, save_figure  # noqa: E402

MIN_TRIALS = 3  # below this, no variance can be split between groups
MAX_BINS = 10
REPORT_FILE = "sweep_report.json"


class Importance(dict):
    """{param: share}, shares summing to 1 (or all 0); `reason` says why it is empty or all zero."""

    def __init__(self, shares: dict[str, float] | None = None, reason: str | None = None):
        super().__init__(shares or {})
        self.reason = reason


def metric_value(trial: dict, name: str) -> float | None:
    """The trial's `name` metric as a float, or None when it is missing, not a number or not finite."""
    value = (trial.get("metrics") or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def scored_trials(trials: list[dict], metric: str) -> list[dict]:
    """The trials that have a finite value of `metric`."""
    return [t for t in trials if metric_value(t, metric) is not None]


def sampled_params(trials: list[dict]) -> list[str]:
    """Every parameter name sampled in any trial, in first-seen order."""
    return list(dict.fromkeys(name for t in trials for name in (t.get("params") or {})))


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _groups(values: list, n_bins: int) -> np.ndarray:
    """A group index per trial: one group per categorical value (bools, strings, None and mixed
    columns are categorical), per numeric value when there are at most `n_bins` of them, else per
    quantile bin."""
    if all(_is_number(v) for v in values):
        x = np.asarray(values, dtype=float)
        if len(np.unique(x)) > n_bins:
            inner = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1]))
            return np.searchsorted(inner, x, side="right")
        return np.unique(x, return_inverse=True)[1]
    return np.unique([repr(v) for v in values], return_inverse=True)[1]


def _explained(y: np.ndarray, groups: np.ndarray) -> float:
    """Chance-corrected share of the variance of `y` between `groups` (epsilon squared)."""
    counts = np.bincount(groups)
    n, k = len(y), int((counts > 0).sum())  # quantile edges on tied values can leave a bin empty
    total = float(((y - y.mean()) ** 2).sum())
    if k < 2 or n <= k or total == 0.0:
        return 0.0  # one group explains nothing; one trial per group leaves no within-group noise to judge by
    means = np.bincount(groups, weights=y) / np.maximum(counts, 1)
    between = float((counts * (means - y.mean()) ** 2).sum())
    within_mean_square = (total - between) / (n - k)
    return max(0.0, (between - (k - 1) * within_mean_square) / total)


def variance_explained(trials: list[dict], metric: str) -> dict[str, float]:
    """{param: fraction of the variance of `metric` its values alone explain}, chance-corrected,
    over the trials that have the metric; {} when fewer than MIN_TRIALS have it."""
    scored = scored_trials(trials, metric)
    if len(scored) < MIN_TRIALS:
        return {}
    y = np.array([metric_value(t, metric) for t in scored])
    # ~sqrt(n) bins: enough to see a trend, while each bin keeps several trials for its mean
    n_bins = max(2, min(MAX_BINS, round(math.sqrt(len(scored)))))
    return {name: _explained(y, _groups([t["params"].get(name) for t in scored], n_bins))
            for name in sampled_params(scored)}


def parameter_importance(trials: list[dict], metric: str) -> Importance:
    """{param: share of the explained variance of `metric`}, shares summing to 1; a parameter held
    constant gets 0. Empty, with `reason` set, when there are too few scored trials or nothing varies."""
    scored = scored_trials(trials, metric)
    if len(scored) < MIN_TRIALS:
        return Importance(reason=f"only {len(scored)} of {len(trials)} trials have a {metric}; "
                                 f"importance needs at least {MIN_TRIALS}")
    if not sampled_params(scored):
        return Importance(reason="the trials sampled no parameters")
    if len({metric_value(t, metric) for t in scored}) == 1:
        return Importance(reason=f"{metric} is the same in all {len(scored)} trials")
    explained = variance_explained(scored, metric)
    total = sum(explained.values())
    if total == 0.0:
        return Importance(dict.fromkeys(explained, 0.0),
                          reason=f"no parameter explains more of the variance in {metric} than chance would")
    return Importance({name: value / total for name, value in explained.items()})


def pareto_front(trials: list[dict], quality: str = "val_cosine", cost: str = "wall_time_s") -> list[str]:
    """Ids of the trials that no other trial beats on both axes (higher `quality`, lower `cost`),
    cheapest first. Trials missing either metric are left out; identical trials do not dominate
    each other, so both stay."""
    points = [(t["trial_id"], metric_value(t, quality), metric_value(t, cost)) for t in trials]
    points = [p for p in points if p[1] is not None and p[2] is not None]

    def dominated(q, c):
        return any(oq >= q and oc <= c and (oq > q or oc < c) for _, oq, oc in points)

    front = [p for p in points if not dominated(p[1], p[2])]
    return [trial_id for trial_id, _, _ in sorted(front, key=lambda p: (p[2], -p[1], p[0]))]


def best_trial(trials: list[dict], metric: str) -> dict | None:
    """The trial with the highest `metric` (the first such, on a tie), or None if none has it."""
    scored = scored_trials(trials, metric)
    return max(scored, key=lambda t: metric_value(t, metric)) if scored else None


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_text(trials: list[dict], metric: str, importance: dict[str, float]) -> str:
    """A few factual lines about the sweep, derived only from the records and `importance`."""
    scored = scored_trials(trials, metric)
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t.get("status", "unknown")] = statuses.get(t.get("status", "unknown"), 0) + 1
    lines = [f"{len(trials)} trials ({', '.join(f'{n} {s}' for s, n in statuses.items())}); "
             f"{len(scored)} have a {metric}"]

    ranked = sorted(importance.items(), key=lambda kv: -kv[1])
    if ranked and ranked[0][1] > 0:
        top, share = ranked[0]
        alone = variance_explained(trials, metric).get(top, 0.0)
        lines.append(f"{top} explains {alone:.0%} of the variance in {metric} across {len(scored)} trials "
                     f"({share:.0%} of what the sampled parameters explain)")
        others = [f"{name} {s:.0%}" for name, s in ranked[1:] if s > 0]
        if others:
            lines.append("then: " + ", ".join(others))
    else:
        reason = getattr(importance, "reason", None) or "no parameter explains the variance"
        lines.append(f"parameter importance for {metric}: none ({reason})")

    best = best_trial(trials, metric)
    if best is not None:
        order = [name for name, _ in ranked] + [n for n in best.get("params", {}) if n not in importance]
        params = ", ".join(f"{n}={_format_value(best['params'][n])}" for n in order if n in best.get("params", {}))
        m = best["metrics"]
        facts = [f"{int(m['steps']):,} steps" if metric_value(best, "steps") is not None else None,
                 f"{m['wall_time_s']:,.0f} s" if metric_value(best, "wall_time_s") is not None else None]
        lines.append(f"best trial {best['trial_id']} ({metric} {metric_value(best, metric):.4f}"
                     + (f"; {params}" if params else "") + ")"
                     + "".join(f", {f}" for f in facts if f))
        used = metric_value(best, "mean_steps_used")
        if used is not None:
            limit = metric_value(best, "max_flow_steps")
            lines.append(f"adaptive convergence: best trial used {used:.1f}"
                         + (f" of {limit:.0f}" if limit is not None else "") + " flow steps")
    return "\n".join(lines)


def quality_vs_time_plot(trials: list[dict], path: str | Path, quality: str = "val_cosine",
                         cost: str = "wall_time_s") -> Path:
    """Scatter of every trial's `quality` against its `cost`, the Pareto front joined and labelled."""
    points = {t["trial_id"]: (metric_value(t, cost), metric_value(t, quality)) for t in trials}
    points = {k: v for k, v in points.items() if None not in v}
    front = pareto_front(trials, quality, cost)
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        xs, ys = zip(*points.values())
        ax.scatter(xs, ys, color="grey", alpha=0.6, label="trial")
        fx, fy = zip(*(points[k] for k in front))
        ax.plot(fx, fy, color="tab:red", marker="o", drawstyle="steps-post", label="Pareto front")
        for trial_id in front:
            ax.annotate(trial_id, points[trial_id], textcoords="offset points", xytext=(4, 4), fontsize=7)
        if min(xs) > 0 and max(xs) > 10 * min(xs):
            ax.set_xscale("log")  # costs spanning an order of magnitude would crowd the cheap end
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, f"no trial has both {quality} and {cost}", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel=cost, ylabel=quality, title=f"{quality} vs {cost} ({len(points)} trials)")
    return save_figure(fig, Path(path))


def importance_plot(importance: dict[str, float], path: str | Path) -> Path:
    """Horizontal bars of each parameter's importance share, the largest on top."""
    ranked = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, max(2.0, 0.4 * len(ranked) + 1)))
    if ranked:
        names, shares = zip(*ranked)
        bars = ax.barh(names, shares, color="tab:blue")
        ax.bar_label(bars, labels=[f"{s:.0%}" for s in shares], fontsize=7, padding=2)
        ax.set_xlim(0, max(1.0, max(shares)) * 1.1)
    else:
        reason = getattr(importance, "reason", None) or "no parameters"
        ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
        ax.set_yticks([])
    ax.set(xlabel="share of the variance the sampled parameters explain", title="parameter importance")
    return save_figure(fig, Path(path))


def write_report(trials: list[dict], metric: str, out_dir: str | Path) -> dict:
    """Write sweep_report.json and its plots into `out_dir` (a folder to log as MLflow artifacts);
    return what the JSON holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    importance = parameter_importance(trials, metric)
    best = best_trial(trials, metric)
    scored = scored_trials(trials, metric)
    # parallel_coordinates reads the metric at the top level of each record
    flat = [{"params": t.get("params") or {}, metric: metric_value(t, metric)} for t in scored]
    plots = [quality_vs_time_plot(trials, out_dir / "quality_vs_time.png", quality=metric),
             importance_plot(importance, out_dir / "parameter_importance.png"),
             parallel_coordinates(flat, sampled_params(scored), out_dir / "parallel_coordinates.png", metric=metric)]
    report = {
        "metric": metric,
        "trials": len(trials),
        "scored_trials": len(scored),
        "importance": dict(importance),
        "importance_reason": importance.reason,
        "variance_explained": variance_explained(trials, metric),
        "pareto_front": pareto_front(trials, quality=metric),
        "pareto_axes": {"quality": metric, "cost": "wall_time_s"},
        "best_trial": best,
        "summary": summary_text(trials, metric, importance),
        "plots": [p.name for p in plots],
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report
