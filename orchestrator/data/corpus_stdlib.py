"""The project's own corpus, built from text that ships with Python.

For every public function, class and method of the standard library, the input is its qualified
name and signature ("posixpath.join(a, *p)") and the target is the first sentence of its docstring
("Join two or more pathname components, inserting '/' as needed."). Inputs and targets are both
unique, so nearest-neighbour decoding over the target embeddings has one right answer.

`data.write_corpus` embeds and writes it; `data.ensure_corpus` builds it on first use.
"""
from __future__ import annotations

import inspect
import re
import sys
import warnings
from pathlib import Path

from .corpus_common import corpus_cache_path, is_abbreviation, public_methods, public_modules
from .teacher import DEFAULT_TEACHER

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
# A docstring line that is only a call signature, e.g. "sqrt(x) -> float" (common in C modules).
_SIGNATURE_LINE = re.compile(r"^(async\s+)?[\w.]+\(.*\)\s*(->.*)?$")
_DEFAULT_REPR_OK = (type(None), bool, int, float, str, bytes)


def _stdlib_modules() -> list[tuple[str, object]]:
    """(name, module) for the public stdlib modules and the public submodules of its packages."""
    modules = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        modules.extend(public_modules(name, _SKIP_SUBMODULE_PARTS))
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
        if is_abbreviation(last_word):
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
        if inspect.isclass(obj):
            members.extend(public_methods(qualname, obj))
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


def default_corpus_path(teacher_id: str = DEFAULT_TEACHER) -> Path:
    """Where the stdlib corpus is cached; one file per teacher, since it holds its embeddings."""
    return corpus_cache_path("stdlib_pairs", teacher_id)
