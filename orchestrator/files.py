"""Writing a file that other processes read: one way, used by checkpoints, datasets, the teacher's
embedding cache and the baselines cache."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) for a temporary file beside `path`, then move it into place: readers (and a
    crash) see either the old file or the whole new one, never a part.

    The temporary name starts with ".tmp-" and ends in random characters, so globs for the real
    files ("*.parquet", "state.pt") never match it and two writers in one process never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
