"""The code version every run carries: the commit from git or from the submitting side, and a digest
of the source files computed from the files themselves (so a copy without .git gets the same one)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.code_version import (COMMIT_ENV, COMMIT_TAG, DIGEST_TAG, DIRTY_TAG, code_version_tags, git_commit,
                                       source_digest, source_files)
from orchestrator.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEAD = "0123456789abcdef0123456789abcdef01234567"


def copy_sources(dest: Path) -> Path:
    for relative in source_files(REPO):
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, dest / relative)
    return dest


def test_the_digest_follows_the_files_not_where_they_lie(tmp_path):
    copy = copy_sources(tmp_path / "copy")
    assert {p.as_posix() for p in source_files(REPO)} >= {"orchestrator/train.py", "model/flow.py",
                                                          "jobs/progressive_scaling.py", "pyproject.toml"}
    assert source_digest(copy) == source_digest(REPO)
    (copy / "orchestrator" / "__pycache__").mkdir(exist_ok=True)
    (copy / "orchestrator" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"compiled")
    (copy / "runs").mkdir()
    (copy / "runs" / "notes.py").write_text("not the project's code\n")
    assert source_digest(copy) == source_digest(REPO), "caches and run folders are not source"
    train = copy / "orchestrator" / "train.py"
    train.write_text(train.read_text() + "\n")
    assert source_digest(copy) != source_digest(REPO)


def test_a_copy_without_git_takes_the_commit_the_submitter_passed(tmp_path, monkeypatch):
    copy = copy_sources(tmp_path / "copy")
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    assert git_commit(copy) is None
    assert code_version_tags(copy) == {DIGEST_TAG: source_digest(REPO)}, "no commit rather than a wrong one"
    monkeypatch.setenv(COMMIT_ENV, HEAD + "-dirty")
    assert code_version_tags(copy) == {DIGEST_TAG: source_digest(REPO), COMMIT_TAG: HEAD, DIRTY_TAG: "true"}
    monkeypatch.setenv(COMMIT_ENV, HEAD)
    assert code_version_tags(copy)[DIRTY_TAG] == "false"
    monkeypatch.setenv(COMMIT_ENV, "unknown")
    with pytest.raises(ConfigError, match=f"{COMMIT_ENV}='unknown': expected a full 40-character commit hash"):
        code_version_tags(copy)


def test_a_copy_inside_another_repository_does_not_take_that_repositorys_commit(tmp_path, monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    outer = tmp_path / "outer"
    outer.mkdir()
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "outer"], check=True)
    copy = copy_sources(outer / "session" / "working_dir")
    assert git_commit(copy) is None


def test_a_git_checkout_gives_its_head_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, HEAD)  # git, where there is one, wins over a stale variable
    checkout = copy_sources(tmp_path / "checkout")
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "sources"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    tags = code_version_tags(checkout)
    assert tags == {COMMIT_TAG: head, DIRTY_TAG: "false", DIGEST_TAG: source_digest(REPO)}
    (checkout / "untracked.txt").write_text("not tracked: not dirty\n")
    assert code_version_tags(checkout)[DIRTY_TAG] == "false"
    (checkout / "model" / "flow.py").write_text("# changed\n")
    tags = code_version_tags(checkout)
    assert tags[COMMIT_TAG] == head and tags[DIRTY_TAG] == "true" and tags[DIGEST_TAG] != source_digest(REPO)
