"""The quality benchmark: train one model, then put it next to its baselines and its own ablations.

    python -m orchestrator bench-quality --preset debug --steps 1000 [--data PATH] [--json out.json]

trains with the one training loop in this process (no Ray, no MLflow), then evaluates the final
model on the run's validation rows, on the device it trained on, and prints one table:

    lattice          the model's prediction (skip path + lattice path where the skip is on)
    lattice alone    the collector's output alone: what the lattice itself predicts
    skip alone       skip_scale * input, as the model computes it: the skip path alone (the identity
                     baseline when positive)
    identity, mean target, ridge, kernel ridge    the baselines every run logs

each with cosine to the target embedding, retrieval top-1 and BLEU of the decoded text, plus the
validation curve and the seconds training and baselines took.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ..checkpoint import load_model
from ..config import TrainConfig
from ..context import LocalContext
from ..data.datasets import PairDataset, validation_rows
from ..evaluation import evaluate, text_metrics
from ..metrics import BASELINES, VALIDATION_KEYS, baseline_key
from ..run_data import load_data, with_baselines
from ..train import train_loop

# What the validation curve keeps of each validation: the scores, then the lattice's own figures.
CURVE_KEYS = ("step", "val_cosine", "val_top1", "val_cosine_lattice_only", *VALIDATION_KEYS)


class _RecordingContext(LocalContext):
    """A local run that also keeps every validation it reports, for the curve."""

    def __init__(self, out_dir: Path, keep: int):
        super().__init__(out_dir, keep=keep)
        self.curve: list[dict[str, float]] = []

    def report(self, step, metrics, checkpoint):
        if "val_cosine" in metrics and "status" not in metrics:
            self.curve.append({k: metrics[k] for k in CURVE_KEYS if k in metrics})
        return super().report(step, metrics, checkpoint)


def _row(name: str, cosine: float, texts: list[str], val) -> dict[str, Any]:
    return {"predictor": name, "cosine": cosine, **text_metrics(texts, val)}


def run_quality_bench(cfg: TrainConfig, data: PairDataset | None = None) -> dict[str, Any]:
    """Train `cfg` in this process and measure the final model against its baselines."""
    data = data or load_data(cfg)
    started = time.perf_counter()
    data = with_baselines(data, cfg.val_max_samples)  # cached on disk after the first time
    baseline_seconds = time.perf_counter() - started
    val, base = validation_rows(data, cfg.val_max_samples), data.baselines

    with tempfile.TemporaryDirectory() as tmp:
        ctx = _RecordingContext(Path(tmp), keep=1)
        started = time.perf_counter()
        summary = train_loop(cfg, ctx, data=data)
        train_seconds = time.perf_counter() - started  # validations included
        # Evaluated where it trained (the device rule train_loop applied): a GPU-trained model judged
        # on the CPU would spend minutes on a pass the GPU makes in seconds.
        device = ctx.device(cfg.device)
        model = load_model(summary["checkpoint"]).to(device)

    metrics, decoded, lattice_decoded, skip = evaluate(model, val, batch_size=cfg.batch_size, device=device,
                                                       seed=cfg.seed + 7919)
    rows = [_row("lattice", metrics["cosine"], decoded.texts(val), val),
            _row("lattice alone", metrics["cosine_lattice_only"], lattice_decoded.texts(val), val)]
    if skip is not None:
        rows.append(_row("skip alone", float(skip.cosine.mean()), skip.texts(val), val))
    for name in BASELINES:
        rows.append({"predictor": name.replace("_", " "),
                     **{score: base[baseline_key(name, score)] for score in ("cosine", "top1", "bleu")}})
    from ..code_version import code_version_tags
    from .bench import machine_info
    return {
        "machine": machine_info(device), "code": code_version_tags(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "preset": cfg.preset, "steps": summary["steps"], "status": summary["status"],
        "batch_size": cfg.batch_size, "precision": cfg.model.precision, "device": str(device),
        "train_rows": len(data.train), "val_rows": len(val),
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(summary["steps"], 1),
        "baseline_seconds": baseline_seconds,
        "lattice_gain": summary["lattice_gain"], "plane_difference": summary["plane_difference"],
        "plane_balance": summary["plane_balance"],
        "skip_scale": None if model.skip_scale is None else float(model.skip_scale.detach()),
        "rows": rows, "curve": ctx.curve,
    }


def format_quality_table(result: dict[str, Any]) -> str:
    """The table bench-quality prints: one row per predictor, then the lattice's own figures, the
    timings and the validation curve."""
    r = result
    header = (f"quality: {r['preset']}, {r['steps']} steps x batch {r['batch_size']} ({r['precision']}), "
              f"{r['train_rows']} training rows, {r['val_rows']} validation rows")
    lines = [header, "", f"  {'predictor':<14} {'cosine':>7} {'top-1':>6} {'BLEU':>6}"]
    for row in r["rows"]:
        lines.append(f"  {row['predictor']:<14} {row['cosine']:7.4f} {row['top1']:6.3f} {row['bleu']:6.1f}")

    lattice = (f"  lattice gain over its skip path {r['lattice_gain']:+.4f}; "
               f"plane difference {r['plane_difference']:.3f}, balance {r['plane_balance']:.3f}")
    if r["skip_scale"] is not None:
        lattice += f"; skip scale {r['skip_scale']:.3f}"
    timing = (f"  training {r['train_seconds']:.0f} s ({r['seconds_per_step']:.2f} s/step, validations included), "
              f"baselines {r['baseline_seconds']:.0f} s")
    points = ", ".join(f"{p['step']}: {p['val_cosine']:.3f}/{p['val_top1']:.3f}" for p in r["curve"])
    curve = f"  validation curve: {points}  (step: cosine/top-1)"
    lines += ["", lattice, timing, curve]
    return "\n".join(lines)
