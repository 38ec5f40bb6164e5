"""PQ-Map: cask math (eq. 3), maps (size, orientation, range), batching, reference-bug switches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_curate.curate.config import FACTORS, PQConfig
from grefine_curate.curate.errors import ConfigError
from grefine_curate.curate.pq_map import PQMap, cask, maps_at_sizes
from grefine_curate.curate.prompts import LearnedPrompts
from grefine_curate.curate.results import PQResult
from grefine_curate.curate.surgery import tokens_to_maps

ALPHAS = (0.935, 0.535, 0.661)




@pytest.fixture(scope="module")
def pq(clip, preset):
    return PQMap(clip, preset.pq, surgery_blocks=preset.clip.surgery_blocks)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- eq. 3 -----------------------------------------------------------------------------------------


def test_cask_per_factor_with_hand_set_scores():
    s = torch.tensor([
        [0.8, 0.99, 0.9, 0.9],  # every factor above its alpha: p = s_overall
        [0.8, 0.4675, 0.9, 0.9],  # technical at half its alpha (0.935 / 2): p halves
        [0.6, 0.935, 0.2675, 0.3305],  # rationality and naturalness at half their alphas
    ], dtype=torch.float64)
    p = cask(s, ALPHAS, "per-factor")
    torch.testing.assert_close(p, torch.tensor([0.8, 0.4, 0.6 * 0.5 * 0.5], dtype=torch.float64))


def test_cask_first_alpha_reproduces_the_reference_bug():
    s = torch.tensor([[0.8, 0.99, 0.5, 0.6]], dtype=torch.float64)
    # per-factor: 0.5 / 0.535 and 0.6 / 0.661 are below 1; first-alpha divides both by 0.935
    torch.testing.assert_close(cask(s, ALPHAS, "per-factor"),
                               torch.tensor([0.8 * (0.5 / 0.535) * (0.6 / 0.661)], dtype=torch.float64))
    torch.testing.assert_close(cask(s, ALPHAS, "first-alpha"),
                               torch.tensor([0.8 * (0.5 / 0.935) * (0.6 / 0.935)], dtype=torch.float64))
    with pytest.raises(ConfigError, match="alpha_mode"):
        cask(s, ALPHAS, "second-alpha")


def test_alpha_mode_changes_p_but_not_factor_scores(clip, preset):
    img = [_image(64, 48)]
    a = PQMap(clip, preset.pq, surgery_blocks=2).score(img)[0]
    b = PQMap(clip, dataclasses.replace(preset.pq, alpha_mode="first-alpha"), surgery_blocks=2).score(img)[0]
    assert a.factors == b.factors
    expected = cask(torch.tensor([[a.factors[f] for f in FACTORS]], dtype=torch.float64), ALPHAS, "first-alpha")
    assert b.p == pytest.approx(float(expected[0]), rel=1e-5)


# -- maps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(7, 300), (300, 7), (1, 1), (65, 33)])
def test_map_has_the_image_size_and_range(pq, h, w):
    (res,) = pq.score([_image(h, w)])
    assert isinstance(res, PQResult)
    assert res.P.shape == (h, w) and res.P.dtype == np.float32
    assert 0.0 <= res.P.min() and res.P.max() <= 1.0
    assert 0.0 <= res.p <= 1.0 and set(res.factors) == set(FACTORS)
    assert all(0.0 <= v <= 1.0 for v in res.factors.values())


def test_map_orientation_follows_the_image(clip, preset):
    """A 'good' top-right patch must land top-right in a wide and in a tall image (no (W, H) swap)."""
    pq = PQMap(clip, preset.pq, surgery_blocks=2)
    d = pq.text_features.shape[-1]
    basis = torch.eye(d)[: len(FACTORS)]  # (4, D)
    pq.text_features = torch.stack([basis, -basis], dim=1)  # T_p[f] = (e_f, -e_f)
    gh, gw = pq.encoder.grid
    v = -torch.ones(gh, gw)
    v[0, gw - 1] = 1.0  # top-right patch good, everything else bad
    patches = v.reshape(-1, 1) * basis.sum(0)  # (HW, D): every factor agrees
    tokens = torch.cat([basis.sum(0)[None], patches])[None].repeat(2, 1, 1)  # (2, 1+HW, D)
    wide, tall = pq.from_tokens(tokens, [(40, 280), (280, 40)])
    for res in (wide, tall):
        h, w = res.P.shape
        r, c = np.unravel_index(int(res.P.argmax()), res.P.shape)
        assert r < h / gh * 1.5 and c > w * (1 - 1.5 / gw), f"max at {(r, c)} in a {h}x{w} map"
        assert res.P[-1, 0] < 0.05  # bottom-left is bad
    assert wide.P.shape == (40, 280) and tall.P.shape == (280, 40)


def test_map_combines_the_four_factors_with_the_cask(clip, preset):
    """P comes from the per-token cask: a patch bad in one factor only is dark in P."""
    # CLIP's temperature for the scores, the default map temperature (the tiny preset sets both to 1)
    pq = PQMap(clip, dataclasses.replace(preset.pq, logit_scale=100.0, map_logit_scale=PQConfig().map_logit_scale),
               surgery_blocks=2)
    d = pq.text_features.shape[-1]
    basis = torch.eye(d)[: len(FACTORS)]
    pq.text_features = torch.stack([basis, -basis], dim=1)
    gh, gw = pq.encoder.grid
    patches = basis.sum(0).repeat(gh * gw, 1)  # all factors good everywhere ...
    patches[0] = basis[0] + basis[1] + basis[2] - basis[3]  # ... except naturalness at the top-left patch
    patches[1] = 0.0  # and one neutral patch (P(good) = 0.5 everywhere there)
    tokens = torch.cat([basis.sum(0)[None], patches])[None]
    (res,) = pq.from_tokens(tokens, [(gh, gw)])  # at grid size: one pixel per patch
    assert res.P[0, 0] == pytest.approx(0.0, abs=1e-3)  # the one-factor defect is the worst patch
    assert res.P[5, 5] == pytest.approx(1.0, abs=1e-3)
    assert 0.0 < res.P[0, 1] < 1.0


def test_grouped_map_resize_equals_one_by_one():
    torch.manual_seed(0)
    values = torch.randn(4, 14 * 14)
    sizes = [(30, 40), (7, 300), (30, 40), (1, 1)]
    grouped = maps_at_sizes(values, (14, 14), sizes, "bicubic")
    for i, size in enumerate(sizes):
        (alone,) = tokens_to_maps(values[i : i + 1], (14, 14), [size], "bicubic")
        assert grouped[i].shape == size
        np.testing.assert_allclose(grouped[i], alone, atol=1e-6)


def test_batch_equals_alone(pq):
    images = [_image(64, 48, 1), _image(7, 300, 2), _image(120, 120, 3)]
    batch = pq.score(images)
    for img, res in zip(images, batch):
        (alone,) = pq.score([img])
        assert res.p == pytest.approx(alone.p, abs=1e-5)
        for f in FACTORS:
            assert res.factors[f] == pytest.approx(alone.factors[f], abs=1e-5)
        np.testing.assert_allclose(res.P, alone.P, atol=1e-4)
    assert pq.score([]) == []


def test_from_tokens_matches_score(pq):
    images = [_image(50, 70, 4), _image(70, 50, 5)]
    tokens = pq.encode(images)
    assert tokens.shape == (2, 1 + 14 * 14, 32)
    a = pq.from_tokens(tokens, [(50, 70), (70, 50)])
    b = pq.score(images)
    for x, y in zip(a, b):
        assert x.p == y.p and x.factors == y.factors
        np.testing.assert_array_equal(x.P, y.P)
    with pytest.raises(ValueError, match="len\\(sizes\\)"):
        pq.from_tokens(tokens, [(50, 70)])


# -- reference-code switches ------------------------------------------------------------------------


def test_feature_norm_switch_changes_results(clip, preset):
    img = [_image(64, 64, 6)]
    a = PQMap(clip, preset.pq, surgery_blocks=2).score(img)[0]
    b = PQMap(clip, dataclasses.replace(preset.pq, feature_norm="token"), surgery_blocks=2).score(img)[0]
    assert any(abs(a.factors[f] - b.factors[f]) > 1e-3 for f in FACTORS)
    assert not np.allclose(a.P, b.P, atol=1e-3)


def test_map_resize_switch(clip, preset):
    img = [_image(100, 60, 7)]
    a = PQMap(clip, preset.pq, surgery_blocks=2).score(img)[0]
    b = PQMap(clip, dataclasses.replace(preset.pq, map_resize="bilinear"), surgery_blocks=2).score(img)[0]
    assert a.p == b.p and a.P.shape == b.P.shape == (100, 60)
    assert not np.allclose(a.P, b.P, atol=1e-4)


@pytest.mark.parametrize("field,value", [("alpha_mode", "first"), ("feature_norm", "tokens"),
                                         ("map_resize", "lanczos"), ("alphas", (0.5, 0.5))])
def test_bad_pq_settings_are_refused(clip, field, value):
    with pytest.raises(ConfigError, match=field):
        PQMap(clip, dataclasses.replace(PQConfig(), **{field: value}), surgery_blocks=2)


# -- prompts and the frozen encoder -----------------------------------------------------------------


def test_learned_prompt_file_and_width_check(clip, preset, tmp_path):
    prompts = LearnedPrompts.from_placeholders(clip.model, clip.tokenizer)
    path = prompts.save(tmp_path / "tiny-prompts.safetensors")
    by_path = PQMap(clip, preset.pq, surgery_blocks=2, prompts=str(path))
    res = by_path.score([_image(32, 32)])[0]
    # placeholder contexts are the same for all factors -> identical factor scores
    assert len({round(v, 6) for v in res.factors.values()}) == 1
    cfg = dataclasses.replace(preset.pq, prompts=str(path))
    torch.testing.assert_close(PQMap(clip, cfg, surgery_blocks=2).text_features, by_path.text_features)
    with pytest.raises(ConfigError, match="width 512"):
        PQMap(clip, dataclasses.replace(preset.pq, prompts="reference-pq"), surgery_blocks=2)


def test_scoring_leaves_the_clip_model_unchanged(clip, preset):
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in clip.model.named_parameters()}
    pq = PQMap.from_preset(preset, clip=clip)
    pq.score([_image(40, 90), _image(90, 40)])
    for k, v in clip.model.state_dict().items():
        assert torch.equal(before[k], v), f"{k} changed"
    assert grads == {n: p.requires_grad for n, p in clip.model.named_parameters()}
