"""Benchmarks, run side by side with their references: ``weightshare bench NAME``.

Each benchmark module has ``main(quick: bool) -> dict`` that prints its tables
and returns its figures; ``run`` adds the JSON line.
"""

from __future__ import annotations

import importlib
import json
import os

NAMES = ("kmeans", "minilm")


def run(name: str, quick: bool = False, as_json: bool = False) -> dict:
    if name not in NAMES:
        raise ValueError(f"unknown benchmark\n  expected one of: {', '.join(NAMES)}\n  got: {name!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    figures = importlib.import_module(f"benchmarks.{name}").main(quick=quick)
    if as_json:
        print(json.dumps(figures))
    return figures


def table(rows: list[dict], title: str = "") -> str:
    """Plain-text table of dicts sharing keys (floats to 4 significant digits)."""
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [title] if title else []
    lines.append("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
