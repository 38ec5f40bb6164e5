"""Default (paper) mode maps are well posed, and the numbers the presets and formulas carry are pinned.

* A flat P or A carries no spatial evidence: it must not min-max into "bad everywhere" (P = 0) or
  "nowhere" (A = 0); it becomes the image-level score it refines.
* Saturated probabilities must not erase a map's spatial order: a known ramp survives.
* Values, not shapes: the per-token probability, an interior stage-1 strength, the alphas, the AQ
  template list, the reference mask bounds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from grefine_curate.curate.aq_map import AQMap
from grefine_curate.curate.config import AQConfig, MaskConfig, PQConfig, RefinerConfig, load_preset
from grefine_curate.curate.masks import build_mask, stage1_strength
from grefine_curate.curate.pq_map import PQMap, good_probability
from grefine_curate.curate.results import NOUN_UNMATCHED
from grefine_curate.curate.syntax import load_spacy
from grefine_curate.curate.text_features import IMAGENET_TEMPLATES, TextFeatureCache

import reference_scripts


def _pq_with_axis_prompts(clip, preset, **cfg) -> PQMap:
    """A PQMap whose four factor pairs are (e0, -e0): every factor's logit is 100 * 2 * f[0].

    CLIP's temperature and the default map temperature (the tiny preset sets both to 1)."""
    cfg = {"logit_scale": 100.0, "map_logit_scale": PQConfig().map_logit_scale, "text_norm": "l2", **cfg}
    pq = PQMap(clip, dataclasses.replace(preset.pq, **cfg),
               surgery_blocks=preset.clip.surgery_blocks)
    d = pq.text_features.shape[-1]
    t = torch.zeros(4, 2, d)
    t[:, 0, 0], t[:, 1, 0] = 1.0, -1.0
    pq.text_features = t
    return pq


def _tokens(first_components: np.ndarray, d: int, cls: float) -> torch.Tensor:
    """(1, 1+HW, D) unit tokens whose component 0 is given (CLS first); the rest on component 1."""
    comps = np.concatenate([[cls], first_components.ravel()])
    tok = torch.zeros(1, len(comps), d)
    tok[0, :, 0] = torch.tensor(comps, dtype=torch.float32)
    tok[0, :, 1] = torch.tensor(np.sqrt(1.0 - comps**2), dtype=torch.float32)
    return tok


# -- flat maps ------------------------------------------------------------------------------------


def test_flat_P_is_the_score_not_bad_everywhere(clip, preset):
    pq = _pq_with_axis_prompts(clip, preset)
    d = pq.text_features.shape[-1]
    tokens = _tokens(np.full((4, 4), 0.3), d, cls=0.3)  # every patch alike; logit 60 -> p = 1.0
    (r,) = pq.from_tokens(tokens, [(32, 48)])
    assert r.p == pytest.approx(1.0, abs=1e-6)
    assert r.P.shape == (32, 48)
    np.testing.assert_allclose(r.P, r.p, atol=1e-6)  # before: min-max of a constant gave P = 0
    mask = build_mask(r.P, np.zeros_like(r.P), MaskConfig(dilate=0, feather=0))
    assert not mask.any(), "a uniformly perfect image must get no inpainting mask"


def test_flat_P_of_a_bad_image_still_refines_everywhere(clip, preset):
    pq = _pq_with_axis_prompts(clip, preset)
    d = pq.text_features.shape[-1]
    (r,) = pq.from_tokens(_tokens(np.full((4, 4), -0.01), d, cls=-0.01), [(16, 16)])
    assert r.p < 0.2
    np.testing.assert_allclose(r.P, r.p, atol=1e-6)
    assert build_mask(r.P, None, MaskConfig(dilate=0, feather=0)).all()


D = 16
PROMPT = "a cat on a sofa"
AXIS = {PROMPT: 0, "cat": 1, "sofa": 2, "": 13}


class OneHot:
    def __call__(self, texts):
        out = torch.zeros(len(texts), D)
        for i, t in enumerate(texts):
            out[i, AXIS[t]] = 1.0
        return out


def test_flat_A_is_the_parents_score_not_zero():
    aq = AQMap(None, AQConfig(), TextFeatureCache(encoder=OneHot()), nlp=load_spacy("en_core_web_sm"))
    tok = torch.zeros(1, 1 + 4, D)
    tok[0, 0, [0, 1, 2]] = torch.tensor([0.3, 0.2, -0.2])  # CLS: prompt and cat present, sofa not
    tok[0, 1:, 1] = 0.2  # every patch the same: the parent's (cat's) map is flat
    tok[0, :, 15] = torch.sqrt(1 - (tok[0] ** 2).sum(-1))
    (r,) = aq.from_tokens(tok, [(8, 8)], [PROMPT])
    assert [ph.defect for ph in r.phrases] == [None, NOUN_UNMATCHED]
    cat_score = r.phrases[0].a_pns
    np.testing.assert_allclose(r.A, cat_score, atol=1e-6)  # before: zeros, the defect had nowhere to go
    assert 0.5 < cat_score < 1.0
    # With P = 1 the mask is A's: a parent that is present (score > 0.5) but has no location puts
    # the unmatched noun anywhere (the whole image); a parent scored below the threshold would not.
    P = np.ones((8, 8), dtype=np.float32)
    assert build_mask(P, r.A, MaskConfig(dilate=0, feather=0, threshold=0.5)).all()
    assert not build_mask(P, r.A, MaskConfig(dilate=0, feather=0, threshold=cat_score + 0.01)).any()


# -- saturation -----------------------------------------------------------------------------------


def test_a_spatial_ramp_survives_saturated_probabilities(clip, preset):
    """Similarity differences 0.2 .. 0.6 (logits 20 .. 60 at CLIP's temperature 100): every sigmoid is
    exactly 1.0 in float32 there, but the map, at its own temperature, keeps the ramp."""
    ramp = np.tile(np.linspace(0.1, 0.3, 4), (4, 1))  # component 0 rises left to right; L_raw = 2 * c
    pq = _pq_with_axis_prompts(clip, preset)
    d = pq.text_features.shape[-1]
    tokens = _tokens(ramp, d, cls=0.2)
    probs = pq.factor_probabilities(tokens)
    assert bool((probs[0, 1:] == 1.0).all()), "the premise: float32 probabilities are saturated"
    (r,) = pq.from_tokens(tokens, [(4, 4)])
    assert r.p == pytest.approx(1.0)
    np.testing.assert_allclose(r.P[:, 0], 0.0, atol=1e-6)  # min-max: the left column is the lowest
    np.testing.assert_allclose(r.P[:, 3], 1.0, atol=1e-6)
    assert np.all(np.diff(r.P, axis=1) > 0.01), r.P  # strictly rising, with real steps, in every row
    # At the score's own temperature (the earlier map) the ramp is lost: a flat plateau.
    (old,) = _pq_with_axis_prompts(clip, preset, map_logit_scale=100.0).from_tokens(tokens, [(4, 4)])
    assert float(np.ptp(old.P)) == 0.0


def test_one_bad_factor_makes_a_patch_bad_in_the_map(clip, preset):
    """The cask per patch: a patch certainly good overall but certainly bad in technical quality is
    worse than a patch unsure in every factor, and a factor above its alpha adds nothing."""
    pq = _pq_with_axis_prompts(clip, preset)
    d = pq.text_features.shape[-1]
    t = pq.text_features.clone()
    t[1, :, 0] = 0.0  # technical reads component 2 instead
    t[1, 0, 2], t[1, 1, 2] = 1.0, -1.0
    pq.text_features = t
    tok = torch.zeros(1, 1 + 4, d)
    tok[0, :, 0] = 0.5  # overall, rationality, naturalness: certainly good (logit 100 at CLIP's scale)
    tok[0, 1:, 2] = torch.tensor([0.5, -0.5, 0.3, 0.6])  # technical: good, bad, good, good
    tok[0, 3, 0] = 0.0  # patch 2: unsure overall too (logit 0)
    tok[0, :, 3] = torch.sqrt(1 - (tok[0] ** 2).sum(-1))
    (r,) = pq.from_tokens(tok, [(2, 2)])
    assert r.P[0, 1] == pytest.approx(0.0, abs=1e-6)  # the technical defect is the worst patch
    assert 0.0 < r.P[1, 0] < 1.0  # unsure overall: in between
    assert r.P[0, 0] == pytest.approx(1.0, abs=1e-3) and r.P[1, 1] == pytest.approx(1.0, abs=1e-3)


# -- pinned values --------------------------------------------------------------------------------


def test_per_token_probability_at_an_interior_point():
    f = torch.tensor([[[0.6, 0.8]]])  # (B=1, T=1, D=2), unit norm
    t = torch.tensor([[[0.3, 0.1], [0.2, 0.1]]])  # (F=1, 2, D): L_raw = 0.6 * (0.3 - 0.2) = 0.06
    assert float(good_probability(f, t, 100.0)) == pytest.approx(1 / (1 + math.exp(-6.0)), abs=1e-7)
    assert float(good_probability(f, t, 100.0)) == pytest.approx(0.9975274, abs=1e-7)
    assert float(good_probability(f, t, 1.0)) == pytest.approx(0.5149955, abs=1e-7)


def test_interior_stage1_strength():
    cfg = RefinerConfig()  # strength_max 0.85 at quality 0, strength_min 0.35 at quality 1
    assert stage1_strength(0.4, 0.6, cfg) == pytest.approx(0.60, abs=1e-12)  # q = 0.5
    assert stage1_strength(0.3, None, cfg) == pytest.approx(0.85 - 0.3 * 0.5, abs=1e-12)  # q = p = 0.3


@pytest.mark.parametrize("name", ["sdxl", "sd15", "reference"])
def test_alphas_to_four_digits(name):
    assert load_preset(name).pq.alphas == pytest.approx((0.9350, 0.5352, 0.6608), abs=5e-5)
    assert load_preset(name).pq.alphas[1] == pytest.approx(0.6 * 0.892, abs=1e-9)
    assert load_preset(name).pq.alphas[2] == pytest.approx(0.8 * 0.826, abs=1e-9)


def test_aq_templates_are_clip_surgerys():
    assert list(IMAGENET_TEMPLATES) == reference_scripts.CLIP_SURGERY_TEMPLATES
    assert len(IMAGENET_TEMPLATES) == 85


def test_reference_preset_constants():
    ref = load_preset("reference")
    assert (ref.pq.alpha_mode, ref.pq.feature_norm, ref.pq.text_norm, ref.pq.logit_scale) == ("first-alpha", "token", "raw", 1.0)
    assert (ref.pq.map_source, ref.pq.map_resize, ref.pq.map_orientation) == ("overall-similarity", "bilinear", "hw")
    assert (ref.aq.feature_norm, ref.aq.a_bound, ref.aq.score_scale, ref.aq.combine) == ("token", 0.5, 10.0, "max")
    assert ref.refiner.mask.mode == "reference-union"
    assert ref.refiner.mask.p_low * 255 == pytest.approx(100) and ref.refiner.mask.a_high * 255 == pytest.approx(170)
