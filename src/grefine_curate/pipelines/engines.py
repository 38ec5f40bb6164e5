"""The models as the processor sees them: the ``Engine`` protocol and its real implementation.

``ModelEngine`` wraps the science (curate/: QualityScorer for PQ-Map and AQ-Map, the routing rule,
BalancedRefiner). Tests inject their own engines (a fake that scores from pixel statistics, one that
fails on chosen items) through ``EngineSpec.factory``; executors build engines from the spec, in
process or inside each Ray actor, so the same injection reaches both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from PIL import Image

from grefine_curate.curate.config import Preset, RoutingConfig
from grefine_curate.curate.results import ScoreResult


@dataclass
class RefineRequest:
    image: Image.Image
    prompt: str | None
    score: ScoreResult
    route: str  # "light" | "full" (skip never reaches the refiner)
    seed: int
    item_id: str
    size: tuple[int, int] | None = None  # (W, H) of the original when `image` came from refine_input


@dataclass
class RefineResponse:
    image: Image.Image | None  # None: keep the original (route "skip"/"reverted")
    route: str  # final route; "reverted" when the no-regression guard kept the original
    p_after: float | None
    a_after: float | None


class Engine(Protocol):
    """What the processor needs from the models: score, route, refine, seed.

    ``refine_input(image) -> image`` is optional: the image refinement starts from (the refiner's
    processing size), so the processor can drop a large original before the refined outputs of its
    batch are made. An engine without it gets the full-size images (``RefineRequest.size`` is then
    the image's own size).
    """

    def score(self, images: list[Image.Image], prompts: list[str | None]) -> list[ScoreResult]: ...

    def route(self, p: float, a: float | None) -> str: ...

    def refine(self, requests: list[RefineRequest]) -> list[RefineResponse]: ...

    def item_seed(self, item_id: str) -> int: ...


@dataclass(frozen=True)
class EngineSpec:
    """How to build the models (picklable: Ray actors build their own copy).

    ``factory`` (optional, picklable) builds the engine instead of ``ModelEngine``: the seam where
    tests inject fakes and faults without touching production code paths."""

    preset: Preset
    mode: str  # "refine" loads the refiner too; "score" only the scorer
    models_dir: str | None = None
    factory: Callable[["EngineSpec"], Any] | None = None

    def key(self) -> tuple[Any, ...]:
        # One engine serves both modes and any thresholds (the processor routes with opts.routing), so
        # the two passes of quantile routing load the models once.
        return (dataclasses.replace(self.preset, routing=RoutingConfig()).hash(), self.models_dir, self.factory)


class ModelEngine:
    """The real models: QualityScorer (PQ-Map + AQ-Map), routing, BalancedRefiner."""

    def __init__(self, spec: EngineSpec):
        from grefine_curate.curate.scorer import QualityScorer

        self.preset = spec.preset
        self.models_dir = spec.models_dir
        self.scorer = QualityScorer(spec.preset, models_dir=spec.models_dir)
        self.refiner = None
        self.ensure_mode(spec.mode)

    def ensure_mode(self, mode: str) -> None:
        """A score engine gains the refiner when a refine job reuses it (same preset, same process)."""
        if mode == "refine" and self.refiner is None:
            from grefine_curate.curate.refiner import BalancedRefiner

            self.refiner = BalancedRefiner(self.preset.refiner, self.preset.routing, rescore=self.scorer.rescore,
                                           models_dir=self.models_dir)

    def score(self, images: list[Image.Image], prompts: list[str | None]) -> list[ScoreResult]:
        return self.scorer.score(images, prompts)

    def route(self, p: float, a: float | None) -> str:
        from grefine_curate.curate.routing import choose_route

        return choose_route(p, a, self.preset.routing)

    def item_seed(self, item_id: str) -> int:
        from grefine_curate.curate.refiner import item_seed

        return item_seed(self.preset.seed, item_id)

    def refine_input(self, image: Image.Image) -> Image.Image:
        from grefine_curate.curate.refiner import refine_input

        return refine_input(image, self.preset.refiner.resolution)

    def refine(self, requests: list[RefineRequest]) -> list[RefineResponse]:
        from grefine_curate.curate.refiner import RefineItem

        items = []
        for r in requests:
            aq = r.score.aq
            # Stage 1 gets AQ's emphasised prompt (eq. 7); the guard re-scores with the plain one.
            items.append(RefineItem(
                image=r.image, prompt=(aq.emphasised_prompt or r.prompt) if aq is not None else r.prompt,
                p=r.score.p, a=r.score.a, P=r.score.pq.P, A=None if aq is None else aq.A, seed=r.seed,
                route=r.route, score_prompt=r.prompt, output_size=r.size,
            ))
        out = []
        for o in self.refiner.refine(items):
            changed = o.route in ("light", "full")
            out.append(RefineResponse(image=o.image if changed else None, route=o.route,
                                      p_after=o.p_after, a_after=o.a_after))
        return out


def build_engine(spec: EngineSpec) -> Engine:
    if spec.factory is not None:
        return spec.factory(spec)
    return ModelEngine(spec)


class LazyEngine:
    """Builds the models on first use: a run reusing an audit that refines nothing never loads them."""

    def __init__(self, build, seed: int):
        self._build, self._engine, self.seed = build, None, seed

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = self._build()
        return self._engine

    def score(self, images, prompts):
        return self.get().score(images, prompts)

    def route(self, p, a):
        return self.get().route(p, a)

    def refine(self, requests):
        return self.get().refine(requests)

    def refine_input(self, image):
        fn = getattr(self.get(), "refine_input", None)
        return image if fn is None else fn(image)

    def item_seed(self, item_id: str) -> int:
        from grefine_curate.curate.refiner import item_seed

        return item_seed(self.seed, item_id)
