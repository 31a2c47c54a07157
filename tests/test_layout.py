"""The package layout's one-way imports, read from the source with `ast` (no module is imported).

Every import counts, the ones inside functions too: a lazy import is still a dependency. The layers,
lowest first; a module may import its own layer and the ones below it, never one above:

    model/          the lattice model
    base            the foundations at orchestrator/'s top: files, faults, checkpoint, code_version,
                    memory, planner, context (the run contexts), step (the one training step), metrics (every
                    metric name)
    observe/        trackers, MLflow, console, plots
    data/           datasets, teacher, corpus builders (the teacher's progress line uses the console's
                    duration format)
    core            the training path at orchestrator/'s top: config, evaluation, run_data (the one
                    way in for data), train
    launch/, perf/  Ray launchers; benchmarks and checks. Beside each other: neither imports the other
    entry           cli.py and __main__.py
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from test_gpu_readiness import BLOCKER

REPO = Path(__file__).resolve().parents[1]

BASE = {"files", "faults", "checkpoint", "code_version", "memory", "planner", "context", "step", "metrics"}
CORE = {"config", "evaluation", "run_data", "train"}
ENTRY = {"cli", "__main__"}
RANK = {"model": 0, "base": 1, "observe": 2, "data": 3, "core": 4, "launch": 5, "perf": 5, "entry": 6}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of model/ and orchestrator/ (a package is its __init__)."""
    modules = {}
    for package in ("model", "orchestrator"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = project_modules()


def imported_modules(name: str) -> set[str]:
    """The project modules `name` imports anywhere in its file: `from .perf import bench` is perf.bench,
    `from ..data.datasets import Split` is data.datasets."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [[alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from pkg import sub` imports the submodule where there is one, else names of pkg itself
            candidates = [[f"{module}.{alias.name}", module] for alias in node.names]
        else:
            continue
        for names in candidates:
            for target in names:
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target:
                    if target != name:
                        found.add(target)
                    break
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def layer(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "model":
        return "model"
    if len(parts) == 1:
        return "base"  # orchestrator/__init__.py: a docstring
    if len(parts) == 2 and parts[1] in BASE:
        return "base"
    if len(parts) == 2 and parts[1] in CORE:
        return "core"
    if len(parts) == 2 and parts[1] in ENTRY:
        return "entry"
    assert len(parts) >= 2 and parts[1] in {"observe", "data", "launch", "perf"}, (
        f"{name} is in no layer: add it to BASE, CORE or ENTRY in tests/test_layout.py, or move it into a subpackage")
    return parts[1]


def test_the_import_reader_sees_relative_package_and_lazy_imports():
    # what the checks below rest on: these edges exist in the source in those three forms
    assert "orchestrator.perf.bench" in GRAPH["orchestrator.cli"]             # from .perf import bench (lazy)
    assert "orchestrator.data.datasets" in GRAPH["orchestrator.launch.tune"]  # from ..data.datasets import ...
    assert "orchestrator.train" in GRAPH["orchestrator.perf.memory_measure"]  # import orchestrator.train (lazy)
    assert "model.config" in GRAPH["model.lattice"]


def test_no_module_imports_one_that_imports_it_back():
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


def test_model_never_imports_orchestrator():
    upward = {name: sorted(t for t in targets if t.startswith("orchestrator"))
              for name, targets in GRAPH.items() if name.startswith("model")}
    assert not any(upward.values()), upward


def test_every_module_imports_only_its_own_layer_and_those_below():
    upward = [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
              for name, targets in sorted(GRAPH.items()) for target in sorted(targets)
              if RANK[layer(target)] > RANK[layer(name)]]
    assert not upward, "\n".join(upward)


def test_launch_and_perf_do_not_import_each_other():
    across = [f"{name} imports {target}" for name, targets in sorted(GRAPH.items()) for target in sorted(targets)
              if {layer(name), layer(target)} == {"launch", "perf"}]
    assert not across, "\n".join(across)


def test_one_training_step_runs_everywhere_and_needs_only_torch_and_the_model():
    # the loop, the benchmark's worker and the memory measurement run orchestrator.step.train_step;
    # bench --compare runs the step and its worker against another commit's model/, so neither may
    # import anything of the orchestrator but the step
    for user in ("orchestrator.train", "orchestrator.perf.bench_step", "orchestrator.perf.memory_measure"):
        assert "orchestrator.step" in GRAPH[user], user
    assert all(t.startswith("model") for t in GRAPH["orchestrator.step"]), GRAPH["orchestrator.step"]
    assert GRAPH["orchestrator.perf.bench_step"] - {"orchestrator.step"} <= {"model"} | set(
        m for m in MODULES if m.startswith("model.")), GRAPH["orchestrator.perf.bench_step"]


def test_the_repository_root_that_modules_compute_from_their_own_path_is_the_repository():
    # bench --compare runs git and its workers there; a module moved a folder deeper must count one more
    from orchestrator import code_version
    from orchestrator.perf import bench
    assert bench.REPO_ROOT == REPO and code_version.PROJECT_ROOT == REPO


def test_the_model_and_the_training_loop_import_without_ray_and_mlflow(tmp_path):
    # gpu-check's import blocker: ray, mlflow and the teacher package look uninstalled in the child
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    script = ("import model, model.transfer, orchestrator.train, orchestrator.context, orchestrator.evaluation\n"
              "import sys\n"
              "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('ray', 'mlflow')))\n"
              "import ray\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "No module named 'ray'" in result.stderr, result.stderr[-3000:]  # the blocker was in force
    assert result.stdout.strip() == "[]", result.stdout + result.stderr[-3000:]
