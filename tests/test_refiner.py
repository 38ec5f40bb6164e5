"""The balanced refiner on tiny random-weight pipelines (64x64, a few steps).

Step counts are checked twice: the refiner's own ``callback_on_step_end`` count, and an independent
forward hook on each stage's UNet (one UNet call per denoising step).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_curate.curate.config import RoutingConfig, load_preset
from grefine_curate.curate.errors import ConfigError
from grefine_curate.curate.refiner import (BalancedRefiner, RefineItem, encode_refinement_prompts, item_seed,
                                           refine_input,
                                           parse_emphasis, processing_size, token_weights)
from grefine_curate.curate.masks import split_steps, stage1_strength
from grefine_curate.curate.routing import choose_route

# diffusers 0.42 Euler scheduler + numpy 2: a DeprecationWarning inside diffusers, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROUTING = RoutingConfig()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_cfg():
    return replace(load_preset("tiny").refiner, guard=False)


@pytest.fixture(scope="module")
def pipes():
    from grefine_curate.curate.diffusion_models import build_tiny_pipelines

    stage1, stage2 = build_tiny_pipelines()
    for p in (stage1, stage2):
        p.set_progress_bar_config(disable=True)
    return stage1, stage2


class UNetCalls:
    """Counts UNet forward calls per stage (one per denoising step, CFG or not)."""

    def __init__(self, pipes):
        self.counts = [0, 0]
        self.handles = [p.unet.register_forward_hook(self._hook(k)) for k, p in enumerate(pipes)]

    def _hook(self, k):
        def hook(module, args, output):
            self.counts[k] += 1
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def make_item(w=64, h=64, route=None, seed=1, p=0.3, a=0.3, prompt="a cat in a (red hat:1.2)", bad_box=True,
              rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    P = np.ones((h, w), np.float32)
    if bad_box:  # a low-quality patch in the upper left
        P[h // 8: h // 3, w // 8: w // 3] = 0.0
    A = np.zeros((h, w), np.float32) if a is not None else None
    return RefineItem(image=img, prompt=prompt, p=p, a=a, P=P, A=A, seed=seed, route=route)


def arr(img):
    return np.asarray(img, dtype=np.int16)


# --- routing, seeds, prompts ----------------------------------------------------------------- #


def test_choose_route_rule():
    assert choose_route(0.8, 0.9, ROUTING) == "skip"
    assert choose_route(0.7, 0.7, ROUTING) == "skip"  # on the threshold: the better route
    assert choose_route(0.6, 0.9, ROUTING) == "light"
    assert choose_route(0.9, 0.6, ROUTING) == "light"
    assert choose_route(0.4, 0.9, ROUTING) == "full"
    assert choose_route(0.9, 0.4, ROUTING) == "full"
    assert choose_route(0.8, None, ROUTING) == "skip"
    assert choose_route(0.6, None, ROUTING) == "light"
    assert choose_route(0.2, None, ROUTING) == "full"
    order = {"skip": 0, "light": 1, "full": 2}
    grid = np.linspace(0, 1, 11)
    for p in grid:
        for a in grid:  # raising a score never makes the route heavier
            r = order[choose_route(p, a, ROUTING)]
            assert order[choose_route(min(p + 0.1, 1), a, ROUTING)] <= r
            assert order[choose_route(p, min(a + 0.1, 1), ROUTING)] <= r
    with pytest.raises(ValueError, match="p must be"):
        choose_route(float("nan"), 0.5, ROUTING)
    with pytest.raises(ConfigError, match="out of order"):
        choose_route(0.5, 0.5, RoutingConfig(light_p=0.8, skip_p=0.7))


def test_item_seed_is_stable_and_spread():
    s = item_seed(0, "img_001.png")
    assert s == item_seed(0, "img_001.png") and 0 <= s < 2**63
    assert s == 7875056267222443298  # pinned: SHA-256 based, not Python's salted hash()
    assert len({item_seed(0, f"img_{i}") for i in range(200)}) == 200
    assert item_seed(1, "img_001.png") != s


def test_parse_emphasis_and_token_weights():
    plain, segs = parse_emphasis("a cat in a (red hat:1.2), (blue sky:0.9)")
    assert plain == "a cat in a red hat, blue sky"
    assert segs == [("a cat in a ", 1.0), ("red hat", 1.2), (", ", 1.0), ("blue sky", 0.9)]
    assert parse_emphasis("plain (not weighted)")[0] == "plain (not weighted)"
    from grefine_curate.curate.diffusion_models import clip_tokenizer

    tok = clip_tokenizer()
    w = token_weights(tok, segs)
    ids = tok(plain).input_ids
    assert w.shape == (77,)
    red_hat = [i for i, t in enumerate(ids) if tok.decode([t]).strip() in ("red", "hat")]
    assert w[red_hat].tolist() == pytest.approx([1.2, 1.2])
    assert float(w[0]) == 1.0 and token_weights(tok, [("a cat", 1.0)]) is None


def test_emphasis_changes_prompt_embeddings_keeping_their_mean(pipes):
    stage1, _ = pipes
    plain = encode_refinement_prompts(stage1, ["a cat in a red hat"], 7.5)
    weighted = encode_refinement_prompts(stage1, ["a cat in a (red hat:1.5)"], 7.5)
    pe, pw = plain["prompt_embeds"], weighted["prompt_embeds"]
    assert not torch.allclose(pe, pw)
    assert float(pw.mean()) == pytest.approx(float(pe.mean()), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(plain["pooled_prompt_embeds"], weighted["pooled_prompt_embeds"])


# --- sizes, steps, routes ---------------------------------------------------------------------- #


def test_processing_size_keeps_aspect_in_multiples_of_8():
    assert processing_size(513, 771, 1024) == (680, 1024)
    assert processing_size(771, 513, 64) == (64, 40)  # 513 * 64 / 771 = 42.6 -> 40
    assert processing_size(64, 64, 64) == (64, 64)
    assert processing_size(3000, 10, 512) == (512, 8)


@pytest.mark.parametrize("n, fraction, p", [(4, 0.5, 0.1), (5, 0.5, 0.45), (6, 1 / 3, 0.3), (3, 0.5, 0.0)])
def test_steps_run_per_stage_are_exactly_n1_and_n2(pipes, tiny_cfg, n, fraction, p):
    cfg = replace(tiny_cfg, steps=n, stage1_fraction=fraction)
    n1 = math.floor(n * fraction + 0.5)
    n2 = n - n1
    refiner = BalancedRefiner(cfg, ROUTING, pipelines=pipes)
    with UNetCalls(pipes) as calls:
        out = refiner.refine([make_item(route="full", p=p, a=p)])[0]
    assert out.route == "full"
    assert out.steps_run == {"stage1": n1, "stage2": n2}  # counted by callback_on_step_end
    assert calls.counts == [n1, n2]  # counted independently on the UNets
    s1 = stage1_strength(p, p, cfg)
    plan = split_steps(n, fraction, s1, cfg.delta)
    assert out.strength1 == pytest.approx(plan.n1 / plan.steps1) and out.strength1 <= s1 + 1e-12


def test_skip_returns_the_same_image_and_loads_nothing(tiny_cfg):
    refiner = BalancedRefiner(tiny_cfg, ROUTING, pipelines=None)  # would build pipelines on first use
    item = make_item(p=0.9, a=0.9)
    out = refiner.refine([item])[0]
    assert out.route == "skip" and out.image is item.image
    assert out.p_after is None and out.steps_run == {"stage1": 0, "stage2": 0}
    assert refiner._pipes is None
    assert out.mask.shape == (64, 64) and out.mask_area > 0


def test_light_runs_stage_2_only(pipes, tiny_cfg):
    item = make_item(p=0.6, a=0.6)
    with UNetCalls(pipes) as calls:
        out = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes).refine([item])[0]
    assert out.route == "light" and calls.counts == [0, 2]
    assert out.steps_run == {"stage1": 0, "stage2": 2} and out.strength1 is None
    assert out.image.size == item.image.size and (arr(out.image) != arr(item.image)).any()


def test_full_with_an_empty_mask_runs_as_light(pipes, tiny_cfg):
    item = make_item(route="full", bad_box=False)  # P = 1 everywhere, A = 0: nothing to inpaint
    with UNetCalls(pipes) as calls:
        out = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes).refine([item])[0]
    assert out.route == "light" and calls.counts == [0, 2] and out.mask_area == 0.0


def test_stage_1_changes_only_the_masked_pixels(pipes, tiny_cfg):
    cfg = replace(tiny_cfg, stage1_fraction=1.0)  # all steps in stage 1, no global pass
    item = make_item(route="full")
    out = BalancedRefiner(cfg, ROUTING, pipelines=pipes).refine([item])[0]
    assert out.steps_run == {"stage1": 4, "stage2": 0}
    before, after = arr(item.image), arr(out.image)
    outside = ~out.mask
    assert outside.any() and out.mask.any()
    np.testing.assert_array_equal(after[outside], before[outside])  # pasted back through the mask
    assert (after[out.mask] != before[out.mask]).any()


# --- guard ---------------------------------------------------------------------------------- #


class FakeScorer:
    def __init__(self, scores):
        self.scores = scores
        self.calls = []

    def __call__(self, images, prompts):
        self.calls.append((list(images), list(prompts)))
        return [self.scores] * len(images)


@pytest.mark.parametrize("after, reverted", [
    ((0.50, 0.60), True),   # p dropped by 0.1 > tolerance
    ((0.61, 0.45), True),   # a dropped by 0.15
    ((0.59, 0.59), False),  # both within the tolerance of 0.02
    ((0.80, 0.90), False),  # better
])
def test_guard(pipes, after, reverted):
    cfg = replace(load_preset("tiny").refiner, guard=True, guard_tolerance=0.02)
    scorer = FakeScorer(after)
    item = make_item(p=0.6, a=0.6)  # route light
    out = BalancedRefiner(cfg, ROUTING, pipelines=pipes, rescore=scorer).refine([item])[0]
    assert (out.p_after, out.a_after) == after and (out.p_before, out.a_before) == (0.6, 0.6)
    images, prompts = scorer.calls[0]
    assert images[0].size == item.image.size and images[0] is not item.image
    assert prompts == ["a cat in a red hat"]  # re-scored with the plain prompt, not the emphasis syntax
    if reverted:
        assert out.route == "reverted" and out.image is item.image
    else:
        assert out.route == "light" and out.image is images[0]


def test_guard_needs_a_scorer():
    with pytest.raises(ValueError, match="rescore"):
        BalancedRefiner(load_preset("tiny").refiner, ROUTING, pipelines=None, rescore=None)


def test_guard_skips_skipped_items_and_uses_score_prompt(pipes):
    cfg = replace(load_preset("tiny").refiner, guard=True)
    scorer = FakeScorer((0.9, 0.9))
    items = [make_item(p=0.9, a=0.9), make_item(p=0.6, a=0.6)]
    items[1].score_prompt = "the original prompt"
    outs = BalancedRefiner(cfg, ROUTING, pipelines=pipes, rescore=scorer).refine(items)
    assert [o.route for o in outs] == ["skip", "light"]
    assert len(scorer.calls) == 1 and scorer.calls[0][1] == ["the original prompt"]
    assert outs[0].p_after is None and outs[1].p_after == 0.9


# --- determinism, batches, sizes -------------------------------------------------------------- #


def test_same_input_and_seed_give_the_same_pixels(pipes, tiny_cfg):
    refiner = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes)
    a = refiner.refine([make_item(route="full", seed=7)])[0]
    b = refiner.refine([make_item(route="full", seed=7)])[0]
    c = refiner.refine([make_item(route="full", seed=8)])[0]
    np.testing.assert_array_equal(arr(a.image), arr(b.image))
    assert (arr(a.image) != arr(c.image)).any()


def test_mixed_route_batch_is_grouped_and_matches_items_run_alone(pipes, tiny_cfg):
    refiner = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes, max_batch=8)
    items = [
        make_item(route="full", p=0.05, a=0.05, seed=1, rng_seed=1),
        make_item(p=0.6, a=0.6, seed=2, rng_seed=2),  # light
        make_item(p=0.9, a=0.9, seed=3, rng_seed=3),  # skip
        make_item(route="full", p=0.45, a=0.45, seed=4, rng_seed=4, prompt="a dog"),  # other strength
        make_item(w=80, h=48, p=0.6, a=None, seed=5, rng_seed=5, prompt=None),  # light, other size, no prompt
        make_item(route="full", p=0.05, a=0.05, seed=6, rng_seed=6, prompt="a bird"),  # same group as item 0
    ]
    with UNetCalls(pipes) as calls:
        outs = refiner.refine(items)
    assert [o.route for o in outs] == ["full", "light", "skip", "full", "light", "full"]
    assert [o.steps_run["stage1"] for o in outs] == [2, 0, 0, 2, 0, 2]
    assert [o.steps_run["stage2"] for o in outs] == [2, 2, 0, 2, 2, 2]
    # stage 1: 2 groups (two strengths) x 2 steps; stage 2: 2 sizes x 2 steps
    assert calls.counts == [4, 4]
    assert outs[0].strength1 > outs[3].strength1  # worse image, stronger stage 1
    assert [o.image.size for o in outs] == [it.image.size for it in items]
    assert outs[2].image is items[2].image
    for k in (0, 1, 3, 4):  # batching does not mix up images, prompts or generators
        alone = refiner.refine([items[k]])[0]
        diff = np.abs(arr(alone.image) - arr(outs[k].image))
        assert diff.max() <= 2, (k, diff.max())


def tiny_sd15_pipelines():
    """SD 1.5-shaped tiny pair (one text encoder, no added conditioning, PNDM as published)."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from grefine_curate.curate.diffusion_models import TINY_TEXT, clip_tokenizer

    torch.manual_seed(0)
    unets = [UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=c,
                                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                  attention_head_dim=(2, 4)) for c in (9, 4)]
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    te = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    common = {"vae": vae, "text_encoder": te, "tokenizer": clip_tokenizer(), "safety_checker": None,
              "feature_extractor": None, "requires_safety_checker": False}
    pndm = {"skip_prk_steps": True, "steps_offset": 1}
    stage1 = StableDiffusionInpaintPipeline(unet=unets[0], scheduler=PNDMScheduler(**pndm), **common)
    stage2 = StableDiffusionImg2ImgPipeline(unet=unets[1], scheduler=PNDMScheduler(**pndm), **common)
    for pipe in (stage1, stage2):
        pipe.set_progress_bar_config(disable=True)
    return stage1, stage2


def test_sd15_shaped_pipelines_run_exact_steps(tiny_cfg):
    pipes = tiny_sd15_pipelines()
    refiner = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes)  # swaps PNDM (N + 1 timesteps) for Euler
    with UNetCalls(pipes) as calls:
        outs = refiner.refine([make_item(route="full"), make_item(p=0.6, a=0.6, prompt=None)])
    assert [o.route for o in outs] == ["full", "light"]
    assert outs[0].steps_run == {"stage1": 2, "stage2": 2} and outs[1].steps_run == {"stage1": 0, "stage2": 2}
    assert calls.counts == [2, 2]


@pytest.mark.parametrize("w, h", [(513, 771), (771, 513)])
def test_odd_non_square_sizes_come_back_at_their_size(pipes, tiny_cfg, w, h):
    item = make_item(w=w, h=h, route="full")
    out = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes).refine([item])[0]
    assert out.image.size == (w, h) and out.image.mode == "RGB"
    assert out.mask.shape == (h, w) and 0 < out.mask_area < 1
    assert out.steps_run == {"stage1": 2, "stage2": 2}
    # the result follows the input: refined at 64 px and mapped back, not a blank or transposed image
    small_in = np.asarray(item.image.resize((32, 32), Image.BILINEAR), np.float32)
    small_out = np.asarray(out.image.resize((32, 32), Image.BILINEAR), np.float32)
    assert np.isfinite(small_out).all() and small_out.std() > 1
    assert small_in.shape == small_out.shape


def test_bad_inputs_name_the_item(pipes, tiny_cfg):
    refiner = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes)
    item = make_item()
    h, w = item.P.shape
    bad = replace(item, P=np.zeros((h // 2, w), np.float32))  # a reduction must keep the image's aspect
    with pytest.raises(ValueError, match=rf"item 1: P has shape \({h // 2}, {w}\)"):
        refiner.refine([item, bad])
    small = replace(item, P=np.zeros((h // 2, w // 2), np.float32))  # a reduced P needs an A of its size
    with pytest.raises(ValueError, match=r"item 1: A has shape .* but P has"):
        refiner.refine([item, small])
    with pytest.raises(ValueError, match="route 'heavy'"):
        refiner.refine([replace(item, route="heavy")])
    with pytest.raises(ValueError, match="RGB"):
        refiner.refine([replace(item, image=item.image.convert("L"))])
    with pytest.raises(ValueError, match="a must be"):
        refiner.refine([replace(item, a=1.5)])


def test_refining_from_refine_input_gives_the_same_result_and_maps_may_be_reduced(pipes, tiny_cfg):
    """Issue 15 (memory): a caller may drop a large original once it has refine_input's reduction
    (RefineItem.output_size = the original's size): the result is the same, pixel for pixel. Maps
    reduced to map_max_side (same aspect) are accepted; the mask comes back at the maps' size."""
    from grefine_curate.curate.surgery import map_size

    refiner = BalancedRefiner(tiny_cfg, ROUTING, pipelines=pipes)
    item = make_item(w=200, h=120, route="full")  # larger than the tiny preset's 64 px processing size
    (whole,) = refiner.refine([item])
    reduced = refine_input(item.image, tiny_cfg.resolution)
    assert reduced.size == (64, 40)
    (from_reduced,) = refiner.refine([replace(item, image=reduced, output_size=item.image.size)])
    assert whole.route == from_reduced.route == "full"
    assert from_reduced.image.size == (200, 120)
    np.testing.assert_array_equal(np.asarray(whole.image), np.asarray(from_reduced.image))
    assert refine_input(reduced, tiny_cfg.resolution) is reduced  # never enlarged

    h, w = map_size(120, 200, 50)
    P = np.asarray(Image.fromarray(item.P, "F").resize((w, h), Image.BILINEAR))
    (small_maps,) = refiner.refine([replace(item, P=P, A=np.zeros((h, w), np.float32))])
    assert small_maps.route == "full" and small_maps.image.size == (200, 120)
    assert small_maps.mask.shape == (h, w)
    assert small_maps.mask_area == pytest.approx(whole.mask_area, abs=0.05)
