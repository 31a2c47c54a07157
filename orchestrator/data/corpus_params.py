"""A second corpus, from the numpydoc "Parameters" sections of installed scientific packages.

For every documented parameter of a public function, class or method of numpy, scipy, pandas,
scikit-learn and matplotlib:

    input_text  = "scipy.signal.welch(nperseg: int, optional)"   (qualified name, parameter: type)
    target_text = "Length of each segment."                      (first sentence of its description)

It is a different task from the stdlib corpus (other text, other phrasing, many near-synonymous
targets), so a result that holds on both is not an artefact of one corpus. Inputs and targets are
both unique, as in the stdlib corpus, so nearest-neighbour decoding has one right answer: a
repeated target ("The input array.") stays with its first parameter in the sorted walk.

Building takes ~20-30 s of imports and parsing; embedding the 12,000 texts with the teacher is
most of `data build --corpus params` the first time.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

from .corpus_common import corpus_cache_path, is_abbreviation, public_methods, public_modules
from .teacher import DEFAULT_TEACHER

DEFAULT_PACKAGES = ("numpy", "scipy", "pandas", "sklearn", "matplotlib")
MAX_PAIRS = 6000
MIN_TARGET_CHARS = 15
MAX_TARGET_CHARS = 300

# Submodules that are test suites, vendored copies of other projects, GUI toolkit bindings
# (matplotlib.backends imports Tk/Qt/GTK/wx), re-exports only (matplotlib.pylab), or need
# optional packages and only fail slowly.
_SKIP_SUBMODULE_PARTS = {
    "test", "tests", "testing", "conftest", "__main__", "setup", "externals", "backends",
    "sphinxext", "pylab", "distutils",
}
_PARAMETER_SECTIONS = {"Parameters", "Other Parameters"}
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
# "x", "*args", "**kwargs", "x1, x2" -- what may stand before the " : type" of a parameter line.
_PARAMETER_NAMES = re.compile(r"^\*{0,2}[A-Za-z_]\w*(\s*,\s*\*{0,2}[A-Za-z_]\w*)*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _section_lines(doc_lines: list[str], titles: set[str]) -> list[list[str]]:
    """The bodies (lines below the underline, up to the next section header) of the titled sections."""
    sections, body = [], None
    for i, line in enumerate(doc_lines):
        is_header = i + 1 < len(doc_lines) and line.strip() and _UNDERLINE.match(doc_lines[i + 1]) \
            and _indent(doc_lines[i + 1]) == _indent(line)
        if is_header:
            body = [] if line.strip() in titles else None
            if body is not None:
                sections.append(body)
            continue
        if _UNDERLINE.match(line) and i > 0 and doc_lines[i - 1].strip():
            continue  # the underline of the header just handled
        if body is not None:
            body.append(line)
    return sections


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    for match in re.finditer(r"[.!?](?=\s|$)", text):
        last_word = text[: match.end()].rsplit(" ", 1)[-1].lower().lstrip("([{'\"`")
        # "(e.g.", "i.e." and initials such as "x." do not end a sentence
        if is_abbreviation(last_word):
            continue
        return text[: match.end()]
    return text


def _description_sentence(description_lines: list[str]) -> str:
    """First sentence of the first paragraph that is not an RST directive (".. versionadded::")."""
    paragraphs, current = [], []
    for line in description_lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    for paragraph in paragraphs:
        if paragraph[0].lstrip().startswith(".."):
            continue
        return _first_sentence(" ".join(paragraph))
    return ""


def _parameter(names: str, type_text: str, description: list[str]) -> tuple[str, str, str]:
    # pandas wraps long types onto the next line: "how : {'left', 'right',\n    'inner'}, ...".
    while type_text.endswith(",") and description and description[0].strip():
        type_text = f"{type_text} {' '.join(description[0].split())}"
        description = description[1:]
    return names, type_text, _description_sentence(description)


def parse_parameters(doc: str) -> list[tuple[str, str, str]]:
    """(names, type text, first sentence of the description) for each parameter of a numpydoc docstring.

    names is the parameter's name as written ("x1, x2" when several share one entry), type text is
    empty when the entry has no " : type", and the sentence is empty when there is no description."""
    parameters = []
    lines = inspect.cleandoc(doc).splitlines()
    for body in _section_lines(lines, _PARAMETER_SECTIONS):
        entry_indent = min((_indent(line) for line in body if line.strip()), default=0)
        entry = None  # [names, type text, description lines] of the parameter being read
        for line in body:
            if line.strip() and _indent(line) <= entry_indent:
                if entry is not None:
                    parameters.append(_parameter(*entry))
                head, _, tail = line.strip().partition(":")
                # prose at the entry level is not a parameter: it and its lines are skipped
                entry = [head.strip(), " ".join(tail.split()), []] if _PARAMETER_NAMES.match(head.strip()) else None
            elif entry is not None:
                entry[2].append(line)
        if entry is not None:
            parameters.append(_parameter(*entry))
    return parameters


def _home_module(obj) -> str | None:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
    return module if isinstance(module, str) else None


def _is_documented_callable(obj) -> bool:
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return True
    # Callable instances count when they have their own docstring: numpy's ufuncs (numpy.add)
    # and scipy's distributions (scipy.stats.norm) are documented that way.
    return callable(obj) and getattr(obj, "__doc__", None) != getattr(type(obj), "__doc__", None)


def _named_callables(package: str) -> list[tuple[str, object]]:
    """(qualified name, object) for the public documented callables of the package and the
    methods of its public classes, each object once, under its most public name."""
    package_root = package.split(".")[0]
    best: dict[int, tuple[tuple, str, object]] = {}
    for modname, module in public_modules(package, _SKIP_SUBMODULE_PARTS):
        try:
            namespace = dict(vars(module))
        except TypeError:
            continue
        for name, obj in namespace.items():
            if name.startswith("_") or inspect.ismodule(obj) or not _is_documented_callable(obj):
                continue
            home = _home_module(obj)
            if home is None or home.split(".")[0] != package_root:
                continue  # re-exported from another project (matplotlib.pylab re-exports numpy)
            # The shallowest module that exposes it names it ("scipy.signal.welch", not
            # "scipy.signal._spectral_py.welch"); between modules of one depth, the one it lives
            # in or under ("matplotlib.path.Path", not "matplotlib.artist.Path").
            lives_here = home == modname or home.startswith(modname + ".")
            rank = (modname.count("."), not lives_here, modname, name)
            if id(obj) not in best or rank < best[id(obj)][0]:
                best[id(obj)] = (rank, f"{modname}.{name}", obj)
    named = []
    for _, qualname, obj in sorted(best.values(), key=lambda entry: entry[0]):
        named.append((qualname, obj))
        if inspect.isclass(obj):
            named.extend(public_methods(qualname, obj))
    return named


def _package_candidates(package: str) -> list[tuple[str, str]]:
    """(input_text, target_text) for every documented parameter in the package, in walk order."""
    candidates = []
    for qualname, obj in _named_callables(package):
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str) or "Parameters" not in doc:
            continue
        try:
            parameters = parse_parameters(doc)
        except Exception:  # a malformed docstring must not stop the build
            continue
        for names, type_text, sentence in parameters:
            input_text = f"{qualname}({names}: {type_text})" if type_text else f"{qualname}({names})"
            candidates.append((input_text, sentence))
    return candidates


def build_parameter_corpus(packages=DEFAULT_PACKAGES, max_pairs: int = MAX_PAIRS) -> list[tuple[str, str]]:
    """(input_text, target_text) pairs from the numpydoc parameter sections of `packages`.

    Deterministic for a given set of installed versions: modules and members are walked in sorted
    order and a repeated input or target keeps its first occurrence. Packages that fail to import
    are skipped. When there are more than max_pairs, evenly spaced pairs are kept, so every package
    keeps its share."""
    pairs, seen_inputs, seen_targets = [], set(), set()
    with warnings.catch_warnings():  # deprecated aliases warn when their attributes are read
        warnings.simplefilter("ignore")
        for package in packages:
            for input_text, target in _package_candidates(package):
                if not MIN_TARGET_CHARS <= len(target) <= MAX_TARGET_CHARS:
                    continue
                if input_text in seen_inputs or target in seen_targets:
                    continue
                seen_inputs.add(input_text)
                seen_targets.add(target)
                pairs.append((input_text, target))
    if len(pairs) > max_pairs:
        pairs = [pairs[i * len(pairs) // max_pairs] for i in range(max_pairs)]
    return pairs


def default_parameter_corpus_path(teacher_id: str = DEFAULT_TEACHER) -> Path:
    """Next to the stdlib corpus in the cache; one file per teacher, since it holds its embeddings."""
    return corpus_cache_path("numpydoc_params", teacher_id)
