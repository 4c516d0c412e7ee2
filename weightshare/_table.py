"""The one plain-text table helper (reports, evaluations, benchmarks).

It imports nothing heavy: ``weightshare bench`` imports it before torch loads, so that
``OMP_WAIT_POLICY`` is set in time.
"""

from __future__ import annotations


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
