"""Benchmark and memory planner: FLOP counting, planned batches that fit, refusals that say why.

No test here asserts a speed; the machine is shared and CPU timings are noisy.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import PRESETS, EnergyLattice, count_parameters, flow_step_flops, preset, run_flows
from model.config import ConfigError
from orchestrator.memory import available_memory_bytes
from orchestrator.perf.memory_measure import measure_peak_bytes
from orchestrator.planner import (GiB, MemoryBudgetError, carrier_parameter_count, estimate_peak_bytes,
                                  parameter_count, plan_batch)

REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ})


@pytest.mark.parametrize("name, switches", [(name, {}) for name in sorted(PRESETS)] + [
    ("smoke", {"energy_channels": 3}), ("smoke", {"interaction": "field", "field_channels": 5}),
    ("debug", {"energy_channels": 2, "interaction": "field", "energy_update": "gated"})])
def test_planner_parameter_counts_match_the_model(name, switches):
    # The planner counts parameters from the config (it bisects over batches and must not build a
    # model per try); this keeps that formula in step with the model itself.
    cfg = preset(name, **switches).resolved()
    with torch.device("meta"):
        model = EnergyLattice(cfg)
    assert parameter_count(cfg) == count_parameters(model)
    assert carrier_parameter_count(cfg) == count_parameters(model.carrier)


def test_flop_counter_matches_a_hand_count():
    cfg = dataclasses.replace(preset("smoke"), carrier_hidden=4, carrier_layers=2, neuron_features=3)
    # layer 0: 3 gates x (4 inputs + 4 state) x 4 units x 2 FLOPs = 192; layer 1 likewise (8 inputs
    # of which 4 from below); heads: 4 units x (1 energy + 3 move + 1 plane split) outputs x 2 = 40
    assert flow_step_flops(cfg) == 192 + 192 + 40
    # the hard split has no split head; the gated update adds a gate head
    assert flow_step_flops(dataclasses.replace(cfg, plane_split="arrival")) == 192 + 192 + 32
    assert flow_step_flops(dataclasses.replace(cfg, energy_update="gated")) == 192 + 192 + 48
    # two energy channels: one more GRU input (3 gates x 1 x 4 units x 2 = 24) and one more energy and
    # split output each (2 x 4 x 2 = 16); a field of 2 channels: 4 more inputs read (96), 2 messages (16)
    assert flow_step_flops(dataclasses.replace(cfg, energy_channels=2)) == 192 + 24 + 192 + 40 + 16
    assert flow_step_flops(dataclasses.replace(cfg, interaction="field", field_channels=2)) == 192 + 96 + 192 + 40 + 16


def test_active_flows_are_recorded_per_step():
    # flows on the left half head for a plane at full speed, the rest at half speed
    cfg = dataclasses.replace(preset("smoke"), max_spawn_per_step=0, min_steps=1, max_steps=40).resolved()
    k = cfg.straight_path_steps()

    def step(pos, energy, hidden, context):
        return (hidden, energy, torch.stack([0 * pos[:, 0], 0 * pos[:, 0], torch.where(pos[:, 0] < 0, 1.0, 0.5)], 1),
                None, None)

    B, S = 3, cfg.surface
    _, stats, _ = run_flows(torch.rand(B, cfg.height, cfg.width), step, cfg, hidden_dtype=torch.float32)
    assert stats.stop_reason == "all_arrived" and stats.steps_used > k
    assert stats.active_per_step == [B * S] * k + [B * S // 2] * (stats.steps_used - k)


def test_estimate_grows_with_batch_and_shrinks_with_checkpointing():
    cfg = preset("scale-50")
    assert estimate_peak_bytes(cfg, 2) > estimate_peak_bytes(cfg, 1)
    light = dataclasses.replace(cfg, activation_checkpointing=True, saved_state_dtype="bf16")
    assert estimate_peak_bytes(light, 4) < estimate_peak_bytes(cfg, 4) / 2
    typical = estimate_peak_bytes(cfg, 4, flows_per_sample=cfg.surface, steps=7)
    assert typical < estimate_peak_bytes(cfg, 4) / 3


def test_estimate_is_within_20_percent_of_the_measured_live_peak():
    cfg = preset("debug")
    measured = measure_peak_bytes(cfg, 2, live_only=True)
    assert measured.flow_steps_per_sample == cfg.resolved().surface + 15 * cfg.resolved().max_flows_per_sample
    assert 0.8 <= estimate_peak_bytes(cfg, 2) / measured.peak_bytes <= 1.2


@pytest.mark.parametrize("name, budget_gb", [("smoke", 0.9), ("debug", 3.0)])
def test_planned_batch_stays_within_budget_when_measured(name, budget_gb):
    cfg = preset(name)
    plan = plan_batch(cfg, int(budget_gb * GiB), max_batch=256)
    assert plan.batch >= 2 and plan.estimate_bytes < plan.required_bytes <= plan.budget_bytes
    measured = measure_peak_bytes(cfg, plan.batch, live_only=False)  # as a training process runs
    assert measured.peak_bytes <= plan.budget_bytes, (plan, measured)


def test_over_budget_is_refused_naming_estimate_and_budget():
    with pytest.raises(MemoryBudgetError, match=r"needs an estimated [\d.]+ GiB \([\d.]+ GiB with 170% allocator headroom\), "
                                                 r"over the budget of 1.00 GiB"):
        plan_batch(preset("scale-300"), 1 * GiB)
    assert issubclass(MemoryBudgetError, ValueError)
    assert available_memory_bytes("cpu") > 0


def test_plan_cli_prints_the_choice_and_refuses_one_line():
    ok = cli("plan", "--preset", "debug", "--budget-gb", "4", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "largest batch that fits" in ok.stdout and "budget 4.00 GiB" in ok.stdout
    refused = cli("plan", "--preset", "scale-300", "--budget-gb", "2", timeout=120)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "over the budget of 2.00 GiB" in lines[0]


@pytest.mark.parametrize("flag, needle", [
    (["--flows-per-sample", "5"], "flows_per_sample=5 (--flows-per-sample) is out of range; allowed range [64, 128]"),
    (["--steps", "999"], "steps=999 (--steps) is out of range; allowed range [1, 16]"),
])
def test_plan_flags_out_of_range_are_a_user_error_naming_flag_and_range(flag, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        plan_batch(preset("smoke"), GiB, **{flag[0][2:].replace("-", "_"): int(flag[1])})
    refused = cli("plan", "--preset", "smoke", "--budget-gb", "1", *flag, timeout=120)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {needle}"), lines


def test_bench_writes_every_figure(tmp_path, corpus_path):
    out = tmp_path / "bench.json"
    result = cli("bench", "--preset", "smoke", "--batch", "4", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    figures = data["presets"]["smoke"]
    for key in ("matmul_peak_gflops", "flow_steps_per_s", "train_step_s",
                "peak_mem_gb", "steps_used_ratio", "decode_overhead"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    for key in ("mfu_forward", "mfu_train"):  # a ratio to the peak, or unknown with the reason
        assert (isinstance(figures[key], float) and 0 < figures[key] <= 1) or (
            figures[key] is None and figures["mfu_unknown_why"]), (key, figures[key])
    assert figures["forward_s"] < figures["train_step_s"] and 0 < figures["steps_used_ratio"] <= 1
    assert data["machine"]["cpu_count"] >= 1


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True).stdout


def test_export_model_writes_that_commits_model_package(tmp_path):
    from orchestrator.perf.bench import export_model
    commit = export_model("HEAD", tmp_path)
    assert commit == _git("rev-parse", "HEAD").decode().strip()
    for name in ("flow.py", "lattice.py", "config.py"):
        assert (tmp_path / "model" / name).read_bytes() == _git("show", f"HEAD:model/{name}")
    assert not (tmp_path / "orchestrator").exists()  # only model/: the workers time its code, not a copy of ours


def test_bench_compare_times_both_sides_in_turns_and_prints_their_ratios(tmp_path, corpus_path):
    out = tmp_path / "compare.json"
    result = cli("bench", "--compare", "HEAD", "--preset", "smoke", "--batch", "2", "--repeats", "3",
                 "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["ref"]["commit"] == _git("rev-parse", "HEAD").decode().strip()
    figures = data["presets"]["smoke"]
    for side in ("ref", "tree"):
        runs = figures[side]["runs"]
        assert len(runs) == 3 and all(0 < r["forward_s"] < r["train_step_s"] for r in runs), runs
        assert figures[side]["flow_steps"] >= 2 * 64 and figures[side]["train_step_cpu_s"] > 0
    for key in ("forward", "train_step", "forward_cpu", "train_step_cpu"):
        ref, tree = ([r[f"{key}_s"] for r in figures[side]["runs"]] for side in ("ref", "tree"))
        assert figures[f"{key}_ratio"] == pytest.approx(figures["tree"][f"{key}_s"] / figures["ref"][f"{key}_s"])
        turns = sorted(b / a for a, b in zip(ref, tree))
        assert figures[f"{key}_turn_ratio"] == pytest.approx(turns[1])  # the median of 3
        assert figures[f"{key}_tree_faster"] == sum(t < 1 for t in turns)
    assert data["machine"]["torch_threads"] == 1
    lines = result.stdout.splitlines()
    assert lines[1].split()[:6] == ["preset", "batch", "seconds", "A", "B", "B/A"]
    rows = {" ".join(line.split()[2:-5]): line.split()[-5:] for line in lines[2:6]}
    assert set(rows) == {"forward", "train step", "forward CPU", "train step CPU"}
    assert all(float(value) > 0 for values in rows.values() for value in values[:-1])
    assert all(values[-1].endswith("/3") for values in rows.values())
    assert lines[6].split()[:3] == ["smoke", "2", "flow"]


def test_bench_compare_refuses_what_is_no_commit_in_one_line():
    refused = cli("bench", "--compare", "no-such-commit-here", "--preset", "smoke", timeout=120)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compare 'no-such-commit-here' is not a commit"), lines


def test_bench_profile_lists_the_top_operators(tmp_path, corpus_path):
    out = tmp_path / "profile.json"
    result = cli("bench", "--profile", "--preset", "smoke", "--batch", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())["presets"]["smoke"]
    names, ms = [row["name"] for row in figures["cpu"]], [row["ms"] for row in figures["cpu"]]
    assert 0 < len(names) <= 20 and any(n in names for n in ("aten::addmm", "aten::mm"))
    assert ms == sorted(ms, reverse=True) and ms[-1] > 0
    assert set(figures["phases_ms"]) == {"forward", "loss", "backward", "optimizer"}
    assert figures["device"] is None  # CUDA kernels only where the step ran on a GPU
    assert "self CPU ms" in result.stdout and "aten::" in result.stdout
