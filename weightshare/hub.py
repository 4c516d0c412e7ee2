"""Loading and writing Hugging Face transformers and sentence-transformers model directories.

weightshare works on the inner ``transformers`` model in both cases; a
sentence-transformers directory only adds its pooling/normalize modules, which
hold no weights we touch.  Nothing here downloads: a SRC that is not a local
directory is passed to the hub only when ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
TRANSFORMERS = "transformers"
SENTENCE_TRANSFORMERS = "sentence-transformers"


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
        raise ValueError(f"model directory not found\n  got: {str(path)!r}\n  pass a local transformers or sentence-transformers directory")
    if not p.is_dir():
        raise ValueError(f"not a model directory\n  expected: a directory with config.json (or modules.json)\n  got: the file {str(path)!r}")
    modules = p / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
            sub = next(e["path"] for e in entries if e["type"].endswith("models.Transformer"))
        except (ValueError, KeyError, StopIteration, TypeError) as exc:
            raise ValueError(f"{modules}: not a sentence-transformers modules.json with a Transformer module ({exc})") from None
        if not (p / sub / "config.json").is_file():
            raise ValueError(f"sentence-transformers model without {Path(sub) / 'config.json'} in {str(path)!r}")
        return Source(SENTENCE_TRANSFORMERS, str(p), sub)
    if (p / "config.json").is_file():
        return Source(TRANSFORMERS, str(p))
    raise ValueError(
        f"not a model directory\n  expected: config.json (transformers) or modules.json (sentence-transformers)\n"
        f"  got: {str(path)!r} with {sorted(x.name for x in p.iterdir())[:8]}"
    )


def _check_model_type(config_dir: Path) -> None:
    from transformers import CONFIG_MAPPING

    try:
        model_type = json.loads((config_dir / "config.json").read_text()).get("model_type")
    except ValueError as exc:
        raise ValueError(f"{config_dir / 'config.json'} is not valid JSON ({exc})") from None
    if model_type not in CONFIG_MAPPING:
        known = sorted(CONFIG_MAPPING.keys())
        raise ValueError(
            f"unknown model type in {config_dir / 'config.json'}\n"
            f"  expected: a model_type transformers knows ({len(known)} of them, e.g. {', '.join(known[:12])}, ...)\n"
            f"  got: {model_type!r}"
        )


def model_class(config_dir: str | os.PathLike):
    """The transformers class named by config.json ``architectures`` (AutoModel if none)."""
    import transformers

    arch = (json.loads((Path(config_dir) / "config.json").read_text()).get("architectures") or [None])[0]
    return getattr(transformers, arch, None) if arch else None


def load_pretrained(src: str | os.PathLike) -> tuple[nn.Module, nn.Module, Source]:
    """Load a model directory.

    Returns ``(model, inner, source)``: ``model`` is what the user works with
    (a SentenceTransformer or a transformers model), ``inner`` the transformers
    model whose weights are shared, ``source`` where its files are.
    """
    source = detect(src)
    config_dir = Path(source.path) / source.weights_subdir
    _check_model_type(config_dir)
    if source.kind == SENTENCE_TRANSFORMERS:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(source.path), device="cpu")
        inner = model[0].auto_model
    else:
        from transformers import AutoModel

        cls = model_class(config_dir) or AutoModel
        model = inner = cls.from_pretrained(str(source.path))
    model.eval()
    model._weightshare_source = source  # ws.save copies config/tokenizer files from here
    return model, inner, source


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


def copy_non_weight_files(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy config, tokenizer and module files (everything but weight files), each atomically."""
    src, dest = Path(src), Path(dest)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or path.suffix in WEIGHT_SUFFIXES or rel.parts[0].startswith("."):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)


def load_dense_dir(path: str | os.PathLike, kind: str):
    """Load a plain (exported) model directory of the given kind."""
    if kind == SENTENCE_TRANSFORMERS:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(path), device="cpu")
    from transformers import AutoModel

    cls = model_class(path) or AutoModel
    return cls.from_pretrained(str(path))
