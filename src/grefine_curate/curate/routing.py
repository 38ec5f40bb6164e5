"""Routing: which refinement an image gets, from its scores p and a (G-Refine, section 3.3).

The paper refines every image; a curation job does not need to. Three routes, from the quality
scores p (perceptual, eq. 3) and a (alignment, eq. 8), both "high = good":

    skip   no diffusion: the image is returned unchanged
    light  stage 2 only: the global low-strength pass at delta
    full   stage 1 (inpaint the low-quality mask) then stage 2

Rule (thresholds from the preset's ``[routing]`` table):

    skip   when p >= skip_p  and a >= skip_a
    full   when p <  light_p or  a <  light_a
    light  otherwise

An item without a prompt (a is None) is routed by p alone. A score exactly on a threshold takes the
better route (>= skip, not < light). The rule is monotone: raising p or a never moves an image to a
heavier route.

The thresholds are the preset's, or a budget's (``--refine-worst F --light-next G``): then
``pipelines/thresholds.py`` picks them from the data set's scores so that this same rule routes at
most floor(F x n) items full and floor(G x n) light, worst first by each item's worse percentile.
"""

from __future__ import annotations

import math

from grefine_curate.curate.config import RoutingConfig
from grefine_curate.curate.errors import ConfigError

ROUTES = ("skip", "light", "full")


def check_routing(cfg: RoutingConfig) -> None:
    """Raise ConfigError when the thresholds cannot form the three routes."""
    for name in ("skip_p", "skip_a", "light_p", "light_a"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"routing.{name} must be a number in [0, 1], got {value!r}")
    if cfg.light_p > cfg.skip_p or cfg.light_a > cfg.skip_a:
        raise ConfigError(
            f"routing thresholds out of order: need light_p <= skip_p and light_a <= skip_a, got "
            f"light_p={cfg.light_p}, skip_p={cfg.skip_p}, light_a={cfg.light_a}, skip_a={cfg.skip_a}"
        )


def _score(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r} (scores come from PQ-Map / AQ-Map)")
    return v


def choose_route(p: float, a: float | None, cfg: RoutingConfig) -> str:
    """The route of one image: "skip", "light" or "full" (rule in the module docstring)."""
    check_routing(cfg)
    p = _score("p", p)
    if a is None:  # no prompt: perceptual quality alone decides
        if p >= cfg.skip_p:
            return "skip"
        return "full" if p < cfg.light_p else "light"
    a = _score("a", a)
    if p >= cfg.skip_p and a >= cfg.skip_a:
        return "skip"
    if p < cfg.light_p or a < cfg.light_a:
        return "full"
    return "light"
