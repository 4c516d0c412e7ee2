"""mergekit's ``slices``: a model whose layer stack is built from layer ranges of several models (a
frankenmerge), each output layer merged across its slice's sources with the merge method (``passthrough``:
the one source's layer as it is).

    merge_method: passthrough
    slices:
      - sources: [{model: ./a, layer_range: [0, 2]}]
      - sources: [{model: ./b, layer_range: [1, 2]}]

As mergekit builds it (``mergekit/plan.py``): ``layer_range`` is half-open, the output layers are numbered
0, 1, 2, ... across the slices in order, and every source of one slice gives the same number of layers
(layer k of the slice is merged from layer a_s + k of each source s).  The tensors outside the layer stack
come from the *first* slice's sources when they lie before it (embeddings) and from the *last* slice's when
they lie after it (the final norm, the LM head, a pooler); they are merged across those sources by the
method, with the parameters of that slice.  A parameter's gradient runs over each slice's own layers
(t = k / (L − 1), t = 1 for a one-layer slice), and the tensors outside the stack take t = 0, as in
mergekit.  The output ``config.json`` is the base model's (else the first source's) with the layer count
(``num_hidden_layers``, ``n_layer`` or ``num_layers``) set to the layers stacked, and a per-layer list
(``layer_types``) rebuilt from the slices.  Where mergekit picks that config in hash order when there is no
base model, we take the first source's.

Every source is opened and every range, layer count and hidden size checked before any tensor is read;
all problems come back in one ``MergeError`` naming the field (``slices[1].sources[0].layer_range``).
"""

from __future__ import annotations

import json
import os
import re
from itertools import chain
from pathlib import Path

from weightshare import io
from weightshare.merge.settings import layer_stack
from weightshare.merge.streaming import MergeError, merged_stream, model_view, open_model, state_dict_of, write_model

__all__ = ["merge_slices", "is_after_stack"]

# a tensor outside the layer stack lies after it when a part of its name says so (mergekit's "post weights")
_AFTER = {"norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_out", "lm_head", "pooler", "classifier",
          "score", "head"}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def is_after_stack(name: str) -> bool:
    """Whether a tensor outside the layer stack comes after it (the final norm, LM head, pooler)."""
    return any(part in _AFTER for part in name.split(".")[:-1])


def _layer(name: str, prefix: str) -> tuple[int, str] | None:
    """(layer index, rest of the name) for a tensor of the stack ``prefix``, else None."""
    m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.(.+)" if prefix else r"(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else None


def _config(model) -> dict:
    if model.root is None:
        return {}
    path = model.root / model.weights_subdir / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def merge_slices(slices, method: str = "passthrough", base=None, out: str | os.PathLike | None = None,
                 dtype: str | None = None, strict: bool = False, **params):
    """Stack the layer ranges ``slices`` names into one model, merging each output layer across its slice's
    sources with ``method``.

    ``slices``: a list of ``{"sources": [{"model": PATH, "layer_range": [a, b], "parameters": {...}}],
    "parameters": {...}, "base_model": PATH}`` (mergekit's YAML as read; ``parameters`` and ``base_model``
    optional).  ``base``: the base model for methods that use one (a slice's own ``base_model`` wins); it
    must be one of that slice's sources, as in mergekit.  ``params``: the method's parameters for every
    slice; a slice's and a source's own ``parameters`` override them.  Returns the merged state dict, or
    with ``out`` streams the model directory there (config and tokenizer files from the base, else the
    first slice's first source) and returns the path.
    """
    problems: list[str] = []
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        problems.append(f"out: {str(out)!r} exists and is not an empty directory: choose a new or empty one")
    if not isinstance(slices, (list, tuple)) or not slices:
        raise MergeError("slices\n  expected: a non-empty list of {sources: [{model, layer_range}]}")
    opened: dict = {}

    def model_of(path, where):
        key = str(path)
        if key not in opened:
            try:
                opened[key] = open_model(path, label=key)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                opened[key] = None
        return opened[key]

    plan = []  # per slice: ([(model, first, end, own parameters, field, path)], slice parameters, base, field)
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list) or not sources:
            problems.append(f"{where}: expected {{sources: [{{model, layer_range: [a, b]}}]}}")
            continue
        got = []
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or not isinstance(src.get("model"), (str, os.PathLike)):
                problems.append(f"{at}: expected {{model: PATH, layer_range: [a, b]}}")
                continue
            rng = src.get("layer_range")
            if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(isinstance(v, int) and
                                                                              not isinstance(v, bool) for v in rng)):
                problems.append(f"{at}.layer_range: expected two whole numbers [first, end) (end excluded), "
                                f"got {rng!r}")
                continue
            m = model_of(src["model"], at)
            got.append((m, int(rng[0]), int(rng[1]), dict(src.get("parameters") or {}), at, src["model"]))
        plan.append((got, dict(sl.get("parameters") or {}), sl.get("base_model", base), where))

    # each source's layer stack, its range in it, and the slices' lengths and hidden sizes
    stacks: dict[int, tuple[str | None, int]] = {}
    hidden = None
    for got, _, _, where in plan:
        lengths = set()
        for m, a, b, _, at, path in got:
            if m is None:
                continue
            if id(m) not in stacks:
                prefix = layer_stack(m.meta)
                count = 1 + max((lay[0] for n in m.meta if prefix is not None and (lay := _layer(n, prefix))),
                                default=-1)
                stacks[id(m)] = (prefix, count)
            prefix, count = stacks[id(m)]
            if prefix is None:
                problems.append(f"{at}: {path} has no layer stack (no numbered layers) to take a range of")
                continue
            if not 0 <= a < b <= count:
                problems.append(f"{at}.layer_range: [{a}, {b}] is outside {path}'s layers [0, {count}) "
                                "(the end is excluded)")
            lengths.add(b - a)
            config = _config(m)
            size = config.get("hidden_size", config.get("n_embd"))
            if size is not None:
                if hidden is None:
                    hidden = (size, at)
                elif size != hidden[0]:
                    problems.append(f"{at}: hidden size {size} ({path}), but {hidden[1]} has {hidden[0]}: "
                                    "the layers of one model cannot follow another's")
        if len(lengths) > 1:
            problems.append(f"{where}.sources: every source of a slice gives the same number of layers; "
                            f"got {sorted(lengths)}")
    if problems:
        raise MergeError(f"slices: {len(problems)} problem(s), nothing was read or written:\n  - "
                         + "\n  - ".join(problems))

    # per slice: views of its sources with the slice's local layer numbers (0 .. L-1), so that gradients
    # run over the slice, plus the tensors before the stack (first slice) and after it (last slice)
    all_entries, streams, offset = [], [], 0
    ref_model = None
    for s, (got, slice_params, base_path, where) in enumerate(plan):
        length = got[0][2] - got[0][1]
        views, params_per_source = [], []
        for m, a, b, own, at, path in got:
            prefix = stacks[id(m)][0]
            mapping = {}
            for name in m.meta:
                lay = _layer(name, prefix)
                if lay is not None:
                    if a <= lay[0] < b:
                        mapping[f"{prefix + '.' if prefix else ''}{lay[0] - a}.{lay[1]}"] = name
                elif (s == 0 and not is_after_stack(name)) or (s == len(plan) - 1 and is_after_stack(name)):
                    mapping[name] = name
            views.append(model_view(m, mapping, f"{path} layers [{a}, {b})"))
            params_per_source.append(own)
        base_view = None
        if base_path is not None and _method_uses_base(method):
            hit = [k for k, (_, _, _, _, _, path) in enumerate(got) if str(path) == str(base_path)]
            if not hit:
                raise MergeError(f"{where}: base_model {base_path} is not one of this slice's sources "
                                 "(mergekit takes a slice's base from its sources)")
            base_view = views.pop(hit[0])
            params_per_source.pop(hit[0])
        # a source's own value, else the slice's, else the global one (a gradient is one value, per source)
        kwargs = {**params, **slice_params}
        for k, default in _model_params(method).items():
            if k in kwargs or any(k in p for p in params_per_source):
                values = [p.get(k, kwargs.get(k)) for p in params_per_source]
                kwargs[k] = [default if v is None else v for v in values]
        if "weight" in kwargs:
            kwargs["weights"] = kwargs.pop("weight")
        try:
            ref, entries, tensors = merged_stream(views, method, base=base_view, dtype=dtype, strict=strict, **kwargs)
        except MergeError as exc:
            raise MergeError(f"{where}: {exc}") from None
        if ref_model is None:
            ref_model = got[0][0] if base_view is None else opened[str(base_path)]
        prefix = stacks[id(got[0][0])][0]
        renamed = []
        for name, shape, dt in entries:
            lay = _layer(name, prefix)
            renamed.append((f"{prefix + '.' if prefix else ''}{lay[0] + offset}.{lay[1]}" if lay else name, shape, dt))
        all_entries += renamed
        streams.append(tensors)
        offset += length
    if out is None:
        return state_dict_of(all_entries, chain(*streams))
    with io.staged_dir(out) as tmp:
        write_model(tmp, ref_model, all_entries, chain(*streams))
        _set_layers(tmp / ref_model.weights_subdir / "config.json", plan)
        (tmp / "mergekit_config.yml").write_text(_describe(slices, method, base, params, dtype))
    return Path(out)


def _method_uses_base(method: str) -> bool:
    from weightshare.merge.registry import get_method

    return get_method(method).uses_base


def _model_params(method: str) -> dict:
    from weightshare.merge.registry import get_method

    return get_method(method).model_params


def _set_layers(path: Path, plan) -> None:
    """The stacked layer count in ``config.json``, and a per-layer list rebuilt from the slices."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    total = sum(got[0][2] - got[0][1] for got, *_ in plan)
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            config[key] = total
    types = config.get("layer_types")
    if isinstance(types, list):
        config["layer_types"] = [types[i] if i < len(types) else types[-1]
                                 for got, *_ in plan for i in range(got[0][1], got[0][2])]
    path.write_text(json.dumps(config, indent=2) + "\n")


def _describe(slices, method, base, params, dtype) -> str:
    import yaml

    config = {"merge_method": method, **({"base_model": str(base)} if base is not None else {}),
              "slices": [{**sl, "sources": [{**src, "model": str(src["model"])} for src in sl["sources"]]}
                         for sl in slices],
              **({"parameters": params} if params else {}), **({"dtype": dtype} if dtype else {})}
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
