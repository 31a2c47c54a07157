"""Shared fixtures. The embedded stdlib corpus is built once per machine into the repo's .cache
(a clean CI clone builds it once, about a minute on 2 cores) and reused by every training test."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ENERGY_LATTICE_CACHE", str(REPO / ".cache" / "test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads during tests


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    from orchestrator.data import ensure_corpus
    return ensure_corpus()


@pytest.fixture(scope="session")
def small_data(corpus_path):
    """The first 1,200 corpus rows, split as training would split them."""
    from orchestrator.data import load_dataset
    return load_dataset(corpus_path, embed_dim=384, max_rows=1200)
