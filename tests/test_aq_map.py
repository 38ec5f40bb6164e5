"""AQ-Map: defect rules and map combination with an injected text encoder, the text-feature cache,
batch invariance with the tiny CLIP, null prompts, messy prompts."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_curate.curate.aq_map import AQMap, combine_maps
from grefine_curate.curate.config import AQConfig
from grefine_curate.curate.results import ADJECTIVE_UNMATCHED, NOUN_UNMATCHED
from grefine_curate.curate.surgery import SurgeryEncoder, preprocess_images
from grefine_curate.curate.syntax import load_spacy
from grefine_curate.curate.text_features import IMAGENET_TEMPLATES, TextFeatureCache, _trimmed_encode_text

PROMPT = "a cat sitting on a red sofa in a living room"  # phrases: cat sitting | red sofa | living room
D = 16
# One basis direction per text, so the similarity of a token with a text is one of its components.
AXIS = {PROMPT: 0, "cat sitting": 1, "red sofa": 2, "living room": 3, "cat": 4, "sofa": 5, "room": 6, "": 13}
FILL = 15  # spare direction that tops every token up to unit norm


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-10.0 * x))


class OneHotEncoder:
    """Injected text encoder: each known text -> its basis vector; unknown text is an error."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        out = torch.zeros(len(texts), D)
        for i, t in enumerate(texts):
            out[i, AXIS[t]] = 1.0
        return out


def unit_token(components: dict[int, float]) -> torch.Tensor:
    v = torch.zeros(D)
    for k, x in components.items():
        v[k] = x
    v[FILL] = math.sqrt(1.0 - float((v**2).sum()))
    return v


def make_tokens(cls: dict[int, float]) -> torch.Tensor:
    """(1, 1+4, D): CLS with the given text similarities, then a 2x2 patch grid.

    Patch columns (before min-max): cat [.6, .3, 0, .15], sofa [.3, .3, 0, .6], room [0, 0, .5, 0].
    After min-max: M_cat = [1, .5, 0, .25], M_sofa = [.5, .5, 0, 1], M_room = [0, 0, 1, 0].
    """
    patches = [
        {AXIS["cat"]: 0.6, AXIS["sofa"]: 0.3},
        {AXIS["cat"]: 0.3, AXIS["sofa"]: 0.3},
        {AXIS["room"]: 0.5},
        {AXIS["cat"]: 0.15, AXIS["sofa"]: 0.6},
    ]
    return torch.stack([unit_token(cls)] + [unit_token(p) for p in patches])[None]


M_CAT = np.array([[1.0, 0.5], [0.0, 0.25]], dtype=np.float32)
M_SOFA = np.array([[0.5, 0.5], [0.0, 1.0]], dtype=np.float32)
M_ROOM = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
RED = 0.05  # CLS component along the redundant "" feature: every CLS similarity drops by this


def cls_sims(room: float = -0.1, red_sofa: float = 0.1, sofa: float = 0.2, living_room: float = 0.05) -> dict[int, float]:
    return {AXIS[PROMPT]: 0.3, AXIS["cat sitting"]: 0.25, AXIS["red sofa"]: red_sofa, AXIS["living room"]: living_room,
            AXIS["cat"]: 0.2, AXIS["sofa"]: sofa, AXIS["room"]: room, AXIS[""]: RED}


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")


def injected_aq(nlp, **cfg) -> tuple[AQMap, OneHotEncoder]:
    enc = OneHotEncoder()
    cache = TextFeatureCache(encoder=enc)
    return AQMap(None, dataclasses.replace(AQConfig(), **cfg), cache, nlp=nlp), enc


def test_parse_of_the_fixture_prompt(nlp):
    aq, _ = injected_aq(nlp)
    (p,) = aq.parse([PROMPT])
    assert p.texts == ["cat sitting", "red sofa", "living room"]
    assert p.nouns == ["cat", "sofa", "room"]
    assert p.parents == [0, 0, 0]


@pytest.mark.parametrize("combine", ["max", "product"])
def test_both_defects_and_their_maps(nlp, combine):
    # room: cls 0.1 - 0.05 < 0 -> a_pns < 0.5: noun unmatched -> the PARENT's (cat's) map, not room's.
    # red sofa: a_phs = sig(0.1 - .05) < a_pns = sig(0.2 - .05): adjective unmatched -> sofa's own map.
    aq, enc = injected_aq(nlp, combine=combine, beta=0.8)
    (r,) = aq.from_tokens(make_tokens(cls_sims()), [(2, 2)], [PROMPT])
    defects = [(ph.text, ph.defect) for ph in r.phrases]
    assert defects == [("cat sitting", None), ("red sofa", ADJECTIVE_UNMATCHED), ("living room", NOUN_UNMATCHED)]
    assert r.unmatched == ["red sofa", "living room"]
    want = np.maximum(M_CAT, M_SOFA) if combine == "max" else 1 - (1 - M_CAT) * (1 - M_SOFA)
    np.testing.assert_allclose(r.A, want, atol=1e-5)
    assert r.A[1, 0] < 1e-5, "the unmatched noun's own map (room) must not enter A"
    if combine == "product":
        assert r.A[0, 1] == pytest.approx(0.75, abs=1e-5)  # 1 - (1 - .5)(1 - .5); max would give .5
    # Scores: sigmoid(10 * (cls - redundant)), eq. 8 cask with beta = 0.8.
    a_phs = [sig(0.25 - RED), sig(0.1 - RED), sig(0.05 - RED)]
    assert [ph.a_phs for ph in r.phrases] == pytest.approx(a_phs, abs=1e-5)
    assert [ph.a_pns for ph in r.phrases] == pytest.approx([sig(0.2 - RED), sig(0.2 - RED), sig(-0.1 - RED)], abs=1e-5)
    assert r.clip_score == pytest.approx(sig(0.3 - RED), abs=1e-5)
    want_a = sig(0.3 - RED) * np.prod([min(s / 0.8, 1.0) for s in a_phs])
    assert r.a == pytest.approx(want_a, abs=1e-5)
    assert r.emphasised_prompt == f"{PROMPT}, (red sofa:1.1), (living room:1.1)"
    # One encoder call for the prompt, the phrases and the nouns, plus one for the redundant "".
    assert len(enc.calls) == 2 and sorted(len(c) for c in enc.calls) == [1, 7]


def test_noun_unmatched_alone_uses_parent_map(nlp):
    aq, _ = injected_aq(nlp)
    (r,) = aq.from_tokens(make_tokens(cls_sims(red_sofa=0.3)), [(2, 2)], [PROMPT])
    assert [ph.defect for ph in r.phrases] == [None, None, NOUN_UNMATCHED]
    np.testing.assert_allclose(r.A, M_CAT, atol=1e-5)


def test_adjective_unmatched_alone_uses_own_map(nlp):
    aq, _ = injected_aq(nlp)
    (r,) = aq.from_tokens(make_tokens(cls_sims(room=0.2, living_room=0.25)), [(2, 2)], [PROMPT])
    assert [ph.defect for ph in r.phrases] == [None, ADJECTIVE_UNMATCHED, None]
    np.testing.assert_allclose(r.A, M_SOFA, atol=1e-5)


def test_noun_defect_wins_over_adjective(nlp):
    # sofa unmatched (cls < redundant) AND red sofa even lower: reported as noun-unmatched -> parent map.
    aq, _ = injected_aq(nlp)
    (r,) = aq.from_tokens(make_tokens(cls_sims(room=0.2, living_room=0.25, sofa=0.0, red_sofa=-0.2)), [(2, 2)], [PROMPT])
    assert [ph.defect for ph in r.phrases] == [None, NOUN_UNMATCHED, None]
    np.testing.assert_allclose(r.A, M_CAT, atol=1e-5)


def test_all_matched_gives_zero_map_and_plain_prompt(nlp):
    aq, _ = injected_aq(nlp, beta=0.5)
    (r,) = aq.from_tokens(make_tokens(cls_sims(room=0.2, living_room=0.25, red_sofa=0.3)), [(3, 5)], [PROMPT])
    assert r.unmatched == []
    assert r.A.shape == (3, 5) and r.A.dtype == np.float32 and not r.A.any()
    assert r.emphasised_prompt == PROMPT
    assert r.a == pytest.approx(r.clip_score, abs=1e-6)  # every a_phs >= beta: no penalty


def test_map_resized_to_image_size_keeps_orientation(nlp):
    aq, _ = injected_aq(nlp)
    (r,) = aq.from_tokens(make_tokens(cls_sims(red_sofa=0.3)), [(40, 100)], [PROMPT])
    assert r.A.shape == (40, 100)
    assert r.A[:20, :50].mean() > r.A[20:, :50].mean()  # M_cat is high in the top-left cell


def test_null_and_blank_prompts_give_none(nlp):
    aq, enc = injected_aq(nlp)
    tokens = make_tokens(cls_sims()).repeat(4, 1, 1)
    out = aq.from_tokens(tokens, [(2, 2)] * 4, [None, "", " ,.!", PROMPT])
    assert out[:3] == [None, None, None] and out[3] is not None
    assert aq.from_tokens(tokens[:1], [(2, 2)], [None]) == [None]


def test_check_inputs(nlp):
    aq, _ = injected_aq(nlp)
    tokens = make_tokens(cls_sims())
    with pytest.raises(ValueError, match="must match"):
        aq.from_tokens(tokens, [(2, 2), (2, 2)], [PROMPT])
    with pytest.raises(ValueError, match="patch grid"):
        aq.from_tokens(tokens[:, :4], [(2, 2)], [PROMPT])
    with pytest.raises(ValueError, match="B, 1\\+HW, D"):
        aq.from_tokens(tokens[0], [(2, 2)], [PROMPT])
    with pytest.raises(ValueError, match="aq.combine"):
        AQMap(None, dataclasses.replace(AQConfig(), combine="mean"), TextFeatureCache(encoder=OneHotEncoder()))
    with pytest.raises(ValueError, match="exactly one"):
        TextFeatureCache()


def test_combine_maps():
    m1 = np.array([[0.2, 1.0]], dtype=np.float32)
    m2 = np.array([[0.5, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(combine_maps([m1, m2], "max", (1, 2)), [[0.5, 1.0]])
    np.testing.assert_allclose(combine_maps([m1, m2], "product", (1, 2)), [[0.6, 1.0]], atol=1e-6)
    assert not combine_maps([], "product", (2, 3)).any()


# ------------------------------------------------------------------------------------------------
# Text-feature cache


def test_cache_counts_and_lru():
    enc = OneHotEncoder()
    cache = TextFeatureCache(encoder=enc, maxsize=2)
    a = cache.encode(["cat", "sofa", "cat"])
    assert a.shape == (3, D) and torch.equal(a[0], a[2])
    assert cache.forwards == 1 and cache.misses == 2
    cache.encode(["sofa"])  # cached: no forward
    assert cache.forwards == 1 and cache.hits >= 1
    cache.encode(["room"])  # evicts the least recently used ("cat")
    assert cache.forwards == 2 and len(cache) == 2
    cache.encode(["cat"])
    assert cache.forwards == 3
    torch.testing.assert_close(cache.encode(["room"])[0].norm(), torch.tensor(1.0))


def test_cache_with_tiny_clip_second_encode_is_free(tiny_clip):
    cache = TextFeatureCache(tiny_clip, templates="single", maxsize=16)
    f1 = cache.encode(["blue doctor suit", "stripe tie"])
    forwards = cache.forwards
    f2 = cache.encode(["stripe tie", "blue doctor suit"])
    assert cache.forwards == forwards, "a cached phrase must cost no text-encoder forward"
    torch.testing.assert_close(f1.flip(0), f2)
    torch.testing.assert_close(f1.norm(dim=-1), torch.ones(2))
    # Same as the plain open_clip path: normalise(encode_text("a photo of a <text>."))
    with torch.no_grad():
        ref = tiny_clip.model.encode_text(tiny_clip.tokenizer(["a photo of a blue doctor suit."]))
    torch.testing.assert_close(f1[0], torch.nn.functional.normalize(ref, dim=-1)[0], atol=1e-5, rtol=1e-5)


def test_template_ensemble_is_normalise_average_renormalise(tiny_clip):
    templates = ["a photo of a {}.", "a drawing of the {}."]
    cache = TextFeatureCache(tiny_clip, templates=templates)
    with torch.no_grad():
        emb = tiny_clip.model.encode_text(tiny_clip.tokenizer([t.format("fox") for t in templates]))
    want = torch.nn.functional.normalize(torch.nn.functional.normalize(emb, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(cache.encode(["fox"])[0], want, atol=1e-5, rtol=1e-5)
    red = cache.redundant()
    with torch.no_grad():
        emb = tiny_clip.model.encode_text(tiny_clip.tokenizer([t.format("") for t in templates]))
    torch.testing.assert_close(red, torch.nn.functional.normalize(torch.nn.functional.normalize(emb, dim=-1).mean(0), dim=0),
                               atol=1e-5, rtol=1e-5)
    assert len(IMAGENET_TEMPLATES) == 85


def test_chunked_forwards_keep_text_order(tiny_clip):
    texts = ["a much longer phrase about a castle on a hill", "fox", "red sofa"]
    one = TextFeatureCache(tiny_clip, templates="single")
    many = TextFeatureCache(tiny_clip, templates="single", batch_size=1)  # one text per forward
    f_one, f_many = one.encode(texts), many.encode(texts)
    assert one.forwards == 1 and many.forwards == 3
    torch.testing.assert_close(f_one, f_many, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_one[1], one.encode(["fox"])[0])


def test_trimmed_text_forward_equals_encode_text(tiny_clip):
    tokens = tiny_clip.tokenizer(["a cat", "a very long prompt " * 30, ""])  # includes a truncated one
    with torch.no_grad():
        torch.testing.assert_close(_trimmed_encode_text(tiny_clip.model, tokens),
                                   tiny_clip.model.encode_text(tokens), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# With the tiny CLIP end to end


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in [(64, 96), (80, 80), (120, 50)]]


@pytest.fixture(scope="module")
def tiny_aq(tiny_preset, tiny_clip, nlp):
    return AQMap.from_preset(tiny_preset, clip=tiny_clip, nlp=nlp)


def test_same_image_scores_the_same_alone_and_in_batch(tiny_aq, images):
    prompts = [PROMPT, "Mr. Beans wearing sun glasses with blue doctor suit and stripe tie", "a fox in snow"]
    batch = tiny_aq.score(images, prompts)
    for img, prompt, rb in zip(images, prompts, batch):
        (ra,) = tiny_aq.score([img], [prompt])
        assert ra.a == pytest.approx(rb.a, abs=1e-5)
        assert ra.clip_score == pytest.approx(rb.clip_score, abs=1e-5)
        assert [p.defect for p in ra.phrases] == [p.defect for p in rb.phrases]
        assert [p.a_phs for p in ra.phrases] == pytest.approx([p.a_phs for p in rb.phrases], abs=1e-5)
        assert ra.A.shape == (img.height, img.width)
        np.testing.assert_allclose(ra.A, rb.A, atol=1e-4)
        assert 0.0 <= rb.A.min() and rb.A.max() <= 1.0 and 0.0 <= rb.a <= 1.0


def test_from_tokens_shares_one_surgery_forward(tiny_aq, tiny_clip, tiny_preset, images, monkeypatch):
    calls = []
    original = SurgeryEncoder.forward
    monkeypatch.setattr(SurgeryEncoder, "forward", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    prompts = [PROMPT, None, "a fox in snow"]
    via_score = tiny_aq.score(images, prompts)
    assert calls == [3], "one surgery forward for the whole batch"
    enc = SurgeryEncoder(tiny_clip.model.visual, tiny_preset.clip.surgery_blocks)
    pixels = preprocess_images(images, tiny_preset.clip.image_size, tiny_clip.mean, tiny_clip.std)
    with torch.no_grad():
        tokens = enc(pixels)  # what a combined PQ+AQ scorer computes once and hands to both
    via_tokens = tiny_aq.from_tokens(tokens, [(i.height, i.width) for i in images], prompts)
    assert via_score[1] is None and via_tokens[1] is None
    for ra, rb in zip(via_score, via_tokens):
        if ra is not None:
            assert ra.a == pytest.approx(rb.a, abs=1e-6)


def test_messy_prompts_end_to_end(tiny_aq, images):
    long_prompt = ", ".join(f"a {c} {n}" for c in ["red", "green", "blue", "tall"] for n in
                            ["cat", "tree", "house", "boat", "car", "bird"])  # > 77 tokens, 24 phrases
    prompts = [
        long_prompt,
        "(masterpiece:1.2), ((best quality)), 1girl, [cat|dog] ears <lora:x:0.6> BREAK night sky",
        "一只猫 sitting on a chair 🐱",
    ]
    out = tiny_aq.score(images, prompts)
    assert len(out[0].phrases) == tiny_aq.cfg.max_phrases
    for r, img in zip(out, images):
        assert r is not None and math.isfinite(r.a) and 0.0 <= r.a <= 1.0
        assert r.A.shape == (img.height, img.width) and np.isfinite(r.A).all()
        assert "<lora" not in r.emphasised_prompt and "BREAK" not in r.emphasised_prompt
    no_noun = tiny_aq.score(images[:1], ["beautiful, colorful, amazing"])[0]
    assert [p.noun for p in no_noun.phrases] == [""]
    assert no_noun.phrases[0].a_pns == no_noun.phrases[0].a_phs  # noun-less phrase stands for itself
    assert no_noun.phrases[0].defect != ADJECTIVE_UNMATCHED


def test_long_emphasised_prompt_puts_phrases_first(tiny_aq):
    cleaned = "word " * 80
    text = tiny_aq.emphasise(cleaned.strip(), ["red sofa"])
    assert text.startswith("(red sofa:1.1), ")
    assert tiny_aq.emphasise("a cat", ["red sofa", "red sofa", "room"]) == "a cat, (red sofa:1.1), (room:1.1)"


def test_modifiers_are_no_phrase_no_defect_and_stay_in_the_prompt(nlp, monkeypatch):
    # The style tail yields no phrase (so no defect, no map in A, nothing emphasised), while the whole
    # prompt, tail included, is what clip_score reads and what the refinement prompt starts with.
    styled = PROMPT + ", highly detailed, trending on artstation, by greg rutkowski, octane render"
    monkeypatch.setitem(AXIS, styled, AXIS[PROMPT])
    aq, enc = injected_aq(nlp)  # AQConfig() default: modifiers = "strip"
    (r,) = aq.from_tokens(make_tokens(cls_sims()), [(2, 2)], [styled])
    assert [(ph.text, ph.defect) for ph in r.phrases] == [
        ("cat sitting", None), ("red sofa", ADJECTIVE_UNMATCHED), ("living room", NOUN_UNMATCHED)]
    assert [ph.parent for ph in r.phrases] == [0, 0, 0]
    np.testing.assert_allclose(r.A, np.maximum(M_CAT, M_SOFA), atol=1e-5)
    assert r.emphasised_prompt == f"{styled}, (red sofa:1.1), (living room:1.1)"
    encoded = [t for call in enc.calls for t in call]
    assert styled in encoded and not any("artstation" in t or "octane" in t for t in encoded if t != styled)
    # "keep" (the reference preset) parses the tail as phrases, as every preset did before
    keep, _ = injected_aq(nlp, modifiers="keep")
    (p,) = keep.parse([styled])
    assert "octane render" in p.texts and p.modifiers == ()


@pytest.mark.parametrize("field, value", [("modifiers", "drop"), ("noun", "head"), ("parents", "text")])
def test_unknown_parse_option_is_refused(field, value):
    with pytest.raises(ValueError, match=f"aq.{field}"):
        AQMap(None, dataclasses.replace(AQConfig(), **{field: value}), TextFeatureCache(encoder=OneHotEncoder()))
