"""Diffusion model loading: shipped full-size architectures (on the meta device), tiny pipelines,
loading through a Hugging Face cache layout offline, the missing-weights error, `models list/pull`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from grefine_curate.curate.config import load_preset
from grefine_curate.curate.diffusion_models import (arch_dir, build_arch_component, build_random_pipelines,
                                                    build_tiny_pipelines, clip_tokenizer,
                                                    ensure_exact_step_scheduler, load_refiner_pipelines,
                                                    weight_manifest)
from grefine_curate.curate.errors import ModelUnavailableError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- full-size architectures from configs/arch, built on the meta device (no memory) ----------- #


def test_sdxl_inpainting_unet_has_the_published_2_57_billion_parameters():
    unet = build_arch_component("sdxl_inpaint_unet", device="meta")
    assert next(unet.parameters()).device.type == "meta"
    assert n_params(unet) == pytest.approx(2.567e9, rel=0.002)  # SDXL UNet: 2.6B (2,567,463,684 + 9-ch conv_in)
    assert unet.config.in_channels == 9  # latents + mask + masked-image latents
    # cross_attention_dim = 768 + 1280 (two text encoders); 6 time ids * 256 + 1280 pooled
    assert unet.config.cross_attention_dim == 2048
    assert unet.add_embedding.linear_1.in_features == 6 * 256 + 1280


def test_sdxl_refiner_unet_architecture():
    unet = build_arch_component("sdxl_refiner_unet", device="meta")
    assert unet.config.cross_attention_dim == 1280  # text_encoder_2 only
    assert unet.add_embedding.linear_1.in_features == 5 * 256 + 1280  # aesthetic score instead of target size
    assert n_params(unet) == pytest.approx(2.26e9, rel=0.005)


@pytest.mark.parametrize("name, published", [
    ("sdxl_text_encoder", 123.1e6),  # OpenAI CLIP ViT-L/14 text tower
    ("sdxl_text_encoder_2", 694.7e6),  # OpenCLIP ViT-bigG/14 text tower
    ("sdxl_vae", 83.65e6),
    ("sd15_unet", 859.5e6),  # SD 1.5: 860M
    ("sd15_inpaint_unet", 859.5e6),
])
def test_component_sizes(name, published):
    assert n_params(build_arch_component(name, device="meta")) == pytest.approx(published, rel=0.002)


def test_every_shipped_arch_config_builds():
    names = sorted(p.stem for p in arch_dir().glob("*.json"))
    assert {"sdxl_inpaint_unet", "sdxl_refiner_unet", "sdxl_vae", "sdxl_text_encoder", "sdxl_text_encoder_2",
            "sdxl_scheduler", "sd15_unet", "sd15_inpaint_unet", "sd15_vae", "sd15_text_encoder",
            "sd15_scheduler"} <= set(names)
    for name in names:
        assert build_arch_component(name, device="meta") is not None


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_random_weights_pipelines_wire_shared_components(kind):
    stage1, stage2 = build_random_pipelines(kind, torch.device("meta"), torch.float16)
    assert stage2.vae is stage1.vae
    assert stage1.unet.dtype == torch.float16
    if kind == "sdxl":
        assert stage2.text_encoder is None and stage2.text_encoder_2 is stage1.text_encoder_2
        assert stage2.config.requires_aesthetics_score
    else:
        assert stage2.text_encoder is stage1.text_encoder


# --- tokenizer, schedulers, tiny pipelines --------------------------------------------------- #


def test_clip_tokenizer_matches_open_clip():
    import open_clip

    text = "a photo of a cat wearing sun glasses, blue doctor suit!"
    ids = clip_tokenizer()(text, padding="max_length", max_length=77).input_ids
    ref = open_clip.get_tokenizer("ViT-B-16")([text])[0].tolist()
    n = ids.index(49407) + 1
    assert ids[:n] == ref[:n] and ids[0] == 49406 and len(ids) == 77
    assert clip_tokenizer("!").pad_token_id == 0


def test_pndm_is_swapped_for_an_exact_step_scheduler():
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    class Pipe:
        scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)

    pipe = Pipe()
    pipe.scheduler.set_timesteps(10)
    assert len(pipe.scheduler.timesteps) == 11  # why it is swapped
    ensure_exact_step_scheduler(pipe)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    euler = pipe.scheduler
    ensure_exact_step_scheduler(pipe)
    assert pipe.scheduler is euler  # an exact one is kept


@pytest.fixture(scope="module")
def tiny_pipes():
    return build_tiny_pipelines()


def test_tiny_pipelines_share_components(tiny_pipes):
    stage1, stage2 = tiny_pipes
    assert type(stage1).__name__ == "StableDiffusionXLInpaintPipeline"
    assert type(stage2).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert stage1.unet.config.in_channels == 9 and stage2.unet.config.in_channels == 4
    assert stage2.vae is stage1.vae and stage2.text_encoder_2 is stage1.text_encoder_2
    assert stage2.text_encoder is None
    assert stage1.scheduler is not stage2.scheduler  # schedulers hold per-call state


def test_tiny_pipelines_are_deterministic():
    a, _ = build_tiny_pipelines(seed=0)
    b, _ = build_tiny_pipelines(seed=0)
    for (na, pa), (_, pb) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert torch.equal(pa, pb), na


def test_load_tiny_preset():
    stage1, stage2 = load_refiner_pipelines(load_preset("tiny").refiner, device="cpu")
    assert stage1.device.type == "cpu" and stage2.vae is stage1.vae


# --- pretrained weights through a Hugging Face cache layout, offline ------------------------- #

SDXL = load_preset("sdxl")


def _save_to_cache(pipe, cache: Path, repo: str, commit: str = "0" * 40) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    pipe.save_pretrained(snapshot, safe_serialization=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory, tiny_pipes):
    """A models dir laid out like `models pull sdxl` leaves it, holding the tiny weights under the
    sdxl preset's model ids, plus a stand-in CLIP file."""
    cache = tmp_path_factory.mktemp("models")
    stage1, stage2 = tiny_pipes
    _save_to_cache(stage1, cache, SDXL.refiner.inpaint_model)
    _save_to_cache(stage2, cache, SDXL.refiner.img2img_model)
    clip_snap = cache / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / ("1" * 40)
    clip_snap.mkdir(parents=True)
    (clip_snap / "open_clip_model.safetensors").write_bytes(b"stand-in")
    (clip_snap.parent.parent / "refs").mkdir()
    (clip_snap.parent.parent / "refs" / "main").write_text("1" * 40)
    return cache


def test_sdxl_preset_loads_from_a_models_dir_offline(filled_cache, tiny_pipes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stage1, stage2 = load_refiner_pipelines(SDXL.refiner, models_dir=filled_cache, device="cpu")
    assert type(stage2).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert stage2.vae is stage1.vae and stage2.text_encoder_2 is stage1.text_encoder_2  # shared
    assert stage1.unet.dtype == torch.float32  # CPU: fp32
    ref = tiny_pipes[0].unet.state_dict()
    for k, v in stage1.unet.state_dict().items():  # the saved weights, not a fresh init
        assert torch.equal(v, ref[k]), k


def test_sdxl_preset_loads_from_a_local_folder(tmp_path, tiny_pipes):
    stage1, stage2 = tiny_pipes
    stage1.save_pretrained(tmp_path / "inpaint")
    stage2.save_pretrained(tmp_path / "refiner")
    cfg = replace(SDXL.refiner, inpaint_model=str(tmp_path / "inpaint"), img2img_model=str(tmp_path / "refiner"))
    a, b = load_refiner_pipelines(cfg, device="cpu")
    assert b.text_encoder_2 is a.text_encoder_2


def test_missing_weights_fail_fast_with_a_useful_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_refiner_pipelines(SDXL.refiner, models_dir=tmp_path, device="cpu")
    assert time.perf_counter() - t0 < 20  # seconds, not network retries
    msg = str(err.value)
    assert "diffusers/stable-diffusion-xl-1.0-inpainting-0.1" in msg  # what
    assert str(tmp_path) in msg  # where it looked
    assert "grefine-curate models pull" in msg and "--models-dir" in msg  # how to provide it
    assert "HF_HUB_OFFLINE" in msg


def test_weight_manifest_fetches_only_what_is_loaded():
    needs = weight_manifest(SDXL.refiner)
    assert [n.repo for n in needs] == [SDXL.refiner.inpaint_model, SDXL.refiner.img2img_model]
    stage2 = needs[1].allow_patterns()
    assert "unet/*.fp16.safetensors" in stage2
    assert not any(p.startswith(("vae/", "text_encoder")) for p in stage2)  # shared from stage 1
    assert weight_manifest(load_preset("tiny").refiner) == []
    full = replace(SDXL.refiner, variant="")
    assert "unet/*.safetensors" in weight_manifest(full)[0].allow_patterns()
    assert weight_manifest(full)[0].ignore_patterns()  # and not the fp16 copies


# --- models list / pull ------------------------------------------------------------------------ #


def test_list_models_reports_presence_without_network(filled_cache, tmp_path, monkeypatch):
    from grefine_curate.pipelines.models import list_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = {(r["preset"], r["component"]): r for r in list_models(filled_cache)}
    assert rows[("sdxl", "stage1 inpaint")]["present"] == "yes"
    assert rows[("sdxl", "stage2 img2img")]["present"] == "yes"
    assert rows[("sdxl", "clip")]["present"] == "yes"
    assert rows[("sdxl", "stage1 inpaint")]["model"] == SDXL.refiner.inpaint_model
    assert rows[("sd15", "stage1 inpaint")]["present"] == "no"
    assert rows[("tiny", "refiner")]["present"] == "yes"
    empty = {(r["preset"], r["component"]): r["present"] for r in list_models(tmp_path)}
    assert empty[("sdxl", "stage1 inpaint")] == "no" and empty[("sdxl", "clip")] == "no"


def test_list_models_sees_missing_weights(filled_cache, tmp_path):
    import shutil

    from grefine_curate.pipelines.models import list_models

    partial = tmp_path / "partial"
    shutil.copytree(filled_cache, partial)
    for f in partial.glob("models--diffusers--*/snapshots/*/unet/*.safetensors"):
        f.unlink()
    rows = {(r["preset"], r["component"]): r["present"] for r in list_models(partial)}
    assert rows[("sdxl", "stage1 inpaint")] == "no (missing unet)"


def test_pull_fails_fast_offline(tmp_path, monkeypatch):
    from grefine_curate.pipelines.models import pull_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE"):
        pull_models("sdxl", tmp_path / "dl")
    assert time.perf_counter() - t0 < 5
    assert pull_models("tiny", tmp_path / "dl") == []  # nothing to download


def test_job_weight_check_passes_on_a_filled_cache_and_names_a_missing_repo(filled_cache, tmp_path, monkeypatch):
    from grefine_curate.pipelines.models import check_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_weights(SDXL, "refine", filled_cache)  # everything present: no error
    partial = tmp_path / "partial"
    import shutil

    shutil.copytree(filled_cache, partial)
    shutil.rmtree(partial / "models--stabilityai--stable-diffusion-xl-refiner-1.0")
    check_weights(SDXL, "score", partial)  # score mode needs CLIP only
    with pytest.raises(ModelUnavailableError) as e:
        check_weights(SDXL, "refine", partial)
    assert "stabilityai/stable-diffusion-xl-refiner-1.0" in str(e.value) and "models pull" in str(e.value)


def test_random_components_are_built_in_the_target_dtype():
    """bfloat16 from the start: a full-size UNet built in float32 first would need 10 GB more at its peak."""
    vae = build_arch_component("sdxl_vae", "cpu", torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
