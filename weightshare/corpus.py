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

__all__ = ["sentences", "calibration_sentences", "evaluation_sentences"]

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


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Distinct prose sentences (40-220 characters) from stdlib docstrings, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for name in _MODULES:
        root = stdlib / name
        files = sorted(root.rglob("*.py")) if root.is_dir() else [stdlib / f"{name}.py"]
        for file in files:
            if "test" in file.parts or not file.is_file():
                continue
            for doc in _docstrings(file):
                for para in doc.split("\n\n"):
                    text = " ".join(para.split())
                    for s in _SENTENCE.split(text):
                        if 40 <= len(s) <= 220 and _PROSE.match(s):
                            found.add(s)
    return tuple(sorted(found, key=lambda s: hashlib.sha256(s.encode()).hexdigest()))


def _part(which: int) -> list[str]:
    return [s for s in sentences() if hashlib.sha256(s.encode()).digest()[-1] % 4 == which]


def calibration_sentences(n: int | None = None) -> list[str]:
    """A quarter of the corpus, kept for calibration: never overlaps the evaluation part."""
    return _part(0)[:n]


def evaluation_sentences(n: int | None = None) -> list[str]:
    """Held-out sentences for measuring fidelity (three quarters of the corpus)."""
    return [s for s in sentences() if hashlib.sha256(s.encode()).digest()[-1] % 4 != 0][:n]
