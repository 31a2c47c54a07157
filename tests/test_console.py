"""What the console shows of a run: a line per validation and progress lines. No Ray here; the Ray
paths are covered by test_ray_train.py and test_progressive.py."""
import pytest

from orchestrator.console import ConsoleTracker, format_duration

BASELINES = {"baseline_identity_cosine": 0.46, "baseline_identity_top1": 0.09, "baseline_identity_bleu": 3.0,
             "baseline_ridge_cosine": 0.59, "baseline_ridge_top1": 0.18, "baseline_ridge_lambda": 10.0,
             "baseline_kernel_ridge_cosine": 0.63, "baseline_kernel_ridge_top1": 0.21,
             "baseline_mean_target_cosine": 0.31}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def tracker(total=300, **kw):
    lines, clock = [], FakeClock()
    return ConsoleTracker(total, emit=lines.append, clock=clock, **kw), lines, clock


def test_one_line_per_validation_with_loss_scores_and_every_baseline():
    console, lines, clock = tracker()
    console.log_metrics({**BASELINES, "parameters": 1234}, step=0)
    assert lines == []
    console.log_metrics({"val_cosine": 0.1, "val_top1": 0.004, "val_loss": 0.9}, step=0)
    clock.now += 10
    console.log_metrics({"loss": 0.8, "lr": 1e-3}, step=10)
    clock.now += 40
    console.log_metrics({"loss": 0.7123, "lr": 1e-3}, step=50)
    console.log_metrics({"val_cosine": 0.4210, "val_top1": 0.043, "val_loss": 0.6}, step=50)
    start, progress, validation = lines
    assert start.strip().startswith("step   0/300  start") and "val cosine 0.1000 top1 0.004" in start
    assert progress.strip().startswith("step  50/300  loss 0.7123")
    assert validation.strip().startswith("step  50/300  loss 0.7123  val cosine 0.4210 top1 0.043")
    for name, text in (("identity", "0.4600/0.090"), ("ridge", "0.5900/0.180"), ("kernel_ridge", "0.6300/0.210"),
                       ("mean_target", "0.3100")):
        assert f"{name} {text}" in validation, validation
    assert "lambda" not in validation and "bleu" not in validation
    # 50 steps took 50 s, 250 to go
    assert validation.endswith("ETA 4m10s") and progress.endswith("ETA 4m10s")


def test_progress_lines_are_spaced_in_time_and_the_last_step_has_no_eta():
    console, lines, clock = tracker(total=100, baselines=dict(BASELINES), progress_every_s=30)
    for step in range(1, 101):
        clock.now += 1.0
        console.log_metrics({"loss": 1.0 / step}, step=step)
    assert len(lines) == 4, lines  # step 1, then every 30 s
    assert [line.split()[1] for line in lines] == ["1/100", "31/100", "61/100", "91/100"]
    console.log_metrics({"val_cosine": 0.5, "val_top1": 0.1}, step=100)
    assert "ETA" not in lines[-1] and lines[-1].strip().startswith("step 100/100  loss 0.0100")


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (59.6, "1m00s"), (250, "4m10s"), (7322, "2h02m")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text
