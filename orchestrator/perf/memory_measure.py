"""The measurement the memory planner is calibrated against: MEASURE_STEPS training steps forced
into the worst case the estimate assumes, in a fresh subprocess.

    python -m orchestrator plan --preset P --batch B --measure

trains worst_case_config(cfg) (min_steps = max_steps, spawning switched to reach the cap at the
first step) in a subprocess started with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns every freed
block to the OS and RSS follows live memory, and reads its peak RSS (VmHWM); on CUDA it reads
max_memory_allocated and max_memory_reserved. A fresh process per measurement, because the
allocators read their settings once, at start.

This module is the subprocess's entry point too (`python -m orchestrator.perf.memory_measure SPEC`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig

from ..memory import ALLOC_CONF_VARS, peak_memory_bytes

MEASURE_STEPS = 3  # training steps a measurement runs (from the 2nd on, AdamW's state exists)


def worst_case_config(cfg: ModelConfig) -> ModelConfig:
    """The config with its data-dependent choices forced to the estimate's default worst case:
    no early stop, and every flow spawning right away until its sample reaches the cap.

    An untrained carrier moves flows far too slowly to reach a plane in max_steps, so none arrive."""
    cfg = cfg.resolved()
    children = math.ceil(cfg.max_flows_per_sample / cfg.surface) - 1
    return dataclasses.replace(cfg, min_steps=cfg.max_steps, spawn_threshold=1e-6,
                               max_spawn_per_step=min(64, children)).resolved()


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int                # peak RSS (CPU) or max_memory_allocated (CUDA)
    flow_steps_per_sample: float   # what the measured step actually ran
    steps_used: int
    reserved_bytes: int | None = None   # CUDA: max_memory_reserved, what the GPU must really hold
    device_name: str = "cpu"
    allocator_settings: str | None = None  # CUDA: the caching allocator's configuration in force


def measure_peak_bytes(model_cfg: ModelConfig, batch: int, *, device: str = "cpu", live_only: bool = True,
                       alloc_conf: str | None = None, timeout: float = 1800) -> Measurement:
    """Measured peak of training `worst_case_config(model_cfg)`: the peak RSS (CPU) or
    max_memory_allocated and max_memory_reserved (CUDA) of a fresh subprocess over MEASURE_STEPS
    training steps.

    live_only (CPU): glibc returns every freed block to the OS, so RSS follows live memory; this is
    what the estimate predicts. False: default allocator settings, as a training process runs.
    alloc_conf (CUDA): PYTORCH_CUDA_ALLOC_CONF for the subprocess ("" for torch's defaults); the
    allocator reads it once, when CUDA starts, hence a fresh process per setting."""
    spec = json.dumps({"model": dataclasses.asdict(model_cfg), "batch": batch, "device": device})
    root = Path(__file__).resolve().parents[2]  # the repository: orchestrator/perf/memory_measure.py, two up
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if live_only and device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if alloc_conf is not None:
        for name in ALLOC_CONF_VARS:
            env.pop(name, None)
        if alloc_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    result = subprocess.run([sys.executable, "-m", "orchestrator.perf.memory_measure", spec], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {result.stderr.strip()[-2000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    from model import EnergyLattice
    from model.config import from_dict

    from ..step import train_step

    # Imported only in the subprocess, to hold what a training process holds (data and metric
    # libraries); no module imports this one, so this closes no import loop.
    import orchestrator.train  # noqa: F401

    device = torch.device(spec["device"])
    cfg = worst_case_config(from_dict(ModelConfig, spec["model"]))
    torch.manual_seed(0)
    model = EnergyLattice(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.nn.functional.normalize(torch.randn(spec["batch"], cfg.embed_dim, device=device), dim=-1)
    for _ in range(MEASURE_STEPS):  # the loop's own step, clipping included
        stats = train_step(model, [(x, x.flip(0))], optimizer).stats[0]
    measured = {"peak_bytes": peak_memory_bytes(device), "steps_used": stats.steps_used,
                "flow_steps_per_sample": sum(stats.active_per_step) / spec["batch"]}
    if device.type == "cuda":
        getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
        measured.update(reserved_bytes=torch.cuda.max_memory_reserved(device),
                        device_name=torch.cuda.get_device_name(device),
                        allocator_settings=getter() if getter else os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    return measured


if __name__ == "__main__":  # the measuring subprocess of measure_peak_bytes
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
