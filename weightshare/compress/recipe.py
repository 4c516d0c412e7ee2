"""A compress recipe: which layers get which bits and granularity, which stay dense (YAML).

``weightshare compress SRC --recipe recipe.yaml --out DIR``::

    bits: 3                      # every compressed layer, unless a layers entry says otherwise
    granularity: per_channel
    calibration: texts.txt       # a text file, builtin (the default) or none (data-free)
    method: gptq
    finetune_steps: 150
    finetune_norms: false        # also train the LayerNorms while fine-tuning the tables
    train: dkm                   # or recluster, soft: training-time sharing (no layers then) ...
    epochs: 3                    # ... for this many epochs of the calibration texts
    outliers: 0.005
    layers:                      # the first entry whose glob matches a module's name applies
      - match: "encoder.layer.*.attention.*"
        bits: 4
      - match: embeddings.word_embeddings
        granularity: per_group
        group_size: 64
    dense: [pooler.dense]        # left as they are

Names are the module names of the transformers model (``inspect`` lists them, without
``.weight``).  The file is checked whole before the model is loaded (keys, types, values);
every ``match`` and ``dense`` glob must then name at least one compressible layer of the
model, checked before any clustering.  A key of the recipe replaces the command-line flag
of the same name.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from torch import nn

from weightshare._yaml import read_yaml
from weightshare.errors import clip
from weightshare.sharing.codebook import CodebookConfig

__all__ = ["Recipe", "apply_settings", "read_recipe", "resolve"]

_CONFIG_KEYS = {"bits", "granularity", "group_size", "table_dtype"}
_RUN_KEYS = {"calibration", "method", "finetune_steps", "finetune_norms", "outliers", "target_size", "avg_bits",
             "epochs"}
_TOP = _CONFIG_KEYS | _RUN_KEYS | {"layers", "dense", "train"}  # train: the whole model's (not per layer)
_LAYER_KEYS = {"match"} | _CONFIG_KEYS


@dataclass
class Recipe:
    """What a recipe file asks for: the run's settings present in it, the default config, per-layer overrides."""

    settings: dict = field(default_factory=dict)  # _RUN_KEYS given in the file
    config: dict = field(default_factory=dict)  # _CONFIG_KEYS given at the top
    layers: list[tuple[str, dict]] = field(default_factory=list)  # (glob, config overrides), in file order
    dense: list[str] = field(default_factory=list)
    path: str = ""

    def base_config(self, config: CodebookConfig) -> CodebookConfig:
        """``config`` (from the command line) with the recipe's top-level settings on it."""
        return _config(config, self.config, "")


def _config(base: CodebookConfig, overrides: dict, where: str) -> CodebookConfig:
    merged = {f.name: getattr(base, f.name) for f in fields(base)} | overrides
    if "granularity" in overrides and overrides["granularity"] != "per_group" and "group_size" not in overrides:
        merged["group_size"] = None  # a group size belongs to per_group only
    try:
        return CodebookConfig(**merged)
    except ValueError as exc:
        raise ValueError(f"recipe {where or 'top level'}: {exc}".replace("CodebookConfig.", "")) from None


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe in ``path``, every key and value checked; all problems in one ``ValueError``."""
    path = Path(path)
    try:
        raw = read_yaml(path, "recipe")
    except ValueError as exc:
        raise ValueError(f"--recipe {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--recipe {path}\n  expected: a mapping (bits:, layers:, dense:, ...)\n"
                         f"  got: {type(raw).__name__}")
    problems = [f"unknown key {k!r} (known: {', '.join(sorted(_TOP))})" for k in raw if k not in _TOP]
    recipe = Recipe(path=str(path))
    recipe.config = {k: raw[k] for k in _CONFIG_KEYS | {"train"} if k in raw}
    recipe.settings = {k: raw[k] for k in _RUN_KEYS if k in raw}
    try:
        base = _config(CodebookConfig(), recipe.config, "")
    except ValueError as exc:
        problems.append(str(exc).replace("\n", " "))
        base = CodebookConfig()
    s = recipe.settings
    if "method" in s and s["method"] not in ("gptq", "wkmeans"):
        problems.append(f"method: {s['method']!r}, expected gptq or wkmeans")
    if "finetune_steps" in s and (isinstance(s["finetune_steps"], bool) or not isinstance(s["finetune_steps"], int)
                                  or s["finetune_steps"] < 0):
        problems.append(f"finetune_steps: {s['finetune_steps']!r}, expected a non-negative integer")
    if "outliers" in s and (isinstance(s["outliers"], bool) or not isinstance(s["outliers"], (int, float))
                            or not 0 <= s["outliers"] < 0.5):
        problems.append(f"outliers: {s['outliers']!r}, expected a fraction in [0, 0.5), e.g. 0.005")
    if "finetune_norms" in s and not isinstance(s["finetune_norms"], bool):
        problems.append(f"finetune_norms: {s['finetune_norms']!r}, expected true or false")
    if "epochs" in s and (isinstance(s["epochs"], bool) or not isinstance(s["epochs"], int) or s["epochs"] < 1):
        problems.append(f"epochs: {s['epochs']!r}, expected a positive integer (with train)")
    if "calibration" in s and not isinstance(s["calibration"], str):
        problems.append(f"calibration: {s['calibration']!r}, expected a text file, builtin or none")
    if "avg_bits" in s and (isinstance(s["avg_bits"], bool) or not isinstance(s["avg_bits"], (int, float))):
        problems.append(f"avg_bits: {s['avg_bits']!r}, expected a number of bits per weight")
    layers = raw.get("layers", [])
    if not isinstance(layers, list):
        problems.append("layers: expected a list of {match: GLOB, bits: ..., granularity: ...}")
        layers = []
    for i, entry in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("match"), str) or not entry["match"]:
            problems.append(clip(f"{where}: expected {{match: GLOB, bits: ...}}, got {entry!r}"))
            continue
        extra = [k for k in entry if k not in _LAYER_KEYS]
        if extra:
            problems.append(f"{where}: unknown keys {extra} (known: {', '.join(sorted(_LAYER_KEYS))})")
            continue
        overrides = {k: v for k, v in entry.items() if k != "match"}
        try:
            _config(base, overrides, where)
        except ValueError as exc:
            problems.append(str(exc).replace("\n", " "))
            continue
        recipe.layers.append((entry["match"], overrides))
    dense = raw.get("dense", [])
    if isinstance(dense, str):
        dense = [dense]
    if not isinstance(dense, list) or not all(isinstance(d, str) and d for d in dense):
        problems.append(clip(f"dense: expected a list of layer-name globs, got {dense!r}"))
        dense = []
    recipe.dense = list(dense)
    if recipe.layers and ("target_size" in s or "avg_bits" in s):
        problems.append("layers with target_size/avg_bits: the budget chooses every width; use one of them")
    if problems:
        raise ValueError(f"--recipe {path}: {len(problems)} problem(s), nothing was done:\n  - "
                         + "\n  - ".join(problems))
    return recipe


def resolve(recipe: Recipe, model: nn.Module, config: CodebookConfig, compressible) -> tuple[dict, set[str]]:
    """``({module name: config}, dense module names)`` for ``model``; every glob must name a layer."""
    names = [n for n, m in model.named_modules() if n and compressible(m, n)]
    problems = []
    dense: set[str] = set()
    for i, pattern in enumerate(recipe.dense):
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            problems.append(f"dense[{i}] {pattern!r} matches no layer")
        dense.update(hit)
    configs: dict[str, CodebookConfig] = {}
    for i, (pattern, overrides) in enumerate(recipe.layers):
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            problems.append(f"layers[{i}].match {pattern!r} matches no layer")
        cfg = _config(config, overrides, f"layers[{i}]")
        for n in hit:
            if n not in configs and n not in dense:  # the first entry that matches applies
                configs[n] = cfg
    if problems:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"--recipe {recipe.path}: {len(problems)} problem(s), nothing was done:\n  - "
                         + "\n  - ".join(problems) + f"\n  layers are named like: {shown}")
    return configs, dense


def apply_settings(recipe: Recipe, **flags) -> dict:
    """The command line's values with the recipe's settings replacing them."""
    out = dict(flags)
    for key, value in recipe.settings.items():
        out[key] = value
    if "calibration" in recipe.settings:
        value = recipe.settings["calibration"]
        out["calibration"] = None if value == "none" else value
    return out

