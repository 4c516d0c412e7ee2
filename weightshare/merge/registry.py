"""The one registry of merge methods: each file in ``weightshare/merge/methods/`` registers one method.

A *tensorwise* method merges one tensor at a time, so a merge streams through
checkpoints without holding a whole model:

    fn(tensors, base, *, name, **params) -> tensor

``tensors`` are the models' float32 tensors of one name (same shape), ``base``
the base model's (or ``None``), ``name`` the tensor's name (methods that draw
random masks seed from it, so a result never depends on tensor order), and
``params`` holds every global parameter and, for each per-model parameter, a
list with one value per model.  A method that needs whole models (greedy soup)
is registered with ``tensorwise=False`` and ``fn(state_dicts, **params) -> state_dict``.
An *elementwise* method (each output entry a function of the same entry of the
inputs: linear, task arithmetic) is called on flat chunks of large tensors, so
its merge holds a few megabytes per input whatever the tensors' size.
A method with ``prepare`` first gathers its whole-tensor statistics from pieces
(TIES: the trim thresholds; DARE: the L1 norms of its rescale; slerp: the angle;
model stock: the cosines) and is then element-wise too: ``fn`` is called on each
piece with the keyword arguments ``prepare`` returned and ``span=(start, stop)``,
the piece's place in the flattened tensor (DARE draws the mask entries of that
span, model stock finds the rows they belong to).  With ``rows=True`` the pieces
hold whole rows (DELLA ranks within a row).  ``prepare`` may return ``None`` to
have the tensor merged whole (TSV-Merge and Iso-C, whose SVD needs a changed
matrix whole).  A parameter's value may vary by tensor (``settings.py``): ``fn``
and ``prepare`` always get the values resolved for the tensor at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from weightshare.merge import settings

__all__ = ["MergeMethod", "MERGE_METHODS", "register_merge", "get_method", "check_params", "row_length"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable
    source: str  # the paper, and whose defaults it follows (mergekit's, where mergekit has the method)
    needs_base: bool = False
    model_params: dict[str, Any] = field(default_factory=dict)  # per-model parameter -> default
    params: dict[str, Any] = field(default_factory=dict)  # global parameter -> default (None: required)
    models: tuple[int, int | None] = (1, None)  # (least, most) number of models, the base not counted
    tensorwise: bool = True
    elementwise: bool = False  # each output entry depends on the same entry of the inputs only: merged in chunks
    # prepare(read, numel, *, name, shape, **params) -> extra keyword arguments that make fn element-wise on
    # a large tensor (or None: merge it whole): read() iterates (model pieces, base piece) over the tensor, a
    # piece at a time, in order; fn is then called on each piece with them and span=(start, stop), the
    # piece's flat entries, since what a piece merges to can depend on where it lies (a mask, a row)
    prepare: Callable | None = None
    rows: bool = False  # a prepared method whose pieces must hold whole rows (the tensor as (shape[0], -1))


MERGE_METHODS: dict[str, MergeMethod] = {}


def row_length(shape) -> int:
    """Entries per row of a tensor seen as (shape[0], -1); a 1-D tensor is one row.  A method
    registered with ``rows`` gets pieces of whole rows."""
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel if len(shape) < 2 or not shape[0] else numel // int(shape[0])


def register_merge(name: str, *, source: str, needs_base: bool = False, model_params: dict | None = None,
                   params: dict | None = None, models: tuple[int, int | None] = (1, None), tensorwise: bool = True,
                   elementwise: bool = False, prepare: Callable | None = None, rows: bool = False):
    def wrap(fn):
        MERGE_METHODS[name] = MergeMethod(name, fn, source, needs_base, dict(model_params or {}), dict(params or {}),
                                          models, tensorwise, elementwise, prepare, rows)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    import weightshare.merge.methods  # noqa: F401  (importing the package registers every method)

    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method\n  expected one of: {', '.join(sorted(MERGE_METHODS))}\n  got: {name!r}")
    return MERGE_METHODS[name]


def _number(v) -> bool:
    """An int or float from a config, not a bool (YAML's true is an int to Python, but no density)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_params(method: MergeMethod, n_models: int, has_base: bool, model_params: dict[str, list],
                 params: dict[str, Any]) -> list[str]:
    """Every problem with a method's arguments, as messages (empty: all good).  Per-model values
    come as lists (one per model); unknown names are refused by name, never ignored."""
    problems = []
    lo, hi = method.models
    if n_models < lo or (hi is not None and n_models > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        problems.append(f"{method.name} merges {want} models (the base not counted); got {n_models}")
    if method.needs_base and not has_base:
        problems.append(f"{method.name} needs a base model (base=...): its task vectors are θ_i − base")
    for key, values in model_params.items():
        if key not in method.model_params:
            problems.append(f"{method.name} has no per-model parameter {key!r} "
                            f"(it has: {', '.join(sorted(method.model_params)) or 'none'})")
        elif len(values) != n_models:
            problems.append(f"{key}: {len(values)} values for {n_models} models")
    for key, default in method.params.items():
        if default is None and params.get(key) is None:  # a default of None marks a required parameter
            problems.append(f"{method.name} needs the parameter {key!r}")
    for key in params:
        if key not in method.params:
            problems.append(f"{method.name} has no parameter {key!r} (it has: {', '.join(sorted(method.params)) or 'none'})")
    if method.tensorwise:  # a value may vary by tensor (settings.py): check its shape, then every value it can take
        defaults = {**method.model_params, **method.params}
        shaped = {}
        for key, values in [*((k, v) for k, v in model_params.items()), *((k, [v]) for k, v in params.items())]:
            ok = settings.gradient_ok(defaults.get(key))
            where = [f"{key}[{i}]" if key in model_params else key for i in range(len(values))]
            found = [p for w, v in zip(where, values) if v is not None for p in settings.problems(v, w, ok)]
            problems += found
            if not found:
                shaped[key] = [(w, leaf) for w, v in zip(where, values) for leaf in settings.leaves(v)]
    else:
        shaped = {k: [(f"{k}[{i}]", v) for i, v in enumerate(vs)] for k, vs in model_params.items()}
    # each out-of-range value once, saying where it was given (density[1]: the second model's)
    named: dict[str, dict] = {}
    for k, pairs in shaped.items():
        for where, v in pairs:
            named.setdefault(k, {}).setdefault(v, []).append(where)
    shaped = {k: list(by_value) for k, by_value in named.items()}

    def out_of_range(key: str, ok, rule: str) -> None:
        for v, wheres in named.get(key, {}).items():
            if not ok(v):
                given = ", ".join(dict.fromkeys(wheres))
                problems.append(f"{key} must be {rule}; got {v!r} (in {given})" if given != key else
                                f"{key} must be {rule}; got {v!r}")

    out_of_range("density", lambda d: _number(d) and 0 < d <= 1, "in (0, 1]")
    epsilons = shaped.get("epsilon", [])
    out_of_range("epsilon", lambda e: _number(e) and 0 <= e < 1, "in [0, 1)")
    # DELLA's keep probabilities, density ± epsilon, must be probabilities: every density a setting
    # can give with every epsilon (a stricter check than per tensor, never a looser one)
    bad = {(d, e) for d in shaped.get("density", []) for e in epsilons
           if _number(d) and _number(e) and 0 < d < 1 and 0 <= e < 1
           and not (0 < d - e and d + e < 1)}
    for d, e in sorted(bad):
        problems.append(f"density ± epsilon must lie in (0, 1); got density {d!r} with epsilon {e!r}")
    out_of_range("gamma", lambda g: _number(g) and 0 <= g < 1, "in [0, 1)")
    out_of_range("weight", lambda w: _number(w) and w == w and abs(w) != float("inf"), "a finite number")
    return problems
