"""Which code a run ran: the tags every MLflow run carries, on every path a run can take.

    mlflow.source.git.commit   the commit (MLflow's own tag: the UI's Version column)
    git_dirty                  "true" when tracked files differed from that commit
    source_digest              sha256 over the project's source files, read from the files themselves

The commit comes from git when the code runs from a git checkout (a local run, `make run`, a driver
on the submitting machine). Under `ray job submit --working-dir .` the job runs in the copy Ray
unpacked, which has no `.git`: there the submitting side passes its commit in the job's runtime
environment as ENERGY_LATTICE_GIT_COMMIT (`git describe --always --dirty --abbrev=40 --exclude='*'`:
the full hash, with `-dirty` appended when tracked files were modified). Without either, a run carries
no commit tag rather than a wrong one.

The digest needs neither: it is computed from the files the running process imported its code
from, so it is right in Ray's unpacked copy too, and two runs with the same digest ran the same code
whatever git says.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

from model.config import ConfigError

COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's standard tag; its UI shows it as the run's Version
DIRTY_TAG = "git_dirty"
DIGEST_TAG = "source_digest"
COMMIT_ENV = "ENERGY_LATTICE_GIT_COMMIT"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What decides what a run computes: the code, the job scripts, the shipped search spaces and the pins.
SOURCE_PATTERNS = ("model/**/*.py", "orchestrator/**/*.py", "jobs/**/*.py", "tune_spaces/*.yaml",
                   "pyproject.toml", "constraints.txt")
_COMMIT_VALUE = re.compile(r"^([0-9a-f]{40})(-dirty)?$")


def source_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The project's source files under `root`, in a fixed order (paths relative to root)."""
    found = {p.relative_to(root) for pattern in SOURCE_PATTERNS for p in root.glob(pattern)
             if p.is_file() and "__pycache__" not in p.parts}
    return sorted(found, key=lambda p: p.as_posix())


def source_digest(root: Path = PROJECT_ROOT) -> str:
    """sha256 over every source file's path and contents: the same for the same files wherever they lie."""
    digest = hashlib.sha256()
    for relative in source_files(root):
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(hashlib.sha256((root / relative).read_bytes()).digest())
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(root: Path = PROJECT_ROOT) -> tuple[str, bool] | None:
    """(HEAD's full hash, whether tracked files differ from it) when `root` is the top of a git work
    tree; None otherwise (no git, no repository, or `root` lies inside some other repository)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return None
    return commit, bool(status)


def submitted_commit() -> tuple[str, bool] | None:
    """The commit the submitting side passed in ENERGY_LATTICE_GIT_COMMIT, if any."""
    value = os.environ.get(COMMIT_ENV, "").strip()
    if not value:
        return None
    match = _COMMIT_VALUE.match(value)
    if match is None:
        raise ConfigError(f"{COMMIT_ENV}={value!r}: expected a full 40-character commit hash, optionally followed "
                          f"by -dirty (what `git describe --always --dirty --abbrev=40 --exclude='*'` prints)")
    return match.group(1), match.group(2) is not None


def code_version_tags(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The code-version tags of a run started from this process (see the module docstring)."""
    tags = {DIGEST_TAG: source_digest(root)}
    found = git_commit(root) or submitted_commit()
    if found is not None:
        commit, dirty = found
        tags.update({COMMIT_TAG: commit, DIRTY_TAG: str(dirty).lower()})
    return tags
