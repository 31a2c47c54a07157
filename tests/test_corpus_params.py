"""The numpydoc parameter corpus: docstring parsing and the builder on a small module set."""

import re

import pytest

from orchestrator.data.corpus_params import (
    MAX_TARGET_CHARS,
    MIN_TARGET_CHARS,
    build_parameter_corpus,
    parse_parameters,
)

HAND_WRITTEN_DOC = """Resample a signal.

    A summary paragraph that mentions nothing parameter-like: x : int.

    Parameters
    ----------
    x : array_like
        The input signal, sampled
        at a uniform rate. Anything after the first sentence is dropped.
    num
        Number of samples in the output (e.g. 128).

        .. versionadded:: 1.2
    axis : int, optional
        .. deprecated:: 2.0
            Use `axes`.

        The axis along which to resample.
    x1, x2 : {'a', 'b'}, default: 'a'
        Two parameters sharing an entry.
    *args, **kwargs
        Passed on to the window function
    quiet : bool
    how : {'left', 'right',
        'inner'}, default 'inner'
        Type of merge to be performed.

    Returns
    -------
    y : ndarray
        The resampled signal.

    Other Parameters
    ----------------
    window : str
        Spectral window applied before resampling.
    """


def test_parse_parameters_reads_names_types_and_first_sentences():
    assert parse_parameters(HAND_WRITTEN_DOC) == [
        ("x", "array_like", "The input signal, sampled at a uniform rate."),
        ("num", "", "Number of samples in the output (e.g. 128)."),
        ("axis", "int, optional", "The axis along which to resample."),
        ("x1, x2", "{'a', 'b'}, default: 'a'", "Two parameters sharing an entry."),
        ("*args, **kwargs", "", "Passed on to the window function"),
        ("quiet", "bool", ""),
        ("how", "{'left', 'right', 'inner'}, default 'inner'", "Type of merge to be performed."),
        ("window", "str", "Spectral window applied before resampling."),
    ]


def test_parse_parameters_ignores_docstrings_without_a_parameters_section():
    assert parse_parameters("Just a summary.\n\nReturns\n-------\nint\n    The answer.") == []
    assert parse_parameters("") == []


@pytest.fixture(scope="module")
def small_corpus():
    return build_parameter_corpus(packages=("numpy.linalg", "numpy.fft"))


def test_builder_on_small_packages_gives_unique_well_formed_pairs(small_corpus):
    assert len(small_corpus) >= 30
    inputs = [p[0] for p in small_corpus]
    targets = [p[1] for p in small_corpus]
    assert len(set(inputs)) == len(inputs)
    assert len(set(targets)) == len(targets)
    for input_text, target in small_corpus:
        assert re.fullmatch(r"numpy\.(linalg|fft)(\.\w+)+\([*\w, ]+(: .+)?\)", input_text), input_text
        assert MIN_TARGET_CHARS <= len(target) <= MAX_TARGET_CHARS
        assert "\n" not in target and target == target.strip()
    # Names come from the public module, not where the object is defined.
    assert any(i.startswith("numpy.linalg.norm(ord: ") for i in inputs)


def test_builder_is_deterministic_caps_and_skips_missing_packages(small_corpus):
    again = build_parameter_corpus(packages=("numpy.linalg", "numpy.fft", "no_such_package_anywhere"))
    assert again == small_corpus
    capped = build_parameter_corpus(packages=("numpy.linalg", "numpy.fft"), max_pairs=10)
    assert len(capped) == 10 and set(capped) <= set(small_corpus)


def test_data_build_takes_the_params_corpus_and_defaults_to_stdlib():
    from orchestrator.cli import build_parser
    from orchestrator.data.corpus_params import default_parameter_corpus_path
    from orchestrator.data.corpus_stdlib import default_corpus_path

    parser = build_parser()
    assert parser.parse_args(["data", "build"]).corpus == "stdlib"
    assert parser.parse_args(["data", "build", "--corpus", "params"]).corpus == "params"
    assert default_parameter_corpus_path().parent == default_corpus_path().parent
    assert default_parameter_corpus_path() != default_corpus_path()


def test_parameter_pairs_write_and_load_as_a_dataset(small_corpus, tmp_path):
    from orchestrator.data.datasets import load_dataset, write_corpus
    from orchestrator.data.teacher import Teacher

    teacher = Teacher()
    path = write_corpus(tmp_path / "params.parquet", teacher, small_corpus[:40])
    data = load_dataset(path, teacher=teacher, val_fraction=0.25)
    assert len(data.train) + len(data.val) == 40
    assert data.train.input_emb.shape[1] == teacher.embed_dim
