"""Calibration statistics for data-aware clustering.

For a Linear layer y = W x, the output error of a perturbed weight is
E||ΔW x||² ≈ Σ_rc ΔW_rc² E[x_c²] when input features are roughly uncorrelated
(the diagonal-Hessian proxy used by activation-aware quantizers). So each weight
W_rc is clustered with importance E[x_c²]: features the data drives hard get
centroids close to their weights.  Embedding rows are weighted by how often
their token (or position) occurs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from weightshare._progress import progress
from weightshare.sharing.codebook import is_transposed_linear

__all__ = ["read_texts", "importance_from_texts", "input_second_moments"]

log = logging.getLogger(__name__)


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one calibration text each."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"calibration file not found\n  expected: a UTF-8 text file, one text per line\n  got: {str(path)!r}")
    try:
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"calibration file is not UTF-8 text: {str(path)!r} ({exc})") from None
    if not texts:
        raise ValueError(f"calibration file has no text lines: {str(path)!r}")
    return texts[:limit]


@torch.no_grad()
def importance_from_texts(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
                          max_length: int = 128, filter_fn=None) -> dict[str, torch.Tensor]:
    """Per-element clustering importance for every Linear and Embedding weight of a transformers model.

    Returns ``{weight name: (out, in) tensor}``; Linear rows share E[x_c²] over
    the non-padding tokens of ``texts``, Embedding rows get 1 + occurrence count.
    """
    sums: dict[str, torch.Tensor] = {}
    state = {"mask": None, "tokens": 0}
    hooks = []

    def linear_hook(name):
        def hook(module, args):
            x = args[0].detach().float()  # (B, T, in) or (N, in)
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]  # (tokens, in): padding carries no information
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return hook

    def embedding_hook(name):
        def hook(module, args):
            ids = args[0]
            mask = state["mask"]
            if mask is not None and ids.shape == mask.shape:
                ids = ids[mask]
            counts = torch.bincount(ids.reshape(-1), minlength=module.num_embeddings).float()
            sums[name] = sums.get(name, 0) + counts
        return hook

    for fqn, module in model.named_modules():
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        if isinstance(module, nn.Linear) or is_transposed_linear(module):
            hooks.append(module.register_forward_pre_hook(linear_hook(f"{fqn}.weight")))
        elif isinstance(module, nn.Embedding):
            hooks.append(module.register_forward_pre_hook(embedding_hook(f"{fqn}.weight")))
    _calibration_pass(model, tokenizer, texts, batch_size, max_length, state, hooks)
    out = {}
    for fqn, module in model.named_modules():
        name = f"{fqn}.weight"
        if name not in sums:
            continue
        if isinstance(module, nn.Linear) or is_transposed_linear(module):
            second = sums[name] / max(state["tokens"], 1)  # E[x_c^2], (in,)
            # a floor keeps features the calibration never drove from being ignored entirely
            second = second + 1e-3 * second.mean() + 1e-12
            per_input = second[:, None] if is_transposed_linear(module) else second  # Conv1D weight is (in, out)
            out[name] = per_input.expand_as(module.weight).contiguous()
        else:
            out[name] = (1.0 + sums[name])[:, None].expand_as(module.weight).contiguous()
    log.info("calibrated on %d texts (%d tokens)", len(texts), state["tokens"])
    return out


def _calibration_pass(model, tokenizer, texts, batch_size, max_length, state, hooks) -> None:
    """Run ``texts`` through ``model`` in eval mode with ``hooks`` registered; ``state["mask"]`` marks real tokens."""
    was_training = model.training
    model.eval()
    try:
        for s in progress(range(0, len(texts), batch_size), desc="calibration", unit="batch"):
            batch = tokenizer(texts[s : s + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            state["mask"] = batch["attention_mask"].bool()
            state["tokens"] += int(state["mask"].sum())
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def input_second_moments(model: nn.Module, tokenizer, texts: list[str], names: list[str], batch_size: int = 32,
                         max_length: int = 128) -> dict[str, torch.Tensor]:
    """E[x x^T] (in, in) of the inputs of the Linear layers whose weights are ``names``, over real tokens.

    The full second moment (not its diagonal): whitened SVD (Basis Sharing, SVD-LLM)
    truncates in the metric of the layer's outputs.
    """
    sums: dict[str, torch.Tensor] = {}
    state = {"mask": None, "tokens": 0}
    hooks = []

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().double()
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + x.t() @ x
        return hook

    for name in names:
        owner = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(owner, nn.Linear):
            raise ValueError(f"input_second_moments: {name}\n  expected: the weight of an nn.Linear\n  got: {type(owner).__name__}")
        hooks.append(owner.register_forward_pre_hook(hook_for(name)))
    _calibration_pass(model, tokenizer, texts, batch_size, max_length, state, hooks)
    return {n: (sums[n] / max(state["tokens"], 1)).float() for n in names if n in sums}
