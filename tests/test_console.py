"""What the console and MLflow show of a run: progress lines, metric sections, the validation plot.
No Ray here; the Ray paths are covered by test_ray_train.py and test_progressive.py."""
import pytest

from orchestrator.observe.console import ConsoleTracker, format_duration
from orchestrator.observe.plots import validation_figure
from orchestrator.metrics import mlflow_metric_name, mlflow_metric_names

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


def test_validation_line_says_what_the_lattice_adds_over_its_skip_path():
    console, lines, _ = tracker()
    console.log_metrics({"val_cosine": 0.6, "val_top1": 0.5, "val_cosine_lattice_only": 0.48,
                         "lattice_gain": 0.14}, step=0)
    console.log_metrics({"val_cosine": 0.6, "val_top1": 0.5}, step=10)  # a model without those figures
    with_paths, without = lines
    assert "val cosine 0.6000 top1 0.500 (lattice alone 0.4800, gain +0.1400)" in with_paths
    assert "lattice alone" not in without


def test_no_progress_line_where_a_validation_line_follows():
    console, lines, clock = tracker(total=100, validates_every=(50, 100), progress_every_s=1)
    for step in range(10, 101, 10):
        clock.now += 5
        console.log_metrics({"loss": 0.5}, step=step)
        if step % 50 == 0:
            console.log_metrics({"val_cosine": 0.3, "val_top1": 0.1}, step=step)
    steps = [line.split()[1] for line in lines]
    assert steps == ["10/100", "20/100", "30/100", "40/100", "50/100", "60/100", "70/100", "80/100", "90/100",
                     "100/100"]
    assert [("val cosine" in line) for line in lines] == [False] * 4 + [True] + [False] * 4 + [True]


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


@pytest.mark.parametrize("key, name", [
    ("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
    ("steps_used", "flow/steps_used"), ("completion", "flow/completion"),
    ("spawned_per_sample", "flow/spawned_per_sample"),
    ("samples_per_s", "system/samples_per_s"), ("step_time_s", "system/step_time_s"),
    ("peak_mem_gb", "system/peak_mem_gb"), ("parameters", "system/parameters"),
    ("val_cosine", "eval/cosine"), ("val_top1", "eval/top1"), ("val_steps_used", "eval/steps_used"),
    ("val_cosine_skip_only", "eval/cosine_skip_only"), ("val_top1_lattice_only", "eval/top1_lattice_only"),
    ("baseline_ridge_cosine", "val_baseline/ridge_cosine"),
    ("baseline_kernel_ridge_bleu", "val_baseline/kernel_ridge_bleu"),
    ("baseline_mean_target_top1", "val_baseline/mean_target_top1"),
    ("baseline_ridge_lambda", "val_baseline/ridge_lambda"),
    ("eval/cosine", "eval/cosine"),
])
def test_metric_keys_get_their_mlflow_section_by_rule(key, name):
    assert mlflow_metric_name(key) == name


def test_a_run_page_opens_on_validation_and_ends_with_the_constant_baselines():
    """MLflow orders a run's metric sections alphabetically (checked in MLflow 3.17's UI); `system/`
    goes to its own tab."""
    logged = ["loss", "lr", "steps_used", "completion", "val_cosine", "val_top1", "lattice_gain",
              "baseline_ridge_cosine", "baseline_identity_top1"]
    sections = sorted({mlflow_metric_name(k, with_validation=k.startswith("val_")).split("/")[0] for k in logged})
    assert sections[0] == "eval" and sections[-1] == "val_baseline", sections


def test_unprefixed_metrics_logged_with_a_validation_are_validation_metrics():
    named = mlflow_metric_names({"val_cosine": 0.5, "val_cosine_skip_only": 0.4, "lattice_gain": 0.1,
                                 "plane_difference": 0.2})
    assert named == {"eval/cosine": 0.5, "eval/cosine_skip_only": 0.4, "eval/lattice_gain": 0.1,
                     "eval/plane_difference": 0.2}
    assert mlflow_metric_names({"loss": 1.0, "steps_used": 7.0}) == {"train/loss": 1.0, "flow/steps_used": 7.0}


def test_validation_plot_draws_every_cosine_and_top1_baseline():
    figure = validation_figure([(0, 0.1), (50, 0.4)], [(0, 0.0), (50, 0.04)], BASELINES)
    cosine_axis, top1_axis = figure.axes
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figure.axes]
    assert labels[0] == ["lattice", "identity baseline", "ridge baseline", "kernel_ridge baseline",
                         "mean_target baseline"]
    assert labels[1] == ["lattice", "identity baseline", "ridge baseline", "kernel_ridge baseline"]
    assert [line.get_ydata()[0] for line in cosine_axis.lines[1:]] == [0.46, 0.59, 0.63, 0.31]
    assert list(top1_axis.lines[0].get_xdata()) == [0, 50]
