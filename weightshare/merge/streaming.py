"""``ws.merge``: open every input, check them all against each other before any tensor is read,
then merge tensor by tensor and stream the result into a safetensors file.

Inputs are Hugging Face / sentence-transformers model directories (sharded or
not), ``.safetensors`` files, weightshare packed directories, state dicts and
``nn.Module`` objects.  Safetensors headers are read and checked first
(``io.read_header``); tensor data is then read one tensor at a time with
plain positioned reads (``io.read_tensor``), not through a memory map, so that
a merge holds about one tensor per input plus the one being written (streamed
out by ``io.write_safetensors``): pages of a mapped file would
stay resident and count against the process until the end.  A packed
directory's stored tensors (a few bits per weight) are read and checked first,
and each tensor is decoded when the merge reaches it; a state dict is already
in memory.

Buffers and other non-float tensors (position ids, BatchNorm's
``num_batches_tracked``, masks) follow one policy: they are never averaged,
they are copied from the base model, or from the first model when there is no
base (the *reference*), and the output has exactly the reference's names: a
non-float tensor only some inputs store is not an error.  Float tensors
(BatchNorm running statistics included) are merged by the method like any
weight, and must be in every input with one shape.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from weightshare import io
from weightshare.hub import WEIGHTS
from weightshare.io import write_safetensors
from weightshare.merge import settings
from weightshare.merge.registry import check_params, get_method, row_length
from weightshare.pack import is_packed

__all__ = ["MergeError", "derived_model", "merge", "merged_stream", "model_view", "open_model", "state_dict_of",
           "write_model"]

log = logging.getLogger(__name__)

OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


CHUNK = 1 << 18  # entries per piece (1 MB of float32): a merge holds a dozen or so piece-sized buffers at its peak


class _Pieces:
    """A tensor made piece by piece (flat spans, in order): written as it is made (io.write_safetensors takes
    its pieces), never whole."""

    def __init__(self, shape, spans, make):
        self.shape, self._spans, self._make = torch.Size(shape), spans, make

    def __iter__(self):
        for a, b in self._spans:
            yield self._make(a, b)

    def whole(self) -> torch.Tensor:
        return torch.cat(list(self)).reshape(self.shape)


class MergeError(ValueError):
    """Everything wrong with a merge's inputs, found before any tensor was read."""


# ----------------------------------------------------------------------------- inputs


class _Model:
    """One input: its tensors' (shape, dtype) from headers, and a way to read one tensor."""

    def __init__(self, label: str, meta: dict[str, tuple[tuple[int, ...], torch.dtype]], read, root: Path | None = None,
                 weights_subdir: str = "", confine: bool = False):
        self.label, self.meta, self._read = label, meta, read
        self.root, self.weights_subdir = root, weights_subdir
        self.confine = confine  # a packed model is untrusted as export treats it: no symlink may lead out of it

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or with ``start``/``stop`` the flat entries [start, stop) of it."""
        if start is None:
            return self._read(name, None)
        return self._read(name, (start, stop))


def _safetensors_files(label: str, tensors: io.Tensors, root: Path | None = None, weights_subdir: str = "") -> _Model:
    return _Model(label, tensors.meta, lambda name, span=None: tensors.read(name, *(span or ())), root=root,
                  weights_subdir=weights_subdir)


def _directory(path: Path) -> _Model:
    from weightshare import hub

    if is_packed(path):
        return _packed(path)
    source = hub.detect(path)
    return _safetensors_files(str(path), hub.checkpoint(path / source.weights_subdir), path, source.weights_subdir)


def _packed(path: Path) -> _Model:
    """A packed model: its stored tensors (a few bits per weight) read and checked against their
    checksums up front, then decoded one tensor at a time as the merge asks for it; the last
    decoded tensor is kept, since a large tensor is read piece by piece, in order."""
    from weightshare.pack import PackedFile

    packed = PackedFile(path)
    packed.fetch_all()  # a corrupted file is refused before anything is merged
    last: dict = {}

    def read(name, span=None):
        if last.get("name") != name:
            last.clear()  # drop the previous tensor before decoding the next
            last.update(name=name, tensor=packed.decode(name))
        t = last["tensor"]
        return t if span is None else t.reshape(-1)[span[0]:span[1]]

    return _Model(str(path), packed.dense_shapes(), read, root=path, weights_subdir=packed.source["weights_subdir"],
                  confine=True)


def _in_memory(label: str, state: dict) -> _Model:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{label}: entries that are not tensors: {bad[:5]}")
    def read(name, span=None):
        return state[name] if span is None else state[name].reshape(-1)[span[0]:span[1]]

    return _Model(label, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, read)


def open_model(source, label: str | None = None) -> _Model:
    """An input of ``merge``: a model directory, a .safetensors file, a state dict or an nn.Module (or one
    already opened: a view of some of a model's layers, from ``slices``)."""
    if isinstance(source, _Model):
        return source
    if isinstance(source, torch.nn.Module):
        return _in_memory(label or type(source).__name__, source.state_dict())
    if isinstance(source, dict):
        return _in_memory(label or "state dict", source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _directory(path)
        if path.is_file() and path.suffix == ".safetensors":
            return _safetensors_files(str(path), io.Tensors({"": path}))
        if not path.exists():
            # mergekit's rule, kept so that its configs run unchanged: a relative path is taken from the
            # directory the command runs in, not the config's; the error says which directory that was
            where = "" if path.is_absolute() else \
                f" (relative paths are taken from the current directory, {os.getcwd()})"
            raise ValueError(f"{str(source)!r}: no such file or directory{where}")
        raise ValueError(f"{str(path)!r}\n  expected: a model directory or a .safetensors file")
    raise ValueError("a model to merge\n  expected: a path, a state dict or an nn.Module\n"
                     f"  got: {type(source).__name__}")


# ----------------------------------------------------------------------------- merge


def _per_model(value, n: int):
    """A per-model parameter as one value per model: a list is one per model, except a list of
    conditions (settings.py), which is one setting for every model."""
    if isinstance(value, (list, tuple)) and not settings.is_conditions(value):
        return list(value)
    return [value] * n


def _side_module_problems(ref: _Model, others: list[_Model]) -> list[str]:
    """A sentence-transformers model's modules besides its Transformer (a Dense projection) are merged with
    the same method, file by file (``_merge_side_modules``): every input must have the same ones, and the
    modules' own settings (Pooling's mode, Dense's sizes and activation) must agree: a pipeline that pools
    differently is another model, refused by name, never given the reference's silently."""
    import hashlib

    from weightshare.hub import side_module_settings, side_module_weights

    if ref.root is None:
        return []
    want_weights = {str(f) for f in side_module_weights(ref.root)}
    want = {str(f): hashlib.sha256((ref.root / f).read_bytes()).hexdigest() for f in side_module_settings(ref.root)}
    problems = []
    for m in others:
        if m.root is None:
            if want_weights:
                problems.append(f"{m.label}: has no sentence-transformers modules, {ref.label} has "
                                f"{sorted(want_weights)}: give every input the whole pipeline")
            continue
        weights = {str(f) for f in side_module_weights(m.root)}
        if weights != want_weights:
            problems.append(f"{m.label}: sentence-transformers module weights {sorted(weights)}, but {ref.label} "
                            f"has {sorted(want_weights)}: the pipelines differ")
        got = {str(f): hashlib.sha256((m.root / f).read_bytes()).hexdigest() for f in side_module_settings(m.root)}
        differ = sorted(f for f in set(want) | set(got) if want.get(f) != got.get(f))
        if differ:
            problems.append(f"{m.label}: sentence-transformers module settings {differ} differ from those of "
                            f"{ref.label} (a Pooling mode, a Dense size or activation): pipelines that pool or "
                            "project differently cannot be merged")
    return problems


def _merge_side_modules(folder: Path, ref: _Model, inputs: list[_Model], base_model: _Model | None, method: str,
                        model_params: dict, params: dict, dtype: str | None) -> None:
    """Each sentence-transformers module file besides the Transformer's (a Dense projection), merged across
    the inputs as their Transformer weights were, written over the reference's copy."""
    from weightshare.hub import side_module_weights

    if ref.root is None:
        return
    per_model = {("weights" if k == "weight" else k): v for k, v in model_params.items()}
    for rel in side_module_weights(ref.root):
        models = [m.root / rel for m in inputs]
        base = base_model.root / rel if base_model is not None else None
        _, entries, tensors = merged_stream(models, method, base=base, dtype=dtype, **per_model, **params)
        write_safetensors(folder / rel, entries, tensors, metadata={"format": "pt"})


def merge(models, method: str = "linear", base=None, weights=None, out: str | os.PathLike | None = None,
          dtype: str | None = None, plan: bool = False, strict: bool = False, tokenizer_source: str | None = None,
          **params):
    """Merge ``models`` with ``method`` (a name in ``weightshare.merge.MERGE_METHODS``).

    ``models``: a list of model directories (Hugging Face or sentence-transformers, sharded
    or not; weightshare packed directories), ``.safetensors`` files, state dicts or modules,
    all of one architecture.  ``base``: the same kinds, for methods on task vectors
    (θ_i − base).  ``weights``: one per model (default 1 each).  Per-model parameters such
    as ``density`` take one value for all models or a list with one per model; the others
    (``scale``, ``normalize``, ``t``, ``seed``...) are the method's, and unknown names are
    refused.  A value may vary by tensor: a list of numbers is a gradient over the layers,
    a list of ``{"filter": ..., "value": ...}`` conditions picks by tensor name (mergekit's
    settings, ``settings.py``); for a per-model parameter, one such setting per model, or
    one list of conditions for all.  Every input's names, shapes and dtypes, and every
    parameter, are checked before any tensor is read, and all problems are reported in one
    ``MergeError``.

    Returns the merged state dict, or with ``out=DIR`` streams it to ``DIR`` (a model
    directory with the base's, else the first model's, config and tokenizer files; written
    beside ``DIR`` and renamed into place) and returns the path.  ``dtype``: ``"float32"``,
    ``"float16"`` or ``"bfloat16"`` for the merged float tensors (default: the reference
    model's own dtype); the arithmetic is float32 throughout.

    A ``{filter, value}`` condition whose filter occurs in no tensor name is a warning that names
    it (mergekit skips it silently); with ``strict=True`` it is one of the problems.

    ``plan=True`` stops after the checks and returns, for every float tensor, the parameters
    it would be merged with ({name: {parameter: value}}, per-model ones as lists): what a
    config's gradients and filters give each tensor.  It reads headers only (and a packed
    input's stored data, to check its checksums), never writes.
    """
    tokenizer, given = None, (models, base)
    if tokenizer_source is not None:  # every model's embedding rows put in one vocabulary first (tokenizer.py)
        from weightshare.merge.tokenizer import remap_vocabularies

        opened, problems = _open_all(models, base)
        if problems:
            raise MergeError("merge: " + "; ".join(problems))
        models, base, tokenizer = remap_vocabularies(opened[:len(models)], opened[len(models)] if base is not None
                                                     else None, tokenizer_source)
    checked = _checked(models, method, base, weights, out, dtype, strict, params)
    spec, ref, inputs, model_params, method_params, varying = checked[:6]
    if plan:
        if not spec.tensorwise:
            raise MergeError(f"merge: plan: {method} works on whole models; its parameters do not vary by tensor")
        return {k: {**method_params, **(varying[k] if varying else {})} for k, (_, dt) in ref.meta.items()
                if dt.is_floating_point}
    if not spec.tensorwise:
        states = [{k: m.read(k) for k in ref.meta} for m in inputs]
        return spec.fn(states, **{k: v for k, v in model_params.items()}, **params)
    entries, tensors = _stream(method, checked, dtype)
    if out is None:
        return state_dict_of(entries, tensors)
    with io.staged_dir(out) as tmp:
        write_model(tmp, ref, entries, tensors)
        _merge_side_modules(tmp, ref, inputs, checked[6], method,
                            model_params, params, dtype)
        _record(tmp, method, *given, model_params, params, spec, dtype)
        if tokenizer is not None:
            from weightshare.merge.tokenizer import write_tokenizer

            write_tokenizer(tmp, ref.weights_subdir, tokenizer)
            with open(tmp / "mergekit_config.yml", "a") as f:
                f.write(f"tokenizer_source: {json.dumps(str(tokenizer_source))}\n")
    return Path(out)


def state_dict_of(entries, tensors) -> dict:
    """The merged tensors in memory: {name: tensor} from ``merged_stream``'s entries and tensors."""
    return {name: t.whole() if isinstance(t, _Pieces) else t.clone() for (name, _, _), t in zip(entries, tensors)}


def model_view(model: _Model, mapping: dict[str, str], label: str) -> _Model:
    """Some of an opened model's tensors under other names (new name -> the model's name), read from it when
    asked: a slice's layers renumbered (``slices``)."""
    return _Model(label, {new: model.meta[old] for new, old in mapping.items()},
                  lambda name, span=None: model._read(mapping[name], span), root=model.root,
                  weights_subdir=model.weights_subdir, confine=model.confine)


def derived_model(like: _Model, meta: dict, read, label: str) -> _Model:
    """A model whose tensors (``meta``: name -> (shape, dtype)) come from ``read(name, span)``, with the
    files of ``like`` (config, tokenizer): a model seen through a change, such as a remapped vocabulary."""
    return _Model(label, meta, read, root=like.root, weights_subdir=like.weights_subdir, confine=like.confine)


def merged_stream(models, method: str, base=None, weights=None, dtype: str | None = None, strict: bool = False,
                  **params):
    """``merge``'s checks, then (reference model, entries, tensors): the output's (name, shape, dtype) and the
    merged tensors made lazily in that order, for a caller that writes them with others (``slices``)."""
    checked = _checked(models, method, base, weights, None, dtype, strict, params)
    if not checked[0].tensorwise:
        raise MergeError(f"merge: {method} works on whole models in memory; it cannot merge slices")
    entries, tensors = _stream(method, checked, dtype)
    return checked[1], entries, tensors


def _checked(models, method, base, weights, out, dtype, strict, params):
    """Every check of ``merge`` (one MergeError with all problems), then what merging needs:
    (spec, ref, inputs, model_params, method_params, varying, base_model)."""
    spec = get_method(method)
    if not isinstance(models, (list, tuple)) or not models:
        raise MergeError(f"merge: models\n  expected: a non-empty list of models\n  got: {type(models).__name__}")
    n = len(models)
    model_params = {k: _per_model(params.pop(k), n) for k in list(params) if k in spec.model_params}
    if weights is not None:
        model_params["weight"] = _per_model(weights, n)
    param_problems = check_params(spec, n, base is not None, model_params, params)
    problems = param_problems + _option_problems(method, spec, dtype, out)
    opened, open_problems = _open_all(models, base)
    problems += open_problems
    inputs = opened[:n]
    base_model = opened[n] if base is not None else None
    ref = base_model if base is not None else inputs[0]
    if ref is not None:
        problems += _reference_problems(ref, opened)
    if ref is not None and ref.root is not None:
        problems += _side_module_problems(ref, [m for m in opened if m is not None and m is not ref])
    varying = None  # gradients and filters (settings.py): every tensor's own values, resolved from names alone
    if ref is not None and not param_problems:
        varying, setting_problems = _tensor_settings(spec, ref, params, model_params, strict)
        problems += setting_problems
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise MergeError(f"merge: {len(problems)} problem(s), nothing was read or written:\n  - "
                         + "\n  - ".join(shown))
    method_params = {**{k: model_params.get(k, [d] * n) for k, d in spec.model_params.items()},
                     **{k: params.get(k, d) for k, d in spec.params.items()}}
    return spec, ref, inputs, model_params, method_params, varying, base_model


def _stream(method: str, checked, dtype: str | None):
    spec, ref, inputs, _, method_params, varying, base_model = checked
    out_dtype = OUT_DTYPES.get(dtype)
    entries = [(k, shape, (out_dtype or dt) if dt.is_floating_point else dt) for k, (shape, dt) in ref.meta.items()]
    return entries, _merged(method, spec, entries, ref, inputs, base_model, method_params, varying)


def write_model(folder: Path, ref: _Model, entries: list, tensors) -> None:
    """The merged model's directory: the reference's config and tokenizer files, and the tensors streamed in."""
    if ref.root is not None:
        from weightshare.hub import copy_non_weight_files, strip_packed_config

        copy_non_weight_files(ref.root, folder, confine=ref.confine)
        strip_packed_config(folder / ref.weights_subdir)  # a packed reference's config: the merge is dense
    target = folder / ref.weights_subdir
    target.mkdir(parents=True, exist_ok=True)
    write_safetensors(target / WEIGHTS, entries, tensors, metadata={"format": "pt"})
    floats = [dt for _, _, dt in entries if dt.is_floating_point]
    if floats:
        _set_config_dtype(target / "config.json", floats[0])


def _option_problems(method: str, spec, dtype: str | None, out) -> list[str]:
    """What is wrong with ``dtype`` and ``out`` for this method."""
    problems = []
    if dtype is not None and dtype not in OUT_DTYPES:
        problems.append(f"dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        problems.append(f"out: {str(out)!r} exists and is not an empty directory: choose a new or empty one")
    if not spec.tensorwise and out is not None:
        problems.append(f"{method} works on whole models in memory: call it without out=, then save the result")
    return problems


def _open_all(models, base) -> tuple[list[_Model | None], list[str]]:
    """Every input, then the base (None for one that cannot be opened), and what stopped each that could not."""
    opened: list[_Model | None] = []
    problems = []
    for i, m in enumerate([*models, *([base] if base is not None else [])]):
        try:
            opened.append(open_model(m, label=f"model {i}" if i < len(models) else "base"))
        except ValueError as exc:
            problems.append(str(exc))
            opened.append(None)
    return opened, problems


def _reference_problems(ref: _Model, opened: list[_Model | None]) -> list[str]:
    """Every input's names, shapes and kinds of dtype against the reference's, from headers alone."""
    problems = []
    for m in opened:
        if m is None or m is ref:
            continue
        # non-float tensors are copied from the reference by the buffer policy, so a model saved
        # without one (a transformers version that does not store position ids) is no problem
        missing = [k for k, (_, dt) in ref.meta.items() if k not in m.meta and dt.is_floating_point]
        extra = [k for k, (_, dt) in m.meta.items() if k not in ref.meta and dt.is_floating_point]
        if missing:
            problems.append(f"{m.label} lacks {len(missing)} tensors of {ref.label}: {missing[:5]}")
        if extra:
            problems.append(f"{m.label} has {len(extra)} tensors {ref.label} lacks: {extra[:5]}")
        for k, (shape, dt) in m.meta.items():
            if k in ref.meta:
                rshape, rdt = ref.meta[k]
                if shape != rshape:
                    problems.append(f"{k}: shape {list(shape)} in {m.label}, {list(rshape)} in {ref.label}")
                elif dt.is_floating_point != rdt.is_floating_point:
                    problems.append(f"{k}: dtype {dt} in {m.label}, {rdt} in {ref.label}")
    return problems


def _tensor_settings(spec, ref: _Model, params: dict, model_params: dict,
                     strict: bool) -> tuple[dict | None, list[str]]:
    """Every float tensor's own parameter values (None for a method on whole models), and the problems: filters
    that match no tensor (with ``strict``; else warnings) and values that cannot be resolved."""
    names = [k for k, (_, dt) in ref.meta.items() if dt.is_floating_point]
    unmatched = [u for k, v in params.items() for u in settings.unmatched_filters(v, names, k)]
    unmatched += [u for k, vs in model_params.items() for i, v in enumerate(vs)
                  for u in settings.unmatched_filters(v, names, f"models[{i}].{k}")]
    problems = list(unmatched) if strict else []
    for u in [] if strict else unmatched:
        log.warning("merge: %s; its value is never used (--strict makes this an error)", u)
    if not spec.tensorwise:
        return None, problems
    varying, unresolved = settings.per_tensor(names, spec.params, spec.model_params, params, model_params)
    return varying, problems + unresolved


def _merged(method: str, spec, entries: list, ref: _Model, inputs: list[_Model], base_model: _Model | None,
            method_params: dict, varying: dict | None):
    """The merged tensors in ``entries`` order, each made when it is asked for: a large one as ``_Pieces``."""
    from weightshare._progress import progress

    def read_span(name, start, stop):
        tensors = [m.read(name, start, stop).float() for m in inputs]
        return tensors, base_model.read(name, start, stop).float() if base_model is not None else None

    def merge_span(name, dt, start, stop, tensor_params, extra):
        tensors, b = read_span(name, start, stop)
        return spec.fn(tensors, b, name=name, **tensor_params, **extra).to(dt)

    for name, shape, dt in progress(entries, desc=f"merge ({method})", unit="tensor", leave=False):
        if not dt.is_floating_point:  # the buffer policy: copied from the base, or the first model
            yield ref.read(name)
            continue
        numel = int(torch.Size(shape).numel())
        step = CHUNK
        if spec.rows and numel:  # pieces of whole rows (DELLA ranks within a row); one row at least
            row = row_length(shape)
            step = max(row, CHUNK // row * row)
        spans = [(s, min(s + step, numel)) for s in range(0, numel, step)]
        tensor_params = method_params if varying is None else {**method_params, **varying[name]}
        extra = None
        if numel > CHUNK and spec.elementwise:
            extra = {}
        elif numel > CHUNK and spec.prepare is not None:  # whole-tensor statistics, gathered piece by piece
            def read(name=name, spans=spans):
                for a, b in spans:
                    yield read_span(name, a, b)

            extra = spec.prepare(read, numel, name=name, shape=torch.Size(shape), **tensor_params)
        if extra is not None:  # flat pieces: a few MB per input, whatever the tensor's size
            # a prepared method is told where each piece lies (DARE's mask entries, model stock's rows)
            yield _Pieces(shape, spans, lambda a, b, name=name, dt=dt, p=tensor_params, extra=extra: merge_span(
                name, dt, a, b, p, extra if spec.elementwise else {**extra, "span": (a, b)}))
            continue
        yield merge_span(name, dt, None, None, tensor_params, {}).reshape(shape)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """The merged weights' dtype in ``config.json``, which transformers and sentence-transformers load them as."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]  # transformers 5 writes dtype
    for k in keys:
        config[k] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _describe_input(m) -> str:
    return str(m) if isinstance(m, (str, os.PathLike)) else f"<{type(m).__name__} in memory>"


def _record(folder: Path, method: str, models, base, model_params: dict, params: dict, spec, dtype) -> None:
    """How the merge was made, as mergekit records it: ``mergekit_config.yml`` (the merge in mergekit's YAML, every
    parameter resolved to the value used) and a model card ``README.md`` in place of the source's."""
    from importlib.metadata import version

    import yaml

    renamed = {"scale": "lambda"}  # this file speaks mergekit's names
    entries = []
    for i, m in enumerate(models):
        per = {k: v[i] for k, v in model_params.items()}
        entries.append({"model": _describe_input(m), **({"parameters": per} if per else {})})
    glob = {renamed.get(k, k): params.get(k, d) for k, d in spec.params.items()}
    if base is None and spec.base_endpoint:  # mergekit names one end of the interpolation (slerp's t = 0) base_model
        base = models[0]
    config = {"merge_method": method, **({"base_model": _describe_input(base)} if base is not None else {}),
              "models": entries, **({"parameters": glob} if glob else {}), **({"dtype": dtype} if dtype else {})}
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    (folder / "mergekit_config.yml").write_text(text)
    library = "sentence-transformers" if (folder / "modules.json").is_file() else "transformers"
    lines = ["---", f"library_name: {library}", "tags: [merge, weightshare]", "---", "",
             f"# A {method} merge", "",
             f"This model was made with [weightshare](https://pypi.org/project/weightshare/) {version('weightshare')} "
             f"(`weightshare merge`), method `{method}` ({spec.source}).", ""]
    if base is not None:
        lines += [f"Base model: `{_describe_input(base)}`", ""]
    lines += ["Models merged:", ""] + [f"- `{e['model']}`" for e in entries] + [
        "", "Configuration (`mergekit_config.yml`; `weightshare merge mergekit_config.yml --out DIR` makes it again):",
        "", "```yaml", text.rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))
