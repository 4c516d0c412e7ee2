"""A deterministic English text corpus from what ships on every machine: the
docstrings of the Python standard library.

Sentences are split into a calibration part and a separate evaluation part by
a hash of their text, so the split never depends on file order.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

__all__ = ["sentences", "labelled_sentences", "text_tasks", "calibration_sentences", "evaluation_sentences"]

# packages whose docstrings read like prose; a fixed list keeps the corpus stable
_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "ftplib", "functools", "gettext", "gzip",
    "heapq", "http", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "multiprocessing",
    "optparse", "pathlib", "pickle", "pydoc", "random", "shutil", "smtplib", "socketserver", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tkinter", "turtle",
    "typing", "unittest", "urllib", "uuid", "wave", "xml", "zipfile",
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")


_KIND = {ast.Module: "module", ast.ClassDef: "class", ast.FunctionDef: "function", ast.AsyncFunctionDef: "function"}


def _docstrings(path: Path):
    """(kind, docstring) of every module, class and function in ``path``."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if type(node) in _KIND:
            doc = ast.get_docstring(node)
            if doc:
                yield _KIND[type(node)], doc


@lru_cache(maxsize=1)
def _labelled() -> dict[str, tuple[str, str] | None]:
    """sentence -> (package, kind), or None where two docstrings disagree on the labels."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, tuple[str, str] | None] = {}
    for name in _MODULES:
        root = stdlib / name
        files = sorted(root.rglob("*.py")) if root.is_dir() else [stdlib / f"{name}.py"]
        for file in files:
            if "test" in file.parts or not file.is_file():
                continue
            for kind, doc in _docstrings(file):
                for para in doc.split("\n\n"):
                    text = " ".join(para.split())
                    for s in _SENTENCE.split(text):
                        if 40 <= len(s) <= 220 and _PROSE.match(s):
                            if s in found and found[s] != (name, kind):
                                found[s] = None
                            else:
                                found.setdefault(s, (name, kind))
    return found


def _order(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Distinct prose sentences (40-220 characters) from stdlib docstrings, in a fixed order."""
    return tuple(sorted(_labelled(), key=_order))


def labelled_sentences() -> list[tuple[str, str, str]]:
    """(sentence, package, kind) for real multi-task labels: which stdlib package (``"email"``,
    ``"asyncio"``, ...) documents the sentence, and whether it documents a ``"module"``, a
    ``"class"`` or a ``"function"``.  Sentences found under two different labels are left out
    (a label must be a fact, not a coin flip); the order is the fixed order of ``sentences()``."""
    found = _labelled()
    return [(s, *found[s]) for s in sentences() if found[s] is not None]


def text_tasks(packages: int = 8) -> tuple[list[str], dict[str, list[int]], dict[str, list[str]]]:
    """Two labelled text tasks on the sentences of the ``packages`` largest stdlib packages:

    - ``"package"``: which of those packages documents the sentence (``packages`` classes);
    - ``"kind"``: whether it documents a module, a class or a function (3 classes).

    Returns (sentences, {task: labels}, {task: class names}), in the corpus's fixed order.
    """
    import collections

    rows = labelled_sentences()
    counts = collections.Counter(package for _, package, _ in rows)
    if not 2 <= packages <= len(counts):
        raise ValueError(f"text_tasks: packages\n  expected: 2..{len(counts)}\n  got: {packages}")
    top = sorted(p for p, _ in counts.most_common(packages))
    kinds = ["class", "function", "module"]
    kept = [r for r in rows if r[1] in top]
    labels = {"package": [top.index(p) for _, p, _ in kept], "kind": [kinds.index(k) for _, _, k in kept]}
    return [s for s, _, _ in kept], labels, {"package": top, "kind": kinds}


def _part(which: int) -> list[str]:
    return [s for s in sentences() if hashlib.sha256(s.encode()).digest()[-1] % 4 == which]


def calibration_sentences(n: int | None = None) -> list[str]:
    """A quarter of the corpus, kept for calibration: never overlaps the evaluation part."""
    return _part(0)[:n]


def evaluation_sentences(n: int | None = None) -> list[str]:
    """Held-out sentences for measuring fidelity (three quarters of the corpus)."""
    return [s for s in sentences() if hashlib.sha256(s.encode()).digest()[-1] % 4 != 0][:n]
