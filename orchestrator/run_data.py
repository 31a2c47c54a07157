"""The one way data reaches a run, whoever launches it.

    cfg, data = prepare_data(cfg)            # on the launching side, once
    shards = worker_shards(data, workers, cfg.val_max_samples, cfg.train_rows)  # one per rank

`prepare_data` builds (and embeds) the configured corpus if it is not on disk yet and pins the
config to the file's absolute path, so every worker and trial, on any node, loads the same rows;
loads it; keeps the run's first `train_rows` training rows; and fits the baselines once on those
rows and the `val_max_samples` validation rows (they are cached on disk by the rows' contents).
`worker_shards` gives each rank its share of the training rows, with the validation rows and the
baselines. Local training (train_loop without data), Ray Train (`train`, each `scale` stage), Tune
(`tune`, `study`: the driver prepares, each trial shards) and the benchmarks all come through here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import TrainConfig, resolved
from .data.datasets import PairDataset, ensure_corpus, load_dataset, shard, training_rows, validation_rows
from .data.teacher import Teacher
from .evaluation import baselines


def prepare_config(cfg: TrainConfig) -> TrainConfig:
    """The config resolved on the launching side, its dataset built if need be (once, here, not in
    every worker) and named by absolute path."""
    if cfg.data_path is None:
        path = ensure_corpus(teacher=Teacher(cfg.teacher), corpus=cfg.corpus, train_rows=cfg.train_rows)
        cfg = dataclasses.replace(cfg, data_path=str(path))
    return resolved(dataclasses.replace(cfg, data_path=str(Path(cfg.data_path).resolve())))


def load_data(cfg: TrainConfig) -> PairDataset:
    """The whole dataset the config names: `data_path`, else the configured corpus (built and
    embedded on first use). The teacher loads lazily: it costs nothing when the file carries its
    embeddings."""
    teacher = Teacher(cfg.teacher)
    path = Path(cfg.data_path) if cfg.data_path else ensure_corpus(teacher=teacher, corpus=cfg.corpus,
                                                                   train_rows=cfg.train_rows)
    return load_dataset(path, teacher=teacher, embed_dim=cfg.model.embed_dim, val_fraction=cfg.val_fraction,
                        max_rows=cfg.max_rows)


def with_baselines(data: PairDataset, val_max_samples: int, train_rows: int | None = None) -> PairDataset:
    """`data` cut to its first `train_rows` training rows, carrying the baselines fitted on them and
    scored on the first `val_max_samples` validation rows."""
    data = training_rows(data, train_rows)
    return dataclasses.replace(data, baselines=baselines(data.train, validation_rows(data, val_max_samples)))


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, PairDataset]:
    """(the config pinned to its dataset, the run's rows with their baselines): see the module's text."""
    cfg = prepare_config(cfg)
    return cfg, with_baselines(load_data(cfg), cfg.val_max_samples, cfg.train_rows)


def worker_shards(data: PairDataset, world_size: int, val_max_samples: int,
                  train_rows: int | None = None) -> list[PairDataset]:
    """One dataset per rank: its share of the run's (first `train_rows`) training rows, the
    validation rows, and the baselines of those rows. Baselines `data` already carries for the
    same rows (a sweep's driver fits them once for all its trials) are reused; a trial that trains
    on fewer rows than the driver prepared fits its own (cached after the first time)."""
    data = training_rows(data, train_rows)
    carried = data.baselines or {}
    same_rows = (carried.get("baseline_val_rows"), carried.get("baseline_train_rows")) == (
        len(validation_rows(data, val_max_samples)), len(data.train))
    if not same_rows:
        data = with_baselines(data, val_max_samples)
    return [dataclasses.replace(data, train=shard(data.train, rank, world_size)) for rank in range(world_size)]
