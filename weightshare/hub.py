"""Loading and writing Hugging Face transformers and sentence-transformers model directories.

weightshare works on the inner ``transformers`` model in both cases; a
sentence-transformers directory only adds its pooling/normalize modules, which
hold no weights we touch.  Nothing here downloads: a SRC that is not a local
directory is passed to the hub only when ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import nn

from weightshare.errors import clip

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
# a shard index names weight files: copied beside other weights it would point at files that are not there
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
MAX_CONFIG_BYTES = 16 << 20  # config.json / modules.json of real models are a few KB
# config fields that decide how many modules the architecture builds: bounded by the tensors a file holds
_COUNT_FIELD = re.compile(r"(layers?|experts?|blocks?)$")
TRANSFORMERS = "transformers"
SENTENCE_TRANSFORMERS = "sentence-transformers"


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): a linear layer whose weight is stored (in, out).

    Recognised by name, so that neither this module nor ``import weightshare`` imports transformers.
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


@dataclass
class Source:
    """Where a model came from: enough to write its non-weight files next to packed weights."""

    kind: str  # "transformers" | "sentence-transformers"
    path: str  # local directory holding config, tokenizer and (for ST) module files
    weights_subdir: str = ""  # ST: directory of the Transformer module, relative to path

    def to_dict(self) -> dict:
        return {"kind": self.kind, "weights_subdir": self.weights_subdir}


def detect(path: str | os.PathLike) -> Source:
    """Classify a local model directory, with one clear error when it is not one."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model directory not found\n  got: {str(path)!r}\n"
                         "  pass a local transformers or sentence-transformers directory")
    if not p.is_dir():
        raise ValueError("not a model directory\n  expected: a directory with config.json (or modules.json)\n"
                         f"  got: the file {str(path)!r}")
    modules = p / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
            # the class moved between releases (sentence_transformers.models.Transformer,
            # sentence_transformers.base.modules.transformer.Transformer since 5.x): match its name
            sub = next(e["path"] for e in entries
                       if e["type"].startswith("sentence_transformers.")
                       and e["type"].rsplit(".", 1)[-1] == "Transformer")
        except (ValueError, KeyError, StopIteration, TypeError) as exc:
            raise ValueError(f"{modules}: not a sentence-transformers modules.json with a Transformer module "
                             f"({exc})") from None
        check_relpath(sub, f"{modules}: path of the Transformer module")
        if not (p / sub / "config.json").is_file():
            raise ValueError(f"sentence-transformers model without {Path(sub) / 'config.json'} in {str(path)!r}")
        check_shards(p / sub)
        return Source(SENTENCE_TRANSFORMERS, str(p), sub)
    if (p / "config.json").is_file():
        check_shards(p)
        return Source(TRANSFORMERS, str(p))
    raise ValueError(
        f"not a model directory\n  expected: config.json (transformers) or modules.json (sentence-transformers)\n"
        f"  got: {str(path)!r} with {sorted(x.name for x in p.iterdir())[:8]}"
    )


def check_model_type(config_dir: Path) -> None:
    from transformers import CONFIG_MAPPING

    try:
        model_type = json.loads((config_dir / "config.json").read_text()).get("model_type")
    except ValueError as exc:
        raise ValueError(f"{config_dir / 'config.json'} is not valid JSON ({exc})") from None
    if model_type not in CONFIG_MAPPING:
        import difflib

        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "a model_type transformers knows"
        raise ValueError(f"{config_dir / 'config.json'}: unknown model_type {model_type!r}: {hint}")


def model_class(config):
    """The transformers model class named by config.json ``architectures`` (None: use AutoModel).

    ``config`` is the parsed config.json or the folder holding it.  Only classes
    transformers itself defines are returned, whatever the file names.
    """
    import transformers

    if not isinstance(config, dict):
        config = read_json(Path(config) / "config.json", "config.json")
    archs = config.get("architectures") if isinstance(config, dict) else None
    arch = archs[0] if isinstance(archs, list) and archs else None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return None


def load_pretrained(src: str | os.PathLike) -> nn.Module:
    """Load a local model directory: a ``SentenceTransformer``, or the transformers class its
    ``config.json`` names, in eval mode on the CPU.

    The model remembers where its files are, so that ``ws.save`` writes a complete packed
    directory (config, tokenizer, pooling and other modules) from it, or from the transformers
    model inside it (``inner_model(model)``, the model whose weights are shared).
    """
    source = detect(src)
    config_dir = Path(source.path) / source.weights_subdir
    check_model_type(config_dir)
    if source.kind == SENTENCE_TRANSFORMERS:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(source.path), device="cpu")
        inner = model[0].auto_model
    else:
        from transformers import AutoModel

        cls = model_class(config_dir) or AutoModel
        model = inner = cls.from_pretrained(str(source.path))
    model.eval()
    # ws.save copies config/tokenizer/module files from here, whichever of the two it is handed
    model._weightshare_source = inner._weightshare_source = source
    return model


_RANDOM_PIECE = 1 << 22  # values drawn per step: fixes the stream, and bounds the float32 scratch to 16 MB


class _RandomTensor:
    """A seeded random tensor made piece by piece (``io.write_safetensors`` writes each piece as it is made)."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float):
        import zlib

        self.name, self.shape, self.dtype, self.std = name, tuple(shape), dtype, std
        # its own stream per tensor name: the same values whatever the order, the shards or the other tensors
        self.seed = (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)

    def __iter__(self):
        n = math.prod(self.shape)
        if len(self.shape) < 2:  # norms' scales start at one, biases at zero, as transformers initialises them
            yield torch.full((n,), 0.0 if self.name.endswith("bias") else 1.0, dtype=self.dtype)
            return
        g = torch.Generator().manual_seed(self.seed)
        for start in range(0, n, _RANDOM_PIECE):
            m = min(_RANDOM_PIECE, n - start)
            yield (torch.randn(m, generator=g) * self.std).to(self.dtype)

    def materialize(self) -> torch.Tensor:
        """The whole tensor (tests; a writer takes it piece by piece)."""
        return torch.cat(list(self)).reshape(self.shape)


def _meta_causal_lm(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def random_tensors(config, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, _RandomTensor]:
    """The tensors ``save_pretrained`` would write for a causal LM of ``config`` (a transformers config), each a
    seeded random tensor made on demand: matrices drawn from N(0, initializer_range), norm scales one, biases
    zero.  The model is built on the meta device only, for its names and shapes: nothing is allocated."""
    return _random_tensors_of(_meta_causal_lm(config), config, seed, dtype)


def _random_tensors_of(model: nn.Module, config, seed: int, dtype: torch.dtype) -> dict[str, _RandomTensor]:
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = every - {name for name, _ in model.named_parameters()}  # the second name of a tied weight
    std = float(getattr(config, "initializer_range", 0.02))
    return {name: _RandomTensor(name, tuple(t.shape), dtype, seed, std)
            for name, t in model.state_dict().items() if name not in tied}


def write_random_pretrained(config, dest: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            max_shard_size: int | str = "5GB") -> Path:
    """A transformers model directory (``config.json`` and safetensors shards with their index, as
    ``save_pretrained`` writes them) holding a causal LM of ``config`` with seeded random weights.

    The model is never built: tensors are drawn and written a piece at a time, so a 7 B model is written
    with a few tens of MB of memory.  For memory and speed work on large models without a hub; the same
    ``seed`` gives the same bytes.  The folder is renamed into place when complete.
    """
    from weightshare import io

    model = _meta_causal_lm(config)
    tensors = _random_tensors_of(model, config, seed, dtype)
    shapes = {name: (t.shape, dtype) for name, t in tensors.items()}
    plan = io.shard_plan(shapes, max_shard_size)
    with io.staged_dir(dest) as tmp:
        config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's config is not changed
        config.dtype = dtype
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        io.write_shards(tmp, shapes, plan, lambda entries: (tensors[name] for name, _, _ in entries))
    return Path(dest)


def write_word_tokenizer(dest: str | os.PathLike, words: int) -> list[str]:
    """A word-level tokenizer saved into ``dest`` (as ``save_pretrained`` writes one) for a model written by
    ``write_random_pretrained``: ``<unk>``, ``<pad>``, ``</s>`` (ids 0..2), then the words ``w0 .. w{words-1}``,
    split on whitespace.  Calibrated compression of a model built from a config, with no hub.  Returns the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [f"w{i}" for i in range(words)]
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(vocab)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(str(dest))
    return vocab


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a SentenceTransformer (or the model itself)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover - a declared dependency
        return model
    return model[0].auto_model if isinstance(model, SentenceTransformer) else model


def tokenizer_of(model: nn.Module):
    """The tokenizer that belongs to a SentenceTransformer or a model loaded with ``load_pretrained``."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok
    source: Source | None = getattr(model, "_weightshare_source", None)
    if source is None:
        raise ValueError("calibration needs the model's tokenizer: load the model with weightshare.hub.load_pretrained")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(source.path) / source.weights_subdir))


def side_module_weights(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a sentence-transformers model's modules other than its Transformer
    (a ``Dense`` projection after pooling, ...), relative to ``path``; none for a transformers model.

    They are small and stay as they are: compress clusters the Transformer's weights, and a
    packed or merged model keeps these files beside it so that ``SentenceTransformer`` loads
    the whole pipeline.  Pickled weights (``pytorch_model.bin``) of such modules are not used.
    """
    p = Path(path)
    try:
        entries = json.loads((p / "modules.json").read_text())
        folders = [e["path"] for e in entries if e["type"].rsplit(".", 1)[-1] != "Transformer" and e["path"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # not a sentence-transformers directory (detect names what is wrong with one)
    found = []
    for folder in folders:
        sub = p / check_relpath(folder, f"{p / 'modules.json'}: module path")
        if sub.is_dir() and not sub.is_symlink():
            found += sorted(f.relative_to(p) for f in sub.iterdir() if f.suffix == ".safetensors" and f.is_file())
    return found


def side_module_settings(path: str | os.PathLike) -> list[Path]:
    """The files of a sentence-transformers model's modules other than its Transformer that are not weights
    (``1_Pooling/config.json``, a Dense's ``config.json``), relative to ``path``: what makes two pipelines
    pool and project alike.  None for a transformers model."""
    p = Path(path)
    try:
        entries = json.loads((p / "modules.json").read_text())
        folders = [e["path"] for e in entries if e["type"].rsplit(".", 1)[-1] != "Transformer" and e["path"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    found = []
    for folder in folders:
        sub = p / check_relpath(folder, f"{p / 'modules.json'}: module path")
        if sub.is_dir() and not sub.is_symlink():
            found += sorted(f.relative_to(p) for f in sub.iterdir()
                            if f.is_file() and f.suffix not in (".safetensors", ".bin") and not f.name.startswith("."))
    return found


def copy_non_weight_files(src: str | os.PathLike, dest: str | os.PathLike, confine: bool = False) -> None:
    """Copy config, tokenizer and module files (everything but the model's weights and shard indices)
    into ``dest``; a sentence-transformers model's other modules keep their weights (``side_module_weights``).

    ``dest`` is a fresh staging folder (see ``io.staged_dir``), so files are
    written in place and get the mode the umask gives.  With ``confine`` (the
    source is an untrusted packed model) a symlink that leads out of ``src`` is
    refused: exporting must not copy a file from elsewhere on the machine.
    """
    src, dest = Path(src), Path(dest)
    root = src.resolve()
    side = set(side_module_weights(src))
    for folder, dirs, files in os.walk(src, followlinks=False):
        rel_dir = Path(folder).relative_to(src)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if (Path(folder) / d).is_symlink():
                if confine:
                    raise ValueError(f"{Path(folder) / d}: a symlinked folder in a packed model\n"
                                     "  expected: plain folders")
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or name.endswith(INDEX_SUFFIXES) or (
                    name.endswith(WEIGHT_SUFFIXES) and rel_dir / name not in side):
                continue
            if confine and path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ValueError(f"{path}: a symlink that leads out of the packed model\n"
                                 f"  expected: files inside {str(src)!r}\n  got: a link to {str(path.resolve())!r}")
            target = dest / rel_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


QUANT_METHOD = "weightshare"  # quantization_config.quant_method of a packed model's config.json


def mark_packed_config(config_dir: Path, weights_file: str | None) -> None:
    """Add to ``config_dir/config.json`` what lets ``from_pretrained`` load a packed model: a
    ``quantization_config`` naming weightshare's quantizer and (``weights_file``) the packed file to read."""
    path = config_dir / "config.json"
    raw = read_json(path, "config.json")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}\n  expected: a JSON object\n  got: {type(raw).__name__}")
    raw["quantization_config"] = {"quant_method": QUANT_METHOD}
    if weights_file:
        raw["transformers_weights"] = weights_file
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def strip_packed_config(config_dir: Path) -> None:
    """Undo ``mark_packed_config`` in a copied ``config.json`` (an exported or merged model is dense again)."""
    path = config_dir / "config.json"
    if not path.is_file():
        return
    raw = read_json(path, "config.json")
    if not isinstance(raw, dict):
        return
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        raw.pop("quantization_config")
        raw.pop("transformers_weights", None)
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def check_relpath(value, field: str) -> str:
    """A path from a file we read, checked before it is joined to anything: relative, inside, plain.

    Refuses absolute paths, drives, ``..``, backslashes, NUL and over-long names,
    whatever the platform, and returns the normalised POSIX form ("" for the folder itself).
    """
    if not isinstance(value, str):
        raise ValueError(clip(f"{field}\n  expected: a relative path (string)\n  got: {value!r}"))
    bad = (len(value) > 255 or "\0" in value or "\\" in value or PurePosixPath(value).is_absolute()
           or PureWindowsPath(value).drive or PureWindowsPath(value).root or ".." in PurePosixPath(value).parts)
    if bad:
        raise ValueError(clip(f"{field}: path escapes its folder\n"
                              f"  expected: a relative path inside the model folder, without '..'\n  got: {value!r}"))
    parts = [p for p in PurePosixPath(value).parts if p != "."]
    return str(PurePosixPath(*parts)) if parts else ""


def inside(root: Path, rel: str, field: str) -> Path:
    """``root / rel``, checked to stay inside ``root`` once symlinks are resolved."""
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{field}: {rel!r} leads out of {str(root)!r} through a symlink")
    return path


def check_shards(weights_dir: Path) -> None:
    """A sharded checkpoint's index must name shard files that exist, before anything is loaded."""
    for index in sorted(weights_dir.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
            shards = sorted(set(weight_map.values()))
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{index}: not a shard index with a weight_map ({exc})") from None
        missing = [f for f in shards if not isinstance(f, str) or not (weights_dir / f).is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that are not there\n"
                             f"  expected: {len(shards)} files beside it\n  missing: {missing[:5]}")


WEIGHTS = "model.safetensors"


def checkpoint(weights_dir: Path):
    """The safetensors checkpoint in ``weights_dir`` (``model.safetensors``, or shards and their index) as an
    ``io.Tensors``: headers read and checked, data read on demand.  The index is untrusted: every shard it
    names must be a relative path inside ``weights_dir``."""
    from weightshare import io

    if (weights_dir / WEIGHTS).is_file():  # the one file first, as from_pretrained takes it
        return io.Tensors({"": weights_dir / WEIGHTS})
    if (weights_dir / io.SHARD_INDEX).is_file():
        index = weights_dir / io.SHARD_INDEX
        weight_map = read_json(index, "shard index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map\n  expected: {{\"weight_map\": {{tensor name: shard file}}}}")
        files = {}
        for name, rel in weight_map.items():
            path = inside(weights_dir, check_relpath(rel, clip(f"{index}: shard of {name!r}")), f"{index}: shard")
            if not path.is_file():
                raise ValueError(clip(f"{index}: the shard {rel!r} of {name!r} is not there"))
            files[name] = path
        return io.Tensors(files)
    found = sorted(p.name for p in weights_dir.iterdir())[:8]
    raise ValueError(f"{weights_dir}: no {WEIGHTS} or {io.SHARD_INDEX}\n  got: {found}\n"
                     "  (pickled pytorch_model.bin files are not read: convert them to safetensors)")


def read_json(path: Path, what: str):
    """A JSON file we did not write: bounded in size, one clear error."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: {size} bytes\n  expected: a {what} of at most {MAX_CONFIG_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(clip(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})")) from None


def _count_fields(raw, prefix=""):
    """(key, value) of integer fields that decide how many modules get built, also in nested configs."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            if isinstance(v, int) and not isinstance(v, bool) and _COUNT_FIELD.search(str(k)):
                yield prefix + str(k), v
            elif isinstance(v, dict):
                yield from _count_fields(v, prefix + str(k) + ".")


# unsaved buffers (position ids, rotary tables, masks) a config.json may make skeleton build beyond the size of
# the weights it comes with: load.py and compress/stream.py add that size to it
BUFFER_BUDGET = 64 << 20


def skeleton(config_dir: Path, n_tensors: int, buffer_budget: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers architecture named by ``config_dir/config.json``, built without weight memory.

    Parameters live on the meta device, to be filled by ``ws.load``; buffers
    that are not saved (position ids, rotary tables) are real, computed by the
    architecture's own constructor.  The config is untrusted: layer counts are
    bounded by the number of tensors in the file, and the unsaved buffers are
    sized on the meta device first and refused beyond ``buffer_budget`` bytes.
    No code is executed from the folder (``trust_remote_code`` stays off).  ``dtype``: the parameters'
    dtype where ``config.json`` names none (from_pretrained takes the checkpoint's then).
    """
    from accelerate import init_empty_weights
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, PreTrainedModel

    raw = read_json(config_dir / "config.json", "config.json")
    if not isinstance(raw, dict):
        raise ValueError(f"{config_dir / 'config.json'}\n  expected: a JSON object\n  got: {type(raw).__name__}")
    if raw.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(clip(f"{config_dir / 'config.json'}: unknown model_type\n  got: {raw.get('model_type')!r}"))
    for key, value in _count_fields(raw):
        if not 0 <= value <= n_tensors:
            raise ValueError(f"{config_dir / 'config.json'}: {key} = {value}\n"
                             f"  expected: 0..{n_tensors} (the file holds {n_tensors} tensors)")
    cls = model_class(raw)
    config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
    if dtype is not None and getattr(config, "dtype", None) is None:
        config.dtype = dtype
    build = cls._from_config if cls is not None else AutoModel.from_config
    with torch.device("meta"):
        probe = build(config)
    unsaved = sum(math.prod(b.shape) * b.element_size() for _, b in _non_persistent_buffers(probe))
    if unsaved > buffer_budget:
        raise ValueError(f"{config_dir / 'config.json'} builds {unsaved:,} bytes of unsaved buffers\n"
                         f"  expected: at most {buffer_budget:,}")
    with init_empty_weights(include_buffers=False):
        model = build(config)
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"{config_dir / 'config.json'} does not name a transformers model")
    model.eval()  # as from_pretrained leaves it
    gen = config_dir / "generation_config.json"
    if gen.is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(config_dir))
    return model


def _non_persistent_buffers(model: nn.Module):
    for mod_name, m in model.named_modules():
        for n, b in m._buffers.items():
            if b is not None and n in m._non_persistent_buffers_set:
                yield f"{mod_name}.{n}" if mod_name else n, b


def packed_sentence_transformer(root: Path, transformer_dir: str, inner: nn.Module):
    """A SentenceTransformer read from ``root`` as ``SentenceTransformer(root)`` would, around ``inner``.

    sentence-transformers reads modules.json, the tokenizer, pooling and prompts
    itself; only its Transformer module is handed the model ``ws.load`` built
    instead of loading weights (there are none in a packed folder).  Module types
    outside the ``sentence_transformers`` package are refused: they would import code.
    """
    from sentence_transformers import SentenceTransformer

    Transformer = _st_module("Transformer")

    modules = read_json(root / "modules.json", "modules.json")
    if not isinstance(modules, list) or not all(isinstance(e, dict) for e in modules):
        raise ValueError(f"{root / 'modules.json'}\n  expected: a list of module entries")
    transformer_types = set()
    for e in modules:
        kind, path = e.get("type"), e.get("path")
        if not isinstance(kind, str) or not kind.startswith("sentence_transformers."):
            raise ValueError(clip(f"{root / 'modules.json'}: module type\n"
                                  f"  expected: a sentence_transformers class\n  got: {kind!r}"))
        check_relpath(path, f"{root / 'modules.json'}: module path")
        if kind.rsplit(".", 1)[-1] == "Transformer":
            transformer_types.add(kind)
            if check_relpath(path, "path") != transformer_dir:
                raise ValueError(f"{root / 'modules.json'}: the Transformer module's path {path!r} is not "
                                 f"the packed weights' folder {transformer_dir!r}")
    if len(transformer_types) != 1 or sum(e["type"] in transformer_types for e in modules) != 1:
        raise ValueError(f"{root / 'modules.json'}\n  expected: exactly one Transformer module")

    class _Packed(Transformer):
        def _load_model(self, *args, **kwargs):  # the one step that would read weight files
            return inner

    model = SentenceTransformer._load_with_module_classes(
        str(root), {transformer_types.pop(): _Packed}, device="cpu", trust_remote_code=False)
    for module in model:
        if type(module) is _Packed:
            module.__class__ = Transformer  # a plain Transformer from here on (saving, isinstance, repr)
    model.eval()
    return model


def _st_module(name: str) -> type:
    """A sentence-transformers module class (Transformer, Normalize): from
    ``sentence_transformer.modules``, where 6.x moved them (importing ``models`` warns), or
    from ``models`` on releases without it."""
    import importlib

    try:
        modules = importlib.import_module("sentence_transformers.sentence_transformer.modules")
    except ImportError:
        modules = importlib.import_module("sentence_transformers.models")
    return getattr(modules, name)


def sentence_encoder(path: str | os.PathLike, trainable_layers: int | None = None) -> nn.Module:
    """A sentence-transformers model as a trunk: its transformer and pooling, without a final
    normalisation (a linear head on unit vectors learns slowly), returning ``{"sentence_embedding"}``.

    ``trainable_layers=k`` fine-tunes only the last ``k`` transformer layers (and the pooling):
    embeddings and the layers below stay frozen, as in the usual recipe for adapting a sentence
    encoder on a few thousand labelled sentences.  ``None`` trains everything.
    """
    from sentence_transformers import SentenceTransformer

    Normalize = _st_module("Normalize")

    full = SentenceTransformer(str(path), device="cpu")
    model = SentenceTransformer(modules=[m for m in full if not isinstance(m, Normalize)], device="cpu")
    if trainable_layers is not None:
        layers = transformer_blocks(inner_model(model))
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"sentence_encoder: trainable_layers\n  expected: 0..{len(layers)}\n"
                             f"  got: {trainable_layers}")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - trainable_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return model


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ``nn.ModuleList`` in the model."""
    from torch.nn.utils.parametrize import ParametrizationList

    # a codebook's ParametrizationList is a ModuleList too: a one-block model's stack is as long as it
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and not isinstance(m, ParametrizationList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no stack of transformer layers (nn.ModuleList) found")
    return max(lists, key=len)
