"""QualityScorer: PQ-Map and AQ-Map from one surgery forward, same results as each map alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from grefine_curate.curate.scorer import QualityScorer


@pytest.fixture(scope="module")
def scorer(tiny_preset, tiny_clip):
    return QualityScorer(tiny_preset, clip=tiny_clip)


def _images():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 64), (7, 300), (96, 96))]


def test_one_surgery_forward_serves_both_maps(scorer):
    calls = []
    handle = scorer.pq.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        results = scorer.score(_images(), ["a red cat on a sofa", None, "two dogs in the snow"])
    finally:
        handle.remove()
    assert calls == [3]  # one batched forward for PQ and AQ of all three images
    assert results[1].aq is None and results[0].aq is not None and results[2].aq is not None
    assert scorer.aq.encoder is scorer.pq.encoder


def test_shared_forward_equals_each_map_alone(scorer):
    images, prompts = _images(), ["a red cat on a sofa", "a lighthouse", "two dogs in the snow"]
    together = scorer.score(images, prompts)
    pq_alone = scorer.pq.score(images)
    aq_alone = scorer.aq.score(images, prompts)
    for t, p, a in zip(together, pq_alone, aq_alone):
        assert t.pq.p == pytest.approx(p.p, abs=1e-6)
        np.testing.assert_allclose(t.pq.P, p.P, atol=1e-5)
        assert t.aq.a == pytest.approx(a.a, abs=1e-6)
        np.testing.assert_allclose(t.aq.A, a.A, atol=1e-5)
        assert t.aq.emphasised_prompt == a.emphasised_prompt


def test_rescore_returns_p_and_a(scorer):
    (pa_,) = scorer.rescore(_images()[:1], ["a red cat"])
    assert 0.0 <= pa_[0] <= 1.0 and 0.0 <= pa_[1] <= 1.0
    assert scorer.rescore(_images()[:1], [None])[0][1] is None
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        scorer.score(_images()[:2], ["x"])


def test_maps_are_reduced_to_the_presets_map_max_side(tiny_preset, tiny_clip):
    """Issue 15 (memory): a large image's maps are computed at most map_max_side long, aspect kept
    (the reference preset keeps the image's size, as the authors' scripts)."""
    from dataclasses import replace

    from grefine_curate.curate.config import load_preset

    assert load_preset("sdxl").map_max_side == 1024 and load_preset("reference").map_max_side == 0
    img = Image.fromarray(np.random.default_rng(5).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    capped = QualityScorer(replace(tiny_preset, map_max_side=50), clip=tiny_clip)
    (r,) = capped.score([img], ["a red cat on a sofa"])
    assert r.pq.P.shape == r.aq.A.shape == (30, 50)
    assert capped.pq.score([img])[0].P.shape == (30, 50) and capped.aq.score([img], ["a cat"])[0].A.shape == (30, 50)
    full = QualityScorer(replace(tiny_preset, map_max_side=0), clip=tiny_clip)
    (f,) = full.score([img], ["a red cat on a sofa"])
    assert f.pq.P.shape == f.aq.A.shape == (90, 150)
    assert f.pq.p == r.pq.p and f.aq.a == r.aq.a  # the scores do not depend on the maps' size
    # the reduced map is the full one seen at a lower resolution
    small = np.asarray(Image.fromarray(f.pq.P, "F").resize((50, 30), Image.BILINEAR))
    assert np.abs(small - r.pq.P).mean() < 0.05
