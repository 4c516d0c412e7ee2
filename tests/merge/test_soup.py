"""merge.soup: the greedy soup follows Wortsman et al.'s rule exactly; buffers are never averaged."""

import pytest
import torch

from weightshare.merge import get_method
from weightshare.merge.soup import SoupStep, greedy_soup, greedy_soup_trace, uniform_soup

TARGET = {"w": torch.tensor([0.5, -1.0, 2.0, 0.0]), "b": torch.tensor([1.0, -0.5])}


def evaluate(state):
    """Deterministic held-out score: minus the squared distance to a target (higher is better)."""
    return -float(sum(((state[k].double() - TARGET[k].double()) ** 2).sum() for k in TARGET))


def ingredients(seed, n=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        noise = 0.3 + 1.5 * torch.rand((), generator=g)  # some near the target, some far
        out.append({"w": TARGET["w"] + noise * torch.randn(4, generator=g),
                    "b": TARGET["b"] + noise * torch.randn(2, generator=g),
                    "steps": torch.tensor(100 + i), "mask": torch.rand(3, generator=g) > 0.5})
    return out


def brute_force(states):
    """Algorithm 1 of the paper, written out independently: sort by score, keep if the mean does not get worse."""
    order = sorted(range(len(states)), key=lambda i: evaluate(states[i]), reverse=True)

    def mean(members):
        return {k: torch.stack([states[j][k].double() for j in members]).mean(0) for k in TARGET}

    kept = [order[0]]
    for i in order[1:]:
        if evaluate(mean(kept + [i])) >= evaluate(mean(kept)):
            kept.append(i)
    return kept, mean(kept)


def test_greedy_soup_matches_a_brute_force_reimplementation_of_the_rule():
    decisions = set()
    for seed in range(12):
        states = ingredients(seed)
        soup, trace = greedy_soup_trace(states, evaluate=evaluate)
        kept, expected = brute_force(states)
        assert trace.kept == kept, seed
        for k in TARGET:
            torch.testing.assert_close(soup[k], expected[k].float(), rtol=1e-6, atol=1e-6)
        assert trace.score == pytest.approx(evaluate(soup), abs=1e-5)
        assert trace.score >= max(trace.scores) - 1e-9  # never worse than the best ingredient on held-out data
        assert trace.order[0] == max(range(len(states)), key=lambda i: trace.scores[i])
        decisions |= {s.kept for s in trace.steps}
        assert all(torch.equal(a, b) for a, b in zip(greedy_soup(states, evaluate=evaluate).values(), soup.values()))
    assert decisions == {True, False}  # the cases exercised both branches of the rule


def test_a_candidate_that_hurts_is_skipped_and_one_that_helps_is_kept():
    def state(x):
        return {"w": TARGET["w"] + x, "b": TARGET["b"].clone()}

    # scores: A(+0.1) -0.04, B(-0.15) -0.09, C(+0.3) -0.36.  A+B = -0.025 from the target: kept;
    # A+B+C = +0.0833: worse than the soup of A and B: skipped.
    states = [state(0.3), state(-0.15), state(0.1)]
    soup, trace = greedy_soup_trace(states, evaluate=evaluate)
    assert trace.order == [2, 1, 0] and trace.kept == [2, 1]
    assert [(s.ingredient, s.kept) for s in trace.steps] == [(1, True), (0, False)]
    assert trace.steps[1].score_with < trace.steps[1].score_before
    torch.testing.assert_close(soup["w"], TARGET["w"] - 0.025)
    assert "skip ingredient 0" in str(trace) and "2 of 3 ingredients kept [2, 1]" in str(trace)


def test_integer_and_bool_tensors_come_from_the_best_ingredient_unaveraged():
    states = ingredients(3)
    soup, trace = greedy_soup_trace(states, evaluate=evaluate)
    best = trace.order[0]
    assert best != 0  # the best is not simply the first
    assert torch.equal(soup["steps"], states[best]["steps"]) and soup["steps"].dtype == torch.int64
    assert torch.equal(soup["mask"], states[best]["mask"]) and soup["mask"].dtype == torch.bool
    uniform = uniform_soup(states)  # no ranking: the first ingredient's
    assert torch.equal(uniform["steps"], states[0]["steps"]) and torch.equal(uniform["mask"], states[0]["mask"])
    torch.testing.assert_close(uniform["w"], torch.stack([s["w"] for s in states]).mean(0))


def test_identical_ingredients_give_the_ingredient_and_all_are_kept():
    state = ingredients(0, n=1)[0]
    soup, trace = greedy_soup_trace([state] * 5, evaluate=evaluate)
    assert trace.kept == [0, 1, 2, 3, 4]  # ties are kept: the rule is >=
    for k in state:
        assert torch.equal(soup[k], state[k])  # exactly: a mean of equal tensors is that tensor
    single, trace = greedy_soup_trace([state], evaluate=evaluate)
    assert trace.kept == [0] and trace.steps == [] and all(torch.equal(single[k], state[k]) for k in state)


def test_dtype_weights_and_known_scores():
    states = [{"w": torch.tensor([1.0, 3.0], dtype=torch.float16)},
              {"w": torch.tensor([3.0, 5.0], dtype=torch.float16)}]
    calls = []

    def score(s):
        calls.append(1)
        return 0.0  # every soup ties: everything is kept

    soup = greedy_soup(states, evaluate=score, weight=[3.0, 1.0])
    assert soup["w"].dtype == torch.float16 and torch.equal(soup["w"], torch.tensor([1.5, 3.5], dtype=torch.float16))
    assert len(calls) == 3  # two ingredients, one candidate soup
    calls.clear()
    _, trace = greedy_soup_trace(states, evaluate=score, scores=[1.0, 2.0])
    assert len(calls) == 1 and trace.order == [1, 0] and trace.steps == [SoupStep(0, 0.0, 2.0, False)]


def test_registered_and_reachable_through_merge():
    from weightshare.merge.streaming import merge

    method = get_method("greedy_soup")
    assert method.tensorwise is False and method.fn is greedy_soup and "Wortsman" in method.source
    states = ingredients(5)
    soup = merge(states, method="greedy_soup", evaluate=evaluate)
    expected = greedy_soup(states, evaluate=evaluate)
    assert all(torch.equal(soup[k], expected[k]) for k in expected)


@pytest.mark.parametrize("states, kwargs, match", [
    ([], {}, r"state_dicts\n  expected: a non-empty list"),
    ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], {}, r"ingredient 1\n  expected: the tensor names"),
    ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], {}, r"tensor 'w'\n  expected: \(2,\) torch.float32"),
    ([{"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.long)}], {}, r"float or not alike"),
    ([{"w": torch.zeros(2)}] * 2, {"weight": [1.0]}, r"weight\n  expected: one finite number > 0 per ingredient"),
    ([{"w": torch.zeros(2)}] * 2, {"evaluate": lambda s: float("nan")}, r"evaluate\(ingredient 0\)(?s:.*)got: nan"),
    ([{"w": torch.zeros(2)}] * 2, {"evaluate": "acc"}, r"evaluate\n  expected: a function"),
    ([{"w": torch.zeros(2)}] * 2, {"scores": [1.0]}, r"scores\n  expected: one number per ingredient \(2\)"),
])
def test_bad_input_is_one_clear_value_error(states, kwargs, match):
    kwargs = {"evaluate": evaluate, **kwargs}
    with pytest.raises(ValueError, match=match):
        greedy_soup(states, **kwargs)
