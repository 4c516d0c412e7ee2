"""Differentiable k-means (DKM; Cho et al., "DKM: Differentiable k-Means Clustering Layer for Neural Network
Compression", ICLR 2022), what coremltools' DKMPalettizer does: ``CodebookConfig(train="dkm")``.

Each weight is the attention-weighted mix of its table's centroids, ``a_ij = softmax_j(-(w_i - c_j)^2 / (tau
var_g))``, ``w_i' = sum_j a_ij c_j``, and the centroids are refined by ``dkm_iters`` soft k-means steps
(``c_j = sum_i a_ij w_i / sum_i a_ij``) inside the forward pass, so the loss's gradient reaches every latent
weight through its attention and through the centroids.  The temperature is relative to each group's
variance (the same setting suits any weight's scale; the variance is a constant of the step, not
differentiated) and is multiplied by ``dkm_anneal`` after every optimizer step (``ws.step_``), so the
assignments harden as training goes on; as it goes to 0 the forward becomes the hard assignment to the nearest
centroid, which is what ``ws.freeze_`` keeps.  The centroids start from exact k-means and carry over from step
to step.

Memory and time: the attention is (weights x 2**bits) per iteration.  Autograd would keep every iteration's
attention and its intermediates for the backward pass (6.4 GB and 18x a plain step for MiniLM at 2 bits);
``SoftKMeans`` keeps only the centroids of each iteration and recomputes the attention in the backward pass,
a slice of weights at a time (at most ``CHUNK`` attention entries live at once), with the gradient written
out by hand.  An embedding trains only the rows its batch looks up (``rows``): per row, their centroids
depend on nothing else.
"""

from __future__ import annotations

import os

import torch

from weightshare.kmeans import soft_kmeans_pass
from weightshare.sharing.codebook import TABLE_DTYPES
from weightshare.training.base import TrainingCodebook, register_mode

__all__ = ["DKMParametrization", "SoftKMeans", "soft_kmeans"]

CHUNK = 1 << 21  # attention entries (groups x weights x centroids) the torch code computes at once
PATH_ENV = "WEIGHTSHARE_DKM"  # "torch" runs float32 on the torch code too (tests compare the two)


def _slices(x: torch.Tensor, k: int):
    step = max(1, CHUNK // max(1, x.shape[0] * k))
    return [slice(i, i + step) for i in range(0, x.shape[1], step)]


def _attention(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """softmax_j(-(x_i - c_j)^2 / s) for x (G, n), c (G, k), s (G, 1): the -x_i^2 / s term is the same for
    every j, so it is left out (the softmax does not see it) and the logits are one multiply-add."""
    return torch.softmax(torch.baddbmm((-c * c / s)[:, None, :], x[..., None], (2 * c / s)[:, None, :]), dim=-1)


def _step(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One soft k-means step: (the new centroids, the attention mass A_j = sum_i a_ij of each old centroid)."""
    k = c.shape[1]
    mass = x.new_zeros(c.shape)
    total = x.new_zeros(c.shape)
    for sl in _slices(x, k):
        a = _attention(x[:, sl], c, s)
        mass += a.sum(1)
        total += torch.bmm(x[:, None, sl], a)[:, 0]
    return _moved(c, total, mass), mass


def _moved(c: torch.Tensor, total: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The attention-weighted means; a centroid so far from every weight that its attention underflows to 0
    keeps its place (a mean of nothing would put it at 0 or, at rounding's whim, anywhere)."""
    return torch.where(mass > 0, total / mass.clamp_min(torch.finfo(mass.dtype).tiny), c)


def _native(x: torch.Tensor) -> bool:
    """float32 on the CPU runs the C core's passes (``kmeans.soft_kmeans_pass``); anything else the torch code."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and os.environ.get(PATH_ENV, "") != "torch"


def _native_step(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mass, total = x.new_zeros(c.shape), x.new_zeros(c.shape)
    soft_kmeans_pass("step", x, c, s, acc1=mass, acc2=total)
    return _moved(c, total, mass), mass


def _through_means(dc: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split dL/dc_{t+1} at a step's means: ``u = dc / A`` for the centroids that moved to their attention-weighted
    mean, and the gradient that passes straight to c_t for those that kept their place (``_moved``)."""
    moved = mass > 0
    u = torch.where(moved, dc / mass.clamp_min(torch.finfo(mass.dtype).tiny), torch.zeros_like(dc))
    return u.contiguous(), torch.where(moved, torch.zeros_like(dc), dc)


class SoftKMeans(torch.autograd.Function):
    """``(out, c_T)`` for groups ``x`` (G, n), starting centroids ``c0`` (G, k, a constant) and scale ``s`` (G, 1,
    a constant): T soft k-means steps ``c_{t+1} = sum_i a^t_ij x_i / A^t_j``, then ``out_i = sum_j a^{T-1}_ij
    c^T_j``; differentiable in ``x`` through every step (the attention recomputed in the backward pass)."""

    @staticmethod
    def forward(ctx, x, c0, s, iters: int):
        native = _native(x)
        cs, masses = [c0], []
        for _ in range(iters):
            c, mass = _native_step(x, cs[-1], s) if native else _step(x, cs[-1], s)
            cs.append(c)
            masses.append(mass)
        out = torch.empty_like(x)
        if native:
            soft_kmeans_pass("out", x, cs[-2], s, cn=cs[-1], out=out)
        else:
            for sl in _slices(x, c0.shape[1]):
                out[:, sl] = torch.bmm(_attention(x[:, sl], cs[-2], s), cs[-1][..., None])[..., 0]
        ctx.save_for_backward(x, s, *cs, *masses)
        ctx.iters = iters
        ctx.mark_non_differentiable(cs[-1])
        return out, cs[-1]

    @staticmethod
    def backward(ctx, g, _):
        x, s, *rest = ctx.saved_tensors
        T = ctx.iters
        cs, masses = rest[:T + 1], rest[T + 1:]
        if _native(x):
            g = g.contiguous()
            dc = x.new_zeros(cs[0].shape)
            soft_kmeans_pass("dlast", x, cs[T - 1], s, g=g, acc1=dc)
            dx = torch.zeros_like(x)
            for t in range(T - 1, -1, -1):
                u, kept = _through_means(dc, masses[t])
                dc = kept.clone() if t else None
                soft_kmeans_pass("back", x, cs[t], s, g=g if t == T - 1 else None, cn=cs[t + 1], u=u, out=dx,
                                 acc1=dc)
            return dx, None, None, None
        k = cs[0].shape[1]
        parts = _slices(x, k)
        # the output's gradient with respect to the last centroids: dc_T = sum_i g_i a^{T-1}_ij
        dc = x.new_zeros(cs[0].shape)
        for sl in parts:
            dc += torch.bmm(g[:, None, sl], _attention(x[:, sl], cs[T - 1], s))[:, 0]
        dx = torch.zeros_like(x)
        for t in range(T - 1, -1, -1):
            c, c_next = cs[t], cs[t + 1]
            u, dc = _through_means(dc, masses[t])
            for sl in parts:
                xs = x[:, sl, None]
                a = _attention(x[:, sl], c, s)
                # dL/da_ij: through c_{t+1} (d c_{t+1,j} / d a_ij = (x_i - c_{t+1,j}) / A_j), and at the last step
                # through the output itself (g_i c_T,j)
                da = u[:, None, :] * (xs - c_next[:, None, :])
                if t == T - 1:
                    da += g[:, sl, None] * c_next[:, None, :]
                dxs = torch.bmm(a, u[..., None])[..., 0]  # d c_{t+1,j} / d x_i = a_ij / A_j
                dl = a * (da - (a * da).sum(-1, keepdim=True))  # through the softmax
                diff = dl * (xs - c[:, None, :])  # d logit_ij / d x_i = -2 (x_i - c_j) / s, / d c_j = +2 (...) / s
                dx[:, sl] += dxs - 2 * diff.sum(-1) / s
                if t:
                    dc += 2 * diff.sum(1) / s
        return dx, None, None, None


def soft_kmeans(x: torch.Tensor, c: torch.Tensor, temperature: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each weight's attention-weighted centroid, the refined centroids) for groups ``x`` (groups, weights) and
    centroids ``c`` (groups, 2**bits): ``iters`` soft k-means steps at ``temperature`` times each group's
    variance, differentiable in ``x`` throughout (``SoftKMeans``)."""
    scale = x.detach().var(1, unbiased=False, keepdim=True) * temperature
    # a group of equal weights (an all-zero padding row) has no scale of its own: any will do, and 1 keeps the
    # reciprocal finite (1 / a subnormal is inf in float32, and inf * 0 a NaN)
    scale = torch.where(scale >= torch.finfo(x.dtype).tiny, scale, torch.ones_like(scale))
    return SoftKMeans.apply(x.contiguous(), c.detach().to(x.dtype).contiguous(), scale.contiguous(), iters)


class DKMParametrization(TrainingCodebook):
    """Soft assignment of the latent weights to their table's centroids, at a temperature that anneals."""

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        tables = super().initial(weight)  # exact k-means: the first centroids (and labels)
        self.register_buffer("centroids", tables.detach().to(torch.float32).clone())
        self.temperature = float(self.config.dkm_temperature)
        self.anneal = float(self.config.dkm_anneal)  # per step; distillation may set it from the run's length
        return weight.detach().clone()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.grouped(w)
        out, c = soft_kmeans(x, self.centroids, self.temperature, self.config.dkm_iters)
        if torch.is_grad_enabled() and w.requires_grad:
            self.centroids = c.detach().to(torch.float32)  # the next step starts from here
        return self.ungrouped(out)

    @property
    def trains_rows(self) -> bool:
        """Whether an embedding may train only the rows its batch looks up (``RowLookupEmbedding``)."""
        return self.row_groups() is not None

    def row_groups(self) -> int | None:
        """Groups per row when every group lies within one row of the weight (per-channel or per-group tables of
        an untransposed weight): then rows can be computed alone."""
        if self.transposed or self.config.granularity == "per_tensor" or len(self.layout) != 2:
            return None
        return self.n_groups // self.layout[0]

    def rows(self, w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """An embedding's looked-up rows only (the rest of the table neither changes the output nor gets a
        gradient); their centroids are refined and carried over, the other rows' stay as they are."""
        per_row = self.row_groups()
        if per_row is None or self.view is not None:
            return super().rows(w, index)
        used, where = torch.unique(index, return_inverse=True)
        x = w[used].reshape(-1, self.group_len)
        groups = (used[:, None] * per_row + torch.arange(per_row)).reshape(-1)
        out, c = soft_kmeans(x, self.centroids[groups], self.temperature, self.config.dkm_iters)
        if torch.is_grad_enabled() and w.requires_grad:
            self.centroids[groups] = c.detach().to(torch.float32)
        return out.reshape(len(used), -1)[where]

    def on_step(self, w: torch.Tensor) -> bool:
        self.temperature *= self.anneal
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
