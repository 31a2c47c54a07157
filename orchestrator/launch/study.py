"""A scaling study: does quality grow with lattice size and with data, and by more than the seed spread?

`python -m orchestrator study --presets scale-12,scale-24 --data-sizes 4000,16000,64000 --seeds 2`
runs the grid lattice size x training rows x seed (x any `--set key=a,b` switch) as the trials of one
Tune sweep (orchestrator/launch/tune.py: one MLflow parent run, a child run per cell, each cell's model
registered), on one machine or a cluster. Every cell validates on the same rows: a dataset's
validation split does not depend on how many training rows a cell takes (`train_rows` takes the
first N, so a smaller sample is part of a larger one). The baselines are fitted once per data size
on that cell's training rows (ridge, kernel ridge by Nystroem beyond a few thousand rows).

Each cell is scored by its final validation, not its best one: the baselines never see validation
rows, and neither does the choice of what is reported for the lattice.

The report on the parent run: quality against lattice size for each data size and against data size
for each lattice size (cosine and top-1, mean over seeds with the seed spread as error bars, each
data size's baselines beside them), a table of every cell, and an answer in the run's description:
"at 64,000 rows scale-24 beats scale-12 by X +- Y cosine; the lattice is Z below kernel ridge".
The spread is the sample standard deviation over seeds; a difference's spread is that of one run
of each (sqrt(sd_a^2 + sd_b^2)), so "beats by more than the spread" means more than one run's luck.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model import PRESETS
from model.config import ConfigError, check_field, parse_value

from ..config import TrainConfig, make_config
from ..metrics import CELL_METRICS, baseline_key
from .ray_train import Placement
from .search_space import SearchSpace

log = logging.getLogger(__name__)

# The figures a study compares, each a validation metric of every cell and, but for the lattice-only
# one, of the baselines.
QUALITY = ("val_cosine", "val_top1")
BASELINES = ("identity", "ridge", "kernel_ridge")
GRID_KEYS = ("preset", "train_rows", "seed")


class StudyError(ValueError):
    """A study request that cannot run; the message names the flag and what is allowed."""


def parse_axes(pairs: list[str]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """`--set` pairs as (fixed overrides, switches): `model.interaction=none,field` is a switch with
    two values the grid crosses, `lr=1e-3` a fixed value for every cell."""
    fixed, axes = {}, {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value or key=a,b,..., got {pair!r}")
        if key in GRID_KEYS:
            raise StudyError(f"--set {key}=... : the study's own grid sets {key} (use --presets, --data-sizes, --seeds)")
        values = [parse_value(TrainConfig, key, v.strip()) for v in text.split(",")]
        for value in values:
            check_field(TrainConfig, key, value)
        if len(values) > 1:
            axes[key] = values
        else:
            fixed[key] = values[0]
    return fixed, axes


@dataclass
class Study(Placement):
    """A study request, as the CLI takes it; where it runs and records is a `Placement`."""
    presets: list[str]
    data_sizes: list[int]
    seeds: int = 2
    steps: int | None = None           # optimizer steps per cell, or:
    epochs: float | None = None        # passes over each cell's training rows (more rows, more steps)
    sets: dict[str, Any] = field(default_factory=dict)         # fixed overrides for every cell
    axes: dict[str, list[Any]] = field(default_factory=dict)   # switches crossed with the grid
    workers_per_trial: int = 1
    gpus_per_trial: float = 0.0
    concurrency: int | None = None
    resume: bool = False
    experiment: str = field(default="energy-lattice-study", kw_only=True)

    def __post_init__(self):
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown or not self.presets:
            raise StudyError(f"--presets {','.join(self.presets)}: unknown preset(s) {unknown}; choose from "
                             f"{', '.join(PRESETS)}")
        if not self.data_sizes or min(self.data_sizes) < 2:
            raise StudyError(f"--data-sizes {self.data_sizes}: every size must be at least 2 training rows")
        if not 1 <= self.seeds <= 100:
            raise StudyError(f"--seeds={self.seeds} is out of range; allowed range [1, 100]")
        if self.steps is not None and self.epochs is not None:
            raise StudyError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise StudyError(f"--steps={self.steps} must be at least 1")

    def cells(self) -> int:
        return len(self.presets) * len(self.data_sizes) * self.seeds * math.prod(len(v) for v in self.axes.values())

    def space(self) -> SearchSpace:
        """The grid as a Tune search space: every combination once."""
        entries = {"preset": ("grid", list(self.presets)), "train_rows": ("grid", sorted(self.data_sizes)),
                   "seed": ("grid", list(range(self.seeds)))}
        entries.update({key: ("grid", values) for key, values in self.axes.items()})
        return SearchSpace(entries=entries)


def _check_data_sizes(study: Study, available: int) -> None:
    too_big = [n for n in study.data_sizes if n > available]
    if too_big:
        raise StudyError(f"--data-sizes {','.join(map(str, too_big))}: the dataset has {available} training rows; "
                         f"allowed range [2, {available}] (a bigger corpus: --corpus dictionary)")


def run_study(study: Study) -> dict[str, Any]:
    """Run (or resume) the study's grid as one sweep; write its report on the sweep's parent run and
    return the summary: one entry per cell, the groups over seeds, the baselines per data size, the answer."""
    from ..run_data import load_data, prepare_config, with_baselines
    from .tune import Sweep, run_sweep

    started = time.perf_counter()
    sets = {**study.sets, "train_rows": max(study.data_sizes)}
    if study.steps is not None:
        sets["max_steps"] = study.steps
    for preset in study.presets:  # every cell's config is valid before anything slow starts
        make_config(preset, sets)
    base = prepare_config(make_config(study.presets[0], sets))  # builds the corpus once
    data = load_data(base)
    _check_data_sizes(study, len(data.train))
    # Baselines of each data size, once, before the cells start: each cell finds them in the cache.
    baseline_rows = {}
    for rows in sorted(study.data_sizes):
        baseline_rows[rows] = with_baselines(data, base.val_max_samples, rows).baselines
        log.info("baselines at %d training rows: ridge %.4f, kernel ridge %.4f (%d landmarks; its fit took %.0f s)", rows,
                 baseline_rows[rows]["baseline_ridge_cosine"], baseline_rows[rows]["baseline_kernel_ridge_cosine"],
                 baseline_rows[rows]["baseline_kernel_ridge_landmarks"],
                 baseline_rows[rows].get("baseline_kernel_ridge_fit_s", 0.0))
    sweep = Sweep(spaces=[], preset=study.presets[0], sets={**sets, "data_path": base.data_path}, num_samples=1,
                  search="random", scheduler="fifo", metric="val_cosine", workers_per_trial=study.workers_per_trial,
                  gpus_per_trial=study.gpus_per_trial, concurrency=study.concurrency, resume=study.resume,
                  address=study.address, storage=study.storage, tracking_uri=study.tracking_uri,
                  experiment=study.experiment, max_failures=study.max_failures)
    summary = run_sweep(sweep, space=study.space(), epochs=study.epochs)
    if summary["status"] != "completed":
        return {**summary, "cells": [], "parent_run_id": summary["parent_run_id"]}
    cells = study_cells(summary["trials"], baseline_rows, study.axes)
    report = report_study(cells, study, summary)
    return {"status": "completed", "parent_run_id": summary["parent_run_id"], "tracking_uri": summary["tracking_uri"],
            "experiment": study.experiment, "request": _request(study), "cells": cells, "groups": report["groups"],
            "baselines": {str(rows): base_rows for rows, base_rows in baseline_rows.items()},
            "answer": report["answer"], "table": report["table"], "wall_time_s": time.perf_counter() - started,
            "sweep_path": summary["sweep_path"]}


def _request(study: Study) -> dict[str, Any]:
    return {k: v for k, v in asdict(study).items() if k not in ("resume",)}


def study_cells(trials: list[dict[str, Any]], baseline_rows: dict[int, dict[str, float]],
                axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One entry per trial: its grid values, its final validation metrics (None where it did not
    finish) and the baselines of its data size. Sorted as the study was asked for: presets smallest
    first, then rows, then each switch's values in the order given (so the answer compares the later
    values against the first, e.g. field against none)."""
    cells = []
    for trial in trials:
        params, final = trial["params"], trial.get("final") or {}
        rows = int(params["train_rows"])
        cell = {"preset": params["preset"], "rows": rows, "seed": int(params["seed"]),
                **{key: params[key] for key in axes}, "status": trial["status"], "trial_id": trial["trial_id"],
                "mlflow_run_id": trial["mlflow_run_id"], "model_version": trial["model_version"]}
        cell.update({key: final.get(key) for key in CELL_METRICS})
        cell.update({k: v for k, v in baseline_rows[rows].items() if k.startswith("baseline_")})
        cells.append(cell)
    order = {p: i for i, p in enumerate(PRESETS)}
    return sorted(cells, key=lambda c: (order.get(c["preset"], 0), c["rows"],
                                        *(values.index(c[a]) if c[a] in values else len(values) for a, values in axes.items()),
                                        c["seed"]))


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def group_cells(cells: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """The cells that differ only by seed, as one group: mean and spread of each metric over the
    seeds that finished."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["preset"], cell["rows"], *(cell[a] for a in axes)), []).append(cell)
    out = []
    for key, members in groups.items():
        done = [c for c in members if isinstance(c.get("val_cosine"), (int, float))]
        group = {"preset": key[0], "rows": key[1], **dict(zip(axes, key[2:])), "seeds": len(done),
                 "of_seeds": len(members)}
        for metric in ("val_cosine", "val_top1", "val_cosine_lattice_only"):
            if done:
                group[metric], group[f"{metric}_spread"] = _mean_spread([c[metric] for c in done])
            else:
                group[metric] = group[f"{metric}_spread"] = None
        group.update({k: v for k, v in members[0].items() if k.startswith("baseline_")})
        out.append(group)
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _switches(group: dict[str, Any], axes: list[str]) -> str:
    return ", ".join(f"{a}={group[a]}" for a in axes)


def _beyond(diff: float, spread: float, seeds: int) -> str:
    if seeds < 2:
        return "no seed spread measured (one seed)"
    return "more than the seed spread" if abs(diff) > spread else "within the seed spread"


def answer(groups: list[dict[str, Any]], presets: list[str], axes: list[str]) -> str:
    """The study's answer in sentences, at its largest data size: how the largest lattice compares
    with the smallest (difference +- the spread of one run of each), the best cell against kernel
    ridge, and each switch's effect; the same figures for every data size are in the table."""
    finished = [g for g in groups if g["val_cosine"] is not None]
    if not finished:
        return "no cell of the study finished: nothing to compare."
    rows = max(g["rows"] for g in finished)
    at = [g for g in finished if g["rows"] == rows]
    lines = []
    ordered = [p for p in presets if any(g["preset"] == p for g in at)]
    if len(ordered) > 1:
        small, large = ordered[0], ordered[-1]
        pairs = [(a, b) for a in at if a["preset"] == small for b in at if b["preset"] == large
                 and all(a[x] == b[x] for x in axes)]
        for a, b in pairs:
            diff = b["val_cosine"] - a["val_cosine"]
            spread = math.hypot(a["val_cosine_spread"], b["val_cosine_spread"])
            where = f" ({_switches(a, axes)})" if axes else ""
            lines.append(f"At {rows:,} training rows{where}, {large} {'beats' if diff > 0 else 'trails'} {small} by "
                         f"{diff:+.4f} +- {spread:.4f} cosine ({b['val_cosine']:.4f} vs {a['val_cosine']:.4f}, "
                         f"{b['seeds']} and {a['seeds']} seeds), {_beyond(diff, spread, min(a['seeds'], b['seeds']))}.")
    best = max(at, key=lambda g: g["val_cosine"])
    kernel, ridge = best.get("baseline_kernel_ridge_cosine"), best.get("baseline_ridge_cosine")
    if isinstance(kernel, (int, float)):
        where = f", {_switches(best, axes)}" if axes else ""
        top1 = best.get("val_top1")
        kernel_top1 = best.get("baseline_kernel_ridge_top1")
        lines.append(f"The best lattice there ({best['preset']}{where}: {best['val_cosine']:.4f} cosine, top-1 "
                     f"{_fmt(top1, 3)}) is {abs(best['val_cosine'] - kernel):.4f} "
                     f"{'above' if best['val_cosine'] > kernel else 'below'} kernel ridge ({kernel:.4f}, top-1 "
                     f"{_fmt(kernel_top1, 3)}) and {best['val_cosine'] - ridge:+.4f} against ridge ({ridge:.4f}).")
    for axis in axes:
        values = []
        for g in at:
            if g[axis] not in values:
                values.append(g[axis])
        if len(values) < 2:
            continue
        first = values[0]
        for other in values[1:]:
            pairs = [(a, b) for a in at if a[axis] == first for b in at if b[axis] == other
                     and a["preset"] == b["preset"] and all(a[x] == b[x] for x in axes if x != axis)]
            for a, b in pairs:
                diff = b["val_cosine"] - a["val_cosine"]
                spread = math.hypot(a["val_cosine_spread"], b["val_cosine_spread"])
                where = ", ".join([a["preset"], *(f"{x}={a[x]}" for x in axes if x != axis)])
                lines.append(f"{axis}={other} against {first} ({where}): {diff:+.4f} +- {spread:.4f} cosine, "
                             f"{_beyond(diff, spread, min(a['seeds'], b['seeds']))}.")
    return " ".join(lines)


def format_table(groups: list[dict[str, Any]], axes: list[str]) -> str:
    """One line per group: lattice, rows, switches, cosine and top-1 (mean +- spread over seeds), the
    lattice path alone, and the baselines of its data size."""
    head = (f"{'preset':10s} {'rows':>7s} " + "".join(f"{a.split('.')[-1]:>12s} " for a in axes) +
            f"{'seeds':>5s} {'val_cosine':>16s} {'top1':>13s} {'alone':>7s} | {'identity':>8s} {'ridge':>8s} "
            f"{'kernel':>8s} {'k.top1':>6s}")
    lines = [head]
    for g in groups:
        cos = f"{_fmt(g['val_cosine'])} +- {_fmt(g['val_cosine_spread'])}" if g["val_cosine"] is not None else "-"
        top = f"{_fmt(g['val_top1'], 3)} +- {_fmt(g['val_top1_spread'], 3)}" if g["val_top1"] is not None else "-"
        lines.append(f"{g['preset']:10s} {g['rows']:>7d} " + "".join(f"{str(g[a]):>12s} " for a in axes) +
                     f"{g['seeds']:>2d}/{g['of_seeds']:<2d} {cos:>16s} {top:>13s} "
                     f"{_fmt(g['val_cosine_lattice_only']):>7s} | {_fmt(g.get('baseline_identity_cosine')):>8s} "
                     f"{_fmt(g.get('baseline_ridge_cosine')):>8s} {_fmt(g.get('baseline_kernel_ridge_cosine')):>8s} "
                     f"{_fmt(g.get('baseline_kernel_ridge_top1'), 3):>6s}")
    return "\n".join(lines)


def study_figure(groups: list[dict[str, Any]], presets: list[str], axes: list[str]):
    """Two rows (cosine, top-1) x two columns: against lattice size (one line per data size and
    switch setting) and against data size (one line per lattice size and switch setting), error bars
    the seed spread; the baselines of each data size as dashed lines and markers beside them."""
    from ..observe.plots import plt
    cells_of = {p: PRESETS[p]["width"] * PRESETS[p]["height"] for p in presets}
    sizes = sorted({g["rows"] for g in groups})
    settings = sorted({tuple(g[a] for a in axes) for g in groups}, key=str)
    fig, axs = plt.subplots(2, 2, figsize=(12, 8))
    colours = plt.get_cmap("tab10")
    for row, metric in enumerate(QUALITY):
        score = metric.removeprefix("val_")
        by_size, by_rows = axs[row][0], axs[row][1]
        for i, rows in enumerate(sizes):
            for j, setting in enumerate(settings):
                line = sorted((cells_of[g["preset"]], g[metric], g[f"{metric}_spread"]) for g in groups
                              if g["rows"] == rows and tuple(g[a] for a in axes) == setting and g[metric] is not None)
                if line:
                    label = f"{rows:,} rows" + (f" ({', '.join(map(str, setting))})" if axes else "")
                    by_size.errorbar(*zip(*line), marker="o", capsize=3, color=colours(i), label=label,
                                     linestyle=("-", "--", ":", "-.")[j % 4])
            kernel = next((g.get(baseline_key("kernel_ridge", score)) for g in groups if g["rows"] == rows), None)
            if isinstance(kernel, (int, float)):
                by_size.axhline(kernel, color=colours(i), linestyle=(0, (1, 3)), linewidth=1)
        for k, preset in enumerate(presets):
            for j, setting in enumerate(settings):
                line = sorted((g["rows"], g[metric], g[f"{metric}_spread"]) for g in groups
                              if g["preset"] == preset and tuple(g[a] for a in axes) == setting and g[metric] is not None)
                if line:
                    label = preset + (f" ({', '.join(map(str, setting))})" if axes else "")
                    by_rows.errorbar(*zip(*line), marker="o", capsize=3, color=colours(k), label=label,
                                     linestyle=("-", "--", ":", "-.")[j % 4])
        for n, name in enumerate(BASELINES):
            points = sorted({(g["rows"], g.get(baseline_key(name, score))) for g in groups
                             if isinstance(g.get(baseline_key(name, score)), (int, float))})
            if points:
                by_rows.plot(*zip(*points), color="grey", marker="sx^"[n % 3], linestyle=(0, (1, 3)),
                             label=name.replace("_", " "))
        by_size.set(xlabel="lattice surface cells (width x height)", ylabel=f"validation {score}", xscale="log",
                    title=f"{score} against lattice size (dotted: kernel ridge at that size)")
        by_rows.set(xlabel="training rows", ylabel=f"validation {score}", xscale="log",
                    title=f"{score} against training rows (grey: baselines)")
        by_size.set_xticks(sorted(set(cells_of.values())), [f"{p}\n{cells_of[p]}" for p in presets], fontsize=8)
        by_rows.set_xticks(sizes, [f"{n:,}" for n in sizes], fontsize=8)
        by_size.minorticks_off()
        by_rows.minorticks_off()
        for ax in (by_size, by_rows):
            ax.legend(fontsize=7)
    fig.suptitle("scaling study: mean over seeds, error bars one standard deviation")
    return fig


def report_study(cells: list[dict[str, Any]], study: Study, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the study's report onto the sweep's parent run: the figure, the cells and groups as JSON,
    the table as text, and the answer as the run's description (and return them)."""
    from ..observe.plots import save_figure
    from ..observe.tracking import client_for

    axes = list(study.axes)
    groups = group_cells(cells, axes)
    text = answer(groups, study.presets, axes)
    table = format_table(groups, axes)
    client, run_id = client_for(summary["tracking_uri"]), summary["parent_run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        save_figure(study_figure(groups, study.presets, axes), Path(tmp) / "study.png")
        (Path(tmp) / "study.json").write_text(json.dumps({"cells": cells, "groups": groups, "answer": text},
                                                         indent=2, default=str))
        (Path(tmp) / "study_table.txt").write_text(table + "\n\n" + text + "\n")
        client.log_artifacts(run_id, tmp, "study")
    client.set_tag(run_id, "kind", "study")
    client.set_tag(run_id, "mlflow.note.content", text + "\n\n```\n" + table + "\n```")
    return {"groups": groups, "answer": text, "table": table}
