"""Mask math (eq. 9), the stage-1 strength mapping and the step split against diffusers' own rule."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from grefine_curate.curate.config import MaskConfig, RefinerConfig
from grefine_curate.curate.errors import ConfigError
from grefine_curate.curate.masks import (build_mask, build_mask_pair, diffusers_steps_run, feather_mask,
                                         num_inference_steps_for, split_steps, stage1_strength,
                                         threshold_mask)

NO_GROW = MaskConfig(dilate=0, feather=0)


def test_paper_mode_is_clipped_one_minus_p_plus_a():
    P = np.array([[0.9, 0.6, 0.4, 0.1]], np.float32)
    A = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
    # A = 0: refine where 1 - P > 0.5, i.e. P < 0.5
    assert threshold_mask(P, A, NO_GROW).tolist() == [[False, False, True, True]]
    assert threshold_mask(P, None, NO_GROW).tolist() == [[False, False, True, True]]
    # an alignment defect is refined even where P is good: 1 - 0.9 + 0.8 = 0.9 > 0.5
    A2 = np.array([[0.8, 0.05, 0.0, 0.0]], np.float32)
    assert threshold_mask(P, A2, NO_GROW).tolist() == [[True, False, True, True]]
    # a higher threshold refines less: 1 - P + A > 0.7
    strict = replace(NO_GROW, threshold=0.7)
    assert threshold_mask(P, A2, strict).tolist() == [[True, False, False, True]]


def test_reference_union_mode():
    cfg = replace(NO_GROW, mode="reference-union")
    P = np.array([[0.2, 0.5, 0.9, 0.9]], np.float32)
    A = np.array([[0.0, 0.0, 0.5, 0.8]], np.float32)
    # P*255 < 100 or A*255 > 170
    assert threshold_mask(P, A, cfg).tolist() == [[True, False, False, True]]
    assert threshold_mask(P, None, cfg).tolist() == [[True, False, False, False]]


def test_bad_mode_and_shapes_are_errors_naming_the_input():
    P = np.zeros((4, 4), np.float32)
    with pytest.raises(ConfigError, match="reference-union"):
        threshold_mask(P, None, replace(NO_GROW, mode="union"))
    with pytest.raises(ValueError, match="A has shape"):
        threshold_mask(P, np.zeros((4, 5), np.float32), NO_GROW)
    with pytest.raises(ValueError, match="NaN"):
        threshold_mask(np.full((2, 2), np.nan, np.float32), None, NO_GROW)


def test_dilation_is_a_disk_and_feathering_stays_inside_it():
    P = np.ones((41, 41), np.float32)
    P[20, 20] = 0.0  # one bad pixel
    cfg = MaskConfig(dilate=8, feather=4)
    pair = build_mask_pair(P, None, cfg)
    yy, xx = np.mgrid[:41, :41]
    dist = np.hypot(yy - 20, xx - 20)
    np.testing.assert_array_equal(pair.binary, dist <= 8)
    assert (pair.soft[~pair.binary] == 0).all()  # exactly original outside the dilated mask
    assert (pair.soft[dist <= 4] == 1).all()  # full weight up to dilate - feather
    ramp = pair.soft[20, 20:30]  # along a row: 1 ... falling ... 0
    assert (np.diff(ramp) <= 0).all() and 0 < pair.soft[20, 26] < 1
    assert pair.area == pytest.approx((dist <= 8).mean())
    np.testing.assert_array_equal(build_mask(P, None, cfg), pair.binary)
    np.testing.assert_array_equal(feather_mask(P, None, cfg), pair.soft)


def test_dilation_and_feather_are_image_pixels_on_a_reduced_map():
    """Maps reduced to map_max_side: dilate and feather (image pixels) shrink with them (scale)."""
    P = np.ones((41, 41), np.float32)
    P[20, 20] = 0.0
    pair = build_mask_pair(P, None, MaskConfig(dilate=8, feather=4), scale=0.5)  # the map is half the image
    dist = np.hypot(*(np.mgrid[:41, :41] - 20))
    np.testing.assert_array_equal(pair.binary, dist <= 4)  # 8 image pixels = 4 map pixels
    assert (pair.soft[dist <= 2] == 1).all() and 0 < pair.soft[20, 23] < 1
    with pytest.raises(ValueError, match="scale"):
        build_mask_pair(P, None, MaskConfig(), scale=0.0)


def test_feather_wider_than_dilation_reaches_inside():
    P = np.ones((41, 41), np.float32)
    P[10:31, 10:31] = 0.0  # a 21x21 bad square
    pair = build_mask_pair(P, None, MaskConfig(dilate=2, feather=6))
    assert pair.soft[20, 20] == 1.0  # centre of the square
    assert 0 < pair.soft[20, 10] < 1  # square's own edge is already soft
    assert (pair.soft[~pair.binary] == 0).all()


def test_empty_and_full_masks():
    good = np.ones((8, 8), np.float32)
    pair = build_mask_pair(good, None, MaskConfig())
    assert not pair.binary.any() and pair.area == 0.0 and not pair.soft.any()
    bad = np.zeros((8, 8), np.float32)
    pair = build_mask_pair(bad, None, MaskConfig())
    assert pair.binary.all() and (pair.soft == 1).all()


CFG = RefinerConfig()


def test_stage1_strength_bounds_and_monotone():
    grid = np.linspace(0, 1, 21)
    for p, a in itertools.product(grid, grid):
        s = stage1_strength(p, a, CFG)
        assert CFG.strength_min - 1e-12 <= s <= CFG.strength_max + 1e-12
        # a better image (higher p or a) never gets a stronger stage 1
        if p + 0.05 <= 1:
            assert stage1_strength(p + 0.05, a, CFG) <= s
        if a + 0.05 <= 1:
            assert stage1_strength(p, a + 0.05, CFG) <= s
    assert stage1_strength(0, 0, CFG) == pytest.approx(CFG.strength_max)
    assert stage1_strength(1, 1, CFG) == pytest.approx(CFG.strength_min)
    assert stage1_strength(0.3, None, CFG) == pytest.approx(stage1_strength(0.3, 0.3, CFG))  # a None -> p
    with pytest.raises(ConfigError):
        stage1_strength(0.5, 0.5, replace(CFG, strength_min=0.9, strength_max=0.5))
    with pytest.raises(ValueError, match="p must be"):
        stage1_strength(1.5, 0.5, CFG)


def _diffusers_get_timesteps(pipeline_cls, scheduler, num_inference_steps: int, strength: float) -> int:
    """Run the installed diffusers pipeline's own get_timesteps on a real scheduler."""

    class Fake:
        pass

    fake = Fake()
    fake.scheduler = scheduler
    scheduler.set_timesteps(num_inference_steps)
    _, n = pipeline_cls.get_timesteps(fake, num_inference_steps, strength, "cpu")
    return n


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("pipeline", ["StableDiffusionXLInpaintPipeline", "StableDiffusionXLImg2ImgPipeline",
                                      "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline"])
def test_split_steps_runs_exactly_n1_and_n2_under_diffusers_rule(pipeline):
    import diffusers

    cls = getattr(diffusers, pipeline)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    for n, fraction, s1, s2 in itertools.product([1, 2, 4, 7, 20, 31], [0.0, 0.3, 0.5, 1.0],
                                                 [0.35, 0.4217, 0.6, 0.85, 1.0], [0.2, 0.05, 0.33]):
        plan = split_steps(n, fraction, s1, s2)
        assert plan.n1 + plan.n2 == n
        for n_run, steps, strength in ((plan.n1, plan.steps1, s1), (plan.n2, plan.steps2, s2)):
            if n_run == 0:
                assert steps == 0
                continue
            assert diffusers_steps_run(steps, strength) == n_run
            # the installed diffusers source agrees
            assert _diffusers_get_timesteps(cls, scheduler, steps, strength) == n_run
            if steps > n_run:  # smallest such num_inference_steps
                assert diffusers_steps_run(steps - 1, strength) < n_run


def test_split_defaults_and_half_up_rounding():
    plan = split_steps(20, 0.5, 0.6, 0.2)
    assert (plan.n1, plan.n2) == (10, 10)
    assert plan.steps2 == 50 and plan.effective_strength2 == pytest.approx(0.2)
    assert (split_steps(5, 0.5, 0.5, 0.5).n1, split_steps(5, 0.5, 0.5, 0.5).n2) == (3, 2)
    with pytest.raises(ValueError, match="steps"):
        split_steps(0, 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="strength"):
        num_inference_steps_for(3, 0.0)


def test_effective_strength_stays_monotone():
    """Quantising strength to n1 / num_inference_steps keeps 'worse image, stronger stage 1'."""
    previous = 0.0
    for s in np.linspace(0.35, 0.85, 101):
        eff = split_steps(20, 0.5, float(s), 0.2).effective_strength1
        assert eff >= previous
        previous = eff
