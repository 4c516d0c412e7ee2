"""The stdlib-docstring corpus: deterministic, and its task labels are facts about the source."""

import ast
import random
import sysconfig
from pathlib import Path

import pytest

from weightshare import corpus


def _where(sentence: str, package: str) -> set[str]:
    """Brute force: the kinds of node in ``package`` whose docstring contains ``sentence``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = stdlib / package
    files = root.rglob("*.py") if root.is_dir() else [stdlib / f"{package}.py"]
    kinds = set()
    for file in files:
        if "test" in file.parts:
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and sentence in " ".join(doc.split()):
                    kinds.add({ast.Module: "module", ast.ClassDef: "class"}.get(type(node), "function"))
    return kinds


def test_labels_are_where_the_sentence_is_documented():
    rows = corpus.labelled_sentences()
    for sentence, package, kind in random.Random(0).sample(rows, 25):
        assert kind in _where(sentence, package), (sentence, package, kind)


def test_labelled_sentences_are_the_corpus_minus_ambiguous_ones():
    rows = corpus.labelled_sentences()
    whole = corpus.sentences()
    assert [s for s, _, _ in rows] == [s for s in whole if s in {r[0] for r in rows}]
    assert 0 < len(whole) - len(rows) < 0.01 * len(whole)  # a few sentences appear under two labels


def test_text_tasks_label_every_sentence_of_the_top_packages():
    sentences, labels, names = corpus.text_tasks(packages=5)
    assert len(names["package"]) == 5 and names["kind"] == ["class", "function", "module"]
    assert len(labels["package"]) == len(labels["kind"]) == len(sentences) > 1000
    assert set(labels["package"]) == set(range(5)) and set(labels["kind"]) == {0, 1, 2}
    truth = {s: (p, k) for s, p, k in corpus.labelled_sentences()}
    for s, p, k in zip(sentences[:200], labels["package"], labels["kind"]):
        assert truth[s] == (names["package"][p], names["kind"][k])
    with pytest.raises(ValueError, match="packages"):
        corpus.text_tasks(packages=1)
