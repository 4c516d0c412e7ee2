"""Multi-task architectures: hard sharing, cross-stitch and MMoE.

Every model maps a batch to ``{task: output}`` and says which of its
parameters are shared by all tasks (``shared_parameters``), which is what
gradient aggregators work on.  The trunk (or experts, or columns) may be any
``nn.Module``: an MLP, a pretrained transformer, or one built with
weightshare's tie / hash / codebook / basis maps.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["MultiTaskModel", "CrossStitch", "MMoE", "batch_size_of"]


def batch_size_of(x) -> int | None:
    """Rows of a batch: a tensor's first dimension, or the one first dimension every tensor of a
    tokenizer's output shares (non-tensor entries such as a "modality" tag aside); else None."""
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        sizes = {v.shape[0] for v in x.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def _heads(heads) -> nn.ModuleDict:
    if not isinstance(heads, dict) or not heads or not all(isinstance(h, nn.Module) for h in heads.values()):
        raise ValueError("heads\n  expected: a non-empty dict {task name: nn.Module}\n"
                         f"  got: {type(heads).__name__}")
    return nn.ModuleDict(heads)


class MultiTaskModel(nn.Module):
    """Hard parameter sharing: one trunk computes features every task's head reads."""

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.trunk = trunk
        self.heads = _heads(heads)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def features(self, x) -> torch.Tensor:
        h = self.trunk(x)
        if isinstance(h, Mapping) and "sentence_embedding" in h:  # a sentence-transformers trunk: its pooled embedding
            h = h["sentence_embedding"]
        h = getattr(h, "last_hidden_state", h)  # a transformers trunk: the [CLS] / first token's state
        if h.dim() == 3:
            h = h[:, 0]
        n = batch_size_of(x)
        if n is not None and h.shape[0] != n:
            raise ValueError(f"the trunk returned {h.shape[0]} rows for a batch of {n}\n"
                             "  expected: one feature row per input row")
        return h

    def forward(self, x, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {t: head(h) for t, head in self.heads.items() if tasks is None or t in tasks}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trunk.parameters() if p.requires_grad]


class CrossStitch(nn.Module):
    """One column of ``layers`` per task, mixed after every layer by a learned (tasks x tasks) unit.

    Cross-stitch networks (Misra et al. 2016): h_t <- Σ_s α[t, s] h_s, α starting
    near the identity (``self_weight`` on the diagonal) so that columns begin
    mostly separate and learn how much to share.
    """

    def __init__(self, layers: list[nn.Module], heads: dict[str, nn.Module], self_weight: float = 0.9):
        super().__init__()
        self.heads = _heads(heads)
        n = len(self.heads)
        if not layers:
            raise ValueError("CrossStitch: layers\n  expected: at least one layer")
        self.columns = nn.ModuleList(nn.ModuleList(copy.deepcopy(layer) for layer in layers) for _ in range(n))
        off = (1 - self_weight) / (n - 1) if n > 1 else 0.0
        alpha = torch.full((n, n), off) + (self_weight - off) * torch.eye(n)
        self.stitches = nn.ParameterList(nn.Parameter(alpha.clone()) for _ in layers)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def forward(self, x, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        hs = [x] * len(self.columns)
        for depth, alpha in enumerate(self.stitches):
            hs = [column[depth](h) for column, h in zip(self.columns, hs)]
            stacked = torch.stack(hs)  # (tasks, batch, ...)
            hs = list(torch.tensordot(alpha, stacked, dims=1))
        return {t: head(h) for (t, head), h in zip(self.heads.items(), hs) if tasks is None or t in tasks}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.stitches)  # the columns are per task; the units are what every task trains


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al. 2018): shared experts, a softmax gate per task."""

    def __init__(self, experts: list[nn.Module], input_dim: int, heads: dict[str, nn.Module]):
        super().__init__()
        self.heads = _heads(heads)
        if not experts:
            raise ValueError("MMoE: experts\n  expected: at least one expert")
        self.experts = nn.ModuleList(experts)
        self.gates = nn.ModuleDict({t: nn.Linear(input_dim, len(experts)) for t in self.heads})

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def gate_weights(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = x.reshape(x.shape[0], -1)
        return {t: torch.softmax(g(flat), dim=-1) for t, g in self.gates.items()}

    def forward(self, x, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        outs = torch.stack([e(x) for e in self.experts], dim=1)  # (batch, experts, features)
        gates = self.gate_weights(x)
        return {t: head(torch.einsum("be,bef->bf", gates[t], outs))
                for t, head in self.heads.items() if tasks is None or t in tasks}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.experts.parameters() if p.requires_grad]
