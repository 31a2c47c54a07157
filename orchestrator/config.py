"""The run configuration: the model's config plus everything about training, data and monitoring.

Fields are addressed by dotted paths everywhere (CLI `--set`, Tune spaces, MLflow params):
`lr`, `batch_size`, `model.width`, `model.spawn_threshold`, ...
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from model.config import (ConfigError, ModelConfig, apply_overrides, flatten, from_dict, knob, parse_value,
                          preset, validate)

from .data.teacher import DEFAULT_TEACHER
from .step import DEFAULT_GRAD_CLIP


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str = knob("debug", "the preset the model config started from (recorded for tags)")
    seed: int = knob(0, "seed for initialisation, data order and flow noise", range="[0, 2147483647]")
    device: str = knob("auto", "auto picks cuda when available", choices=("auto", "cpu", "cuda"))

    # --- data ---------------------------------------------------------------------------------
    data_path: str | None = knob(None, "Parquet/JSONL/CSV with input_text and target_text "
                                       "(None: the `corpus` the project builds, on first use)")
    corpus: str = knob("stdlib", "the corpus built and used when data_path is None: 'stdlib' (4,300 pairs, "
                                 "standard-library signature -> docstring), 'params' (numpydoc parameters) or "
                                 "'dictionary' (106,000 GCIDE headwords -> first sense, for studies of scale)",
                       choices=("stdlib", "params", "dictionary"))
    teacher: str = knob(DEFAULT_TEACHER, "teacher embedding model: the shipped package, a local folder or a hub id")
    val_fraction: float = knob(0.1, "share of pairs held out for validation (split by text hash)", range="(0, 0.9]")
    max_rows: int | None = knob(None, "use only the first rows of the dataset file, before the split (quick runs)",
                                range="[2, 2147483647]")
    train_rows: int | None = knob(
        None, "train on the first this many training rows only (None: all); the validation rows stay the "
              "same, so runs on different amounts of data compare on the same rows", range="[2, 2147483647]")
    val_max_samples: int = knob(256, "validation pairs evaluated at each validation", range="[2, 1000000]")

    # --- optimisation ---------------------------------------------------------------------------
    max_steps: int = knob(1000, "optimizer steps to train for (model.max_steps is flow steps per forward)",
                          range="[1, 100000000]")
    batch_size: int = knob(32, "samples per micro-batch per worker (a scaling stage or sweep trial may get less "
                               "from the memory planner)", range="[1, 1000000]")
    grad_accum_steps: int = knob(1, "micro-batches accumulated into one optimizer step", range="[1, 4096]")
    lr: float = knob(3e-3, "peak AdamW learning rate", range="(0, 10]")
    weight_decay: float = knob(0.01, "AdamW weight decay", range="[0, 10]")
    warmup_steps: int = knob(20, "linear warm-up from 0 to lr over this many steps", range="[0, 100000000]")
    lr_schedule: str = knob("cosine", "after warm-up: 'cosine' decays to min_lr at max_steps, so a run of a "
                                      "fixed budget ends annealed; 'plateau' cuts lr when validation loss "
                                      "stalls", choices=("plateau", "cosine"))
    plateau_factor: float = knob(0.5, "lr multiplier when validation loss stalls", range="(0, 1)")
    plateau_patience: int = knob(2, "validations without improvement before the lr is cut", range="[0, 1000]")
    min_lr: float = knob(1e-5, "lower bound of the lr schedule", range="[0, 10]")
    grad_clip: float = knob(DEFAULT_GRAD_CLIP, "max global gradient norm (0: no clipping)", range="[0, 1000000]")

    # --- monitoring and checkpoints -------------------------------------------------------------
    log_every: int = knob(10, "training metrics every this many steps", range="[1, 100000000]")
    val_every: int = knob(100, "validation every this many steps (and at the end)", range="[1, 100000000]")
    decode_every: int = knob(100, "decoded-example table every this many steps (and at the end)",
                             range="[1, 100000000]")
    decode_examples: int = knob(8, "rows in each decoded-example table", range="[0, 1000]")
    checkpoint_every: int = knob(100, "checkpoint every this many steps (and at the end)", range="[1, 100000000]")
    keep_checkpoints: int = knob(2, "local checkpoints kept besides the best one", range="[1, 1000]")
    cpu_keep_freed_memory: bool = knob(
        False, "CPU only: keep freed memory in the process for reuse (glibc); large lattices train up to "
               "1.7x faster, peak RSS grows up to 2.2x, beyond what the memory planner allows for")
    deterministic: bool = knob(
        False, "deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG), so a run "
               "resumed on CUDA repeats the uninterrupted one; without it, index_add and gather backward add in "
               "varying order there and resumed losses differ by rounding. Slower on CUDA; no effect on CPU results")


def make_config(preset_name: str = "debug", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of a preset with dotted-path overrides applied and validated."""
    cfg = TrainConfig(model=preset(preset_name), preset=preset_name)
    return apply_overrides(cfg, overrides or {})


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`["lr=1e-3", "model.width=30"]` -> typed overrides; unknown keys name the field."""
    out: dict[str, Any] = {}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        if key not in train_fields and "." not in key and key in model_fields:
            raise ConfigError(f"unknown config field {key!r}; did you mean model.{key}?")
        out[key] = parse_value(TrainConfig, key, text)
    return out


def with_epochs(cfg: TrainConfig, epochs: float, rows: int, workers: int = 1) -> TrainConfig:
    """`cfg` trained for `epochs` passes over `rows` training rows: max_steps from the samples one
    optimizer step takes (batch x accumulation x workers), and a validation and checkpoint every
    tenth of the run, so a run on 4x the rows is validated as often as a short one."""
    if not 0 < epochs <= 100000:
        raise ConfigError(f"--epochs={epochs} is out of range; allowed range (0, 100000]")
    per_step = cfg.batch_size * cfg.grad_accum_steps * workers
    steps = max(1, math.ceil(epochs * rows / per_step))
    every = max(1, math.ceil(steps / 10))
    return apply_overrides(cfg, {"max_steps": steps, "val_every": every, "checkpoint_every": every,
                                 "decode_every": every})


def run_tags(cfg: TrainConfig, workers: int) -> dict[str, str]:
    """The tags every tracked run carries, so runs can be filtered by them."""
    m = cfg.model
    return {"preset": cfg.preset, "lattice": f"{m.width}x{m.height}x{m.depth}", "workers": str(workers),
            "precision": m.precision}


# Fields a TrainConfig once had and no longer has; a config dict saved with them still loads. The
# fault-injection settings moved out of the config into orchestrator.faults (a launcher's argument).
REMOVED_FIELDS = ("fault_nan_loss_at_step", "fault_crash_at_step")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of an `asdict(TrainConfig)`, including ones saved with since-removed fields."""
    return from_dict(TrainConfig, {k: v for k, v in data.items() if k not in REMOVED_FIELDS})


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config with the model's None defaults filled in: what runs, and what gets logged.

    Called where a config enters a run (train_loop, a launcher); everything downstream takes the
    resolved dataclass as it is."""
    validate(cfg)
    return dataclasses.replace(cfg, model=cfg.model.resolved())


__all__ = ["TrainConfig", "ConfigError", "make_config", "parse_sets", "config_from_dict", "resolved", "flatten",
           "run_tags", "with_epochs"]
