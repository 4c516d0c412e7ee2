"""Benchmarks, run side by side with their references: ``weightshare bench NAME``.

A benchmark is one file in this package, found by its name: every module whose name does not
start with ``_`` (helpers do: ``_references.py``), run as ``weightshare bench`` plus the file
name with ``-`` for ``_`` (``digits_arch.py`` is ``digits-arch``).  The file defines::

    ORDER = 120                       # optional: its place in listings (without one: last, by name)

    def main(quick: bool = False) -> dict:   # prints its tables, returns its figures
        ...                                  # (``main(quick, plot)`` if it draws a chart: --plot FILE;
                                             #  ``main(quick, size)`` if it runs at sizes: --size NAME)

Nothing else is edited to add one.  The files are read (``ast``), not imported, to list them:
importing a benchmark imports torch, and OMP_WAIT_POLICY must be set before that; ``run`` sets it,
then imports the one chosen, and adds the JSON line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from weightshare._table import table  # noqa: F401 - torch-free: this package is imported before torch loads


@dataclass(frozen=True)
class Benchmark:
    """One benchmark file, as read without importing it."""

    name: str  # on the command line: the file name with "-" for "_"
    module: str  # the module ``run`` imports
    order: float  # its ORDER, or inf without one
    draws_chart: bool  # its main takes ``plot`` (--plot FILE)
    takes_size: bool = False  # its main takes ``size`` (--size NAME)


def discover() -> dict[str, Benchmark]:
    """{name: Benchmark} for every benchmark file on this package's ``__path__``, by ORDER then name."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and not info.ispkg:
            module = f"{__name__}.{info.name}"
            found.append(_read(module, importlib.util.find_spec(module).origin))
    return {b.name: b for b in sorted(found, key=lambda b: (b.order, b.name))}


def _read(module: str, path: str) -> Benchmark:
    order, params = math.inf, set()
    for node in ast.parse(Path(path).read_bytes(), filename=path).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ORDER" for t in node.targets):
            if not (isinstance(node.value, ast.Constant) and type(node.value.value) in (int, float)):
                raise ValueError(f"benchmark {path}: ORDER\n  expected: a number written out (its place in listings)"
                                 f"\n  got: {ast.unparse(node.value)}")
            order = node.value.value
        elif isinstance(node, ast.FunctionDef) and node.name == "main":
            params = {a.arg for a in node.args.args + node.args.kwonlyargs}
    return Benchmark(module.rpartition(".")[2].replace("_", "-"), module, order, "plot" in params, "size" in params)


_FOUND = discover()
NAMES = tuple(_FOUND)  # what the CLI lists; ``run`` looks again, so a file added to __path__ since is found
PLOTS = tuple(name for name, b in _FOUND.items() if b.draws_chart)  # the benchmarks that draw a chart (--plot FILE)


def run(name: str, quick: bool = False, as_json: bool = False, plot: str | None = None,
        size: str | None = None) -> dict:
    found = discover()
    if name not in found:
        raise ValueError(f"unknown benchmark\n  expected one of: {', '.join(found)}\n  got: {name!r}")
    if plot and not found[name].draws_chart:
        charts = ", ".join(n for n, b in found.items() if b.draws_chart)
        raise ValueError(f"bench {name}: --plot\n  expected: a benchmark that draws a chart ({charts})")
    if size and not found[name].takes_size:
        sized = ", ".join(n for n, b in found.items() if b.takes_size)
        raise ValueError(f"bench {name}: --size\n  expected: a benchmark that runs at sizes ({sized})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the benchmarks' subprocesses
    print(omp_wait_policy_line(os.environ["OMP_WAIT_POLICY"], _startup_environ()), flush=True)
    module = importlib.import_module(found[name].module)
    options = {key: value for key, value in (("plot", plot), ("size", size)) if value}
    figures = module.main(quick=quick, **options)
    if as_json:
        print(json.dumps(figures))
    return figures


def omp_wait_policy_line(policy: str, startup: dict[str, str] | None) -> str:
    """The line every benchmark prints about OMP_WAIT_POLICY (``startup``: the environment at exec, if known).

    On a shared machine OpenMP's default spin-wait burns a core between parallel
    regions and distorts timings; OpenMP reads the variable when torch first loads it.
    """
    if policy.upper() != "PASSIVE":
        return f"OMP_WAIT_POLICY={policy} is set, not PASSIVE: spin-waiting OpenMP threads may distort timings"
    line = f"OMP_WAIT_POLICY={policy} is set: idle OpenMP threads sleep instead of spin-waiting"
    if os.environ.get("_WEIGHTSHARE_OMP_BEFORE_TORCH") == "1":
        return line + " (set by weightshare before torch loaded)"
    if startup is not None and startup.get("OMP_WAIT_POLICY") != policy:
        line += " (set after start-up: it holds in subprocesses, and here only if torch was imported after it)"
    return line


def _startup_environ() -> dict[str, str] | None:
    """This process's environment as it was at exec (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return None
    return dict(i.decode(errors="replace").partition("=")[::2] for i in items if b"=" in i)
