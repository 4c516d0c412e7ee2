"""Parameter values that vary by tensor: mergekit's *gradients* and *filters*.

Besides a number or true/false, a merge parameter may be

- a **gradient**, a list of numbers: anchors spread evenly over the layer stack,
  read at the tensor's depth ``t`` by linear interpolation (``[0, 1]`` goes from
  0 at the first layer to 1 at the last);
- a list of **conditions** ``{filter: TEXT, value: SETTING}``: the first whose
  ``filter`` occurs in the tensor's name (or that has no filter, or ``"*"``) gives
  the value, itself a number, a gradient or conditions.  When none matches, the
  model's parameter falls back to the global one, then to the method's default.

as in mergekit's configs, e.g. its usual SLERP::

    t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]

A tensor's depth comes from its name, since a merge reads checkpoints, not
modules: the layer stack is the name prefix followed by the most distinct
integers (``encoder.layer.<i>``, ``model.layers.<i>``, ``transformer.h.<i>``, or
``<i>`` in an ``nn.Sequential``), and layer ``i`` of ``N`` lies at ``t = i / (N − 1)``
(``t = 1`` for a single layer).  Tensors outside the stack (embeddings, final
norms, heads) lie at ``t = 0``, as mergekit places its pre- and post-layer weights.
Every setting is checked, and resolved for every tensor, before any tensor is read.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

from weightshare.errors import clip

__all__ = ["is_scalar", "is_conditions", "gradient_ok", "problems", "resolve", "leaves", "layer_positions",
           "per_tensor", "unmatched_filters"]

MAX_ANCHORS = 4096  # a gradient longer than any layer stack is a mistake, not a setting
MAX_DEPTH = 8  # conditions nest at most this deep
_CONDITION_KEYS = {"filter", "value"}


def is_scalar(value) -> bool:
    return isinstance(value, (bool, int, float))


def is_conditions(value) -> bool:
    """A non-empty list of ``{filter, value}`` conditions (as opposed to a gradient or one value per model)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def gradient_ok(default) -> bool:
    """Whether a parameter with this default may take a gradient: not a switch or an integer
    (``normalize``, ``seed``), whose values in between mean nothing."""
    return not isinstance(default, (bool, int))


def problems(value, where: str, gradient_ok: bool = True, depth: int = 0) -> list[str]:
    """What is wrong with a setting's structure (empty: it is one).  ``gradient_ok=False`` for
    parameters that are true/false or integers (``normalize``, ``seed``): no gradient of them."""
    if is_scalar(value):
        return []
    if depth >= MAX_DEPTH:
        return [f"{where}: conditions nested deeper than {MAX_DEPTH}"]
    if not isinstance(value, (list, tuple)) or not value:
        return [clip(f"{where}: {value!r} is not a number, true/false, a gradient (list of numbers) or a list of "
                     "{filter, value} conditions")]
    if all(_is_number(v) for v in value):
        if not gradient_ok:
            return [clip(f"{where}: a gradient {list(value)!r} for a parameter that is true/false or an integer")]
        if len(value) > MAX_ANCHORS:
            return [f"{where}: a gradient of {len(value)} anchors (at most {MAX_ANCHORS})"]
        return []
    if not all(isinstance(v, dict) for v in value):
        return [clip(f"{where}: a list must hold only numbers (a gradient) or only {{filter, value}} conditions; "
                     f"got {list(value)!r}")]
    found = []
    for i, cond in enumerate(value):
        here = f"{where}[{i}]"
        extra = sorted(map(str, set(cond) - _CONDITION_KEYS))
        if extra:
            found.append(f"{here}: unknown keys {extra} (a condition has filter and value)")
        if "value" not in cond or cond["value"] is None:
            found.append(f"{here}: a condition needs a value")
        else:
            found += problems(cond["value"], f"{here}.value", gradient_ok, depth + 1)
        f = cond.get("filter")
        if f is not None and not isinstance(f, str):
            found.append(clip(f"{here}.filter: {f!r} is not text (a part of tensor names)"))
    return found


def resolve(value, name: str, t: float):
    """The setting's value for tensor ``name`` at depth ``t`` in [0, 1]; ``None`` when no condition matches."""
    if is_scalar(value):
        return value
    if all(_is_number(v) for v in value):
        at = t * (len(value) - 1)
        i = min(int(at), len(value) - 1)
        j = min(i + 1, len(value) - 1)
        frac = at - i
        return (1 - frac) * value[i] + frac * value[j]
    for cond in value:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return resolve(cond["value"], name, t)
    return None


def unmatched_filters(value, names, where: str) -> list[str]:
    """The conditions of a setting whose ``filter`` occurs in none of ``names``: almost always a filter written
    for another architecture (``self_attn`` on a BERT), which mergekit silently skips."""
    if is_scalar(value) or value is None or not is_conditions(value):
        return []
    found = []
    for i, cond in enumerate(value):
        f = cond.get("filter")
        if f is not None and f != "*" and not any(f in n for n in names):
            found.append(f"{where}[{i}].filter {f!r} matches no tensor name (e.g. {next(iter(names), '')!r})")
        found += unmatched_filters(cond.get("value"), names, f"{where}[{i}].value")
    return found


def leaves(value) -> Iterator[Any]:
    """Every number or true/false a setting can give (the anchors of its gradients)."""
    if is_scalar(value) or value is None:
        yield value
    elif all(_is_number(v) for v in value):
        yield from value
    else:
        for cond in value:
            yield from leaves(cond.get("value"))


def _numbered(names) -> tuple[dict[str, set[int]], dict[str, tuple[str, int]]]:
    """(prefix -> the integers after it, name -> (prefix, its integer)): each name's first numbered part."""
    numbered: dict[str, set[int]] = defaultdict(set)
    where = {}
    for name in names:
        parts = name.split(".")
        for k, part in enumerate(parts[:-1]):
            if part.isdigit():
                prefix = ".".join(parts[:k])
                numbered[prefix].add(int(part))
                where[name] = (prefix, int(part))
                break
    return numbered, where


def layer_stack(names) -> str | None:
    """The layer stack's prefix: the one before the most distinct integers (``encoder.layer``, ``model.layers``,
    ``""`` in an ``nn.Sequential``); None when no name is numbered."""
    numbered, _ = _numbered(names)
    return max(sorted(numbered), key=lambda p: len(numbered[p])) if numbered else None


def layer_positions(names) -> dict[str, float]:
    """Each tensor's depth in [0, 1]: its layer's place in the stack, 0 outside it (see the module)."""
    numbered, where = _numbered(names)
    if not numbered:
        return {name: 0.0 for name in names}
    stack = layer_stack(names)
    last = max(numbered[stack])
    out = {}
    for name in names:
        prefix, index = where.get(name, (None, 0))
        out[name] = (1.0 if last == 0 else index / last) if prefix == stack else 0.0
    return out


def per_tensor(names, defaults: dict, model_defaults: dict, params: dict, model_params: dict[str, list]):
    """Every tensor's own parameters ({name: {param: value}}, per-model ones as lists) and the problems
    found resolving them (a required parameter no condition gives).  ``None`` when every parameter is
    one number for all tensors."""
    if all(is_scalar(v) or v is None for v in params.values()) and \
            all(is_scalar(v) or v is None for values in model_params.values() for v in values):
        return None, []
    positions = layer_positions(names)
    out, found = {}, []
    for name in names:
        t = positions[name]
        resolved = {}
        for key, default in defaults.items():
            v = params.get(key)
            v = default if v is None else resolve(v, name, t)
            if v is None:
                v = default
            if v is None:
                found.append(f"{key}: no value for tensor {name!r} (no condition matches it, and there is no default)")
            resolved[key] = v
        for key, default in model_defaults.items():
            values = model_params.get(key)
            if values is None:
                continue
            resolved[key] = [default if v is None else (r if (r := resolve(v, name, t)) is not None else default)
                             for v in values]
        out[name] = resolved
    return out, found
