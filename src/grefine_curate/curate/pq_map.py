"""PQ-Map: the perceptual quality map and score of G-Refine (paper section 3.1, eq. 1-3).

Image side: CLIP-Surgery tokens (``surgery.SurgeryEncoder``), (B, 1+HW, D). Text side: the four
factor pairs T_p (``prompts``), (4, 2, D). For every token f and factor i the paper's raw logit is
``L_raw = f . (T_p[i, 0] - T_p[i, 1])`` (eq. 3); scaled by ``logit_scale`` it is the logit of the
softmax over the pair, so ``s = sigmoid(logit_scale * L_raw)`` is the probability of "good":

* factor score s_i: that probability at the CLS token;
* score p (eq. 3, cask effect): ``p = s_overall * prod_{i=technical,rationality,naturalness}
  min(s_i / alpha_i, 1)``; a factor below its alpha pulls p down, one above it cannot raise it
  (``cask = false``: p = s_overall, as the reference script without ``--multi``);
* map P (eq. 3, ``P = BIC(L_per)``), by ``map_source``:
  - ``"cask"`` (default): the same cask per patch token, on probabilities taken at the map's own
    temperature ``map_logit_scale`` (10), not CLIP's 100: a float32 sigmoid is exactly 1.0 once the
    logit passes ~17 (a similarity difference of 0.17 at temperature 100), so at 100 the good part of
    an image becomes a plateau and min-max then blows float noise, or nothing, up to [0, 1]; at 10
    the probabilities keep their spatial order for any difference unit features reach, and the cask
    keeps its meaning (one bad factor makes a patch bad, a factor above its alpha adds nothing).
    ``map_logit_scale = logit_scale`` gives the saturating map of the score's own temperature.
  - ``"overall-similarity"``: the patch tokens' raw similarity to the overall factor's "good" prompt
    alone, as the reference code's PQ-Map.py computes its map.
  Then min-max per image over the patch grid, resized to the image's own (H, W) (rows of the grid =
  rows of the image), or to its reduction to ``map_max_side`` on the long side (``surgery.map_size``).
  High = good. A flat map (no spatial evidence) becomes the constant p instead of min-max's division
  by ~0 (``surgery.tokens_to_maps``).

Where the authors' reference code differs (REFERENCE.md section 1) the paper's or the correct
behaviour is the default and the reference one is selectable in ``PQConfig`` (the ``reference``
preset selects them all):

* ``alpha_mode="first-alpha"``: every factor divided by alphas[0] (the reference code's bug);
* ``feature_norm="token"``: image features L2-normalised over the token axis instead of channels;
* ``text_norm="raw"`` with ``logit_scale=1``: learned prompt features used unnormalised at
  temperature 1 (the reference code's comment says "with normalization", but none is applied);
* ``map_source="overall-similarity"``, ``cask=false``: the reference script's map and default p;
* ``map_resize="bilinear"``: the reference code's resize (the paper says bicubic);
* ``map_orientation="reference-swap"``: the reference code resizes to (W, H) (PIL's ``size``),
  which transposes the maps of non-square images. Off in every preset, ``reference`` included.

All images of a batch go through one surgery forward at ``image_size`` (whole image, bicubic, no
crop), so images of different sizes share a batch; each map comes back at its own size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from grefine_curate.curate.clip_models import ClipBundle
from grefine_curate.curate.config import FACTORS, PQConfig, Preset
from grefine_curate.curate.errors import ConfigError
from grefine_curate.curate.prompts import PQPrompts, build_pq_prompts, pq_text_features
from grefine_curate.curate.results import PQResult
from grefine_curate.curate.surgery import SurgeryEncoder, map_size, preprocess_images, tokens_to_maps

ALPHA_MODES = ("per-factor", "first-alpha")
FEATURE_NORMS = ("channel", "token")
TEXT_NORMS = ("l2", "raw")
MAP_SOURCES = ("cask", "overall-similarity")
MAP_RESIZES = ("bicubic", "bilinear", "nearest", "area")
MAP_ORIENTATIONS = ("hw", "reference-swap")


def check_pq_config(cfg: PQConfig) -> None:
    """Reject PQ settings that would silently compute something else."""
    for name, value, allowed in (("alpha_mode", cfg.alpha_mode, ALPHA_MODES),
                                 ("feature_norm", cfg.feature_norm, FEATURE_NORMS),
                                 ("text_norm", cfg.text_norm, TEXT_NORMS),
                                 ("map_source", cfg.map_source, MAP_SOURCES),
                                 ("map_resize", cfg.map_resize, MAP_RESIZES),
                                 ("map_orientation", cfg.map_orientation, MAP_ORIENTATIONS)):
        if value not in allowed:
            raise ConfigError(f"pq.{name} = {value!r} is not one of {', '.join(allowed)}")
    if len(cfg.alphas) != len(FACTORS) - 1 or any(not a > 0 for a in cfg.alphas):
        raise ConfigError(
            f"pq.alphas must be {len(FACTORS) - 1} positive numbers (technical, rationality, naturalness), got {cfg.alphas}"
        )
    if not cfg.logit_scale > 0:
        raise ConfigError(f"pq.logit_scale must be positive, got {cfg.logit_scale}")
    if not cfg.map_logit_scale > 0:
        raise ConfigError(f"pq.map_logit_scale must be positive, got {cfg.map_logit_scale}")
    if not isinstance(cfg.cask, bool):
        raise ConfigError(f"pq.cask must be true or false, got {cfg.cask!r}")


def normalise_features(tokens: torch.Tensor, mode: str = "channel") -> torch.Tensor:
    """L2-normalise image tokens (B, T, D): over channels (correct) or over tokens (reference bug)."""
    if mode == "channel":
        return F.normalize(tokens.float(), dim=-1)
    if mode == "token":
        return F.normalize(tokens.float(), dim=1)
    raise ConfigError(f"feature_norm {mode!r} is not one of {', '.join(FEATURE_NORMS)}")


def factor_logits(feats: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """feats (B, T, D), T_p (F, 2, D) -> ``logit_scale * L_raw`` per token and factor (B, T, F).

    ``L_raw = f . (t_good - t_bad)`` (eq. 3); its sigmoid is the softmax over the pair.
    """
    diff = (text_features[:, 0] - text_features[:, 1]).to(feats.dtype)  # (F, D)
    return logit_scale * (feats @ diff.T)  # (B, T, F)


def good_probability(feats: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """feats (B, T, D), T_p (F, 2, D) -> P(good) per token and factor (B, T, F)."""
    return torch.sigmoid(factor_logits(feats, text_features, logit_scale))


def _alpha_vector(alphas: Sequence[float], mode: str, like: torch.Tensor) -> torch.Tensor:
    if mode == "per-factor":
        return torch.as_tensor(list(alphas), dtype=like.dtype, device=like.device)  # (3,)
    if mode == "first-alpha":
        return torch.full((len(alphas),), float(alphas[0]), dtype=like.dtype, device=like.device)
    raise ConfigError(f"alpha_mode {mode!r} is not one of {', '.join(ALPHA_MODES)}")


def cask(s: torch.Tensor, alphas: Sequence[float], mode: str = "per-factor") -> torch.Tensor:
    """Eq. 3: s (..., 4) = [overall, technical, rationality, naturalness] -> (...).

    ``s_overall * prod_i min(s_i / alpha_i, 1)``; ``mode="first-alpha"`` divides every factor by
    alphas[0] as the reference code does.
    """
    a = _alpha_vector(alphas, mode, s)
    assert s.shape[-1] == 1 + a.shape[0], f"cask needs {1 + a.shape[0]} factor scores, got {s.shape[-1]}"
    return s[..., 0] * torch.clamp(s[..., 1:] / a, max=1.0).prod(dim=-1)


maps_at_sizes = tokens_to_maps  # grouped resizing lives in surgery.py, shared with AQ-Map


class PQMap:
    """Perceptual quality map and score for a batch of images (paper eq. 1-3).

    ``from_tokens`` works on surgery tokens computed elsewhere (so AQ-Map can share one forward);
    ``score`` does the preprocessing and the forward itself.
    """

    def __init__(
        self,
        clip: ClipBundle,
        cfg: PQConfig,
        surgery_blocks: int = 6,
        image_size: int = 224,
        prompts: PQPrompts | str | os.PathLike | None = None,
        encoder: SurgeryEncoder | None = None,
        map_max_side: int = 0,
    ):
        # 1. Check the configuration
        check_pq_config(cfg)
        self.clip = clip
        self.cfg = cfg
        self.image_size = int(image_size)
        self.map_max_side = int(map_max_side)  # maps at most this long side (0 = the image's size)
        # 2. Image side: the surgery encoder over the frozen CLIP ViT
        self.encoder = encoder if encoder is not None else SurgeryEncoder(clip.model.visual, surgery_blocks)
        # 3. Text side: T_p, computed once
        if hasattr(prompts, "features"):  # a ZeroShotPrompts / LearnedPrompts object
            self.prompts = prompts
        else:
            self.prompts = build_pq_prompts(cfg, clip.tokenizer, prompts)
        self.text_features = pq_text_features(  # (4, 2, D)
            clip.model, self.prompts, normalise=cfg.text_norm == "l2").to(clip.device)

    @classmethod
    def from_preset(
        cls,
        preset: Preset,
        models_dir: str | os.PathLike | None = None,
        prompts: PQPrompts | str | os.PathLike | None = None,
        clip: ClipBundle | None = None,
    ) -> "PQMap":
        """Load the preset's CLIP (unless ``clip`` is given) and prompts (``prompts`` overrides)."""
        from grefine_curate.curate.clip_models import load_clip

        clip = clip if clip is not None else load_clip(preset.clip, models_dir=models_dir, seed=preset.seed)
        return cls(clip, preset.pq, surgery_blocks=preset.clip.surgery_blocks,
                   image_size=preset.clip.image_size, prompts=prompts, map_max_side=preset.map_max_side)

    def map_sizes(self, images: Sequence[Image.Image]) -> list[tuple[int, int]]:
        """(H, W) of each image's maps: its own size, or reduced to ``map_max_side`` (surgery.map_size)."""
        return [map_size(img.height, img.width, self.map_max_side) for img in images]

    # -- image side ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess_images(images, self.image_size, self.clip.mean, self.clip.std,
                                 device=self.clip.device, dtype=self.clip.dtype)  # (B, 3, S, S)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images of any sizes -> surgery tokens (B, 1+HW, D)."""
        return self.encoder(self.preprocess(images))

    # -- scores and maps ----------------------------------------------------------------------

    @torch.no_grad()
    def factor_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Surgery tokens (B, 1+HW, D) -> ``logit_scale * L_raw`` per token and factor (B, 1+HW, 4)."""
        feats = normalise_features(tokens, self.cfg.feature_norm)  # (B, 1+HW, D)
        return factor_logits(feats, self.text_features.to(feats.device), self.cfg.logit_scale)

    @torch.no_grad()
    def factor_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """Surgery tokens (B, 1+HW, D) -> P(good) per token and factor (B, 1+HW, 4)."""
        return torch.sigmoid(self.factor_logits(tokens))

    def _score(self, s: torch.Tensor) -> torch.Tensor:
        """Factor probabilities (..., 4) -> p (...): eq. 3's cask, or s_overall when ``cask`` is off."""
        return cask(s, self.cfg.alphas, self.cfg.alpha_mode) if self.cfg.cask else s[..., 0]

    def map_values(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The per-patch quantity P is min-max normalised from (B, HW); see ``map_source``."""
        cfg = self.cfg
        if cfg.map_source == "overall-similarity":  # reference: raw similarity to overall's "good" prompt
            feats = normalise_features(tokens, cfg.feature_norm)[:, 1:]  # (B, HW, D)
            return feats @ self.text_features[0, 0].to(feats.device, feats.dtype)  # (B, HW)
        # the cask at the map's temperature: logits / logit_scale = L_raw, times map_logit_scale
        return self._score(torch.sigmoid(logits[:, 1:] * (cfg.map_logit_scale / cfg.logit_scale)))  # (B, HW)

    @torch.no_grad()
    def from_tokens(self, tokens: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[PQResult]:
        """Surgery tokens (B, 1+HW, D) and each map's (H, W) -> one PQResult per image."""
        # 1. Check inputs
        if tokens.dim() != 3 or tokens.shape[0] != len(sizes):
            raise ValueError(f"tokens must be (B, 1+HW, D) with B = len(sizes) = {len(sizes)}, got {tuple(tokens.shape)}")
        gh, gw = self.encoder.grid if tokens.shape[1] - 1 == int(np.prod(self.encoder.grid)) else _square_grid(tokens.shape[1] - 1)
        # 2. Logits per token and factor; factor scores s_i at CLS
        logits = self.factor_logits(tokens)  # (B, 1+HW, 4)
        s = torch.sigmoid(logits[:, 0])  # (B, 4)
        # 3. Cask (eq. 3) on the CLS scores -> p
        p = self._score(s)  # (B,)
        s_list, p_list = s.cpu().tolist(), p.cpu().tolist()
        # 4. Maps: the per-patch quantity, min-max per image (flat -> p), resized to each image's size
        values = self.map_values(tokens, logits)  # (B, HW)
        maps = maps_at_sizes(values, (gh, gw), sizes, self.cfg.map_resize, flat_fill=p_list,
                             orientation=self.cfg.map_orientation)
        return [
            PQResult(p=float(p_list[i]), factors={f: float(s_list[i][j]) for j, f in enumerate(FACTORS)}, P=maps[i])
            for i in range(len(sizes))
        ]

    def score(self, images: Sequence[Image.Image]) -> list[PQResult]:
        """RGB PIL images (any sizes) -> one PQResult per image, each map at its image's (H, W) (reduced
        to ``map_max_side``, aspect kept, when that is set and the image is larger)."""
        if len(images) == 0:
            return []
        return self.from_tokens(self.encode(images), self.map_sizes(images))

    __call__ = score


def _square_grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square grid; pass tokens from this PQMap's encoder")
    return side, side
