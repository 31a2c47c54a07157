"""`python -m orchestrator bench`: how fast the flow step runs, and how much memory training takes.

For each preset, in one process: the time of a training step's forward pass and of the whole step
(forward, backward, optimizer), flow-steps per second, the achieved GFLOP/s of the flow step next
to the matmul peak of the dtype the step computes in (fp32, or bf16 / fp16 under autocast), timed
on the same device in the same process (their ratio is the MFU), peak memory, the flow steps
adaptive convergence used out of max_steps, and the cost of one decoding pass on the step's device
relative to a training step. Warm-up runs first; every step figure is the median over repeats.

FLOPs are counted, not measured: `flow_step_flops(cfg)` (GRU gates and heads per active flow per
step, see model/lattice.py) times the active flows of every step, which the flow processor records
in FlowStats.active_per_step. A training step counts three times the forward FLOPs (backward
takes a gradient for both operands of every matmul); checkpointing's recomputation is not counted,
so checkpointed presets show it as lower MFU.

`--profile`: torch.profiler over two training steps per preset, the operators with the most self CPU
time (and on a GPU the kernels with the most device time). `--compare REF`: the same training step
timed on commit REF's model and on this working tree's, in two worker processes taking turns step
by step, with their ratios (of the medians, and turn by turn): on a shared, noisy machine the
ratio is the figure that means something. Both run bench_step.TrainStep, which this module's own
timings use too.
"""
from __future__ import annotations

import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model import flow_step_flops, preset

from ..context import choose_device
from ..data.datasets import PairDataset, validation_rows
from ..evaluation import decode, text_metrics
from ..memory import keep_freed_memory, peak_memory_bytes, reset_peak_memory
from .bench_step import TrainStep, format_profile, sync

DEFAULT_PRESETS = ("debug", "experiment", "scale-50")
# Batches that run in seconds to a minute per step on a 2-core CPU; --batch overrides them.
DEFAULT_BATCH = {"smoke": 16, "debug": 16, "experiment": 8, "scale-50": 4, "scale-150": 1, "scale-300": 1,
                 "optimized": 1}
DECODE_ROWS = 256  # validation rows a decoding pass covers (TrainConfig.val_max_samples' default)
# The dtype a step's matmuls run in under each ModelConfig.precision (autocast's dtype).
STEP_DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
PROFILE_STEPS, PROFILE_TOP = 2, 20  # training steps a profile covers; operators it lists


@dataclass(frozen=True)
class MatmulPeak:
    gflops: float
    dtype: str       # the dtype of the product it computed
    size: int        # n of the n x n x n matmul
    repeats: int
    threads: int     # torch's intra-op threads (CPU), the count the step runs with


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, *, max_size: int | None = None,
                size: int | None = None, repeats: int | None = None, warmup_s: float | None = None) -> MatmulPeak:
    """The GFLOP/s of a square matmul in `dtype` on `device`: the yardstick of the flow step's MFU.

    Best of `repeats`, not their median: a busy neighbour, a GPU clock still ramping up or a cold
    cache only ever slow a run down, so the fastest run is the closest to what the hardware does,
    and a step computing in the same dtype cannot outrun it. Before timing, the size doubles from
    256 until one product takes a quarter second or reaches max_size (CPU 4096, GPU 8192; a dtype
    without native kernels, such as bf16 on a CPU without AVX-512 BF16, runs orders of magnitude
    slower and stops small), then warm-up runs for `warmup_s` (thread pools, cuBLAS handles, clocks).
    `size` skips the search (to measure again at the size found before). On the CPU it runs at this
    process's thread count, which the step runs at too."""
    cuda = device.type == "cuda"
    max_size = max_size or (8192 if cuda else 4096)
    repeats = repeats or (20 if cuda else 5)
    warmup_s = (1.0 if cuda else 0.5) if warmup_s is None else warmup_s

    def timed(a: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor]:
        sync(device)
        start = time.perf_counter()
        product = torch.matmul(a, b)
        sync(device)
        return time.perf_counter() - start, product

    n = size or min(256, max_size)
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        seconds, product = timed(a, b)
        if size or seconds >= 0.25 or 2 * n > max_size:
            break
        n *= 2
    warm_until = time.perf_counter() + warmup_s
    while time.perf_counter() < warm_until:
        timed(a, b)
    best = min(timed(a, b)[0] for _ in range(repeats))
    return MatmulPeak(gflops=2 * n ** 3 / best / 1e9, dtype=str(product.dtype).removeprefix("torch."), size=n,
                      repeats=repeats, threads=torch.get_num_threads())


def decode_pass_seconds(data: PairDataset, device: torch.device | str = "cpu", repeats: int = 5) -> float:
    """One decoding pass as the training loop runs it, on the device it trains on: nearest-neighbour
    retrieval of validation predictions over the validation target embeddings, the neighbours read
    back to the host, then top-1 and BLEU of the decoded texts.

    The input embeddings stand in for the model's predictions: the cost of retrieval and BLEU does not
    depend on how good the predictions are, and the model's forward pass is validation, not decoding.
    """
    device = torch.device(device)
    val = validation_rows(data, DECODE_ROWS)
    bank = F.normalize(torch.from_numpy(val.target_emb).to(device), dim=-1)
    pred, target = torch.from_numpy(val.input_emb).to(device), torch.from_numpy(val.target_emb).to(device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        text_metrics(decode(pred, target, bank).texts(val), val)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _machine_cpu_seconds() -> float | None:
    """CPU seconds every process on this machine has used (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def bench_batch(data: PairDataset, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) every bench of `batch` rows runs on: the first training rows, repeated
    if there are fewer."""
    rows = (torch.arange(batch) % len(data.train)).numpy()
    return torch.from_numpy(data.train.input_emb[rows]), torch.from_numpy(data.train.target_emb[rows])


def _default_data() -> PairDataset:
    from ..config import make_config
    from ..run_data import load_data
    return load_data(make_config("debug"))


def bench_preset(name: str, batch: int, device: torch.device, data: PairDataset, *, repeats: int = 3,
                 overrides: dict[str, Any] | None = None, seed: int = 0,
                 peak: MatmulPeak | None = None, peak_max_size: int | None = None) -> dict[str, Any]:
    """Every figure for one preset at one batch size (see the module docstring).

    `peak`: the matmul peak of this preset's step dtype, if already measured in this process."""
    step = TrainStep.build(name, *bench_batch(data, batch), device, overrides=overrides, seed=seed)
    model = step.model
    step_dtype = STEP_DTYPES[model.cfg.precision]
    if peak is None or peak.dtype != str(step_dtype).removeprefix("torch."):
        peak = matmul_peak(device, step_dtype, max_size=peak_max_size)
    per_flow = flow_step_flops(model.cfg)

    def train_step() -> dict[str, Any]:
        run = step.run()
        return {**run, "flops": per_flow * run["flow_steps"]}

    machine_start, own_start, wall_start = _machine_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    reset_peak_memory(device)
    train_step()  # warm-up: allocator, thread pools, autograd's first-use costs
    runs = [train_step() for _ in range(repeats)]
    peak_bytes = peak_memory_bytes(device)
    # Once more after the steps: a neighbour that was busy while the peak was first timed and quiet
    # during the steps would otherwise let the step outrun its own yardstick. The faster one counts.
    again = matmul_peak(device, step_dtype, size=peak.size, repeats=3, warmup_s=0.2)
    if again.gflops > peak.gflops:
        peak = replace(peak, gflops=again.gflops, repeats=peak.repeats + again.repeats)
    peak_gflops = peak.gflops

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    forward_gflops = statistics.median(r["flops"] / r["forward_s"] for r in runs) / 1e9
    train_gflops = statistics.median(3 * r["flops"] / r["train_step_s"] for r in runs) / 1e9
    # A step cannot really outrun its dtype's matmul peak; if it seems to, the peak was timed while a
    # neighbour held the CPU. Time it again a few times; if it still trails, say MFU is unknown
    # rather than print a ratio above 1.
    for _ in range(3):
        if max(forward_gflops, train_gflops) <= peak.gflops:
            break
        again = matmul_peak(device, step_dtype, size=peak.size, repeats=3, warmup_s=0.2)
        if again.gflops > peak.gflops:
            peak = replace(peak, gflops=again.gflops, repeats=peak.repeats + again.repeats)
    peak_gflops = peak.gflops
    mfu_known = max(forward_gflops, train_gflops) <= peak_gflops
    decode_s = decode_pass_seconds(data, device)
    # Share of the machine's CPU that other processes used while this preset ran: the figures of a
    # CPU run are only worth reporting when it is near 0 (the matmul peak and the model both suffer,
    # but not equally).
    interference = None
    if machine_start is not None:
        others = (_machine_cpu_seconds() - machine_start) - (_own_cpu_seconds() - own_start)
        interference = max(0.0, others) / ((time.perf_counter() - wall_start) * (os.cpu_count() or 1))
    c = model.cfg
    return {
        "preset": name, "batch": batch, "device": str(device),
        "lattice": f"{c.width}x{c.height}x{c.depth}", "carrier": f"{c.carrier_hidden}x{c.carrier_layers}",
        "activation_checkpointing": c.activation_checkpointing, "saved_state_dtype": c.saved_state_dtype,
        "precision": c.precision, "repeats": repeats,
        "forward_s": median("forward_s"), "train_step_s": median("train_step_s"),
        "flow_steps": median("flow_steps"), "flow_steps_per_s": median("flow_steps") / median("forward_s"),
        "flops_per_flow_step": per_flow, "forward_gflop": median("flops") / 1e9,
        "forward_gflops": forward_gflops, "train_gflops": train_gflops, "matmul_peak_gflops": peak_gflops,
        "matmul_peak_dtype": peak.dtype, "matmul_peak": asdict(peak),
        "mfu_forward": forward_gflops / peak_gflops if mfu_known else None,
        "mfu_train": train_gflops / peak_gflops if mfu_known else None,
        "mfu_unknown_why": None if mfu_known else mfu_unknown_why(
            device, step_dtype, peak_gflops, native_matmul(device, step_dtype)),
        "peak_mem_gb": peak_bytes / 2**30,
        "peak_mem_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
        "peak_mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "steps_used": median("steps_used"), "max_steps": c.max_steps,
        "steps_used_ratio": median("steps_used") / c.max_steps,
        "decode_pass_s": decode_s, "decode_overhead": decode_s / median("train_step_s"),
        "other_processes_cpu_share": interference,
    }


def native_matmul(device: torch.device, dtype: torch.dtype) -> bool | None:
    """Whether this CPU multiplies `dtype` natively (AVX-512 BF16 / AMX / AVX-512 FP16, as torch's oneDNN
    reports it); None where torch does not say. GPUs and fp32 count as native."""
    if device.type != "cpu" or dtype == torch.float32:
        return True
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError, TypeError):
        return None


def mfu_unknown_why(device: torch.device, dtype: torch.dtype, peak_gflops: float, native: bool | None) -> str:
    """Why a step that outran its dtype's matmul peak gets no MFU."""
    name = str(dtype).removeprefix("torch.")
    if native is False:
        return (f"this CPU has no native {name} matmul (torch's oneDNN reports none): the {name} matmul timed here "
                f"runs at {peak_gflops:.2g} GFLOP/s on an emulated path that the step's own kernels outrun, so it "
                f"is no ceiling to divide by; train in fp32 on this CPU")
    return ("the step outran the matmul peak timed in this process: other processes held the CPU "
            "while the peak was timed (see other_processes_cpu_share)")


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": _cpu_model(), "load_average_1m": os.getloadavg()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_bench(presets: list[str], *, batch: int | None = None, device: str = "auto", repeats: int = 3,
              overrides: dict[str, Any] | None = None, data: PairDataset | None = None,
              cpu_keep_freed_memory: bool = False, log=print) -> dict[str, Any]:
    """Bench every preset in this process; returns {"machine": ..., "presets": {name: figures}}."""
    dev = choose_device(device, torch.cuda.is_available(), "torch sees no CUDA device here")
    kept = dev.type == "cpu" and cpu_keep_freed_memory and keep_freed_memory()
    data = data or _default_data()
    result: dict[str, Any] = {"machine": {**machine_info(dev), "cpu_keep_freed_memory": kept}, "presets": {}}
    peaks: dict[str, MatmulPeak] = {}  # one measurement per dtype serves every preset that steps in it
    for name in presets:
        b = batch or DEFAULT_BATCH.get(name, 1)
        log(f"bench {name} at batch {b} on {dev} ...")
        dtype = str(STEP_DTYPES[preset(name, **(overrides or {})).precision]).removeprefix("torch.")
        figures = bench_preset(name, b, dev, data, repeats=repeats, overrides=overrides, peak=peaks.get(dtype))
        peaks[dtype] = MatmulPeak(**figures["matmul_peak"])
        result["presets"][name] = figures
    result["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    return result


COLUMNS = (("preset", "{}"), ("batch", "{}"), ("forward_s", "{:.3f}"), ("train_step_s", "{:.3f}"),
           ("flow_steps_per_s", "{:.0f}"), ("forward_gflops", "{:.1f}"), ("matmul_peak_dtype", "{}"),
           ("matmul_peak_gflops", "{:.1f}"),
           ("mfu_forward", "{:.2f}"), ("mfu_train", "{:.2f}"), ("peak_mem_gb", "{:.2f}"),
           ("steps_used", "{:.0f}"), ("max_steps", "{}"), ("decode_overhead", "{:.3f}"),
           ("other_processes_cpu_share", "{:.2f}"))


def format_table(result: dict[str, Any]) -> str:
    rows = [[fmt.format(figures[key]) if figures[key] is not None else "-" for key, fmt in COLUMNS]
            for figures in result["presets"].values()]
    return "\n".join(_aligned([key for key, _ in COLUMNS], rows))


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """The header and rows as lines of right-aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [header, *rows]]


# ------------------------------------------------------------------------------------------------
# Profiles, and one commit against another


def profile_presets(presets: list[str], *, batch: int | None = None, device: str = "auto",
                    overrides: dict[str, Any] | None = None, data: PairDataset | None = None,
                    steps: int = PROFILE_STEPS, top: int = PROFILE_TOP, log=print) -> dict[str, Any]:
    """torch.profiler over `steps` training steps of each preset, after a warm-up step, in this
    process: {"machine": ..., "presets": {name: TrainStep.profile(...) plus its batch}}."""
    dev = choose_device(device, torch.cuda.is_available(), "torch sees no CUDA device here")
    data = data or _default_data()
    result: dict[str, Any] = {"machine": machine_info(dev), "presets": {}}
    for name in presets:
        b = batch or DEFAULT_BATCH.get(name, 1)
        log(f"profile {name} at batch {b} on {dev} ...")
        step = TrainStep.build(name, *bench_batch(data, b), dev, overrides=overrides)
        step.run()  # warm-up
        result["presets"][name] = {"batch": b, **step.profile(steps, top)}
    return result


def format_profiles(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = f"{m['cpu']}, {m.get('gpu') or 'CPU'}, torch {m['torch']}, {m['torch_threads']} threads"
    return "\n\n".join([head] + [format_profile(f, f"{name} at batch {f['batch']}")
                                 for name, f in result["presets"].items()])


class CompareError(ValueError):
    """`bench --compare` cannot run: the reference is no commit here, or one side's model failed."""


REPO_ROOT = Path(__file__).resolve().parents[2]  # orchestrator/perf/bench.py -> the repository


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True)


def export_model(ref: str, dest: Path) -> str:
    """Write the `model/` package of commit `ref` into `dest`; returns the commit's full hash.

    `git archive` reads the repository and writes nothing into it (`git worktree add` would
    register a worktree there); model/ imports nothing outside itself, so it is all a worker needs."""
    found = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if found.returncode:
        raise CompareError(f"--compare {ref!r} is not a commit of the git repository at {REPO_ROOT}")
    commit = found.stdout.decode().strip()
    archive = _git("archive", "--format=tar", commit, "model")
    if archive.returncode:
        raise CompareError(f"--compare {ref!r}: git archive failed: {archive.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def working_tree_label() -> str:
    """HEAD's short hash, and whether model/ has changes not committed yet."""
    head = _git("rev-parse", "--short", "HEAD").stdout.decode().strip() or "no commit"
    changed = _git("status", "--porcelain", "--", "model").stdout.strip()
    return f"{head} + uncommitted changes to model/" if changed else head


class _Worker:
    """A `python -m orchestrator.perf.bench_step` process timing the `model/` package in `model_root`."""

    def __init__(self, model_root: Path, label: str):
        self.model_root, self.label = model_root, label
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        # The working directory comes first on a `-m` module's sys.path, so `model` is model_root's.
        self.process = subprocess.Popen([sys.executable, "-m", "orchestrator.perf.bench_step"], cwd=model_root,
                                        env={**os.environ, "PYTHONPATH": path}, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        try:
            self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it stopped; readline below says so
        line = self.process.stdout.readline()
        if not line:
            raise CompareError(f"the worker timing {self.label} stopped (exit code {self.process.wait()}); "
                               f"its error is printed above")
        answer = json.loads(line)
        if "error" in answer:
            raise CompareError(f"{self.label}: {answer['error']}")
        return answer

    def build(self, **fields: Any) -> None:
        loaded = Path(self.ask("build", **fields)["model_path"]).resolve()
        if not loaded.is_relative_to(self.model_root.resolve()):
            raise CompareError(f"the worker for {self.label} imported {loaded}, not the model in {self.model_root}")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


COMPARED = (("forward_s", "forward"), ("train_step_s", "train step"),
            ("forward_cpu_s", "forward CPU"), ("train_step_cpu_s", "train step CPU"))


def _compared(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Both sides' medians, and per measure B/A three ways: the ratio of the medians, the median of
    the ratios turn by turn (each B step against the A step next to it in time, so a load that
    changes over the run cancels), and in how many turns B was the faster."""
    figures: dict[str, Any] = {side: {key: statistics.median(run[key] for run in side_runs)
                                      for key in (*(k for k, _ in COMPARED), "flow_steps", "steps_used")}
                               for side, side_runs in runs.items()}
    for side, side_runs in runs.items():
        figures[side]["runs"] = side_runs
    for key, _ in COMPARED:
        turns = [b[key] / a[key] for a, b in zip(runs["ref"], runs["tree"])]
        name = key.removesuffix("_s")
        figures[f"{name}_ratio"] = figures["tree"][key] / figures["ref"][key]
        figures[f"{name}_turn_ratio"] = statistics.median(turns)
        figures[f"{name}_tree_faster"] = sum(ratio < 1 for ratio in turns)
    return figures


def compare_bench(ref: str, presets: list[str], *, batch: int | None = None, device: str = "auto",
                  repeats: int = 3, overrides: dict[str, Any] | None = None, data: PairDataset | None = None,
                  profile: bool = False, log=print) -> dict[str, Any]:
    """Time the training step of every preset on commit `ref`'s model (A) and on this working tree's
    (B), each in its own worker process, taking turns step by step: A B, B A, A B, ... The machine's
    load changes from second to second; alternating puts both sides under the same load, so the
    ratios B/A (see _compared) mean something where their seconds alone do not. Both workers run
    this checkout's timing code (bench_step.TrainStep) on the same rows, seed, device and threads.
    With `profile`, each side is also profiled (TrainStep.profile) before the timed steps."""
    dev = choose_device(device, torch.cuda.is_available(), "torch sees no CUDA device here")
    result: dict[str, Any] = {"machine": machine_info(dev), "repeats": repeats, "order": "A B, B A, ...",
                              "presets": {}}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        commit = export_model(ref, Path(tmp) / "ref")  # first: a wrong REF stops before anything slow
        data = data or _default_data()
        result["ref"] = {"name": ref, "commit": commit, "label": f"{ref} ({commit[:10]})"}
        result["tree"] = {"label": f"working tree ({working_tree_label()})"}
        workers = {"ref": _Worker(Path(tmp) / "ref", result["ref"]["label"]),
                   "tree": _Worker(REPO_ROOT, result["tree"]["label"])}
        try:
            for name in presets:
                b = batch or DEFAULT_BATCH.get(name, 1)
                log(f"compare {name} at batch {b} on {dev}: {result['ref']['label']} against the working tree ...")
                batch_file = Path(tmp) / f"{name}-batch.pt"
                inputs, targets = bench_batch(data, b)
                torch.save({"inputs": inputs, "targets": targets}, batch_file)
                for worker in workers.values():
                    worker.build(preset=name, data=str(batch_file), device=str(dev), overrides=overrides or {}, seed=0,
                                 threads=torch.get_num_threads())
                figures: dict[str, Any] = {"batch": b}
                if profile:
                    for side, worker in workers.items():
                        figures[side + "_profile"] = worker.ask("profile", steps=PROFILE_STEPS, top=PROFILE_TOP)
                runs: dict[str, list[dict[str, Any]]] = {"ref": [], "tree": []}
                for r in range(repeats):
                    for side in ("ref", "tree") if r % 2 == 0 else ("tree", "ref"):
                        runs[side].append(workers[side].ask("step"))
                figures.update(_compared(runs))
                result["presets"][name] = figures
        finally:
            for worker in workers.values():
                worker.close()
    result["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    return result


def format_compare(result: dict[str, Any]) -> str:
    """The comparison as a table: per preset and measure (wall and CPU seconds of the forward pass
    and the training step) each side's median, B/A of the medians and turn by turn, and how often
    B was faster; then the profiles if taken. Where the two ratios disagree, or B wins about half
    the turns, the difference is within the machine's noise: more repeats, or `--threads 1`."""
    m = result["machine"]
    lines = [f"A = {result['ref']['label']}, B = {result['tree']['label']}; {m['cpu']}, "
             f"{m.get('gpu') or 'CPU'}, torch {m['torch']}, {m['torch_threads']} threads; "
             f"{result['repeats']} training steps each, taken in turns ({result['order']})"]
    header = ["preset", "batch", "seconds", "A", "B", "B/A", "B/A turn by turn", "B faster"]
    rows = []
    for name, f in result["presets"].items():
        for key, label in COMPARED:
            ratio = key.removesuffix("_s")
            rows.append([name, str(f["batch"]), label, f"{f['ref'][key]:.3f}", f"{f['tree'][key]:.3f}",
                         f"{f[ratio + '_ratio']:.3f}", f"{f[ratio + '_turn_ratio']:.3f}",
                         f"{f[ratio + '_tree_faster']}/{result['repeats']}"])
        rows.append([name, str(f["batch"]), "flow steps", f"{f['ref']['flow_steps']:.0f}",
                     f"{f['tree']['flow_steps']:.0f}", "", "", ""])
    lines += _aligned(header, rows)
    for name, f in result["presets"].items():
        for side in ("ref", "tree"):
            if side + "_profile" in f:
                lines += ["", format_profile(f[side + "_profile"], f"{name} at batch {f['batch']}, "
                                                                    f"{'A' if side == 'ref' else 'B'} = {result[side]['label']}")]
    return "\n".join(lines)


__all__ = ["DEFAULT_PRESETS", "DEFAULT_BATCH", "STEP_DTYPES", "CompareError", "MatmulPeak", "bench_batch",
           "bench_preset", "compare_bench", "decode_pass_seconds", "export_model", "format_compare",
           "format_profiles", "format_table", "machine_info", "matmul_peak", "profile_presets", "run_bench"]
