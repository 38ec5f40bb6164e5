"""PQ-Map: the perceptual quality map and score of G-Refine (paper section 3.1, eq. 1-3).

Image side: CLIP-Surgery tokens (``surgery.SurgeryEncoder``), (B, 1+HW, D). Text side: the four
factor pairs T_p (``prompts``), (4, 2, D). For every token and factor the probability of "good"
is the softmax over the pair of ``logit_scale * f @ T_p^T`` (equal to the paper's
``sigmoid(L_raw)`` with ``L_raw = f . (T_p[:,0] - T_p[:,1])``):

* factor score s_i: that probability at the CLS token;
* score p (eq. 3, cask effect): ``p = s_overall * prod_{i=technical,rationality,naturalness}
  min(s_i / alpha_i, 1)``; a factor below its alpha pulls p down, one above it cannot raise it;
* map P (eq. 3, ``P = BIC(L_per)``): the same cask applied per patch token to the four "good"
  probabilities of that token, min-max normalised per image over the patch grid, bicubically
  resized to the image's own (H, W) (rows of the grid = rows of the image). High = good.

Where the authors' reference code differs (REFERENCE.md section 1) the correct behaviour is the
default and the reference one is selectable in ``PQConfig``:

* ``alpha_mode="first-alpha"``: every factor divided by alphas[0] (the reference code's bug);
* ``feature_norm="token"``: image features L2-normalised over the token axis instead of channels;
* ``map_resize="bilinear"``: the reference code's resize (the paper says bicubic). The reference
  code's (W, H) swap that transposes non-square maps is not reproduced.

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
from grefine_curate.curate.surgery import SurgeryEncoder, preprocess_images, tokens_to_maps

ALPHA_MODES = ("per-factor", "first-alpha")
FEATURE_NORMS = ("channel", "token")
MAP_RESIZES = ("bicubic", "bilinear", "nearest", "area")


def check_pq_config(cfg: PQConfig) -> None:
    """Reject PQ settings that would silently compute something else."""
    for name, value, allowed in (("alpha_mode", cfg.alpha_mode, ALPHA_MODES),
                                 ("feature_norm", cfg.feature_norm, FEATURE_NORMS),
                                 ("map_resize", cfg.map_resize, MAP_RESIZES)):
        if value not in allowed:
            raise ConfigError(f"pq.{name} = {value!r} is not one of {', '.join(allowed)}")
    if len(cfg.alphas) != len(FACTORS) - 1 or any(not a > 0 for a in cfg.alphas):
        raise ConfigError(
            f"pq.alphas must be {len(FACTORS) - 1} positive numbers (technical, rationality, naturalness), got {cfg.alphas}"
        )
    if not cfg.logit_scale > 0:
        raise ConfigError(f"pq.logit_scale must be positive, got {cfg.logit_scale}")


def normalise_features(tokens: torch.Tensor, mode: str = "channel") -> torch.Tensor:
    """L2-normalise image tokens (B, T, D): over channels (correct) or over tokens (reference bug)."""
    if mode == "channel":
        return F.normalize(tokens.float(), dim=-1)
    if mode == "token":
        return F.normalize(tokens.float(), dim=1)
    raise ConfigError(f"feature_norm {mode!r} is not one of {', '.join(FEATURE_NORMS)}")


def good_probability(feats: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """feats (B, T, D) normalised, T_p (F, 2, D) -> P(good) per token and factor (B, T, F)."""
    n_factors = text_features.shape[0]
    logits = logit_scale * feats @ text_features.reshape(n_factors * 2, -1).T  # (B, T, 2F)
    logits = logits.reshape(*logits.shape[:-1], n_factors, 2)  # (B, T, F, 2) [good, bad]
    return logits.softmax(dim=-1)[..., 0]  # (B, T, F)


def cask(s: torch.Tensor, alphas: Sequence[float], mode: str = "per-factor") -> torch.Tensor:
    """Eq. 3: s (..., 4) = [overall, technical, rationality, naturalness] -> (...).

    ``s_overall * prod_i min(s_i / alpha_i, 1)``; ``mode="first-alpha"`` divides every factor by
    alphas[0] as the reference code does.
    """
    if mode == "per-factor":
        a = torch.as_tensor(list(alphas), dtype=s.dtype, device=s.device)  # (3,)
    elif mode == "first-alpha":
        a = torch.full((len(alphas),), float(alphas[0]), dtype=s.dtype, device=s.device)
    else:
        raise ConfigError(f"alpha_mode {mode!r} is not one of {', '.join(ALPHA_MODES)}")
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
    ):
        # 1. Check the configuration
        check_pq_config(cfg)
        self.clip = clip
        self.cfg = cfg
        self.image_size = int(image_size)
        # 2. Image side: the surgery encoder over the frozen CLIP ViT
        self.encoder = encoder if encoder is not None else SurgeryEncoder(clip.model.visual, surgery_blocks)
        # 3. Text side: T_p, computed once
        if hasattr(prompts, "features"):  # a ZeroShotPrompts / LearnedPrompts object
            self.prompts = prompts
        else:
            self.prompts = build_pq_prompts(cfg, clip.tokenizer, prompts)
        self.text_features = pq_text_features(clip.model, self.prompts).to(clip.device)  # (4, 2, D)

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
                   image_size=preset.clip.image_size, prompts=prompts)

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
    def factor_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """Surgery tokens (B, 1+HW, D) -> P(good) per token and factor (B, 1+HW, 4)."""
        feats = normalise_features(tokens, self.cfg.feature_norm)  # (B, 1+HW, D)
        return good_probability(feats, self.text_features.to(feats.device), self.cfg.logit_scale)

    @torch.no_grad()
    def from_tokens(self, tokens: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[PQResult]:
        """Surgery tokens (B, 1+HW, D) and each image's (H, W) -> one PQResult per image."""
        # 1. Check inputs
        if tokens.dim() != 3 or tokens.shape[0] != len(sizes):
            raise ValueError(f"tokens must be (B, 1+HW, D) with B = len(sizes) = {len(sizes)}, got {tuple(tokens.shape)}")
        gh, gw = self.encoder.grid if tokens.shape[1] - 1 == int(np.prod(self.encoder.grid)) else _square_grid(tokens.shape[1] - 1)
        # 2. P(good) per token and factor
        probs = self.factor_probabilities(tokens)  # (B, 1+HW, 4)
        s = probs[:, 0]  # (B, 4) factor scores s_i at CLS
        # 3. Cask (eq. 3) on the CLS scores -> p, and on every patch token -> L_per
        p = cask(s, self.cfg.alphas, self.cfg.alpha_mode)  # (B,)
        l_per = cask(probs[:, 1:], self.cfg.alphas, self.cfg.alpha_mode)  # (B, HW)
        # 4. Maps: min-max per image, resized to each image's own size
        maps = maps_at_sizes(l_per, (gh, gw), sizes, self.cfg.map_resize)
        s_list, p_list = s.cpu().tolist(), p.cpu().tolist()
        return [
            PQResult(p=float(p_list[i]), factors={f: float(s_list[i][j]) for j, f in enumerate(FACTORS)}, P=maps[i])
            for i in range(len(sizes))
        ]

    def score(self, images: Sequence[Image.Image]) -> list[PQResult]:
        """RGB PIL images (any sizes) -> one PQResult per image, each map at its image's (H, W)."""
        if len(images) == 0:
            return []
        sizes = [(img.height, img.width) for img in images]
        return self.from_tokens(self.encode(images), sizes)

    __call__ = score


def _square_grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square grid; pass tokens from this PQMap's encoder")
    return side, side
