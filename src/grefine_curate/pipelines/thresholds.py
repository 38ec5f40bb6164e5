"""Routing thresholds from the data set's own score distribution (``--refine-worst F --light-next G``).

The preset thresholds (``[routing]``: skip_p, skip_a, light_p, light_a) are fixed numbers; on a new
data set "p < 0.5" may be 2% or 60% of the images. A curator thinks in fractions instead, so:

    light_p = the F-quantile of p      light_a = the F-quantile of a
    skip_p  = the (F+G)-quantile of p  skip_a  = the (F+G)-quantile of a

and the usual rule (``curate/routing.py``) applies: an item among the worst F by p *or* by a goes
``full``; one among the worst F+G by p or by a, and not full, goes ``light``; the rest ``skip``. So
"--refine-worst 0.15" refines at most 15% by each score (up to 30% in all when the two worst sets
are disjoint); the counts per route are in the summary, manifest and report.

A quantile threshold is a score of the data set: the worst fraction are the items strictly below
it, so ties on the threshold score take the better route and the realised fraction is at most F.
F = 0 puts the threshold at the lowest score: nothing is strictly below it, nothing is refined.
Only scored items count (error rows have no score); a is taken over the items with a prompt.
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
    refine_worst: float  # F: fraction of scored items (by p, and by a) routed full
    light_next: float  # G: the next fraction routed light

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


def quantile_routing(p: np.ndarray, a: np.ndarray, q: QuantileRouting) -> RoutingConfig:
    """Thresholds from the scores of every scored item (``p``) and of those with a prompt (``a``)."""
    q.check()
    worst, both = q.refine_worst, min(1.0, q.refine_worst + q.light_next)
    light_p, skip_p = threshold_at(p, worst), threshold_at(p, both)
    if len(a):
        light_a, skip_a = threshold_at(a, worst), threshold_at(a, both)
    else:  # no prompts: a is None for every item and routing uses p alone
        light_a = skip_a = 0.0
    return RoutingConfig(skip_p=skip_p, skip_a=skip_a, light_p=light_p, light_a=light_a)


def describe(routing: RoutingConfig, q: QuantileRouting | None, n_p: int | None = None, n_a: int | None = None,
             scores_from: str | None = None) -> dict[str, Any]:
    """What the manifest and the report record about the thresholds in force."""
    out: dict[str, Any] = {
        "source": "quantiles" if q is not None else "preset",
        "thresholds": {"skip_p": routing.skip_p, "skip_a": routing.skip_a,
                       "light_p": routing.light_p, "light_a": routing.light_a},
    }
    if q is not None:
        out.update({"refine_worst": q.refine_worst, "light_next": q.light_next, "items_with_p": n_p,
                    "items_with_a": n_a})
    if scores_from is not None:
        out["scores_from"] = scores_from
    return out


__all__ = ["QuantileRouting", "describe", "quantile_routing", "threshold_at"]
