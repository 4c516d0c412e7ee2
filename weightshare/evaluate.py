"""Fidelity of a compressed model on the user's own data: how far it moved from the model it came from.

``evaluate(model, reference, data)`` runs both models on the same texts and measures
what the model is for:

- a sentence-transformers pipeline (or a bare encoder, mean-pooled): the cosine between
  the two embeddings of each text (mean and 1st percentile) and the overlap of each
  text's k nearest neighbours among the others (the figures ``bench minilm`` prints);
- a causal language model: the perplexity of each model on the texts and how often
  the two predict the same next token;
- a model with a sequence-classification head: the accuracy of each on labelled data
  (CSV or JSON lines with a label field) and how often the two predict the same label.

Data is a text file (one text per line), a CSV file with a header, or JSON lines
(``.jsonl``), read by ``read_data``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["Evaluation", "evaluate", "embedding_fidelity", "read_data", "open_model"]

TEXT_FIELDS = ("text", "sentence", "sentence1", "content", "prompt")  # the first one a file has is the text
LABEL_FIELDS = ("label", "labels", "class", "target")
LOGIT_BUDGET = 1 << 25  # floats of logits held at once in a perplexity batch (128 MB)


def read_data(path: str | Path, text_field: str | None = None, label_field: str | None = None,
              limit: int | None = None, flag: str = "--data",
              field_flags: tuple[str, str] = ("--text-field", "--label-field")) -> tuple[list[str], list | None]:
    """Texts (and labels, where the file has them) from ``path``.

    ``.csv``: a header row, the text in ``text_field`` (default: the first of
    ``TEXT_FIELDS`` the header has), labels in ``label_field`` (default: the first of
    ``LABEL_FIELDS``, if any).  ``.jsonl``: one JSON object per line, the same fields.
    Anything else: UTF-8 text, one text per non-empty line, no labels.  Errors name ``flag``,
    and ``field_flags`` where the user names the two fields (a YAML key, for a config file).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {str(path)!r}: no such file (a text file with one text per line, .csv or .jsonl)")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {str(path)!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    suffix = p.suffix.lower()
    if suffix == ".csv":
        try:
            rows = list(csv.DictReader(raw.splitlines()))
        except csv.Error as exc:
            raise ValueError(f"{flag} {str(path)!r}: not a readable CSV file ({exc})") from None
        where = lambda i: f"row {i + 2}"  # noqa: E731 - the header is row 1
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{flag} {str(path)!r}: line {n} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{flag} {str(path)!r}: line {n} is not a JSON object")
            rows.append(row)
        where = lambda i: f"record {i + 1}"  # noqa: E731
    else:
        if text_field or label_field:
            raise ValueError(f"{flag} {str(path)!r}: {' and '.join(field_flags)} need a .csv or .jsonl file")
        texts = [line.strip() for line in raw.splitlines() if line.strip()][:limit]
        if not texts:
            raise ValueError(f"{flag} {str(path)!r}: no text lines")
        return texts, None
    if not rows:
        raise ValueError(f"{flag} {str(path)!r}: no records")
    fields = list(rows[0])
    text_key = text_field or next((f for f in TEXT_FIELDS if f in fields), None)
    if text_key not in fields:
        raise ValueError(f"{flag} {str(path)!r}: no text field {text_key or ''!r} "
                         f"(fields: {', '.join(map(str, fields))}); "
                         f"name it with {field_flags[0]}")
    if label_field and label_field not in fields:
        raise ValueError(f"{flag} {str(path)!r}: no label field {label_field!r} "
                         f"(fields: {', '.join(map(str, fields))}); name it with {field_flags[1]}")
    label_key = label_field or next((f for f in LABEL_FIELDS if f in fields), None)
    rows = rows[:limit]
    texts, labels = [], []
    for i, row in enumerate(rows):
        text = row.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{flag} {str(path)!r}: {where(i)} has no text in {text_key!r}")
        texts.append(text.strip())
        if label_key is not None:
            if row.get(label_key) in (None, ""):
                raise ValueError(f"{flag} {str(path)!r}: {where(i)} has no label in {label_key!r}")
            labels.append(row[label_key])
    return texts, (labels if label_key is not None else None)


def open_model(path: str | Path, flag: str) -> nn.Module:
    """A packed directory through ``ws.load`` (its packed modules, as a user runs it), any other model
    directory through ``hub.load_pretrained``."""
    from weightshare import hub, pack
    from weightshare.load import load

    p = Path(path)
    if pack.is_packed(p):
        return load(p)
    try:
        return hub.load_pretrained(p)
    except ValueError as exc:
        raise ValueError(f"{flag} {str(path)!r}: {str(exc).splitlines()[0]}") from None


def _kind(model: nn.Module) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    from weightshare.hub import inner_model

    if inner_model(model) is not model:
        return "sentence-transformers"
    name = type(model).__name__
    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal-lm"
    if name in set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
        return "classifier"
    return "encoder"


@dataclass
class Evaluation:
    """What ``evaluate`` measured: ``metrics`` (the compressed model against the reference) and the
    size of each."""

    kind: str  # sentence-transformers | encoder | causal-lm | classifier
    texts: int
    metrics: dict[str, float] = field(default_factory=dict)
    size_mb: float = 0.0  # the compressed model packed, as `inspect` reports it
    reference_size_mb: float = 0.0
    bits_per_weight: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "texts": self.texts, **self.metrics, "size_mb": self.size_mb,
                "reference_size_mb": self.reference_size_mb, "bits_per_weight": self.bits_per_weight,
                "seconds": self.seconds}

    def __str__(self) -> str:
        from weightshare.report import table

        row = {"size_mb": self.size_mb, "bpw": self.bits_per_weight, **self.metrics}
        title = (f"{self.kind} model on {self.texts} texts, against the reference "
                 f"({self.reference_size_mb:.2f} MB); measured in {self.seconds:.1f} s")
        return table([row], title) + "\n" + _EXPLAIN[self.kind]


_EXPLAIN = {
    "sentence-transformers": "cos_*: cosine between the two models' embedding of each text (mean, 1st percentile); "
                             "topK_overlap: share of each text's k nearest neighbours both models agree on",
    "encoder": "cos_*: cosine between the two models' mean-pooled last hidden states (mean, 1st percentile); "
               "topK_overlap: share of each text's k nearest neighbours both models agree on",
    "causal-lm": "perplexity of each model on the texts; next_token_agreement: share of positions where both "
                 "predict the same token",
    "classifier": "accuracy of each model on the labels; agreement: share of texts both give the same label",
}


def embedding_fidelity(reference: torch.Tensor, emb: torch.Tensor, k: int = 10) -> dict:
    """Cosine statistics and top-k neighbour overlap between two (N, d) embedding sets (row i: the same text).

    ``k`` is cut to N - 1 (the neighbours a text has); with one text there is no overlap.
    """
    reference, emb = reference.float(), emb.float()
    cos = torch.nn.functional.cosine_similarity(reference, emb, dim=1).double().numpy()
    out = {"cos_mean": float(cos.mean()), "cos_p1": float(np.percentile(cos, 1))}
    n = reference.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return out
    a = torch.nn.functional.normalize(reference, dim=1)
    b = torch.nn.functional.normalize(emb, dim=1)
    agree = 0
    for s in range(0, n, 1024):  # N x N similarities a block of rows at a time: 100 k texts fit in memory
        rows = torch.arange(s, min(s + 1024, n))
        sa, sb = a[rows] @ a.t(), b[rows] @ b.t()
        sa[torch.arange(len(rows)), rows] = -2  # a text is not its own neighbour
        sb[torch.arange(len(rows)), rows] = -2
        na, nb = sa.topk(k, dim=1).indices, sb.topk(k, dim=1).indices
        # neighbours in both lists: pairs of equal entries (each list has distinct entries)
        agree += int((na.unsqueeze(2) == nb.unsqueeze(1)).sum())
    out[f"top{k}_overlap"] = agree / (n * k)
    return out


def _embed(model: nn.Module, kind: str, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    if kind == "sentence-transformers":
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    from weightshare.compress.calibrate import text_batches

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # like lengths together: less padding
    out = []
    for batch in text_batches(tokenizer, [texts[i] for i in order], batch_size):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    emb = torch.cat(out).float()
    return emb[torch.argsort(torch.tensor(order))]


def _lm_batches(tokenizer, texts: list[str], vocab: int, max_length: int) -> list[dict]:
    """Batches of texts of similar length, each holding at most ``LOGIT_BUDGET`` logits."""
    from weightshare.compress.calibrate import text_batches

    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches, s = [], 0
    while s < len(order):
        e = s + 1
        while e < len(order) and (e - s + 1) * lengths[order[e]] * vocab <= LOGIT_BUDGET:
            e += 1
        batches += text_batches(tokenizer, [texts[i] for i in order[s:e]], batch_size=e - s, max_length=max_length)
        s = e
    return batches


def _causal_lm(model: nn.Module, reference: nn.Module, tokenizer, texts: list[str]) -> dict:
    """Perplexity of both models (exp of the mean negative log-likelihood of every predicted token, padding
    excluded) and the share of positions where their most likely next tokens agree."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 50_000)  # the head's width, without decoding a packed head
    limit = min(int(getattr(model.config, "max_position_embeddings", 0) or 1024), 1024)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # positions count from the first token of each text
    try:
        batches = _lm_batches(tokenizer, texts, vocab, limit)
    finally:
        tokenizer.padding_side = side
    nll = {"model": 0.0, "reference": 0.0}
    tokens = agree = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        target, keep = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()
        top = {}
        for name, m in (("model", model), ("reference", reference)):
            logits = m(**batch).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            nll[name] -= float(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].double().sum())
            top[name] = logits.argmax(-1)[keep]
        tokens += int(keep.sum())
        agree += int((top["model"] == top["reference"]).sum())
    if tokens == 0:
        raise ValueError("--data: every text is one token or less; perplexity needs texts of two tokens or more")
    return {"perplexity": math.exp(nll["model"] / tokens), "perplexity_reference": math.exp(nll["reference"] / tokens),
            "next_token_agreement": agree / tokens, "tokens": tokens}


def _label_ids(model: nn.Module, labels: list) -> torch.Tensor:
    """The file's labels as the model's class ids: names through ``config.label2id``, or integers."""
    label2id = {str(k): int(v) for k, v in (getattr(model.config, "label2id", None) or {}).items()}
    n = int(model.config.num_labels)
    ids = []
    for i, label in enumerate(labels):
        s = str(label).strip()
        if s in label2id:
            ids.append(label2id[s])
        elif s.lstrip("-").isdigit() and 0 <= int(s) < n:
            ids.append(int(s))
        else:
            names = ", ".join(sorted(label2id)) if label2id else f"0..{n - 1}"
            raise ValueError(f"--data: label {label!r} of text {i + 1} is not one of the model's labels ({names})")
    return torch.tensor(ids)


def _classifier(model: nn.Module, reference: nn.Module, tokenizer, texts: list[str], labels, batch_size: int) -> dict:
    from weightshare.compress.calibrate import text_batches

    preds = {"model": [], "reference": []}
    for batch in text_batches(tokenizer, texts, batch_size):
        for name, m in (("model", model), ("reference", reference)):
            preds[name].append(m(**batch).logits.argmax(-1))
    p, r = torch.cat(preds["model"]), torch.cat(preds["reference"])
    out = {}
    if labels is not None:
        y = _label_ids(model, labels)
        out = {"accuracy": float((p == y).double().mean()), "accuracy_reference": float((r == y).double().mean())}
    return {**out, "agreement": float((p == r).double().mean())}


@torch.no_grad()
def evaluate(model: nn.Module, reference: nn.Module, texts: list[str], labels: list | None = None,
             k: int = 10, batch_size: int = 32) -> Evaluation:
    """Measure ``model`` (compressed) against ``reference`` (the model it came from) on ``texts``.

    Both are models as ``ws.load`` / ``hub.load_pretrained`` return them, of the same
    kind; ``labels`` (one per text) give classifiers their accuracy.
    """
    from weightshare.hub import tokenizer_of
    from weightshare.report import report

    kind, ref_kind = _kind(model), _kind(reference)
    if kind != ref_kind:
        raise ValueError(f"the model is a {kind} model and the --reference a {ref_kind} model: "
                         "give the model the compressed one was made from")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"--data: {len(labels)} labels for {len(texts)} texts")
    if not texts:
        raise ValueError("--data: no texts")
    model.eval(), reference.eval()
    t0 = time.perf_counter()
    tokenizer = None if kind == "sentence-transformers" else tokenizer_of(model)
    if kind in ("sentence-transformers", "encoder"):
        metrics = embedding_fidelity(_embed(reference, kind, tokenizer, texts, batch_size),
                                     _embed(model, kind, tokenizer, texts, batch_size), k)
    elif kind == "causal-lm":
        metrics = _causal_lm(model, reference, tokenizer, texts)
    else:
        metrics = _classifier(model, reference, tokenizer, texts, labels, batch_size)
    seconds = time.perf_counter() - t0
    ours, theirs = report(model), report(reference)
    return Evaluation(kind, len(texts), metrics, ours.bytes_packed / 1e6, theirs.bytes_packed / 1e6,
                      ours.bits_per_weight, seconds)
