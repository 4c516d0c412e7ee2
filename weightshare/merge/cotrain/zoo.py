"""The models a co-training worker may name, and the built-in data: ``model: cnn``, ``model: path/to/dir``.

A config names things, it never carries code.  A worker's model is one of

- a built-in class, ``MODELS[name](width, classes)``: ``cnn`` and ``gru`` read each 8x8 digit
  (64 features) as 8 rows of 8 pixels through the same kind of input projection, an
  ``nn.Linear(8, width)`` applied to every row (= a Conv2d with kernel (1, 8)); the CNN then runs
  two 1-D convolutions over the rows, the GRU reads the rows in order; both end in a ``tanh``
  feature of size ``width`` and a ``Linear(width, classes)`` head.  So
  ``{"proj.*": "proj.*", "head.*": "head.*"}`` is a subset both hold with the same shapes;
- a directory: a transformers or sentence-transformers model, or a packed one (``ws.save``,
  ``weightshare compress``; its tables train), read as a ``TextClassifier``: the transformer,
  pooled as its sentence-transformers pipeline pools (mean over tokens for a plain transformers
  model), and a linear head.  Its parameters are ``transformer.<the model's own names>`` and
  ``head.weight`` / ``head.bias``, so ``{"transformer.encoder.layer.5.*": "layer5.*", "head.*":
  "head.*"}`` shares a BERT-type model's last layer and the head.

The built-in data set is ``DATA["digits"]()``: scikit-learn's 1,797 digits, 64 pixels scaled to [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from weightshare.merge.cotrain.data import Rows, split_parts, split_test

__all__ = ["DATA", "MODELS", "DigitsCNN", "DigitsGRU", "TextClassifier", "build_model", "digits_parts", "digits_rows",
           "encode"]


class DigitsCNN(nn.Module):
    """Row projection (Linear(8, width) on each row), two Conv1d over the 8 rows, max-pool, tanh feature, head."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.proj = nn.Linear(8, width)
        self.conv1 = nn.Conv1d(width, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 4, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.proj(x.view(-1, 8, 8))).transpose(1, 2)  # (batch, width, 8 rows)
        h = torch.relu(self.conv2(torch.relu(self.conv1(h))))
        h = nn.functional.max_pool1d(h, 2).flatten(1)
        return self.head(torch.tanh(self.fc(h)))


class DigitsGRU(nn.Module):
    """Row projection (Linear(8, width) on each row), a GRU over the 8 rows, its last state, head."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.proj = nn.Linear(8, width)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        _, last = self.gru(torch.relu(self.proj(x.view(-1, 8, 8))))
        return self.head(last[-1])


def digits_rows() -> Rows:
    """scikit-learn's digits (1,797 images, 64 pixels scaled to [0, 1]) as a data set."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return Rows(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y), list(range(10)))


def digits_parts(parts: int, seed: int, test_size: float = 0.25):
    """([(x, y)] * parts disjoint stratified parts of the training split, (x_test, y_test)) of the digits; the
    split and the parts are fixed by ``seed`` (``data.split_test``, ``data.split_parts``)."""
    rows = digits_rows()
    train, test = split_test(rows.y, test_size, seed, "data")
    return [rows.take(p) for p in split_parts(rows.y, train, parts, seed, "data")], rows.take(test)


class TextClassifier(nn.Module):
    """A transformers model, pooled over tokens, and a linear head: what a worker naming a model directory trains.

    ``pooling``: ``"mean"`` (over the attention mask), ``"cls"`` (the first token) or ``"max"``, as the
    sentence-transformers pipeline the model came from pools.  ``encode(texts)`` tokenizes with the model's own
    tokenizer (padded to the longest text, cut at ``max_length`` tokens)."""

    def __init__(self, transformer: nn.Module, classes: int, pooling: str = "mean", tokenizer=None,
                 max_length: int = 256):
        super().__init__()
        if pooling not in ("mean", "cls", "max"):
            raise ValueError(f"TextClassifier: pooling\n  expected one of: mean, cls, max\n  got: {pooling!r}")
        self.transformer, self.pooling, self.tokenizer, self.max_length = transformer, pooling, tokenizer, max_length
        self.head = nn.Linear(transformer.config.hidden_size, classes)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        limit = min(self.max_length, getattr(self.tokenizer, "model_max_length", self.max_length) or self.max_length)
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt"))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        h = self.transformer(**{k: batch[k] for k in keys if k in batch}).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        if self.pooling == "cls":
            pooled = h[:, 0]
        elif self.pooling == "max":
            pooled = h.masked_fill(mask == 0, torch.finfo(h.dtype).min).amax(1)
        else:
            pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)

    @classmethod
    def from_directory(cls, path: str, classes: int, trainable_layers: int | None = None) -> TextClassifier:
        """The model in ``path`` (transformers, sentence-transformers, or packed) with a new ``classes``-way head;
        ``trainable_layers=k`` trains only the last k transformer layers (and the head)."""
        import weightshare as ws
        from weightshare import hub
        from weightshare.pack import is_packed

        pooling = _pooling_of(Path(path))  # refused before any weight is read
        model = ws.load(path, trainable=True) if is_packed(path) else hub.load_pretrained(path)
        inner = hub.inner_model(model)
        out = cls(inner, classes, pooling, hub.tokenizer_of(model))
        if trainable_layers is not None:
            blocks = hub.transformer_blocks(inner)
            if not 0 <= trainable_layers <= len(blocks):
                raise ValueError(f"trainable_layers: the model has {len(blocks)} layers; got {trainable_layers}")
            for p in inner.parameters():
                p.requires_grad_(False)
            for block in list(blocks)[len(blocks) - trainable_layers:]:
                for p in block.parameters():
                    p.requires_grad_(True)
        out.train()
        return out


def _pooling_of(root: Path) -> str:
    """How the sentence-transformers pipeline in ``root`` pools (its Pooling module's config): mean, cls or max;
    "mean" for a plain transformers model.  Other poolings (weighted mean, last token, ...) are refused by name."""
    from weightshare.hub import check_relpath, inside, read_json

    modules = read_json(root / "modules.json", "modules.json") if (root / "modules.json").is_file() else []
    for entry in modules if isinstance(modules, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).rsplit(".", 1)[-1] == "Pooling":
            folder = inside(root, check_relpath(entry.get("path"), "modules.json: Pooling path"), "Pooling path")
            config = read_json(folder / "config.json", "Pooling config.json")
            on = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
            known = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_max_tokens": "max"}
            if len(on) != 1 or on[0] not in known:
                raise ValueError(f"{folder / 'config.json'}: pooling {', '.join(on) or 'none'}; co-training reads "
                                 "mean, cls or max pooling")
            return known[on[0]]
    return "mean"


def build_model(spec, rows: Rows, at: str) -> nn.Module:
    """Worker ``spec``'s model (``spec.model``: a built-in name or a directory) for ``rows`` (its classes, and
    text or features); a model that does not fit the data, or does not load, is a ``ValueError`` naming ``at``."""
    classes = len(rows.names)
    if spec.model in MODELS:
        if rows.is_text:
            raise ValueError(f"{at}.model: {spec.model} reads 8x8 images (64 numbers a row), and the data is text\n"
                             "  name a transformers or sentence-transformers directory instead")
        if rows.inputs.shape[1] != 64:
            raise ValueError(f"{at}.model: {spec.model} reads 8x8 images (64 numbers a row); the data has "
                             f"{rows.inputs.shape[1]}")
        return MODELS[spec.model](spec.width, classes)
    if not rows.is_text:
        raise ValueError(f"{at}.model: a transformers model reads text, and the data holds arrays of numbers\n"
                         "  give it a .jsonl or .csv file of text and labels")
    try:
        return TextClassifier.from_directory(spec.model, classes, spec.trainable_layers)
    except Exception as exc:  # noqa: BLE001 - transformers' loaders raise many types on a bad directory
        first = str(exc).strip().splitlines()
        raise ValueError(f"{at}.model: {spec.model!r} does not load: {first[0] if first else type(exc).__name__}"
                         + "".join(f"\n  {line.strip()}" for line in first[1:3])) from None


def encode(model: nn.Module, x):
    """The model's input for ``x``: texts tokenized by a ``TextClassifier``, features as they are."""
    return model.encode(x) if isinstance(model, TextClassifier) else x


MODELS = {"cnn": DigitsCNN, "gru": DigitsGRU}
DATA = {"digits": digits_rows}
