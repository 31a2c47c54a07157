"""The baselines every run is measured against: identity, mean target, ridge and kernel ridge."""
import numpy as np
import pytest

from orchestrator.data import Split
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
