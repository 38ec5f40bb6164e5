"""PQ-Map and AQ-Map together, from ONE CLIP-Surgery forward per image.

Both maps read the same surgery tokens when they share a backbone (they do in every preset), so
the job pays for one image forward and two cheap heads: PQ's four prompt pairs, and AQ's phrase
features from a text cache shared by the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from grefine_curate.curate.aq_map import AQMap
from grefine_curate.curate.clip_models import ClipBundle, load_clip
from grefine_curate.curate.config import Preset
from grefine_curate.curate.pq_map import PQMap
from grefine_curate.curate.results import PQResult, ScoreResult


class QualityScorer:
    """Scores images (and their prompts) with PQ-Map and AQ-Map for one preset.

    ``score(images, prompts)`` -> one ScoreResult per image; ``aq`` is None where the prompt is
    null or empty (PQ only).
    """

    def __init__(
        self,
        preset: Preset,
        models_dir: str | os.PathLike | None = None,
        clip: ClipBundle | None = None,
        prompts: str | os.PathLike | None = None,
    ):
        self.preset = preset
        self.clip = clip if clip is not None else load_clip(preset.clip, models_dir=models_dir, seed=preset.seed)
        self.pq = PQMap.from_preset(preset, models_dir=models_dir, prompts=prompts, clip=self.clip)
        # one surgery encoder (and one forward) for both maps
        self.aq = AQMap.from_preset(preset, clip=self.clip, map_resize=preset.pq.map_resize, encoder=self.pq.encoder)

    @property
    def model_ids(self) -> dict[str, str]:
        return {"clip": self.clip.name, "pq_prompts": str(self.preset.pq.prompts)}

    @torch.inference_mode()
    def tokens(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The shared forward: RGB images -> surgery tokens (B, 1+HW, D)."""
        return self.pq.encode(images)

    def score_pq(self, images: Sequence[Image.Image]) -> list[PQResult]:
        return self.pq.score(images)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str | None]) -> list[ScoreResult]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; they must match")
        if not images:
            return []
        sizes = self.pq.map_sizes(images)  # the maps' (H, W): the image's, or reduced to preset.map_max_side
        tokens = self.tokens(images)  # (B, 1+HW, D), computed once
        pq = self.pq.from_tokens(tokens, sizes)
        aq = self.aq.from_tokens(tokens, sizes, list(prompts))
        return [ScoreResult(pq=p, aq=a) for p, a in zip(pq, aq)]

    def rescore(self, images: Sequence[Image.Image], prompts: Sequence[str | None]) -> list[tuple[float, float | None]]:
        """(p, a) per image: what the refiner's no-regression guard compares."""
        return [(r.pq.p, None if r.aq is None else r.aq.a) for r in self.score(images, prompts)]
