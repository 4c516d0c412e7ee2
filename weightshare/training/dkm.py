"""Differentiable k-means (DKM; Cho et al., "DKM: Differentiable k-Means Clustering Layer for Neural Network
Compression", ICLR 2022), what coremltools' DKMPalettizer does: ``CodebookConfig(train="dkm")``.

Each weight is the attention-weighted mix of its table's centroids, ``a_ij = softmax_j(-(w_i - c_j)^2 / (tau
var_g))``, ``w_i' = sum_j a_ij c_j``, and the centroids are refined by ``dkm_iters`` soft k-means steps
(``c_j = sum_i a_ij w_i / sum_i a_ij``) inside the forward pass, so the loss's gradient reaches every latent
weight through its attention and through the centroids.  The temperature is relative to each group's
variance (the same setting suits any weight's scale) and is multiplied by ``dkm_anneal`` after every
optimizer step (``ws.step_``), so the assignments harden as training goes on; as it goes to 0 the forward
becomes the hard assignment to the nearest centroid, which is what ``ws.freeze_`` keeps.  The centroids
start from exact k-means and carry over from step to step.

Memory: the attention is (weights x 2**bits) per iteration, kept for the backward pass.
"""

from __future__ import annotations

import torch

from weightshare.sharing.codebook import TABLE_DTYPES
from weightshare.training.base import TrainingCodebook, register_mode

__all__ = ["DKMParametrization", "soft_kmeans"]


def soft_kmeans(x: torch.Tensor, c: torch.Tensor, temperature: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each weight's attention-weighted centroid, the refined centroids) for groups ``x`` (groups, weights) and
    centroids ``c`` (groups, 2**bits): ``iters`` soft k-means steps at ``temperature`` times each group's
    variance, differentiable in ``x`` throughout."""
    scale = x.var(1, unbiased=False, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)[..., None]
    scale = scale * temperature
    for _ in range(iters):
        a = torch.softmax(-((x[..., None] - c[:, None, :]) ** 2) / scale, dim=-1)  # (groups, weights, 2**bits)
        c = (a * x[..., None]).sum(1) / a.sum(1).clamp_min(torch.finfo(x.dtype).tiny)
    return (a * c[:, None, :]).sum(-1), c


class DKMParametrization(TrainingCodebook):
    """Soft assignment of the latent weights to their table's centroids, at a temperature that anneals."""

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        tables = super().initial(weight)  # exact k-means: the first centroids (and labels)
        self.register_buffer("centroids", tables.detach().to(torch.float32).clone())
        self.temperature = float(self.config.dkm_temperature)
        return weight.detach().clone()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.grouped(w)
        out, c = soft_kmeans(x, self.centroids.to(x.dtype), self.temperature, self.config.dkm_iters)
        if torch.is_grad_enabled() and w.requires_grad:
            self.centroids = c.detach().to(torch.float32)  # the next step starts from here
        return self.ungrouped(out)

    def on_step(self, w: torch.Tensor) -> bool:
        self.temperature *= self.config.dkm_anneal
        return False

    @torch.no_grad()
    def frozen(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hard assignment: each weight to its nearest centroid (tables sorted, in the table dtype)."""
        table_dtype = TABLE_DTYPES[self.config.table_dtype]
        tables = self.centroids.sort(1).values.to(table_dtype).to(w.dtype)
        x = self.grouped(w.detach())
        labels = (x[..., None] - tables[:, None, :]).abs().argmin(-1)
        return tables, labels.to(torch.uint8).reshape(self.layout)


register_mode("dkm", DKMParametrization)
