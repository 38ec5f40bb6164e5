"""Routing thresholds from the data set's own scores: a budget (``--refine-worst F --light-next G``).

The preset thresholds (``[routing]``: skip_p, skip_a, light_p, light_a) are fixed numbers; on a new
data set "p < 0.5" may be 2% or 60% of the images. A curator thinks in a budget instead: of the n
scored items (error rows have no score) at most floor(F x n) go ``full`` and at most floor(G x n)
more go ``light``; the rest ``skip``.

Order: an item is as bad as its *worse* percentile, min(percentile of p, percentile of a), so an
item bad on either score counts once against the budget. A percentile is the share of items with a
strictly lower score (p over every scored item, a over the items with a prompt); an item without a
prompt has no a and is placed by p alone. Items are taken in that order, worst first: on equal
percentiles p's comes first, and items with the same score value come together (a threshold cannot
split them), so when the next group would overflow the budget it stops there: the realised count is
the largest one, at most the budget, that the order and the ties allow.

The routes stay the usual rule of ``curate/routing.py`` (the thresholds are what the manifest records
and what the job routes with): taking p's items below percentile t and a's items below percentile
t' is exactly ``full when p < light_p or a < light_a`` with light_p = the lowest p left out and
light_a = the lowest a left out; the same walk, continued by floor(G x n) items, gives skip_p and
skip_a. The items strictly below a threshold are the ones taken; a threshold lies halfway between
the last score taken and the next one (so a score and its float32 copy route alike), F = 0 puts it
at 0.0 (nothing below it, nothing refined). A score of exactly 1.0 cannot lie below a threshold in
[0, 1]: such a group is never taken by that score.
``realised`` (in ``describe``) gives the counts and fractions that came out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from grefine_curate.curate.config import RoutingConfig
from grefine_curate.curate.errors import ConfigError


@dataclass(frozen=True)
class QuantileRouting:
    refine_worst: float  # F: at most floor(F x n) of the n scored items go full (the worst by min percentile of p, a)
    light_next: float  # G: at most floor(G x n) more go light (the next worst)

    def check(self) -> None:
        for name, v in (("--refine-worst", self.refine_worst), ("--light-next", self.light_next)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1] (e.g. 0.15 for the worst 15%), got {v!r}")
        if self.refine_worst + self.light_next > 1.0 + 1e-9:
            raise ConfigError(f"--refine-worst + --light-next must be at most 1, got {self.refine_worst} + "
                              f"{self.light_next} = {self.refine_worst + self.light_next:g}")


def threshold_at(values: np.ndarray, fraction: float) -> float:
    """The score below which (strictly) lie the worst ``fraction`` of ``values`` (at most that many on ties)."""
    n = len(values)
    if n == 0:
        return 0.0
    v = np.sort(np.asarray(values, dtype=np.float64))
    k = math.ceil(round(fraction * n, 9))  # round: 0.15 * 100 is 15.000000000000002 in binary
    if k <= 0:
        return float(v[0])
    if k >= n:
        return float(min(1.0, np.nextafter(v[-1], np.inf)))  # every item strictly below
    return float(v[k])


@dataclass(frozen=True)
class BudgetRouting:
    routing: RoutingConfig  # the thresholds that realise the budget with the usual rule
    n: int  # scored items
    n_a: int  # of which with a prompt (an a)
    full: int  # items routed full, at most full_budget
    light: int  # items routed light, at most light_budget
    full_budget: int  # floor(F x n)
    light_budget: int  # floor(G x n)

    def realised(self) -> dict[str, Any]:
        """What the manifest records as ``routing.realised`` and the job prints."""
        frac = (lambda k: k / self.n) if self.n else (lambda k: 0.0)
        return {"full": self.full, "light": self.light, "skip": self.n - self.full - self.light,
                "full_fraction": frac(self.full), "light_fraction": frac(self.light),
                "full_budget": self.full_budget, "light_budget": self.light_budget}


def budget_count(fraction: float, n: int) -> int:
    """floor(fraction x n), read as the decimal the user typed (0.15 x 100 is 15, not 14)."""
    return math.floor(round(fraction * n, 9))


class _Score:
    """The tie groups of one score, lowest first, and where each item falls."""

    def __init__(self, values: np.ndarray):
        self.values, self.group = np.unique(values, return_inverse=True)  # (G,), (N,)
        starts = np.searchsorted(np.sort(values), self.values, side="left")
        self.percentile = starts / max(len(values), 1)  # (G,) share of items strictly below the group
        # A group is taken by moving the threshold to the next value above it; nothing in [0, 1] lies
        # above a score of 1.0, so a last group at 1.0 cannot be taken by this score.
        self.takeable = len(self.values) - int(len(self.values) > 0 and self.values[-1] >= 1.0)

    def threshold(self, taken: int) -> float:
        """A threshold with the ``taken`` lowest groups strictly below it and the others at or above it.

        It lies halfway between the last group taken and the next (0.0 when none is taken, halfway to
        1.0 when all are), not on a score: a score read back from float32 storage and the same score
        before rounding fall on the same side of it.
        """
        if taken == 0 or len(self.values) == 0:
            return 0.0
        below = float(self.values[taken - 1])
        above = float(self.values[taken]) if taken < len(self.values) else 1.0
        mid = below + (above - below) / 2
        return mid if below < mid else above


def budget_routing(p: np.ndarray, a: np.ndarray, q: QuantileRouting) -> BudgetRouting:
    """Thresholds that route at most floor(F x n) items full and floor(G x n) light (order: module docstring).

    ``p``: the score of every scored item; ``a``: the same items' a, NaN where an item has no prompt
    (an empty ``a`` means no item has one).
    """
    q.check()
    p = np.asarray(p, dtype=np.float64)
    a = np.full(len(p), np.nan) if len(a) == 0 else np.asarray(a, dtype=np.float64)
    if a.shape != p.shape:
        raise ValueError(f"a must pair with p (NaN for no prompt): got {a.shape} a for {p.shape} p")
    n = len(p)
    has_a = np.isfinite(a)
    # 1. Tie groups of each score; the groups of both in one order: percentile, then p before a
    sp, sa = _Score(p), _Score(a[has_a])
    pct = np.r_[sp.percentile[: sp.takeable], sa.percentile[: sa.takeable]]
    kind = np.r_[np.zeros(sp.takeable, np.int64), np.ones(sa.takeable, np.int64)]
    rank = np.empty(len(pct), np.int64)
    rank[np.lexsort((kind, pct))] = np.arange(len(pct))  # (E,) step of the walk at which a group is taken
    never = len(pct)
    # 2. An item is taken at the first step that takes its p group or its a group
    rank_p = np.r_[rank[: sp.takeable], never][np.minimum(sp.group, sp.takeable)]  # (N,)
    first = rank_p.copy()
    rank_a = np.r_[rank[sp.takeable:], never][np.minimum(sa.group, sa.takeable)]  # (N_a,)
    first[has_a] = np.minimum(first[has_a], rank_a)
    taken = np.cumsum(np.bincount(first, minlength=never + 1)[:never])  # (E,) items taken after step k

    def steps(budget: int) -> int:  # the walk stops before the first step that would overflow the budget
        return int(np.searchsorted(taken, budget, side="right"))

    def thresholds(k: int) -> tuple[float, float]:  # after k steps: how many groups of p and of a are below
        kp = int((rank[: sp.takeable] < k).sum())
        ka = int((rank[sp.takeable:] < k).sum())
        return sp.threshold(kp), sa.threshold(ka)

    # 3. Full: the first floor(F x n) items of the order; light: the next floor(G x n)
    full_budget, light_budget = budget_count(q.refine_worst, n), budget_count(q.light_next, n)
    k_full = steps(full_budget)
    n_full = int(taken[k_full - 1]) if k_full else 0
    k_light = steps(n_full + light_budget)
    n_light = (int(taken[k_light - 1]) if k_light else 0) - n_full
    light_p, light_a = thresholds(k_full)
    skip_p, skip_a = thresholds(k_light)
    routing = RoutingConfig(skip_p=skip_p, skip_a=skip_a, light_p=light_p, light_a=light_a)
    return BudgetRouting(routing=routing, n=n, n_a=int(has_a.sum()), full=n_full, light=n_light,
                         full_budget=full_budget, light_budget=light_budget)


def quantile_routing(p: np.ndarray, a: np.ndarray, q: QuantileRouting) -> RoutingConfig:
    """The thresholds of ``budget_routing`` (``a`` pairs with ``p``, NaN where an item has no prompt)."""
    return budget_routing(p, a, q).routing


def describe(routing: RoutingConfig, q: QuantileRouting | None, n_p: int | None = None, n_a: int | None = None,
             scores_from: str | None = None, realised: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the manifest and the report record about the thresholds in force."""
    out: dict[str, Any] = {
        "source": "quantiles" if q is not None else "preset",
        "thresholds": {"skip_p": routing.skip_p, "skip_a": routing.skip_a,
                       "light_p": routing.light_p, "light_a": routing.light_a},
    }
    if q is not None:
        out.update({"refine_worst": q.refine_worst, "light_next": q.light_next, "items_with_p": n_p,
                    "items_with_a": n_a})
    if realised is not None:
        out["realised"] = realised  # items and fractions routed full / light / skip by the budget
    if scores_from is not None:
        out["scores_from"] = scores_from
    return out


__all__ = ["BudgetRouting", "QuantileRouting", "budget_count", "budget_routing", "describe", "quantile_routing",
           "threshold_at"]
