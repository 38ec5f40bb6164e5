"""Result dataclasses shared by PQ-Map, AQ-Map, the refiner and the pipelines.

Map conventions (documented in the README): P is high where the image looks good; A is high where
the image needs refinement for alignment (an unmatched phrase should be drawn there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NOUN_UNMATCHED = "noun-unmatched"
ADJECTIVE_UNMATCHED = "adjective-unmatched"


@dataclass
class PQResult:
    p: float  # perceptual quality score, eq. 3 (cask of the four factor scores)
    factors: dict[str, float]  # overall, technical, rationality, naturalness: P(good) at CLS
    P: np.ndarray  # (H, W) float32 in [0, 1], high = good

    def to_json(self) -> dict:
        return {"p": self.p, "factors": dict(self.factors), "map_size": list(self.P.shape)}


@dataclass
class PhraseScore:
    text: str  # phrase with stop words removed
    noun: str  # its head noun ("" when it has none)
    parent: int  # index of the parent phrase (its own index when it has none)
    a_pns: float  # noun score sigmoid(10 * cls_sim)
    a_phs: float  # phrase score
    defect: str | None  # NOUN_UNMATCHED, ADJECTIVE_UNMATCHED or None

    def to_json(self) -> dict:
        return {"text": self.text, "noun": self.noun, "parent": self.parent,
                "a_pns": self.a_pns, "a_phs": self.a_phs, "defect": self.defect}


@dataclass
class AQResult:
    a: float  # alignment score, eq. 8
    clip_score: float  # sigmoid(10 * cls_sim) of the whole prompt
    A: np.ndarray  # (H, W) float32 in [0, 1], high = needs refinement (0 where nothing is unmatched)
    phrases: list[PhraseScore] = field(default_factory=list)
    emphasised_prompt: str = ""  # refinement prompt of eq. 7 (unmatched phrases weighted)

    @property
    def unmatched(self) -> list[str]:
        return [ph.text for ph in self.phrases if ph.defect is not None]

    def to_json(self) -> dict:
        return {"a": self.a, "clip_score": self.clip_score, "map_size": list(self.A.shape),
                "phrases": [ph.to_json() for ph in self.phrases],
                "unmatched": self.unmatched, "emphasised_prompt": self.emphasised_prompt}


@dataclass
class ScoreResult:
    pq: PQResult
    aq: AQResult | None  # None when the item has no prompt (PQ only)

    @property
    def p(self) -> float:
        return self.pq.p

    @property
    def a(self) -> float | None:
        return None if self.aq is None else self.aq.a
