"""Mixed bits under a size budget: the plan is the best the marginal analysis can find, the file lands
below the requested size by less than 1 %, and impossible budgets say what is possible."""

import itertools
import os

import pytest
import torch

import weightshare as ws
from weightshare.compress import compress
from weightshare.compress.budget import _hull, codebook_bytes, parse_size, plan_bits
from weightshare.pack import FILENAME
from weightshare.sharing.codebook import CodebookConfig


def test_parse_size():
    assert parse_size("8MB") == 8_000_000 and parse_size("7.5MiB") == int(7.5 * 2**20) and parse_size(123) == 123
    assert parse_size("2 kb") == 2000
    for bad in ("8 parsecs", "-3MB", "0", "MB"):
        with pytest.raises(ValueError, match="--target-size"):
            parse_size(bad)


def test_hull_keeps_the_lower_convex_points():
    costs, errs = [1, 2, 3, 4], [10.0, 9.5, 2.0, 1.9]  # 2 is above the segment 1 -> 3
    assert _hull(costs, errs) == [0, 2, 3]
    assert _hull([1, 2, 3], [5.0, 5.0, 1.0]) == [0, 2]  # a step that buys nothing is never taken


def test_plan_is_optimal_on_a_small_problem_and_fits():
    """Against every assignment of widths (brute force) on three tensors whose error curves are convex:
    the greedy plan reaches the optimum of the predicted error under the budget."""
    torch.manual_seed(0)
    weights = {f"t{i}": torch.randn(r, 32) * s for i, (r, s) in enumerate([(8, 1.0), (16, 0.1), (4, 3.0)])}
    stats = {n: torch.eye(32, dtype=torch.float64) * (1 + i) for i, n in enumerate(weights)}
    groups = {n: w.shape[0] for n, w in weights.items()}
    cands = (1, 2, 3, 4)
    budget = 100 + sum(codebook_bytes(w.numel(), groups[n], 3) for n, w in weights.items())
    plan = plan_bits(weights, stats, budget, fixed_bytes=100, n_groups=groups, header_bytes=0, candidates=cands)
    cost = lambda a: 100 + sum(codebook_bytes(weights[n].numel(), groups[n], b) for n, b in a.items())  # noqa: E731
    err = lambda a: sum(plan.errors[n][b] for n, b in a.items())  # noqa: E731
    best = min((dict(zip(weights, bs)) for bs in itertools.product(cands, repeat=3)
                if cost(dict(zip(weights, bs))) <= budget),
               key=err)
    assert cost(plan.bits) <= budget and plan.predicted_bytes == cost(plan.bits)
    assert err(plan.bits) <= err(best) * 1.05  # greedy on convex hulls: optimal up to the last step
    with pytest.raises(ValueError, match="below the smallest packed file"):
        plan_bits(weights, stats, 10, 100, groups, 0, candidates=cands)
    with pytest.raises(ValueError, match="above the largest packed file"):
        plan_bits(weights, stats, 10**9, 100, groups, 0, candidates=cands)


@pytest.mark.parametrize("target", ["5MB", "9.5MB"])
def test_minilm_file_lands_within_one_percent_below_the_target(minilm_path, tmp_path, target):
    ws.set_progress(False)
    out = tmp_path / "p"
    model, rep, _ = compress(minilm_path, out, CodebookConfig(), target_size=target)  # data-free: fast
    size = os.path.getsize(out / FILENAME)
    want = parse_size(target)
    assert 0.99 * want <= size <= want
    widths = set(model._weightshare_bit_plan.bits.values())
    assert len(widths) > 1  # mixed
    loaded = ws.load(out)  # and it runs in the packed modules
    assert loaded.encode(["a sentence"]).shape == (1, 384)


def test_avg_bits_budget_and_feasible_range(minilm_path, tmp_path):
    ws.set_progress(False)
    model, rep, _ = compress(minilm_path, tmp_path / "a", CodebookConfig(), avg_bits=3.5)
    assert 3.45 <= rep.bits_per_weight <= 3.5
    with pytest.raises(ValueError, match=r"below the smallest packed file\n  expected: between"):
        compress(minilm_path, tmp_path / "b", CodebookConfig(), target_size="1MB")
    with pytest.raises(ValueError, match="above the largest packed file"):
        compress(minilm_path, tmp_path / "c", CodebookConfig(), target_size="1GB")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="one of them"):
        compress(minilm_path, tmp_path / "d", CodebookConfig(), target_size="8MB", avg_bits=3.0)


def test_calibrated_budget_weighs_tensors_by_their_effect_on_the_output(minilm_path, tmp_path):
    """With calibration the word embedding (half the weights) is not starved: measured, its output error
    at 1 bit is 7x that at 2 bits, where its weight error is 3x."""
    from weightshare.corpus import calibration_sentences

    ws.set_progress(False)
    model, _, _ = compress(minilm_path, tmp_path / "p", CodebookConfig(), calibration=calibration_sentences(32),
                           method="wkmeans", target_size="8MB")
    plan = model._weightshare_bit_plan
    assert plan.bits["embeddings.word_embeddings"] >= 2
    errors = plan.errors["embeddings.word_embeddings"]
    assert all(errors[b] > errors[b + 1] for b in range(1, 8))
