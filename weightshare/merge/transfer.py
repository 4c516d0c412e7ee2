"""``transfer``: copy tensors from one model into another by name patterns, within or across
architectures, and say exactly what moved and what was left behind.

    report = transfer(pretrained, model, {"encoder.*": "backbone.*", "head.weight": "cls.weight"})
    print(report)          # a short table
    report.moved           # [Moved(src, dst, shape, cast), ...]
    report.left            # [Left(src, dst, reason), ...]

Names are state-dict names (parameters and persistent buffers).  Patterns: ``*``
is the only wildcard; it matches any run of characters, dots included, and each
``*`` of the source pattern is substituted, in order, into the destination
pattern's ``*``; stars take as little as they can, left to right, so
``"blocks.*.*"`` splits ``blocks.0.attn.weight`` into ``0`` and ``attn.weight``.
Everything else, ``?`` and ``[`` included, is literal, so a pattern without
``*`` is an exact name.  A source name goes where the FIRST pattern (in the
mapping's order) that matches it says: put specific patterns before general ones.

Nothing is half-copied: every name is resolved and every problem found first,
then the tensors are copied, under ``torch.no_grad``, into the destination's own
tensors, which keep their dtype and device.  Dtypes: a floating-point source
into a floating-point destination of another precision is cast to the
destination's dtype (the row says so, ``cast``); a cast between kinds
(floating point, integer, bool, complex) is refused, and the tensor is left
with the reason ``dtype float32 vs int64``.

Tied tensors (one tensor under several names, e.g. tied input/output
embeddings): in the destination, names sharing one tensor are one target, so
writing one name writes them all (``report.tied`` lists the names changed
through tying), and two different source tensors sent to one tied destination
tensor are a conflict like two sources sent to one name; the same source
tensor sent under two tied names is not.  A source tensor tied under several
names moves under each of them.  A model transferred into itself (``src is
dst``, e.g. initialising layer 2 from layer 1) reads the values of before the
transfer: sources that share memory with a destination are copied aside first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import torch
from torch import nn

from weightshare.errors import clip

__all__ = ["transfer", "TransferReport", "Moved", "Left"]


class Moved(NamedTuple):
    src: str
    dst: str
    shape: tuple[int, ...]
    cast: str | None = None  # "float16 -> float32" when the dtypes differ


class Left(NamedTuple):
    src: str
    dst: str | None  # None for an unmapped source name
    reason: str  # "unmapped", "missing in destination", "shape (a, b) vs (c, d)", "dtype x vs y"


@dataclass
class TransferReport:
    """What ``transfer`` did.  ``moved``: every (src, dst, shape) copied.  ``left``: every source
    name that did not move, and why.  ``untouched``: destination names that received nothing
    (directly or through tying).  ``tied``: destination name -> the other names it changed
    through tying.  ``unused_patterns``: source patterns that took no name."""

    moved: list[Moved] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    tied: dict[str, list[str]] = field(default_factory=dict)
    unused_patterns: list[str] = field(default_factory=list)

    @property
    def unmapped(self) -> list[str]:
        return [x.src for x in self.left if x.reason == "unmapped"]

    @property
    def missing(self) -> list[tuple[str, str]]:
        return [(x.src, x.dst) for x in self.left if x.reason == "missing in destination"]

    @property
    def mismatched(self) -> list[Left]:
        """Mapped names whose destination exists but cannot take the tensor (shape or dtype)."""
        return [x for x in self.left if x.reason.startswith(("shape", "dtype"))]

    @property
    def failed(self) -> list[Left]:
        """Everything a pattern matched that could not move (what ``strict=True`` refuses)."""
        return [x for x in self.left if x.reason != "unmapped"]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unused_patterns

    def __str__(self, limit: int = 20) -> str:
        counts = {}
        for x in self.left:
            key = x.reason.split(" ")[0] if x.reason.startswith(("shape", "dtype")) else x.reason
            counts[key] = counts.get(key, 0) + 1
        why = ", ".join(f"{n} {k}" for k, n in counts.items())
        head = (f"transfer: {len(self.moved)} moved, {len(self.left)} left" + (f" ({why})" if why else "")
                + f", {len(self.untouched)} destination tensors untouched")
        rows = [("moved", m.src, m.dst, "x".join(map(str, m.shape)) or "scalar", m.cast or "") for m in self.moved]
        rows += [("left", x.src, x.dst or "-", x.reason, "") for x in self.left]
        rows += [("tied", d, ", ".join(o), "changed through tying", "") for d, o in self.tied.items()]
        rows += [("unused", p, "-", "pattern matched no source name", "") for p in self.unused_patterns]
        shown = rows
        if len(rows) > limit:  # every left row is worth a line; moved ones are summarised
            keep_moved = max(0, limit - (len(rows) - len(self.moved)))
            shown = rows[:keep_moved] + [("moved", f"... {len(self.moved) - keep_moved} more", "", "", "")] \
                + rows[len(self.moved):]
        shown = [("", "source", "destination", "shape / reason", "")] + shown
        widths = [max(len(r[i]) for r in shown) for i in range(5)]
        lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in shown]
        return "\n".join(lines)


def _bad(what: str, expected: str, got) -> ValueError:
    return ValueError(f"transfer: {what}\n  expected: {expected}\n  got: {got}")


def pattern_regex(pattern: str) -> re.Pattern:
    """The name pattern's regex: ``*`` captures any run of characters (the shortest, left to right),
    everything else is literal.  Co-training's shared-name maps use the same rule."""
    return re.compile("(.*?)".join(re.escape(p) for p in pattern.split("*")) + r"\Z", re.DOTALL)


def substitute(match: re.Match, target: str) -> str:
    """``target`` with its ``*`` replaced, in order, by what the pattern's ``*`` captured."""
    parts = target.split("*")
    return parts[0] + "".join(g + p for g, p in zip(match.groups(), parts[1:]))


def _compile(mapping) -> list[tuple[str, re.Pattern, str]]:
    if not isinstance(mapping, Mapping) or not mapping:
        raise _bad("mapping", "a non-empty dict {source pattern: destination pattern} of strings",
                   clip(repr(mapping)) if isinstance(mapping, Mapping) else type(mapping).__name__)
    rules = []
    for s, d in mapping.items():
        if not isinstance(s, str) or not isinstance(d, str) or not s or not d:
            raise _bad("mapping", "non-empty strings on both sides, e.g. {'encoder.*': 'backbone.*'}",
                       f"{s!r}: {d!r}")
        if s.count("*") != d.count("*"):
            raise _bad(f"pattern {s!r} -> {d!r}",
                       f"as many '*' in the destination as in the source ({s.count('*')})", d.count("*"))
        rules.append((s, pattern_regex(s), d))
    return rules


def _state(module_or_dict, which: str) -> dict[str, torch.Tensor]:
    if isinstance(module_or_dict, nn.Module):  # (a module's non-tensor ``_extra_state`` is not a weight)
        return {k: v for k, v in module_or_dict.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    if which == "src" and isinstance(module_or_dict, Mapping):
        bad = [k for k, v in module_or_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise _bad("src", "a state dict of str -> tensor", f"{len(bad)} other entries, e.g. {bad[:3]}")
        return dict(module_or_dict)
    expected = "an nn.Module or a state dict" if which == "src" else "an nn.Module (copied into in place)"
    raise _bad(which, expected, type(module_or_dict).__name__)


def _key(t: torch.Tensor):
    """Tensors with one key are one tensor (tied): the same memory, shape and strides."""
    if t.numel() == 0 or t.device.type == "meta":
        return ("id", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "complex" if dtype.is_complex else \
        "float" if dtype.is_floating_point else "int"


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plan(rules, source: dict, report: "TransferReport") -> list[tuple[str, str]]:
    """(source name, destination name) for every source name a rule maps; the rest are left as unmapped."""
    used = set()
    planned: list[tuple[str, str]] = []  # (src, dst) of every mapped name
    for name in source:
        for pattern, regex, dst_pattern in rules:
            m = regex.match(name)
            if m:
                used.add(pattern)
                out = substitute(m, dst_pattern)
                planned.append((name, out))
                break
        else:
            report.left.append(Left(name, None, "unmapped"))
    report.unused_patterns = [p for p, _, _ in rules if p not in used]
    return planned


def _refuse_conflicts(planned: list[tuple[str, str]], source: dict, group_of: dict) -> None:
    """One destination name, or one tied destination tensor, fed by different source tensors: an error."""
    feeders: dict[object, dict[object, list[tuple[str, str]]]] = {}
    for s, d in planned:
        where = group_of.get(d, ("name", d))
        feeders.setdefault(where, {}).setdefault(_key(source[s]), []).append((s, d))
    conflicts = [sorted(p for pairs in by_src.values() for p in pairs)
                 for by_src in feeders.values() if len(by_src) > 1]
    if conflicts:
        lines = [", ".join(f"{s} -> {d}" for s, d in c) for c in conflicts]
        raise ValueError(f"transfer: {len(conflicts)} conflict(s), nothing was copied: different source tensors "
                         "map to one destination tensor\n  expected: at most one source tensor per destination "
                         "(tied destination names count as one)\n  got:\n    " + "\n    ".join(lines[:20]))


def _copy(copies: list[tuple[str, str]], source: dict, target: dict, group_of: dict) -> None:
    """Copy each (source, destination); a tied destination is written once.  Sources sharing memory with a
    destination are read before anything is written."""
    dst_storages = {t.untyped_storage().data_ptr() for t in target.values() if t.numel() and t.device.type != "meta"}
    with torch.no_grad():
        values = {}
        for s, _ in copies:
            a = source[s].detach()
            if a.numel() and a.device.type != "meta" and a.untyped_storage().data_ptr() in dst_storages:
                a = a.clone()
            values[s] = a
        done = set()
        for s, d in copies:
            if group_of[d] in done:
                continue  # a tied destination already written, by this same source tensor
            done.add(group_of[d])
            target[d].copy_(values[s])


def transfer(src, dst: nn.Module, mapping: Mapping[str, str], strict: bool = False) -> TransferReport:
    """Copy ``src``'s tensors (an nn.Module or a state dict) into ``dst`` (an nn.Module, in place)
    by ``mapping`` = {source pattern: destination pattern}; see the module docstring for the
    pattern rules, dtypes and tying.  Returns a ``TransferReport``.

    Errors (ValueError, raised before anything is copied): a malformed mapping; a destination
    tensor that two different source tensors map to (a conflict); with ``strict=True``,
    anything a pattern matched that cannot move (missing in destination, shape or dtype
    mismatch) or a pattern that matched nothing."""
    rules = _compile(mapping)
    source = _state(src, "src")
    target = _state(dst, "dst")

    # tied destination names: one group per tensor
    groups: dict[object, list[str]] = {}
    for name, t in target.items():
        groups.setdefault(_key(t), []).append(name)
    group_of = {name: key for key, names in groups.items() for name in names}

    report = TransferReport()
    planned = _plan(rules, source, report)
    _refuse_conflicts(planned, source, group_of)

    copies: list[tuple[str, str]] = []
    for s, d in planned:
        a = source[s]
        if d not in target:
            report.left.append(Left(s, d, "missing in destination"))
            continue
        b = target[d]
        if tuple(a.shape) != tuple(b.shape):
            report.left.append(Left(s, d, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"))
        elif _kind(a.dtype) != _kind(b.dtype):
            report.left.append(Left(s, d, f"dtype {_short(a.dtype)} vs {_short(b.dtype)}"))
        else:
            cast = None if a.dtype == b.dtype else f"{_short(a.dtype)} -> {_short(b.dtype)}"
            report.moved.append(Moved(s, d, tuple(b.shape), cast))
            copies.append((s, d))

    order = {name: i for i, name in enumerate(source)}
    report.left.sort(key=lambda x: order[x.src])  # in the source's order, whatever the reason

    if strict and not report.ok:
        problems = [f"{x.src} -> {x.dst}: {x.reason}" for x in report.failed]
        problems += [f"pattern {p!r} matched no source name" for p in report.unused_patterns]
        raise ValueError(f"transfer (strict): {len(problems)} problem(s), nothing was copied\n"
                         "  expected: every name a pattern matches moves, and every pattern matches a name\n"
                         "  got:\n    " + "\n    ".join(problems[:40]))

    written = {group_of[d] for _, d in copies}
    direct = {d for _, d in copies}
    for key in written:
        names = groups[key]
        for d in names:
            if d in direct:
                others = [n for n in names if n not in direct]
                if others:
                    report.tied[d] = others
                break
    report.untouched = [n for n in target if group_of[n] not in written]

    _copy(copies, source, target, group_of)
    return report
