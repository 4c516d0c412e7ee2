"""Benchmarks, run side by side with their references: ``weightshare bench NAME``.

Each benchmark module has ``main(quick: bool) -> dict`` that prints its tables
and returns its figures; ``run`` adds the JSON line.
"""

from __future__ import annotations

import importlib
import json
import os

from weightshare._table import table  # noqa: F401 - torch-free: this package is imported before torch loads

NAMES = ("kmeans", "minilm", "load", "digits-arch", "minilm-basis", "digits-mtl", "text-mtl", "merge-minilm", "soups", "cotrain", "runtime")


PLOTS = ("minilm",)  # the benchmarks that draw a chart (--plot FILE)


def run(name: str, quick: bool = False, as_json: bool = False, plot: str | None = None) -> dict:
    if name not in NAMES:
        raise ValueError(f"unknown benchmark\n  expected one of: {', '.join(NAMES)}\n  got: {name!r}")
    if plot and name not in PLOTS:
        raise ValueError(f"bench {name}: --plot\n  expected: a benchmark that draws a chart ({', '.join(PLOTS)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the benchmarks' subprocesses
    print(omp_wait_policy_line(os.environ["OMP_WAIT_POLICY"], _startup_environ()), flush=True)
    module = importlib.import_module(f"weightshare.bench.{name.replace('-', '_')}")
    figures = module.main(quick=quick, plot=plot) if plot else module.main(quick=quick)
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
