"""--refine-worst F / --light-next G as a budget (issue 16 item 2): at most floor(F x n) items full and
floor(G x n) light in all, taken worst first by each item's worse percentile of p and a, realised with
the usual thresholds of curate/routing.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from grefine_curate.curate.errors import ConfigError
from grefine_curate.curate.routing import check_routing, choose_route
from grefine_curate.pipelines.thresholds import QuantileRouting, budget_count, budget_routing


def routes(p, a, routing) -> list[str]:
    return [choose_route(pp, None if np.isnan(aa) else aa, routing) for pp, aa in zip(p, a)]


def test_thirty_one_items_at_fifteen_percent_refine_four_not_five():
    p = np.linspace(0.0, 0.9, 31)
    b = budget_routing(p, np.full(31, np.nan), QuantileRouting(0.15, 0.0))
    assert b.full_budget == 4 and b.full == 4  # floor(0.15 x 31) = 4 (ceil gave 5)
    assert routes(p, np.full(31, np.nan), b.routing).count("full") == 4


def test_an_item_bad_on_both_scores_counts_once_and_disjoint_worst_sets_share_the_budget():
    p = np.linspace(0.0, 0.99, 100)
    a = p[::-1].copy()  # the 10 worst by p are the 10 best by a
    b = budget_routing(p, a, QuantileRouting(0.1, 0.2))
    r = routes(p, a, b.routing)
    assert r.count("full") == 10 and r.count("light") == 20 and r.count("skip") == 70
    # worse percentile first: the 5 worst by p and the 5 worst by a
    assert [i for i, x in enumerate(r) if x == "full"] == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    same = np.linspace(0.0, 0.99, 100)  # p and a agree: the worst 10 by both are one set of 10
    b = budget_routing(same, same.copy(), QuantileRouting(0.1, 0.0))
    assert routes(same, same, b.routing).count("full") == 10


def test_items_without_a_prompt_are_placed_by_p():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    a = np.array([np.nan, 0.9, np.nan, 0.05, 0.8, np.nan, 0.7, 0.6, 0.5, np.nan])
    b = budget_routing(p, a, QuantileRouting(0.2, 0.0))
    r = routes(p, a, b.routing)
    assert r.count("full") == 2 and r[0] == "full" and r[3] == "full"  # worst p (no prompt) and worst a


def test_budget_is_exact_without_ties_and_never_exceeded_with_them():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 80))
        decimals = int(rng.integers(1, 4))  # 1 decimal: many ties
        p = np.round(rng.random(n), decimals)
        a = np.round(rng.random(n), decimals)
        a[rng.random(n) < 0.3] = np.nan
        if trial % 5 == 0:
            p[rng.random(n) < 0.2] = 1.0  # cannot lie below a threshold in [0, 1]
        f, g = int(rng.integers(0, 11)) / 20, int(rng.integers(0, 11)) / 20
        if f + g > 1:
            continue
        b = budget_routing(p, a, QuantileRouting(f, g))
        check_routing(b.routing)
        r = routes(p, a, b.routing)
        assert r.count("full") == b.full <= math.floor(f * n + 1e-9), (trial, b)
        assert r.count("light") == b.light <= math.floor(g * n + 1e-9), (trial, b)
    p = rng.permutation(200) / 200  # no ties, no 1.0: the budget is met exactly
    a = rng.permutation(200) / 200
    for f, g in [(0.0, 0.0), (0.15, 0.25), (0.5, 0.5), (0.33, 0.0), (1.0, 0.0)]:
        b = budget_routing(p, a, QuantileRouting(f, g))
        assert (b.full, b.light) == (budget_count(f, 200), budget_count(g, 200)), (f, g)


def test_ties_take_the_better_route_and_the_realised_fractions_say_so():
    p = np.array([0.2, 0.2, 0.2, 0.9])
    b = budget_routing(p, np.array([]), QuantileRouting(0.5, 0.5))
    assert (b.full, b.light) == (0, 0)  # three tied items do not split, and fit neither budget of 2
    r = b.realised()
    assert r["full_budget"] == r["light_budget"] == 2 and r["full_fraction"] == r["light_fraction"] == 0.0
    b = budget_routing(p, np.array([]), QuantileRouting(0.25, 0.75))
    assert (b.full, b.light) == (0, 3) and b.realised()["light_fraction"] == 0.75
    assert routes(p, np.full(4, np.nan), b.routing) == ["light", "light", "light", "skip"]


def test_decimal_fractions_are_read_as_typed():
    assert budget_count(0.15, 100) == 15 and budget_count(0.29, 100) == 29 and budget_count(0.15, 31) == 4


def test_empty_and_bad_inputs():
    b = budget_routing(np.zeros(0), np.zeros(0), QuantileRouting(0.3, 0.3))
    assert (b.full, b.light, b.n) == (0, 0, 0)
    with pytest.raises(ConfigError, match="at most 1"):
        budget_routing(np.zeros(3), np.zeros(0), QuantileRouting(0.7, 0.4))
    with pytest.raises(ValueError, match="pair with p"):
        budget_routing(np.zeros(3), np.zeros(2), QuantileRouting(0.1, 0.0))


def test_thresholds_lie_between_scores_so_float32_copies_route_alike():
    """A score run routes its fresh float64 scores with thresholds from the float32 scores it stored."""
    exact = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])  # no float32 holds these exactly
    stored = exact.astype(np.float32).astype(np.float64)
    a_exact = exact[::-1].copy()
    a_stored = a_exact.astype(np.float32).astype(np.float64)
    for f, g in [(0.0, 0.0), (0.2, 0.3), (0.1, 0.0), (0.5, 0.5)]:
        b = budget_routing(stored, a_stored, QuantileRouting(f, g))
        assert routes(exact, a_exact, b.routing) == routes(stored, a_stored, b.routing), (f, g)
    b = budget_routing(stored, a_stored, QuantileRouting(0.0, 0.0))
    assert (b.routing.light_p, b.routing.light_a) == (0.0, 0.0)  # nothing taken: nothing is below 0
