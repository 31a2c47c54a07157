"""The scaling study: its grid, its report and its answer (synthetic cells), and one small study end to
end on the shared Ray instance (two lattices x two data sizes, a few steps each)."""
import json

import pytest
from mlflow import MlflowClient

from orchestrator.cli import main
from orchestrator.launch.study import Study, StudyError, answer, format_table, group_cells, parse_axes, study_cells


def cell(preset, rows, seed, cosine, **extra):
    unfinished = cosine is None
    return {"preset": preset, "rows": rows, "seed": seed, "val_cosine": cosine,
            "val_top1": None if unfinished else cosine - 0.1, "val_cosine_lattice_only": None if unfinished else cosine - 0.2, "baseline_ridge_cosine": 0.50 + rows / 1e6,
            "baseline_kernel_ridge_cosine": 0.55 + rows / 1e6, "baseline_kernel_ridge_top1": 0.4,
            "baseline_identity_cosine": 0.4, **extra}


def test_set_lists_become_switches_and_single_values_stay_fixed():
    fixed, axes = parse_axes(["lr=1e-3", "model.skip=true,false", "model.width=12,24"])
    assert fixed == {"lr": 1e-3} and axes == {"model.skip": [True, False], "model.width": [12, 24]}
    with pytest.raises(StudyError, match="the study's own grid sets train_rows"):
        parse_axes(["train_rows=10,20"])
    study = Study(presets=["scale-12", "scale-24"], data_sizes=[100, 400], seeds=3, axes=axes)
    assert study.cells() == 2 * 2 * 3 * 2 * 2
    assert study.space().grid_size() == study.cells()


@pytest.mark.parametrize("kw, problem", [
    (dict(presets=["scale-12", "huge"]), "unknown preset(s) ['huge']"),
    (dict(data_sizes=[1, 10]), "every size must be at least 2"),
    (dict(seeds=0), "--seeds=0 is out of range"),
    (dict(steps=10, epochs=1.0), "give --steps or --epochs, not both"),
])
def test_bad_study_requests_are_refused_naming_the_flag(kw, problem):
    with pytest.raises(StudyError) as err:
        Study(**{"presets": ["scale-12"], "data_sizes": [10], **kw})
    assert problem in str(err.value)


def test_the_answer_compares_sizes_with_their_spread_and_the_best_cell_with_kernel_ridge():
    cells = [cell("scale-12", 1000, 0, 0.60), cell("scale-12", 1000, 1, 0.62),
             cell("scale-24", 1000, 0, 0.70), cell("scale-24", 1000, 1, 0.72),
             cell("scale-12", 100, 0, 0.50), cell("scale-24", 100, 0, 0.49)]
    groups = group_cells(cells, [])
    big = next(g for g in groups if g["preset"] == "scale-24" and g["rows"] == 1000)
    assert big["val_cosine"] == pytest.approx(0.71) and big["val_cosine_spread"] == pytest.approx(0.0141421, abs=1e-6)
    text = answer(groups, ["scale-12", "scale-24"], [])
    # at the largest data size: +0.1000 +- sqrt(2) x 0.0141 between the lattices, and the best one
    # 0.71 - 0.551 above kernel ridge
    assert ("At 1,000 training rows, scale-24 beats scale-12 by +0.1000 +- 0.0200 cosine (0.7100 vs 0.6100, 2 and 2 "
            "seeds), more than the seed spread." in text)
    assert "is 0.1590 above kernel ridge (0.5510" in text
    table = format_table(groups, [])
    assert table.splitlines()[0].split()[:3] == ["preset", "rows", "seeds"] and len(table.splitlines()) == 5


def test_a_switch_is_compared_within_each_lattice_and_an_unfinished_cell_is_left_out():
    cells = [cell("scale-12", 500, s, c, **{"model.energy_channels": e})
             for s, (e, c) in enumerate([(1, 0.60), (1, 0.61), (4, 0.605), (4, 0.615)])]
    cells.append(cell("scale-12", 500, 2, None, **{"model.energy_channels": 4}))
    groups = group_cells(cells, ["model.energy_channels"])
    four = next(g for g in groups if g["model.energy_channels"] == 4)
    assert (four["seeds"], four["of_seeds"]) == (2, 3)
    text = answer(groups, ["scale-12"], ["model.energy_channels"])
    assert "model.energy_channels=4 against 1 (scale-12): +0.0050 +- 0.0100 cosine, within the seed spread" in text


def test_cells_keep_the_order_the_switches_were_given_in_and_name_the_other_switches():
    axes = {"model.interaction": ["none", "field"], "model.energy_channels": [1, 4]}
    trials = [{"params": {"preset": "scale-12", "train_rows": 100, "seed": seed, "model.interaction": inter,
                          "model.energy_channels": channels},
               "final": {"val_cosine": 0.5 + 0.01 * (inter == "field") + 0.001 * channels + 0.0001 * seed,
                         "val_top1": 0.3, "val_cosine_lattice_only": 0.4},
               "status": "completed", "trial_id": f"t{i}", "mlflow_run_id": None, "model_version": None}
              for i, (inter, channels, seed) in enumerate([(i, c, s) for i in ("field", "none") for c in (4, 1)
                                                             for s in (0, 1)])]
    cells = study_cells(trials, {100: {"baseline_ridge_cosine": 0.4}}, axes)
    assert [(c["model.interaction"], c["model.energy_channels"], c["seed"]) for c in cells][:3] == [
        ("none", 1, 0), ("none", 1, 1), ("none", 4, 0)]
    text = answer(group_cells(cells, list(axes)), ["scale-12"], list(axes))
    assert "model.interaction=field against none (scale-12, model.energy_channels=1): +0.0100" in text
    assert "model.energy_channels=4 against 1 (scale-12, model.interaction=none): +0.0030" in text


@pytest.mark.ray
def test_a_study_runs_every_cell_as_a_child_run_and_reports_on_the_parent(tmp_path, ray_instance, corpus_path):
    summary_path = tmp_path / "study.json"
    args = ["study", "--presets", "smoke,scale-12", "--data-sizes", "200,400", "--seeds", "1", "--steps", "4",
            "--data", str(corpus_path), "--storage", str(tmp_path / "ray"), "--experiment", "study-test",
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--summary-json", str(summary_path),
            "--concurrency", "2"]
    for pair in ("max_rows=700", "val_max_samples=32", "batch_size=8", "warmup_steps=1", "model.max_steps=6"):
        args += ["--set", pair]
    assert main(args) == 0
    summary = json.loads(summary_path.read_text())
    cells = summary["cells"]
    assert sorted((c["preset"], c["rows"], c["seed"]) for c in cells) == [
        ("scale-12", 200, 0), ("scale-12", 400, 0), ("smoke", 200, 0), ("smoke", 400, 0)]
    for c in cells:
        assert c["status"] == "completed" and c["steps"] == 4, c
        for key in ("val_cosine", "val_top1", "val_cosine_lattice_only", "baseline_ridge_cosine",
                    "baseline_kernel_ridge_cosine", "baseline_identity_cosine"):
            assert isinstance(c[key], float), (key, c)
        assert c["baseline_train_rows"] == c["rows"] and c["baseline_val_rows"] == 32, "same validation rows"
    # baselines differ between data sizes, not between lattices of one size
    by_rows = {c["rows"]: c["baseline_ridge_cosine"] for c in cells}
    assert by_rows[200] != by_rows[400]
    assert len({(c["rows"], c["baseline_kernel_ridge_cosine"]) for c in cells}) == 2

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["parent_run_id"])
    exp = client.get_experiment_by_name("study-test")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(c["trial_id"] for c in cells)
    assert sorted((r.data.params["preset"], r.data.params["train_rows"]) for r in children) == [
        ("scale-12", "200"), ("scale-12", "400"), ("smoke", "200"), ("smoke", "400")]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert files == {"study/study.png", "study/study.json", "study/study_table.txt"}
    assert parent.data.tags["kind"] == "study"
    assert parent.data.tags["mlflow.note.content"].startswith(summary["answer"])
    assert "At 400 training rows, scale-12" in summary["answer"] and "kernel ridge" in summary["answer"]


def test_one_seed_measures_no_spread_and_says_so():
    groups = group_cells([cell("scale-12", 100, 0, 0.50), cell("scale-24", 100, 0, 0.52)], [])
    text = answer(groups, ["scale-12", "scale-24"], [])
    assert "+0.0200 +- 0.0000 cosine (0.5200 vs 0.5000, 1 and 1 seeds), no seed spread measured (one seed)." in text
