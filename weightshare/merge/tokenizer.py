"""mergekit's ``tokenizer_source``: merge models whose vocabularies differ by first giving every model's
embedding and LM-head matrices the rows of one output vocabulary.

- ``base``: the base model's tokenizer (else the first model's);
- a model path: that model's tokenizer;
- ``union``: the base tokenizer, then every token of the other models it lacks, in the models' order and
  by id, added as new tokens after the base's (mergekit adds them the same way, in hash order of the
  models: its new ids can change from run to run; ours follow the config).

Each output token's row in each model is the model's own row where it has the token; where it does not,
the row every model gets for it is, as mergekit assigns it (``tokenizer/embed.py``): the row of the one
model that has it; zeros when none has it; the base's row when the base has it; else the mean of the rows
of the models that have it.  So a token only one model knows keeps that model's row through any merge
whose weights sum to one.  The output's ``vocab_size`` is the new vocabulary's size and its tokenizer
files are the output tokenizer's (``save_pretrained``).

The matrices remapped are the 2-D float tensors with one row per token of their model's vocabulary whose
name says embedding or head (``embed``, ``wte``, ``word_embeddings``, ``lm_head``, ``shared``); each is
remapped whole, for all models at once, when the merge reaches it (one matrix per model in memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from weightshare.merge.streaming import MergeError, derived_model

__all__ = ["SOURCES", "remap_vocabularies", "write_tokenizer"]

SOURCES = ("base", "union")  # or a model's path
_EMBED_WORDS = ("embed", "wte", "word_embeddings", "lm_head", "shared")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _tokenizer(model, what: str):
    from transformers import AutoTokenizer

    if model.root is None:
        raise MergeError(f"tokenizer_source: {what} ({model.label}) is not a model directory with tokenizer files")
    folder = model.root / model.weights_subdir
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone: every token would be new
        raise MergeError(f"tokenizer_source: {what} ({model.label}) has no tokenizer files\n  expected: one of "
                         f"{', '.join(_TOKENIZER_FILES)} beside its config.json")
    try:
        return AutoTokenizer.from_pretrained(str(model.root / model.weights_subdir))
    except Exception as exc:  # a missing or unreadable tokenizer: name the model, not transformers' internals
        raise MergeError(f"tokenizer_source: {what} ({model.label}) has no tokenizer that loads "
                         f"({type(exc).__name__}: {str(exc)[:200]})\n  expected: tokenizer files beside its "
                         "config.json") from None


def _vocab_size(model) -> int | None:
    path = None if model.root is None else model.root / model.weights_subdir / "config.json"
    try:
        return json.loads(path.read_text()).get("vocab_size") if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None


def _vocab(tokenizer, size: int | None) -> dict[str, int]:
    """token -> id, the ids below the model's embedding size (mergekit drops the rest)."""
    return {tok: i for tok, i in tokenizer.get_vocab().items() if size is None or i < size}


def remap_vocabularies(models: list, base, source: str):
    """(models, base, output tokenizer): views of ``models`` and ``base`` (opened models) whose embedding
    matrices have the output vocabulary's rows, and the tokenizer to save with the merge."""
    everyone = [*models, *([base] if base is not None else [])]
    donor = base if base is not None else models[0]
    sizes = [_vocab_size(m) for m in everyone]  # each model's config read once
    own = [_vocab(_tokenizer(m, "a model"), size) for m, size in zip(everyone, sizes)]  # token -> row
    if source == "base":
        out = _tokenizer(donor, "the base model" if base is not None else "the first model")
    elif source == "union":
        out = _tokenizer(donor, "the base model" if base is not None else "the first model")
        have = set(out.get_vocab())
        for k, m in enumerate(models):
            if m is donor:
                continue
            new = [t for t, _ in sorted(own[k].items(), key=lambda kv: kv[1]) if t not in have]
            if new:
                out.add_tokens(new)
                have.update(new)
    else:
        matches = [m for m in everyone if str(m.root) == str(Path(source)) or m.label == source]
        if not matches:
            raise MergeError(f"tokenizer_source: {source!r} is neither base, union nor one of the models merged")
        out = _tokenizer(matches[0], source)
    vocab = out.get_vocab()
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise MergeError("tokenizer_source: the output tokenizer's ids are not 0 .. n-1; its vocabulary cannot "
                         "index an embedding matrix")
    base_index = len(models) if base is not None else None
    cache: dict[str, list[torch.Tensor]] = {}

    def is_embedding(k: int, name: str) -> bool:
        shape, dt = everyone[k].meta[name]
        rows = sizes[k]
        return (dt.is_floating_point and len(shape) == 2 and any(w in name for w in _EMBED_WORDS)
                and rows is not None and shape[0] == rows)

    def remapped(name: str) -> list[torch.Tensor]:
        if name not in cache:
            cache.clear()  # one matrix per model at a time
            old = [m.read(name).float() for m in everyone]
            hidden = {t.shape[1] for t in old}
            if len(hidden) != 1:
                raise MergeError(f"tokenizer_source: {name}: widths {sorted(hidden)} differ between the models")
            width = hidden.pop()
            default = torch.zeros(size, width)
            for tok, i in vocab.items():
                holders = [k for k, v in enumerate(own) if tok in v and v[tok] < old[k].shape[0]]
                if len(holders) == 1:
                    default[i] = old[holders[0]][own[holders[0]][tok]]
                elif not holders:
                    continue  # zeros
                elif base_index is not None and base_index in holders:
                    default[i] = old[base_index][own[base_index][tok]]
                else:
                    default[i] = torch.stack([old[k][own[k][tok]] for k in holders]).mean(dim=0)
            out_rows = []
            for k, t in enumerate(old):
                new = default.clone()
                for tok, i in vocab.items():
                    j = own[k].get(tok)
                    if j is not None and j < t.shape[0]:
                        new[i] = t[j]
                out_rows.append(new)
            cache[name] = out_rows
        return cache[name]

    views = []
    for k, m in enumerate(everyone):
        embeds = {n for n in m.meta if is_embedding(k, n)}
        meta = {n: ((size, m.meta[n][0][1]), m.meta[n][1]) if n in embeds else m.meta[n] for n in m.meta}

        def read(name, span=None, m=m, k=k, embeds=embeds):
            if name not in embeds:
                return m.read(name, *(span or ()))
            t = remapped(name)[k].to(m.meta[name][1])
            return t if span is None else t.reshape(-1)[span[0]:span[1]]

        views.append(derived_model(m, meta, read, f"{m.label} (vocabulary remapped)"))
    if not any(is_embedding(k, n) for k, m in enumerate(everyone) for n in m.meta):
        raise MergeError("tokenizer_source: no embedding matrix found to remap (a 2-D tensor with one row per "
                         "token of the model's vocab_size, named embed..., wte, word_embeddings, lm_head)")
    return views[:len(models)], (views[len(models)] if base is not None else None), out


def write_tokenizer(folder: Path, weights_subdir: str, tokenizer) -> None:
    """The output tokenizer's files over the copied ones, and ``vocab_size`` in ``config.json``."""
    target = folder / weights_subdir
    tokenizer.save_pretrained(str(target))
    config = target / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["vocab_size"] = len(tokenizer.get_vocab())
        config.write_text(json.dumps(data, indent=2) + "\n")
