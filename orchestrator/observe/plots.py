"""Plots logged with every run: the two output surfaces of a validation sample, a few of its flow
paths projected on x-z, its completion-vs-step curve, the training loss curve, and validation
cosine and top-1 over steps against the baselines."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from model import EnergyLattice  # noqa: E402

from ..metrics import baseline_scores  # noqa: E402


@torch.no_grad()
def make_plots(model: EnergyLattice, sample_embedding: torch.Tensor, losses: list[tuple[int, float]],
               out_dir: str | Path, max_paths: int = 12) -> list[Path]:
    """Write the four PNGs into `out_dir` and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = model(sample_embedding[:1], trace=True)
    model.train(was_training)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    # Each plane's first energy channel (planes hold z = -1's channels, then z = +1's).
    planes = out.planes[0].float().cpu().numpy()[::model.cfg.energy_channels]
    for ax, plane, title in zip(axes, planes, ("plane z = -1", "plane z = +1")):
        im = ax.imshow(plane, cmap="magma", origin="lower")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("deposited energy, one validation sample")
    paths.append(save_figure(fig, out_dir / "output_surfaces.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    steps = out.trace.sample0_paths
    if steps:
        first_ids = steps[0][0][torch.linspace(0, len(steps[0][0]) - 1, max_paths).long().unique()]
        start = {int(i): (-1 + 2 * (int(i) % model.cfg.width) / (model.cfg.width - 1), 0.0) for i in first_ids}
        for flow in first_ids.tolist():
            xs, zs = [start[flow][0]], [start[flow][1]]
            for ids, pos in steps:
                hit = (ids == flow).nonzero()
                if len(hit):
                    xs.append(float(pos[hit[0, 0], 0]))
                    zs.append(float(pos[hit[0, 0], 2]))
            ax.plot(xs, zs, marker=".", linewidth=1)
    ax.axhline(-1, color="grey", linestyle="--")
    ax.axhline(1, color="grey", linestyle="--")
    ax.set(xlabel="x", ylabel="z", xlim=(-1.05, 1.05), ylim=(-1.1, 1.1), title="flow paths (x-z)")
    paths.append(save_figure(fig, out_dir / "flow_paths_xz.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    curve = out.stats.completion_curve
    ax.plot(range(1, len(curve) + 1), curve, marker="o")
    ax.axhline(model.cfg.convergence_threshold, color="grey", linestyle="--", label="threshold")
    ax.set(xlabel="flow step", ylabel="completion (arrived / created)", ylim=(0, 1.05),
           title=f"completion ({out.stats.stop_reason} after {out.stats.steps_used} steps)")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "completion_curve.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set(xlabel="step", ylabel="training loss (1 - cosine)", title="loss")
    paths.append(save_figure(fig, out_dir / "loss_curve.png"))
    return paths


def validation_plot(cosine: list[tuple[int, float]], top1: list[tuple[int, float]], baselines: dict[str, float],
                    path: str | Path) -> Path:
    """Write validation_figure(...) to `path`."""
    return save_figure(validation_figure(cosine, top1, baselines), Path(path))


def validation_figure(cosine: list[tuple[int, float]], top1: list[tuple[int, float]], baselines: dict[str, float]):
    """Validation cosine and top-1 against the training step, each next to a horizontal line per
    baseline: every `baseline_<name>_cosine` / `baseline_<name>_top1` in `baselines` is drawn."""
    scores = baseline_scores(baselines)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.get_cmap("tab10")
    for ax, curve, score in ((axes[0], cosine, "cosine"), (axes[1], top1, "top1")):
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", color="black", label="lattice")
        for i, (name, values) in enumerate(scores.items()):
            if score in values:
                ax.axhline(values[score], linestyle="--", color=colours(i % 10), label=f"{name} baseline")
        ax.set(xlabel="step", ylabel=f"validation {score}", title=f"validation {score} vs baselines")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    return fig


def parallel_coordinates(trials: list[dict], params: list[str], path: str | Path,
                         metric: str = "val_cosine") -> Path:
    """One line per trial across one vertical axis per sampled param, coloured by `metric`.

    Each axis is scaled to its own min..max; categorical values are placed in sorted order.
    """
    scored = [t for t in trials if isinstance(t.get(metric), (int, float))]
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * (len(params) + 1)), 4))
    columns = params + [metric]

    def column(name):
        values = [t[metric] if name == metric else t["params"].get(name) for t in scored]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            lo, hi = min(values, default=0), max(values, default=1)
            return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values], f"{lo:.3g}..{hi:.3g}"
        levels = sorted({str(v) for v in values})
        return [levels.index(str(v)) / max(1, len(levels) - 1) for v in values], "/".join(levels)

    scaled = [column(name) for name in columns]
    cmap = plt.get_cmap("viridis")
    metric_values = [t[metric] for t in scored]
    lo, hi = min(metric_values, default=0), max(metric_values, default=1)
    for i, trial in enumerate(scored):
        colour = cmap((trial[metric] - lo) / (hi - lo) if hi > lo else 0.5)
        ax.plot(range(len(columns)), [col[0][i] for col in scaled], color=colour, marker="o", alpha=0.8)
    ax.set_xticks(range(len(columns)), [f"{n}\n{col[1]}" for n, col in zip(columns, scaled)], fontsize=7)
    ax.set_yticks([])
    ax.set_title(f"sampled params vs {metric} ({len(scored)} scored trials)")
    return save_figure(fig, Path(path))


def save_figure(fig, path: Path) -> Path:
    """Write a figure as the PNG every plot of the project is (its layout tightened, 90 dpi) and
    close it, so a long run does not keep every figure it drew."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
