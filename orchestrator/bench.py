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
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from model import EnergyLattice, flow_step_flops, lattice_loss, preset

from .context import choose_device
from .data import PairDataset, validation_rows
from .evaluation import decode, text_metrics
from .memory import keep_freed_memory, peak_memory_bytes, reset_peak_memory

DEFAULT_PRESETS = ("debug", "experiment", "scale-50")
# Batches that run in seconds to a minute per step on a 2-core CPU; --batch overrides them.
DEFAULT_BATCH = {"smoke": 16, "debug": 16, "experiment": 8, "scale-50": 4, "scale-150": 1, "scale-300": 1,
                 "optimized": 1}
DECODE_ROWS = 256  # validation rows a decoding pass covers (TrainConfig.val_max_samples' default)
# The dtype a step's matmuls run in under each ModelConfig.precision (autocast's dtype).
STEP_DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _sync(device)
        start = time.perf_counter()
        product = torch.matmul(a, b)
        _sync(device)
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
        _sync(device)
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


def bench_preset(name: str, batch: int, device: torch.device, data: PairDataset, *, repeats: int = 3,
                 overrides: dict[str, Any] | None = None, seed: int = 0,
                 peak: MatmulPeak | None = None, peak_max_size: int | None = None) -> dict[str, Any]:
    """Every figure for one preset at one batch size (see the module docstring).

    `peak`: the matmul peak of this preset's step dtype, if already measured in this process."""
    cfg = preset(name, **(overrides or {}))
    torch.manual_seed(seed)
    model = EnergyLattice(cfg).to(device).train()
    # lr 0: every repeat runs on the same weights, so it times the same work (AdamW still computes).
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    rows = torch.arange(batch) % len(data.train)
    inputs = torch.from_numpy(data.train.input_emb[rows.numpy()]).to(device)
    targets = torch.from_numpy(data.train.target_emb[rows.numpy()]).to(device)
    step_dtype = STEP_DTYPES[model.cfg.precision]
    if peak is None or peak.dtype != str(step_dtype).removeprefix("torch."):
        peak = matmul_peak(device, step_dtype, max_size=peak_max_size)
    per_flow = flow_step_flops(model.cfg)

    def train_step() -> dict[str, Any]:
        torch.manual_seed(seed + 1)  # the same flow noise every time
        _sync(device)
        start = time.perf_counter()
        out = model(inputs)
        loss = lattice_loss(out, targets, model.cfg)
        _sync(device)
        forward_done = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        end = time.perf_counter()
        flow_steps = sum(out.stats.active_per_step)
        return {"forward_s": forward_done - start, "train_step_s": end - start, "flow_steps": flow_steps,
                "steps_used": out.stats.steps_used, "flops": per_flow * flow_steps}

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
    if data is None:
        from .config import make_config
        from .train import load_data
        data = load_data(make_config("debug"))
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
    header = [key for key, _ in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


__all__ = ["DEFAULT_PRESETS", "DEFAULT_BATCH", "STEP_DTYPES", "MatmulPeak", "bench_preset", "decode_pass_seconds",
           "format_table", "machine_info", "matmul_peak", "run_bench"]
