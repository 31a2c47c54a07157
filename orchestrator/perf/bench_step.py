"""One training step of the lattice, timed or profiled: what `bench` measures, and the worker that
`bench --compare REF` runs on another commit's model.

The step itself is orchestrator.step.train_step, the one the training loop runs. This module and
that one import torch and `model` only, never the rest of the orchestrator, so the `model` they
time is whichever one the process finds first on sys.path. `bench --compare` starts it as
`python -m orchestrator.perf.bench_step` in the folder a commit's `model/` was exported to, with this
checkout on PYTHONPATH: that commit's model, timed by this file's code, so both sides of a
comparison are measured the same way. The worker reads one JSON request per line on stdin and
answers one JSON line on stdout (build, step, profile, quit).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..step import PHASES, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainStep:
    """A model, an AdamW at lr 0 and one fixed batch: every step times the same work (same weights,
    same flow noise), which is what makes repeats, and two commits, comparable."""
    model: Any
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor
    seed: int
    device: torch.device

    @classmethod
    def build(cls, preset_name: str, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, *,
              overrides: dict[str, Any] | None = None, seed: int = 0) -> TrainStep:
        from model import EnergyLattice, preset
        torch.manual_seed(seed)
        model = EnergyLattice(preset(preset_name, **(overrides or {}))).to(device).train()
        # lr 0: every repeat runs on the same weights, so it times the same work (AdamW still computes).
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        return cls(model, optimizer, inputs.to(device), targets.to(device), seed, device)

    def run(self) -> dict[str, Any]:
        """One timed training step, step.train_step as the loop runs it (clipped at training's
        default grad_clip): forward with the loss, then backward, clipping and the update.
        Wall time, and the CPU time of the whole process (all its threads): a busy neighbour
        stretches the first but hardly the second, most clearly with one thread (`bench --threads
        1`), where no thread waits for another."""
        torch.manual_seed(self.seed + 1)  # the same flow noise every time
        marks: list[tuple[float, float]] = []

        def forward_done() -> None:
            sync(self.device)
            marks.append((time.perf_counter(), time.process_time()))

        sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        outcome = train_step(self.model, [(self.inputs, self.targets)], self.optimizer,
                             after_forward=forward_done)
        sync(self.device)
        end, cpu_end = time.perf_counter(), time.process_time()
        (forward_end, cpu_forward_end), stats = marks[0], outcome.stats[0]
        return {"forward_s": forward_end - start, "train_step_s": end - start,
                "forward_cpu_s": cpu_forward_end - cpu_start, "train_step_cpu_s": cpu_end - cpu_start,
                "flow_steps": sum(stats.active_per_step), "steps_used": stats.steps_used}

    def profile(self, steps: int = 2, top: int = 20) -> dict[str, Any]:
        """torch.profiler over `steps` training steps (after at least one step has run): the
        operators with the most self CPU time, and on a GPU the kernels with the most device time,
        both per training step."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            runs = [self.run() for _ in range(steps)]
        events = [e for e in prof.key_averages() if not e.is_user_annotation]
        phases = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key in PHASES}

        def rows(key: str) -> list[dict[str, Any]]:
            total = sum(getattr(e, key) for e in events) or 1.0
            ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
            return [{"name": e.key, "calls": e.count / steps, "ms": getattr(e, key) / 1e3 / steps,
                     "share": getattr(e, key) / total} for e in ranked if getattr(e, key) > 0]

        return {"steps": steps, "train_step_s": [r["train_step_s"] for r in runs],
                "flow_steps": runs[-1]["flow_steps"], "phases_ms": phases,
                "operators": sum(e.count for e in events) / steps,
                "cpu": rows("self_cpu_time_total"),
                "device": rows("self_device_time_total") if self.device.type == "cuda" else None}


def format_profile(profile: dict[str, Any], title: str) -> str:
    """The profile as lines: the phases' wall time, then the top operators (and GPU kernels)."""
    phases = ", ".join(f"{name} {ms:.1f} ms" for name, ms in profile["phases_ms"].items())
    lines = [f"{title}: per training step ({profile['steps']} profiled), {profile['flow_steps']} flow steps, "
             f"{profile['operators']:.0f} operator calls; {phases}"]
    for kind, label in (("cpu", "self CPU"), ("device", "self CUDA")):
        if not profile.get(kind):
            continue
        lines.append(f"  {'operator':<44} {'calls':>7} {label + ' ms':>13} {'share':>6}")
        lines += [f"  {r['name'][:44]:<44} {r['calls']:7.0f} {r['ms']:13.2f} {r['share']:6.1%}" for r in profile[kind]]
    return "\n".join(lines)


def _serve() -> None:
    """The worker of `bench --compare`: one JSON request per line in, one JSON answer per line out."""
    import model
    answers = sys.stdout
    sys.stdout = sys.stderr  # anything the model prints must not break the protocol
    step: TrainStep | None = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "build":
                step = None  # free the previous preset's model first
                torch.set_num_threads(request["threads"])
                batch = torch.load(request["data"], weights_only=True)
                step = TrainStep.build(request["preset"], batch["inputs"], batch["targets"],
                                       torch.device(request["device"]), overrides=request["overrides"],
                                       seed=request["seed"])
                step.run()  # warm-up: allocator, thread pools, autograd's first-use costs
                answer = {"model_path": model.__file__}
            elif request["op"] == "step":
                answer = step.run()
            elif request["op"] == "profile":
                answer = step.profile(request["steps"], request["top"])
            elif request["op"] == "quit":
                return
            else:
                raise ValueError(f"unknown request {request['op']!r}")
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops with it
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
