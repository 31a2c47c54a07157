"""The baselines every run is measured against: identity, mean target, ridge and kernel ridge."""
import numpy as np
import pytest

from orchestrator.data.datasets import Split
from orchestrator.evaluation import KernelRidge, compute_baselines


def split(inputs, targets, tag):
    n = len(inputs)
    return Split(input_texts=[f"{tag} in {i}" for i in range(n)], target_texts=[f"{tag} out {i}" for i in range(n)],
                 input_emb=inputs.astype(np.float32), target_emb=targets.astype(np.float32))


def nonlinear_task(n, seed, dim=16):
    """Targets that no linear map of the inputs can predict: products and centred squares of input
    coordinates (unit-norm inputs, so the exp-cosine kernel sees their directions)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x * np.roll(x, 1, axis=1) + 0.5 * (x ** 2 - 1 / dim)  # same width as x, for the identity baseline
    return x, y


def test_kernel_ridge_beats_ridge_on_a_nonlinear_task():
    train = split(*nonlinear_task(800, seed=0), "train")
    val = split(*nonlinear_task(200, seed=1), "val")
    out = compute_baselines(train, val)
    assert out["baseline_kernel_ridge_cosine"] > out["baseline_ridge_cosine"] + 0.2
    assert out["baseline_ridge_cosine"] < 0.3, "the task is built so that a linear map cannot solve it"


def test_baseline_hyperparameters_never_see_validation_rows():
    train = split(*nonlinear_task(400, seed=0), "train")
    val_inputs, val_targets = nonlinear_task(100, seed=1)
    noise = np.random.default_rng(2).standard_normal(val_targets.shape)
    a = compute_baselines(train, split(val_inputs, val_targets, "val"))
    b = compute_baselines(train, split(val_inputs, noise, "val"))
    for key in ("baseline_ridge_lambda", "baseline_kernel_ridge_width", "baseline_kernel_ridge_lambda"):
        assert a[key] == b[key], key
    assert a["baseline_kernel_ridge_cosine"] != b["baseline_kernel_ridge_cosine"], "the scores do use the rows"
    # and the choice does follow the training holdout: a task with another scale picks another width
    model = KernelRidge.fit(train)
    assert (model.width, model.penalty) == (a["baseline_kernel_ridge_width"], a["baseline_kernel_ridge_lambda"])


def test_identity_and_mean_target_baselines():
    x, y = nonlinear_task(300, seed=0)
    train, val = split(x[:200], y[:200], "train"), split(x[200:], x[200:], "val")  # val targets = inputs
    out = compute_baselines(train, val)
    assert out["baseline_identity_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["baseline_identity_top1"] == 1.0
    mean = y[:200].mean(0)
    expected = np.mean(x[200:] @ mean / (np.linalg.norm(x[200:], axis=1) * np.linalg.norm(mean)))
    assert out["baseline_mean_target_cosine"] == pytest.approx(expected, abs=1e-5)


def test_evaluate_decodes_the_skip_path_the_model_computes():
    import torch

    from model import EnergyLattice, preset
    from orchestrator.evaluation import decode, evaluate
    rng = np.random.default_rng(0)
    val = split(rng.standard_normal((24, 384)), rng.standard_normal((24, 384)), "val")
    torch.manual_seed(0)
    model = EnergyLattice(preset("smoke")).eval()
    with torch.no_grad():
        model.skip_scale.fill_(0.7)
    skip = evaluate(model, val, batch_size=8, device=torch.device("cpu"), seed=1).skip_decoded
    targets = torch.from_numpy(val.target_emb)
    rebuilt = decode(model.skip_scale.detach() * torch.from_numpy(val.input_emb), targets,
                     torch.nn.functional.normalize(targets, dim=-1))
    assert torch.equal(skip.cosine, rebuilt.cosine) and torch.equal(skip.neighbour, rebuilt.neighbour)
    no_skip = EnergyLattice(preset("smoke", skip=False)).eval()
    assert evaluate(no_skip, val, batch_size=8, device=torch.device("cpu"), seed=1).skip_decoded is None


def test_the_lattice_gain_is_over_the_shortcut_with_or_without_a_skip_path():
    """With a skip path, the gain is over the skip path alone; without one, over the input copied
    unchanged (the identity baseline), so dropping the skip path cannot turn the whole prediction into gain."""
    from model import EnergyLattice, preset
    import torch

    from orchestrator.evaluation import evaluate, finish_metrics
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((24, 384))
    val = split(inputs, inputs + rng.standard_normal((24, 384)), "val")
    identity = torch.nn.functional.cosine_similarity(torch.from_numpy(val.input_emb),
                                                     torch.from_numpy(val.target_emb), dim=-1).mean().item()
    torch.manual_seed(0)
    for skip in (True, False):
        model = EnergyLattice(preset("smoke", skip=skip)).eval()
        metrics = finish_metrics(evaluate(model, val, batch_size=8, device=torch.device("cpu"), seed=1).metrics)
        shortcut = metrics["cosine_skip_only"] if skip else identity
        assert metrics["lattice_gain"] == pytest.approx(metrics["cosine"] - shortcut, abs=1e-6)
        assert "cosine_shortcut" not in metrics
    assert metrics["cosine_skip_only"] == 0.0  # the no-skip model's skip path predicts nothing


def test_quality_table_lines():
    from orchestrator.perf.quality import format_quality_table
    result = {"preset": "debug", "steps": 1000, "batch_size": 32, "precision": "fp32", "train_rows": 3000,
              "val_rows": 256, "rows": [{"predictor": "lattice", "cosine": 0.61234, "top1": 0.2, "bleu": 12.34},
                                        {"predictor": "kernel ridge", "cosine": 0.4, "top1": 0.1, "bleu": 3.0}],
              "lattice_gain": 0.0123, "plane_difference": 0.4567, "plane_balance": 0.321, "skip_scale": 0.876,
              "train_seconds": 123.4, "seconds_per_step": 0.1234, "baseline_seconds": 12.2,
              "curve": [{"step": 0, "val_cosine": 0.1, "val_top1": 0.0}, {"step": 100, "val_cosine": 0.5,
                                                                        "val_top1": 0.12}]}
    assert format_quality_table(result).splitlines() == [
        "quality: debug, 1000 steps x batch 32 (fp32), 3000 training rows, 256 validation rows",
        "",
        "  predictor       cosine  top-1   BLEU",
        "  lattice         0.6123  0.200   12.3",
        "  kernel ridge    0.4000  0.100    3.0",
        "",
        "  lattice gain over its skip path +0.0123; plane difference 0.457, balance 0.321; skip scale 0.876",
        "  training 123 s (0.12 s/step, validations included), baselines 12 s",
        "  validation curve: 0: 0.100/0.000, 100: 0.500/0.120  (step: cosine/top-1)"]
    assert format_quality_table({**result, "skip_scale": None}).splitlines()[6].endswith("balance 0.321")


def test_nystroem_kernel_ridge_matches_the_exact_solver_on_real_embeddings(corpus_path):
    # 2,700 training rows of the stdlib corpus are well within the exact solver's reach; Nystroem
    # solves the same problem through landmark rows, chosen with width and penalty on the training holdout.
    from orchestrator.data.datasets import load_dataset
    data = load_dataset(corpus_path, embed_dim=384, max_rows=3000)
    train, val = data.train, data.val
    exact = KernelRidge.fit(train, nystroem=False)
    nystroem = KernelRidge.fit(train, nystroem=True)
    assert exact.n_landmarks == len(train) and nystroem.n_landmarks < len(train)
    cosines = [float(np.mean(np.sum(_unit(m.predict(val.input_emb)) * _unit(val.target_emb), axis=1)))
               for m in (exact, nystroem)]
    assert abs(cosines[0] - cosines[1]) < 0.005, cosines


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_nystroem_memory_does_not_grow_with_the_square_of_the_rows():
    # 40,000 rows: the exact solver's one Gram matrix alone is 40,000^2 float64 = 12.8 GB. The
    # landmark solver holds m^2 plus a block of rows, so its whole process stays within a few
    # hundred MB of what the data itself takes.
    import subprocess
    import sys
    code = """
import resource, numpy as np
from orchestrator.data.datasets import Split
from orchestrator.evaluation import KernelRidge
rng = np.random.default_rng(0)
x = rng.standard_normal((40000, 64)).astype(np.float32)
y = np.tanh(x @ rng.standard_normal((64, 64)).astype(np.float32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = KernelRidge.fit_nystroem(Split([""] * 40000, [""] * 40000, x, y), widths=(0.5,), penalties=(0.1,),
                                 max_landmarks=1000)
print(model.n_landmarks, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    landmarks, grown = map(int, out.stdout.split())
    assert landmarks == 1000
    assert grown < 600 * 2**20, f"fitting grew the process by {grown / 2**20:.0f} MB"
