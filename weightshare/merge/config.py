"""mergekit's YAML, read and checked before any tensor is: ``weightshare merge CONFIG --out DIR``.

A config for a method we have runs unchanged::

    merge_method: ties
    base_model: ./pretrained
    models:
      - model: ./ft-a
        parameters: {weight: 1.0, density: 0.2}
      - model: ./ft-b
        parameters: {weight: 1.0, density: 0.2}
    parameters: {lambda: 1.0, normalize: true}
    dtype: float16

mergekit's ``lambda`` is ``scale`` here (``lambda`` is a Python keyword); for
``slerp`` the ``base_model`` is the t = 0 end, as in mergekit (a method registered with a
``base_endpoint``).  A parameter may vary by tensor, with mergekit's gradients over the
layers and ``filter`` conditions on tensor names (``settings.py``)::

    merge_method: slerp
    base_model: ./ft-a
    models: [{model: ./ft-a}, {model: ./ft-b}]
    parameters:
      t:
        - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
        - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
        - {value: 0.5}

``slices`` (layer ranges of several models stacked: ``weightshare/merge/slices.py``) replace
``models`` for a frankenmerge; ``tokenizer_source`` (``base``, ``union`` or a model) merges models
whose vocabularies differ (``weightshare/merge/tokenizer.py``).  Keys we do not support are refused
by name, never ignored.
``int8_mask`` only changes how mergekit stores masks in memory and is accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

from weightshare._yaml import read_yaml
from weightshare.errors import clip
from weightshare.merge import settings
from weightshare.merge.registry import get_method
from weightshare.merge.streaming import OUT_DTYPES, MergeError, merge

__all__ = ["read_config", "merge_from_config"]

_TOP = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "int8_mask",
        "tokenizer_source"}
_RENAMED = {"lambda": "scale"}
_STORAGE_ONLY = {"int8_mask"}  # no effect on the numbers
_COUNTS = {2: "two", 3: "three"}  # a model count in words, as the messages say it


def _fall_back(own, everyone):
    """A model's setting, falling back to the global one: as in mergekit, where a model's conditions
    match no tensor name, the global parameter's value applies."""
    if own is None:
        return everyone
    if everyone is None or not settings.is_conditions(own):
        return own
    return [*own, {"value": everyone}]


def _place_base(method, base: str | None, entries: list, problems: list[str]) -> tuple[str | None, list]:
    """(base, model entries) as ``merge`` takes them, from mergekit's ``base_model``, never dropped:

    - a method with a ``base_endpoint`` (slerp): the base is one end, the first model;
    - a method that uses a base (task vectors: TIES; optional: nuslerp): the base, and listed among the
      models, not one of them;
    - a method that takes none: listed among the models it is merged as one of them (mergekit's linear);
      otherwise mergekit appends it to the models, which we follow where the method merges it as a model
      (``base_as_model``: karcher) and refuse where mergekit would fail or ignore it (linear: the
      appended base has no weight)."""
    paths = [m for m, _ in entries]
    if method is not None and method.base_endpoint:
        count = method.models[0]
        if base is None or base not in paths or len(paths) != count:
            problems.append(f"{method.name}: expected {_COUNTS.get(count, count)} models, one of them named as "
                            f"base_model ({method.base_endpoint})")
            return base, entries
        return None, sorted(entries, key=lambda e: e[0] != base)
    if method is not None and not method.uses_base:
        if base is None or base in paths:
            return None, entries
        if method.base_as_model:
            return None, [*entries, (base, {})]
        problems.append(f"base_model: {method.name} takes no base model, so {base} would not be merged; "
                        "list it under models to merge it in, or remove base_model")
        return None, entries
    if base is not None and base in paths:
        return base, [e for e in entries if e[0] != base]
    return base, entries


def read_config(path: str | os.PathLike) -> dict:
    """The merge a config asks for, as ``merge`` keyword arguments; every problem in one ``MergeError``."""
    path = Path(path)
    raw = read_yaml(path, "merge config", MergeError)
    if not isinstance(raw, dict):
        raise MergeError(f"{path}\n  expected: a mapping with merge_method and models\n  got: {type(raw).__name__}")
    problems = [f"unsupported key {k!r} (supported: {', '.join(sorted(_TOP))})" for k in raw if k not in _TOP]
    method_name = raw.get("merge_method")
    method = None
    if not isinstance(method_name, str):
        problems.append("merge_method: missing (or not a name)")
    else:
        try:
            method = get_method(method_name)
        except ValueError as exc:
            problems.append(str(exc).replace("\n", " "))
    if method is not None and not method.tensorwise:
        problems.append(f"merge_method {method_name}: needs an evaluation function, so it runs from Python only")

    def params_of(block, where: str, allowed: dict) -> dict:
        out = {}
        if block is None:
            return out
        if not isinstance(block, dict):
            problems.append(f"{where}: expected a mapping of parameters, got {type(block).__name__}")
            return out
        for key, value in block.items():
            name = _RENAMED.get(key, key)
            if key in _STORAGE_ONLY:
                continue
            shape = settings.problems(value, f"{where}.{key}", settings.gradient_ok(allowed.get(name)))
            if shape:
                problems.extend(shape)
            elif method is not None and name not in allowed:
                problems.append(f"{where}.{key}: {method_name} has no such parameter "
                                f"(it has: {', '.join(sorted(allowed)) or 'none'})")
            else:
                out[name] = value
        return out

    if "slices" in raw and "models" in raw:
        problems.append("models and slices: a config has one or the other")
    elif "slices" in raw:  # a frankenmerge (slices.py): layer ranges stacked, merged slice by slice
        return _read_slices(raw, path, method, problems, params_of)
    models = raw.get("models")
    entries = []
    if not isinstance(models, list) or not models:
        problems.append("models: expected a non-empty list of {model: PATH, parameters: {...}} "
                        "(or slices: for a frankenmerge)")
        models = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            problems.append(clip(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}"))
            continue
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            problems.append(f"models[{i}]: unsupported keys {extra}")
        per = params_of(entry.get("parameters"), f"models[{i}].parameters", method.model_params if method else {})
        entries.append((entry["model"], per))
    glob = params_of(raw.get("parameters"), "parameters", {**(method.params if method else {}),
                                                              **(method.model_params if method else {})})
    base, dtype = _base_and_dtype(raw, problems)
    base, entries = _place_base(method, base, entries, problems)
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        problems.append(clip(f"tokenizer_source: expected base, union or a model's path, got {tokenizer_source!r}"))
    if problems:
        raise MergeError(f"{path}: {len(problems)} problem(s), nothing was read:\n  - " + "\n  - ".join(problems))
    kwargs: dict = {"models": [m for m, _ in entries], "method": method_name, "base": base, "dtype": dtype,
                    **({"tokenizer_source": tokenizer_source} if tokenizer_source is not None else {})}
    # a per-model parameter given globally applies to every model that does not set its own
    for key in method.model_params:
        values = [_fall_back(per.get(key), glob.get(key)) for _, per in entries]
        if any(v is not None for v in values):
            default = method.model_params[key]
            kwargs["weights" if key == "weight" else key] = [default if v is None else v for v in values]
    kwargs.update({k: v for k, v in glob.items() if k in method.params})
    return kwargs


def _base_and_dtype(raw: dict, problems: list[str]) -> tuple:
    """The config's ``base_model`` and output dtype (``out_dtype``, else ``dtype``), each checked."""
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        problems.append(clip(f"base_model: expected a path, got {base!r}"))
    dtype = raw.get("out_dtype", raw.get("dtype"))
    if dtype is not None and dtype not in OUT_DTYPES:
        problems.append(f"dtype: {dtype!r}, expected one of {', '.join(OUT_DTYPES)}")
    return base, dtype


def _entry(value, where: str, keys: tuple[str, ...], shape: str, problems: list[str]) -> bool:
    """Whether a slice or source entry is a mapping with its first key (``sources``, ``model``) of the right
    kind; its unknown keys are problems, named."""
    first = value.get(keys[0]) if isinstance(value, dict) else None
    if not (isinstance(first, list) if keys[0] == "sources" else isinstance(first, str)):
        problems.append(clip(f"{where}: expected {shape}, got {value!r}"))
        return False
    extra = [k for k in value if k not in keys]
    if extra:
        problems.append(f"{where}: unsupported keys {extra}")
    return True


def _read_slices(raw: dict, path: Path, method, problems: list[str], params_of) -> dict:
    """A config with ``slices`` (``weightshare/merge/slices.py``), as ``merge_slices`` keyword arguments."""
    slices = raw["slices"]
    if not isinstance(slices, list) or not slices:
        problems.append("slices: expected a non-empty list of {sources: [{model: PATH, layer_range: [a, b]}]}")
        slices = []
    allowed = {**(method.params if method else {}), **(method.model_params if method else {})}
    out = []
    source_shape = "{model: PATH, layer_range: [a, b]}"
    for i, sl in enumerate(slices):
        if not _entry(sl, f"slices[{i}]", ("sources", "parameters", "base_model"), f"{{sources: [{source_shape}]}}",
                      problems):
            continue
        sources = []
        for j, src in enumerate(sl["sources"]):
            if not _entry(src, f"slices[{i}].sources[{j}]", ("model", "layer_range", "parameters"), source_shape,
                          problems):
                continue
            sources.append({"model": src["model"], "layer_range": src.get("layer_range"),
                            "parameters": params_of(src.get("parameters"), f"slices[{i}].sources[{j}].parameters",
                                                    allowed)})
        out.append({"sources": sources, "parameters": params_of(sl.get("parameters"), f"slices[{i}].parameters",
                                                                allowed),
                    **({"base_model": sl["base_model"]} if "base_model" in sl else {})})
    base, dtype = _base_and_dtype(raw, problems)
    glob = params_of(raw.get("parameters"), "parameters", allowed)
    if problems:
        raise MergeError(f"{path}: {len(problems)} problem(s), nothing was read:\n  - " + "\n  - ".join(problems))
    return {"slices": out, "method": raw["merge_method"], "base": base, "dtype": dtype, **glob}


def merge_from_config(path: str | os.PathLike, out: str | os.PathLike, strict: bool = False) -> Path:
    """Run the merge a mergekit-style config describes, streaming the result to ``out`` (``strict``: see ``merge``)."""
    kwargs = read_config(path)
    if "slices" in kwargs:
        from weightshare.merge.slices import merge_slices

        return merge_slices(**kwargs, out=out, strict=strict)
    return merge(**kwargs, out=out, strict=strict)
