"""Mixed bits under a size budget: each tensor gets the index width that buys the most fidelity per byte.

Per compressible tensor and per candidate width b, the predicted relative output error

    e(b) = Σ_rows Δw H Δwᵀ / Σ_rows w H wᵀ          (Linear: H = E[x xᵀ] of its inputs)
    e(b) = Σ_rows c_r ‖Δw_r‖² / Σ_rows c_r ‖w_r‖²    (Embedding: c_r = 1 + how often row r is looked up)

is measured on a seeded sample of rows clustered by importance-weighted k-means (GPTQ lowers every
layer's error by a similar factor, so the ranking holds).  The plan minimises Σ e over tensors under the
byte budget by marginal analysis: start every tensor at the narrowest width and repeatedly widen the one
whose next step on its lower convex hull buys the most error per byte, while it fits.  The packed file's
size is predicted exactly for the tensors and with a margin for its header, so the file lands below
the requested size, by less than one tensor's step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from weightshare.hub import is_transposed_linear
from weightshare.kmeans import kmeans1d_rows

__all__ = ["BitPlan", "codebook_bytes", "parse_size", "plan_bits"]

CANDIDATES = tuple(range(1, 9))
SENSITIVITY_BITS = (1, 2)  # the widths each tensor is tried at, alone, to weigh tensors against each other
MEASURED_BITS = 6  # widest width whose weight error is measured
SAMPLE_ROWS = 96  # rows per tensor the weight error is measured on (seeded): a mean over 96 x K weights
# The file's header (safetensors' JSON and the spec in its metadata), per stored tensor and per spec entry,
# measured on MiniLM and a tiny BERT packed with and without outliers (0.5-1.8 % above the real headers):
# a stored tensor's name appears twice (its header entry, its checksum) beside ~150 bytes of fields, an
# entry's name once beside ~60 bytes (a dense tensor) or ~240 (a codebook, its config included).
HEADER_PER_TENSOR, HEADER_PER_ENTRY, HEADER_PER_CODEBOOK = 150, 60, 180
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: str | int, flag: str = "--target-size") -> int:
    """Bytes from ``8MB`` / ``7.5MiB`` / ``8000000`` (decimal KB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"{flag} {value!r}: expected a size such as 8MB, 7.5MiB or 8000000 (bytes)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"{flag} {value!r}: expected a positive size such as 8MB")
    return n


def codebook_bytes(numel: int, n_groups: int, bits: int, table_itemsize: int = 2) -> int:
    """Stored bytes of a codebook tensor: bit-packed indices and the tables."""
    return (numel * bits + 7) // 8 + n_groups * (1 << bits) * table_itemsize


@dataclass
class BitPlan:
    bits: dict[str, int]  # module name -> index width
    predicted_bytes: int  # the packed file, header included (estimated)
    feasible: tuple[int, int]  # the smallest and the largest file the candidates allow
    errors: dict[str, dict[int, float]] = field(default_factory=dict)  # predicted relative error per width

    def average_bits(self, numels: dict[str, int]) -> float:
        return sum(self.bits[n] * numels[n] for n in self.bits) / max(1, sum(numels[n] for n in self.bits))


def _hull(costs: list[int], errs: list[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, error), from the cheapest: the widths worth taking."""
    pts = sorted(range(len(costs)), key=lambda i: (costs[i], errs[i]))
    hull: list[int] = []
    for i in pts:
        if hull and errs[i] >= errs[hull[-1]]:
            continue  # costs more, no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> i: never the best step
            if (errs[b] - errs[a]) * (costs[i] - costs[a]) >= (errs[i] - errs[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _samples(weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], seed: int) -> dict[str, tuple]:
    """Up to SAMPLE_ROWS rows of each tensor, with each entry's importance (an Embedding's row counts, a
    Linear's diagonal of H) and H itself: the errors are estimated on these."""
    g = torch.Generator().manual_seed(seed)
    samples = {}
    for name, w in weights.items():
        rows = w.shape[0]
        pick = torch.randperm(rows, generator=g)[:SAMPLE_ROWS] if rows > SAMPLE_ROWS else torch.arange(rows)
        ws_ = w[pick].float()
        s = stats[name]
        if s.dim() == 1:  # embedding: rows weighted by their counts
            imp, H = (1.0 + s[pick].float())[:, None].expand_as(ws_).contiguous(), None
        else:
            H = s.double()
            imp = torch.diagonal(H).float().clamp_min(0)[None, :].expand_as(ws_).contiguous() + 1e-12
        samples[name] = (ws_, imp, H)
    return samples


def _relative_errors(samples: dict[str, tuple], candidates) -> dict[str, dict[int, float]]:
    """Per tensor and width, the relative output error (``‖(W − Ŵ)x‖² / ‖Wx‖²`` through H) of its sample."""
    by_len: dict[int, list[str]] = {}
    for name, (ws_, _, _) in samples.items():
        by_len.setdefault(ws_.shape[1], []).append(name)
    errors: dict[str, dict[int, float]] = {n: {} for n in samples}
    for b in candidates:
        if b > MEASURED_BITS:  # k-means with 128 or 256 centroids costs most and never decides a plan:
            for n in samples:  # beyond 6 bits, 6 dB (4x) per bit
                errors[n][b] = errors[n][b - 1] / 4 if b - 1 in errors[n] else float("nan")
            if all(b - 1 in errors[n] for n in samples):
                continue
        for names in by_len.values():  # one batched k-means per row length: rows are independent problems
            w_all = torch.cat([samples[n][0] for n in names])
            imp_all = torch.cat([samples[n][1] for n in names])
            centroids, labels = kmeans1d_rows(w_all, 1 << b, weights=imp_all)
            approx = torch.gather(torch.from_numpy(centroids).float(), 1, torch.from_numpy(labels).long())
            r0 = 0
            for n in names:
                ws_, imp, H = samples[n]
                d = (ws_ - approx[r0:r0 + ws_.shape[0]]).double()
                r0 += ws_.shape[0]
                if H is None:
                    e = (imp.double() * d * d).sum() / (imp.double() * ws_.double() ** 2).sum().clamp_min(1e-30)
                else:
                    e = ((d @ H) * d).sum() / ((ws_.double() @ H) * ws_.double()).sum().clamp_min(1e-30)
                errors[n][b] = float(e)
    return errors


def _scaled_to(measured: dict[int, float], raw: dict[int, float]) -> dict[int, float]:
    """One tensor's error curve in the unit of its measured output errors: scaled, at each width, to the
    widest measured width at or below it."""
    def scaled(b, e):
        anchor = max([a for a in measured if a <= b], default=min(measured))
        return measured[anchor] * e / max(raw[anchor], 1e-30)
    return {b: scaled(b, e) for b, e in raw.items()}


def _greedy_widths(costs, errors, hulls, candidates, base_bytes: int, target_bytes: int) -> tuple[dict, int]:
    """Widen, one step at a time, the tensor whose next point on its convex hull buys the most error
    per byte while the file stays within ``target_bytes``; returns the widths and the file's size."""
    pos = {n: 0 for n in costs}
    total = base_bytes + sum(costs[n][hulls[n][0]] for n in costs)
    while True:
        best, best_gain = None, 0.0
        for n in costs:
            h = hulls[n]
            if pos[n] + 1 >= len(h):
                continue
            i, j = h[pos[n]], h[pos[n] + 1]
            extra = costs[n][j] - costs[n][i]
            if total + extra > target_bytes:
                continue
            gain = (errors[n][candidates[i]] - errors[n][candidates[j]]) / max(extra, 1)
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            break
        h = hulls[best]
        total += costs[best][h[pos[best] + 1]] - costs[best][h[pos[best]]]
        pos[best] += 1
    return {n: candidates[hulls[n][pos[n]]] for n in costs}, total


def plan_bits(weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], target_bytes: int, fixed_bytes: int,
              n_groups: dict[str, int], header_bytes: int, candidates=CANDIDATES, table_itemsize: int = 2,
              seed: int = 0, sensitivity: dict[str, dict[int, float]] | None = None) -> BitPlan:
    """Widths for ``weights`` (name -> (rows, K) in the codebook's row layout) under ``target_bytes``.

    ``stats``: per name, H (K, K) for a Linear or row counts (rows,) for an Embedding.
    ``fixed_bytes``: what is stored dense (norms, biases); ``n_groups``: tables per tensor;
    ``header_bytes``: the file's header (``header_size``).
    ``sensitivity``: per name and width in ``SENSITIVITY_BITS``, the model's output error with that tensor
    alone at that width; each tensor's error curve is scaled to the widest of them at or below each width
    (measured where measured), so that errors of different tensors add up in one unit.
    """
    header = header_bytes
    costs = {n: [codebook_bytes(w.numel(), n_groups[n], b, table_itemsize) for b in candidates]
             for n, w in weights.items()}
    low = fixed_bytes + header + sum(c[0] for c in costs.values())
    high = fixed_bytes + header + sum(c[-1] for c in costs.values())
    if not low <= target_bytes:
        raise ValueError(f"--target-size {target_bytes:,} bytes is below the smallest packed file\n"
                         f"  expected: between {low:,} ({candidates[0]} bit per weight) and {high:,} bytes "
                         f"({candidates[-1]} bits)")
    if target_bytes > high:
        raise ValueError(f"--target-size {target_bytes:,} bytes is above the largest packed file\n"
                         f"  expected: between {low:,} ({candidates[0]} bit per weight) and {high:,} bytes "
                         f"({candidates[-1]} bits); a larger budget: keep the model dense")
    samples = _samples(weights, stats, seed)
    errors = _relative_errors(samples, candidates)
    if sensitivity is not None:
        errors = {name: _scaled_to(sensitivity[name], errors[name]) for name in weights}
    hulls = {n: _hull(costs[n], [errors[n][b] for b in candidates]) for n in weights}
    bits, total = _greedy_widths(costs, errors, hulls, candidates, fixed_bytes + header, target_bytes)
    return BitPlan(bits=bits, predicted_bytes=total, feasible=(low, high), errors=errors)


def average_bits_target(avg_bits: float, weights: dict[str, torch.Tensor], n_groups: dict[str, int],
                        fixed_bytes: int, header_bytes: int, table_itemsize: int = 2) -> int:
    """The file size that ``--avg-bits B`` means: B bits per compressed weight, tables counted in B (as
    ``inspect`` counts bits per weight), plus the dense tensors and the header."""
    if not (isinstance(avg_bits, (int, float)) and math.isfinite(avg_bits) and avg_bits > 0):
        raise ValueError(f"--avg-bits\n  expected: a positive number of bits per weight\n  got: {avg_bits!r}")
    numel = sum(w.numel() for w in weights.values())
    return int(fixed_bytes + header_bytes + avg_bits * numel / 8)


def header_size(dense: list[str], codebooks: list[str], outliers: bool) -> int:
    """The packed file's header for these dense tensors and codebook weights (names as in the state_dict)."""
    suffixes = ("__tables", "__indices") + (("__outlier_index", "__outlier_values") if outliers else ())
    stored = [*dense, *(f"{w}.{s}" for w in codebooks for s in suffixes)]
    entries = [*dense, *codebooks]
    return (sum(2 * len(n) + HEADER_PER_TENSOR for n in stored) + sum(len(n) + HEADER_PER_ENTRY for n in entries)
            + HEADER_PER_CODEBOOK * len(codebooks))


SENSITIVITY_BATCHES = 2


def _outputs(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(output states, real-token mask) per batch: ``last_hidden_state`` of a transformers model, else the output."""
    from weightshare.compress.calibrate import call

    out = []
    with torch.no_grad():
        for b in batches:
            y = call(model, b)
            y = getattr(y, "last_hidden_state", None) if not isinstance(y, torch.Tensor) else y
            if y is None:
                raise ValueError("size budget: the model's output has no last_hidden_state or tensor to compare")
            mask = b.get("attention_mask") if isinstance(b, dict) else None
            out.append((y.float(), None if mask is None else mask.bool()))
    return out


def _output_error(ref, got) -> float:
    """Mean (1 - cos) over real tokens (or rows) between two sets of outputs."""
    total, n = 0.0, 0
    for (a, mask), (b, _) in zip(ref, got):
        c = 1 - nn.functional.cosine_similarity(a, b, dim=-1)
        c = c[mask] if mask is not None and c.shape == mask.shape else c.reshape(-1)
        total += float(c.sum())
        n += c.numel()
    return total / max(n, 1)


def output_sensitivity(model: nn.Module, modules: dict[str, nn.Module], stats: dict[str, torch.Tensor],
                       batches, widths=SENSITIVITY_BITS) -> dict[str, dict[int, float]]:
    """Per tensor and width, the output error when it alone is clustered at that width (importance-weighted
    k-means, nearest labels) and every other tensor stays exact: the unit that makes errors comparable.
    Measured, not extrapolated, at the narrow widths: from 2 bits to 1 the output error of MiniLM's word
    embedding grows 7x while its weight error grows 3x."""
    ref = _outputs(model, batches)
    out = {}
    for name, m in modules.items():
        w = m.weight.detach().clone()  # a copy: the weight itself is overwritten below
        rows = w.t() if is_transposed_linear(m) else w.reshape(w.shape[0], -1)
        s = stats[name]
        imp = ((1.0 + s.float())[:, None] if s.dim() == 1 else torch.diagonal(s).float().clamp_min(0)[None, :] + 1e-12)
        saved = w
        out[name] = {}
        try:
            for bits in widths:
                centroids, labels = kmeans1d_rows(rows, 1 << bits, weights=imp.expand_as(rows).contiguous())
                approx = torch.gather(torch.from_numpy(centroids).to(w.dtype), 1, torch.from_numpy(labels).long())
                with torch.no_grad():
                    m.weight.copy_(approx.t() if is_transposed_linear(m) else approx.reshape(w.shape))
                out[name][bits] = max(_output_error(ref, _outputs(model, batches)), 1e-12)
        finally:
            with torch.no_grad():
                m.weight.copy_(saved)
    return out


def collect_statistics(model: nn.Module, names: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] for each Linear and row counts for each Embedding of the uncompressed model (what
    ``plan_bits`` measures the errors with); the identity / no counts where no batch reached a module."""
    from weightshare.compress.calibrate import layer_statistics

    stats, _ = layer_statistics(model, names, batches)
    for n, m in names.items():
        if n not in stats:
            K = m.weight.shape[0] if is_transposed_linear(m) else m.weight[0].numel()  # a Conv2d's in·kh·kw
            stats[n] = (torch.zeros(m.weight.shape[0]) if isinstance(m, nn.Embedding)
                        else torch.eye(K, dtype=torch.float64))
    return stats


def plan_model(model: nn.Module, config, batches, target_bytes: int | None = None, avg_bits: float | None = None,
               filter_fn=None, outliers: float = 0.0) -> tuple[dict, BitPlan]:
    """Per-module ``CodebookConfig`` (``config`` with its own ``bits``) for a size budget on ``model``.

    ``batches``: calibration inputs (``calibrate.text_batches``), or None for weight-space errors
    (H = I, every row alike).  Modules that share one weight (a tied LM head) get one config.
    ``outliers``: the fraction of each weight kept exact beside its codebook (``--outliers``): their
    bytes (an int32 position and a table-dtype value each, two more tensors) are a fixed cost; under
    ``avg_bits`` they count inside the average, as ``inspect`` counts them.
    """
    from dataclasses import replace

    from weightshare.sharing.codebook import TABLE_DTYPES, channel_layout, group_layout, outlier_bytes

    if (target_bytes is None) == (avg_bits is None):
        raise ValueError("size budget\n  expected: one of --target-size or --avg-bits")
    keep = filter_fn or (lambda m, n: True)
    owners: dict[int, list[str]] = {}
    modules: dict[str, nn.Module] = {}
    for fqn, m in model.named_modules():
        if (isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)) or is_transposed_linear(m)) and keep(m, fqn):
            owners.setdefault(id(m.weight), []).append(fqn)
            modules[fqn] = m
    # one tensor per shared weight, its first owner an Embedding where there is one (its rows are looked up)
    first = {}
    for names in owners.values():
        emb = [n for n in names if isinstance(modules[n], nn.Embedding)]
        first[(emb or names)[0]] = names
    weights, n_groups = {}, {}
    for n in first:
        m = modules[n]
        w = m.weight.detach()
        w = w.t() if is_transposed_linear(m) else w.reshape(w.shape[0], -1)
        weights[n] = w
        n_groups[n] = group_layout(channel_layout(m.weight.shape, is_transposed_linear(m)), config.granularity,
                                   config.group_size, f"{n}.weight")[0]
    chosen_ids = {id(modules[n].weight) for n in first}
    seen, fixed, dense = set(), 0, []
    persistent = set(model.state_dict(keep_vars=True))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or id(t) in chosen_ids or name not in persistent:
            continue
        seen.add(id(t))
        fixed += t.numel() * t.element_size()
        dense.append(name)
    header = header_size(dense, [f"{n}.weight" for n in first], bool(outliers))
    sensitivity = None
    if batches is None:
        stats = {n: (torch.zeros(w.shape[0]) if isinstance(modules[n], nn.Embedding)
                     else torch.eye(w.shape[1], dtype=torch.float64)) for n, w in weights.items()}
    else:
        stats = collect_statistics(model, {n: modules[n] for n in first}, batches)
        sensitivity = output_sensitivity(model, {n: modules[n] for n in first}, stats, batches[:SENSITIVITY_BATCHES])
    itemsize = torch.empty((), dtype=TABLE_DTYPES[config.table_dtype]).element_size()
    if avg_bits is not None:
        target_bytes = average_bits_target(avg_bits, weights, n_groups, fixed, header, itemsize)
    fixed += sum(outlier_bytes(int(outliers * w.numel()), w.numel(), config) for w in weights.values())
    plan = plan_bits(weights, stats, target_bytes, fixed, n_groups, header, table_itemsize=itemsize,
                     sensitivity=sensitivity)
    configs = {}
    for n, names in first.items():
        cfg = replace(config, bits=plan.bits[n])
        for other in names:
            configs[other] = cfg
    return configs, plan
