"""Tests for the teacher (embedding + on-disk cache) and the data pipeline (corpus, load, split, shard).

Everything runs for real: the shipped all-MiniLM-L6-v2 teacher embeds a few hundred texts of the
stdlib corpus once per session (cached in a temporary folder), and bad datasets are real files.
"""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.data.corpus_stdlib import build_stdlib_corpus, default_corpus_path
from orchestrator.data.datasets import (
    DatasetError,
    PairDataset,
    ensure_corpus,
    load_dataset,
    shard,
    write_corpus,
)
from orchestrator.data.teacher import DEFAULT_TEACHER, Teacher, default_cache_dir, resolve_teacher

N_PAIRS = 200  # embedded subset: keeps the file fast on 2 CPU cores


@pytest.fixture(scope="module")
def corpus():
    return build_stdlib_corpus()


@pytest.fixture(scope="module")
def pairs(corpus):
    # spread over the whole corpus rather than the first (alphabetical) modules
    return corpus[:: max(1, len(corpus) // N_PAIRS)][:N_PAIRS]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return Teacher(cache_dir=tmp_path_factory.mktemp("embedding-cache"))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, teacher, pairs):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "pairs.parquet", teacher, pairs)


# ---- corpus -------------------------------------------------------------------------------------


def test_corpus_is_large_unique_and_clean(corpus):
    assert len(corpus) >= 3000
    inputs = [i for i, _ in corpus]
    targets = [t for _, t in corpus]
    assert len(set(inputs)) == len(inputs)
    assert len(set(targets)) == len(targets)
    assert all(t.strip() and len(t.split()) >= 3 for t in targets)
    assert all(len(t) <= 210 for t in targets)
    assert corpus == sorted(corpus)
    # the input names a real stdlib object with its signature
    assert any(i.startswith("math.sqrt(") for i in inputs)
    assert dict(corpus)["math.sqrt(x, /)"] == "Return the square root of x."


def test_corpus_is_deterministic(corpus):
    assert build_stdlib_corpus() == corpus


# ---- teacher ------------------------------------------------------------------------------------


def test_resolve_teacher(tmp_path):
    shipped = resolve_teacher(DEFAULT_TEACHER)
    assert json.loads((Path(shipped) / "config.json").read_text())["hidden_size"] == 384
    assert resolve_teacher(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_teacher("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"


def test_teacher_ids_and_dim_without_loading(tmp_path):
    t = Teacher(cache_dir=tmp_path)
    assert t.teacher_id == DEFAULT_TEACHER
    assert t.embed_dim == 384
    assert t._model is None  # reading the dimension must not load the model
    # the shipped folder given as a path is the same teacher
    assert Teacher(resolve_teacher(DEFAULT_TEACHER), cache_dir=tmp_path).teacher_id == DEFAULT_TEACHER
    # another local folder: its name plus a hash of its config and weight sizes
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    local = Teacher(str(folder), cache_dir=tmp_path)
    assert local.teacher_id.startswith("my-model-") and local.teacher_id != "my-model-"
    assert local.embed_dim == 8
    (folder / "config.json").write_text('{"hidden_size": 16}')
    assert Teacher(str(folder), cache_dir=tmp_path).teacher_id != local.teacher_id


def test_teacher_embeddings(teacher):
    texts = [
        "Return the square root of x.",
        "Compute the square root of a number.",
        "Open a network socket connection to a remote host.",
    ]
    emb = teacher.embed(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert teacher.embed([]).shape == (0, 384)


def test_teacher_cache_in_memory_and_on_disk(tmp_path):
    texts = ["a cat sits on the mat", "stock prices fell sharply", "a cat sits on the mat"]
    first = Teacher(cache_dir=tmp_path)
    emb = first.embed(texts)
    assert first.texts_embedded == 2  # the repeated text goes through the model once
    np.testing.assert_array_equal(emb[0], emb[2])
    again = first.embed(texts[:2])
    assert first.texts_embedded == 2
    np.testing.assert_array_equal(again, emb[:2])
    files = list(first.cache_dir.glob("*.parquet"))
    assert len(files) == 1 and not list(first.cache_dir.glob(".tmp-*"))
    assert pq.read_schema(files[0]).field("embedding").type == pa.list_(pa.float32(), 384)

    # a fresh instance (another process, say) reads the cache from disk and embeds nothing...
    second = Teacher(cache_dir=tmp_path)
    np.testing.assert_array_equal(second.embed(texts), emb)
    assert second.texts_embedded == 0 and second._model is None
    # ...and embeds only what is new, appending a second file
    second.embed(texts + ["the weather is nice today"])
    assert second.texts_embedded == 1
    assert len(list(first.cache_dir.glob("*.parquet"))) == 2


# ---- writing and loading ------------------------------------------------------------------------


def test_corpus_file_roundtrip(corpus_file, teacher, pairs):
    schema = pq.read_schema(corpus_file)
    assert schema.metadata[b"teacher"] == DEFAULT_TEACHER.encode()
    assert schema.metadata[b"embed_dim"] == b"384"
    assert schema.field("input_emb").type == pa.list_(pa.float32(), 384)

    ds = load_dataset(corpus_file)  # embedded file: no teacher needed
    assert isinstance(ds, PairDataset)
    assert ds.teacher == DEFAULT_TEACHER and ds.embed_dim == 384
    assert len(ds.train) + len(ds.val) == len(pairs)
    assert 0 < len(ds.val) < len(ds.train)
    lookup = dict(pairs)
    for split in (ds.train, ds.val):
        assert split.input_emb.shape == (len(split), 384) and split.input_emb.dtype == np.float32
        assert all(lookup[i] == t for i, t in zip(split.input_texts, split.target_texts))
    np.testing.assert_allclose(ds.val.target_emb, teacher.embed(ds.val.target_texts), atol=1e-6)

    assert load_dataset(corpus_file, teacher=teacher, embed_dim=384).embed_dim == 384
    small = load_dataset(corpus_file, max_rows=50, val_fraction=0.3)
    assert len(small.train) + len(small.val) == 50


def test_ensure_corpus_returns_existing_file(corpus_file, tmp_path, monkeypatch):
    assert ensure_corpus(corpus_file) == corpus_file
    monkeypatch.setenv("ENERGY_LATTICE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert default_corpus_path() == tmp_path / "corpus" / "stdlib_pairs.parquet"


def test_jsonl_and_csv_are_embedded_on_load(tmp_path, teacher, pairs):
    rows = pairs[:60]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"input_text": i, "target_text": t, "extra": 1}) + "\n" for i, t in rows))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:  # signatures hold commas and quotes
        writer = csv.writer(f)
        writer.writerow(["input_text", "target_text"])
        writer.writerows(rows)

    loaded = [load_dataset(p, teacher=teacher, val_fraction=0.2) for p in (jsonl, tmp_path / "pairs.csv")]
    for ds in loaded:
        assert ds.teacher == DEFAULT_TEACHER and ds.embed_dim == 384
        assert sorted(ds.train.input_texts + ds.val.input_texts) == sorted(i for i, _ in rows)
        np.testing.assert_allclose(ds.train.input_emb, teacher.embed(ds.train.input_texts), atol=1e-6)
    assert loaded[0].val.target_texts == loaded[1].val.target_texts

    with pytest.raises(DatasetError, match="no teacher"):
        load_dataset(jsonl)


# ---- bad datasets -------------------------------------------------------------------------------


def _write_parquet(path, n=20, dim=4, metadata=None, **columns):
    rng = np.random.default_rng(0)
    data = {
        "input_text": [f"input number {i}" for i in range(n)],
        "target_text": [f"target number {i}" for i in range(n)],
        "input_emb": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * dim), pa.float32()), dim),
        "target_emb": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * dim), pa.float32()), dim),
    }
    data.update(columns)
    table = pa.table({k: v for k, v in data.items() if v is not None})
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def test_good_synthetic_file_loads(tmp_path):
    ds = load_dataset(_write_parquet(tmp_path / "ok.parquet", n=40), val_fraction=0.3)
    assert ds.embed_dim == 4 and ds.teacher == "unknown" and len(ds.train) + len(ds.val) == 40


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.parquet")
    (tmp_path / "pairs.txt").write_text("input_text,target_text\n")
    with pytest.raises(DatasetError, match=r"extension '\.txt'"):
        load_dataset(tmp_path / "pairs.txt")


def test_missing_columns(tmp_path):
    path = _write_parquet(tmp_path / "d.parquet", target_text=None)
    with pytest.raises(DatasetError, match=r"missing columns \['target_text'\]; found .*input_text"):
        load_dataset(path)


def test_empty_dataset_and_empty_split(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(_write_parquet(tmp_path / "empty.parquet", n=0))
    (tmp_path / "empty.csv").write_text("input_text,target_text\n")
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(tmp_path / "empty.csv")
    with pytest.raises(DatasetError, match="validation split is empty"):
        load_dataset(_write_parquet(tmp_path / "two.parquet", n=2), val_fraction=0.01)


def test_null_and_empty_texts(tmp_path):
    texts = ["fine"] * 18 + ["", None]
    path = _write_parquet(tmp_path / "d.parquet", target_text=pa.array(texts, pa.string()))
    with pytest.raises(DatasetError, match="'target_text' has 2 null or empty"):
        load_dataset(path)
    texts = ["fine"] * 19 + ["   "]
    path = _write_parquet(tmp_path / "e.parquet", input_text=pa.array(texts, pa.string()))
    with pytest.raises(DatasetError, match="'input_text' has 1 null or empty"):
        load_dataset(path)


def test_nan_and_inf_embeddings(tmp_path):
    emb = np.ones((20, 4), np.float32)
    emb[3, 1], emb[7, 0], emb[7, 2], emb[9, 3] = np.nan, np.inf, np.nan, -np.inf
    bad = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4)
    with pytest.raises(DatasetError, match="'input_emb' has NaN/inf embeddings in 3 rows"):
        load_dataset(_write_parquet(tmp_path / "d.parquet", input_emb=bad))


def test_wrong_embedding_dim(tmp_path, teacher):
    path = _write_parquet(tmp_path / "d.parquet", dim=8)
    with pytest.raises(DatasetError, match="'input_emb' has embedding dim 8, expected 384"):
        load_dataset(path, embed_dim=384)
    with pytest.raises(DatasetError, match="dim 8, expected 384"):
        load_dataset(path, teacher=teacher)  # expected dim comes from the teacher
    # the two columns must agree with each other even when no dimension is expected
    other = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(20 * 6, np.float32)), 6)
    with pytest.raises(DatasetError, match="'target_emb' has embedding dim 6, expected 4"):
        load_dataset(_write_parquet(tmp_path / "e.parquet", target_emb=other))


def test_ragged_embeddings(tmp_path):
    lists = [[0.1, 0.2, 0.3, 0.4]] * 18 + [[0.1, 0.2, 0.3], [0.1] * 5]
    path = _write_parquet(tmp_path / "d.parquet", target_emb=pa.array(lists, pa.list_(pa.float32())))
    with pytest.raises(DatasetError, match="'target_emb' has ragged embeddings"):
        load_dataset(path)
    # variable-length lists of equal length are fine (e.g. JSONL written by hand)
    ok = pa.array([[0.5, 0.5, 0.5, 0.5]] * 20, pa.list_(pa.float64()))
    assert load_dataset(_write_parquet(tmp_path / "e.parquet", target_emb=ok), val_fraction=0.3).embed_dim == 4


@pytest.mark.parametrize("lines, problem", [
    (['{"input_text": "a", "target_text": "b"}', '{"input_text": "c", "target_text": '],
     "line 2 is not valid JSON (Expecting value at column 36)"),
    (['{"input_text": "a", "target_text": "b"}', "", '{"input_text": "c", "target_text": "d"}', "not json"],
     "line 4 is not valid JSON"),
    (['{"input_text": "a", "target_text": "b"}', '["c", "d"]'], "line 2 is not a JSON object"),
    (['{"input_text": "a", "target_text": "b"}', '{"input_text": 3, "target_text": "d"}'],
     "line 2: 'input_text' is a number, but a string on line 1"),
])
def test_a_malformed_jsonl_line_is_named_by_its_line_number(tmp_path, lines, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert str(err.value).startswith(f"{path}: {problem}"), str(err.value)


def test_teacher_mismatch(tmp_path, teacher):
    path = _write_parquet(tmp_path / "d.parquet", dim=384, metadata={"teacher": "distilbert-base-uncased"})
    with pytest.raises(DatasetError, match=f"'distilbert-base-uncased'.*'{DEFAULT_TEACHER}'"):
        load_dataset(path, teacher=teacher)


# ---- split and shard ----------------------------------------------------------------------------


def _write_text_pairs(path, rows):
    pq.write_table(pa.table({"input_text": [r[0] for r in rows], "target_text": [r[1] for r in rows]}), path)
    return path


def test_split_is_deterministic_disjoint_and_order_independent(tmp_path, teacher, pairs):
    ds = load_dataset(_write_text_pairs(tmp_path / "a.parquet", pairs), teacher=teacher)
    again = load_dataset(tmp_path / "a.parquet", teacher=teacher)
    assert ds.val.input_texts == again.val.input_texts and ds.train.input_texts == again.train.input_texts
    assert not set(ds.train.input_texts) & set(ds.val.input_texts)
    assert set(ds.train.input_texts) | set(ds.val.input_texts) == {i for i, _ in pairs}
    assert 0.03 < len(ds.val) / len(pairs) < 0.2  # roughly val_fraction=0.1

    shuffled = list(pairs)
    random.Random(1).shuffle(shuffled)
    moved = load_dataset(_write_text_pairs(tmp_path / "b.parquet", shuffled), teacher=teacher)
    assert set(moved.val.input_texts) == set(ds.val.input_texts)
    assert set(moved.train.input_texts) == set(ds.train.input_texts)
    # a larger val_fraction only moves rows from train to val
    wider = load_dataset(tmp_path / "a.parquet", teacher=teacher, val_fraction=0.3)
    assert set(ds.val.input_texts) < set(wider.val.input_texts)


def test_shards_are_disjoint_and_cover_the_split(corpus_file):
    train = load_dataset(corpus_file).train
    for world_size in (1, 2, 3, 7):
        shards = [shard(train, rank, world_size) for rank in range(world_size)]
        seen = [t for s in shards for t in s.input_texts]
        assert sorted(seen) == sorted(train.input_texts) and len(set(seen)) == len(seen)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        for s in shards:  # texts and embeddings stay aligned
            rows = [train.input_texts.index(t) for t in s.input_texts]
            np.testing.assert_array_equal(s.input_emb, train.input_emb[rows])
            np.testing.assert_array_equal(s.target_emb, train.target_emb[rows])
    with pytest.raises(ValueError):
        shard(train, 2, 2)
