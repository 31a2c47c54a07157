"""The CLI as users run it: `python -m orchestrator ...` in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.train import SUMMARY_KEYS

REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ})


def test_train_local_writes_the_summary_json(tmp_path, corpus_path):
    summary_file = tmp_path / "summary.json"
    result = cli("train", "--local", "--preset", "smoke", "--max-steps", "3", "--data", str(corpus_path),
                 "--set", "max_rows=400", "--set", "val_max_samples=32", "--set", "batch_size=8",
                 "--out", str(tmp_path / "run"), "--summary-json", str(summary_file))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(summary_file.read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt").exists()
    assert str(summary_file) in result.stdout and "checkpoint" in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["--set", "model.width=1"], "model.width=1 is out of range; allowed range [2, 4096]"),
    (["--set", "lr=-1"], "lr=-1.0 is out of range; allowed range (0, 10]"),
    (["--set", "lr=fast"], "lr='fast' is not a valid float"),
    (["--set", "spawn_threshold=0.2"], "did you mean model.spawn_threshold?"),
    (["--set", "model.precision=fp8"], "model.precision='fp8' is not allowed"),
    (["--set", "no_such_field=3"], "unknown config field 'no_such_field'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--data", "/nonexistent/pairs.parquet"], "dataset /nonexistent/pairs.parquet does not exist"),
])
def test_bad_input_exits_2_with_one_line_naming_the_problem(args, needle):
    result = cli("train", "--local", "--preset", "smoke", *args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
