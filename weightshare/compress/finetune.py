"""Table fine-tuning by distillation: the labels stay, the tables learn to give the original's outputs.

After clustering, every codebook's tables are trained (Adam, warm-up and cosine decay, through the one
training loop, ``multitask/trainer.train``) so that the compressed model's last hidden states match
the original model's on the calibration texts: loss = token-mean (1 − cos) of the states plus
(1 − cos) of their masked mean (the sentence embedding of a mean-pooling model).  Any other module,
calibrated on its own input batches, matches the original's outputs by relative squared error
(scale-free: logits and features alike).  A held-out slice of the calibration texts (or batches)
stops training once its loss stops falling, and the best tables are kept:
untuned training at 4 bits overfit and lowered the 1st-percentile cosine.  Tables end rounded to the
dtype the packed file stores, so that what was validated is what is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from weightshare.compress.calibrate import call

__all__ = ["DistillConfig", "FinetuneConfig", "distill_", "finetune_tables_", "learning_rate", "objective"]

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    steps: int = 150  # optimizer steps, rounded up to whole epochs (early stopping may end sooner)
    batch_size: int = 8
    lr: float | None = None  # None: scaled by bits (3e-4 at 3 bits, more where more error is left)
    warmup_steps: int = 20
    holdout: float = 0.125  # fraction of the calibration texts that only decides when to stop
    patience: int = 1  # epochs without a better held-out loss before stopping
    seed: int = 0
    norms: bool = False  # also train the LayerNorm weights and biases (stored dense: exact in the file)

    def __post_init__(self):
        for key in ("steps", "batch_size", "patience"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FinetuneConfig.{key}\n  expected: a positive integer\n  got: {v!r}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"FinetuneConfig.holdout\n  expected: a fraction in (0, 1)\n  got: {self.holdout!r}")


def learning_rate(bits: int) -> float:
    """3e-4 at 3 bits (FIDELITY-NOTES), x sqrt(2) per bit less, / sqrt(2) per bit more."""
    return 3e-4 * math.sqrt(2.0) ** (3 - bits)


class _Student(nn.Module):
    """The model under training as ``train`` sees it: rows of (ids, mask) in, last hidden states out,
    padded back to the common length; always in eval mode (no dropout: the targets are deterministic)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True):
        super().train(mode)
        self.inner.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        T = int(mask.sum(1).max())  # right-padded: the batch's own length
        h = self.inner(input_ids=ids[:, :T], attention_mask=mask[:, :T]).last_hidden_state
        return nn.functional.pad(h, (0, 0, 0, x.shape[2] - T))


def _loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target, mask = y[..., :-1], y[..., -1]
    m = mask[..., None]
    tok = 1 - nn.functional.cosine_similarity(h, target, dim=-1)
    token_loss = (tok * mask).sum() / mask.sum()
    pooled = lambda s: (s * m).sum(1) / m.sum(1)  # noqa: E731
    sentence_loss = (1 - nn.functional.cosine_similarity(pooled(h), pooled(target), dim=-1)).mean()
    return token_loss + sentence_loss


def _stack(batches: list[dict]) -> torch.Tensor:
    """(N, 2, T) ids and attention masks of right-padded batches, padded to one length."""
    T = max(int(b["input_ids"].shape[1]) for b in batches)
    rows = []
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        if bool((mask[:, :-1] < mask[:, 1:]).any()):
            raise ValueError("table fine-tuning: left-padded batches\n  expected: a tokenizer padding on the right")
        pad = (0, T - ids.shape[1])
        rows.append(torch.stack([nn.functional.pad(ids, pad), nn.functional.pad(mask, pad)], 1))
    return torch.cat(rows)


def _first_tensor(out) -> torch.Tensor:
    """A module's output as one tensor: itself, the first tensor of a tuple, or of a dict / ModelOutput
    (``last_hidden_state``, ``logits``, ... whichever comes first)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError(f"table fine-tuning: the model returned {type(out).__name__}\n  expected: a tensor, or a "
                     "tuple / dict whose first tensor is the output to match")


class _BatchStudent(nn.Module):
    """Any module as ``train`` sees it: rows are numbers of the user's calibration batches, the output is
    the concatenation of the module's outputs on them (eval mode: deterministic targets)."""

    def __init__(self, inner: nn.Module, batches: list):
        super().__init__()
        self.inner, self.batches = inner, batches

    def train(self, mode: bool = True):
        super().train(mode)
        self.inner.eval()
        return self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([_first_tensor(call(self.inner, self.batches[int(i)])).flatten() for i in idx])


def _relative_error(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||h - t||² / ||t||²: scale-free, for logits and features alike."""
    return (h - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def objective(model: nn.Module, original: nn.Module, batches: list, texts: bool = True) -> tuple:
    """What table fine-tuning fits: ``(x, y, student, loss_fn, unit, chunk)``, the inputs (or batch ids), the
    original's outputs, the model as a function of x, the loss, the word for one input and the holdout's chunk."""
    original.eval()
    if texts:
        x = _stack(batches)
        with torch.no_grad():
            targets = []
            for i in range(0, x.shape[0], 32):
                xb = x[i:i + 32]
                h = _Student(original)(xb)
                targets.append(torch.cat([h, xb[:, 1, :, None].to(h.dtype)], -1))
            y = torch.cat(targets)
        student, loss_fn, unit, chunk = _Student(model), _loss, "calibration texts", 32
    else:
        x = torch.arange(len(batches))
        with torch.no_grad():
            teacher = [_first_tensor(out).detach().flatten() for out in
                       (call(original, b) for b in batches)]
        y = x
        student, unit, chunk = _BatchStudent(model, batches), "calibration batches", 1
        loss_fn = lambda h, idx: _relative_error(h, torch.cat([teacher[int(i)] for i in idx]))  # noqa: E731
    return x, y, student, loss_fn, unit, chunk


def _holdout(x, y, loss_fn, chunk: int, config, what: str):
    """``(held-out rows, training rows, the held-out loss of a student)``: ``config.holdout`` of the rows, drawn
    by ``config.seed``, never trained on."""
    n = x.shape[0]
    n_val = max(1, int(round(n * config.holdout)))
    if n - n_val < 1:
        raise ValueError(f"{what}\n  expected: at least 2 (one is held out)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    val, tr = perm[:n_val], perm[n_val:]

    def loss(student: nn.Module) -> float:
        with torch.no_grad():
            return float(sum(loss_fn(student(x[val[i:i + chunk]]), y[val[i:i + chunk]]) * len(val[i:i + chunk])
                             for i in range(0, n_val, chunk)) / n_val)

    return val, tr, loss


def finetune_tables_(model: nn.Module, original: nn.Module, batches: list, bits: int,
                     config: FinetuneConfig | None = None, table_dtype: torch.dtype = torch.float16,
                     texts: bool = True) -> dict:
    """Train the codebook tables of ``model`` (clustered in parametrized form) to reproduce ``original``
    on ``batches``; in place.  ``texts``: a transformers model on ``calibrate.text_batches`` (last hidden
    states matched by cosine, per token and mean-pooled); else any module on its own input batches
    (tensors, tuples, dicts; its output, or its first tensor, matched by relative squared error), a
    held-out share of the batches deciding when to stop.

    Returns ``{"steps", "epochs", "holdout_loss_before", "holdout_loss_after", "lr"}``.
    """
    from weightshare.multitask.trainer import TrainConfig, train
    from weightshare.sharing.codebook import table_parameters

    config = config or FinetuneConfig()
    tables = table_parameters(model)
    if not tables:
        raise ValueError("table fine-tuning: the model has no codebook tables\n  expected: a model clustered "
                         "with ws.share_ / compress (parametrized, not loaded as packed modules)")
    norms = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)] \
        if config.norms else []
    params = tables + norms
    x, y, student, loss_fn, unit, chunk = objective(model, original, batches, texts)
    val, tr, held_out = _holdout(x, y, loss_fn, chunk, config, f"table fine-tuning: {x.shape[0]} {unit}")
    requires = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def holdout_loss() -> float:
        return held_out(student)

    batch = min(config.batch_size if texts else 1, len(tr))  # a calibration batch is already a batch
    steps_per_epoch = -(-len(tr) // batch)
    epochs = max(1, -(-config.steps // steps_per_epoch))
    lr = config.lr or learning_rate(bits)
    state = {"best": holdout_loss(), "tables": [p.detach().clone() for p in params], "worse": 0, "epochs": 0}
    before = state["best"]

    def on_epoch(epoch: int) -> bool:
        state["epochs"] = epoch
        loss = holdout_loss()
        if loss < state["best"]:
            state.update(best=loss, tables=[p.detach().clone() for p in params], worse=0)
        else:
            state["worse"] += 1
        return state["worse"] >= config.patience

    try:
        result = train(student, x[tr], y[tr], TrainConfig(epochs=epochs, batch_size=batch, optimizer="adam", lr=lr,
                                                          schedule="cosine",
                                                          warmup_steps=min(config.warmup_steps,
                                                                           epochs * steps_per_epoch),
                                                          seed=config.seed),
                       loss_fn=loss_fn, desc="table fine-tuning", params=params, on_epoch=on_epoch)
    finally:
        for p in model.parameters():
            p.requires_grad_(requires.get(id(p), True))
    is_table = {id(p) for p in tables}
    with torch.no_grad():
        for p, best in zip(params, state["tables"]):  # tables rounded to what the packed file will hold
            p.copy_(best.to(table_dtype).to(p.dtype) if id(p) in is_table else best)
    after = holdout_loss()
    log.info("table fine-tuning: %d steps, held-out loss %.5f -> %.5f", len(result.step_seconds), before, after)
    return {"steps": len(result.step_seconds), "epochs": state["epochs"], "holdout_loss_before": before,
            "holdout_loss_after": after, "lr": lr}


@dataclass
class DistillConfig:
    """Training a model with training-time sharing (``CodebookConfig(train=...)``) by distillation: every
    parameter trains (the latent weights, biases, norms, soft sharing's mixture), then ``ws.freeze_``."""
    epochs: int = 10
    batch_size: int = 16
    lr: float = 5e-4  # MiniLM, 2-bit DKM: cosine 0.882 at 1e-4 for 3 epochs, 0.919 at 3e-4 for 6, 0.927 at 5e-4 for 12
    warmup_steps: int = 20
    holdout: float = 0.125  # fraction of the calibration texts kept out of training, to report the result on
    seed: int = 0
    dkm_final: float | None = 0.1  # DKM left at dkm_anneal=1: its temperature ends at this share of its start

    def __post_init__(self):
        for key in ("epochs", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DistillConfig.{key}\n  expected: a positive integer\n  got: {v!r}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"DistillConfig.holdout\n  expected: a fraction in (0, 1)\n  got: {self.holdout!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"DistillConfig.lr\n  expected: a learning rate > 0\n  got: {self.lr!r}")
        if self.dkm_final is not None and not 0 < self.dkm_final <= 1:
            raise ValueError(f"DistillConfig.dkm_final\n  expected: a share of the start temperature in (0, 1], "
                             f"or None\n  got: {self.dkm_final!r}")


def distill_(model: nn.Module, original: nn.Module, batches: list, config: DistillConfig | None = None,
             texts: bool = True, on_step=None) -> dict:
    """Train ``model``, shared with training-time codebooks (``ws.share_`` with ``CodebookConfig(train="recluster",
    "dkm" or "soft")``), to reproduce ``original`` on ``batches`` (the objective of ``finetune_tables_``), then
    ``ws.freeze_`` it into ordinary codebooks; in place.  The sharing moves while it trains: the one training
    loop calls ``ws.step_`` after each optimizer step and adds soft sharing's prior to the loss.

    Returns ``{"steps", "epochs", "holdout_loss_before", "holdout_loss_after", "seconds_per_step"}``: the loss on
    the held-out share of ``batches`` (never trained on) of the sharing frozen as it started (one-shot k-means)
    and as it ended.  ``on_step(k)``: called after optimizer step k; with it, a model whose sharing is not
    weightshare's (another library's palettizer, which it steps) trains by the same loop and is left unfrozen."""
    from weightshare.multitask.trainer import TrainConfig, train
    from weightshare.training import freeze_, training_sharing
    from weightshare.training.base import frozen_view

    config = config or DistillConfig()
    ours = bool(training_sharing(model))
    if not ours and on_step is None:
        raise ValueError("distillation with training-time sharing: the model has none\n  expected: a model shared "
                         "with ws.CodebookConfig(train='recluster', 'dkm' or 'soft') (ws.share_)")
    x, y, student, loss_fn, unit, chunk = objective(model, original, batches, texts)
    val, tr, holdout_loss = _holdout(x, y, loss_fn, chunk, config, f"distillation: {x.shape[0]} {unit}")
    with frozen_view(model) if ours else contextlib.nullcontext():  # "before": the sharing frozen as it starts
        before = holdout_loss(student)                                 # (one-shot k-means), what training must beat
    batch = min(config.batch_size if texts else 1, len(tr))
    steps = config.epochs * -(-len(tr) // batch)
    for _, _, plist in training_sharing(model) if config.dkm_final is not None else ():
        p = plist[0]
        if getattr(p, "anneal", None) == 1.0:  # DKM left unannealed: harden towards what freezing keeps
            p.anneal = config.dkm_final ** (1 / steps)
    params = [p for p in model.parameters() if p.is_floating_point()]
    requires = {id(p): p.requires_grad for p in params}
    for p in params:
        p.requires_grad_(True)
    try:
        result = train(student, x[tr], y[tr],
                       TrainConfig(epochs=config.epochs, batch_size=batch, optimizer="adam", lr=config.lr,
                                   schedule="cosine", warmup_steps=min(config.warmup_steps, steps), seed=config.seed),
                       loss_fn=loss_fn, desc=f"training with sharing ({unit})", params=params, on_step=on_step)
    finally:
        for p in params:
            p.requires_grad_(requires[id(p)])
    if ours:
        freeze_(model)
    after = holdout_loss(student)
    log.info("distillation: %d steps, held-out loss %.5f -> %.5f (frozen)", len(result.step_seconds), before, after)
    return {"steps": len(result.step_seconds), "epochs": config.epochs, "holdout_loss_before": before,
            "holdout_loss_after": after,
            "seconds_per_step": result.median_step_seconds}
