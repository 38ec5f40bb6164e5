"""The `reference` preset reproduces the authors' PQ-Map.py and AQ-Map.py number for number.

Both sides run on the same random ViT-B/16-quickgelu weights (an open_clip state dict written to a
file, loaded by the preset through `clip.checkpoint` as a user would) and the released PQ prompt
checkpoints. The other side is `reference_scripts.py`: a plain-torch re-derivation of the scripts
that shares no code with grefine_curate. Bar: 1e-4 on every number and every map pixel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import reference_scripts as ref
from grefine_curate.curate.clip_models import load_clip
from grefine_curate.curate.config import FACTORS, resolve_preset
from grefine_curate.curate.scorer import QualityScorer
from grefine_curate.curate.syntax import STOP_WORDS, load_spacy

TOL = 1e-4
RELEASED = {"overall": "PQ-overall.pth", "technical": "PQ-technical.pth",
            "rationality": "PQ-rational.pth", "naturalness": "PQ-natural.pth"}
# Non-square sizes in both orientations, a square one, and a small odd one: (H, W)
SIZES = [(240, 320), (320, 200), (224, 224), (97, 150)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import open_clip

    torch.manual_seed(1234)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    path = tmp_path_factory.mktemp("vitb16") / "W.pt"
    torch.save(model.state_dict(), path)
    del model
    return path


@pytest.fixture(scope="module")
def state_dict(weights):
    return {k: v.float() for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()}


def _preset(weights, **pq):
    over = {"clip": {"checkpoint": str(weights) if weights else None, "pretrained": "", "device": "cpu",
                     "dtype": "float32"}}
    if pq:
        over["pq"] = pq
    return resolve_preset("reference", overrides=over)


@pytest.fixture(scope="module")
def clip(weights):
    return load_clip(_preset(weights).clip)


@pytest.fixture(scope="module")
def embeds():
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "reference-prompts"
    return [ref.load_embed(torch.load(folder / RELEASED[f], map_location="cpu", weights_only=True)) for f in FACTORS]


@pytest.fixture(scope="module")
def images():
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return [Image.fromarray(photo).resize((w, h), Image.BICUBIC) for photo, (h, w) in zip(photos, SIZES)]


@pytest.fixture(scope="module")
def reference_pq(state_dict, embeds, images):
    """Per image: the script's (map at the script's own (W, H) size, map at (H, W), p with --multi, factors)."""
    out = []
    for img in images:
        feats = ref.cs_encode_image(state_dict, ref.clip_transform()(img).unsqueeze(0))
        m_swap, p_multi, ps = ref.perceptual_quality_map(state_dict, embeds, img, multi=True, image_features=feats)
        m_hw, p0, _ = ref.perceptual_quality_map(state_dict, embeds, img, multi=False,
                                                 shape=(img.height, img.width), image_features=feats)
        out.append({"map_swap": m_swap, "map": m_hw, "p_multi": p_multi, "p": p0, "factors": ps})
    return out


def test_pq_factor_scores_p_and_map_match_the_script(weights, clip, reference_pq, images):
    results = QualityScorer(_preset(weights), clip=clip).score_pq(images)
    for img, ours, theirs in zip(images, results, reference_pq):
        got = [ours.factors[f] for f in FACTORS]
        np.testing.assert_allclose(got, theirs["factors"], atol=TOL, rtol=0)
        assert abs(ours.p - theirs["p_multi"]) <= TOL  # --multi: the cask with the first-alpha bug
        assert ours.P.shape == (img.height, img.width)
        np.testing.assert_allclose(ours.P, theirs["map"], atol=TOL, rtol=0)
        # the scores are not trivially equal to each other or saturated: the comparison has teeth
        assert len({round(v, 3) for v in got}) > 1 and all(0.01 < v < 0.99 for v in got)
        assert float(ours.P.std()) > 0.05


def test_pq_without_cask_is_the_scripts_default_p(weights, clip, reference_pq, images):
    results = QualityScorer(_preset(weights, cask=False), clip=clip).score_pq(images)
    for ours, theirs in zip(results, reference_pq):
        assert abs(ours.p - theirs["p"]) <= TOL
        assert abs(ours.p - theirs["factors"][0]) <= TOL


def test_pq_reference_swap_reproduces_the_transposed_map(weights, clip, reference_pq, images):
    results = QualityScorer(_preset(weights, map_orientation="reference-swap"), clip=clip).score_pq(images)
    for img, ours, theirs in zip(images, results, reference_pq):
        assert theirs["map_swap"].shape == (img.width, img.height)  # the script's (W, H) resize
        assert ours.P.shape == (img.height, img.width)
        np.testing.assert_allclose(ours.P, theirs["map_swap"].T, atol=TOL, rtol=0)
    non_square = [i for i, (h, w) in enumerate(SIZES) if h != w]
    assert any(np.abs(results[i].P - reference_pq[i]["map"]).max() > 0.05 for i in non_square)


def test_pq_cli_contract(weights, reference_pq, images, tmp_path):
    """`pq IMAGE --preset reference --config FILE --json --save-map PATH` with `[clip] checkpoint`."""
    from typer.testing import CliRunner

    from grefine_curate.cli import app

    img_path = tmp_path / "img.png"
    images[0].save(img_path)
    cfg = tmp_path / "ref.toml"
    cfg.write_text(f'[clip]\ncheckpoint = "{weights}"\ndevice = "cpu"\ndtype = "float32"\n')
    out_map = tmp_path / "map.png"
    res = CliRunner().invoke(app, ["pq", str(img_path), "--preset", "reference", "--config", str(cfg),
                                   "--json", "--save-map", str(out_map)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    theirs = reference_pq[0]
    np.testing.assert_allclose([doc["factors"][f] for f in FACTORS], theirs["factors"], atol=TOL, rtol=0)
    assert abs(doc["p"] - theirs["p_multi"]) <= TOL
    png = np.asarray(Image.open(out_map), dtype=np.float32) / 255.0
    assert png.shape == theirs["map"].shape
    assert np.abs(png - theirs["map"]).max() <= 1 / 255 + TOL  # 8-bit PNG of the same map


# -- AQ-Map ----------------------------------------------------------------------------------------

# Short prompts: each text costs 85 template forwards of the full text tower on each side.
PROMPTS = [
    "Mr. Beans wearing sun glasses with blue doctor suit and stripe tie",  # the script's default query
    "a red fox sitting in the snow",
    "a cat and a dog",
    "a rocket launching from a tower under a blue sky",  # repeated "a": parents by word text (below)
    "a man with a hat and a dog with a hat standing in a park with a man",  # repeated words and phrases
    "a dragon made of glass",
    "an old man with a white beard",
    "an astronaut on the moon, highly detailed",  # comma after a noun: the script crashes
    "portrait of a woman, oil painting",  # likewise
]
# Long prompts with repeated words, where the script's word-text mapping (a word's last part wins)
# gives other parents than a mapping by position: the preset's aq.parents = "word-text" must follow
# the script on all of them. Parsing only (no CLIP), so the list can be long.
REPEATED_WORDS = [
    "a rocket launching from a tower under a blue sky",
    "a man with a hat and a dog with a hat standing in a park with a man",
    "a woman in a red coat walking a dog along a river under a bridge with a lamp on the bridge",
    "a boy on a bike and a girl on a bike riding past a house with a garden and a tree in the garden",
    "an old castle on a hill above a village with a church and a tower next to a river with a boat on the river",
    "a knight with a sword and a shield fighting a dragon with a long tail in front of a castle with a red flag",
    "a lighthouse on a rock in the sea with a ship in the distance under a dark sky with a full moon",
    "a cat sleeping on a chair next to a dog sleeping on a rug in front of a fireplace",
    "a dog sleeping all day",  # a trailing non-chunk noun: the script's noun is the last one ("day")
]


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")


@pytest.fixture(scope="module")
def text_cache():
    return {}


@pytest.fixture(scope="module")
def aq_model():
    """ViT-B/16-quickgelu with a 2-layer text transformer (width 512, 8 heads, context 77, as ViT-B/16).

    Each AQ text costs 85 template forwards of the text tower on each side; through 12 layers the
    AQ cases take minutes on 2 cores. The AQ comparison is about the image side, the ensemble, the
    maps and the defects, not the text tower's depth (the PQ tests above run all 12 layers).
    GREFINE_FULL_FIDELITY=1 runs it with the full 12-layer text tower.
    """
    import os

    import open_clip

    torch.manual_seed(4321)
    if os.environ.get("GREFINE_FULL_FIDELITY") == "1":
        return open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")
    cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "layers": 2}}
    return open_clip.CLIP(**cfg).eval()


@pytest.fixture(scope="module")
def aq_state_dict(aq_model):
    return {k: v.detach().float().clone() for k, v in aq_model.state_dict().items()}


@pytest.fixture(scope="module")
def aq_clip(aq_model):
    import open_clip

    from grefine_curate.curate.clip_models import CLIP_MEAN, CLIP_STD, ClipBundle

    for prm in aq_model.parameters():
        prm.requires_grad_(False)
    return ClipBundle(model=aq_model, tokenizer=open_clip.get_tokenizer("ViT-B-16"), mean=CLIP_MEAN,
                      std=CLIP_STD, device=torch.device("cpu"), dtype=torch.float32, name="ViT-B-16-quickgelu/2-layer text")


def test_reference_preset_parses_as_the_script_on_repeated_words(nlp):
    """Phrases, nouns and parents of the `reference` preset's parse equal AQ-Map.py's, word for word."""
    from grefine_curate.curate.syntax import parse_prompts

    aq = _preset(None).aq
    assert (aq.modifiers, aq.noun, aq.parents) == ("keep", "last-noun", "word-text")
    ours = parse_prompts(REPEATED_WORDS, nlp, aq.max_phrases, modifiers=aq.modifiers, noun=aq.noun,
                         parents=aq.parents)
    default = parse_prompts(REPEATED_WORDS, nlp, aq.max_phrases, modifiers="keep")  # position, chunk-head
    differ = 0
    for prompt, pp, dp in zip(REPEATED_WORDS, ours, default):
        phrases, parent_of, nouns = ref.parse_reference(prompt, nlp, STOP_WORDS)
        assert pp.texts == phrases, prompt
        assert pp.nouns == nouns, prompt
        assert [pp.phrases[ph.parent].text for ph in pp.phrases] == [parent_of[t] for t in phrases], prompt
        differ += ([dp.phrases[ph.parent].text for ph in dp.phrases] != [parent_of[t] for t in phrases]
                   or dp.nouns != nouns)
    assert differ >= 6, "the default options should differ from the script here, or the test has no teeth"


def _run_reference(state_dict, clip, nlp, img, prompt, cache):
    try:
        return ref.aq_reference(state_dict, clip.tokenizer, nlp, STOP_WORDS, img, prompt, cache=cache,
                                exact_ties=True)
    except (KeyError, AssertionError, IndexError) as e:  # where their script stops
        return e


def test_aq_phrases_parents_scores_defects_a_and_map_match_the_script(
        aq_clip, aq_state_dict, nlp, images, text_cache):
    scorer = QualityScorer(_preset(None), clip=aq_clip)
    compared, crashed, defects_seen = 0, 0, set()
    for k, prompt in enumerate(PROMPTS):
        img = images[k % len(images)]
        theirs = _run_reference(aq_state_dict, aq_clip, nlp, img, prompt, text_cache)
        ours = scorer.score([img], [prompt])[0].aq
        assert ours is not None and ours.phrases, prompt  # ours runs on every prompt
        if isinstance(theirs, Exception):
            crashed += 1
            continue
        compared += 1
        assert [ph.text for ph in ours.phrases] == theirs["phrases"], prompt
        parents = [ours.phrases[ph.parent].text for ph in ours.phrases]
        assert parents == theirs["parents"], prompt  # aq.parents = "word-text", as the script
        assert [ph.noun for ph in ours.phrases] == theirs["nouns"], prompt
        np.testing.assert_allclose([ph.a_pns for ph in ours.phrases], theirs["a_pns"], atol=TOL, rtol=0)
        np.testing.assert_allclose([ph.a_phs for ph in ours.phrases], theirs["a_phs"], atol=TOL, rtol=0)
        assert [ph.defect for ph in ours.phrases] == theirs["defects"], prompt
        defects_seen.update(d for d in theirs["defects"] if d)
        assert abs(ours.a - theirs["a"]) <= TOL, prompt
        assert ours.A.shape == (img.height, img.width)
        np.testing.assert_allclose(ours.A, theirs["A"], atol=TOL, rtol=0)
    assert compared >= 6 and crashed >= 2, (compared, crashed)
    assert defects_seen, "no defect in any compared case: the defect and map comparison would be vacuous"


def test_aq_noun_maps_match_the_script(aq_clip, aq_state_dict, nlp, images, text_cache):
    """Every noun map, not only the selected ones, at the image's (H, W) (AQ-Map.py uses cv2's shape)."""
    from grefine_curate.curate.surgery import tokens_to_maps

    scorer = QualityScorer(_preset(None), clip=aq_clip)
    img, prompt = images[1], PROMPTS[0]
    theirs = ref.aq_reference(aq_state_dict, aq_clip.tokenizer, nlp, STOP_WORDS, img, prompt, cache=text_cache)
    tokens = scorer.tokens([img])
    feats = torch.nn.functional.normalize(tokens.float(), dim=1)  # the preset's aq.feature_norm = "token"
    text = scorer.aq.cache.encode(theirs["nouns"]) - scorer.aq.cache.redundant()
    sims = feats[0, 1:] @ text.T  # (HW, T)
    maps = tokens_to_maps(sims.T, (14, 14), [(img.height, img.width)] * sims.shape[1], "bilinear")
    for j, m in enumerate(maps):
        np.testing.assert_allclose(m, theirs["noun_maps"][:, :, j], atol=TOL, rtol=0)
