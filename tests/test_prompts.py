"""PQ prompts: the released CLIP-IQA+ checkpoints, the safetensors prompt file, pyiqa's token layout."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grefine_curate.curate.clip_models import load_clip
from grefine_curate.curate.config import FACTORS, PQConfig, load_preset
from grefine_curate.curate.errors import ConfigError
from grefine_curate.curate.prompts import (
    RELEASED_FILES,
    LearnedPrompts,
    ZeroShotPrompts,
    build_pq_prompts,
    import_clipiqa_checkpoint,
    prompts_dir,
    resolve_prompt_file,
)

RELEASED = Path(__file__).parent / "data" / "reference-prompts"


@pytest.fixture(scope="module")
def clip():
    return load_clip(load_preset("tiny").clip)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts") / "pq.safetensors"
    return import_clipiqa_checkpoint(RELEASED, out)


def _released(factor):
    return torch.load(RELEASED / RELEASED_FILES[factor], map_location="cpu", weights_only=True)["params"]


# -- importer on the real released files ---------------------------------------------------------


def test_import_released_checkpoints_round_trip(imported):
    prompts = LearnedPrompts.load(imported)
    assert (prompts.width, prompts.n_ctx, prompts.context_length) == (512, 16, 77)
    assert prompts.name_lens == [3, 3] and prompts.eot_index == [20, 20]
    tensors = prompts.state_tensors()
    for f in FACTORS:
        src = _released(f)
        assert tensors[f"{f}.ctx"].shape == (2, 16, 512)
        assert tensors[f"{f}.token_prefix"].shape == (2, 1, 512)
        assert tensors[f"{f}.token_suffix"].shape == (2, 60, 512)
        assert torch.equal(tensors[f"{f}.ctx"], src["prompt_learner.ctx"])
        assert torch.equal(tensors[f"{f}.token_prefix"], src["prompt_learner.token_prefix"])
        assert torch.equal(tensors[f"{f}.token_suffix"], src["prompt_learner.token_suffix"])
    assert not torch.equal(tensors["overall.ctx"], tensors["technical.ctx"])  # one context per factor
    meta = prompts.file_metadata
    assert meta["format"] == "grefine-pq-prompts" and meta["width"] == "512"


def test_shipped_reference_prompts_equal_the_released_files(imported):
    shipped = LearnedPrompts.load(resolve_prompt_file("reference-pq")).state_tensors()
    fresh = LearnedPrompts.load(imported).state_tensors()
    assert shipped.keys() == fresh.keys()
    for k in shipped:
        assert torch.equal(shipped[k], fresh[k]), k
    assert (prompts_dir() / "LICENSE").is_file() and (prompts_dir() / "ORIGIN.md").is_file()


def test_import_accepts_a_factor_mapping(tmp_path):
    paths = {f: RELEASED / name for f, name in RELEASED_FILES.items()}
    out = import_clipiqa_checkpoint(paths, tmp_path / "x.safetensors")
    assert LearnedPrompts.load(out).width == 512


class _Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch " + str(_Payload.marker),))


def test_import_refuses_a_pickle_that_is_not_weights_only(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    bad = tmp_path / "PQ-overall.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"params": _Payload()}, fh, protocol=2)
    paths = {f: RELEASED / name for f, name in RELEASED_FILES.items()} | {"overall": bad}
    with pytest.raises(ConfigError, match="weights-only") as err:
        import_clipiqa_checkpoint(paths, tmp_path / "out.safetensors")
    assert str(bad) in str(err.value) and "CLIPIQA+" in str(err.value)
    assert not _Payload.marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", ["garbage", "wrong-keys", "wrong-shape", "safetensors"])
def test_import_refuses_other_formats_with_a_clear_message(tmp_path, kind):
    bad = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    elif kind == "wrong-keys":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    elif kind == "wrong-shape":
        torch.save({"params": {k: torch.zeros(16, 512) for k in
                               ("prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix")}}, bad)
    else:
        from safetensors.torch import save_file

        save_file({"ctx": torch.zeros(2, 16, 512)}, str(bad))
    paths = {f: RELEASED / name for f, name in RELEASED_FILES.items()} | {"technical": bad}
    with pytest.raises(ConfigError) as err:
        import_clipiqa_checkpoint(paths, tmp_path / "out.safetensors")
    msg = str(err.value)
    assert str(bad) in msg and "prompt_learner.ctx" in msg  # names the file and what was expected


def test_import_refuses_a_folder_without_the_files(tmp_path):
    with pytest.raises(ConfigError, match="PQ-overall.pth"):
        import_clipiqa_checkpoint(tmp_path, tmp_path / "out.safetensors")


# -- loading, names, width ---------------------------------------------------------------------


def test_load_by_name_and_by_path(imported):
    assert resolve_prompt_file("reference-pq").name == "reference-pq.safetensors"
    assert resolve_prompt_file(str(imported)) == imported
    with pytest.raises(ConfigError, match="Did you mean 'reference-pq'"):
        resolve_prompt_file("reference-qp")
    with pytest.raises(ConfigError, match="not found"):
        resolve_prompt_file("/nonexistent/prompts.safetensors")


def test_a_pth_file_as_prompt_file_is_refused_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match="import_clipiqa_checkpoint"):
        LearnedPrompts.load(RELEASED / "PQ-overall.pth")


def test_width_mismatch_names_both_widths(clip, imported):
    prompts = LearnedPrompts.load(imported)
    with pytest.raises(ConfigError, match="width 512.*width 32"):
        prompts.features(clip.model)
    cfg = PQConfig(prompts="reference-pq")
    with pytest.raises(ConfigError, match="width"):
        build_pq_prompts(cfg, clip.tokenizer).features(clip.model)


def test_released_prompts_run_on_a_vit_b16_text_tower(imported):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    feats = LearnedPrompts.load(imported).features(model)
    assert feats.shape == (4, 2, 512)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4, 2))


# -- the pyiqa layout on the tiny model ---------------------------------------------------------


def test_placeholder_prompts_equal_encode_text_of_the_rearranged_sentence(clip):
    """Class words in the middle: [SOS | X*8 | good photo .. | X*8 | EOT] is exactly this sentence."""
    prompts = LearnedPrompts.from_placeholders(clip.model, clip.tokenizer)
    assert prompts.eot_index == [20, 20] and prompts.name_lens == [3, 3]
    with torch.no_grad():
        feats = prompts.features(clip.model)  # (4, 2, D)
        x8 = " ".join(["X"] * 8)
        ids = clip.tokenizer([f"{x8} Good photo.. {x8}", f"{x8} Bad photo.. {x8}"])
        assert int(ids.argmax(-1)[0]) == 20
        expected = F.normalize(clip.model.encode_text(ids), dim=-1)
    for j in range(len(FACTORS)):
        torch.testing.assert_close(feats[j], expected, atol=1e-5, rtol=1e-5)


def test_embedding_layout_puts_contexts_around_the_class_tokens(clip):
    prompts = LearnedPrompts.from_placeholders(clip.model, clip.tokenizer)
    with torch.no_grad():
        for f in FACTORS:
            prompts.ctx[f].copy_(torch.arange(16).float().view(1, 16, 1).expand(2, 16, 32) + 1000)
    emb = prompts.embeddings("overall")  # (2, 77, 32)
    assert emb.shape == (2, 77, 32)
    assert torch.equal(emb[:, 1:9, 0], torch.arange(8).float().expand(2, 8) + 1000)  # ctx[:8]
    assert (emb[:, 9:12, 0] < 100).all()  # class tokens (good/bad, photo, ..)
    assert torch.equal(emb[:, 12:20, 0], torch.arange(8, 16).float().expand(2, 8) + 1000)  # ctx[8:]
    with torch.no_grad():
        eot = clip.model.token_embedding(torch.tensor([49407]))[0]
    torch.testing.assert_close(emb[0, 20], eot)


def test_learned_features_differ_per_factor_and_are_trainable(clip, tmp_path):
    prompts = LearnedPrompts.from_placeholders(clip.model, clip.tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for f in FACTORS:
            prompts.ctx[f].add_(0.05 * torch.randn_like(prompts.ctx[f]))
    feats = prompts.features(clip.model)
    assert feats.shape == (4, 2, 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4, 2))
    for i in range(4):
        assert (feats[i, 0] - feats[i, 1]).abs().max() > 1e-3, "good and bad features coincide"
        for j in range(i + 1, 4):
            assert (feats[i] - feats[j]).abs().max() > 1e-3, f"factors {i} and {j} give the same features"
    feats[:, 0].sum().backward()
    for f in FACTORS:
        assert isinstance(prompts.ctx[f], torch.nn.Parameter) and prompts.ctx[f].grad is not None
        assert prompts.ctx[f].grad.abs().sum() > 0
    # save / load keeps the trained contexts exactly
    out = prompts.save(tmp_path / "trained.safetensors", extra_metadata={"note": "test"})
    again = LearnedPrompts.load(out)
    for f in FACTORS:
        assert torch.equal(again.ctx[f], prompts.ctx[f].detach())
    assert again.file_metadata["note"] == "test"
    torch.testing.assert_close(again.features(clip.model), feats.detach())


def test_zero_shot_features_are_encode_text_of_the_pairs(clip):
    cfg = PQConfig()
    prompts = build_pq_prompts(cfg, clip.tokenizer)
    assert isinstance(prompts, ZeroShotPrompts)
    with torch.no_grad():
        feats = prompts.features(clip.model)
        expected = F.normalize(clip.model.encode_text(clip.tokenizer(["Sharp photo.", "Blurry photo."])), dim=-1)
    assert feats.shape == (4, 2, 32)
    torch.testing.assert_close(feats[1], expected)  # technical = ("Sharp photo.", "Blurry photo.")
    with pytest.raises(ConfigError, match="naturalness"):
        ZeroShotPrompts({f: ("a", "b") for f in FACTORS[:3]}, clip.tokenizer)
