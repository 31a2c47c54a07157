"""The training loop in a plain process: learning, checkpoints, exact resume, divergence."""
import dataclasses
import json
import re

import pytest
import torch

from model import EnergyLattice, preset
from orchestrator.checkpoint import (CheckpointError, check_compatible, list_checkpoints, load_checkpoint,
                                     load_model, save_checkpoint)
from orchestrator.config import ConfigError, config_from_dict, make_config
from orchestrator.context import LocalContext
from orchestrator.faults import Faults
from orchestrator.observe.trackers import FileTracker, read_metrics
from orchestrator.metrics import SUMMARY_KEYS
from orchestrator.train import BatchStream, train_loop

QUICK = {"batch_size": 16, "val_max_samples": 64, "warmup_steps": 2, "log_every": 1}


def train(tmp_path, data, name="run", resume_from=None, faults=None, **overrides):
    cfg = make_config("smoke", {**QUICK, **overrides})
    out = tmp_path / name
    summary = train_loop(cfg, LocalContext(out, resume_from=resume_from, faults=faults), FileTracker(out), data=data)
    return summary, out


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def val_cosines(out):
    return {r["step"]: r["val_cosine"] for r in read_metrics(out / "metrics.jsonl") if "val_cosine" in r}


def test_smoke_training_improves_validation_cosine(tmp_path, small_data):
    summary, out = train(tmp_path, small_data, max_steps=80, val_every=40, lr=3e-3)
    curve = val_cosines(out)
    assert summary["status"] == "completed" and summary["steps"] == 80
    assert set(curve) == {0, 40, 80}
    assert curve[80] > curve[0] + 0.05, curve
    assert all(summary[k] is not None for k in SUMMARY_KEYS), summary
    assert -1 <= summary["baseline_identity_cosine"] <= 1 and -1 <= summary["baseline_ridge_cosine"] <= 1
    decoded = json.loads((out / "decoded" / "step_00000080.json").read_text())
    assert decoded and set(decoded[0]) == {"input", "decoded", "target"}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, small_data):
    full, full_out = train(tmp_path, small_data, "full", max_steps=8, checkpoint_every=4, val_every=4)
    middle = full_out / "checkpoints" / "step_00000004"
    resumed, resumed_out = train(tmp_path, small_data, "resumed", resume_from=middle,
                                 max_steps=8, checkpoint_every=4, val_every=4)
    a, b = losses(full_out), losses(resumed_out)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    assert resumed["val_cosine"] == pytest.approx(full["val_cosine"], rel=1e-6)


def test_checkpoint_round_trip_restores_the_model(tmp_path):
    torch.manual_seed(0)
    model = EnergyLattice(preset("smoke")).eval()
    save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict(),
                                        "model_config": dataclasses.asdict(model.cfg)})
    loaded = load_model(tmp_path / "ckpt")
    x = torch.nn.functional.normalize(torch.randn(3, 384), dim=-1)
    torch.manual_seed(5)
    expected = model(x).embedding
    torch.manual_seed(5)
    torch.testing.assert_close(loaded(x).embedding, expected)


def test_checkpoint_from_another_lattice_is_refused_naming_the_fields(tmp_path, small_data):
    _, out = train(tmp_path, small_data, max_steps=2, checkpoint_every=2)
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    other = dataclasses.replace(preset("smoke"), width=10, carrier_hidden=64)
    with pytest.raises(CheckpointError) as err:
        check_compatible(load_checkpoint(ckpt), other)
    assert "width: checkpoint 8 vs config 10" in str(err.value)
    assert "carrier_hidden: checkpoint 32 vs config 64" in str(err.value)
    assert "height" not in str(err.value)
    with pytest.raises(CheckpointError, match="width"):
        train(tmp_path, small_data, "other", resume_from=ckpt, max_steps=3, **{"model.width": 10})


def test_truncated_checkpoint_gives_a_clear_error(tmp_path, small_data):
    _, out = train(tmp_path, small_data, max_steps=2, checkpoint_every=2)
    state_file = list_checkpoints(out / "checkpoints")[-1] / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(state_file.parent)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    good = {"model": {"w": torch.ones(3)}, "model_config": {}}
    save_checkpoint(tmp_path / "ckpt", good)
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / "ckpt", {"model": {"w": torch.zeros(3)}, "oops": lambda: None})
    assert torch.equal(load_checkpoint(tmp_path / "ckpt")["model"]["w"], torch.ones(3))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["state.pt"]


def test_non_finite_loss_stops_as_diverged_and_keeps_the_last_good_checkpoint(tmp_path, small_data):
    summary, out = train(tmp_path, small_data, max_steps=10, checkpoint_every=2, val_every=2,
                         faults=Faults(nan_loss_at_step=5))
    assert summary["status"] == "diverged"
    assert summary["steps"] == 4
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step_00000004"
    assert summary["checkpoint"].endswith("step_00000004")
    state = load_checkpoint(summary["checkpoint"])
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert max(losses(out)) == 4  # nothing was logged for the bad step


def test_faults_fire_only_in_runs_with_the_named_config_values(tmp_path, small_data):
    faults = Faults(nan_loss_at_step=2, only_for={"seed": 1, "model.width": 8})
    assert faults.active_for(make_config("smoke", {"seed": 1}))
    assert not faults.active_for(make_config("smoke", {"seed": 0}))
    assert Faults().active_for(make_config("smoke"))
    with pytest.raises(ConfigError, match="unknown config field 'model.widht'"):
        Faults(only_for={"model.widht": 8}).active_for(make_config("smoke"))
    healthy, _ = train(tmp_path, small_data, "seed0", max_steps=3, seed=0, faults=faults)
    diverged, _ = train(tmp_path, small_data, "seed1", max_steps=3, seed=1, faults=faults)
    assert (healthy["status"], healthy["steps"]) == ("completed", 3)
    assert (diverged["status"], diverged["steps"]) == ("diverged", 1)


def test_a_config_saved_with_the_removed_fault_fields_still_loads():
    saved = {**dataclasses.asdict(make_config("smoke")), "fault_nan_loss_at_step": None, "fault_crash_at_step": 7}
    assert config_from_dict(saved) == make_config("smoke")


def test_resume_state_is_loaded_on_the_cpu(tmp_path, small_data):
    # torch.set_rng_state takes only a CPU ByteTensor; a state mapped to the training device made
    # every resume on CUDA fail. Weights reach the device through load_state_dict instead.
    _, out = train(tmp_path, small_data, max_steps=2, checkpoint_every=2)
    state, _ = LocalContext(out).resume_state()
    rng = state["rng"][0]
    assert rng["torch"].device.type == "cpu" and rng["torch"].dtype == torch.uint8
    assert rng.get("cuda") is None or rng["cuda"].device.type == "cpu"  # one state: the rank's own GPU
    assert all(t.device.type == "cpu" for t in state["model"].values())


def test_resume_across_precisions_and_deterministic_mode(tmp_path, small_data):
    # bf16 saves an empty GradScaler state, which an fp16 run used to refuse to load.
    _, bf16 = train(tmp_path, small_data, "bf16", max_steps=2, checkpoint_every=2, **{"model.precision": "bf16-mixed"})
    fp16, fp16_out = train(tmp_path, small_data, "fp16", resume_from=bf16 / "checkpoints" / "step_00000002",
                           max_steps=4, checkpoint_every=2, **{"model.precision": "fp16-mixed"})
    assert fp16["status"] == "completed" and fp16["steps"] == 4
    assert load_checkpoint(fp16_out / "checkpoints" / "step_00000004")["scaler"]["scale"] > 0
    try:
        fp32, _ = train(tmp_path, small_data, "fp32", resume_from=fp16_out / "checkpoints" / "step_00000004",
                        max_steps=5, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert fp32["status"] == "completed" and fp32["steps"] == 5


def test_a_batch_larger_than_the_training_rows_is_a_config_error_naming_field_and_range():
    with pytest.raises(ConfigError, match=re.escape("batch_size=8 is larger than the 5 training rows this worker "
                                                    "holds; allowed range [1, 5]")):
        BatchStream(5, 8, seed=0)


def test_step_check_reads_loss_and_divergence_together():
    from orchestrator.context import step_check
    assert step_check(torch.tensor(0.25)) == (0.25, False)
    loss, diverged = step_check(torch.tensor(float("nan")))
    assert diverged and loss != loss


def _unit_rows(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)


def test_train_step_updates_clips_and_leaves_weights_alone_on_a_non_finite_loss():
    from orchestrator.step import train_step
    torch.manual_seed(0)
    model = EnergyLattice(preset("smoke"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _unit_rows(8, model.cfg.embed_dim, 1), _unit_rows(8, model.cfg.embed_dim, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    poisoned = train_step(model, [(x, y)], optimizer, grad_clip=1.0, poison_loss=True)
    assert not poisoned.applied and poisoned.grad_norm is None and poisoned.loss != poisoned.loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # the bad step's gradients are dropped

    # two micro-batches of 4: the loss is their mean, one update, one FlowStats each
    step = train_step(model, [(x[:4], y[:4]), (x[4:], y[4:])], optimizer, grad_clip=1e-3)
    assert step.applied and len(step.stats) == 2 and 0 < step.loss < 2 and float(step.grad_norm) > 1e-3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
