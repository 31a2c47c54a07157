"""Datasets of (input_text, target_text) pairs: writing, loading, validation, split, shard.

A dataset is a Parquet file with columns

    input_text: string, target_text: string,
    input_emb, target_emb: fixed_size_list<float32>[E]     (once embedded)
    split: string, "train" or "val"                        (optional: a split fixed by the builder)

and schema metadata {"teacher": teacher_id, "embed_dim": E}. Users may also bring a JSONL or CSV
file with just the two text columns; it is embedded with the teacher on load (through the
teacher's on-disk cache, so only once).

The project builds three corpora (CORPORA): the stdlib corpus from text that ships with Python
(orchestrator/data/corpus_stdlib.py, the default), numpydoc parameters (corpus_params.py) and the GCIDE
dictionary (corpus_dictionary.py, ~106,000 pairs, for studies of scale); `ensure_corpus` builds,
embeds and writes one on first use.

Without a split column, the train/validation split is decided per row by a hash of input_text:
deterministic, stable when rows are reordered or appended, and rows with the same input never
straddle the split. A run may train on the first `train_rows` training rows only; its validation
rows stay the same, so runs on different amounts of data compare on the same rows.

Embeddings are read from a memory-mapped file without a copy where the file holds float32, and
subsets and shards of them are views: 100,000 rows cost their 300 MB once, however many runs read them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import atomic_write
from .corpus_common import corpus_cache_path, hash_share
from .teacher import DEFAULT_TEACHER, Teacher

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("input_text", "target_text")
EMB_COLUMNS = ("input_emb", "target_emb")  # embedding of input_text, of target_text
SPLITS = ("train", "val")


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# Writing


def _fixed_size_list(emb: np.ndarray) -> pa.Array:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def write_corpus(path, teacher: Teacher, pairs: list[tuple[str, str]], splits: list[str] | None = None) -> Path:
    """Embed the pairs with the teacher and write them as a dataset; `splits` ("train"/"val" per
    pair) fixes the split in the file, where a builder decides it."""
    path = Path(path)
    inputs = [p[0] for p in pairs]
    targets = [p[1] for p in pairs]
    emb = teacher.embed(inputs + targets)  # one call: one pass through the batches, one progress line
    columns = {
        "input_text": pa.array(inputs, pa.string()),
        "target_text": pa.array(targets, pa.string()),
        "input_emb": _fixed_size_list(emb[: len(inputs)]),
        "target_emb": _fixed_size_list(emb[len(inputs) :]),
    }
    if splits is not None:
        columns["split"] = pa.array(splits, pa.string())
    table = pa.table(columns).replace_schema_metadata({"teacher": teacher.teacher_id,
                                                       "embed_dim": str(teacher.embed_dim)})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    logger.info("wrote %d pairs embedded by %s to %s", len(pairs), teacher.teacher_id, path)
    return path


def _stdlib() -> tuple[list[tuple[str, str]], None]:
    from .corpus_stdlib import build_stdlib_corpus
    return build_stdlib_corpus(), None


def _params() -> tuple[list[tuple[str, str]], None]:
    from .corpus_params import build_parameter_corpus
    return build_parameter_corpus(), None


def _dictionary(max_pairs: int | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    from .corpus_dictionary import build_dictionary_corpus
    return build_dictionary_corpus(max_pairs)


# The corpora the project builds: name -> (file stem in the cache, builder of (pairs, splits or None)).
CORPORA = {
    "stdlib": ("stdlib_pairs", _stdlib),            # name and signature -> docstring's first sentence
    "params": ("numpydoc_params", _params),         # numpydoc parameter -> its description
    "dictionary": ("dictionary_pairs", _dictionary),  # GCIDE headword (part of speech) -> first sense
}


def corpus_path(corpus: str = "stdlib", teacher_id: str = DEFAULT_TEACHER, max_pairs: int | None = None) -> Path:
    """Where a built corpus is cached (one file per teacher, and per size where it is capped)."""
    stem = CORPORA[corpus][0] + (f"_{max_pairs}" if max_pairs else "")
    return corpus_cache_path(stem, teacher_id)


def build_corpus(corpus: str, teacher: Teacher, path=None, max_pairs: int | None = None) -> Path:
    """Build, embed and write a corpus (`max_pairs`: at most that many training pairs, dictionary only)."""
    if corpus not in CORPORA:
        raise DatasetError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    builder = CORPORA[corpus][1]
    if max_pairs is not None and corpus != "dictionary":
        raise DatasetError(f"--max-pairs applies to the dictionary corpus only, not to {corpus!r}")
    pairs, splits = builder(max_pairs) if max_pairs is not None else builder()
    return write_corpus(path or corpus_path(corpus, teacher.teacher_id, max_pairs), teacher, pairs, splits)


def ensure_corpus(path=None, teacher: Teacher | None = None, corpus: str = "stdlib",
                  train_rows: int | None = None) -> Path:
    """Path of an embedded corpus (the stdlib one by default), building it first if the file does not exist.

    The dictionary is built only as far as a run needs when it trains on its first `train_rows`
    rows and the whole corpus is not built yet: those rows and every validation row, which are the
    same rows the whole corpus would give it (see corpus_dictionary), in a fraction of the time."""
    max_pairs = None
    if path is None:
        teacher_id = teacher.teacher_id if teacher is not None else DEFAULT_TEACHER
        path = corpus_path(corpus, teacher_id)
        if corpus == "dictionary" and train_rows is not None and not path.exists():
            max_pairs, path = train_rows, corpus_path(corpus, teacher_id, train_rows)
    path = Path(path)
    if path.exists():
        return path
    return build_corpus(corpus, teacher if teacher is not None else Teacher(), path, max_pairs=max_pairs)


# ------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Split:
    input_texts: list[str]
    target_texts: list[str]
    input_emb: np.ndarray  # (n, E) float32, teacher embedding of input_texts
    target_emb: np.ndarray  # (n, E) float32, teacher embedding of target_texts

    def __len__(self) -> int:
        return len(self.input_texts)

    def view(self, rows: slice) -> "Split":
        """The rows of a slice (with a step, as shards take them), sharing the embeddings' memory."""
        return Split(self.input_texts[rows], self.target_texts[rows], self.input_emb[rows], self.target_emb[rows])

    def take(self, rows) -> "Split":
        rows = np.asarray(rows, dtype=np.int64)
        return Split(
            [self.input_texts[i] for i in rows],
            [self.target_texts[i] for i in rows],
            self.input_emb[rows],
            self.target_emb[rows],
        )


@dataclass
class PairDataset:
    train: Split
    val: Split
    teacher: str  # teacher_id the embeddings came from
    embed_dim: int
    # Baseline metrics computed on the full training split, set when `train` is one worker's shard.
    baselines: dict | None = None


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path, memory_map=True)
        if suffix == ".jsonl":
            import pyarrow.json as pjson

            return pjson.read_json(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            # texts such as "42" must stay strings
            types = {c: pa.string() for c in TEXT_COLUMNS}
            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
    except (pa.ArrowException, OSError) as e:
        where = _jsonl_problem(path) if suffix == ".jsonl" and isinstance(e, pa.ArrowException) else None
        raise DatasetError(f"{path}: {where or f'cannot read {suffix[1:]} file: ' + str(e).splitlines()[0]}") from e
    raise DatasetError(f"{path}: unknown file extension {suffix!r}; use .parquet, .jsonl or .csv")


_JSON_TYPE_NAMES = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}


def _jsonl_problem(path: Path) -> str | None:
    """The first bad line of a JSONL file, numbered as an editor numbers it (pyarrow counts rows from
    0 and skips blank lines, so its "row 1" is the second record, wherever that is in the file)."""
    import json
    first_type: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(record, dict):
                return f"line {number} is not a JSON object"
            for key, value in record.items():
                if value is None:
                    continue
                kind = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
                seen = first_type.setdefault(key, (kind, number))
                if seen[0] != kind:
                    return f"line {number}: {key!r} is a {kind}, but a {seen[0]} on line {seen[1]}"
    return None


def _text_column(table: pa.Table, name: str, path: Path) -> list[str]:
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        try:
            column = column.cast(pa.string())
        except pa.ArrowException:
            raise DatasetError(f"{path}: column {name!r} must hold text, found type {column.type}") from None
    texts = column.to_pylist()
    bad = sum(1 for t in texts if t is None or not t.strip())
    if bad:
        raise DatasetError(f"{path}: column {name!r} has {bad} null or empty texts (of {len(texts)} rows)")
    return texts


def _embedding_column(table: pa.Table, name: str, path: Path, expected_dim: int | None) -> np.ndarray:
    column = table.column(name).combine_chunks()
    kind = column.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise DatasetError(f"{path}: column {name!r} must hold lists of numbers, found type {kind}")
    if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise DatasetError(f"{path}: column {name!r} must hold lists of numbers, found type {kind}")
    if column.null_count:
        raise DatasetError(f"{path}: column {name!r} has {column.null_count} null embeddings")
    n = len(column)
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
    else:
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if n else 0
        if n and (lengths != dim).any():
            raise DatasetError(
                f"{path}: column {name!r} has ragged embeddings: lengths from {lengths.min()} to "
                f"{lengths.max()} ({int((lengths != dim).sum())} rows differ from the first row's {dim})"
            )
    if expected_dim is not None and dim != expected_dim:
        raise DatasetError(f"{path}: column {name!r} has embedding dim {dim}, expected {expected_dim}")
    values = column.flatten()  # respects slicing, unlike .values
    if values.null_count:
        raise DatasetError(f"{path}: column {name!r} has null values inside embeddings")
    emb = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
    bad_rows = int((~np.isfinite(emb)).any(axis=1).sum())
    if bad_rows:
        raise DatasetError(f"{path}: column {name!r} has NaN/inf embeddings in {bad_rows} rows")
    return emb


def _split_column(table: pa.Table, path: Path) -> np.ndarray:
    """The builder's split as a boolean "is validation" per row."""
    values = table.column("split").cast(pa.string()).to_pylist()
    unknown = sorted({v for v in values if v not in SPLITS}, key=str)
    if unknown:
        raise DatasetError(f"{path}: column 'split' holds {unknown[:3]}; allowed values: {', '.join(SPLITS)}")
    return np.array([v == "val" for v in values], dtype=bool)


def load_dataset(
    path,
    *,
    teacher: Teacher | None = None,
    embed_dim: int | None = None,
    val_fraction: float = 0.1,
    max_rows: int | None = None,
) -> PairDataset:
    """Read, validate, embed (when the embedding columns are missing) and split a dataset.

    embed_dim is the dimension the model expects (defaults to the teacher's); max_rows keeps only
    the first rows. Raises DatasetError with a one-line message for anything unusable."""
    path = Path(path)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    table = _read_table(path)

    missing = [c for c in TEXT_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing}; found columns {table.column_names}")
    if max_rows is not None:
        table = table.slice(0, max_rows)
    if table.num_rows == 0:
        raise DatasetError(f"{path}: dataset is empty (0 rows)")

    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    file_teacher = meta.get("teacher")
    if file_teacher and teacher is not None and file_teacher != teacher.teacher_id:
        raise DatasetError(
            f"{path}: embedded by teacher {file_teacher!r} but the run uses teacher {teacher.teacher_id!r}; "
            f"use the same teacher or drop the embedding columns to re-embed"
        )
    if embed_dim is None and teacher is not None:
        embed_dim = teacher.embed_dim

    inputs = _text_column(table, "input_text", path)
    targets = _text_column(table, "target_text", path)
    texts = {"input_emb": inputs, "target_emb": targets}
    emb = {}
    for name in EMB_COLUMNS:
        if name in table.column_names:
            emb[name] = _embedding_column(table, name, path, embed_dim)
            embed_dim = emb[name].shape[1]  # both columns must agree even when no dim was given
        elif teacher is None:
            raise DatasetError(f"{path}: column {name!r} is missing and no teacher was given to embed the texts")
        else:
            emb[name] = teacher.embed(texts[name])
            if emb[name].shape[1] != embed_dim:
                raise DatasetError(
                    f"{path}: teacher {teacher.teacher_id!r} makes embeddings of dim {emb[name].shape[1]} "
                    f"for column {name!r}, expected {embed_dim}"
                )
    teacher_id = file_teacher or (teacher.teacher_id if teacher is not None else "unknown")

    everything = Split(inputs, targets, emb["input_emb"], emb["target_emb"])
    if "split" in table.column_names:
        is_val = _split_column(table, path)
    else:
        is_val = np.array([hash_share(t) < val_fraction for t in inputs], dtype=bool)
    train, val = everything.take(np.flatnonzero(~is_val)), everything.take(np.flatnonzero(is_val))
    for split_name, split in (("train", train), ("validation", val)):
        if len(split) == 0:
            how = "its split column" if "split" in table.column_names else f"val_fraction={val_fraction}"
            raise DatasetError(
                f"{path}: {split_name} split is empty ({table.num_rows} rows, {how}); "
                f"use more rows or another val_fraction"
            )
    return PairDataset(train=train, val=val, teacher=teacher_id, embed_dim=int(embed_dim))


def validation_rows(data: PairDataset, max_rows: int) -> Split:
    """The rows validation uses: the first `max_rows` of the validation split, whatever the amount of
    training data, so its cost does not grow with the data and every run compares on the same rows."""
    return data.val.view(slice(0, max_rows))


def training_rows(data: PairDataset, rows: int | None) -> PairDataset:
    """The dataset with its first `rows` training rows only (None: all of them); validation unchanged."""
    if rows is None:
        return data
    if rows > len(data.train):
        from model.config import ConfigError
        raise ConfigError(f"train_rows={rows} is more than the {len(data.train)} training rows of the dataset; "
                          f"allowed range [2, {len(data.train)}] here")
    return dataclasses.replace(data, train=data.train.view(slice(0, rows)))


def shard(split: Split, rank: int, world_size: int) -> Split:
    """Rows rank, rank + world_size, rank + 2*world_size, ... of the split.

    Every rank's shard is disjoint from every other's and together they are the whole split, so
    data-parallel workers each read only their own rows. Shard sizes differ by at most one row."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return split.view(slice(rank, None, world_size))
