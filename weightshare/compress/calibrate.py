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
from torch.nn.utils import parametrize

from weightshare._progress import progress
from weightshare.hub import is_transposed_linear

__all__ = ["importance_from_texts", "input_second_moments", "read_texts", "sequential_codebooks_", "text_batches"]

log = logging.getLogger(__name__)


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one calibration text each."""
    p = Path(path)
    if not p.is_file():
        raise ValueError("calibration file not found\n  expected: a UTF-8 text file, one text per line\n"
                         f"  got: {str(path)!r}")
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
            raise ValueError(f"input_second_moments: {name}\n  expected: the weight of an nn.Linear\n"
                             f"  got: {type(owner).__name__}")
        hooks.append(owner.register_forward_pre_hook(hook_for(name)))
    _calibration_pass(model, tokenizer, texts, batch_size, max_length, state, hooks)
    return {n: (sums[n] / max(state["tokens"], 1)).float() for n in names if n in sums}


# ----------------------------------------------------------------------------- sequential calibration


class Enough(Exception):
    """Raised by a hook once a calibration pass has seen every input it needs: the rest of the model is skipped."""


def text_batches(tokenizer, texts: list[str], batch_size: int = 32, max_length: int | None = None) -> list[dict]:
    """Tokenized calibration batches (dicts a transformers model takes), longest texts truncated with a warning."""
    if not texts:
        raise ValueError("calibration: no texts\n  expected: at least one non-empty line of text")
    limit = max_length or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    batches, cut = [], 0
    pad = getattr(tokenizer, "pad_token", None)
    if pad is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs have none; padding is masked out of every statistic
    try:
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            probe = tokenizer(chunk, truncation=True, max_length=limit + 1)["input_ids"]  # one over: "longer than"
            cut += sum(len(ids) > limit for ids in probe)
            batches.append(dict(tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt")))
    finally:
        if pad is None:
            tokenizer.pad_token = None
    if cut:
        log.warning("calibration: %d of %d texts are longer than %d tokens and were truncated", cut, len(texts), limit)
    return batches


def takes_calibration(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_transposed_linear(module) or _is_conv(module)


def _is_conv(module: nn.Module) -> bool:
    """A Conv2d GPTQ treats as the Linear it is over unfolded patches (im2col): one group, zero padding."""
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)


def _conv_rows(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A Conv2d's input as the rows its flattened weight (out, in·kh·kw) multiplies."""
    cols = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def call(model: nn.Module, batch):
    """``model`` on one calibration batch: a dict of keyword inputs, a tuple of positional ones, or a tensor."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batches(model: nn.Module, batches, state: dict) -> None:
    """Every batch through ``model`` (until a hook has seen enough); ``state["mask"]`` marks real tokens."""
    for batch in batches:
        state["mask"] = (batch["attention_mask"].bool() if isinstance(batch, dict) and "attention_mask" in batch
                         else None)
        try:
            call(model, batch)
        except Enough:
            pass


def token_rows(x: torch.Tensor, mask) -> torch.Tensor:
    """A layer input as (tokens, features), padding left out."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        x = x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def layer_statistics(model: nn.Module, modules: dict[str, nn.Module], batches, stop_after: str | None = None,
                     share: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One calibration pass: for each Linear of ``modules`` the second moment ``H = XᵀX / n`` (float64) of
    its inputs over real tokens, for each Embedding how often each row is looked up.  Returns
    ``(statistics, tokens)``; a module no batch reached has no entry.  ``stop_after``: a module whose
    input ends the pass (the rest of the model is not run).  Layers fed the same input tensor get one H
    (``share``): a 7 B block's q, k, v, gate and up need two matrices of 134 MB and two products, not five."""
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    state: dict = {"mask": None}
    # Layers fed the very same input tensor (a block's q, k and v; gate and up) share one H, computed once per batch.
    # ``seen`` holds this batch's inputs (so that no id is reused while it lasts) and the layer that took each
    # first; ``same[name]`` is that layer, found in the first batch and checked in every other (a model whose
    # layers share inputs in one batch and not in another is measured again without sharing).
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    same: dict[str, str] = {}
    state["batches"] = 0

    def new_batch(mod, args):
        seen.clear()
        state["batches"] += 1

    def hook_for(name, module):
        def linear(mod, args):
            x = args[0].detach()
            if share and not _is_conv(mod):
                hit = seen.get(id(args[0]))
                first = None if hit is None else hit[1]
                if state["batches"] == 1 and first is not None:
                    same[name] = first
                elif same.get(name) != first:
                    raise _Diverged
                if first is None:
                    seen[id(args[0])] = (args[0], name)
                else:
                    tokens[name] = tokens.get(name, 0) + _token_count(x, state["mask"])
                    if name == stop_after:
                        raise Enough
                    return
            x = (_conv_rows(mod, x) if _is_conv(mod) else token_rows(x, state["mask"])).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.t() @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
            if name == stop_after:
                raise Enough

        def embedding(mod, args):
            ids, mask = args[0], state["mask"]
            if mask is not None and ids.shape == mask.shape:
                ids = ids[mask]
            sums[name] = sums.get(name, 0) + torch.bincount(ids.reshape(-1), minlength=mod.num_embeddings).double()
            tokens[name] = tokens.get(name, 0) + ids.numel()
        return embedding if isinstance(module, nn.Embedding) else linear

    hooks = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules.items()]
    hooks.append(model.register_forward_pre_hook(new_batch))
    was_training = model.training
    model.eval()
    diverged = False
    try:
        run_batches(model, batches, state)
    except _Diverged:
        diverged = True
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        seen.clear()
    if diverged:
        return layer_statistics(model, modules, batches, stop_after, share=False)
    stats = {n: sums[n] if isinstance(modules[n], nn.Embedding) else sums[n] / tokens[n] for n in sums}
    stats.update({n: stats[f] for n, f in same.items() if f in stats})  # one tensor for all: never changed in place
    return stats, tokens


class _Diverged(Exception):
    """Layers that shared an input in the first batch do not in a later one (``layer_statistics``)."""


def _token_count(x: torch.Tensor, mask) -> int:
    """The rows ``token_rows`` would give, without gathering them."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return int(mask.sum())
    return x.numel() // x.shape[-1]


def _execution_order(model: nn.Module, batch, modules: dict[str, nn.Module]) -> list[str]:
    """Names of ``modules`` in the order one forward pass first calls them.  A layer never called (its weight
    read directly, as Mamba's ``dt_proj``) comes right after the last called layer of its own transformer block,
    as ``blockwise.py`` fits it, calibrated on nothing; outside the blocks, last."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
             for n, m in modules.items()]
    try:
        run_batches(model, [batch], {})
    finally:
        for h in hooks:
            h.remove()
    block = _block_of(model)
    for n in [n for n in modules if n not in order]:
        mine = [k for k, o in enumerate(order) if block(o) is not None and block(o) == block(n)]
        order.insert(mine[-1] + 1 if mine else len(order), n)
    return order


def _block_of(model: nn.Module):
    """name -> the index of the transformer block it is in (None outside the blocks, or without blocks)."""
    from weightshare.hub import transformer_blocks

    try:
        blocks = transformer_blocks(model)
    except ValueError:
        return lambda name: None
    index = {id(b): i for i, b in enumerate(blocks)}
    prefixes = [(fqn + ".", index[id(m)]) for fqn, m in model.named_modules() if id(m) in index]

    def block(name):
        return next((i for p, i in prefixes if name.startswith(p)), None)
    return block


def _stages(model: nn.Module, order: list[str]) -> list[list[str]]:
    """Consecutive layers of one transformer block form one stage (they see the earlier blocks compressed);
    a layer outside the blocks is a stage of its own."""
    block = _block_of(model)
    stages: list[list[str]] = []
    last = object()
    for name in order:
        b = block(name)
        if b is None or b != last:
            stages.append([name])
        else:
            stages[-1].append(name)
        last = b if b is not None else object()
    return stages


@torch.no_grad()
def _keep_exact(param, mask, weight: torch.Tensor, table_dtype: torch.dtype) -> int:
    """Install the ``mask``ed weights (over the parametrization's layout) as exact outliers; their count."""
    if mask is None:
        return 0
    index = mask.reshape(-1).nonzero().squeeze(1)
    values = weight.reshape(-1)[index].to(table_dtype).to(weight.dtype)  # the file stores them in the table dtype
    param.set_outliers(index, values)
    return int(index.numel())


def cluster_embeddings_(model: nn.Module, tied: dict[str, nn.Module], batches, config, configs: dict | None,
                        outliers: float, stop_at: nn.Module | None = None) -> dict:
    """Cluster the embeddings of ``tied`` (and the layers sharing their weights) by k-means weighted with how often
    each row is looked up in ``batches`` (embeddings have no input activations).  ``stop_at``: a module whose call
    ends each pass (the first transformer block: the rest of the model is not needed).  Their results."""
    from weightshare.compress.gptq import select_outliers
    from weightshare.sharing.codebook import TABLE_DTYPES, codebook_model_

    embeddings = {n: m for n, m in tied.items() if isinstance(m, nn.Embedding)}
    stop = stop_at.register_forward_pre_hook(stop_pass) if stop_at is not None else None
    try:
        counts, _ = layer_statistics(model, embeddings, batches)
    finally:
        if stop is not None:
            stop.remove()
    masks = {n: select_outliers(tied[n].weight, None, outliers) for n in counts}
    importance = {}
    for n in counts:
        imp = (1.0 + counts[n].float())[:, None].expand_as(tied[n].weight)
        # exact weights weigh nothing in the k-means
        importance[f"{n}.weight"] = imp.contiguous() if masks[n] is None else imp * ~masks[n]
    exact = {n: tied[n].weight.detach().clone() for n, m in masks.items() if m is not None}
    codebook_model_(model, config, filter_fn=lambda m, n: n in tied, importance=importance, configs=configs)
    results = {}
    for n, weight in exact.items():
        cfg = (configs or {}).get(n, config)
        count = _keep_exact(tied[n].parametrizations.weight[0], masks[n], weight, TABLE_DTYPES[cfg.table_dtype])
        results[f"{n}.weight"] = {"outliers": count}
    return results


def stop_pass(module, args):
    """A forward pre-hook that ends the calibration pass at its module (``run_batches`` catches it)."""
    raise Enough


@torch.no_grad()
def fit_layer_(module: nn.Module, name: str, H: torch.Tensor | None, tokens: int, cfg, alternations: int,
               outliers: float) -> dict:
    """Fit one Linear's (or Conv2d's) tables and labels to its inputs' second moment ``H`` (``gptq.fit_codebook``;
    the identity where no calibration input reached it) and install them; its result."""
    from weightshare.compress.gptq import fit_codebook, select_outliers
    from weightshare.sharing.codebook import TABLE_DTYPES, codebook_

    transposed = is_transposed_linear(module)
    W = module.weight.detach().t() if transposed else module.weight.detach()
    W = W.reshape(W.shape[0], -1)  # a Conv2d's (out, in, kh, kw) as (out, in·kh·kw)
    H = H if H is not None else torch.eye(W.shape[1], dtype=torch.float64)
    W = W.contiguous()
    mask = select_outliers(W, torch.diagonal(H).clamp_min(0)[None, :], outliers)
    fit = fit_codebook(W, H, cfg.bits,
                       group_size=cfg.group_size if cfg.granularity == "per_group" else None,
                       per_tensor=cfg.granularity == "per_tensor",
                       table_dtype=TABLE_DTYPES[cfg.table_dtype],
                       alternations=alternations, outliers=mask)
    tables = fit.tables.reshape(-1, fit.tables.shape[2]).to(module.weight.dtype)
    W = W.clone()  # the parametrization below replaces the weight this views
    codebook_(module, "weight", cfg, init=(tables, fit.labels.reshape(-1)), fqn=f"{name}.weight")
    count = _keep_exact(module.parametrizations.weight[0], mask, W, TABLE_DTYPES[cfg.table_dtype])
    return {"objective": fit.objective, "nearest": fit.history[0][1], "tokens": tokens, "outliers": count}


def sequential_codebooks_(model: nn.Module, config, batches, filter_fn=None, alternations: int = 2,
                          configs: dict | None = None, outliers: float = 0.0) -> dict:
    """Codebooks fit to calibration data, layer after layer, in place (GPTQ on a codebook).

    Embeddings first, by importance-weighted k-means (token counts in ``batches``).
    Then the Linear layers, one transformer block at a time: the inputs' second
    moment ``H = XᵀX / n`` of each layer of the block is collected with the earlier
    blocks already compressed (the pass stops after the block), and the layer's
    tables and labels are fit by ``gptq.fit_codebook``.  Memory: one batch's
    activations and the block's ``H`` matrices.  ``batches``: a list of model inputs
    (dicts of tensors for a transformers model, tensors or tuples for any module).
    ``configs`` maps module names to their own ``CodebookConfig`` (mixed bits); the others get ``config``.
    ``outliers``: the fraction of each tensor's weights kept exact beside its codebook
    (``gptq.select_outliers``: largest ``|w|·sqrt(diag H)``, ``|w|`` in an embedding).

    Returns ``{weight name: {"objective", "nearest", "tokens"}}``: the layer objective
    reached and that of plain nearest-entry assignment with k-means tables.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibration: no batches\n  expected: at least one input batch")
    keep = filter_fn or (lambda m, n: True)
    chosen = {fqn: m for fqn, m in model.named_modules()
              if (takes_calibration(m) or isinstance(m, nn.Embedding)) and keep(m, fqn)
              and not parametrize.is_parametrized(m, "weight")}
    embedding_weights = {id(m.weight) for m in chosen.values() if isinstance(m, nn.Embedding)}
    tied = {fqn for fqn, m in chosen.items() if isinstance(m, nn.Embedding) or id(m.weight) in embedding_weights}
    linears = {fqn: m for fqn, m in chosen.items() if fqn not in tied}
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    try:
        if tied:  # embeddings have no input activations: weighted by how often each row is looked up
            results.update(cluster_embeddings_(model, {n: chosen[n] for n in tied}, batches, config, configs, outliers))
        order = _execution_order(model, batches[0], linears)
        stages = _stages(model, order)
        configs = configs or {}
        bar = progress(total=len(order), desc="calibrated codebooks", unit="layer")
        for stage in stages:
            stats, tokens = layer_statistics(model, {n: linears[n] for n in stage}, batches, stop_after=stage[-1])
            for name in stage:
                results[f"{name}.weight"] = fit_layer_(linears[name], name, stats.get(name), tokens.get(name, 0),
                                                       configs.get(name, config), alternations, outliers)
                bar.update(1)
            del stats, tokens  # before the next stage's are gathered: a 7 B block's are GBs
        bar.close()
    finally:
        model.train(was_training)
    return results
