"""What the two corpus builders (corpus_stdlib, corpus_params) share: importing modules quietly,
walking a package's public modules and a class's public methods, telling an abbreviation from the
end of a sentence, and where a built corpus is cached; and `hash_share`, the split by a hash of the
input that the dataset loader and the dictionary builder both use."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import pkgutil
import re
import warnings
from pathlib import Path

from .teacher import DEFAULT_TEACHER, default_cache_dir, safe_dirname

# A period after one of these does not end a sentence.
ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "resp.", "approx.", "no.", "mr.", "dr.", "st."}


def is_abbreviation(word: str) -> bool:
    """Whether the period closing `word` (lower case) belongs to it: "e.g." or an initial such as "x."."""
    return word in ABBREVIATIONS or re.fullmatch(r"[a-z]\.", word) is not None


def hash_share(text: str) -> float:
    """The first 8 bytes of sha256 as a uniform number in [0, 1): the same text always lands in the
    same split, whatever the row order or the Python hash seed."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def quiet_import(name: str):
    """Import a module with its prints and warnings swallowed; None if it cannot be imported."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # ImportError, OSError, SystemExit... anything: just skip the module
        return None


def public_modules(package: str, skip_parts: set[str]) -> list[tuple[str, object]]:
    """(name, module) for a package (or plain module) and its public submodules, sorted by name.

    Submodules named in skip_parts, or starting with "_", are left out with everything below them."""
    root = quiet_import(package)
    if root is None:
        return []
    modules = [(package, root)]
    # Walk the package by listing, importing each public submodule quietly ourselves
    # (pkgutil.walk_packages would import subpackages without silencing them).
    pending = [(package, list(getattr(root, "__path__", [])))]
    while pending:
        parent, paths = pending.pop()
        for info in pkgutil.iter_modules(paths):
            if info.name.startswith("_") or info.name in skip_parts:
                continue
            name = f"{parent}.{info.name}"
            module = quiet_import(name)
            if module is None:
                continue
            modules.append((name, module))
            if info.ispkg and hasattr(module, "__path__"):
                pending.append((name, list(module.__path__)))
    return sorted(modules, key=lambda m: m[0])


def public_methods(qualname: str, cls: type) -> list[tuple[str, object]]:
    """(qualified name, method) for the public methods a class defines itself, sorted by name."""
    methods = []
    for attr in sorted(vars(cls)):
        raw = vars(cls)[attr]
        if attr.startswith("_") or not (inspect.isroutine(raw) or isinstance(raw, (staticmethod, classmethod))):
            continue
        try:
            method = getattr(cls, attr)
        except Exception:
            continue
        methods.append((f"{qualname}.{attr}", method))
    return methods


def corpus_cache_path(stem: str, teacher_id: str = DEFAULT_TEACHER) -> Path:
    """Where a built corpus is cached: one file per teacher, since it holds that teacher's embeddings."""
    if teacher_id == DEFAULT_TEACHER:
        return default_cache_dir() / "corpus" / f"{stem}.parquet"
    return default_cache_dir() / "corpus" / f"{stem}.{safe_dirname(teacher_id)}.parquet"
