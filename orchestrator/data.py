"""Datasets of (input_text, target_text) pairs: corpus builder, loading, validation, split, shard.

A dataset is a Parquet file with columns

    input_text: string, target_text: string,
    input_emb, target_emb: fixed_size_list<float32>[E]     (once embedded)

and schema metadata {"teacher": teacher_id, "embed_dim": E}. Users may also bring a JSONL or CSV
file with just the two text columns; it is embedded with the teacher on load (through the
teacher's on-disk cache, so only once).

The project's own corpus is built from text that ships with Python: for every public function,
class and method of the standard library, the input is its qualified name and signature
("posixpath.join(a, *p)") and the target is the first sentence of its docstring
("Join two or more pathname components, inserting '/' as needed."). Inputs and targets are both
unique, so nearest-neighbour decoding over the target embeddings has one right answer.

The train/validation split is decided per row by a hash of input_text: deterministic, stable when
rows are reordered or appended, and rows with the same input never straddle the split.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import logging
import os
import pkgutil
import re
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.teacher import DEFAULT_TEACHER, Teacher, _safe_dirname, default_cache_dir

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("input_text", "target_text")
EMB_COLUMNS = ("input_emb", "target_emb")  # embedding of input_text, of target_text


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# Corpus from the standard library

# Modules whose import opens a browser or a GUI, prints, touches the terminal, or is a test suite.
_SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__",
    "test", "ensurepip", "lib2to3", "pydoc_data", "readline", "rlcompleter",
    # with setuptools installed, "import distutils" may load setuptools' copy instead
    "distutils",
}
_SKIP_SUBMODULE_PARTS = {"test", "tests", "idle_test", "__main__"}

MAX_TARGET_CHARS = 200
MIN_TARGET_WORDS = 3
# A period after one of these does not end a sentence.
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "resp.", "approx.", "no.", "mr.", "dr.", "st."}
# A docstring line that is only a call signature, e.g. "sqrt(x) -> float" (common in C modules).
_SIGNATURE_LINE = re.compile(r"^(async\s+)?[\w.]+\(.*\)\s*(->.*)?$")
_DEFAULT_REPR_OK = (type(None), bool, int, float, str, bytes)


def _quiet_import(name: str):
    """Import a module with its prints and warnings swallowed; None if it cannot be imported."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # ImportError, OSError, SystemExit... anything: just skip the module
        return None


def _stdlib_modules() -> list[tuple[str, object]]:
    """(name, module) for the public stdlib modules and the public submodules of its packages."""
    modules = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        modules.append((name, module))
        if not hasattr(module, "__path__"):
            continue
        # Walk the package by listing, importing each public submodule quietly ourselves
        # (pkgutil.walk_packages would import subpackages without silencing them).
        pending = [(name, list(module.__path__))]
        while pending:
            package, paths = pending.pop()
            for info in pkgutil.iter_modules(paths):
                if info.name.startswith("_") or info.name in _SKIP_SUBMODULE_PARTS:
                    continue
                full = f"{package}.{info.name}"
                sub = _quiet_import(full)
                if sub is None:
                    continue
                modules.append((full, sub))
                if info.ispkg and hasattr(sub, "__path__"):
                    pending.append((full, list(sub.__path__)))
    return sorted(modules, key=lambda m: m[0])


class _Literal:
    """Stands in for a default value so the signature prints this text instead of its repr."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _default_text(value) -> str:
    # Reprs of objects, sets and long containers carry memory addresses or hash-seed dependent
    # order, which would make the corpus differ between runs; those print as "...".
    if isinstance(value, _DEFAULT_REPR_OK):
        text = repr(value)
        if len(text) <= 40:
            return text
    return "..."


def _signature_text(qualname: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError, RecursionError):
        return f"{qualname}(...)"
    params = [
        p if p.default is inspect.Parameter.empty else p.replace(default=_Literal(_default_text(p.default)))
        for p in sig.parameters.values()
    ]
    try:
        text = str(sig.replace(parameters=params))
    except Exception:  # unusual annotations can fail to format
        return f"{qualname}(...)"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return f"{qualname}{text}"


def _first_sentence(doc: str) -> str:
    """First sentence of the first paragraph that does not start with a call signature."""
    # C functions often open with a block of signatures ("int([x]) -> integer\nint(x, base=10)
    # -> integer") whose lines wrap, so the whole paragraph goes, not just the matching lines.
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc.strip())]
    paragraphs = [p for p in paragraphs if p and not _SIGNATURE_LINE.match(p.splitlines()[0].strip())]
    if not paragraphs:
        return ""
    text = " ".join(paragraphs[0].split())
    for m in re.finditer(r"[.!?](?=\s|$)", text):
        last_word = text[: m.end()].rsplit(" ", 1)[-1].lower()
        if last_word in _ABBREVIATIONS or re.fullmatch(r"[a-z]\.", last_word):
            continue
        text = text[: m.end()]
        break
    if len(text) > MAX_TARGET_CHARS:
        text = text[:MAX_TARGET_CHARS].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return text


def _target_text(qualname: str, obj, input_text: str) -> str | None:
    # The object's own docstring, not an inherited one: a subclass paired with its base class's
    # description would be a wrong pair.
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    target = _first_sentence(inspect.cleandoc(doc))
    if len(target.split()) < MIN_TARGET_WORDS:
        return None
    # Targets that only restate the signature teach nothing.
    short_name = qualname.rsplit(".", 1)[-1]
    # ast nodes, for one, document themselves as their grammar rule: "mod = Module(...) | ...".
    if target.rstrip(".") in (input_text, qualname) or re.match(rf"^[\w.]*{re.escape(short_name)}\s*[(=]", target):
        return None
    return target


def _module_members(modname: str, module) -> list[tuple[str, object]]:
    """(qualified name, object) for public functions, classes and class methods defined in module."""
    members = []
    try:
        names = sorted(vars(module))
    except TypeError:
        return members
    for name in names:
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != modname:  # re-exports are listed where defined
            continue
        qualname = f"{modname}.{name}"
        members.append((qualname, obj))
        if not inspect.isclass(obj):
            continue
        for attr in sorted(vars(obj)):
            raw = vars(obj)[attr]
            if attr.startswith("_") or not (inspect.isroutine(raw) or isinstance(raw, (staticmethod, classmethod))):
                continue
            try:
                method = getattr(obj, attr)
            except Exception:
                continue
            members.append((f"{qualname}.{attr}", method))
    return members


def build_stdlib_corpus() -> list[tuple[str, str]]:
    """(input_text, target_text) pairs from the standard library, sorted, with unique inputs and
    unique targets. Deterministic for a given Python build (imports every stdlib module: ~seconds)."""
    candidates = []
    with warnings.catch_warnings():  # deprecated attributes (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
        for modname, module in _stdlib_modules():
            for qualname, obj in _module_members(modname, module):
                try:
                    input_text = _signature_text(qualname, obj)
                    target = _target_text(qualname, obj, input_text)
                except Exception:  # a hostile __doc__ or __signature__ must not stop the build
                    continue
                if target:
                    candidates.append((input_text, target))
    candidates.sort()
    pairs, seen_inputs, seen_targets = [], set(), set()
    for input_text, target in candidates:
        if input_text in seen_inputs or target in seen_targets:
            continue
        seen_inputs.add(input_text)
        seen_targets.add(target)
        pairs.append((input_text, target))
    return pairs


# ------------------------------------------------------------------------------------------------
# Writing


def _fixed_size_list(emb: np.ndarray) -> pa.Array:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def _write_parquet_atomic(table: pa.Table, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    finally:
        tmp.unlink(missing_ok=True)


def write_corpus(path, teacher: Teacher, pairs: list[tuple[str, str]] | None = None) -> Path:
    """Build (unless pairs are given), embed with the teacher and write an embedded dataset."""
    path = Path(path)
    if pairs is None:
        pairs = build_stdlib_corpus()
    inputs = [p[0] for p in pairs]
    targets = [p[1] for p in pairs]
    emb = teacher.embed(inputs + targets)  # one call: one pass through the batches, one cache file
    table = pa.table(
        {
            "input_text": pa.array(inputs, pa.string()),
            "target_text": pa.array(targets, pa.string()),
            "input_emb": _fixed_size_list(emb[: len(inputs)]),
            "target_emb": _fixed_size_list(emb[len(inputs) :]),
        }
    ).replace_schema_metadata({"teacher": teacher.teacher_id, "embed_dim": str(teacher.embed_dim)})
    _write_parquet_atomic(table, path)
    logger.info("wrote %d pairs embedded by %s to %s", len(pairs), teacher.teacher_id, path)
    return path


def default_corpus_path(teacher_id: str = DEFAULT_TEACHER) -> Path:
    """Where the stdlib corpus is cached; one file per teacher, since it holds its embeddings."""
    if teacher_id == DEFAULT_TEACHER:
        return default_cache_dir() / "corpus" / "stdlib_pairs.parquet"
    return default_cache_dir() / "corpus" / f"stdlib_pairs.{_safe_dirname(teacher_id)}.parquet"


def ensure_corpus(path=None, teacher: Teacher | None = None) -> Path:
    """Path of the embedded stdlib corpus, building it first if the file does not exist."""
    if path is None:
        path = default_corpus_path(teacher.teacher_id if teacher is not None else DEFAULT_TEACHER)
    path = Path(path)
    if path.exists():
        return path
    return write_corpus(path, teacher if teacher is not None else Teacher())


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
            return pq.read_table(path)
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
    emb = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim)
    bad_rows = int((~np.isfinite(emb)).any(axis=1).sum())
    if bad_rows:
        raise DatasetError(f"{path}: column {name!r} has NaN/inf embeddings in {bad_rows} rows")
    return emb


def _in_val(text: str, val_fraction: float) -> bool:
    # First 8 bytes of sha256 as a uniform number in [0, 1): the same text always lands in the
    # same split, whatever the row order or the Python hash seed.
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


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
    is_val = np.array([_in_val(t, val_fraction) for t in inputs], dtype=bool)
    train, val = everything.take(np.flatnonzero(~is_val)), everything.take(np.flatnonzero(is_val))
    for split_name, split in (("train", train), ("validation", val)):
        if len(split) == 0:
            raise DatasetError(
                f"{path}: {split_name} split is empty ({table.num_rows} rows, val_fraction={val_fraction}); "
                f"use more rows or another val_fraction"
            )
    return PairDataset(train=train, val=val, teacher=teacher_id, embed_dim=int(embed_dim))


def validation_rows(data: PairDataset, max_rows: int) -> Split:
    """The rows validation uses: the first `max_rows` of the validation split."""
    return data.val.take(range(min(len(data.val), max_rows)))


def shard(split: Split, rank: int, world_size: int) -> Split:
    """Rows rank, rank + world_size, rank + 2*world_size, ... of the split.

    Every rank's shard is disjoint from every other's and together they are the whole split, so
    data-parallel workers each read only their own rows. Shard sizes differ by at most one row."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return split.take(np.arange(rank, len(split), world_size))
