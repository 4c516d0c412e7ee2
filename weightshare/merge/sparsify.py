"""How a task vector loses entries before generalized task arithmetic sums it (``gta.py``): the
sparsifications of TIES, DARE, DELLA and Model Breadcrumbs, as mergekit's ``sparsify.py``.

Each is a ``Sparsification``: ``apply`` masks the task vectors of one tensor, whole or a piece
of it, and ``prepare`` first gathers what a mask needs of the whole tensor (TIES's magnitude
threshold, breadcrumbs' two cuts, the L1 norms of a rescale; DARE and DELLA keep their mask
streams), reading the tensor a piece at a time, so that a large tensor merges piece by piece
with the result of the whole (``streaming.merge``).

- ``NONE``: nothing dropped (task arithmetic).
- ``MAGNITUDE`` (TIES, Yadav et al. 2023): each task vector keeps its largest-magnitude
  ``density`` fraction.
- ``RANDOM`` (DARE, Yu et al. 2024): each entry is kept with probability ``density``, the masks
  drawn from a ``torch.Generator`` seeded by a SHA-256 of ``seed``, the tensor's name and the
  model's index, so a tensor's result depends on neither the order tensors are merged in nor the
  process (mergekit draws from the global torch RNG, so its masks depend on both, and its numbers
  cannot be reproduced draw for draw).  ``MaskStream`` hands out a mask's uniform draws a span at
  a time, the same numbers as the whole draw.
- ``MAGNITUDE_RANKED`` (DELLA, Deep et al. 2024): DARE with keep probabilities from
  ``density − epsilon`` (a row's smallest |δ|) to ``density + epsilon`` (its largest), linear in
  rank.  A row is what mergekit ranks in for a matrix: the entries of one output row; a 1-D
  tensor is one row, and a tensor of more dimensions is ranked per slice of its first dimension
  (mergekit ranks along dimension 1 there).  Ties in magnitude rank by position (mergekit's
  ``argsort`` is unstable).  With ``epsilon = 0`` it is DARE draw for draw.
- ``BAND`` (Model Breadcrumbs, Davari & Belilovsky 2024): each task vector loses its ``gamma``
  largest-magnitude fraction (outliers) and then its smallest entries, down to ``density``.
  Counts follow mergekit's ``magnitude_outliers``: of n entries, ``int(density·n)`` are kept and
  ``int(gamma·n)`` outliers dropped, fewer outliers when both do not fit.  Two differences, both
  where mergekit's numbers are degenerate: where no outlier is dropped (``int(gamma·n) = 0``, any
  tensor under 100 entries at mergekit's gamma 0.01) mergekit's ``indices[n_bot:-0]`` selects
  nothing and zeroes the task vector, and we drop no outlier; where ``int(density·n) = 0`` we
  keep one entry, as our TIES does.  The cuts are magnitudes, not ranks: the whole tensor's
  (n_top + kept)-th and n_top-th largest |τ|, found by the radix select TIES uses; entries tied
  at the lower cut are all kept, at the upper cut all dropped (real task vectors have no ties;
  mergekit breaks them by sort order).

Every sparsification but ``NONE`` may L1-rescale (``rescale``): mergekit's ``rescale: true``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from weightshare.merge.registry import row_length

__all__ = ["Sparsification", "NONE", "MAGNITUDE", "RANDOM", "MAGNITUDE_RANKED", "BAND", "rescale_l1", "l1_factor",
           "trim", "trim_at", "kth_largest", "kth_largest_rows", "mask_generator", "MaskStream", "drop_and_rescale",
           "keep_probabilities", "counts", "cut", "SORT_BELOW"]


@dataclass(frozen=True)
class Sparsification:
    """One way of masking task vectors (mergekit's ``SparsificationMethod``).

    ``apply(deltas, v, *, name, prepared, span) -> deltas``: the (models, ...) stack of one tensor's
    task vectors, masked.  ``v`` holds the method's parameters (per-model ones as lists of floats:
    ``density``, and ``epsilon`` or ``gamma`` where the method declares them; ``rescale``, ``seed``),
    ``prepared`` what ``prepare`` returned for the whole tensor when ``deltas`` is a piece of it
    (None: ``deltas`` is the whole tensor) and ``span`` the piece's flat entries.
    ``prepare(read, numel, shape, v, *, name) -> prepared``: ``read()`` iterates the (models, piece)
    stacks of the tensor's task vectors, flat, in order; None when a piece needs nothing of the
    whole (the merge is then element-wise).
    """
    name: str
    apply: Callable
    prepare: Callable | None = None
    rows: bool = False  # pieces must hold whole rows (DELLA ranks within a row)


# ----------------------------------------------------------------------------- the L1 rescale


def rescale_l1(tensor: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``masked`` scaled so its L1 norm is ``tensor``'s.

    This, not 1/density, is mergekit's ``rescale: true`` (mergekit/sparsify.py,
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``, since mergekit PR #245): with a
    random mask the kept mass is ≈ density · ||tensor||₁, so it is DARE's 1/density in
    expectation, and it is also defined for magnitude pruning.  Like mergekit, a norm
    below ``eps`` (before or after masking) leaves ``masked`` unscaled.
    """
    return masked * l1_factor(tensor.abs().sum(), masked.abs().sum(), eps)


def l1_factor(before, after, eps: float = 1e-7):
    """The factor of ``rescale_l1``: ``before / after``, the L1 norms of a tensor and of its masked
    copy, or 1 where either is below ``eps``.  A merge that streams a tensor gathers the two norms
    from pieces and scales each piece by it."""
    if before < eps or after < eps:
        return 1.0
    return before / after


def _l1_factors(read, kept: dict[int, Callable]) -> dict[int, float]:
    """Per model i in ``kept``, the L1 factor ‖δ_i‖₁ / ‖kept δ_i‖₁ of the whole tensor, in one read;
    ``kept[i](delta, start, stop)`` masks model i's piece, flat entries [start, stop)."""
    norms = torch.zeros(len(kept), 2, dtype=torch.float64)  # ‖δ‖₁ and ‖kept δ‖₁, per model masked
    start = 0
    for deltas in read():
        stop = start + deltas[0].numel()
        for j, (i, mask) in enumerate(kept.items()):
            norms[j, 0] += deltas[i].abs().sum(dtype=torch.float64)
            norms[j, 1] += mask(deltas[i], start, stop).abs().sum(dtype=torch.float64)
        start = stop
    return {i: l1_factor(float(norms[j, 0]), float(norms[j, 1])) for j, i in enumerate(kept)}


# ----------------------------------------------------------------------------- magnitude (TIES)


def trim(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """``delta`` with all but its ``int(density · numel)`` largest-magnitude entries zeroed.

    As mergekit/sparsify.py ``magnitude``: ``density >= 1`` returns ``delta`` untouched (no
    rescale either), and the count is truncated, not rounded.  Where that count is 0 (a
    bias of 4 entries at density 0.2) mergekit stops the whole merge with an assertion; we
    keep the one largest entry, so a density that suits the big matrices works on the
    small tensors too (mergekit has no numbers to match there).  ``rescale`` is mergekit's
    L1 rescale.
    """
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel())) if delta.numel() else 0
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k, sorted=False).indices] = 1
    mask = mask.view_as(delta)
    masked = delta * mask
    return rescale_l1(delta, masked) if rescale else masked


SORT_BELOW = 1 << 14  # kth_largest_rows sorts tensors smaller than this; the radix select needs no copy



def kth_largest(pieces, numel: int, k: int) -> float:
    """The k-th largest of non-negative float32 values given as pieces (a callable returning a
    fresh iterator of 1-D tensors); see ``kth_largest_rows``."""
    return kth_largest_rows(lambda: (piece.unsqueeze(0) for piece in pieces()), numel, [k])[0]


def kth_largest_rows(pieces, numel: int, ks: list[int]) -> list[float]:
    """For each row r, the ks[r]-th largest of its non-negative float32 values, the rows given as
    pieces (a callable returning a fresh iterator of (rows, piece) tensors), in two passes for
    all rows at once, with 2^15 + 2^16 counters per row: a radix select on the float bits,
    which order like the values for non-negative floats.  No piece is kept."""
    for k in ks:
        if not 1 <= k <= numel:
            raise ValueError(f"kth_largest: k\n  expected: 1..{numel}\n  got: {k}")
    rows = len(ks)
    if numel < SORT_BELOW:  # a small tensor (a bias, a norm): a sort is cheaper than 3 · 2^16 counters per row
        values = torch.cat(list(pieces()), dim=1).sort(dim=1, descending=True).values
        return [float(values[r, k - 1]) for r, k in enumerate(ks)]

    def pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:  # bucket holding the rank-th largest, and rank in it
        from_top = hist.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
        above = int(from_top[i - 1]) if i else 0
        return len(hist) - 1 - i, rank - above

    def counts(values: torch.Tensor, buckets: int) -> torch.Tensor:  # one histogram per row, in one bincount
        offsets = torch.arange(rows).unsqueeze(1) * buckets
        return torch.bincount((values + offsets).reshape(-1), minlength=rows * buckets).view(rows, buckets)

    high = torch.zeros(rows, 1 << 15, dtype=torch.int64)
    for piece in pieces():
        high += counts(piece.contiguous().view(torch.int32) >> 16, 1 << 15)
    picked = [pick(high[r], ks[r]) for r in range(rows)]
    his = torch.tensor([hi for hi, _ in picked]).unsqueeze(1)
    low = torch.zeros(rows, 1 << 16, dtype=torch.int64)
    for piece in pieces():
        bits = piece.contiguous().view(torch.int32)
        # entries outside the row's chosen high bucket go to a spare bucket past the end
        low += counts(torch.where((bits >> 16) == his, bits & 0xFFFF, 1 << 16), (1 << 16) + 1)[:, :-1]
    out = []
    for r, (hi, rank) in enumerate(picked):
        lo, _ = pick(low[r], rank)
        out.append(float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32)))
    return out


def trim_at(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """``delta`` with the entries of magnitude below ``threshold`` zeroed: ``trim`` for a piece of a
    tensor, ``threshold`` being the whole tensor's k-th largest magnitude."""
    return delta * (delta.abs() >= threshold)


def _magnitude_prepare(read, numel: int, shape, v: dict, *, name: str) -> dict:
    """Each task vector's trim threshold from pieces, and with ``rescale`` its L1 factor
    ‖τ‖₁ / ‖trimmed τ‖₁ in one more read of the inputs."""
    densities = v["density"]
    trimmed = [i for i, p in enumerate(densities) if p < 1]
    thresholds: list = [None] * len(densities)
    if not trimmed:
        return {"thresholds": thresholds}

    def pieces():  # every trimmed task vector's piece in one read of the inputs
        for deltas in read():
            yield deltas[trimmed].abs()

    ks = [max(1, int(densities[i] * numel)) for i in trimmed]
    for i, t in zip(trimmed, kth_largest_rows(pieces, numel, ks)):
        thresholds[i] = t
    if not v["rescale"]:
        return {"thresholds": thresholds}
    factors = _l1_factors(read, {i: lambda d, a, b, t=thresholds[i]: trim_at(d, t) for i in trimmed})
    return {"thresholds": thresholds, "l1_factors": [factors.get(i) for i in range(len(densities))]}


def _magnitude(deltas: torch.Tensor, v: dict, *, name: str, prepared: dict | None, span) -> torch.Tensor:
    """Trimmed by top-k when whole; by the whole tensor's threshold (|τ_i| >= threshold) when a piece,
    with the whole tensor's L1 factors.  The two agree but where entries tie at the threshold (then
    all tied entries are kept, where top-k keeps an arbitrary k)."""
    if prepared is None:
        return torch.stack([trim(d, p, rescale=v["rescale"]) for d, p in zip(deltas, v["density"])])
    thresholds, factors = prepared["thresholds"], prepared.get("l1_factors")
    factors = factors if factors is not None else [1.0] * len(deltas)
    return torch.stack([d if t is None else trim_at(d, t) * f for d, t, f in zip(deltas, thresholds, factors)])


# ----------------------------------------------------------------------------- random drop (DARE)


_SKIP = 1 << 20  # draws discarded per call when a stream skips ahead: bounds the throwaway buffer to 4 MB



def mask_generator(seed: int, name: str, model: int) -> torch.Generator:
    """A CPU generator seeded from ``seed``, the tensor ``name`` and the ``model``'s index alone
    (hashlib, not ``hash()``, which is salted per process).  Four bytes of the digest: torch's
    CPU generator (mt19937) reads only the low 32 bits of a seed anyway."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(model)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:4], "little"))
    return g


class MaskStream:
    """The uniform draws behind one (tensor, model) DARE mask, a span of the flattened tensor at a time.

    Entry k of the tensor gets draw k of ``mask_generator(seed, name, model)``, so the whole
    span is exactly ``torch.rand(shape, generator=mask_generator(seed, name, model))``.  A CPU
    generator's draws go on where its last call stopped, so the stream keeps one generator and
    its position: the next span is drawn straight on, and any other span re-seeds (when it lies
    behind) and draws up to its start, so the draws never depend on the order spans are asked for.
    """

    def __init__(self, seed: int, name: str, model: int):
        self.seed, self.name, self.model = seed, name, model
        self._generator: torch.Generator | None = None
        self._position = 0

    def uniform(self, start: int, stop: int) -> torch.Tensor:
        """Draws ``start`` to ``stop`` (flat entries [start, stop) of the tensor), as a 1-D tensor."""
        if not 0 <= start <= stop:
            raise ValueError(f"MaskStream.uniform: span\n  expected: 0 <= start <= stop\n  got: ({start}, {stop})")
        if self._generator is None or start < self._position:
            self._generator, self._position = mask_generator(self.seed, self.name, self.model), 0
        while self._position < start:
            skip = min(start - self._position, _SKIP)
            torch.rand(skip, generator=self._generator)
            self._position += skip
        self._position = stop
        return torch.rand(stop - start, generator=self._generator)


def drop_and_rescale(delta: torch.Tensor, density: float, uniform: torch.Tensor, *, rescale: bool = True,
                     factor: float | None = None) -> torch.Tensor:
    """``delta`` with each entry kept where its ``uniform`` draw (same number of entries) is below
    ``density``, then (``rescale``) scaled back to its original L1 norm.

    As mergekit/sparsify.py ``bernoulli``: ``density >= 1`` returns ``delta`` untouched, and
    the rescale is ``rescaled_masked_tensor(..., RescaleNorm.l1)`` — kept · ||δ||₁ / ||kept||₁,
    the paper's 1/density in expectation (mergekit switched to it in PR #245).  When ``delta``
    is a piece of a tensor, ``factor`` is that L1 factor for the whole tensor (``_prepare``).
    """
    if not isinstance(density, torch.Tensor) and density >= 1:
        return delta
    keep = uniform.view(delta.shape) < density  # a tensor density: one keep probability per entry (DELLA)
    masked = delta * keep.to(device=delta.device, dtype=delta.dtype)
    if not rescale:
        return masked
    return rescale_l1(delta, masked) if factor is None else masked * factor


def _random_prepare(read, numel: int, shape, v: dict, *, name: str) -> dict:
    """A mask stream per model, kept across the pieces so that each piece's draws go straight on
    from the last, and with ``rescale`` each model's L1 factor ‖δ‖₁ / ‖kept δ‖₁ of the whole tensor,
    gathered in one read of the inputs (drawing the masks once more; the merge's first piece then
    re-seeds the streams)."""
    densities = v["density"]
    masks = [MaskStream(v["seed"], name, i) if p < 1 else None for i, p in enumerate(densities)]
    if not v["rescale"]:
        return {"masks": masks}
    factors = _l1_factors(read, {i: lambda d, a, b, i=i: drop_and_rescale(d, densities[i], masks[i].uniform(a, b),
                                                                          rescale=False)
                                 for i, p in enumerate(densities) if p < 1})
    return {"masks": masks, "l1_factors": [factors.get(i) for i in range(len(densities))]}


def _random(deltas: torch.Tensor, v: dict, *, name: str, prepared: dict | None, span) -> torch.Tensor:
    n = len(deltas)
    start, stop = span if span is not None else (0, deltas[0].numel())
    # one stream per (tensor, model): a mask never depends on the other models or their densities
    masks = prepared["masks"] if prepared is not None else [MaskStream(v["seed"], name, i) for i in range(n)]
    factors = prepared.get("l1_factors") if prepared is not None else None
    return torch.stack([d if p >= 1 else drop_and_rescale(d, p, masks[i].uniform(start, stop), rescale=v["rescale"],
                                                          factor=None if factors is None else factors[i])
                        for i, (d, p) in enumerate(zip(deltas, v["density"]))])


# ----------------------------------------------------------------------------- magnitude-ranked drop (DELLA)


def keep_probabilities(delta: torch.Tensor, row: int, density: float, epsilon: float) -> torch.Tensor:
    """Per entry of ``delta`` (whole rows of ``row`` entries, flat), its keep probability:
    density − ε + 2ε · rank / (row − 1), rank 0 the row's smallest |δ|."""
    mags = delta.reshape(-1, row).abs()
    if row == 1:
        return torch.full_like(delta, density)
    ranks = mags.argsort(dim=1, stable=True).argsort(dim=1, stable=True).to(delta.dtype)
    return ((density - epsilon) + ranks * (2 * epsilon / (row - 1))).reshape(delta.shape)


def _kept(delta, density, epsilon, uniform, row, factor=None, rescale=True):
    if density >= 1:
        return delta
    return drop_and_rescale(delta, keep_probabilities(delta, row, density, epsilon), uniform, rescale=rescale,
                            factor=factor)


def _ranked_prepare(read, numel: int, shape, v: dict, *, name: str) -> dict:
    """Read in pieces of whole rows: the mask streams, and with ``rescale`` each model's L1 factor
    ‖δ‖₁ / ‖kept δ‖₁ of the whole tensor."""
    densities, epsilons = v["density"], v["epsilon"]
    row = row_length(shape)
    masks = [MaskStream(v["seed"], name, i) if p < 1 else None for i, p in enumerate(densities)]
    if not v["rescale"]:
        return {"masks": masks, "row": row}
    factors = _l1_factors(read, {i: lambda d, a, b, i=i: _kept(d, densities[i], epsilons[i], masks[i].uniform(a, b),
                                                               row, rescale=False)
                                 for i, m in enumerate(masks) if m is not None})
    return {"masks": masks, "row": row, "l1_factors": [factors.get(i) for i in range(len(masks))]}


def _ranked(deltas: torch.Tensor, v: dict, *, name: str, prepared: dict | None, span) -> torch.Tensor:
    n = len(deltas)
    start, stop = span if span is not None else (0, deltas[0].numel())
    prepared = prepared or {}
    row = prepared.get("row")
    row = row_length(deltas.shape[1:]) if row is None else row
    masks = prepared.get("masks") or [MaskStream(v["seed"], name, i) for i in range(n)]
    factors = prepared.get("l1_factors") or [None] * n
    return torch.stack([_kept(d, p, e, None if p >= 1 else masks[i].uniform(start, stop), row, factors[i],
                              v["rescale"])
                        for i, (d, p, e) in enumerate(zip(deltas, v["density"], v["epsilon"]))])


# ----------------------------------------------------------------------------- magnitude band (Model Breadcrumbs)


def counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(kept, outliers dropped) of a tensor of ``numel`` entries."""
    kept = max(1, int(density * numel)) if numel else 0
    top = min(int(gamma * numel), numel - kept)
    return kept, top


def _cuts(pieces, numel: int, params: list[tuple[float, float]]) -> list[tuple[float, float | None] | None]:
    """Per model, its (lower, upper) magnitude cuts, None where density >= 1 (nothing dropped);
    ``pieces`` gives the models' |τ| stacked (models, piece), a piece at a time."""
    asks = []  # (model, rank among the largest): each model's lower cut, and its upper one if it drops outliers
    for i, (density, gamma) in enumerate(params):
        if density < 1 and numel:
            kept, top = counts(numel, density, gamma)
            asks += [(i, top + kept)] + ([(i, top)] if top else [])
    out: list = [None] * len(params)
    if asks:
        rows = [i for i, _ in asks]
        values = kth_largest_rows(lambda: (piece[rows] for piece in pieces()), numel, [k for _, k in asks])
        for (i, _), v in zip(asks, values):
            out[i] = (v, None) if out[i] is None else (out[i][0], v)
    return out


def cut(delta: torch.Tensor, lower: float, upper: float | None) -> torch.Tensor:
    """``delta`` with the entries of magnitude below ``lower``, or from ``upper`` up, zeroed."""
    mag = delta.abs()
    keep = mag >= lower
    if upper is not None:
        keep &= mag < upper
    return delta * keep


def _band_prepare(read, numel: int, shape, v: dict, *, name: str) -> dict:
    """Each model's two cuts, and with ``rescale`` its L1 factor ‖τ‖₁ / ‖masked τ‖₁, in one more
    read of the inputs."""
    def pieces():
        for deltas in read():
            yield deltas.reshape(len(deltas), -1).abs()

    cuts = _cuts(pieces, numel, list(zip(v["density"], v["gamma"])))
    if not v["rescale"]:
        return {"cuts": cuts}
    factors = _l1_factors(read, {i: lambda d, a, b, c=c: cut(d, *c) for i, c in enumerate(cuts) if c is not None})
    return {"cuts": cuts, "l1_factors": [factors.get(i) for i in range(len(cuts))]}


def _band(deltas: torch.Tensor, v: dict, *, name: str, prepared: dict | None, span) -> torch.Tensor:
    if prepared is None:  # a tensor merged whole finds its own cuts
        prepared = _band_prepare(lambda: iter([deltas]), deltas[0].numel(), deltas.shape[1:], v, name=name)
    cuts, factors = prepared["cuts"], prepared.get("l1_factors")
    factors = factors if factors is not None else [None] * len(deltas)
    return torch.stack([d if c is None else cut(d, *c) * (1.0 if f is None else f)
                        for d, c, f in zip(deltas, cuts, factors)])


NONE = Sparsification("none", lambda deltas, v, **_: deltas)
MAGNITUDE = Sparsification("magnitude", _magnitude, _magnitude_prepare)
RANDOM = Sparsification("random", _random, _random_prepare)
MAGNITUDE_RANKED = Sparsification("magnitude_ranked", _ranked, _ranked_prepare, rows=True)
BAND = Sparsification("band", _band, _band_prepare)
