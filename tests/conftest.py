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
    from orchestrator.data.datasets import ensure_corpus
    return ensure_corpus()


@pytest.fixture(scope="session")
def small_data(corpus_path):
    """The first 1,200 corpus rows, split as training would split them."""
    from orchestrator.data.datasets import load_dataset
    return load_dataset(corpus_path, embed_dim=384, max_rows=1200)


@pytest.fixture(scope="session")
def ray_instance():
    """One embedded Ray instance for every Ray test (started the way the CLI starts it)."""
    import ray

    from orchestrator.launch.ray_train import connect
    # Logical CPUs beyond the 2 physical ones, so a 2-worker trainer and its controller always fit.
    connect(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def quick_config(corpus_path):
    """A function making the smoke preset's config cut down to seconds per run."""
    from orchestrator.config import make_config

    def make(**overrides):
        return make_config("smoke", {"data_path": str(corpus_path), "max_rows": 600, "val_max_samples": 32,
                                     "batch_size": 8, "warmup_steps": 2, "log_every": 1, "val_every": 4,
                                     "checkpoint_every": 4, **overrides})
    return make
