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

Each method declares its parameters where it registers, as mergekit's
``ConfigParameterDef(name, required, default)`` does, with the rule a value must
satisfy::

    @register_merge("linear", source=..., elementwise=True,
                    parameters=(Param("weight", 1.0, per_model=True, rule=FINITE), Param("normalize", True)))
    def linear(tensors, base, *, name, weight, normalize=True): ...

``check_params`` checks every call against the declarations alone: it knows no
parameter by name.  A rule that ties parameters together is the method's ``check``
(DELLA: density ± epsilon must be probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from weightshare.errors import clip
from weightshare.merge import settings

__all__ = ["MergeMethod", "MERGE_METHODS", "Param", "Rule", "FINITE", "interval", "is_number", "register_merge",
           "get_method", "check_params", "per_model", "row_length"]


def is_number(value) -> bool:
    """An int or float from a config, not a bool (YAML's true is an int to Python, but no density)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What makes one value of a parameter valid: ``ok(value)``, and the rule in words for the
    message (``says="in (0, 1]"`` gives "density must be in (0, 1]; got 1.5")."""
    ok: Callable[[Any], bool]
    says: str


def interval(text: str) -> Rule:
    """Numbers in an interval written as in mathematics: ``interval("(0, 1]")`` accepts 0 < x <= 1."""
    if len(text) < 5 or text[0] not in "([" or text[-1] not in ")]" or text.count(",") != 1:
        raise ValueError(f"interval\n  expected: an interval such as '(0, 1]'\n  got: {text!r}")
    lo, hi = (float(bound) for bound in text[1:-1].split(","))
    lo_open, hi_open = text[0] == "(", text[-1] == ")"

    def ok(x) -> bool:
        return is_number(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)

    return Rule(ok, f"in {text}")


FINITE = Rule(lambda w: is_number(w) and w == w and abs(w) != float("inf"), "a finite number")


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, declared where the method registers."""
    name: str
    default: Any = None
    required: bool = False  # no default: the caller must give it (mergekit's ``required=True``)
    per_model: bool = False  # one value per model (weight, density), not one for the whole merge (scale)
    rule: Rule | None = None  # every value it can take (settings.py) is checked before any tensor is read


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable
    source: str  # the paper, and whose defaults it follows (mergekit's, where mergekit has the method)
    needs_base: bool = False
    parameters: tuple[Param, ...] = ()  # every parameter it takes, declared at registration
    models: tuple[int, int | None] = (1, None)  # (least, most) number of models, the base not counted
    tensorwise: bool = True
    elementwise: bool = False  # each output entry depends on the same entry of the inputs only: merged in chunks
    # prepare(read, numel, *, name, shape, **params) -> extra keyword arguments that make fn element-wise on
    # a large tensor (or None: merge it whole): read() iterates (model pieces, base piece) over the tensor, a
    # piece at a time, in order; fn is then called on each piece with them and span=(start, stop), the
    # piece's flat entries, since what a piece merges to can depend on where it lies (a mask, a row)
    prepare: Callable | None = None
    rows: bool = False  # a prepared method whose pieces must hold whole rows (the tensor as (shape[0], -1))
    # check(values) -> problems: a rule on several parameters together; values holds, per parameter given,
    # every distinct value it can take (DELLA: each density ± each epsilon must lie in (0, 1))
    check: Callable[[dict[str, list]], list[str]] | None = None
    # for a method whose models are the ends of an interpolation (slerp), the end mergekit's base_model
    # names ("the t = 0 end"): a config's base_model is then the first model, not a base
    base_endpoint: str = ""
    # a base is optional: given, the method works on task vectors θ_i − base (nuslerp, multislerp)
    takes_base: bool = False
    # mergekit appends a config's base_model to the models when the method takes no base: for a method
    # that merges it as one more model (karcher), a config's base_model is that last model
    base_as_model: bool = False

    @property
    def uses_base(self) -> bool:
        """Whether a base given to the method is used at all (as the base of task vectors)."""
        return self.needs_base or self.takes_base

    @property
    def model_params(self) -> dict[str, Any]:
        """Per-model parameter -> default."""
        return {p.name: p.default for p in self.parameters if p.per_model}

    @property
    def params(self) -> dict[str, Any]:
        """Global parameter -> default (``None`` for a required one)."""
        return {p.name: p.default for p in self.parameters if not p.per_model}

    @property
    def required(self) -> list[str]:
        return [p.name for p in self.parameters if p.required]


MERGE_METHODS: dict[str, MergeMethod] = {}


def row_length(shape) -> int:
    """Entries per row of a tensor seen as (shape[0], -1); a 1-D tensor is one row.  A method
    registered with ``rows`` gets pieces of whole rows."""
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel if len(shape) < 2 or not shape[0] else numel // int(shape[0])


def register_merge(name: str, *, source: str, parameters: tuple[Param, ...] = (), needs_base: bool = False,
                   models: tuple[int, int | None] = (1, None), tensorwise: bool = True, elementwise: bool = False,
                   prepare: Callable | None = None, rows: bool = False,
                   check: Callable[[dict[str, list]], list[str]] | None = None, base_endpoint: str = "",
                   takes_base: bool = False, base_as_model: bool = False):
    """Decorator registering ``fn`` as the merge method ``name`` (see the module for ``fn``'s contract)."""
    names = [p.name for p in parameters]
    if len(set(names)) != len(names):
        raise ValueError(f"register_merge({name!r}): parameters\n  expected: each name once\n  got: {names}")
    if base_endpoint and models[0] != models[1]:
        raise ValueError(f"register_merge({name!r}): base_endpoint\n  expected: a fixed number of models "
                         f"(models=(n, n)), one of them the base_model end\n  got: models={models}")

    def wrap(fn):
        MERGE_METHODS[name] = MergeMethod(name, fn, source, needs_base, tuple(parameters), models, tensorwise,
                                          elementwise, prepare, rows, check, base_endpoint, takes_base, base_as_model)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    import weightshare.merge.methods  # noqa: F401  (importing the package registers every method)

    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method\n  expected one of: {', '.join(sorted(MERGE_METHODS))}\n"
                         f"  got: {name!r}")
    return MERGE_METHODS[name]


def per_model(method: str, key: str, values, n: int, default) -> list[float]:
    """Per-model parameter ``key`` as ``n`` floats (``default`` for each when not given)."""
    if values is None:
        return [float(default)] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{method}: {key}\n  expected: one value per model ({n})\n  got: {len(values)} values")
    if any(not is_number(v) for v in values):
        raise ValueError(clip(f"{method}: {key}\n  expected: numbers\n  got: {values!r}"))
    return [float(v) for v in values]


def check_params(method: MergeMethod, n_models: int, has_base: bool, model_params: dict[str, list],
                 params: dict[str, Any]) -> list[str]:
    """Every problem with a method's arguments, as messages (empty: all good), from its declared
    parameters.  Per-model values come as lists (one per model); unknown names are refused by
    name, never ignored."""
    problems = _names_and_counts(method, n_models, has_base, model_params, params)
    values = _values(method, model_params, params, problems)
    # each out-of-range value once, saying where it was given (density[1]: the second model's)
    for p in method.parameters:
        for v, wheres in values.get(p.name, {}).items():
            if p.rule is not None and not p.rule.ok(v):
                given = ", ".join(dict.fromkeys(wheres))
                problems.append(f"{p.name} must be {p.rule.says}; got {v!r} (in {given})" if given != p.name else
                                f"{p.name} must be {p.rule.says}; got {v!r}")
    if method.check is not None:
        problems += method.check({k: list(by_value) for k, by_value in values.items()})
    return problems


def _names_and_counts(method: MergeMethod, n_models: int, has_base: bool, model_params: dict[str, list],
                      params: dict[str, Any]) -> list[str]:
    """The problems of a call's shape: how many models, a base, and which parameters, how many values."""
    problems = []
    lo, hi = method.models
    if n_models < lo or (hi is not None and n_models > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        problems.append(f"{method.name} merges {want} models (the base not counted); got {n_models}")
    if method.needs_base and not has_base:
        problems.append(f"{method.name} needs a base model (base=...): its task vectors are θ_i − base")
    if has_base and not method.uses_base:
        problems.append(f"{method.name} takes no base model (base=...): it would not be used; "
                        "pass it as one of the models to merge it in, or leave it out")
    for key, values in model_params.items():
        if key not in method.model_params:
            problems.append(f"{method.name} has no per-model parameter {key!r} "
                            f"(it has: {', '.join(sorted(method.model_params)) or 'none'})")
        elif len(values) != n_models:
            problems.append(f"{key}: {len(values)} values for {n_models} models")
    for key in method.required:
        if (model_params if key in method.model_params else params).get(key) is None:
            problems.append(f"{method.name} needs the parameter {key!r}")
    for key in params:
        if key not in method.params:
            problems.append(f"{method.name} has no parameter {key!r} "
                            f"(it has: {', '.join(sorted(method.params)) or 'none'})")
    return problems


def _values(method: MergeMethod, model_params: dict[str, list], params: dict[str, Any],
            problems: list[str]) -> dict[str, dict[Any, list[str]]]:
    """Per parameter given, every distinct value it can take -> where it was given (``density[1]``):
    a value may vary by tensor (settings.py), so its shape is checked (into ``problems``) and then
    each of its leaves is a value."""
    if method.tensorwise:
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
    named: dict[str, dict] = {}
    for k, pairs in shaped.items():
        for where, v in pairs:
            named.setdefault(k, {}).setdefault(v, []).append(where)
    return named
